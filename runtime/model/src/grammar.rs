//! Grammars that make malformed tool calls impossible.
//!
//! The registered tools' schemas become one JSON Schema: a `oneOf` of
//! `{"name": const NAME, "arguments": PARAMETERS}` objects, one per tool.
//! llama.cpp's `json_schema_to_grammar` turns it into GBNF, wrapped in the
//! Hermes `<tool_call>` block. With `tool_choice: auto` it is applied lazily,
//! from the moment the model writes `<tool_call>`; with `required` (or a
//! named tool) it applies from the first token.

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

/// Longest string the grammar lets the model write in one argument, so a
/// constrained call always closes within the token budget.
const GRAMMAR_MAX_STRING: u64 = 2048;

/// The JSON Schema of one tool call, over the given `(name, parameters)`.
pub fn call_schema<'a>(tools: impl IntoIterator<Item = (&'a str, &'a Value)>) -> Value {
    let variants: Vec<Value> = tools
        .into_iter()
        .map(|(name, parameters)| {
            let mut parameters = parameters.clone();
            shape_for_grammar(&mut parameters);
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

/// Drops annotations the grammar converter does not need and bounds
/// strings, so a constrained call always terminates.
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
    let is_string = match object.get("type") {
        Some(Value::String(kind)) => kind == "string",
        // `["string", "null"]`: the converter keeps `maxLength` for the
        // string branch.
        Some(Value::Array(kinds)) => kinds.iter().any(|k| k == "string"),
        _ => false,
    };
    if is_string
        && !object.contains_key("enum")
        && !object.contains_key("const")
        && !object.contains_key("maxLength")
    {
        object.insert("maxLength".into(), GRAMMAR_MAX_STRING.into());
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
        let schema = call_schema([("read_file", &read), ("list_dir", &list)]);
        assert_eq!(
            schema["oneOf"][0]["properties"]["name"]["const"],
            "read_file"
        );
        assert_eq!(
            schema["oneOf"][0]["properties"]["arguments"]["properties"]["path"]["maxLength"],
            2048
        );
        assert!(schema["oneOf"][0]["properties"]["arguments"]
            .get("$schema")
            .is_none());
        let wrapped = wrap_in_tool_call("root ::= object\nobject ::= \"{\" \"}\"");
        assert!(wrapped.starts_with("root ::= tool-call (\"\\n\" tool-call)*\ntool-call ::= \"<tool_call>\\n\" tool-call-json"));
        assert!(wrapped.contains("tool-call-json ::= object"));
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
        let schema = call_schema([("get_movie", &movie)]);
        let arguments = &schema["properties"]["arguments"];
        assert!(arguments.get("title").is_none(), "{arguments}");
        let properties = &arguments["properties"];
        assert_eq!(
            properties["title"],
            json!({"type": "string", "maxLength": 2048})
        );
        assert_eq!(properties["description"]["type"], "string");
        assert_eq!(properties["default"], json!({"type": "integer"}));
        assert_eq!(
            properties["tags"]["items"],
            json!({"type": "string", "maxLength": 2048})
        );
        assert_eq!(properties["mode"]["enum"], json!([{"title": "kept"}]));
        assert_eq!(properties["note"]["maxLength"], 2048);
        assert_eq!(
            arguments["required"],
            json!(["title", "description", "default"])
        );
    }
}
