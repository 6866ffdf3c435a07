//! The model side: prompt rendering with the GGUF's own chat template,
//! tool-call parsing, tool grammars, and (feature `llama`) the llama.cpp
//! backend with KV-cache reuse.

#![warn(missing_docs)]

pub mod grammar;
#[cfg(feature = "llama")]
pub mod llama;
pub mod template;
pub mod toolcall;

pub use grammar::ToolChoice;
pub use template::{ChatTemplate, PromptRenderer, TemplateError};
pub use toolcall::{parse_tool_calls, ParsedTurn};
