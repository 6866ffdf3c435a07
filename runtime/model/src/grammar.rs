//! Grammars that make malformed tool calls impossible.
//!
//! The registered tools' schemas become one JSON Schema: a `oneOf` of
//! `{"name": const NAME, "arguments": PARAMETERS}` objects, one per tool.
//! llama.cpp's `json_schema_to_grammar` turns it into GBNF, wrapped in the
//! Hermes `<tool_call>` block. With `tool_choice: auto` it is applied lazily,
//! from the moment the model writes `<tool_call>`; with `required` (or a
//! named tool) it applies from the first token.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// Which tools the model may (or must) call.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolChoice {
    /// The model decides; a call, once started, must be valid.
    #[default]
    Auto,
    /// No tools: they are not shown and no call is parsed.
    None,
    /// The model must call one of the tools.
    Required,
    /// The model must call this tool.
    #[serde(untagged)]
    Named(String),
}

/// The text that opens a tool call, and the lazy grammar's trigger.
pub const TOOL_CALL_OPEN: &str = "<tool_call>";

/// Most values one parameter's grounding may list; past it the parameter
/// is left free (a list that long helps a model no more than the schema).
pub const MAX_GROUNDED_VALUES: usize = 512;

/// Longest value a grounding may list, and longest pattern it may set.
pub const MAX_GROUNDED_VALUE_BYTES: usize = 512;

/// Values that a tool's string parameter may take in the call grammar,
/// besides what its schema says: *grounded arguments*.
///
/// A caller that knows which values can work gives them here, and the
/// grammar lets the model write only those. The agent loop grounds the
/// parameters that must name something that exists (the built-in file
/// tools' `path`) in the workspace as it is at that step; a small model
/// then writes `notes.txt`, not `/Users/someone/Desktop/notes.txt`.
///
/// Grounding narrows the grammar only, never the prompt (the tool list the
/// model sees stays byte-stable, so the KV cache is reused) nor validation
/// (a call is still checked against the tool's own schema). A parameter
/// that is not a string in the schema, an empty list, or one longer than
/// [`MAX_GROUNDED_VALUES`] leaves the parameter as its schema has it.
///
/// Where the values cannot be listed (a file that does not exist yet, or
/// code) a parameter may instead be grounded in a *pattern*: a regular expression,
/// anchored with `^` and `$`, over the value as JSON writes it inside its
/// quotes, in the subset llama.cpp's converter reads. It narrows the
/// grammar of the formats whose arguments are JSON (Hermes, Mistral,
/// Llama 3 and the others that write `{"name": …, "arguments": {…}}`);
/// the formats that write a value as bare text leave it free. A pattern
/// longer than [`MAX_GROUNDED_VALUE_BYTES`] is left out, and listed values
/// win over a pattern.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ArgumentValues {
    by_tool: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    patterns: BTreeMap<String, BTreeMap<String, String>>,
}

impl ArgumentValues {
    /// No grounding: every parameter as its schema has it.
    pub fn none() -> Self {
        Self::default()
    }

    /// Grounds `tool`'s top-level string parameter `parameter` in `values`
    /// (replacing what was set before).
    pub fn set(&mut self, tool: &str, parameter: &str, values: Vec<String>) {
        self.by_tool
            .entry(tool.to_string())
            .or_default()
            .insert(parameter.to_string(), values);
    }

    /// The values `tool`'s `parameter` is grounded in, if any.
    pub fn get(&self, tool: &str, parameter: &str) -> Option<&[String]> {
        self.by_tool.get(tool)?.get(parameter).map(Vec::as_slice)
    }

    /// Grounds `tool`'s top-level string parameter `parameter` in the
    /// values `pattern` matches (see the type's docs), replacing the
    /// pattern set before. The caller vouches for the pattern: llama.cpp's
    /// converter reads one it does not support (or one not anchored) as
    /// any string, and refuses one that is not a regular expression, which
    /// fails the step's grammar for every tool.
    pub fn set_pattern(&mut self, tool: &str, parameter: &str, pattern: impl Into<String>) {
        self.patterns
            .entry(tool.to_string())
            .or_default()
            .insert(parameter.to_string(), pattern.into());
    }

    /// The pattern `tool`'s `parameter` is grounded in, if any.
    pub fn pattern(&self, tool: &str, parameter: &str) -> Option<&str> {
        self.patterns.get(tool)?.get(parameter).map(String::as_str)
    }

    /// Whether nothing is grounded.
    pub fn is_empty(&self) -> bool {
        self.by_tool.values().all(BTreeMap::is_empty)
            && self.patterns.values().all(BTreeMap::is_empty)
    }

    /// Narrows `parameters` (a tool's shaped argument schema) to the
    /// grounded values of `tool`.
    fn narrow(&self, tool: &str, parameters: &mut Value) {
        // Patterns first: listed values, where both are set, replace the
        // property whole.
        for (name, pattern) in self.patterns.get(tool).into_iter().flatten() {
            let Some(Value::Object(property)) = parameters
                .get_mut("properties")
                .and_then(|properties| properties.get_mut(name))
            else {
                continue;
            };
            let constrained = ["enum", "const", "pattern", "format"]
                .iter()
                .any(|keyword| property.contains_key(*keyword));
            if pattern.len() <= MAX_GROUNDED_VALUE_BYTES
                && property.get("type") == Some(&Value::from("string"))
                && !constrained
            {
                property.insert("pattern".into(), Value::from(pattern.as_str()));
            }
        }
        let Some(grounded) = self.by_tool.get(tool) else {
            return;
        };
        for (name, values) in grounded {
            let usable = !values.is_empty()
                && values.len() <= MAX_GROUNDED_VALUES
                && values.iter().all(|v| v.len() <= MAX_GROUNDED_VALUE_BYTES);
            let Some(property) = parameters
                .get_mut("properties")
                .and_then(|properties| properties.get_mut(name))
            else {
                continue;
            };
            if usable
                && declares_type(property.get("type"), "string")
                && property.get("enum").is_none()
                && property.get("const").is_none()
            {
                *property = if declares_type(property.get("type"), "null") {
                    let mut allowed: Vec<Value> = values.iter().cloned().map(Value::from).collect();
                    allowed.push(Value::Null);
                    json!({"type": ["string", "null"], "enum": allowed})
                } else {
                    json!({"type": "string", "enum": values})
                };
            }
        }
    }
}

/// The JSON Schema of one tool call, over the given `(name, parameters)`,
/// string parameters narrowed to their grounded values (see
/// [`ArgumentValues`]).
pub fn call_schema<'a>(
    tools: impl IntoIterator<Item = (&'a str, &'a Value)>,
    grounding: &ArgumentValues,
) -> Value {
    let variants: Vec<Value> = tools
        .into_iter()
        .map(|(name, parameters)| {
            let parameters = argument_schema(name, parameters, grounding);
            json!({
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false
            })
        })
        .collect();
    match variants.len() {
        1 => variants.into_iter().next().unwrap_or(Value::Null),
        _ => json!({ "oneOf": variants }),
    }
}

/// A tool's argument schema as the call grammars use it: annotations
/// dropped, strings bounded, string parameters narrowed to their grounded
/// values (see [`ArgumentValues`]).
pub(crate) fn argument_schema(name: &str, parameters: &Value, grounding: &ArgumentValues) -> Value {
    let mut parameters = parameters.clone();
    shape_for_grammar(&mut parameters);
    grounding.narrow(name, &mut parameters);
    parameters
}

/// Drops annotations the grammar converter does not need. Strings are
/// left unbounded: llama.cpp reads a repetition bound above 2000 as none,
/// and a lower one would forbid long file contents.
///
/// Only keywords are touched: the keys of `properties` (and of the other
/// name-to-schema maps) are parameter names, so a parameter called
/// `title`, `description` or `default` keeps its place, and `enum`,
/// `const`, `default` and `examples` hold values, not schemas.
fn shape_for_grammar(schema: &mut Value) {
    let Value::Object(object) = schema else {
        return;
    };
    for annotation in ["$schema", "description", "title", "default", "examples"] {
        object.remove(annotation);
    }
    for (keyword, value) in object.iter_mut() {
        match keyword.as_str() {
            // Maps from a name to a schema.
            "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas" => {
                if let Value::Object(named) = value {
                    named.values_mut().for_each(shape_for_grammar);
                }
            }
            // Lists of schemas.
            "anyOf" | "oneOf" | "allOf" | "prefixItems" => {
                if let Value::Array(schemas) = value {
                    schemas.iter_mut().for_each(shape_for_grammar);
                }
            }
            // One schema (`items` may also be a list in older drafts).
            "items"
            | "additionalProperties"
            | "not"
            | "if"
            | "then"
            | "else"
            | "contains"
            | "propertyNames"
            | "additionalItems" => match value {
                Value::Array(schemas) => schemas.iter_mut().for_each(shape_for_grammar),
                other => shape_for_grammar(other),
            },
            // Values (`enum`, `const`, `required`, ...) are left as they are.
            _ => {}
        }
    }
}

/// Whether a schema's `type` (`declared`) is `kind`, or a list that holds it.
pub(crate) fn declares_type(declared: Option<&Value>, kind: &str) -> bool {
    match declared {
        Some(Value::String(declared)) => declared == kind,
        Some(Value::Array(declared)) => declared.iter().any(|k| k == kind),
        _ => false,
    }
}

/// Wraps the converted call grammar (whose start rule is `root`) in
/// `<tool_call>` blocks: one or more calls, one block each.
pub fn wrap_in_tool_call(converted: &str) -> String {
    let renamed: Vec<String> = converted
        .lines()
        .map(|line| match line.strip_prefix("root ::=") {
            Some(rest) => format!("tool-call-json ::={rest}"),
            None => line.to_string(),
        })
        .collect();
    format!(
        "root ::= tool-call (\"\\n\" tool-call)*\ntool-call ::= \"{TOOL_CALL_OPEN}\\n\" tool-call-json \"\\n</tool_call>\"\n{}\n",
        renamed.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_union_keys_each_tool_on_a_const_name() {
        let read = json!({"type": "object", "properties": {"path": {"type": "string", "description": "x"}}, "required": ["path"], "$schema": "s"});
        let list = json!({"type": "object", "properties": {}});
        let schema = call_schema(
            [("read_file", &read), ("list_dir", &list)],
            &ArgumentValues::none(),
        );
        assert_eq!(
            schema["oneOf"][0]["properties"]["name"]["const"],
            "read_file"
        );
        assert_eq!(
            schema["oneOf"][0]["properties"]["arguments"]["properties"]["path"],
            json!({"type": "string"})
        );
        assert!(schema["oneOf"][0]["properties"]["arguments"]
            .get("$schema")
            .is_none());
        let wrapped = wrap_in_tool_call("root ::= object\nobject ::= \"{\" \"}\"");
        assert!(wrapped.starts_with("root ::= tool-call (\"\\n\" tool-call)*\ntool-call ::= \"<tool_call>\\n\" tool-call-json"));
        assert!(wrapped.contains("tool-call-json ::= object"));
    }

    /// Grounding narrows a string parameter to its values, and leaves
    /// alone what it cannot narrow: a non-string parameter, one with its
    /// own `enum`, an empty list, one too long, another tool.
    #[test]
    fn grounding_narrows_string_parameters_only() {
        let read = json!({"type": "object", "properties": {
            "path": {"type": "string", "minLength": 1, "description": "x"},
            "count": {"type": "integer"},
            "mode": {"type": "string", "enum": ["a", "b"]},
            "folder": {"type": ["string", "null"]},
            "empty": {"type": "string"},
            "long": {"type": "string"}
        }});
        let other = json!({"type": "object", "properties": {"path": {"type": "string"}}});
        let mut grounding = ArgumentValues::none();
        assert!(grounding.is_empty());
        grounding.set(
            "read_file",
            "path",
            vec!["notes.txt".into(), "src/main.rs".into()],
        );
        grounding.set("read_file", "count", vec!["1".into()]);
        grounding.set("read_file", "mode", vec!["c".into()]);
        grounding.set("read_file", "folder", vec![".".into(), "src".into()]);
        grounding.set("read_file", "empty", Vec::new());
        grounding.set(
            "read_file",
            "long",
            (0..=MAX_GROUNDED_VALUES).map(|i| i.to_string()).collect(),
        );
        grounding.set("read_file", "missing", vec!["x".into()]);
        assert_eq!(
            grounding.get("read_file", "path").map(<[String]>::len),
            Some(2)
        );
        let schema = call_schema([("read_file", &read), ("list_dir", &other)], &grounding);
        let properties = &schema["oneOf"][0]["properties"]["arguments"]["properties"];
        assert_eq!(
            properties["path"],
            json!({"type": "string", "enum": ["notes.txt", "src/main.rs"]})
        );
        assert_eq!(
            properties["folder"],
            json!({"type": ["string", "null"], "enum": [".", "src", null]}),
            "a nullable parameter stays nullable"
        );
        assert_eq!(properties["count"], json!({"type": "integer"}));
        assert_eq!(properties["mode"]["enum"], json!(["a", "b"]));
        assert_eq!(properties["empty"], json!({"type": "string"}));
        assert_eq!(properties["long"], json!({"type": "string"}));
        assert!(properties.get("missing").is_none());
        let untouched = &schema["oneOf"][1]["properties"]["arguments"]["properties"]["path"];
        assert_eq!(untouched, &json!({"type": "string"}));
        assert_eq!(
            call_schema([("read_file", &read)], &ArgumentValues::none())["properties"]["arguments"]
                ["properties"]["path"],
            json!({"type": "string", "minLength": 1})
        );
    }

    /// A pattern narrows a plain string parameter, keeps its other
    /// keywords, and leaves alone one with its own `enum`, `pattern` or
    /// `format`, a nullable one, and one whose values are listed.
    #[test]
    fn a_pattern_narrows_plain_string_parameters_only() {
        let write = json!({"type": "object", "properties": {
            "path": {"type": "string", "minLength": 1},
            "listed": {"type": "string"},
            "own": {"type": "string", "pattern": "^a$"},
            "date": {"type": "string", "format": "date"},
            "nullable": {"type": ["string", "null"]},
            "count": {"type": "integer"}
        }});
        let mut grounding = ArgumentValues::none();
        for parameter in ["path", "listed", "own", "date", "nullable", "count"] {
            grounding.set_pattern("write_file", parameter, "^[a-z]+$");
        }
        grounding.set_pattern("write_file", "missing", "^x$");
        grounding.set("write_file", "listed", vec!["one".into()]);
        assert!(!ArgumentValues {
            patterns: grounding.patterns.clone(),
            ..ArgumentValues::none()
        }
        .is_empty());
        assert_eq!(grounding.pattern("write_file", "path"), Some("^[a-z]+$"));
        let schema = call_schema([("write_file", &write)], &grounding);
        let properties = &schema["properties"]["arguments"]["properties"];
        assert_eq!(
            properties["path"],
            json!({"type": "string", "minLength": 1, "pattern": "^[a-z]+$"})
        );
        assert_eq!(
            properties["listed"],
            json!({"type": "string", "enum": ["one"]})
        );
        assert_eq!(properties["own"]["pattern"], "^a$");
        assert!(properties["date"].get("pattern").is_none());
        assert!(properties["nullable"].get("pattern").is_none());
        assert_eq!(properties["count"], json!({"type": "integer"}));
        assert!(properties.get("missing").is_none());
        // Too long a pattern leaves the parameter free.
        let mut long = ArgumentValues::none();
        long.set_pattern(
            "write_file",
            "path",
            format!("^{}$", "a".repeat(MAX_GROUNDED_VALUE_BYTES)),
        );
        let schema = call_schema([("write_file", &write)], &long);
        assert!(schema["properties"]["arguments"]["properties"]["path"]
            .get("pattern")
            .is_none());
    }

    /// Parameters named like schema keywords keep their schemas, and
    /// values under `enum`/`const` are not mistaken for schemas.
    #[test]
    fn parameters_named_like_keywords_survive() {
        let movie = json!({
            "type": "object",
            "title": "get_movie arguments",
            "properties": {
                "title": {"type": "string", "description": "The film's title."},
                "description": {"type": "string"},
                "default": {"type": "integer", "default": 3},
                "tags": {"type": "array", "items": {"type": "string", "title": "tag"}},
                "note": {"type": ["string", "null"]},
                "mode": {"enum": [{"title": "kept"}]}
            },
            "required": ["title", "description", "default"]
        });
        let schema = call_schema([("get_movie", &movie)], &ArgumentValues::none());
        let arguments = &schema["properties"]["arguments"];
        assert!(arguments.get("title").is_none(), "{arguments}");
        let properties = &arguments["properties"];
        assert_eq!(properties["title"], json!({"type": "string"}));
        assert_eq!(properties["description"]["type"], "string");
        assert_eq!(properties["default"], json!({"type": "integer"}));
        assert_eq!(properties["tags"]["items"], json!({"type": "string"}));
        assert_eq!(properties["mode"]["enum"], json!([{"title": "kept"}]));
        assert_eq!(properties["note"], json!({"type": ["string", "null"]}));
        assert_eq!(
            arguments["required"],
            json!(["title", "description", "default"])
        );
    }
}
