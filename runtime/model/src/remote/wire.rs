//! The OpenAI chat-completions wire: the request body, and a turn put back
//! together from its streamed chunks (text deltas, `tool_calls` deltas by
//! index, the finish reason and usage).

use serde_json::{json, Map, Value};

use super::ServerKind;
use crate::backend::{CompletionRequest, Counters};
use crate::call_grammar::CallCount;
use crate::grammar::ToolChoice;
use stack_types::message::ToolCall;

/// The body of a streaming `POST /chat/completions`.
///
/// The messages are serialized the same way every turn, so a conversation's
/// request is a byte-for-byte extension of the previous one and a server's
/// prefix cache (llama-server `cache_prompt`, vLLM automatic prefix
/// caching) reuses everything before the new messages.
pub(crate) fn chat_body(
    model: &str,
    request: &CompletionRequest,
    kind: ServerKind,
    strict: bool,
    structural_tag: bool,
) -> Value {
    let mut body = Map::new();
    body.insert("model".into(), model.into());
    body.insert("messages".into(), json!(request.messages));
    body.insert("stream".into(), true.into());
    body.insert("stream_options".into(), json!({"include_usage": true}));
    let sampling = &request.sampling;
    body.insert("temperature".into(), decimal(sampling.temperature));
    body.insert("top_p".into(), decimal(sampling.top_p));
    body.insert("seed".into(), json!(sampling.seed));
    body.insert("max_tokens".into(), json!(sampling.max_tokens));
    // OpenAI's own penalties, where asked for.
    for (name, value) in [
        ("frequency_penalty", sampling.frequency_penalty),
        ("presence_penalty", sampling.presence_penalty),
    ] {
        if value != 0.0 {
            body.insert(name.into(), decimal(value));
        }
    }
    // Sampling settings outside OpenAI's set, only for servers that take
    // them. llama-server samples as the runtime does in process; vLLM and
    // SGLang get only what was asked for, and otherwise sample as the
    // model's `generation_config.json` says (Qwen2.5-Coder's top_k 20 and
    // repetition penalty 1.05, not llama.cpp's 40 and 1.1).
    match kind {
        ServerKind::LlamaServer => {
            body.insert("top_k".into(), json!(sampling.top_k_or_default()));
            body.insert("min_p".into(), decimal(sampling.min_p_or_default()));
            body.insert(
                "repeat_penalty".into(),
                decimal(sampling.repeat_penalty_or_default()),
            );
            body.insert("cache_prompt".into(), true.into());
        }
        ServerKind::Vllm | ServerKind::Sglang => {
            for (name, value) in [
                ("top_k", sampling.top_k.map(|k| json!(k))),
                ("min_p", sampling.min_p.map(decimal)),
                ("repetition_penalty", sampling.repeat_penalty.map(decimal)),
            ] {
                if let Some(value) = value {
                    body.insert(name.into(), value);
                }
            }
        }
        ServerKind::Ollama | ServerKind::Generic => {}
    }
    if !request.tools.is_empty() && request.tool_choice != ToolChoice::None {
        // llama-server reads `tool_choice` as a string only (an object falls
        // back to "auto"): a named tool becomes "required" over that tool.
        let named_as_required = kind == ServerKind::LlamaServer;
        // vLLM holds a forced call (`required`, a named tool) to its
        // schema only when the function is `strict`: without it vLLM 0.32
        // let SmolLM2 write `[1, 2, 3]` as a named call's arguments (tried
        // on its CPU build, hermes parser). Its chat template shows the
        // field to the model, so every step is sent `strict`, `auto` ones
        // too: a forced step and the `auto` step after it share their
        // prefix in vLLM's cache. (Under `auto`, the Hermes parser does
        // not act on it; older releases ignore the field.)
        let strict = strict || kind == ServerKind::Vllm;
        let tools: Vec<Value> = request
            .tools
            .iter()
            .filter(|tool| match &request.tool_choice {
                ToolChoice::Named(name) if named_as_required => {
                    tool.pointer("/function/name").and_then(Value::as_str) == Some(name.as_str())
                }
                _ => true,
            })
            .map(|tool| {
                let mut tool = tool.clone();
                if strict {
                    if let Some(function) = tool.get_mut("function").and_then(Value::as_object_mut)
                    {
                        function.insert("strict".into(), true.into());
                    }
                }
                tool
            })
            .collect();
        body.insert("tools".into(), tools.into());
        let choice = match &request.tool_choice {
            ToolChoice::Auto => json!("auto"),
            ToolChoice::None => json!("none"),
            ToolChoice::Required => json!("required"),
            ToolChoice::Named(_) if named_as_required => json!("required"),
            ToolChoice::Named(name) => json!({"type": "function", "function": {"name": name}}),
        };
        body.insert("tool_choice".into(), choice);
        if sampling.calls_per_reply == CallCount::One {
            body.insert("parallel_tool_calls".into(), false.into());
        }
    }
    if let Some(schema) = &request.response_format {
        body.insert(
            "response_format".into(),
            json!({"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}),
        );
    } else if structural_tag && request.tool_choice == ToolChoice::Auto {
        if let Some(tag) = hermes_structural_tag(&request.tools) {
            body.insert("response_format".into(), tag);
        }
    }
    Value::Object(body)
}

/// Moves a request's `tools` into its system message, in the words
/// Qwen2.5's template (and the runtime's ChatML tools fallback) uses, and
/// drops `tool_choice`: for a server that refuses `tool_choice: auto`
/// because it has no tool parser (vLLM without `--enable-auto-tool-choice`).
/// The model sees the prompt its own template would have shown it, its
/// `<tool_call>` text is parsed by the runtime, and the structural tag,
/// where one is sent, still holds each call to its schema. The system
/// message is the same from turn to turn, so prefix caching still works.
pub(crate) fn tools_into_prompt(body: &mut Value, default_system: &str) {
    let Some(fields) = body.as_object_mut() else {
        return;
    };
    let Some(Value::Array(tools)) = fields.remove("tools") else {
        return;
    };
    fields.remove("tool_choice");
    fields.remove("parallel_tool_calls");
    let mut block = String::from(
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for tool in &tools {
        // `strict` is how the request is decoded, not part of the tool: a
        // forced step and an `auto` one show the model the same text, so
        // the prompt stays one prefix from step to step.
        let mut tool = tool.clone();
        if let Some(function) = tool.get_mut("function").and_then(Value::as_object_mut) {
            function.remove("strict");
        }
        block.push('\n');
        block.push_str(&tool.to_string());
    }
    block.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    let Some(Value::Array(messages)) = fields.get_mut("messages") else {
        return;
    };
    let system = messages
        .first_mut()
        .filter(|first| first.get("role").and_then(Value::as_str) == Some("system"));
    match system {
        Some(first) => match first.get_mut("content") {
            Some(Value::String(text)) => text.push_str(&block),
            Some(Value::Array(parts)) => parts.push(json!({"type": "text", "text": block})),
            _ => first["content"] = format!("{default_system}{block}").into(),
        },
        None => messages.insert(
            0,
            json!({"role": "system", "content": format!("{default_system}{block}")}),
        ),
    }
}

/// Whether a server's 400 says it cannot take a `tool_choice` for want of
/// a tool parser. vLLM started without one refuses `auto` (`"auto" tool
/// choice requires --enable-auto-tool-choice and --tool-call-parser to be
/// set`) and, from 0.32, `required` and a named tool too
/// (`tool_choice="required" requires --tool-call-parser to be set`).
pub(crate) fn refuses_tool_choice(message: &str) -> bool {
    message.contains("--enable-auto-tool-choice")
        || message.contains("\"auto\" tool choice requires")
        || message.contains("requires --tool-call-parser")
}

/// A `response_format` that holds the whole reply to one call object as
/// Qwen2.5 writes one, `{"name": N, "arguments": {…}}`, its arguments to
/// that tool's schema: a forced call (`required`, or the named tool) on a
/// server with no tool parser, which refuses either `tool_choice`. The
/// tools are in the prompt ([`tools_into_prompt`]); the runtime reads the
/// call back from the text. `None` when no offered tool qualifies.
pub(crate) fn forced_call_format(tools: &[Value], choice: &ToolChoice) -> Option<Value> {
    // Each tool's definitions move to the root, under names of its own,
    // so that its `$ref`s still resolve once its schema is nested.
    let mut definitions = Map::new();
    let calls: Vec<Value> = tools
        .iter()
        .filter_map(|tool| {
            let name = tool.pointer("/function/name")?.as_str()?;
            if let ToolChoice::Named(wanted) = choice {
                if wanted != name {
                    return None;
                }
            }
            let mut arguments = tool
                .pointer("/function/parameters")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"}));
            // Whether a ref points into the schema itself (not its
            // definitions).
            let mut into_itself = false;
            // A dialect marker belongs at a schema's root, not inside one.
            if let Some(fields) = arguments.as_object_mut() {
                fields.remove("$schema");
                for key in ["$defs", "definitions"] {
                    if let Some(Value::Object(defs)) = fields.remove(key) {
                        for (def, mut schema) in defs {
                            into_itself |= rebase_refs(name, &mut schema);
                            definitions.insert(format!("{name}.{def}"), schema);
                        }
                    }
                }
            }
            into_itself |= rebase_refs(name, &mut arguments);
            if into_itself {
                // Refs into the schema itself (`#`, `#/properties/x`, as
                // zod-to-json-schema writes them) point into a whole copy
                // of it kept under the root as `TOOL`.
                definitions.insert(name.to_string(), arguments.clone());
            }
            Some(json!({
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [name]}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            }))
        })
        .collect();
    let mut schema = match calls.len() {
        0 => return None,
        1 => calls.into_iter().next()?,
        _ => json!({"anyOf": calls}),
    };
    if !definitions.is_empty() {
        schema["$defs"] = Value::Object(definitions);
    }
    Some(json!({"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}))
}

/// Points a tool schema's local `$ref`s where they resolve once the schema
/// is nested: those into its own definitions (`#/$defs/X`,
/// `#/definitions/X`) at their new names under the root, `TOOL.X`; any
/// other (`#`, `#/properties/x`) into a whole copy of the schema kept
/// under the root as `TOOL`. Returns whether there was such another ref.
fn rebase_refs(tool: &str, schema: &mut Value) -> bool {
    match schema {
        Value::Object(fields) => {
            let mut into_itself = false;
            if let Some(Value::String(target)) = fields.get_mut("$ref") {
                let into_definitions = target
                    .strip_prefix("#/$defs/")
                    .or_else(|| target.strip_prefix("#/definitions/"));
                if let Some(rest) = into_definitions {
                    *target = format!("#/$defs/{tool}.{rest}");
                } else if let Some(rest) = target.strip_prefix('#') {
                    *target = format!("#/$defs/{tool}{rest}");
                    into_itself = true;
                }
            }
            // Every value visited: no short cut past a ref to rewrite.
            for value in fields.values_mut() {
                into_itself |= rebase_refs(tool, value);
            }
            into_itself
        }
        Value::Array(items) => {
            let mut into_itself = false;
            for value in items {
                into_itself |= rebase_refs(tool, value);
            }
            into_itself
        }
        _ => false,
    }
}

/// A sampling setting as the decimal it was set as: an `f32` widened to
/// JSON's `f64` as it is would go out as 0.8999999761581421 for 0.9.
pub(crate) fn decimal(value: f32) -> Value {
    format!("{value}")
        .parse::<f64>()
        .map(Value::from)
        .unwrap_or_else(|_| json!(value))
}

/// A structural tag (vLLM and SGLang, xgrammar's form with `structures`
/// and `triggers`) that leaves the reply free until a Hermes call opens
/// (`<tool_call>\n{"name": `, as Qwen2.5's template writes it), and from
/// there holds the call to its tool's argument schema:
/// what the runtime's lazy grammar does in process, done by the server.
/// `None` when no tool has a name. Only `tool_choice: auto` needs it: under
/// `required` or a named tool, vLLM and SGLang constrain the call
/// themselves.
pub(crate) fn hermes_structural_tag(tools: &[Value]) -> Option<Value> {
    let structures: Vec<Value> = tools
        .iter()
        .filter_map(|tool| {
            let name = tool.pointer("/function/name")?.as_str()?;
            let schema = tool
                .pointer("/function/parameters")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"}));
            // As Qwen2.5's template writes a call: `{"name": "N", "arguments": {…}}`.
            Some(json!({
                "begin": format!("<tool_call>\n{{\"name\": {}, \"arguments\": ", Value::from(name)),
                "schema": schema,
                "end": "}\n</tool_call>",
            }))
        })
        .collect();
    (!structures.is_empty()).then(|| {
        json!({
            "type": "structural_tag",
            "structures": structures,
            // The opening every structure shares: a model that writes
            // another syntax after `<tool_call>` (Qwen3-Coder's XML) never
            // completes it, and stays free.
            "triggers": ["<tool_call>\n{\"name\": "],
        })
    })
}

/// Why the server says it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    /// `stop` or `tool_calls`: the turn ended.
    Stop,
    /// `length`: the token budget ran out.
    Length,
    /// `abort` (SGLang, a request the server dropped) or `error`: the
    /// answer was cut short by the server, not finished.
    Aborted,
}

/// A turn being put back together from its chunks.
#[derive(Debug, Default)]
pub(crate) struct Assembler {
    pub(crate) content: String,
    calls: Vec<PartialCall>,
    pub(crate) finish: Option<Finish>,
    pub(crate) usage: Option<Counters>,
    /// Whether the `[DONE]` sentinel arrived.
    pub(crate) done: bool,
    /// Whether any token arrived (text or a call).
    pub(crate) started: bool,
    /// The server's own time for the turn, when it reports one.
    pub(crate) server_ms: Option<f64>,
}

#[derive(Debug, Default)]
struct PartialCall {
    id: Option<String>,
    name: String,
    arguments: String,
}

/// An event the stream carried that is not part of a turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StreamProblem {
    /// Data that is not the JSON of a chunk.
    Malformed(String),
    /// The server reported an error inside the stream.
    ServerError(String),
}

impl Assembler {
    /// Takes one event's data; returns the text delta it carried.
    pub(crate) fn take(&mut self, data: &str) -> Result<Option<String>, StreamProblem> {
        if data.trim() == "[DONE]" {
            self.done = true;
            return Ok(None);
        }
        let chunk: Value = serde_json::from_str(data)
            .map_err(|err| StreamProblem::Malformed(format!("{err} in {}", preview(data))))?;
        if let Some(error) = chunk.get("error") {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| error.to_string(), str::to_string);
            return Err(StreamProblem::ServerError(message));
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(counters(usage, chunk.get("timings")));
        }
        if let Some(ms) = server_ms(chunk.get("timings")) {
            self.server_ms = Some(ms);
        }
        let Some(choice) = chunk.pointer("/choices/0") else {
            return Ok(None);
        };
        match choice.get("finish_reason").and_then(Value::as_str) {
            Some("length") => self.finish = Some(Finish::Length),
            Some("abort" | "error") => self.finish = Some(Finish::Aborted),
            // `stop`, `tool_calls`, `eos_token`, `content_filter` (the
            // server ended the answer on purpose) and the like.
            Some(_) => self.finish = Some(Finish::Stop),
            None => {}
        }
        let Some(delta) = choice.get("delta") else {
            return Ok(None);
        };
        // Reasoning is not shown, but it is the model answering
        // (`reasoning_content` in llama-server and older vLLM, `reasoning`
        // in vLLM since 0.11 and in Ollama).
        if ["reasoning_content", "reasoning"].iter().any(|field| {
            delta
                .get(*field)
                .and_then(Value::as_str)
                .is_some_and(|r| !r.is_empty())
        }) {
            self.started = true;
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            self.started = true;
            // Servers that leave out `index` send each call whole: a new id,
            // or a name where the last call has one, starts the next call.
            let starts_new = self.calls.last().is_none_or(|last| {
                call.get("id")
                    .and_then(Value::as_str)
                    .is_some_and(|id| last.id.as_deref() != Some(id))
                    || (call.pointer("/function/name").is_some() && !last.name.is_empty())
            });
            let index = call
                .get("index")
                .and_then(Value::as_u64)
                .and_then(|i| usize::try_from(i).ok())
                .unwrap_or(if starts_new {
                    self.calls.len()
                } else {
                    self.calls.len() - 1
                });
            if index > 1024 {
                return Err(StreamProblem::Malformed(format!(
                    "a tool call index of {index}"
                )));
            }
            while self.calls.len() <= index {
                self.calls.push(PartialCall::default());
            }
            let partial = &mut self.calls[index];
            let id = call.get("id").and_then(Value::as_str);
            // A server that repeats the whole name in every delta (with
            // the call's id, or once arguments have begun) does not make
            // it longer; a name streamed in pieces is put together.
            if let Some(name) = call.pointer("/function/name").and_then(Value::as_str) {
                let repeats_id = id.is_some() && id == partial.id.as_deref();
                let repeated = !partial.name.is_empty()
                    && partial.name == name
                    && (repeats_id || !partial.arguments.is_empty());
                if !repeated {
                    partial.name.push_str(name);
                }
            }
            if let Some(id) = id {
                partial.id = Some(id.to_string());
            }
            match call.pointer("/function/arguments") {
                Some(Value::String(arguments)) => partial.arguments.push_str(arguments),
                // Some servers (Ollama's native API shape, proxies) send
                // the arguments as a JSON object rather than its text,
                // whole, and some send it again with every delta.
                Some(object @ Value::Object(_)) => {
                    let text = object.to_string();
                    if partial.arguments.is_empty() {
                        partial.arguments = text;
                    } else if partial.arguments != text {
                        return Err(StreamProblem::Malformed(format!(
                            "a tool call's arguments as an object after other arguments: {}",
                            preview(&text)
                        )));
                    }
                }
                Some(Value::Null) | None => {}
                Some(other) => {
                    return Err(StreamProblem::Malformed(format!(
                        "tool call arguments that are neither text nor an object: {}",
                        preview(&other.to_string())
                    )))
                }
            }
        }
        match delta.get("content").and_then(Value::as_str) {
            Some(text) if !text.is_empty() => {
                self.started = true;
                self.content.push_str(text);
                Ok(Some(text.to_string()))
            }
            _ => Ok(None),
        }
    }

    /// The native calls, with ids (made up where the server gave none).
    pub(crate) fn calls(&self, next_id: &mut dyn FnMut() -> String) -> Vec<ToolCall> {
        self.calls
            .iter()
            .filter(|call| !call.name.is_empty())
            .map(|call| {
                ToolCall::function(
                    call.id.clone().unwrap_or_else(&mut *next_id),
                    call.name.clone(),
                    if call.arguments.trim().is_empty() {
                        "{}".to_string()
                    } else {
                        call.arguments.clone()
                    },
                )
            })
            .collect()
    }
}

/// Token counters from an OpenAI `usage` object, with llama-server's
/// `timings` where the usage lacks cached tokens.
pub(crate) fn counters(usage: &Value, timings: Option<&Value>) -> Counters {
    let number = |v: Option<&Value>| v.and_then(Value::as_u64);
    let prompt = number(usage.get("prompt_tokens")).unwrap_or(0);
    let cached = number(usage.pointer("/prompt_tokens_details/cached_tokens"))
        .or_else(|| number(timings.and_then(|t| t.get("cache_n"))))
        .unwrap_or(0)
        .min(prompt);
    Counters {
        prompt_evaluated: prompt - cached,
        prompt_reused: cached,
        generated: number(usage.get("completion_tokens")).unwrap_or(0),
    }
}

/// Prompt plus generation milliseconds from llama-server's `timings`.
pub(crate) fn server_ms(timings: Option<&Value>) -> Option<f64> {
    let timings = timings?;
    let prompt = timings.get("prompt_ms").and_then(Value::as_f64)?;
    let predicted = timings
        .get("predicted_ms")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    Some(prompt + predicted)
}

/// The start of `text`, for an error message.
pub(crate) fn preview(text: &str) -> String {
    let end = text.floor_char_boundary(200);
    if end < text.len() {
        format!("{:?}…", &text[..end])
    } else {
        format!("{text:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_assembled_across_chunks_and_indexes() {
        let mut turn = Assembler::default();
        let chunks = [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"Let me look."}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"read_file","arguments":""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"path\": "}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_b","function":{"name":"list_dir","arguments":"{}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"a.txt\"}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":120,"completion_tokens":30,"prompt_tokens_details":{"cached_tokens":100}}}"#,
            "[DONE]",
        ];
        let mut text = String::new();
        for chunk in chunks {
            if let Some(delta) = turn.take(chunk).expect("valid chunk") {
                text.push_str(&delta);
            }
        }
        assert_eq!(text, "Let me look.");
        assert!(turn.done && turn.started);
        assert_eq!(turn.finish, Some(Finish::Stop));
        let calls = turn.calls(&mut || "unused".into());
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (
                calls[0].id.as_str(),
                calls[0].function.name.as_str(),
                calls[0].function.arguments.as_str()
            ),
            ("call_a", "read_file", "{\"path\": \"a.txt\"}")
        );
        assert_eq!(calls[1].function.name, "list_dir");
        assert_eq!(
            turn.usage,
            Some(Counters {
                prompt_evaluated: 20,
                prompt_reused: 100,
                generated: 30
            })
        );
    }

    #[test]
    fn errors_and_garbage_in_the_stream_are_named() {
        let mut turn = Assembler::default();
        assert!(matches!(
            turn.take(r#"{"error":{"message":"the request exceeds the available context size"}}"#),
            Err(StreamProblem::ServerError(m)) if m.contains("context")
        ));
        assert!(matches!(
            turn.take("{not json"),
            Err(StreamProblem::Malformed(_))
        ));
        assert!(turn
            .take(r#"{"choices":[{"delta":{"tool_calls":[{"index":99999}]}}]}"#)
            .is_err());
        // Whole calls without an index (some Ollama versions) stay apart.
        let mut whole = Assembler::default();
        whole
            .take(r#"{"choices":[{"delta":{"tool_calls":[{"id":"a","function":{"name":"list_dir","arguments":"{}"}},{"id":"b","function":{"name":"read_file","arguments":"{\"path\":\"x\"}"}}]}}]}"#)
            .expect("valid");
        let calls = whole.calls(&mut || "unused".into());
        assert_eq!(
            calls
                .iter()
                .map(|c| c.function.name.as_str())
                .collect::<Vec<_>>(),
            ["list_dir", "read_file"]
        );
    }

    #[test]
    fn servers_quirks_in_calls_and_finish_reasons_are_read_as_meant() {
        // Arguments as an object, a name repeated in every delta, and
        // vLLM's `reasoning` field.
        let mut turn = Assembler::default();
        for chunk in [
            r#"{"choices":[{"delta":{"reasoning":"the user wants a file"}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c1","function":{"name":"read_file","arguments":{"path":"a.txt"}}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c1","function":{"name":"read_file","arguments":{"path":"a.txt"}}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":2,"id":"c3","function":{"name":"a"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":2,"function":{"name":"a","arguments":"{}"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"id":"c2","function":{"name":"write_file","arguments":"{\"path\": "}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"name":"write_file","arguments":"\"b\"}"}}]}}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
        ] {
            turn.take(chunk).expect("valid chunk");
        }
        assert!(turn.started, "reasoning counts as the model answering");
        let calls = turn.calls(&mut || "unused".into());
        let got: Vec<(&str, &str)> = calls
            .iter()
            .map(|c| (c.function.name.as_str(), c.function.arguments.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("read_file", r#"{"path":"a.txt"}"#),
                ("write_file", r#"{"path": "b"}"#),
                ("aa", "{}"),
            ]
        );
        assert!(matches!(
            Assembler::default()
                .take(r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":7}}]}}]}"#),
            Err(StreamProblem::Malformed(m)) if m.contains("neither text nor an object")
        ));
        // What each finish reason means.
        for (reason, finish) in [
            ("stop", Finish::Stop),
            ("tool_calls", Finish::Stop),
            ("content_filter", Finish::Stop),
            ("length", Finish::Length),
            ("abort", Finish::Aborted),
            ("error", Finish::Aborted),
        ] {
            let mut turn = Assembler::default();
            turn.take(&format!(
                r#"{{"choices":[{{"delta":{{}},"finish_reason":"{reason}"}}]}}"#
            ))
            .expect("valid chunk");
            assert_eq!(turn.finish, Some(finish), "{reason}");
        }
    }

    #[test]
    fn the_body_extends_byte_for_byte_from_turn_to_turn() {
        use stack_types::message::Message;
        let mut request = CompletionRequest {
            messages: vec![Message::system("s"), Message::user("one")],
            tools: vec![
                json!({"type": "function", "function": {"name": "list_dir", "parameters": {"type": "object"}}}),
            ],
            tool_choice: ToolChoice::Auto,
            sampling: Default::default(),
            response_format: None,
            argument_values: Default::default(),
        };
        let first = chat_body("m", &request, ServerKind::LlamaServer, false, false).to_string();
        request.messages.push(Message::assistant("two"));
        request.messages.push(Message::user("three"));
        let second = chat_body("m", &request, ServerKind::LlamaServer, false, false).to_string();
        let cut = first.find("\"messages\"").expect("messages")
            + first[first.find("\"messages\"").expect("m")..]
                .find("]")
                .expect("end");
        assert_eq!(&second[..cut - 1], &first[..cut - 1]);
        assert!(
            second.contains("\"cache_prompt\":true") && second.contains("\"tool_choice\":\"auto\"")
        );
        let strict = chat_body("m", &request, ServerKind::Generic, true, false);
        assert_eq!(strict["tools"][0]["function"]["strict"], true);
        assert!(strict.get("top_k").is_none());
    }

    /// vLLM gets its functions `strict` (vLLM 0.32 leaves a forced call
    /// unconstrained otherwise), on `auto` steps too, since its template
    /// shows the field and a forced step and the `auto` one after it must
    /// share their prefix; other servers get the tools as they are.
    /// Sampling settings go out as the decimals they were set as.
    #[test]
    fn a_forced_call_to_vllm_is_strict_and_settings_are_exact_decimals() {
        let tools = vec![
            json!({"type": "function", "function": {"name": "list_dir", "parameters": {"type": "object"}}}),
            json!({"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}),
        ];
        let mut request = CompletionRequest {
            messages: Vec::new(),
            tools,
            tool_choice: ToolChoice::Auto,
            sampling: Default::default(),
            response_format: None,
            argument_values: Default::default(),
        };
        let strict_of = |body: &Value| -> Vec<Value> {
            body["tools"]
                .as_array()
                .expect("tools")
                .iter()
                .map(|tool| tool["function"]["strict"].clone())
                .collect()
        };
        let auto = chat_body("m", &request, ServerKind::Vllm, false, false);
        assert_eq!(strict_of(&auto), vec![json!(true), json!(true)]);
        for choice in [ToolChoice::Required, ToolChoice::Named("read_file".into())] {
            request.tool_choice = choice.clone();
            let vllm = chat_body("m", &request, ServerKind::Vllm, false, false);
            assert_eq!(
                strict_of(&vllm),
                vec![json!(true), json!(true)],
                "{choice:?}"
            );
            let tools = |body: &Value| body["tools"].to_string();
            assert_eq!(tools(&vllm), tools(&auto), "one prefix, forced or not");
            for kind in [ServerKind::Sglang, ServerKind::Generic] {
                let other = chat_body("m", &request, kind, false, false);
                assert!(strict_of(&other).iter().all(Value::is_null), "{kind:?}");
            }
        }
        request.sampling.temperature = 0.7;
        request.sampling.top_p = 0.9;
        let body = chat_body("m", &request, ServerKind::LlamaServer, false, false);
        assert_eq!(body["top_p"], json!(0.9));
        assert_eq!(body["temperature"], json!(0.7));
        assert!(body.to_string().contains("\"top_p\":0.9,"), "{body}");
        // In the prompt, a tool reads the same whether or not it went out
        // `strict`.
        let mut forced = chat_body("m", &request, ServerKind::Vllm, false, false);
        request.tool_choice = ToolChoice::Auto;
        let mut auto = chat_body("m", &request, ServerKind::Vllm, false, false);
        tools_into_prompt(&mut forced, "s");
        tools_into_prompt(&mut auto, "s");
        assert_eq!(forced["messages"], auto["messages"]);
        assert!(!forced["messages"].to_string().contains("strict"));
    }

    /// A forced call's JSON schema holds the named tool only, or one of
    /// all of them under `required`, and a tool's own definitions still
    /// resolve once its schema is nested: moved to the root under the
    /// tool's name, its `$ref`s with them (checked by a validator).
    #[test]
    fn a_forced_calls_schema_keeps_each_tools_definitions_resolvable() {
        let tools = vec![
            json!({"type": "function", "function": {"name": "move", "parameters": {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "properties": {"to": {"$ref": "#/$defs/Point"}},
                "required": ["to"],
                "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}
            }}}),
            json!({"type": "function", "function": {"name": "mark", "parameters": {
                "type": "object",
                "properties": {"at": {"$ref": "#/definitions/Point"}},
                "required": ["at"],
                "definitions": {"Point": {"type": "string"}}
            }}}),
        ];
        let valid = |format: &Value, instance: Value| {
            let schema = &format["json_schema"]["schema"];
            jsonschema::validator_for(schema)
                .unwrap_or_else(|err| panic!("{err}: {schema}"))
                .is_valid(&instance)
        };
        let named = forced_call_format(&tools, &ToolChoice::Named("move".into())).expect("format");
        assert!(valid(
            &named,
            json!({"name": "move", "arguments": {"to": {"x": 1}}})
        ));
        assert!(!valid(
            &named,
            json!({"name": "move", "arguments": {"to": {"x": "far"}}})
        ));
        assert!(!valid(
            &named,
            json!({"name": "mark", "arguments": {"at": "here"}})
        ));
        let any = forced_call_format(&tools, &ToolChoice::Required).expect("format");
        assert!(valid(
            &any,
            json!({"name": "mark", "arguments": {"at": "here"}})
        ));
        assert!(!valid(
            &any,
            json!({"name": "mark", "arguments": {"at": {"x": 1}}})
        ));
        assert!(valid(
            &any,
            json!({"name": "move", "arguments": {"to": {"x": 1}}})
        ));
        assert!(forced_call_format(&tools, &ToolChoice::Named("other".into())).is_none());
        // A ref into the schema itself, as zod-to-json-schema writes one.
        let zod = vec![
            json!({"type": "function", "function": {"name": "copy", "parameters": {
                "type": "object",
                "properties": {
                    "from": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
                    "to": {"$ref": "#/properties/from"}
                },
                "required": ["from", "to"]
            }}}),
        ];
        let copy = forced_call_format(&zod, &ToolChoice::Required).expect("format");
        let call =
            |to: Value| json!({"name": "copy", "arguments": {"from": {"path": "a"}, "to": to}});
        assert!(valid(&copy, call(json!({"path": "b"}))));
        assert!(!valid(&copy, call(json!({"path": 2}))));
    }

    #[test]
    fn vllm_and_sglang_get_only_the_sampling_settings_asked_for() {
        use crate::backend::SamplingOptions;
        let mut request = CompletionRequest {
            messages: Vec::new(),
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
            sampling: SamplingOptions::default(),
            response_format: None,
            argument_values: Default::default(),
        };
        // Unasked: llama-server samples as in process; vLLM and SGLang as
        // the model's generation config says (nothing sent).
        let llama = chat_body("m", &request, ServerKind::LlamaServer, false, false);
        assert_eq!(llama["top_k"], 40);
        assert_eq!(llama["repeat_penalty"], json!(1.1));
        assert_eq!(llama["min_p"], json!(0.05));
        for kind in [ServerKind::Vllm, ServerKind::Sglang] {
            let body = chat_body("m", &request, kind, false, false);
            for field in ["top_k", "min_p", "repetition_penalty", "repeat_penalty"] {
                assert!(body.get(field).is_none(), "{kind:?} got {field}: {body}");
            }
            assert!(body.get("temperature").is_some());
        }
        // Asked for: sent, under each server's name for it.
        request.sampling.top_k = Some(20);
        request.sampling.repeat_penalty = Some(1.05);
        let vllm = chat_body("m", &request, ServerKind::Vllm, false, false);
        assert_eq!(vllm["top_k"], 20);
        assert_eq!(vllm["repetition_penalty"], json!(1.05));
        assert!(vllm.get("min_p").is_none() && vllm.get("repeat_penalty").is_none());
        let llama = chat_body("m", &request, ServerKind::LlamaServer, false, false);
        assert_eq!(llama["top_k"], 20);
        assert_eq!(llama["repeat_penalty"], json!(1.05));
        // Ollama and unknown servers: OpenAI's set only.
        let ollama = chat_body("m", &request, ServerKind::Ollama, false, false);
        assert!(ollama.get("top_k").is_none() && ollama.get("repetition_penalty").is_none());
    }
}
