//! The model side: the model-backend seam ([`ModelBackend`]), prompt
//! rendering with the GGUF's own chat template, tool-call parsing, tool
//! grammars, (feature `llama`) the llama.cpp backend with KV-cache reuse,
//! and (feature `remote`) a served model behind an OpenAI-compatible API.
//! No sandbox and no wasmtime here.

#![warn(missing_docs)]

pub mod backend;
#[cfg(feature = "llama")]
pub mod batch;
pub mod call_grammar;
#[cfg(feature = "llama")]
pub mod cpu_backends;
pub mod formats;
pub mod grammar;
#[cfg(feature = "llama")]
pub mod llama;
#[cfg(feature = "remote")]
pub mod remote;
#[cfg(feature = "llama")]
pub mod routing;
pub mod template;
pub mod toolcall;
#[cfg(feature = "llama")]
mod worker;

pub use backend::{
    BackendInfo, BackendSession, CallPath, Capabilities, CompletionRequest, Counters, Generation,
    GrammarCheck, ModelBackend, ModelError, Routing, SamplingOptions, StopReason,
    DEFAULT_DRY_MULTIPLIER, DEFAULT_MIN_P, DEFAULT_REPEAT_PENALTY, DEFAULT_TOP_K,
    MAX_DRY_MULTIPLIER, SMALL_MODEL_PARAMETERS,
};
pub use call_grammar::CallCount;
pub use formats::ToolFormat;
pub use grammar::{ArgumentValues, ToolChoice};
#[cfg(feature = "llama")]
pub use routing::{RoutingScores, ROUTING_EVIDENCE_NATS};
pub use template::{ChatTemplate, PromptRenderer, TemplateError};
pub use toolcall::{parse_cut_tool_calls_for, parse_tool_calls, parse_tool_calls_for, ParsedTurn};

#[cfg(test)]
mod fuzz;
