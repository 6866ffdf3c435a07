//! # Stack Runtime
//!
//! A sandboxed tool-execution runtime for agents driven by local GGUF models.
//!
//! The model proposes tool calls in the OpenAI format ([`message`]); the
//! [`tools::Registry`] checks each one against its tool's JSON Schema and
//! yields a [`tools::ValidatedCall`]; [`dispatch::execute`] runs only such
//! calls and reports a [`outcome::ToolOutcome`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use stack_runtime::{dispatch, message::ToolCall, tools::Registry, workspace::Workspace};
//!
//! let registry = Registry::with_builtins();
//! let ctx = dispatch::ToolContext::new(Workspace::open(".")?);
//! let call = ToolCall::function("call_1", "list_dir", r#"{"path": "."}"#);
//! match registry.validate(&call) {
//!     Ok(valid) => println!("{}", dispatch::execute(&valid, &ctx).await.stdout),
//!     Err(why) => println!("rejected: {why}"),
//! }
//! # Ok(()) }
//! ```
//!
//! Cargo features: `llama` (the llama.cpp model backend, default), `wasi`
//! (the wasmtime sandbox, default) and `cuda` (GPU offload for `llama`).

#![warn(missing_docs)]

pub mod assets;
pub mod dispatch;
pub mod message;
pub mod outcome;
pub mod sandbox;
pub mod tools;
pub mod workspace;
