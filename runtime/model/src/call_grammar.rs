//! Call grammars in each model's own tool-call syntax, and the triggers
//! that start them lazily.
//!
//! [`ToolFormat`] says which syntax a model writes. [`call_grammar`] builds
//! the GBNF grammar under which it can write only valid calls in that
//! syntax, and the [`CallTrigger`] from which a lazy grammar applies, the
//! way llama.cpp's `common/chat.cpp` builds one per format:
//!
//! | format | a call under the grammar | lazy trigger |
//! |---|---|---|
//! | Hermes | `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>` | `<tool_call>` |
//! | Qwen3-Coder XML | `<tool_call>\n<function=NAME>\n<parameter=K>\nV\n</parameter>\n</function>\n</tool_call>` | `<tool_call>` |
//! | pythonic | `[NAME(k="v", n=3)]`, or inside `<\|tool_call_start\|>…<\|tool_call_end\|>` | `<\|tool_call_start\|>`; `[NAME(` at the start of the reply |
//! | FunctionGemma | `<start_function_call>call:NAME{k:<escape>v<escape>,n:3}<end_function_call>` | `<start_function_call>` |
//! | DeepSeek V3/R1 | `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n{…}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>`, or V3.1's `NAME<｜tool▁sep｜>{…}` in the same blocks | `<｜tool▁calls▁begin｜>` |
//! | Functionary v3.2 | `>>>NAME\n{…}` (the first `>>>` may be the prompt's) | `>>>NAME\n`; `NAME\n` at the start |
//! | Command R7B | `<\|START_ACTION\|>[{"tool_call_id": "0", "tool_name": …, "parameters": {…}}]<\|END_ACTION\|>` | `<\|START_ACTION\|>` |
//! | Mistral | `[TOOL_CALLS][{"name": …, "arguments": {…}}]` | `[TOOL_CALLS]` |
//! | Llama 3 JSON | `{"name": …, "parameters": {…}}` | `{"name"` (as JSON spaces it) at the start of the reply |
//!
//! Where a format writes arguments as JSON, the tool's argument schema goes
//! through llama.cpp's schema converter as it is. Where it writes one value
//! per parameter (Qwen3-Coder XML, FunctionGemma, pythonic), each
//! parameter gets a rule of its own:
//! - string parameters as the format writes text: raw between the tags,
//!   between `<escape>`s, or as a Python string literal;
//! - enums and grounded values as their literal alternatives;
//! - other types as JSON, or as Python literals for pythonic.
//!
//! Required parameters must appear, in the schema's order, and optional
//! ones may follow, in order. Text between tags never holds the closing
//! tag (a rule per prefix of the tag, as llama.cpp's
//! `gbnf_excluding_grammar` builds it), so what the grammar lets through,
//! the parser reads back whole. Strings are not bounded: llama.cpp reads a
//! repetition bound above 2000 as none, and a bound under it would forbid
//! long file contents; the token budget ends a call that runs on.
//!
//! The grammar is built from tool names and schemas that hosts, schema
//! files and MCP servers supply. Every piece of their text enters the
//! grammar as an escaped literal, and rule names are generated from the
//! tool's index, never taken from its name. The parsers in
//! [`crate::formats`] read what these grammars let through.

use std::collections::HashSet;
use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use crate::backend::tool_name;
use crate::formats::{is_identifier, ToolFormat};
use crate::grammar::{
    argument_schema, call_schema, declares_type, wrap_in_tool_call, ArgumentValues, TOOL_CALL_OPEN,
};

/// Converts a JSON Schema into GBNF whose start rule is `root`: llama.cpp's
/// `json_schema_to_grammar`.
pub type SchemaConverter<'a> = &'a dyn Fn(&Value) -> Result<String, String>;

/// A call grammar and where it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallGrammar {
    /// The GBNF grammar; its start rule is `root`.
    pub gbnf: String,
    /// From where the grammar applies when it is lazy.
    pub trigger: CallTrigger,
}

/// The text that opens a call: from there on a lazy grammar applies.
///
/// The same rules are searched for here, in Rust ([`CallTrigger::find`]),
/// and by llama.cpp ([`CallTrigger::patterns`]), so the runtime knows
/// which token completes the trigger.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CallTrigger {
    /// Words that open a call wherever they appear.
    anywhere: Vec<String>,
    /// Words that open a call only at the start of the reply, after
    /// whitespace.
    at_start: Vec<String>,
}

impl CallTrigger {
    /// The trigger of the Hermes grammar: `<tool_call>` anywhere.
    pub fn hermes() -> Self {
        Self {
            anywhere: vec![TOOL_CALL_OPEN.to_string()],
            at_start: Vec::new(),
        }
    }

    /// Where in `text` (a reply so far) the first call opens, if one does.
    pub fn find(&self, text: &str) -> Option<usize> {
        let anywhere = self
            .anywhere
            .iter()
            .filter_map(|word| text.find(word.as_str()))
            .min();
        let rest = text.trim_start_matches(is_regex_space);
        let at_start = self
            .at_start
            .iter()
            .any(|word| rest.starts_with(word.as_str()))
            .then_some(text.len() - rest.len());
        match (anywhere, at_start) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether `piece`, written after `text` (a reply in which no call has
    /// opened yet), opens one. Only the end of `text` that a word could
    /// still complete is searched, so a long reply costs no more per token.
    pub fn completed_by(&self, text: &str, piece: &str) -> bool {
        let longest = self.anywhere.iter().map(String::len).max().unwrap_or(0);
        let tail_start = text.len().saturating_sub(longest);
        let tail_start = (tail_start..=text.len())
            .find(|at| text.is_char_boundary(*at))
            .unwrap_or(text.len());
        let tail = format!("{}{piece}", &text[tail_start..]);
        if self
            .anywhere
            .iter()
            .any(|word| tail.contains(word.as_str()))
        {
            return true;
        }
        let reply_start = text.trim_start_matches(is_regex_space).len();
        let longest_start = self.at_start.iter().map(String::len).max().unwrap_or(0);
        reply_start <= longest_start && self.find(&format!("{text}{piece}")).is_some()
    }

    /// The same rules as llama.cpp's lazy-grammar trigger patterns
    /// (ECMAScript regular expressions, searched for; the grammar starts at
    /// the first capture group, or at the match).
    ///
    /// These are plain alternatives, never `[\s\S]*?(…)[\s\S]*`: libstdc++
    /// matches that recursively over the whole reply, and a long reply can
    /// overflow the stack (llama.cpp #17902).
    pub fn patterns(&self) -> Vec<String> {
        let alternatives = |words: &[String]| {
            words
                .iter()
                .map(|word| regex_escape(word))
                .collect::<Vec<_>>()
                .join("|")
        };
        let mut patterns = Vec::new();
        if !self.anywhere.is_empty() {
            patterns.push(format!("(?:{})", alternatives(&self.anywhere)));
        }
        if !self.at_start.is_empty() {
            patterns.push(format!("^\\s*((?:{}))", alternatives(&self.at_start)));
        }
        patterns
    }
}

/// Whitespace as ECMAScript's `\s` sees it in a byte string.
fn is_regex_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// `text` as an ECMAScript regular expression that matches it literally.
fn regex_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\^$.|?*+()[]{}/-".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// How many calls one reply may make.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallCount {
    /// Exactly one (`parallel_tool_calls: false`).
    One,
    /// One or more, in the format's own list or sequence.
    #[default]
    Many,
}

/// The grammar for `count` calls to any of `tools` (OpenAI tool objects)
/// in `format`, string parameters narrowed to their grounded values.
/// Fails on a set with no named tool, or where the converter refuses a
/// schema.
pub fn call_grammar(
    format: ToolFormat,
    tools: &[Value],
    grounding: &ArgumentValues,
    count: CallCount,
    convert: SchemaConverter<'_>,
) -> Result<CallGrammar, String> {
    // `more` repeats a call after `separator`, where more than one may come.
    let more = |call: &str, separator: &str| match count {
        CallCount::One => String::new(),
        CallCount::Many => format!(" ( {separator}{call} )*"),
    };
    let max_items = match count {
        CallCount::One => json!(1),
        CallCount::Many => Value::Null,
    };
    let empty = Value::Object(Map::new());
    let tools: Vec<Tool> = tools
        .iter()
        .filter_map(|tool| {
            // A name the parsers would not read back is never offered in a
            // grammar (names are identifiers in every format's parser).
            let name = tool_name(tool).filter(|name| is_identifier(name))?;
            let parameters = tool.pointer("/function/parameters").unwrap_or(&empty);
            Some(Tool {
                name,
                arguments: argument_schema(name, parameters, grounding),
            })
        })
        .collect();
    if tools.is_empty() {
        return Err("no tool with a name of letters, digits, `_`, `-` or `.` to call".into());
    }
    let mut rules = Rules::default();
    let anywhere = |word: &str| CallTrigger {
        anywhere: vec![word.to_string()],
        at_start: Vec::new(),
    };
    let trigger = match format {
        ToolFormat::Hermes => {
            let pairs = tools.iter().map(|t| (t.name, &t.arguments));
            let schema = call_schema(pairs, &ArgumentValues::none());
            let mut gbnf = wrap_in_tool_call(&convert(&schema)?);
            if count == CallCount::One {
                gbnf = gbnf.replacen(
                    "root ::= tool-call (\"\\n\" tool-call)*\n",
                    "root ::= tool-call\n",
                    1,
                );
            }
            return Ok(CallGrammar {
                gbnf,
                trigger: CallTrigger::hermes(),
            });
        }
        ToolFormat::Mistral => {
            let mut calls = json!({
                "type": "array",
                "items": keyed_union(&tools, "name", "arguments", None),
                "minItems": 1
            });
            calls["maxItems"] = max_items.clone();
            drop_null(&mut calls);
            let calls = rules.convert(convert, "calls-", &calls)?;
            rules.add("root", format!("{} {calls}", literal("[TOOL_CALLS]")));
            anywhere("[TOOL_CALLS]")
        }
        ToolFormat::Llama3Json => {
            let call = keyed_union(&tools, "name", "parameters", None);
            let call = rules.convert(convert, "call-", &call)?;
            rules.add("root", call);
            CallTrigger {
                anywhere: Vec::new(),
                // `{"name"` opening the reply, as the converter's JSON
                // spaces it or as a model does; a JSON answer that is not
                // a call stays free.
                at_start: ["", " ", "\n", "\n  ", "\n    ", "\n\t"]
                    .iter()
                    .map(|space| format!("{{{space}\"name\""))
                    .collect(),
            }
        }
        ToolFormat::CommandR7b => {
            let id = json!({"type": "string", "pattern": "^[0-9]{1,3}$"});
            let mut actions = json!({
                "type": "array",
                "items": keyed_union(&tools, "tool_name", "parameters", Some(("tool_call_id", id))),
                "minItems": 1
            });
            actions["maxItems"] = max_items.clone();
            drop_null(&mut actions);
            let actions = rules.convert(convert, "actions-", &actions)?;
            rules.add(
                "root",
                format!(
                    "{} {actions} {}",
                    literal("<|START_ACTION|>"),
                    literal("<|END_ACTION|>")
                ),
            );
            anywhere("<|START_ACTION|>")
        }
        ToolFormat::DeepSeek => {
            let calls = rules.json_calls(&tools, convert, |name| {
                (format!("{name}\n```json\n"), "\n```")
            })?;
            // V3.1 writes `NAME<｜tool▁sep｜>{…}`, with no fence.
            let mut bare = Vec::new();
            for (i, tool) in tools.iter().enumerate() {
                let rule = format!("v{i}");
                rules.add(
                    &rule,
                    format!(
                        "{} t{i}-root",
                        literal(&format!("{}<｜tool▁sep｜>", tool.name))
                    ),
                );
                bare.push(rule);
            }
            rules.add(
                "call",
                format!(
                    "{} ( {} ( {} ) | {} ) {}",
                    literal("<｜tool▁call▁begin｜>"),
                    literal("function<｜tool▁sep｜>"),
                    calls.join(" | "),
                    bare.join(" | "),
                    literal("<｜tool▁call▁end｜>")
                ),
            );
            rules.add(
                "root",
                format!(
                    "{} call{} {}",
                    literal("<｜tool▁calls▁begin｜>"),
                    more("call", "\"\\n\"? "),
                    literal("<｜tool▁calls▁end｜>")
                ),
            );
            anywhere("<｜tool▁calls▁begin｜>")
        }
        ToolFormat::FunctionaryV32 => {
            let calls = rules.json_calls(&tools, convert, |name| (format!("{name}\n"), ""))?;
            rules.add("call", calls.join(" | "));
            // The template's generation prompt may end with the first
            // `>>>` itself.
            rules.add("root", format!("\">>>\"? call{}", more("call", "\">>>\" ")));
            CallTrigger {
                anywhere: tools.iter().map(|t| format!(">>>{}\n", t.name)).collect(),
                at_start: tools.iter().map(|t| format!("{}\n", t.name)).collect(),
            }
        }
        ToolFormat::Qwen3CoderXml => {
            let calls = rules.per_parameter(&tools, ValueSyntax::XmlText, convert)?;
            rules.add(
                "call",
                format!(
                    "{} ( {} ) {}",
                    literal("<tool_call>\n"),
                    calls.join(" | "),
                    literal("</tool_call>")
                ),
            );
            rules.add("root", format!("call{}", more("call", "\"\\n\" ")));
            anywhere(TOOL_CALL_OPEN)
        }
        ToolFormat::FunctionGemma => {
            let calls = rules.per_parameter(&tools, ValueSyntax::Escaped, convert)?;
            rules.add(
                "call",
                format!(
                    "{} ( {} ) {}",
                    literal("<start_function_call>call:"),
                    calls.join(" | "),
                    literal("<end_function_call>")
                ),
            );
            rules.add("root", format!("call{}", more("call", "")));
            anywhere("<start_function_call>")
        }
        ToolFormat::Pythonic => {
            let calls = rules.per_parameter(&tools, ValueSyntax::Python, convert)?;
            rules.add("call", calls.join(" | "));
            rules.add(
                "calls",
                format!("\"[\" call{} \"]\"", more("call", "\", \" ")),
            );
            rules.add(
                "root",
                format!(
                    "{} calls {} | calls",
                    literal("<|tool_call_start|>"),
                    literal("<|tool_call_end|>")
                ),
            );
            CallTrigger {
                anywhere: vec!["<|tool_call_start|>".into()],
                at_start: tools.iter().map(|t| format!("[{}(", t.name)).collect(),
            }
        }
    };
    Ok(CallGrammar {
        gbnf: rules.finish(),
        trigger,
    })
}

/// Drops a `null` `maxItems` (no bound).
fn drop_null(schema: &mut Value) {
    if let Some(object) = schema.as_object_mut() {
        object.retain(|_, value| !value.is_null());
    }
}

/// A named tool and its shaped argument schema.
struct Tool<'a> {
    name: &'a str,
    arguments: Value,
}

/// The schema of one call object: the tool's name under `name_key`, its
/// arguments under `arguments_key`, and optionally one more field; a
/// union over the tools.
fn keyed_union(
    tools: &[Tool<'_>],
    name_key: &str,
    arguments_key: &str,
    extra: Option<(&str, Value)>,
) -> Value {
    let variants: Vec<Value> = tools
        .iter()
        .map(|tool| {
            let mut properties = Map::new();
            let mut required = Vec::new();
            if let Some((key, schema)) = &extra {
                properties.insert((*key).to_string(), schema.clone());
                required.push(Value::from(*key));
            }
            properties.insert(name_key.to_string(), json!({"const": tool.name}));
            properties.insert(arguments_key.to_string(), tool.arguments.clone());
            required.push(Value::from(name_key));
            required.push(Value::from(arguments_key));
            json!({
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": false
            })
        })
        .collect();
    match <[Value; 1]>::try_from(variants) {
        Ok([only]) => only,
        Err(variants) => json!({ "oneOf": variants }),
    }
}

/// How a format writes one parameter's value.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ValueSyntax {
    /// `<parameter=K>\nV\n</parameter>\n`: text as it is, others as JSON.
    XmlText,
    /// `K:<escape>V<escape>`: text between escapes, others as JSON.
    Escaped,
    /// `K=V`: Python literals.
    Python,
}

/// GBNF rules being assembled.
#[derive(Default)]
struct Rules {
    lines: Vec<String>,
    /// Shared rules already added (by name).
    shared: HashSet<&'static str>,
}

impl Rules {
    fn add(&mut self, name: &str, body: String) {
        self.lines.push(format!("{name} ::= {body}"));
    }

    /// Adds a shared rule once.
    fn share(&mut self, name: &'static str, body: impl FnOnce() -> String) -> &'static str {
        if self.shared.insert(name) {
            self.add(name, body());
        }
        name
    }

    /// Converts `schema` and adds its rules, renamed under `prefix`;
    /// returns the name of its start rule.
    fn convert(
        &mut self,
        convert: SchemaConverter<'_>,
        prefix: &str,
        schema: &Value,
    ) -> Result<String, String> {
        let converted = convert(schema)?;
        self.lines.extend(prefixed(&converted, prefix));
        Ok(format!("{prefix}root"))
    }

    /// One rule per tool, `t{i}`: the text `frame` gives before and after
    /// the tool's JSON arguments (converted as `t{i}-root`) for its name;
    /// returns the tools' rule names.
    fn json_calls(
        &mut self,
        tools: &[Tool<'_>],
        convert: SchemaConverter<'_>,
        frame: impl Fn(&str) -> (String, &'static str),
    ) -> Result<Vec<String>, String> {
        let mut names = Vec::new();
        for (i, tool) in tools.iter().enumerate() {
            let arguments = self.convert(convert, &format!("t{i}-"), &tool.arguments)?;
            let (open, close) = frame(tool.name);
            let rule = format!("t{i}");
            let close = if close.is_empty() {
                String::new()
            } else {
                format!(" {}", literal(close))
            };
            self.add(&rule, format!("{} {arguments}{close}", literal(&open)));
            names.push(rule);
        }
        Ok(names)
    }

    /// One rule per tool, each parameter a rule of its own in `syntax`;
    /// returns the tools' rule names.
    fn per_parameter(
        &mut self,
        tools: &[Tool<'_>],
        syntax: ValueSyntax,
        convert: SchemaConverter<'_>,
    ) -> Result<Vec<String>, String> {
        let mut names = Vec::new();
        for (i, tool) in tools.iter().enumerate() {
            let required: Vec<&str> = tool
                .arguments
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut items = Vec::new();
            if let Some(properties) = tool.arguments.get("properties").and_then(Value::as_object) {
                for (j, (key, schema)) in properties.iter().enumerate() {
                    // A key the parser would not read back is left out; a
                    // call then fails validation if it was required.
                    if !is_identifier(key) {
                        continue;
                    }
                    let value = self.value(syntax, &format!("t{i}-p{j}-"), schema, convert)?;
                    let item = match syntax {
                        ValueSyntax::XmlText => format!(
                            "{} {value} {}",
                            literal(&format!("<parameter={key}>\n")),
                            literal("\n</parameter>\n")
                        ),
                        ValueSyntax::Escaped => format!("{} {value}", literal(&format!("{key}:"))),
                        ValueSyntax::Python => format!("{} {value}", literal(&format!("{key}="))),
                    };
                    let rule = format!("t{i}-p{j}");
                    self.add(&rule, item);
                    items.push((rule, required.contains(&key.as_str())));
                }
            }
            let separator = match syntax {
                ValueSyntax::XmlText => "",
                ValueSyntax::Escaped => ",",
                ValueSyntax::Python => ", ",
            };
            let arguments = sequence(&items, separator);
            let (open, close) = match syntax {
                ValueSyntax::XmlText => (format!("<function={}>\n", tool.name), "</function>\n"),
                ValueSyntax::Escaped => (format!("{}{{", tool.name), "}"),
                ValueSyntax::Python => (format!("{}(", tool.name), ")"),
            };
            let rule = format!("t{i}");
            self.add(
                &rule,
                format!("{} {arguments} {}", literal(&open), literal(close)),
            );
            names.push(rule);
        }
        Ok(names)
    }

    /// The expression for one parameter's value.
    fn value(
        &mut self,
        syntax: ValueSyntax,
        prefix: &str,
        schema: &Value,
        convert: SchemaConverter<'_>,
    ) -> Result<String, String> {
        let listed: Option<Vec<Value>> = match (schema.get("enum"), schema.get("const")) {
            (Some(Value::Array(values)), _) if !values.is_empty() => Some(values.clone()),
            (_, Some(value)) => Some(vec![value.clone()]),
            _ => None,
        };
        if let Some(values) = listed {
            let alternatives: Vec<String> = values
                .iter()
                .map(|value| match (syntax, value) {
                    (ValueSyntax::XmlText, Value::String(text)) => literal(text),
                    (ValueSyntax::Escaped, Value::String(text)) => {
                        literal(&format!("<escape>{text}<escape>"))
                    }
                    (ValueSyntax::Python, value) => literal(&python_literal(value)),
                    (_, value) => literal(&value.to_string()),
                })
                .collect();
            return Ok(format!("( {} )", alternatives.join(" | ")));
        }
        let declared = schema.get("type");
        let text = declares_type(declared, "string");
        match syntax {
            ValueSyntax::XmlText if text => Ok(self.text_without("xml-text", "</parameter>")),
            ValueSyntax::Escaped if text => {
                let text = self.text_without("escaped-text", "<escape>");
                Ok(format!("\"<escape>\" {text} \"<escape>\""))
            }
            ValueSyntax::XmlText | ValueSyntax::Escaped => self.convert(convert, prefix, schema),
            ValueSyntax::Python => Ok(self.python_value(declared)),
        }
    }

    /// A Python literal of the declared JSON type(s); any literal where
    /// the type is not given or is a container.
    fn python_value(&mut self, declared: Option<&Value>) -> String {
        let types: Vec<&str> = match declared {
            Some(Value::String(kind)) => vec![kind.as_str()],
            Some(Value::Array(kinds)) => kinds.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let mut alternatives = Vec::new();
        for kind in &types {
            alternatives.push(match *kind {
                "string" => self.python_string().to_string(),
                "integer" => self.share("py-int", python_int).to_string(),
                "number" => self.share("py-number", python_number).to_string(),
                "boolean" => "( \"True\" | \"False\" )".to_string(),
                "null" => "\"None\"".to_string(),
                _ => self.python_any().to_string(),
            });
        }
        if alternatives.is_empty() {
            alternatives.push(self.python_any().to_string());
        }
        format!("( {} )", alternatives.join(" | "))
    }

    fn python_string(&mut self) -> &'static str {
        self.share("py-string", || {
            r#""\"" ( [^"\\\n] | "\\" [^\n] )* "\"" | "'" ( [^'\\\n] | "\\" [^\n] )* "'""#
                .to_string()
        })
    }

    /// A rule for text that never holds `pattern` (llama.cpp's
    /// `gbnf_excluding_grammar`): one rule per prefix of the pattern
    /// matched so far, `{name}-K` having matched K characters, moving as
    /// the pattern's own prefix function says; the pattern whole is the
    /// one move there is no rule for. Any rule may end, so the text may end
    /// with a part of the pattern (`…x\n` before `\n</parameter>`).
    fn text_without(&mut self, name: &'static str, pattern: &str) -> String {
        let start = format!("{name}-0");
        if !self.shared.insert(name) {
            return start;
        }
        let chars: Vec<char> = pattern.chars().collect();
        let mut distinct: Vec<char> = Vec::new();
        for c in &chars {
            if !distinct.contains(c) {
                distinct.push(*c);
            }
        }
        // The prefix function: the longest proper prefix of the first K
        // characters that is also their suffix.
        let mut fallback = vec![0usize; chars.len() + 1];
        for k in 2..=chars.len() {
            let mut j = fallback[k - 1];
            while j > 0 && chars[j] != chars[k - 1] {
                j = fallback[j];
            }
            fallback[k] = if chars[j] == chars[k - 1] { j + 1 } else { 0 };
        }
        let next = |k: usize, c: char| {
            let mut k = k;
            loop {
                if chars[k] == c {
                    return k + 1;
                }
                if k == 0 {
                    return 0;
                }
                k = fallback[k];
            }
        };
        let others: String = distinct.iter().map(|c| class_char(*c)).collect();
        for k in 0..chars.len() {
            let mut moves = vec![format!("[^{others}] {name}-0")];
            for c in &distinct {
                let to = next(k, *c);
                if to < chars.len() {
                    moves.push(format!("{} {name}-{to}", literal(&c.to_string())));
                }
            }
            self.add(
                &format!("{name}-{k}"),
                format!("( {} )?", moves.join(" | ")),
            );
        }
        start
    }

    /// Any Python literal: strings, numbers, `True`/`False`/`None`, lists
    /// and dicts of them.
    fn python_any(&mut self) -> &'static str {
        let string = self.python_string();
        let number = self.share("py-number", python_number);
        self.share("py-any", || {
            format!(
                "{string} | {number} | \"True\" | \"False\" | \"None\" \
                 | \"[\" ( py-any ( \",\" \" \"? py-any )* )? \"]\" \
                 | \"{{\" ( {string} \":\" \" \"? py-any ( \",\" \" \"? {string} \":\" \" \"? py-any )* )? \"}}\""
            )
        })
    }

    fn finish(self) -> String {
        let mut gbnf = String::new();
        // `root` first, for whoever reads the grammar.
        let (root, rest): (Vec<_>, Vec<_>) = self
            .lines
            .into_iter()
            .partition(|line| line.starts_with("root ::="));
        for line in root.into_iter().chain(rest) {
            let _ = writeln!(gbnf, "{line}");
        }
        gbnf
    }
}

/// An integer as JSON reads it too (no leading zeros).
fn python_int() -> String {
    r#""-"? ( "0" | [1-9] [0-9]{0,17} )"#.to_string()
}

fn python_number() -> String {
    r#""-"? ( "0" | [1-9] [0-9]{0,17} ) ( "." [0-9]{1,18} )? ( [eE] [-+]? [0-9]{1,3} )?"#
        .to_string()
}

/// `value` written as a Python literal.
fn python_literal(value: &Value) -> String {
    match value {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        // A JSON string is a Python string literal too.
        Value::String(_) => value.to_string(),
        Value::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(python_literal)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", Value::from(k.as_str()), python_literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Items in order, separated by `separator`: every required one, then the
/// optional ones that are present, in order (llama.cpp's object rule with
/// any separator).
fn sequence(items: &[(String, bool)], separator: &str) -> String {
    let separator = if separator.is_empty() {
        String::new()
    } else {
        format!("{} ", literal(separator))
    };
    let required: Vec<&str> = items
        .iter()
        .filter(|(_, r)| *r)
        .map(|(i, _)| i.as_str())
        .collect();
    let optional: Vec<&str> = items
        .iter()
        .filter(|(_, r)| !*r)
        .map(|(i, _)| i.as_str())
        .collect();
    let mut expression = required.join(&format!(" {separator}"));
    if !optional.is_empty() {
        // The first optional item present is the i-th; each after it may be.
        let alternatives: Vec<String> = (0..optional.len())
            .map(|i| {
                let mut chain = optional[i].to_string();
                for later in &optional[i + 1..] {
                    let _ = write!(chain, " ( {separator}{later} )?");
                }
                chain
            })
            .collect();
        let choice = alternatives.join(" | ");
        let optional_part = if required.is_empty() {
            format!("( {choice} )?")
        } else {
            format!("( {separator}( {choice} ) )?")
        };
        if !expression.is_empty() {
            expression.push(' ');
        }
        expression.push_str(&optional_part);
    }
    expression
}

/// `text` as a GBNF string literal.
pub(crate) fn literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `c` inside a GBNF character class.
fn class_char(c: char) -> String {
    match c {
        '\n' => "\\n".into(),
        '\r' => "\\r".into(),
        '\t' => "\\t".into(),
        ']' | '[' | '\\' | '-' => format!("\\{c}"),
        // llama.cpp knows no `\^`; a hex escape is read anywhere.
        '^' => "\\x5E".into(),
        c if c.is_control() => format!("\\x{:02X}", c as u32),
        c => c.to_string(),
    }
}

/// Whether `c` can be part of a GBNF rule name.
fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-'
}

/// `gbnf`'s rules (one per line, as llama.cpp's converter writes them),
/// every rule it defines renamed to `{prefix}{name}`, in definitions and
/// references alike; literals and character classes are left as they are.
fn prefixed(gbnf: &str, prefix: &str) -> Vec<String> {
    let defined: HashSet<&str> = gbnf
        .lines()
        .filter_map(|line| line.split_once("::=").map(|(name, _)| name.trim()))
        .collect();
    gbnf.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let mut out = String::with_capacity(line.len() + 16);
            let mut chars = line.chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    // A repetition's bounds are numbers, never rule names.
                    '{' => {
                        out.push(c);
                        for d in chars.by_ref() {
                            out.push(d);
                            if d == '}' {
                                break;
                            }
                        }
                    }
                    '"' | '[' => {
                        let close = if c == '"' { '"' } else { ']' };
                        out.push(c);
                        while let Some(d) = chars.next() {
                            out.push(d);
                            if d == '\\' {
                                if let Some(escaped) = chars.next() {
                                    out.push(escaped);
                                }
                            } else if d == close {
                                break;
                            }
                        }
                    }
                    c if is_word_char(c) => {
                        let mut word = String::from(c);
                        while let Some(&d) = chars.peek() {
                            if !is_word_char(d) {
                                break;
                            }
                            word.push(d);
                            chars.next();
                        }
                        if defined.contains(word.as_str()) {
                            out.push_str(prefix);
                        }
                        out.push_str(&word);
                    }
                    other => out.push(other),
                }
            }
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renaming_touches_rule_names_only() {
        // A property named `20` makes a rule `20`: the bound of `{0,20}`
        // stays a number.
        let gbnf = "root ::= object space\nobject ::= \"{\" space \"object\" [a-z\\]] char{0,20} 20 \"}\"\nspace ::= \" \"?\nchar ::= [^\"\\\\]\n20 ::= char\n";
        let renamed = prefixed(gbnf, "t0-");
        assert_eq!(
            renamed,
            [
                "t0-root ::= t0-object t0-space",
                "t0-object ::= \"{\" t0-space \"object\" [a-z\\]] t0-char{0,20} t0-20 \"}\"",
                "t0-space ::= \" \"?",
                "t0-char ::= [^\"\\\\]",
                "t0-20 ::= t0-char",
            ]
        );
    }

    #[test]
    fn optional_items_follow_the_required_in_order() {
        let items = |spec: &[(&str, bool)]| -> Vec<(String, bool)> {
            spec.iter().map(|(n, r)| (n.to_string(), *r)).collect()
        };
        assert_eq!(
            sequence(&items(&[("a", true), ("b", true)]), ","),
            "a \",\" b"
        );
        assert_eq!(
            sequence(&items(&[("a", true), ("b", false), ("c", false)]), ","),
            "a ( \",\" ( b ( \",\" c )? | c ) )?"
        );
        assert_eq!(
            sequence(&items(&[("b", false), ("c", false)]), ""),
            "( b ( c )? | c )?"
        );
        assert_eq!(sequence(&[], ","), "");
    }

    #[test]
    fn literals_and_classes_are_escaped() {
        assert_eq!(literal("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
        assert_eq!(literal("<｜tool▁sep｜>"), "\"<｜tool▁sep｜>\"");
        assert_eq!(class_char('^'), "\\x5E");
        // One rule per prefix matched; `<` from any rule restarts the
        // match, and the pattern whole is the one move with no rule.
        let mut rules = Rules::default();
        assert_eq!(rules.text_without("t", "<e>"), "t-0");
        assert_eq!(rules.text_without("t", "<e>"), "t-0", "added once");
        assert_eq!(
            rules.lines,
            [
                "t-0 ::= ( [^<e>] t-0 | \"<\" t-1 | \"e\" t-0 | \">\" t-0 )?",
                "t-1 ::= ( [^<e>] t-0 | \"<\" t-1 | \"e\" t-2 | \">\" t-0 )?",
                "t-2 ::= ( [^<e>] t-0 | \"<\" t-1 | \"e\" t-0 )?",
            ]
        );
        assert_eq!(class_char(']'), "\\]");
    }

    /// `One` call leaves no repetition of calls in any format: none in
    /// the rules, `maxItems: 1` where a JSON list holds the calls (Llama 3
    /// JSON writes one call in any case).
    /// Names the parsers could not read back are never offered.
    #[test]
    fn one_call_means_one_in_every_format() {
        let tools = vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object", "properties": {"city": {"type": "string"}, "bad key": {"type": "string"}}}}}),
            json!({"type": "function", "function": {"name": "rm -rf", "parameters": {}}}),
        ];
        for format in ToolFormat::ALL {
            for count in [CallCount::One, CallCount::Many] {
                let schemas = std::cell::RefCell::new(Vec::new());
                let convert = |schema: &Value| {
                    schemas.borrow_mut().push(schema.clone());
                    Ok("root ::= \"{}\"\n".to_string())
                };
                let grammar =
                    call_grammar(format, &tools, &ArgumentValues::none(), count, &convert)
                        .unwrap_or_else(|e| panic!("{format:?}: {e}"));
                let repeats = grammar
                    .gbnf
                    .lines()
                    .filter(|line| line.starts_with("root ::=") || line.starts_with("calls ::="))
                    .any(|line| line.contains(")*") || line.contains("call+"))
                    || schemas
                        .borrow()
                        .iter()
                        .any(|s| s.get("minItems").is_some() && s.get("maxItems").is_none());
                assert_eq!(
                    repeats,
                    count == CallCount::Many && format != ToolFormat::Llama3Json,
                    "{format:?} {count:?}:\n{}",
                    grammar.gbnf
                );
                // Names reach the grammar, or the converter's schemas.
                let seen = format!("{}{:?}", grammar.gbnf, schemas.borrow());
                assert!(seen.contains("get_weather"), "{format:?}");
                assert!(!seen.contains("rm -rf"), "{format:?}");
                if ![
                    ToolFormat::Hermes,
                    ToolFormat::Mistral,
                    ToolFormat::CommandR7b,
                    ToolFormat::Llama3Json,
                    ToolFormat::DeepSeek,
                    ToolFormat::FunctionaryV32,
                ]
                .contains(&format)
                {
                    // Formats with a rule per parameter leave out keys
                    // their parsers could not read back.
                    assert!(seen.contains("city"), "{format:?}");
                    assert!(!seen.contains("bad key"), "{format:?}");
                }
            }
        }
        let unnamed = [json!({"type": "function", "function": {"name": "<x>"}})];
        let convert = |_: &Value| Ok(String::new());
        assert!(call_grammar(
            ToolFormat::Hermes,
            &unnamed,
            &ArgumentValues::none(),
            CallCount::Many,
            &convert
        )
        .is_err());
    }

    /// The Rust search and the llama.cpp patterns describe one trigger.
    #[test]
    fn triggers_open_where_their_words_are() {
        let trigger = CallTrigger {
            anywhere: vec!["<|tool_call_start|>".into()],
            at_start: vec!["[get_weather(".into()],
        };
        assert_eq!(trigger.find("  [get_weather(city"), Some(2));
        assert_eq!(trigger.find("see [get_weather(city"), None);
        assert_eq!(trigger.find("ok <|tool_call_start|>["), Some(3));
        assert_eq!(trigger.find("[see the docs]"), None);
        assert_eq!(
            trigger.patterns(),
            [
                "(?:<\\|tool_call_start\\|>)",
                "^\\s*((?:\\[get_weather\\())"
            ]
        );
        assert_eq!(CallTrigger::hermes().find("a <tool_call>"), Some(2));
        // Searched per token, the end of the reply is enough.
        let long = format!("{}<tool_", "x".repeat(10_000));
        assert!(CallTrigger::hermes().completed_by(&long, "call>"));
        assert!(!CallTrigger::hermes().completed_by(&long, "calls"));
        assert!(trigger.completed_by(" ", "[get_weather("));
        assert!(!trigger.completed_by("Sure. ", "[get_weather("));
        assert!(trigger.completed_by("é", "<|tool_call_start|>"));
        assert_eq!(regex_escape("{\"name\""), "\\{\"name\"");
    }
}
