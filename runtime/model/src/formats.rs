//! The tool-call syntaxes current open models emit, beyond Hermes JSON:
//! which one a model speaks (from its chat template, the way llama.cpp's
//! `common/chat.cpp` tells them apart), and a parser for each.
//!
//! | format | looks like | models |
//! |---|---|---|
//! | Qwen3-Coder XML | `<tool_call>\n<function=NAME>\n<parameter=K>\nV\n</parameter>\n</function>\n</tool_call>` | Qwen3-Coder, GLM-4.5 style, Nemotron Nano 3 |
//! | pythonic | `[get_weather(city="Paris")]`, optionally in `<\|tool_call_start\|>…<\|tool_call_end\|>` | Llama 3.2 (pythonic prompt), LFM2 |
//! | FunctionGemma | `<start_function_call>call:NAME{k:<escape>v<escape>}<end_function_call>` | FunctionGemma |
//! | DeepSeek V3/R1 | `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME` + a JSON block | DeepSeek V3, R1 (V3.1: `NAME<｜tool▁sep｜>{…}`) |
//! | Functionary v3.2 | `>>>NAME\n{…}` (and `>>>all\ntext`) | Functionary v3.2 |
//! | Command R7B | `<\|START_ACTION\|>[{"tool_call_id": …, "tool_name": …, "parameters": …}]<\|END_ACTION\|>` | Command R7B |
//! | Hermes, Mistral, Llama 3 JSON | see `toolcall.rs` | Qwen2.5, Hermes, Mistral Nemo, Llama 3.1 |
//!
//! Arguments written as text (XML parameters, FunctionGemma values) are
//! typed by the tool's schema when it is known: a parameter declared
//! `string` stays a string (`"007"` is not the number 7); others are read
//! as JSON where they parse. Pythonic arguments are Python literals.
//! Nothing here trusts the text: a block that does not parse is left as
//! text, and calls go on to validation like any other.

use serde_json::{Map, Value};

use stack_types::message::ToolCall;

/// A tool-call syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolFormat {
    /// Hermes / Qwen2.5 `<tool_call>{json}</tool_call>`; also what the
    /// runtime's ChatML fallback shows a model whose template has no tools.
    Hermes,
    /// Qwen3-Coder / GLM-4.5 style XML inside `<tool_call>`.
    Qwen3CoderXml,
    /// Python call syntax in a list.
    Pythonic,
    /// FunctionGemma's control tokens.
    FunctionGemma,
    /// DeepSeek V3 / R1 call blocks.
    #[serde(rename = "deepseek")]
    DeepSeek,
    /// Functionary v3.2 `>>>recipient`.
    #[serde(rename = "functionary_v3_2")]
    FunctionaryV32,
    /// Command R7B actions.
    CommandR7b,
    /// Mistral `[TOOL_CALLS]`.
    Mistral,
    /// Llama 3.x JSON (`{"name": …, "parameters": …}`).
    Llama3Json,
}

impl ToolFormat {
    /// Every format.
    pub const ALL: [ToolFormat; 9] = [
        ToolFormat::Hermes,
        ToolFormat::Qwen3CoderXml,
        ToolFormat::Pythonic,
        ToolFormat::FunctionGemma,
        ToolFormat::DeepSeek,
        ToolFormat::FunctionaryV32,
        ToolFormat::CommandR7b,
        ToolFormat::Mistral,
        ToolFormat::Llama3Json,
    ];

    /// The format a chat template's source shows its model, by the
    /// markers each template family uses; `None` for a template that
    /// renders no tools (the runtime's ChatML fallback, Hermes, is used).
    pub fn detect(template: &str) -> Option<ToolFormat> {
        let has = |marker: &str| template.contains(marker);
        if !has("tools") && !has("tool_call") && !has("function") {
            return None;
        }
        let format = if has("<｜tool▁calls▁begin｜>") || has("tool▁call▁begin") {
            ToolFormat::DeepSeek
        } else if has("<|START_ACTION|>") {
            ToolFormat::CommandR7b
        } else if has(">>>all") {
            ToolFormat::FunctionaryV32
        } else if has("<start_function_call>") {
            ToolFormat::FunctionGemma
        } else if has("<function=") && has("<parameter=") {
            ToolFormat::Qwen3CoderXml
        } else if has("<|tool_call_start|>") || has("[func_name1(") || has("[func_name(") {
            ToolFormat::Pythonic
        } else if has("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if has("<tool_call>") {
            ToolFormat::Hermes
        } else if has("<|start_header_id|>") && (has("ipython") || has("\"parameters\"")) {
            ToolFormat::Llama3Json
        } else if has("tools") {
            // A template that renders tools in a way no family above
            // uses: its model's output is parsed by every parser.
            ToolFormat::Hermes
        } else {
            return None;
        };
        Some(format)
    }

    /// Its name, as `agent model` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "hermes",
            ToolFormat::Qwen3CoderXml => "qwen3_coder_xml",
            ToolFormat::Pythonic => "pythonic",
            ToolFormat::FunctionGemma => "function_gemma",
            ToolFormat::DeepSeek => "deepseek",
            ToolFormat::FunctionaryV32 => "functionary_v3_2",
            ToolFormat::CommandR7b => "command_r7b",
            ToolFormat::Mistral => "mistral",
            ToolFormat::Llama3Json => "llama3_json",
        }
    }

    /// The marker words of this format's calls, as `common/chat.cpp` lists
    /// them for llama-server's `preserved_tokens`: where one is a single
    /// special token of a model's vocabulary, the server must hand it back
    /// as text for the call to be read.
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            ToolFormat::Hermes => &["<tool_call>", "</tool_call>"],
            ToolFormat::Qwen3CoderXml => &[
                "<tool_call>",
                "</tool_call>",
                "<function=",
                "</function>",
                "<parameter=",
                "</parameter>",
            ],
            ToolFormat::Pythonic => &["<|tool_call_start|>", "<|tool_call_end|>"],
            ToolFormat::FunctionGemma => {
                &["<start_function_call>", "<end_function_call>", "<escape>"]
            }
            ToolFormat::DeepSeek => &[
                "<｜tool▁calls▁begin｜>",
                "<｜tool▁call▁begin｜>",
                "<｜tool▁sep｜>",
                "<｜tool▁call▁end｜>",
                "<｜tool▁calls▁end｜>",
            ],
            ToolFormat::FunctionaryV32 => &[">>>"],
            ToolFormat::CommandR7b => &["<|START_ACTION|>", "<|END_ACTION|>"],
            ToolFormat::Mistral => &["[TOOL_CALLS]"],
            ToolFormat::Llama3Json => &["<|python_tag|>"],
        }
    }

    /// The text a call in this format opens with, up to the tool's name,
    /// and the text right after the name, as the format's own templates
    /// write them: the routing step scores each name in this frame
    /// (`<tool_call>\n{"name": "` NAME `"`).
    pub fn name_frame(self) -> (&'static str, &'static str) {
        match self {
            ToolFormat::Hermes => ("<tool_call>\n{\"name\": \"", "\""),
            ToolFormat::Qwen3CoderXml => ("<tool_call>\n<function=", ">"),
            ToolFormat::Pythonic => ("[", "("),
            ToolFormat::FunctionGemma => ("<start_function_call>call:", "{"),
            ToolFormat::DeepSeek => (
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>",
                "\n",
            ),
            ToolFormat::FunctionaryV32 => (">>>", "\n"),
            ToolFormat::CommandR7b => (
                "<|START_ACTION|>[{\"tool_call_id\": \"0\", \"tool_name\": \"",
                "\"",
            ),
            ToolFormat::Mistral => ("[TOOL_CALLS][{\"name\": \"", "\""),
            ToolFormat::Llama3Json => ("{\"name\": \"", "\""),
        }
    }
}

/// What the parsers know about the offered tools.
pub struct ToolLookup<'a> {
    /// Whether a name is an offered tool.
    pub is_tool: &'a dyn Fn(&str) -> bool,
    /// The declared JSON type of a tool's parameter, when known: `string?`
    /// for a string that may be null, `string|integer` for a list of
    /// types with a string among them.
    pub param_type: &'a dyn Fn(&str, &str) -> Option<String>,
    /// The reply stopped at the token limit: a call it never closed may be
    /// cut short (a value whose end never came), and is dropped rather
    /// than read as whole.
    pub cut: bool,
}

/// A call parsed from native syntax: name and arguments object.
pub(crate) type NativeCall = (String, Map<String, Value>);

/// Whether `name` could be a tool's name (or a parameter's, in the formats
/// that write names bare).
pub(crate) fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A text value typed by the parameter's declared type.
fn typed(tools: &ToolLookup<'_>, tool: &str, param: &str, raw: &str) -> Value {
    match (tools.param_type)(tool, param).as_deref() {
        Some("string") => return Value::String(raw.to_string()),
        // A nullable string: `null` is the null, anything else the text.
        Some("string?") if raw.trim() == "null" => return Value::Null,
        Some("string?") => return Value::String(raw.to_string()),
        // Several types, a string among them (`string|integer`): JSON of
        // a declared type, else the text.
        Some(kinds) if kinds.contains('|') => {
            let declared: Vec<&str> = kinds.split('|').collect();
            return match serde_json::from_str::<Value>(raw.trim()) {
                Ok(value) if declared.iter().any(|kind| json_type_is(&value, kind)) => value,
                _ => Value::String(raw.to_string()),
            };
        }
        _ => {}
    }
    match serde_json::from_str::<Value>(raw.trim()) {
        Ok(value) => value,
        Err(_) => Value::String(raw.to_string()),
    }
}

/// Whether `value` is of the JSON Schema type `kind`.
fn json_type_is(value: &Value, kind: &str) -> bool {
    match kind {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => false,
    }
}

/// The calls of the native formats found in `text`, with the text around
/// them; `None` when no native format matches.
pub(crate) fn parse_native(
    text: &str,
    tools: &ToolLookup<'_>,
) -> Option<(String, Vec<NativeCall>)> {
    parse_qwen3_xml(text, tools)
        .or_else(|| parse_deepseek(text, tools))
        .or_else(|| parse_command_r7b(text))
        .or_else(|| parse_function_gemma(text, tools))
        .or_else(|| parse_functionary(text, tools))
        .or_else(|| parse_pythonic(text, tools))
}

/// `<tool_call>\n<function=NAME>\n<parameter=K>\nV\n</parameter>\n</function>\n</tool_call>`.
fn parse_qwen3_xml(text: &str, tools: &ToolLookup<'_>) -> Option<(String, Vec<NativeCall>)> {
    // Qwen3-Coder always wraps the function in `<tool_call>`; prose that
    // mentions `<function=` is not a call.
    if !text.contains("<tool_call>") || !text.contains("<function=") {
        return None;
    }
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    'calls: while let Some(start) = rest.find("<function=") {
        // Only directly inside `<tool_call>`: a Hermes call whose JSON
        // mentions `<function=` is not an XML call.
        let before = rest[..start].trim_end().strip_suffix("<tool_call>")?;
        content.push_str(before);
        let after = &rest[start + "<function=".len()..];
        // A later call cut off by the token budget (its name, or a value,
        // never closed, with nothing after it) is dropped; the calls
        // before it stand.
        // Under `cut`, the first call too: a reply stopped by the budget
        // may hold a value whose rest was never written.
        let cut_off = (tools.cut || !calls.is_empty()) && !after.contains("</function>");
        let Some(name_end) = after.find('>') else {
            if cut_off {
                rest = "";
                break 'calls;
            }
            return None;
        };
        let name = after[..name_end].trim().to_string();
        if !is_identifier(&name) || !(tools.is_tool)(&name) {
            if cut_off {
                rest = "";
                break 'calls;
            }
            return None;
        }
        // Parameters one after another, each read up to its own closing
        // tag (a value may hold `</function>`); text between them is
        // skipped; then `</function>`.
        let mut params = &after[name_end + 1..];
        let mut arguments = Map::new();
        loop {
            let next_parameter = params.find("<parameter=");
            let function_end = params.find("</function>");
            let Some(p) = next_parameter.filter(|p| function_end.is_none_or(|e| *p < e)) else {
                break;
            };
            let after_p = &params[p + "<parameter=".len()..];
            let Some(key_end) = after_p.find('>') else {
                if cut_off {
                    rest = "";
                    break 'calls;
                }
                return None;
            };
            let key = after_p[..key_end].trim().to_string();
            let value_and_rest = &after_p[key_end + 1..];
            // An unclosed value ends where the function does.
            let (value, next_p) = match value_and_rest.find("</parameter>") {
                Some(end) => (
                    &value_and_rest[..end],
                    &value_and_rest[end + "</parameter>".len()..],
                ),
                None => match value_and_rest.rfind("</function>") {
                    Some(end) => (&value_and_rest[..end], &value_and_rest[end..]),
                    // Under `cut`, whatever `</function>` came before (an
                    // earlier value may hold one): this value never ended.
                    None if cut_off || tools.cut => {
                        rest = "";
                        break 'calls;
                    }
                    None => (value_and_rest, ""),
                },
            };
            let value = value.strip_prefix('\n').unwrap_or(value);
            let value = value.strip_suffix('\n').unwrap_or(value);
            arguments.insert(key.clone(), typed(tools, &name, &key, value));
            params = next_p;
        }
        if tools.cut && !params.contains("</function>") && !params.contains("</tool_call>") {
            // Every value closed, but not the call: more may have followed.
            rest = "";
            break 'calls;
        }
        let next = match params.find("</function>") {
            Some(end) => &params[end + "</function>".len()..],
            None => params,
        };
        calls.push((name, arguments));
        let next = next.trim_start();
        rest = next.strip_prefix("</tool_call>").unwrap_or(next);
    }
    content.push_str(rest);
    (!calls.is_empty()).then_some((content, calls))
}

/// DeepSeek V3/R1 (`function<｜tool▁sep｜>NAME` and a fenced JSON block) and
/// V3.1 (`NAME<｜tool▁sep｜>{json}`).
fn parse_deepseek(text: &str, _tools: &ToolLookup<'_>) -> Option<(String, Vec<NativeCall>)> {
    const BEGIN: &str = "<｜tool▁call▁begin｜>";
    const SEP: &str = "<｜tool▁sep｜>";
    const END: &str = "<｜tool▁call▁end｜>";
    let first = text.find(BEGIN)?;
    let content_end = text
        .find("<｜tool▁calls▁begin｜>")
        .unwrap_or(first)
        .min(first);
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(start) = rest.find(BEGIN) {
        let after = &rest[start + BEGIN.len()..];
        let (block, next) = match after.find(END) {
            Some(end) => (&after[..end], &after[end + END.len()..]),
            None => (after, ""),
        };
        // A later call cut off by the token budget (no end marker, and
        // not readable) is dropped; the calls before it stand.
        let cut_off = !calls.is_empty() && next.is_empty() && !after.contains(END);
        let Some((head, tail)) = block.split_once(SEP) else {
            if cut_off {
                rest = "";
                break;
            }
            return None;
        };
        let (name, json) = if head.trim() == "function" {
            // V3/R1: NAME\n```json\n{...}\n```
            let Some((name, body)) = tail.split_once('\n') else {
                if cut_off {
                    rest = "";
                    break;
                }
                return None;
            };
            let body = body.trim();
            let body = body
                .strip_prefix("```json")
                .or_else(|| body.strip_prefix("```"))
                .unwrap_or(body);
            let body = body.trim().strip_suffix("```").unwrap_or(body).trim();
            (name.trim(), body)
        } else {
            (head.trim(), tail.trim())
        };
        let Ok(Value::Object(arguments)) = serde_json::from_str::<Value>(json) else {
            if cut_off {
                rest = "";
                break;
            }
            return None;
        };
        calls.push((name.to_string(), arguments));
        rest = next;
    }
    let trailing = rest.replace("<｜tool▁calls▁end｜>", "");
    let content = format!("{}{}", &text[..content_end], trailing.trim());
    (!calls.is_empty()).then_some((content, calls))
}

/// `<|START_ACTION|>[{"tool_call_id": "0", "tool_name": …, "parameters": …}]<|END_ACTION|>`,
/// with the reply in `<|START_RESPONSE|>…<|END_RESPONSE|>` and thinking in
/// `<|START_THINKING|>…<|END_THINKING|>` (dropped).
fn parse_command_r7b(text: &str) -> Option<(String, Vec<NativeCall>)> {
    const START: &str = "<|START_ACTION|>";
    const END: &str = "<|END_ACTION|>";
    let start = text.find(START)?;
    let after = &text[start + START.len()..];
    let body = after.find(END).map_or(after, |end| &after[..end]);
    let Ok(Value::Array(items)) = serde_json::from_str::<Value>(body.trim()) else {
        return None;
    };
    let calls: Option<Vec<NativeCall>> = items
        .iter()
        .map(|item| {
            let name = item["tool_name"].as_str()?.to_string();
            let arguments = item
                .get("parameters")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            Some((name, arguments))
        })
        .collect();
    let mut content = text[..start].to_string();
    if let (Some(a), Some(b)) = (
        content.find("<|START_THINKING|>"),
        content.find("<|END_THINKING|>"),
    ) {
        if a < b {
            content.replace_range(a..b + "<|END_THINKING|>".len(), "");
        }
    }
    let content = content
        .replace("<|START_RESPONSE|>", "")
        .replace("<|END_RESPONSE|>", "");
    calls
        .filter(|c| !c.is_empty())
        .map(|calls| (content, calls))
}

/// `<start_function_call>call:NAME{key:<escape>text<escape>,n:3}<end_function_call>`.
fn parse_function_gemma(text: &str, tools: &ToolLookup<'_>) -> Option<(String, Vec<NativeCall>)> {
    const START: &str = "<start_function_call>";
    const END: &str = "<end_function_call>";
    const ESCAPE: &str = "<escape>";
    if !text.contains(START) {
        return None;
    }
    let call = |block: &str| -> Option<NativeCall> {
        let block = block.trim().strip_prefix("call:")?;
        let open = block.find('{')?;
        let name = block[..open].trim().to_string();
        let body = block[open + 1..].trim_end().strip_suffix('}')?;
        let mut arguments = Map::new();
        let mut remaining = body.trim();
        while !remaining.is_empty() {
            let colon = remaining.find(':')?;
            let key = remaining[..colon].trim().to_string();
            let value_text = &remaining[colon + 1..];
            let (value, after_value) = if let Some(escaped) = value_text.strip_prefix(ESCAPE) {
                let end = escaped.find(ESCAPE)?;
                (
                    Value::String(escaped[..end].to_string()),
                    &escaped[end + ESCAPE.len()..],
                )
            } else {
                let end = top_level_comma(value_text).unwrap_or(value_text.len());
                (
                    typed(tools, &name, &key, value_text[..end].trim()),
                    &value_text[end..],
                )
            };
            arguments.insert(key, value);
            remaining = after_value
                .trim_start()
                .strip_prefix(',')
                .unwrap_or(after_value)
                .trim();
        }
        Some((name, arguments))
    };
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(START) {
        content.push_str(&rest[..start]);
        let after = &rest[start + START.len()..];
        match find_outside_escapes(after, END, ESCAPE) {
            Some(end) => {
                calls.push(call(&after[..end])?);
                rest = &after[end + END.len()..];
            }
            // The last call, never closed: whole (a model that stops
            // without the end marker), or cut off by the token budget,
            // which leaves the calls before it standing.
            None => {
                if !tools.cut {
                    if let Some(last) = call(after) {
                        calls.push(last);
                    }
                }
                rest = "";
            }
        }
    }
    content.push_str(rest);
    (!calls.is_empty()).then_some((content, calls))
}

/// Where the first `word` outside `escape`-delimited text is: an escaped
/// value may hold the word itself.
fn find_outside_escapes(text: &str, word: &str, escape: &str) -> Option<usize> {
    let mut from = 0;
    loop {
        let at = from + text[from..].find(word)?;
        let escapes = text[..at].matches(escape).count();
        if escapes.is_multiple_of(2) {
            return Some(at);
        }
        // Inside an escaped value: go on after its closing escape.
        let close = at + text[at..].find(escape)? + escape.len();
        from = close;
    }
}

/// Where the first comma outside brackets and quotes is.
fn top_level_comma(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '[' | '{' if !quoted => depth += 1,
            ']' | '}' if !quoted => depth = depth.saturating_sub(1),
            ',' if !quoted && depth == 0 => return Some(i),
            _ => {}
        }
    }
    None
}

/// Functionary v3.2: `>>>NAME\n{json}` per call; `>>>all\ntext` is the
/// reply.
fn parse_functionary(text: &str, tools: &ToolLookup<'_>) -> Option<(String, Vec<NativeCall>)> {
    // The template's generation prompt ends with the first `>>>`, so the
    // reply may open with the recipient itself.
    let trimmed = text.trim_start();
    if let Some((recipient, _)) = trimmed.split_once('\n') {
        if !trimmed.starts_with(">>>") && (recipient == "all" || (tools.is_tool)(recipient)) {
            return parse_functionary(&format!(">>>{trimmed}"), tools);
        }
    }
    if !trimmed.starts_with(">>>") && !text.contains("\n>>>") {
        return None;
    }
    let mut content = String::new();
    let mut calls = Vec::new();
    let start = text.find(">>>")?;
    content.push_str(&text[..start]);
    for section in text[start..].split(">>>").filter(|s| !s.is_empty()) {
        let (recipient, body) = section.split_once('\n').unwrap_or((section, ""));
        let recipient = recipient.trim();
        if recipient == "all" {
            content.push_str(body);
            continue;
        }
        if !(tools.is_tool)(recipient) {
            return None;
        }
        let mut stream = serde_json::Deserializer::from_str(body.trim()).into_iter::<Value>();
        let Some(Ok(Value::Object(arguments))) = stream.next() else {
            return None;
        };
        calls.push((recipient.to_string(), arguments));
    }
    (!calls.is_empty()).then_some((content, calls))
}

/// `[name(a=1, b="x"), other()]`, alone or in
/// `<|tool_call_start|>…<|tool_call_end|>`; every name must be a tool.
fn parse_pythonic(text: &str, tools: &ToolLookup<'_>) -> Option<(String, Vec<NativeCall>)> {
    let (before, body, after) = match text.find("<|tool_call_start|>") {
        Some(start) => {
            let inner = &text[start + "<|tool_call_start|>".len()..];
            let end = inner.find("<|tool_call_end|>").unwrap_or(inner.len());
            let rest = inner.get(end + "<|tool_call_end|>".len()..).unwrap_or("");
            (&text[..start], inner[..end].trim(), rest)
        }
        None => {
            let trimmed = text.trim();
            if !trimmed.starts_with('[') || !trimmed.ends_with(']') {
                return None;
            }
            ("", trimmed, "")
        }
    };
    let mut parser = PyParser {
        text: body,
        at: 0,
        depth: 0,
    };
    let calls = parser.call_list()?;
    if calls.is_empty() || !calls.iter().all(|(name, _)| (tools.is_tool)(name)) {
        return None;
    }
    Some((format!("{before}{after}"), calls))
}

/// A small parser for Python call lists and literals.
struct PyParser<'a> {
    text: &'a str,
    at: usize,
    depth: usize,
}

/// How deeply Python literals may nest before the text is not a call.
const MAX_LITERAL_DEPTH: usize = 32;

impl<'a> PyParser<'a> {
    fn rest(&self) -> &'a str {
        &self.text[self.at..]
    }

    fn skip_space(&mut self) {
        let trimmed = self.rest().trim_start();
        self.at = self.text.len() - trimmed.len();
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_space();
        if self.rest().starts_with(token) {
            self.at += token.len();
            true
        } else {
            false
        }
    }

    fn identifier(&mut self) -> Option<String> {
        self.skip_space();
        let end = self
            .rest()
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.' || c == '-'))
            .unwrap_or(self.rest().len());
        (end > 0).then(|| {
            let name = self.rest()[..end].to_string();
            self.at += end;
            name
        })
    }

    fn call_list(&mut self) -> Option<Vec<NativeCall>> {
        if !self.eat("[") {
            return None;
        }
        let mut calls = Vec::new();
        loop {
            if self.eat("]") {
                break;
            }
            let name = self.identifier()?;
            if !self.eat("(") {
                return None;
            }
            let mut arguments = Map::new();
            loop {
                if self.eat(")") {
                    break;
                }
                let key = self.identifier()?;
                if !self.eat("=") {
                    return None;
                }
                arguments.insert(key, self.literal()?);
                if !self.eat(",") {
                    if self.eat(")") {
                        break;
                    }
                    return None;
                }
            }
            calls.push((name, arguments));
            if !self.eat(",") {
                if self.eat("]") {
                    break;
                }
                return None;
            }
        }
        self.skip_space();
        self.rest().is_empty().then_some(calls)
    }

    fn literal(&mut self) -> Option<Value> {
        if self.depth >= MAX_LITERAL_DEPTH {
            return None;
        }
        self.depth += 1;
        let value = self.literal_inner();
        self.depth -= 1;
        value
    }

    fn literal_inner(&mut self) -> Option<Value> {
        self.skip_space();
        let rest = self.rest();
        if rest.starts_with('"') || rest.starts_with('\'') {
            return self.string().map(Value::String);
        }
        if self.eat("[") || self.eat("(") {
            let close = if self.text[..self.at].ends_with('[') {
                "]"
            } else {
                ")"
            };
            let mut items = Vec::new();
            loop {
                if self.eat(close) {
                    return Some(Value::Array(items));
                }
                items.push(self.literal()?);
                if !self.eat(",") {
                    return self.eat(close).then_some(Value::Array(items));
                }
            }
        }
        if self.eat("{") {
            let mut object = Map::new();
            loop {
                if self.eat("}") {
                    return Some(Value::Object(object));
                }
                let key = match self.literal()? {
                    Value::String(key) => key,
                    other => other.to_string(),
                };
                if !self.eat(":") {
                    return None;
                }
                object.insert(key, self.literal()?);
                if !self.eat(",") {
                    return self.eat("}").then_some(Value::Object(object));
                }
            }
        }
        for (word, value) in [
            ("True", Value::Bool(true)),
            ("False", Value::Bool(false)),
            ("None", Value::Null),
        ] {
            if rest.starts_with(word) {
                self.at += word.len();
                return Some(value);
            }
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E')))
            .unwrap_or(rest.len());
        let number: Value = serde_json::from_str(&rest[..end]).ok()?;
        number.is_number().then(|| {
            self.at += end;
            number
        })
    }

    fn string(&mut self) -> Option<String> {
        let quote = self.rest().chars().next()?;
        self.at += 1;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    let (_, escaped) = chars.next()?;
                    out.push(match escaped {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        other => other,
                    });
                }
                c if c == quote => {
                    self.at += i + 1;
                    return Some(out);
                }
                c => out.push(c),
            }
        }
        None
    }
}

/// Native calls as OpenAI calls.
pub(crate) fn to_tool_calls(
    calls: Vec<NativeCall>,
    next_id: &mut dyn FnMut() -> String,
) -> Vec<ToolCall> {
    calls
        .into_iter()
        .map(|(name, arguments)| {
            ToolCall::function(next_id(), name, Value::Object(arguments).to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toolcall::parse_tool_calls_for;
    use serde_json::json;

    /// The format fixtures: model output in each syntax, shared with the
    /// grammar tests on the real model (`tests/model.rs`).
    fn fixtures() -> Value {
        serde_json::from_str(include_str!("../../../tests/fixtures/formats/outputs.json"))
            .unwrap_or(Value::Null)
    }

    fn tools() -> Vec<Value> {
        fixtures()["tools"].as_array().cloned().unwrap_or_default()
    }

    #[test]
    fn every_format_is_detected_and_parsed() {
        let fixtures = fixtures();
        let tools = tools();
        let cases = fixtures["cases"].as_array().cloned().unwrap_or_default();
        let mut seen = std::collections::BTreeSet::new();
        for case in &cases {
            let format: ToolFormat = serde_json::from_value(case["format"].clone())
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            seen.insert(format.as_str());
            let marker = case["template_marker"].as_str().unwrap_or_default();
            let output = case["output"].as_str().unwrap_or_default();
            assert_eq!(ToolFormat::detect(marker), Some(format), "{marker}");
            assert_eq!(
                serde_json::to_value(format).ok(),
                Some(Value::from(format.as_str()))
            );
            let mut n = 0;
            let mut next_id = || {
                n += 1;
                format!("call_{n}")
            };
            let turn = parse_tool_calls_for(output, &tools, &mut next_id);
            let calls: Vec<Value> = turn
                .tool_calls
                .iter()
                .map(|c| {
                    json!([
                        c.function.name,
                        serde_json::from_str::<Value>(&c.function.arguments).unwrap_or(Value::Null)
                    ])
                })
                .collect();
            assert_eq!(Value::from(calls), case["calls"], "{format:?}: {output}");
            assert_eq!(
                turn.content.as_deref(),
                case["content"].as_str(),
                "{format:?}: {output}"
            );
        }
        assert_eq!(
            seen.len(),
            ToolFormat::ALL.len(),
            "every format has a fixture: {seen:?}"
        );
    }

    /// A reply cut off by the token budget in the middle of a later call
    /// keeps the whole calls before it (a grammar that allows several
    /// calls lets a small model repeat one until the budget runs out).
    #[test]
    fn a_call_cut_off_by_the_token_budget_leaves_the_calls_before_it() {
        let tools = tools();
        // What opens the reply once, and a call the model repeats.
        for (opening, whole) in [
            ("", "<start_function_call>call:get_weather{city:<escape>Oslo<escape>}<end_function_call>"),
            ("", "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>"),
            ("", "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>"),
            (
                "<｜tool▁calls▁begin｜>",
                "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Oslo\"}\n```<｜tool▁call▁end｜>",
            ),
        ] {
            for eighths in 1..8 {
                let mut cut = whole.len() * eighths / 8;
                while !whole.is_char_boundary(cut) {
                    cut -= 1;
                }
                let text = format!("{opening}{whole}\n{}", &whole[..cut]);
                let mut n = 0;
                let mut next_id = || {
                    n += 1;
                    format!("call_{n}")
                };
                let turn = parse_tool_calls_for(&text, &tools, &mut next_id);
                let first = turn
                    .tool_calls
                    .first()
                    .unwrap_or_else(|| panic!("no call kept from {text:?}"));
                assert_eq!(first.function.name, "get_weather", "{text:?}");
                let arguments: Value =
                    serde_json::from_str(&first.function.arguments).unwrap_or(Value::Null);
                assert_eq!(arguments["city"], "Oslo", "{text:?}");
            }
        }
    }

    /// A reply that stopped at the token limit inside its only call: read
    /// as cut (`parse_cut_tool_calls_for`), a call never closed is dropped
    /// for every syntax, so no call runs with its last value cut short
    /// (`Oslo` cut to `Os`); the same text at a model's own end of turn is
    /// read leniently, as before.
    #[test]
    fn a_reply_cut_inside_its_only_call_proposes_nothing() {
        use crate::toolcall::parse_cut_tool_calls_for;
        let tools = tools();
        for whole in [
            "<start_function_call>call:get_weather{city:<escape>Oslo<escape>}<end_function_call>",
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>",
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>",
        ] {
            let mut n = 0;
            let mut next_id = || {
                n += 1;
                format!("call_{n}")
            };
            let whole_turn = parse_cut_tool_calls_for(whole, &tools, &mut next_id);
            assert_eq!(whole_turn.tool_calls.len(), 1, "a closed call stands: {whole:?}");
            let cut_at = whole.find("Oslo").expect("Oslo") + 2;
            for cut in cut_at..whole.len() - 1 {
                if !whole.is_char_boundary(cut) {
                    continue;
                }
                let text = &whole[..cut];
                let turn = parse_cut_tool_calls_for(text, &tools, &mut next_id);
                assert!(
                    turn.tool_calls.iter().all(|call| {
                        let arguments: Value =
                            serde_json::from_str(&call.function.arguments).unwrap_or(Value::Null);
                        arguments["city"] == "Oslo"
                    }),
                    "a cut call was read as whole from {text:?}: {turn:?}"
                );
            }
            // Cut inside the value: nothing, where the lenient reading
            // (a model that ends its turn without the end marker) of the
            // XML and FunctionGemma calls takes `Os` as the city.
            let text = &whole[..cut_at];
            assert!(
                parse_cut_tool_calls_for(text, &tools, &mut next_id)
                    .tool_calls
                    .is_empty(),
                "{text:?}"
            );
        }
        // An earlier value that holds `</function>` does not make a later,
        // cut one whole; a call closed by `</tool_call>` alone stands.
        let mut next_id = || "call_1".to_string();
        let held = "<tool_call>\n<function=get_weather>\n<parameter=note>\nx</function>y\n</parameter>\n<parameter=city>\nOs";
        assert!(
            parse_cut_tool_calls_for(held, &tools, &mut next_id)
                .tool_calls
                .is_empty(),
            "{held:?}"
        );
        let closed = "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</tool_call>";
        assert_eq!(
            parse_cut_tool_calls_for(closed, &tools, &mut next_id)
                .tool_calls
                .len(),
            1,
            "{closed:?}"
        );
        let xml_cut = "<tool_call>\n<function=get_weather>\n<parameter=city>\nOs";
        let mut next_id = || "call_1".to_string();
        assert_eq!(
            parse_tool_calls_for(xml_cut, &tools, &mut next_id)
                .tool_calls
                .len(),
            1,
            "the lenient reading, for a reply that ended on its own"
        );
    }

    /// Text values read back as their declared types, and the XML and
    /// FunctionGemma readers hold up to text the grammar would not write.
    #[test]
    fn text_values_keep_their_declared_types_and_odd_text_parses() {
        let tools = vec![
            json!({"type": "function", "function": {"name": "pick", "parameters": {
            "type": "object", "properties": {
                "note": {"type": ["string", "null"]},
                "either": {"type": ["string", "integer"]},
                "other": {"type": ["string", "integer"]}
            }}}}),
        ];
        let parse = |text: &str| {
            let mut next_id = || "x".to_string();
            let turn = parse_tool_calls_for(text, &tools, &mut next_id);
            turn.tool_calls
                .first()
                .and_then(|c| serde_json::from_str::<Value>(&c.function.arguments).ok())
                .unwrap_or(Value::Null)
        };
        let xml =
            |body: &str| format!("<tool_call>\n<function=pick>\n{body}</function>\n</tool_call>");
        let param = |k: &str, v: &str| format!("<parameter={k}>\n{v}\n</parameter>\n");
        assert_eq!(
            parse(&xml(&format!(
                "{}{}{}",
                param("note", "null"),
                param("either", "true"),
                param("other", "5")
            ))),
            json!({"note": null, "either": "true", "other": 5})
        );
        assert_eq!(
            parse(&xml(&param("note", "Paris"))),
            json!({"note": "Paris"})
        );
        // Text between parameters is skipped; an unclosed value ends
        // where the function does.
        assert_eq!(
            parse(&xml(&format!("a note\n{}", param("note", "x")))),
            json!({"note": "x"})
        );
        assert_eq!(
            parse("<tool_call>\n<function=pick>\n<parameter=note>\nx\n</function>\n</tool_call>\nDone."),
            json!({"note": "x"})
        );
        // An escaped value may hold the end of the call.
        assert_eq!(
            parse("<start_function_call>call:pick{note:<escape>a<end_function_call>b<escape>}<end_function_call>"),
            json!({"note": "a<end_function_call>b"})
        );
    }

    /// Text that only looks like a native call stays text.
    #[test]
    fn lookalikes_stay_text() {
        let tools = tools();
        for text in [
            "[see the docs(here)]",
            "[unknown_tool(a=1)]",
            ">>> print('hi')",
            "Use <function=...> tags like this.",
            "<start_function_call>call:get_weather{broken<end_function_call>",
            "<|START_ACTION|>not json<|END_ACTION|>",
            "<tool_call>\n<function=rm_rf>\n<parameter=path>\n/\n</parameter>\n</function>\n</tool_call>",
        ] {
            let mut next_id = || "x".to_string();
            let turn = parse_tool_calls_for(text, &tools, &mut next_id);
            assert!(turn.tool_calls.is_empty(), "{text}: {:?}", turn.tool_calls);
        }
        assert_eq!(ToolFormat::detect("{{ messages }}"), None);
        // A Hermes call whose argument mentions `<function=` stays one call.
        let mut next_id = || "x".to_string();
        let turn = parse_tool_calls_for(
            "<tool_call>\n{\"name\": \"lookup_zip\", \"arguments\": {\"zip\": \"<function=get_weather>\"}}\n</tool_call>",
            &tools,
            &mut next_id,
        );
        assert_eq!(turn.tool_calls.len(), 1);
        assert_eq!(turn.tool_calls[0].function.name, "lookup_zip");
        // Deep nesting is refused, not recursed into.
        let deep = format!(
            "[get_weather(city={}1{})]",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(parse_tool_calls_for(&deep, &tools, &mut next_id)
            .tool_calls
            .is_empty());
        // FunctionGemma values with lists keep their commas.
        let turn = parse_tool_calls_for(
            "<start_function_call>call:get_weather{city:<escape>Oslo<escape>,days:[1,2]}<end_function_call>",
            &tools,
            &mut next_id,
        );
        assert_eq!(
            turn.tool_calls[0].function.arguments,
            r#"{"city":"Oslo","days":[1,2]}"#
        );
    }
}
