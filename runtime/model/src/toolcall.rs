//! Turning generated text into OpenAI-style tool calls.
//!
//! Understood forms, in the order they are tried:
//!
//! * Hermes/Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
//!   any number per turn;
//! * Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`;
//! * Llama 3: a JSON object `{"name": ..., "parameters": {...}}` (or
//!   `"arguments"`), optionally after `<|python_tag|>`;
//! * a bare JSON object (or array of them) that names a registered tool;
//! * and, first, the native syntaxes of `formats.rs`: Qwen3-Coder XML,
//!   DeepSeek, Command R7B, FunctionGemma, Functionary v3.2, pythonic.
//!
//! Text around the calls is kept as the message content. A block that looks
//! like a call but does not parse is kept as text, so the model (and the
//! user) can see it; validation then reports what is wrong with calls that
//! do parse.

use serde_json::Value;

use crate::formats::{self, ToolLookup};
use stack_types::message::ToolCall;

/// The calls found in one assistant turn, and the text around them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedTurn {
    /// Text outside the calls, trimmed; `None` when there is none.
    pub content: Option<String>,
    /// The calls, in order.
    pub tool_calls: Vec<ToolCall>,
}

/// Parses `text`. `is_tool` says whether a name is a registered tool (used
/// for bare JSON objects, pythonic and Functionary calls); `next_id` makes
/// call ids. Text arguments (XML, FunctionGemma) are read as JSON where
/// they parse; [`parse_tool_calls_for`] types them by the tools' schemas.
pub fn parse_tool_calls(
    text: &str,
    is_tool: &dyn Fn(&str) -> bool,
    next_id: &mut dyn FnMut() -> String,
) -> ParsedTurn {
    let lookup = ToolLookup {
        is_tool,
        param_type: &|_, _| None,
        cut: false,
    };
    parse_with(text, &lookup, next_id)
}

/// Parses `text` for calls to `tools` (OpenAI tool objects), typing text
/// arguments by each parameter's declared type.
pub fn parse_tool_calls_for(
    text: &str,
    tools: &[Value],
    next_id: &mut dyn FnMut() -> String,
) -> ParsedTurn {
    parse_reply_for(text, tools, false, next_id)
}

/// [`parse_tool_calls_for`] for a reply that stopped at the token limit:
/// a call it never closed (a Qwen3-Coder XML call or a FunctionGemma call
/// without its end marker) is dropped, not read as whole with its last
/// value cut short. JSON calls need whole JSON either way.
pub fn parse_cut_tool_calls_for(
    text: &str,
    tools: &[Value],
    next_id: &mut dyn FnMut() -> String,
) -> ParsedTurn {
    parse_reply_for(text, tools, true, next_id)
}

/// The calls in a reply's text, read as cut short where the reply
/// stopped at the token limit ([`parse_cut_tool_calls_for`]): what both
/// backends do with a reply's text.
pub(crate) fn parse_reply(
    text: &str,
    tools: &[Value],
    stop: crate::backend::StopReason,
    next_id: &mut dyn FnMut() -> String,
) -> ParsedTurn {
    parse_reply_for(
        text,
        tools,
        stop == crate::backend::StopReason::MaxTokens,
        next_id,
    )
}

fn parse_reply_for(
    text: &str,
    tools: &[Value],
    cut: bool,
    next_id: &mut dyn FnMut() -> String,
) -> ParsedTurn {
    let find = |name: &str| {
        tools
            .iter()
            .find(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name))
    };
    let is_tool = |name: &str| find(name).is_some();
    let param_type = |tool: &str, param: &str| {
        let declared = find(tool)?
            .pointer("/function/parameters/properties")?
            .get(param)?
            .get("type")?;
        match declared {
            Value::String(kind) => Some(kind.clone()),
            // `["string", "null"]`: a string that may be null; other lists
            // with a string are named whole (`string|integer`).
            Value::Array(kinds) => {
                let kinds: Vec<&str> = kinds.iter().filter_map(Value::as_str).collect();
                match kinds.as_slice() {
                    ["string", "null"] | ["null", "string"] => Some("string?".to_string()),
                    _ if kinds.contains(&"string") => Some(kinds.join("|")),
                    _ => None,
                }
            }
            _ => None,
        }
    };
    let lookup = ToolLookup {
        is_tool: &is_tool,
        param_type: &param_type,
        cut,
    };
    parse_with(text, &lookup, next_id)
}

/// Drops each call of `calls` that repeats an earlier one exactly: the
/// same function with the same arguments, compared as JSON values (key
/// order and spacing aside). Returns how many were dropped.
///
/// A small model's greedy decoding writes a call twice, word for word,
/// where one was asked for (`triangle_properties_get(5, 4, 3)` twice, on
/// BFCL's `multiple_0`), and DRY cannot see that repeat: its sequence
/// breakers (`"` and `:`) end every repeat within a few tokens of JSON.
/// Running both would do the same work twice, or a side effect twice.
pub fn drop_repeated_calls(calls: &mut Vec<ToolCall>) -> usize {
    let before = calls.len();
    let mut seen: Vec<(String, Value)> = Vec::with_capacity(before);
    calls.retain(|call| {
        let arguments = serde_json::from_str(&call.function.arguments)
            .unwrap_or_else(|_| Value::String(call.function.arguments.clone()));
        let key = (call.function.name.clone(), arguments);
        if seen.contains(&key) {
            false
        } else {
            seen.push(key);
            true
        }
    });
    before - calls.len()
}

fn parse_with(
    text: &str,
    lookup: &ToolLookup<'_>,
    next_id: &mut dyn FnMut() -> String,
) -> ParsedTurn {
    let is_tool = lookup.is_tool;
    if let Some((content, calls)) = formats::parse_native(text, lookup) {
        return ParsedTurn {
            content: non_empty(&content),
            tool_calls: formats::to_tool_calls(calls, next_id),
        };
    }
    if let Some(turn) = parse_hermes(text, next_id) {
        return turn;
    }
    if let Some(turn) = parse_mistral(text, next_id) {
        return turn;
    }
    let trimmed = text.trim();
    let body = trimmed
        .strip_prefix("<|python_tag|>")
        .unwrap_or(trimmed)
        .trim();
    if body.starts_with('{') || body.starts_with('[') {
        if let Ok(value) = serde_json::from_str::<Value>(body) {
            let objects: Vec<&Value> = match &value {
                Value::Array(items) => items.iter().collect(),
                object => vec![object],
            };
            let calls: Option<Vec<ToolCall>> = objects
                .iter()
                .map(|object| {
                    call_from_object(object, next_id).filter(|call| is_tool(&call.function.name))
                })
                .collect();
            if let Some(calls) = calls.filter(|calls| !calls.is_empty()) {
                return ParsedTurn {
                    content: None,
                    tool_calls: calls,
                };
            }
        }
    }
    ParsedTurn {
        content: non_empty(text),
        tool_calls: Vec::new(),
    }
}

fn parse_hermes(text: &str, next_id: &mut dyn FnMut() -> String) -> Option<ParsedTurn> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    if !text.contains(OPEN) {
        return None;
    }
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        content.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        // The block's JSON read whole first: a string in it may hold the
        // closing tag itself (code that prints `</tool_call>`).
        let block = whole_json_before(after, CLOSE).unwrap_or_else(|| {
            let (body, next, closed) = match after.find(CLOSE) {
                Some(end) => (&after[..end], &after[end + CLOSE.len()..], true),
                // An unclosed block at the end of the turn (stopped early).
                None => (after, "", false),
            };
            Block {
                value: serde_json::from_str(body.trim()).ok(),
                body,
                next,
                closed,
            }
        });
        match block
            .value
            .as_ref()
            .and_then(|v| call_from_object(v, next_id))
        {
            Some(call) => calls.push(call),
            None => {
                content.push_str(OPEN);
                content.push_str(block.body);
                if block.closed {
                    content.push_str(CLOSE);
                }
            }
        }
        rest = block.next;
    }
    content.push_str(rest);
    Some(ParsedTurn {
        content: non_empty(&content),
        tool_calls: calls,
    })
}

/// One `<tool_call>` block, split from what follows it.
struct Block<'a> {
    /// The block's JSON, where it is JSON.
    value: Option<Value>,
    /// The block's text, up to its closing tag.
    body: &'a str,
    /// What follows the block.
    next: &'a str,
    /// Whether the block had its closing tag.
    closed: bool,
}

/// Where `text` opens with one whole JSON value followed by `close` (or
/// by nothing), that block.
fn whole_json_before<'a>(text: &'a str, close: &str) -> Option<Block<'a>> {
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let value = values.next()?.ok()?;
    let after_value = values.byte_offset();
    let tail = &text[after_value..];
    let trimmed = tail.trim_start();
    let body = &text[..after_value + (tail.len() - trimmed.len())];
    let (next, closed) = match trimmed.strip_prefix(close) {
        Some(next) => (next, true),
        None if trimmed.is_empty() => ("", false),
        None => return None,
    };
    Some(Block {
        value: Some(value),
        body,
        next,
        closed,
    })
}

fn parse_mistral(text: &str, next_id: &mut dyn FnMut() -> String) -> Option<ParsedTurn> {
    const MARK: &str = "[TOOL_CALLS]";
    let start = text.find(MARK)?;
    let after = text[start + MARK.len()..].trim_start();
    let mut stream = serde_json::Deserializer::from_str(after).into_iter::<Value>();
    let value = stream.next()?.ok()?;
    let consumed = stream.byte_offset();
    let objects: Vec<Value> = match value {
        Value::Array(items) => items,
        object => vec![object],
    };
    let calls: Option<Vec<ToolCall>> = objects
        .iter()
        .map(|o| call_from_object(o, next_id))
        .collect();
    let calls = calls?;
    let content = format!("{}{}", &text[..start], &after[consumed..]);
    Some(ParsedTurn {
        content: non_empty(&content),
        tool_calls: calls,
    })
}

/// `{"name": ..., "arguments"|"parameters": {...}|"..."}` as a call.
fn call_from_object(value: &Value, next_id: &mut dyn FnMut() -> String) -> Option<ToolCall> {
    let object = value.as_object()?;
    let (name, arguments) = match object.get("function") {
        // Already in OpenAI shape.
        Some(Value::Object(function)) => (function.get("name")?, function.get("arguments")),
        _ => (
            object.get("name")?,
            object.get("arguments").or_else(|| object.get("parameters")),
        ),
    };
    let name = name.as_str()?.to_string();
    let arguments = match arguments {
        None => "{}".to_string(),
        Some(Value::String(raw)) => raw.clone(),
        Some(other) => other.to_string(),
    };
    let id = object
        .get("id")
        .and_then(Value::as_str)
        .map_or_else(&mut *next_id, str::to_string);
    Some(ToolCall::function(id, name, arguments))
}

fn non_empty(text: &str) -> Option<String> {
    let trimmed = text.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ParsedTurn {
        let mut n = 0;
        let mut next_id = || {
            n += 1;
            format!("call_{n}")
        };
        parse_tool_calls(
            text,
            &|name| ["read_file", "list_dir"].contains(&name),
            &mut next_id,
        )
    }

    fn calls(turn: &ParsedTurn) -> Vec<(&str, &str, &str)> {
        turn.tool_calls
            .iter()
            .map(|c| {
                (
                    c.id.as_str(),
                    c.function.name.as_str(),
                    c.function.arguments.as_str(),
                )
            })
            .collect()
    }

    /// A call repeated word for word, or with its keys reordered and
    /// spaced otherwise, is dropped; a call that differs in its function
    /// or in any argument value is kept, as is the first of the repeats.
    #[test]
    fn a_call_repeated_in_one_turn_is_dropped_and_every_other_is_kept() {
        /// The calls of a reply, as (name, arguments), and the ids kept.
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case] = &[
            (&[("f", r#"{"a":1}"#), ("f", r#"{"a":1}"#)], &["call_1"]),
            (
                &[
                    ("f", r#"{"a":1,"b":"x"}"#),
                    ("f", r#"{ "b" : "x", "a" : 1 }"#),
                ],
                &["call_1"],
            ),
            (
                &[("f", r#"{"a":1}"#), ("f", r#"{"a":2}"#)],
                &["call_1", "call_2"],
            ),
            (
                &[("f", r#"{"a":1}"#), ("g", r#"{"a":1}"#)],
                &["call_1", "call_2"],
            ),
            (
                &[("f", r#"{"a":1}"#), ("f", r#"{"a":1.0}"#)],
                &["call_1", "call_2"],
            ),
            (&[("f", "not json"), ("f", "not json")], &["call_1"]),
            (
                &[
                    ("f", "{}"),
                    ("g", "{}"),
                    ("f", "{}"),
                    ("g", "{}"),
                    ("f", "{}"),
                ],
                &["call_1", "call_2"],
            ),
            (&[], &[]),
        ];
        for (given, kept) in cases {
            let mut calls: Vec<ToolCall> = given
                .iter()
                .enumerate()
                .map(|(at, (name, arguments))| {
                    ToolCall::function(format!("call_{}", at + 1), *name, *arguments)
                })
                .collect();
            let dropped = drop_repeated_calls(&mut calls);
            let ids: Vec<&str> = calls.iter().map(|c| c.id.as_str()).collect();
            assert_eq!(&ids, kept, "{given:?}");
            assert_eq!(dropped, given.len() - kept.len(), "{given:?}");
        }
    }

    /// An expected call: (id, name, arguments).
    type Call = (&'static str, &'static str, &'static str);

    /// (input, expected content, expected calls).
    const CASES: &[(&str, Option<&str>, &[Call])] = &[
        ("Hello there.", Some("Hello there."), &[]),
        (
            "Let me look.\n<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"a.txt\"}}\n</tool_call>",
            Some("Let me look."),
            &[("call_1", "read_file", "{\"path\":\"a.txt\"}")],
        ),
        (
            "<tool_call>{\"name\": \"read_file\", \"arguments\": {\"path\": \"a\"}}</tool_call>\n<tool_call>{\"name\": \"list_dir\", \"arguments\": {}}</tool_call> done",
            Some("done"),
            &[("call_1", "read_file", "{\"path\":\"a\"}"), ("call_2", "list_dir", "{}")],
        ),
        (
            "<tool_call>{\"name\": \"read_file\", \"arguments\": \"{\\\"path\\\": \\\"a\\\"}\"}</tool_call>",
            None,
            &[("call_1", "read_file", "{\"path\": \"a\"}")],
        ),
        ("<tool_call>{not json}</tool_call>", Some("<tool_call>{not json}</tool_call>"), &[]),
        // The closing tag inside a string of the call (real output of the
        // default model, `agent eval`'s js_sort task) ends neither the
        // string nor the call.
        (
            "<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\n    \"path\" : \"{{1}}</tool_call>\"}\n}\n</tool_call>",
            None,
            &[("call_1", "read_file", "{\"path\":\"{{1}}</tool_call>\"}")],
        ),
        // A block that is JSON but no call stays text as written: its
        // spacing kept, and no closing tag it never had.
        (
            "<tool_call>{\"a\": 1}\n</tool_call> ok",
            Some("<tool_call>{\"a\": 1}\n</tool_call> ok"),
            &[],
        ),
        (
            "<tool_call>{\"a\": \"</tool_call>\"}",
            Some("<tool_call>{\"a\": \"</tool_call>\"}"),
            &[],
        ),
        (
            "<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"a\"}}",
            None,
            &[("call_1", "read_file", "{\"path\":\"a\"}")],
        ),
        (
            "[TOOL_CALLS][{\"name\": \"read_file\", \"arguments\": {\"path\": \"b\"}, \"id\": \"abc123xyz\"}]",
            None,
            &[("abc123xyz", "read_file", "{\"path\":\"b\"}")],
        ),
        ("{\"name\": \"list_dir\", \"parameters\": {\"path\": \".\"}}", None, &[("call_1", "list_dir", "{\"path\":\".\"}")]),
        ("<|python_tag|>{\"name\": \"list_dir\", \"parameters\": {}}", None, &[("call_1", "list_dir", "{}")]),
        ("{\"name\": \"Alice\", \"age\": 3}", Some("{\"name\": \"Alice\", \"age\": 3}"), &[]),
        (
            "[{\"name\": \"read_file\", \"arguments\": {\"path\": \"x\"}}, {\"name\": \"list_dir\"}]",
            None,
            &[("call_1", "read_file", "{\"path\":\"x\"}"), ("call_2", "list_dir", "{}")],
        ),
        (
            "{\"type\": \"function\", \"function\": {\"name\": \"read_file\", \"arguments\": \"{}\"}}",
            None,
            &[("call_1", "read_file", "{}")],
        ),
    ];

    #[test]
    fn every_supported_form_parses() {
        for (input, content, expected) in CASES {
            let turn = parse(input);
            assert_eq!(turn.content.as_deref(), *content, "{input}");
            assert_eq!(calls(&turn), expected.to_vec(), "{input}");
        }
    }

    /// Found by the fuzzer: arguments written as a JSON string (as on the
    /// OpenAI wire) whose text is not JSON are passed on as they are, so
    /// that validation names what is wrong and the model can fix it; the
    /// parser neither drops the call nor fails.
    #[test]
    fn string_arguments_that_are_not_json_go_on_to_validation() {
        let turn = parse(
            "<tool_call>\n{\"name\": \"read_file\", \"arguments\": \"{\\\"path\\\": \\\"tes.txt\"}\n</tool_call>",
        );
        assert_eq!(
            calls(&turn),
            vec![("call_1", "read_file", "{\"path\": \"tes.txt")]
        );
    }
}
