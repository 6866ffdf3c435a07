//! The model-backend seam: what the agent loop needs from a model, and
//! nothing about how it runs. The in-process llama.cpp backend ([`Model`]
//! with feature `llama`) is one implementation; a served model behind an
//! OpenAI-compatible API is another; tests may script one.
//!
//! A backend opens sessions. A session renders the conversation and
//! generates the next assistant turn, streaming text deltas as they come,
//! and keeps whatever state makes the next turn cheaper (a KV cache). The
//! loop parses tool calls out of the turn (or takes the backend's native
//! ones) and never learns which backend it talks to.
//!
//! [`Model`]: crate::llama::Model

use stack_seal::StateFile;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::Value;

use crate::call_grammar::CallCount;
use crate::grammar::{ArgumentValues, ToolChoice};
use crate::template::TemplateError;
use crate::toolcall::ParsedTurn;
use stack_types::message::Message;

/// Why the model could not load or generate.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model file does not exist.
    #[error("model file {0} does not exist (run scripts/setup for the default model)")]
    NotFound(PathBuf),
    /// The file is not a GGUF model.
    #[error("{path} is not a GGUF model (it starts with {magic:?}, not \"GGUF\")")]
    NotGguf {
        /// The file.
        path: PathBuf,
        /// Its first bytes.
        magic: String,
    },
    /// llama.cpp refused the file.
    #[error("llama.cpp could not load {path}: {reason} (is the file truncated or corrupt?)")]
    Load {
        /// The file.
        path: PathBuf,
        /// What llama.cpp said.
        reason: String,
    },
    /// The backend or a context could not be created.
    #[error("llama.cpp: {0}")]
    Backend(String),
    /// The prompt could not be rendered.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The prompt does not fit in the context.
    #[error("the prompt is {needed} tokens, more than the context of {context} tokens; start a new session or raise the context size")]
    ContextFull {
        /// Tokens needed.
        needed: usize,
        /// The context size.
        context: u32,
    },
    /// Decoding failed.
    #[error("decoding failed: {0}")]
    Decode(String),
    /// The tool grammar could not be built.
    #[error("building the tool-call grammar failed: {0}")]
    Grammar(String),
    /// A served model failed (see [`crate::remote`]).
    #[cfg(feature = "remote")]
    #[error(transparent)]
    Remote(crate::remote::RemoteError),
}

impl ModelError {
    /// Whether the conversation no longer fits the model's context (in
    /// process or on a server): the last message cannot be answered.
    pub fn is_context_overflow(&self) -> bool {
        match self {
            ModelError::ContextFull { .. } => true,
            #[cfg(feature = "remote")]
            ModelError::Remote(crate::remote::RemoteError::ContextExceeded { .. }) => true,
            _ => false,
        }
    }
}

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingOptions {
    /// Temperature; 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling.
    pub top_p: f32,
    /// Top-k sampling (0 = off); `None` is the backend's default:
    /// [`DEFAULT_TOP_K`] in process and for llama-server, the server's
    /// own (the model's `generation_config.json`) for vLLM and SGLang.
    #[serde(default)]
    pub top_k: Option<i32>,
    /// Min-p sampling; `None` is the backend's default, as for `top_k`
    /// ([`DEFAULT_MIN_P`] in process).
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Repetition penalty (1 = off); `None` is the backend's default, as
    /// for `top_k` ([`DEFAULT_REPEAT_PENALTY`] in process).
    #[serde(default)]
    pub repeat_penalty: Option<f32>,
    /// OpenAI's frequency penalty (0 = off, -2 to 2): a token's logit
    /// loses this much for each time it appeared among the last 64 tokens
    /// (llama.cpp's penalties sampler, in process).
    #[serde(default)]
    pub frequency_penalty: f32,
    /// OpenAI's presence penalty (0 = off, -2 to 2): a token's logit loses
    /// this much once it appeared among the last 64 tokens.
    #[serde(default)]
    pub presence_penalty: f32,
    /// DRY ("don't repeat yourself") penalty, 0 = off, `None` = the
    /// model's default: [`DEFAULT_DRY_MULTIPLIER`] for an in-process model
    /// of fewer than [`SMALL_MODEL_PARAMETERS`] parameters, off for a
    /// larger one (as in llama.cpp, whose default is off; code repeats
    /// itself by nature) and for a served model (its server samples).
    ///
    /// A token that would extend a repeat of what this step has already
    /// written loses `dry_multiplier × 1.75^(n − 2)` from its logit, `n`
    /// being the length of the repeat it would extend (llama.cpp's DRY sampler
    /// with its default base, allowed length and sequence breakers: a
    /// newline, `:`, `"` and `*`). Only the step's own tokens count, never
    /// the prompt. Inside JSON arguments a newline is the two characters
    /// `\n`, which do not break a repeat, but the `"` of an escaped quote
    /// and the `:` of a URL do. A small model's greedy arguments otherwise
    /// loop until the token limit (`"path": "mnpu…,mnpu…,mnpu…`), and a
    /// call cut off there is never parsed.
    #[serde(default)]
    pub dry_multiplier: Option<f32>,
    /// Random seed.
    pub seed: u32,
    /// Most tokens to generate in one turn.
    pub max_tokens: u32,
    /// How the model decides, under `tool_choice: auto`, whether to call a
    /// tool and which.
    #[serde(default)]
    pub routing: Routing,
    /// How a step under a grammar asks the grammar (in process).
    #[serde(default)]
    pub grammar_check: GrammarCheck,
    /// How many tool calls one reply may make (OpenAI's
    /// `parallel_tool_calls`, true by default): under
    /// [`CallCount::One`] the call grammar closes the reply after its
    /// first call, and a served model is sent `parallel_tool_calls: false`.
    #[serde(default)]
    pub calls_per_reply: CallCount,
}

/// How a grammar-constrained step asks its grammar which token may come
/// next (in process; a served model's server samples).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrammarCheck {
    /// The rest of the sampler chain (penalties, DRY, temperature) picks
    /// a token from the whole vocabulary first, and the grammar is asked
    /// about that one token; only where it refuses is every token put to
    /// the grammar and the pick made again, among those it allows
    /// (llama.cpp's `common_sampler_sample`). Under greedy decoding this
    /// picks the token [`GrammarCheck::EveryToken`] picks, since the
    /// grammar only takes tokens away. Sampled, it picks each allowed
    /// token as often as `EveryToken` does where the chain keeps every
    /// token (a first pick the grammar allows is taken with its share of
    /// the whole, the rest with their share of the allowed); top-k, top-p
    /// and min-p cut the whole vocabulary short on the first pick, not the
    /// allowed tokens, so with them it differs slightly.
    #[default]
    PickedFirst,
    /// Every token of the vocabulary is put to the grammar at every step,
    /// before the rest of the chain (49,152 tokens for SmolLM2).
    EveryToken,
}

/// How the decision to call a tool is made under `tool_choice: auto`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// `Constrained` on an in-process model of fewer than
    /// [`SMALL_MODEL_PARAMETERS`] parameters, which seldom decides to call
    /// on its own (SmolLM2-135M: no call in 30 BFCL prompts that need
    /// one), whose routing step is cheap, and whose context (its own, or
    /// the batched engine's with `--parallel`) holds a KV sequence aside
    /// for it; `Free` for a larger model (it decides well, and the step
    /// would cost seconds) and for a served model.
    #[default]
    Auto,
    /// The model writes a call when it chooses to (the lazy grammar makes
    /// it valid once started).
    Free,
    /// A constrained step decides first, on a user's message. Whether a
    /// tool fits: for each tool, how much likelier the model finds the
    /// message after a system message that tells of that tool than after
    /// one that tells of none (a noisy-channel score, in nats); with less
    /// than `ROUTING_EVIDENCE_NATS` for every tool, the step goes on as
    /// under `Free`. Which: the tool whose name the model finds likeliest
    /// to open a call, weighed with that evidence and with the words and
    /// enumerated values of the tool that the message names; its
    /// arguments are generated under its schema. In process only; a
    /// served model decides as under `Free`.
    Constrained,
}

/// Below this many parameters an in-process model routes under
/// [`Routing::Auto`] as under [`Routing::Constrained`].
pub const SMALL_MODEL_PARAMETERS: u64 = 1_000_000_000;

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions {
            temperature: 0.7,
            top_p: 0.9,
            top_k: None,
            min_p: None,
            repeat_penalty: None,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            dry_multiplier: None,
            seed: 42,
            max_tokens: 512,
            routing: Routing::Auto,
            grammar_check: GrammarCheck::PickedFirst,
            calls_per_reply: CallCount::Many,
        }
    }
}

/// Top-k where none is asked for, in process and for llama-server (as
/// llama.cpp's own default).
pub const DEFAULT_TOP_K: i32 = 40;
/// Min-p where none is asked for, in process and for llama-server (as
/// llama.cpp's own default).
pub const DEFAULT_MIN_P: f32 = 0.05;
/// The repetition penalty where none is asked for, in process and for
/// llama-server: a small model left at llama.cpp's 1.0 repeats itself.
pub const DEFAULT_REPEAT_PENALTY: f32 = 1.1;

impl SamplingOptions {
    /// Top-k as the runtime samples (in process, llama-server).
    pub fn top_k_or_default(&self) -> i32 {
        self.top_k.unwrap_or(DEFAULT_TOP_K)
    }

    /// Min-p as the runtime samples (in process, llama-server).
    pub fn min_p_or_default(&self) -> f32 {
        self.min_p.unwrap_or(DEFAULT_MIN_P)
    }

    /// The repetition penalty as the runtime samples (in process,
    /// llama-server).
    pub fn repeat_penalty_or_default(&self) -> f32 {
        self.repeat_penalty.unwrap_or(DEFAULT_REPEAT_PENALTY)
    }
}

/// The DRY multiplier a small in-process model samples with unless told
/// otherwise (see [`SamplingOptions::dry_multiplier`]).
pub const DEFAULT_DRY_MULTIPLIER: f32 = 0.8;

/// The largest DRY multiplier the CLI and the HTTP service take. llama.cpp
/// caps the penalty's power of the base at the largest finite float, so a
/// multiplier above 1 could make a long forced repeat (one a grammar
/// allows alone) an infinite penalty, and the step a dead end.
pub const MAX_DRY_MULTIPLIER: f32 = 1.0;

/// Token counters, for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Prompt tokens run through the model.
    pub prompt_evaluated: u64,
    /// Prompt tokens reused from the KV cache.
    pub prompt_reused: u64,
    /// Tokens generated.
    pub generated: u64,
}

impl Counters {
    /// Adds `other` to these counters.
    pub fn add(&mut self, other: Counters) {
        self.prompt_evaluated += other.prompt_evaluated;
        self.prompt_reused += other.prompt_reused;
        self.generated += other.generated;
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model ended its turn.
    EndOfTurn,
    /// The token budget ran out.
    MaxTokens,
    /// The caller stopped it.
    Cancelled,
    /// The tool-call grammar allowed no token the model could continue
    /// with (every candidate after a trigger broke it).
    GrammarDeadEnd,
}

/// How a turn's tool calls came to be, for the event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallPath {
    /// Generated under the runtime's tool-call grammar: valid by
    /// construction (in process, or llama-server on the prompted path).
    Grammar,
    /// Returned by the server as native `tool_calls` under OpenAI `strict`
    /// schemas.
    Strict,
    /// Generated under the structural tag the runtime sent (vLLM, SGLang):
    /// a Hermes call's arguments held to its tool's schema by the server,
    /// returned as native `tool_calls` (or, where the server has no tool
    /// parser and the tools went in the prompt, parsed from the text by
    /// the runtime). (A model
    /// that writes calls in another syntax never opens the tag; its calls
    /// are validated like any other.)
    StructuralTag,
    /// A forced call (`required` or a named tool) on a server with no tool
    /// parser: the tools went in the prompt, the reply was held to the
    /// call's JSON schema by a `response_format` the runtime sent, and the
    /// runtime read the call from the text.
    JsonSchema,
    /// Returned by the server as native `tool_calls`, then validated.
    Native,
    /// Recovered from the text by the runtime's parsers, then validated.
    Parsed,
}

/// One generated turn.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The raw text.
    pub text: String,
    /// Content and tool calls parsed from it.
    pub turn: ParsedTurn,
    /// Why it stopped.
    pub stop: StopReason,
    /// This turn's counters: everything the model evaluated for it, the
    /// routing step's own prompts included.
    pub counters: Counters,
    /// Of `counters.prompt_evaluated`, the tokens of the routing step's own
    /// prompts (its evidence prompts and the names it scored; see
    /// [`Routing::Constrained`]): work done for the turn that is not its
    /// prompt, which an OpenAI `usage` leaves out. 0 without that step.
    pub routing_prompt_evaluated: u64,
    /// Milliseconds spent on the prompt (a served model: until its first
    /// token came), the conversation's prompt that a routing step
    /// evaluates for the step to reuse included.
    pub prompt_ms: f64,
    /// Milliseconds spent on the rest of the constrained routing step (see
    /// [`Routing::Constrained`]; in process only): its evidence prompts,
    /// and the tools' names scored after the conversation.
    pub routing_ms: f64,
    /// Milliseconds spent generating.
    pub generation_ms: f64,
    /// Of [`Generation::generation_ms`], the milliseconds spent picking
    /// tokens: the sampler chain and the call grammar (in process only;
    /// the rest is the model's forward passes, detokenizing and making
    /// the step's sampler).
    pub sampling_ms: f64,
    /// How the tool calls came to be (`None` when there are none).
    pub call_path: Option<CallPath>,
    /// Milliseconds a server reports spending on this turn (prompt and
    /// generation; llama-server's `timings`), so a caller can tell the
    /// server's time from the network's and the runtime's. `None` in
    /// process or when the server does not say.
    pub server_ms: Option<f64>,
}

impl Generation {
    /// The model's own time: its prompt, routing and generation (not the
    /// wait for its thread or a slot).
    pub fn model_ms(&self) -> f64 {
        self.prompt_ms + self.routing_ms + self.generation_ms
    }

    /// A generation that produced nothing (a step that was skipped).
    pub fn empty() -> Self {
        Generation {
            turn: ParsedTurn {
                content: None,
                tool_calls: Vec::new(),
            },
            text: String::new(),
            stop: StopReason::EndOfTurn,
            counters: Counters::default(),
            routing_prompt_evaluated: 0,
            prompt_ms: 0.0,
            routing_ms: 0.0,
            generation_ms: 0.0,
            sampling_ms: 0.0,
            call_path: None,
            server_ms: None,
        }
    }
}

/// What a backend can do beyond generating text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// Tool calls are grammar-constrained, so a parsed call always matches
    /// the tools' schemas.
    pub constrained_decoding: bool,
    /// A session reuses the evaluated prefix of its previous prompt.
    pub kv_prefix_reuse: bool,
    /// The backend returns tool calls as structured data (OpenAI
    /// `tool_calls`) rather than text the runtime parses.
    pub native_tool_calls: bool,
    /// A session's state can be saved and restored (resume).
    pub saved_state: bool,
    /// Sessions share one context (batched slots, or a server's): opening
    /// one more costs no memory of its own.
    pub shared_context: bool,
}

/// What a backend says about itself, for banners, `agent model` and
/// `agent doctor`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendInfo {
    /// The model's name.
    pub name: String,
    /// One line on where and how it runs (size, GPU layers, server).
    pub detail: String,
    /// Its context length in tokens, when known.
    pub context_length: Option<u32>,
    /// Its parameter count, where it runs in process (a served model's is
    /// not known).
    pub parameters: Option<u64>,
    /// What it can do.
    pub capabilities: Capabilities,
}

impl BackendInfo {
    /// Whether it is an in-process model of fewer than
    /// [`SMALL_MODEL_PARAMETERS`] parameters, one that needs the help
    /// small models get (routing, DRY, grounding from the request).
    pub fn is_small(&self) -> bool {
        self.parameters
            .is_some_and(|parameters| parameters < SMALL_MODEL_PARAMETERS)
    }
}

/// One request for the next assistant turn.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    /// The conversation so far.
    pub messages: Vec<Message>,
    /// The tools offered, as OpenAI function definitions.
    pub tools: Vec<Value>,
    /// Whether (and which) tool must be called.
    pub tool_choice: ToolChoice,
    /// How to pick tokens.
    pub sampling: SamplingOptions,
    /// A JSON Schema the answer must follow (OpenAI `response_format`);
    /// generation is constrained to it where the backend can (in process,
    /// llama-server), and asked for elsewhere. Applies to a step with no
    /// tool grammar in force: under `tool_choice: auto` with tools
    /// offered, the caller chooses one or the other.
    pub response_format: Option<Value>,
    /// Values string parameters are narrowed to in the tool-call grammar
    /// (see [`ArgumentValues`]); where no grammar applies (a served
    /// model's native calls), the calls are validated as usual.
    pub argument_values: ArgumentValues,
}

/// A model the agent loop can drive.
pub trait ModelBackend: Send + Sync {
    /// What it is.
    fn info(&self) -> BackendInfo;

    /// Opens a session (a conversation with state of its own), without
    /// blocking the caller's thread.
    fn open_session(
        self: Arc<Self>,
    ) -> BoxFuture<'static, Result<Box<dyn BackendSession>, ModelError>>;
}

/// One conversation on a backend.
pub trait BackendSession: Send {
    /// Generates the next assistant turn for `request`, sending text
    /// deltas to `deltas` as they come; stops early (with
    /// [`StopReason::Cancelled`]) once `cancel` is set.
    fn complete(
        &mut self,
        request: CompletionRequest,
        deltas: tokio::sync::mpsc::UnboundedSender<String>,
        cancel: Arc<AtomicBool>,
    ) -> BoxFuture<'_, Result<Generation, ModelError>>;

    /// Token counters over the session's life.
    fn totals(&mut self) -> BoxFuture<'_, Counters>;

    /// Forgets any state kept between turns.
    fn clear(&mut self);

    /// Saves the session's state to `file` (sealed when its vault seals)
    /// and waits until it is written (nothing to do for a backend without
    /// [`Capabilities::saved_state`]).
    fn save_state(&mut self, _file: StateFile) -> BoxFuture<'_, Result<(), ModelError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Starts saving the session's state to `file` and returns at once
    /// (best effort; used when a session is dropped).
    fn save_state_detached(&mut self, _file: StateFile) {}

    /// Restores a saved state; returns how many tokens it holds (0 for a
    /// backend without [`Capabilities::saved_state`]).
    fn load_state(&mut self, _file: StateFile) -> BoxFuture<'_, Result<usize, ModelError>> {
        Box::pin(std::future::ready(Ok(0)))
    }
}

/// The `function.name` of an OpenAI tool object.
pub(crate) fn tool_name(tool: &Value) -> Option<&str> {
    tool.pointer("/function/name").and_then(Value::as_str)
}

/// The tools `choice` offers out of `tools`: none, the named one, or all.
#[cfg(any(feature = "llama", feature = "remote"))]
pub(crate) fn offered_tools(tools: &[Value], choice: &ToolChoice) -> Vec<Value> {
    match choice {
        ToolChoice::None => Vec::new(),
        ToolChoice::Named(name) => tools
            .iter()
            .filter(|t| tool_name(t) == Some(name.as_str()))
            .cloned()
            .collect(),
        _ => tools.to_vec(),
    }
}

/// The tools a prompt lists: every tool whenever any is offered, so that
/// the steps of a turn share their prompt prefix (a named choice narrows
/// the grammar, not the prompt); none when none is offered.
#[cfg(any(feature = "llama", feature = "remote"))]
pub(crate) fn prompt_tools<'a>(tools: &'a [Value], offered: &[Value]) -> &'a [Value] {
    if offered.is_empty() {
        &[]
    } else {
        tools
    }
}
