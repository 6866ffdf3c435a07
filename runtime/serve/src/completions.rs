//! OpenAI-compatible model serving: `GET /v1/models` and `POST
//! /v1/chat/completions`.
//!
//! A request is checked whole before it waits for the model: messages
//! (OpenAI wire format; `developer` is read as `system`; content parts
//! other than text are refused), tools (function objects whose
//! `parameters` is a JSON Schema), `tool_choice` (`auto`, `none`,
//! `required` or a named function that must be among the tools),
//! `response_format` (`text`, `json_object` or `json_schema`), sampling
//! and `stop`. Unknown fields are refused by name, so a typo is never
//! silently ignored; `n` other than 1 and `logprobs` are refused as not
//! supported.
//!
//! Generation runs on a context from a pool ([`Slots`]) so that a client
//! that sends the same conversation again reuses its prefix; it waits for
//! a place in [`crate::Admission`] first. Tool calls are made under the
//! runtime's grammar (lazily under `auto`), so their arguments follow the
//! tools' schemas; `parallel_tool_calls: false` holds the grammar to one call.
//!
//! Streaming sends `chat.completion.chunk`s: the role first, text as it
//! is generated (when no tools are offered; with tools the text is sent
//! once the turn is parsed, since what looks like text may turn out to be
//! a call), then each tool call whole, the finish reason, the usage when
//! `stream_options.include_usage` asks, and `[DONE]`. A client that goes
//! away stops the generation.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use stack_model::{
    BackendSession, CallCount, CompletionRequest, Generation, ModelBackend, ModelError,
    SamplingOptions, StopReason, ToolChoice, MAX_DRY_MULTIPLIER,
};
use stack_types::message::{Message, Role, ToolCall};

use crate::error::JsonBody;
use crate::{ApiError, AppState};

/// Idle model sessions for chat completions, reused so that a repeated
/// conversation prefix is not evaluated again: a request takes the idle
/// session whose last prompt shares the most with its own (a client
/// continuing a conversation sends it whole, so the session that ran its
/// last turn still holds that prefix), as llama-server picks a slot by
/// prompt similarity (a long system prompt or tool list shared is worth
/// keeping too). Where none shares anything: with a batched model or a
/// served one, a new session (the engine lends it the slot idle longest),
/// so that no other conversation's prefix is thrown away, up to
/// [`MAX_IDLE`] idle; else (each session a context of its own, its memory
/// too) the session idle longest.
pub(crate) struct Slots {
    backend: Arc<dyn ModelBackend>,
    /// Whether a new session costs no memory of its own.
    sessions_are_cheap: bool,
    /// Oldest first.
    idle: Mutex<Vec<Idle>>,
}

/// An idle session and the messages of the last request it ran (the
/// prompt its cache holds).
struct Idle {
    session: Box<dyn BackendSession>,
    served: Vec<Message>,
}

/// Most idle sessions kept for reuse.
const MAX_IDLE: usize = 8;

impl Slots {
    pub(crate) fn new(backend: Arc<dyn ModelBackend>) -> Slots {
        Slots {
            sessions_are_cheap: backend.info().capabilities.shared_context,
            backend,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// A session for a request with `messages`.
    async fn take(&self, messages: &[Message]) -> Result<Box<dyn BackendSession>, ModelError> {
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let served: Vec<&[Message]> = idle.iter().map(|i| i.served.as_slice()).collect();
            match most_alike(&served, messages) {
                Some((index, shared)) if shared > 0 => Some(idle.remove(index)),
                Some(_) if idle.len() >= MAX_IDLE || !self.sessions_are_cheap => {
                    Some(idle.remove(0))
                }
                _ => None,
            }
        };
        match idle {
            Some(Idle { session, .. }) => Ok(session),
            None => Arc::clone(&self.backend).open_session().await,
        }
    }

    /// `session` back, having run a request with `messages` (none where
    /// it was cancelled or failed: what its cache holds is not known).
    /// Past [`MAX_IDLE`], the one idle longest goes.
    fn give_back(&self, session: Box<dyn BackendSession>, messages: Vec<Message>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= MAX_IDLE {
            idle.remove(0);
        }
        idle.push(Idle {
            session,
            served: messages,
        });
    }
}

/// Which of the idle sessions (oldest first, each by the messages it last
/// ran) shares the most with a request of `messages`: the one whose
/// messages begin the request's with the most text (the latest of
/// equals), and how much it shares. `None` when there is none.
fn most_alike(served: &[&[Message]], messages: &[Message]) -> Option<(usize, usize)> {
    let shared = |last: &[Message]| -> usize {
        last.iter()
            .zip(messages)
            .take_while(|(a, b)| a == b)
            .map(|(message, _)| {
                message.content.as_ref().map_or(1, |content| {
                    serde_json::to_string(content).map_or(1, |s| s.len())
                })
            })
            .sum()
    };
    served
        .iter()
        .enumerate()
        .map(|(index, last)| (index, shared(last)))
        .max_by_key(|(index, score)| (*score, *index))
}

/// `GET /v1/models`: the one model this server runs.
pub(crate) async fn models(State(state): State<Arc<AppState>>) -> Response {
    let info = state.runtime.backend().info();
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": info.name,
            "object": "model",
            "created": 0,
            "owned_by": "stack-runtime",
            "meta": {
                "detail": info.detail,
                "context_length": info.context_length,
                "capabilities": info.capabilities,
            },
        }],
    }))
    .into_response()
}

/// The body of `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// Any name: the server runs one model (echoed back as its own name).
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation, in the OpenAI wire format.
    pub messages: Vec<Value>,
    /// Function tools.
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// `auto`, `none`, `required`, or `{"type": "function", "function": {"name": ...}}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Whether more than one call may come back (default true).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `{"type": "text" | "json_object" | "json_schema", ...}`.
    #[serde(default)]
    pub response_format: Option<Value>,
    /// Stream chunks as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// `{"include_usage": bool}`.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Sampling temperature (0 is greedy).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k sampling (an extension, as in llama-server and vLLM).
    #[serde(default)]
    pub top_k: Option<i32>,
    /// Min-p sampling (an extension).
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Repetition penalty (an extension).
    #[serde(default)]
    pub repeat_penalty: Option<f32>,
    /// DRY penalty multiplier, 0 = off, at most 1 (an extension, as in
    /// llama-server; by default 0.8 for a model under 1B parameters).
    #[serde(default)]
    pub dry_multiplier: Option<f32>,
    /// Most tokens to generate (older name; see `max_completion_tokens`).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Most tokens to generate; unset, until the model ends its turn or
    /// the context is full.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Random seed.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Choices to generate: only 1.
    #[serde(default)]
    pub n: Option<u32>,
    /// Up to 4 strings that end the answer.
    #[serde(default)]
    pub stop: Option<Value>,
    /// Presence penalty, -2 to 2 (0 is off).
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Frequency penalty, -2 to 2 (0 is off).
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Not supported when true.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Not supported.
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    /// Accepted and ignored (an end-user id).
    #[serde(default)]
    pub user: Option<String>,
    /// Accepted and ignored.
    #[serde(default)]
    pub metadata: Option<Value>,
    /// Accepted and ignored: nothing is stored.
    #[serde(default)]
    pub store: Option<bool>,
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// A checked request, ready for the model.
struct Prepared {
    request: CompletionRequest,
    stream: bool,
    include_usage: bool,
    stop: Vec<String>,
    streams_text: bool,
}

/// A seed for a request that names none: different for every request.
fn fresh_seed() -> u32 {
    use std::hash::BuildHasher;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // `RandomState` is keyed randomly per process and per instance.
    std::collections::hash_map::RandomState::new().hash_one(now) as u32
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

/// Checks a request and turns it into a [`CompletionRequest`].
fn prepare(request: ChatRequest, context: Option<u32>) -> Result<Prepared, ApiError> {
    if request.n.is_some_and(|n| n != 1) {
        return Err(bad("`n` must be 1: this server generates one choice"));
    }
    if request.logprobs == Some(true) || request.top_logprobs.is_some() {
        return Err(bad("`logprobs` is not supported by this server"));
    }
    for (name, value) in [
        ("presence_penalty", request.presence_penalty),
        ("frequency_penalty", request.frequency_penalty),
    ] {
        if value.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
            return Err(bad(format!("`{name}` must be between -2 and 2")));
        }
    }
    if request.messages.is_empty() {
        return Err(bad("`messages` is empty: send at least one message"));
    }
    let messages = request
        .messages
        .into_iter()
        .enumerate()
        .map(|(index, message)| parse_message(index, message))
        .collect::<Result<Vec<_>, _>>()?;
    let tools = request.tools.unwrap_or_default();
    let names = tools
        .iter()
        .enumerate()
        .map(|(index, tool)| check_tool(index, tool))
        .collect::<Result<Vec<_>, _>>()?;
    let tool_choice = match request.tool_choice {
        None => ToolChoice::Auto,
        Some(choice) => parse_tool_choice(&choice, &names)?,
    };
    if tools.is_empty() && matches!(tool_choice, ToolChoice::Required | ToolChoice::Named(_)) {
        return Err(bad(
            "`tool_choice` asks for a tool call but no `tools` are given",
        ));
    }
    let response_format = match request.response_format {
        None => None,
        Some(format) => parse_response_format(&format)?,
    };
    if response_format.is_some() && !tools.is_empty() && tool_choice == ToolChoice::Auto {
        return Err(bad("`response_format` together with `tools` under `tool_choice: auto` is not supported: send `tool_choice: none` for a JSON answer, or `required` for a call"));
    }
    let defaults = SamplingOptions::default();
    // Unset: until the model ends its turn or the context is full, as
    // OpenAI's and llama-server's (`n_predict: -1`); where the context is
    // not known (some served models), the library's default.
    let max_tokens = request
        .max_completion_tokens
        .or(request.max_tokens)
        .unwrap_or_else(|| context.unwrap_or(defaults.max_tokens));
    if max_tokens == 0 {
        return Err(bad("`max_tokens` must be at least 1"));
    }
    if let Some(context) = context {
        if max_tokens > context {
            return Err(bad(format!(
                "`max_tokens` is {max_tokens}, more than the model's context of {context} tokens"
            )));
        }
    }
    let temperature = request.temperature.unwrap_or(defaults.temperature);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad("`temperature` must be between 0 and 2"));
    }
    let top_p = request.top_p.unwrap_or(defaults.top_p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad("`top_p` must be in (0, 1]"));
    }
    if request.top_k.is_some_and(|k| k < 0) {
        return Err(bad("`top_k` must be 0 (off) or more"));
    }
    if request.min_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
        return Err(bad("`min_p` must be between 0 and 1"));
    }
    if request
        .repeat_penalty
        .is_some_and(|p| !(p > 0.0 && p <= 2.0))
    {
        return Err(bad("`repeat_penalty` must be in (0, 2]"));
    }
    if request
        .dry_multiplier
        .is_some_and(|m| !(0.0..=MAX_DRY_MULTIPLIER).contains(&m))
    {
        return Err(bad(format!(
            "`dry_multiplier` must be from 0 (off) to {MAX_DRY_MULTIPLIER}"
        )));
    }
    let stop = match request.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(one)) => vec![one],
        Some(Value::Array(many)) => many
            .into_iter()
            .map(|s| match s {
                Value::String(s) => Ok(s),
                _ => Err(bad("`stop` must be a string or an array of strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("`stop` must be a string or an array of strings")),
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(bad("`stop` takes at most 4 non-empty strings"));
    }
    let sampling = SamplingOptions {
        temperature,
        top_p,
        top_k: request.top_k.or(defaults.top_k),
        min_p: request.min_p.or(defaults.min_p),
        repeat_penalty: request.repeat_penalty.or(defaults.repeat_penalty),
        frequency_penalty: request.frequency_penalty.unwrap_or(0.0),
        presence_penalty: request.presence_penalty.unwrap_or(0.0),
        dry_multiplier: request.dry_multiplier.or(defaults.dry_multiplier),
        // A seed is any integer on the wire; the model takes 32 bits.
        // Without one each request samples anew, as OpenAI's and
        // llama-server's do (the library default is fixed, for tests).
        seed: request.seed.map_or_else(fresh_seed, |seed| seed as u32),
        max_tokens,
        calls_per_reply: if request.parallel_tool_calls == Some(false) {
            CallCount::One
        } else {
            CallCount::Many
        },
        ..defaults
    };
    let streams_text = tools.is_empty() || tool_choice == ToolChoice::None;
    let stream = request.stream.unwrap_or(false);
    if !stream && request.stream_options.is_some() {
        return Err(bad("`stream_options` is only for `stream: true`"));
    }
    Ok(Prepared {
        include_usage: request.stream_options.is_some_and(|o| o.include_usage),
        stream,
        stop,
        streams_text,
        request: CompletionRequest {
            messages,
            tools,
            tool_choice,
            sampling,
            response_format,
            argument_values: Default::default(),
        },
    })
}

/// One message of the request, with its index in errors.
fn parse_message(index: usize, mut message: Value) -> Result<Message, ApiError> {
    if let Some(role) = message.get_mut("role") {
        if role == "developer" {
            *role = json!("system");
        }
    }
    let parsed: Message =
        serde_json::from_value(message).map_err(|e| bad(format!("messages[{index}]: {e}")))?;
    if let Some(stack_types::message::Content::Parts(parts)) = &parsed.content {
        for part in parts {
            if let stack_types::message::ContentPart::Other(other) = part {
                let kind = other
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown");
                return Err(bad(format!(
                    "messages[{index}]: content of type `{kind}` is not supported (text only)"
                )));
            }
        }
    }
    match parsed.role {
        Role::Tool if parsed.tool_call_id.is_none() => Err(bad(format!(
            "messages[{index}]: a `tool` message needs `tool_call_id`"
        ))),
        Role::User | Role::System if parsed.content.is_none() => Err(bad(format!(
            "messages[{index}]: a `{}` message needs `content`",
            if parsed.role == Role::User {
                "user"
            } else {
                "system"
            }
        ))),
        _ => Ok(parsed),
    }
}

/// A tool's name, once the tool is a function object with a valid name
/// and a JSON Schema for its parameters.
fn check_tool(index: usize, tool: &Value) -> Result<String, ApiError> {
    let at = |what: &str| bad(format!("tools[{index}]: {what}"));
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(at("only `\"type\": \"function\"` tools are supported"));
    }
    let function = tool
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| at("`function` must be an object"))?;
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| at("`function.name` must be a string"))?;
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(at(
            "`function.name` must be 1-64 letters, digits, `_` or `-`",
        ));
    }
    match function.get("parameters") {
        None => Ok(name.to_string()),
        Some(schema @ Value::Object(_)) => {
            check_bounds(schema).map_err(|e| at(&format!("`function.parameters`: {e}")))?;
            Ok(name.to_string())
        }
        Some(_) => Err(at("`function.parameters` must be a JSON Schema object")),
    }
}

fn parse_tool_choice(choice: &Value, names: &[String]) -> Result<ToolChoice, ApiError> {
    let named = |name: &str| {
        if names.iter().any(|n| n == name) {
            Ok(ToolChoice::Named(name.to_string()))
        } else {
            Err(bad(format!(
                "`tool_choice` names `{name}`, which is not among the `tools`"
            )))
        }
    };
    match choice {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(ToolChoice::Auto),
            "none" => Ok(ToolChoice::None),
            "required" => Ok(ToolChoice::Required),
            other => Err(bad(format!(
                "`tool_choice` is `{other}`; expected auto, none, required or a function object"
            ))),
        },
        Value::Object(object) => {
            match object
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
            {
                Some(name) => named(name),
                None => Err(bad(
                    "`tool_choice` as an object is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                )),
            }
        }
        _ => Err(bad("`tool_choice` must be a string or an object")),
    }
}

/// The largest repetition bound a client's schema may set: the grammar a
/// schema becomes spells bounded repetitions out, so a bound of millions
/// would cost the server memory and minutes to build; llama.cpp's grammar
/// parser refuses a repetition above 2000 itself, so a larger bound is
/// refused here, before the request waits for the model.
const MAX_SCHEMA_BOUND: u64 = 2000;

/// Refuses a schema whose length or count bounds exceed
/// [`MAX_SCHEMA_BOUND`], or that nests deeper than 32 levels.
fn check_bounds(schema: &Value) -> Result<(), String> {
    fn walk(value: &Value, depth: usize) -> Result<(), String> {
        if depth > 32 {
            return Err("the schema nests deeper than 32 levels".into());
        }
        match value {
            Value::Object(map) => {
                for (key, inner) in map {
                    let bound = matches!(
                        key.as_str(),
                        "minLength"
                            | "maxLength"
                            | "minItems"
                            | "maxItems"
                            | "minProperties"
                            | "maxProperties"
                    );
                    if bound && inner.as_u64().is_some_and(|n| n > MAX_SCHEMA_BOUND) {
                        return Err(format!("`{key}` above {MAX_SCHEMA_BOUND} is not supported"));
                    }
                    walk(inner, depth + 1)?;
                }
                Ok(())
            }
            Value::Array(items) => items.iter().try_for_each(|item| walk(item, depth + 1)),
            _ => Ok(()),
        }
    }
    walk(schema, 0)
}

/// The JSON Schema an answer must follow, if any.
fn parse_response_format(format: &Value) -> Result<Option<Value>, ApiError> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "object"}))),
        Some("json_schema") => match format.pointer("/json_schema/schema") {
            Some(schema @ Value::Object(_)) => {
                check_bounds(schema)
                    .map_err(|e| bad(format!("`response_format.json_schema.schema`: {e}")))?;
                Ok(Some(schema.clone()))
            }
            _ => Err(bad(
                "`response_format.json_schema.schema` must be a JSON Schema object",
            )),
        },
        _ => Err(bad(
            "`response_format.type` must be text, json_object or json_schema",
        )),
    }
}

/// Watches generated text for stop strings; holds back the end of the text
/// that could be the start of one, so that no stop string is ever sent.
struct StopWatch {
    stops: Vec<String>,
    text: String,
    sent: usize,
    stopped_at: Option<usize>,
}

impl StopWatch {
    fn new(stops: Vec<String>) -> StopWatch {
        StopWatch {
            stops,
            text: String::new(),
            sent: 0,
            stopped_at: None,
        }
    }

    /// Adds a piece; returns the text now safe to send.
    fn push(&mut self, piece: &str) -> String {
        if self.stopped_at.is_some() {
            return String::new();
        }
        self.text.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|stop| self.text.find(stop.as_str()))
            .min()
        {
            self.stopped_at = Some(at);
            return self.release(at);
        }
        // Hold back a tail that may yet become a stop string.
        let hold = self
            .stops
            .iter()
            .map(|stop| {
                (1..stop.len())
                    .rev()
                    .find(|&n| stop.is_char_boundary(n) && self.text.ends_with(&stop[..n]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let upto = self.text.len() - hold;
        self.release(upto)
    }

    fn release(&mut self, upto: usize) -> String {
        let upto = upto.max(self.sent);
        let out = self
            .text
            .get(self.sent..upto)
            .unwrap_or_default()
            .to_string();
        self.sent = upto;
        out
    }

    /// The rest of the text, once generation ended.
    fn finish(&mut self) -> String {
        let end = self.stopped_at.unwrap_or(self.text.len());
        self.release(end)
    }

    fn stopped(&self) -> bool {
        self.stopped_at.is_some()
    }

    /// The answer once a stop string matched: the text before it.
    fn before_stop(&self) -> Option<&str> {
        self.stopped_at.and_then(|at| self.text.get(..at))
    }
}

/// Sets the flag when dropped: a client that goes away (its request
/// dropped) stops the generation it started.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// What generation produced, as the response needs it.
struct Finished {
    content: Option<String>,
    tool_calls: Vec<ToolCall>,
    finish_reason: &'static str,
    usage: Value,
}

static COMPLETIONS: AtomicU64 = AtomicU64::new(0);

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<ChatRequest>,
) -> Result<Response, ApiError> {
    if state.draining.is_cancelled() {
        return Err(ApiError::ShuttingDown);
    }
    let info = state.runtime.backend().info();
    let prepared = prepare(body, info.context_length)?;
    let place = state.admission.enter().await?;
    let mut session = state
        .slots
        .take(&prepared.request.messages)
        .await
        .map_err(|e| ApiError::Internal(format!("opening a model context: {e}")))?;
    let id = format!(
        "chatcmpl-{:x}{:04x}",
        stack_core::policy::audit::now_ms(),
        COMPLETIONS.fetch_add(1, Ordering::Relaxed) & 0xffff
    );
    let created = stack_core::policy::audit::now_ms() / 1000;
    let cancel = Arc::new(AtomicBool::new(false));
    let (deltas, mut pieces) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (done_tx, done) = tokio::sync::oneshot::channel();
    // The generation runs in a task of its own that owns the context and
    // the place: whatever becomes of the client, the context goes back to
    // the pool and the place is freed when generation ends.
    {
        let (state, cancel, request) = (
            Arc::clone(&state),
            Arc::clone(&cancel),
            prepared.request.clone(),
        );
        let request_messages = request.messages.clone();
        let shutdown = state.shutdown.clone();
        tokio::spawn(async move {
            let stopper = {
                let cancel = Arc::clone(&cancel);
                tokio::spawn(async move {
                    shutdown.cancelled().await;
                    cancel.store(true, Ordering::SeqCst);
                })
            };
            let result = session.complete(request, deltas, cancel).await;
            stopper.abort();
            if let Ok(generation) = &result {
                // The model's own time, not the wait for its thread.
                state
                    .metrics
                    .count_generation(generation.counters, generation.model_ms() / 1000.0);
            }
            // A context that failed for its own reasons (its thread gone, a
            // decode that failed) is not given to the next request; one
            // that refused this request's input still works.
            match &result {
                Err(err) if !is_request_fault(err) => {
                    tracing::warn!(%err, "a model context failed; it is dropped from the pool");
                }
                Ok(generation) if generation.stop != StopReason::Cancelled => {
                    state.slots.give_back(session, request_messages)
                }
                _ => state.slots.give_back(session, Vec::new()),
            }
            state.metrics.count_completion();
            drop(place);
            let _ = done_tx.send(result);
        });
    }
    let guard = CancelOnDrop(Arc::clone(&cancel));
    // Stop strings end an answer; with tools offered the text may be a
    // call, which a stop string must not cut.
    let mut watch = StopWatch::new(if prepared.streams_text {
        prepared.stop.clone()
    } else {
        Vec::new()
    });
    let model = info.name;
    if !prepared.stream {
        while let Some(piece) = pieces.recv().await {
            watch.push(&piece);
            if watch.stopped() {
                cancel.store(true, Ordering::SeqCst);
            }
        }
        let generation = done
            .await
            .map_err(|_| ApiError::Internal("the generation task failed".into()))?
            .map_err(model_error)?;
        drop(guard);
        // Cancelled, and not by a stop string: the server is stopping, and
        // the answer is cut short rather than finished.
        if generation.stop == StopReason::Cancelled && !watch.stopped() {
            return Err(ApiError::ShuttingDown);
        }
        let finished = finish(&generation, &watch, &prepared);
        let mut message = json!({"role": "assistant", "content": finished.content});
        if !finished.tool_calls.is_empty() {
            message["tool_calls"] = json!(finished.tool_calls);
        }
        return Ok(axum::Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finished.finish_reason}],
            "usage": finished.usage,
        }))
        .into_response());
    }
    let (events, receiver) = tokio::sync::mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let _guard = guard;
        let chunk = |delta: Value, finish: Option<&str>| {
            SseEvent::default().data(
                json!({
                    "id": id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                })
                .to_string(),
            )
        };
        // A send that fails means the client went away: the guard then
        // stops the generation.
        if events
            .send(chunk(json!({"role": "assistant", "content": ""}), None))
            .await
            .is_err()
        {
            return;
        }
        loop {
            // With tools offered nothing is sent while the model writes,
            // so a client that goes away is noticed by its closed stream,
            // not by a failed send: the guard then stops the generation.
            let piece = tokio::select! {
                piece = pieces.recv() => piece,
                () = events.closed() => return,
            };
            let Some(piece) = piece else { break };
            let text = watch.push(&piece);
            if watch.stopped() {
                cancel.store(true, Ordering::SeqCst);
            }
            if prepared.streams_text
                && !text.is_empty()
                && events
                    .send(chunk(json!({"content": text}), None))
                    .await
                    .is_err()
            {
                return;
            }
        }
        let generation = match done.await {
            Ok(Ok(generation)) => generation,
            Ok(Err(err)) => {
                let _ = events
                    .send(SseEvent::default().data(model_error(err).body().to_string()))
                    .await;
                return;
            }
            Err(_) => return,
        };
        if generation.stop == StopReason::Cancelled && !watch.stopped() {
            let _ = events
                .send(SseEvent::default().data(ApiError::ShuttingDown.body().to_string()))
                .await;
            return;
        }
        // The end held back in case it began a stop string.
        let tail = watch.finish();
        if prepared.streams_text && !tail.is_empty() {
            let _ = events.send(chunk(json!({"content": tail}), None)).await;
        }
        let finished = finish(&generation, &watch, &prepared);
        if let Some(content) = finished.content.filter(|c| !c.is_empty()) {
            if !prepared.streams_text {
                let _ = events.send(chunk(json!({"content": content}), None)).await;
            }
        }
        for (index, call) in finished.tool_calls.iter().enumerate() {
            let delta = json!({"tool_calls": [{
                "index": index,
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }]});
            let _ = events.send(chunk(delta, None)).await;
        }
        let _ = events
            .send(chunk(json!({}), Some(finished.finish_reason)))
            .await;
        if prepared.include_usage {
            let _ = events
                .send(
                    SseEvent::default().data(
                        json!({
                            "id": id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": finished.usage,
                        })
                        .to_string(),
                    ),
                )
                .await;
        }
        let _ = events.send(SseEvent::default().data("[DONE]")).await;
    });
    Ok(crate::sse_response(receiver))
}

/// The response's content, calls, finish reason and usage.
fn finish(generation: &Generation, watch: &StopWatch, prepared: &Prepared) -> Finished {
    let counters = generation.counters;
    // The request's prompt: what was evaluated or reused of it, without
    // the routing step's own prompts.
    let prompt_tokens = (counters.prompt_evaluated + counters.prompt_reused)
        .saturating_sub(generation.routing_prompt_evaluated);
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": counters.generated,
        "total_tokens": prompt_tokens + counters.generated,
        "prompt_tokens_details": {"cached_tokens": counters.prompt_reused},
    });
    // A stop string ends the answer where it starts; what came before it
    // is the answer's text, whatever a parser would have made of the rest.
    if let Some(content) = watch.before_stop() {
        return Finished {
            content: Some(content.to_string()),
            tool_calls: Vec::new(),
            finish_reason: "stop",
            usage,
        };
    }
    let mut tool_calls = generation.turn.tool_calls.clone();
    if prepared.request.sampling.calls_per_reply == CallCount::One {
        tool_calls.truncate(1);
    }
    let content = if prepared.streams_text {
        Some(generation.text.clone())
    } else {
        generation.turn.content.clone()
    };
    let finish_reason = if !tool_calls.is_empty() {
        "tool_calls"
    } else if generation.stop == StopReason::MaxTokens {
        "length"
    } else {
        "stop"
    };
    Finished {
        content: if tool_calls.is_empty() {
            Some(content.unwrap_or_default())
        } else {
            content.filter(|c| !c.trim().is_empty())
        },
        tool_calls,
        finish_reason,
        usage,
    }
}

/// Whether a model failure is the request's fault (the prompt does not
/// fit, a schema the grammar cannot take, messages the template cannot
/// render), not the model's.
fn is_request_fault(err: &ModelError) -> bool {
    matches!(
        err,
        ModelError::ContextFull { .. } | ModelError::Grammar(_) | ModelError::Template(_)
    ) || err.is_context_overflow()
}

/// A model failure as the client sees it: its own fault is a `400`, with
/// OpenAI's `context_length_exceeded` code where the prompt does not fit.
pub(crate) fn model_error(err: ModelError) -> ApiError {
    if matches!(err, ModelError::ContextFull { .. }) || err.is_context_overflow() {
        ApiError::ContextLength(err.to_string())
    } else if is_request_fault(&err) {
        ApiError::BadRequest(err.to_string())
    } else {
        ApiError::Internal(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_never_sent_even_split_across_pieces() {
        let mut watch = StopWatch::new(vec!["END".into()]);
        let mut sent = String::new();
        for piece in ["Hello E", "N", "D and more"] {
            sent.push_str(&watch.push(piece));
        }
        sent.push_str(&watch.finish());
        assert_eq!(sent, "Hello ");
        assert!(watch.stopped());
        let mut watch = StopWatch::new(vec!["END".into()]);
        let mut sent = watch.push("Hello E");
        sent.push_str(&watch.push("ntry"));
        sent.push_str(&watch.finish());
        assert_eq!(sent, "Hello Entry");
        assert!(!watch.stopped());
    }

    #[test]
    fn a_request_takes_the_idle_session_whose_last_prompt_it_continues() {
        let system = Message::system("You are terse.");
        let a = vec![system.clone(), Message::user("Tell me about the sea.")];
        let b = vec![system.clone(), Message::user("Tell me about a mountain.")];
        let mut a_next = a.clone();
        a_next.push(Message::assistant("It is wide."));
        a_next.push(Message::user("And deep?"));
        let other = vec![Message::user("Hi")];
        let served: Vec<&[Message]> = vec![&a, &b, &other];
        // A's next turn continues A: A's session, sharing all of A.
        let (index, shared) = most_alike(&served, &a_next).expect("some");
        assert_eq!(index, 0);
        let (_, only_system) = most_alike(&served, &b[..1]).expect("some");
        assert!(shared > only_system, "{shared} > {only_system}");
        // B itself: B's session (the system prompt alone is in A's too).
        assert_eq!(most_alike(&served, &b).map(|(i, _)| i), Some(1));
        // Nothing in common: shares nothing (the caller opens a new one).
        let (_, none) = most_alike(&served, &[Message::user("Bye")]).expect("some");
        assert_eq!(none, 0);
        assert_eq!(most_alike(&[], &a), None);
        // Of equals, the latest.
        let served: Vec<&[Message]> = vec![&a, &a];
        assert_eq!(most_alike(&served, &a_next).map(|(i, _)| i), Some(1));
    }

    #[test]
    fn a_request_without_a_seed_samples_anew_and_one_call_is_asked_for_by_its_flag() {
        let prepared = |body: Value| {
            let request: ChatRequest = serde_json::from_value(body).expect("a request");
            prepare(request, Some(2048))
                .expect("valid")
                .request
                .sampling
        };
        let user = json!([{"role": "user", "content": "hi"}]);
        let seeds: std::collections::HashSet<u32> = (0..4)
            .map(|_| prepared(json!({"messages": user})).seed)
            .collect();
        assert_eq!(seeds.len(), 4, "a fresh seed for each request: {seeds:?}");
        assert_eq!(prepared(json!({"messages": user, "seed": 7})).seed, 7);
        let penalised =
            prepared(json!({"messages": user, "presence_penalty": 0.5, "frequency_penalty": -1.5}));
        assert_eq!(
            (penalised.presence_penalty, penalised.frequency_penalty),
            (0.5, -1.5)
        );
        let request: ChatRequest =
            serde_json::from_value(json!({"messages": user, "presence_penalty": 2.5}))
                .expect("a request");
        let refused = prepare(request, Some(2048)).err().expect("out of range");
        assert!(
            refused.to_string().contains("between -2 and 2"),
            "{refused}"
        );
        assert_eq!(
            prepared(json!({"messages": user})).calls_per_reply,
            CallCount::Many
        );
        assert_eq!(
            prepared(json!({"messages": user, "parallel_tool_calls": false})).calls_per_reply,
            CallCount::One
        );
        // Without `max_tokens`: until the context is full (OpenAI,
        // llama-server), not a fixed 512; where the context is unknown,
        // the library's default.
        assert_eq!(prepared(json!({"messages": user})).max_tokens, 2048);
        assert_eq!(
            prepared(json!({"messages": user, "max_completion_tokens": 9})).max_tokens,
            9
        );
        let request: ChatRequest =
            serde_json::from_value(json!({"messages": user})).expect("a request");
        let unknown = prepare(request, None).expect("valid").request.sampling;
        assert_eq!(unknown.max_tokens, SamplingOptions::default().max_tokens);
        // Unset sampling extensions stay unset: the backend's own defaults.
        let unset = prepared(json!({"messages": user}));
        assert_eq!(
            (unset.top_k, unset.min_p, unset.repeat_penalty),
            (None, None, None)
        );
        assert_eq!(
            prepared(json!({"messages": user, "top_k": 20})).top_k,
            Some(20)
        );
        let overflow = model_error(ModelError::ContextFull {
            needed: 5000,
            context: 4096,
        });
        assert_eq!(overflow.status().as_u16(), 400);
        assert_eq!(overflow.body()["error"]["code"], "context_length_exceeded");
    }

    #[test]
    fn requests_are_checked_before_they_reach_the_model() {
        let parse = |body: Value| {
            let request: ChatRequest = serde_json::from_value(body).map_err(|e| e.to_string())?;
            prepare(request, Some(2048))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let user = json!([{"role": "user", "content": "hi"}]);
        assert!(parse(json!({"messages": user})).is_ok());
        let cases = [
            (
                json!({"messages": user, "temprature": 0}),
                "unknown field `temprature`",
            ),
            (json!({"messages": []}), "`messages` is empty"),
            (
                json!({"messages": [{"role": "wizard", "content": "x"}]}),
                "messages[0]",
            ),
            (
                json!({"messages": [{"role": "tool", "content": "x"}]}),
                "tool_call_id",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
                "`image_url` is not supported",
            ),
            (json!({"messages": user, "n": 2}), "`n` must be 1"),
            (
                json!({"messages": user, "tools": [{"type": "function", "function": {"name": "bad name"}}]}),
                "tools[0]",
            ),
            (
                json!({"messages": user, "tools": [{"type": "function", "function": {"name": "a"}}], "tool_choice": {"type": "function", "function": {"name": "b"}}}),
                "not among the `tools`",
            ),
            (
                json!({"messages": user, "tool_choice": "required"}),
                "no `tools` are given",
            ),
            (
                json!({"messages": user, "response_format": {"type": "yaml"}}),
                "response_format.type",
            ),
            (
                json!({"messages": user, "max_tokens": 100000}),
                "more than the model's context",
            ),
            (json!({"messages": user, "stop": ["", "x"]}), "non-empty"),
            (
                json!({"messages": user, "temperature": 9}),
                "between 0 and 2",
            ),
            (
                json!({"messages": user, "repeat_penalty": 0}),
                "repeat_penalty",
            ),
            (
                json!({"messages": user, "dry_multiplier": -1}),
                "`dry_multiplier` must be from 0",
            ),
            (
                json!({"messages": user, "dry_multiplier": 50}),
                "`dry_multiplier` must be from 0",
            ),
            (
                json!({"messages": user, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "minItems": 100000000}}}}),
                "`minItems` above",
            ),
        ];
        for (body, expected) in cases {
            let err = parse(body.clone()).expect_err(&body.to_string());
            assert!(err.contains(expected), "{body}: {err}");
        }
    }
}
