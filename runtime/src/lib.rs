//! # Stack Runtime
//!
//! A sandboxed tool-execution runtime for agents driven by local GGUF models.
//!
//! Most hosts start at [`agent::Runtime::builder`] (feature `llama`): give it
//! a model, tool folders or typed Rust tools, a policy and an approval
//! handler, open a session and `send` user text; each turn streams
//! [`agent::Event`]s while the model's tool calls are validated, decided,
//! run in a sandbox and fed back.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use futures::StreamExt;
//! use stack_runtime::agent::{Runtime, SessionConfig};
//! use stack_runtime::model::llama::{Model, ModelOptions};
//! use stack_runtime::policy::Policy;
//!
//! let runtime = Runtime::builder()
//!     .model(Model::load(ModelOptions::default())?)
//!     .policy(Policy::preset("default")?)
//!     .workspace("/tmp/ws")
//!     .build()?;
//! let session = runtime.session(SessionConfig::default()).await?;
//! let mut turn = session.send("What files are here?");
//! while let Some(event) = turn.next().await {
//!     println!("{event:?}");
//! }
//! # Ok(()) }
//! ```
//!
//! Underneath, the pieces can be used alone:
//!
//! The model proposes tool calls in the OpenAI format ([`message`]). The
//! [`gate::Gate`] takes each one through the [`tools::Registry`] (JSON Schema
//! validation, yielding a [`tools::ValidatedCall`]), the session budgets and
//! the [`policy::Policy`] (allow / ask / deny, approvals, yielding a
//! [`policy::AuthorizedCall`]), then [`dispatch::execute`] runs it in-process
//! or in a sandbox ([`sandbox`]), and the [`outcome::ToolOutcome`] is
//! redacted and audited.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use stack_runtime::{dispatch::ToolContext, gate::Gate, message::ToolCall};
//! use stack_runtime::{policy::Policy, tools::Registry, workspace::Workspace};
//!
//! let registry = Arc::new(Registry::with_builtins());
//! let policy = Arc::new(Policy::preset("default")?);
//! let mut gate = Gate::new(registry, policy, "session-1");
//! let ctx = ToolContext::new(Workspace::open(".")?);
//! let call = ToolCall::function("call_1", "list_dir", r#"{"path": "."}"#);
//! let outcome = gate.call(&call, &ctx).await;
//! println!("{}: {}", outcome.status.as_str(), gate.text_for_model(&outcome));
//! # Ok(()) }
//! ```
//!
//! The runtime is a workspace of crates along that data flow (see
//! `ARCHITECTURE.md`): `stack-types` (messages, outcomes), `stack-assets`,
//! `stack-sandbox` (usable alone, without llama.cpp), `stack-core` (tools,
//! policy, gate, dispatch), `stack-model` (templates, parsing, llama.cpp) and
//! `stack-agent` (the loop), with `stack-mcp` (MCP both ways),
//! `stack-serve` (the HTTP service of `agent serve`), `stack-egress`
//! (network allowlists and the egress proxy) and `stack-eval`
//! (`agent eval`) at the edges. This crate re-exports each under the module
//! names above, so `use stack_runtime::…` reaches all of them.
//!
//! Cargo features: `llama` (the llama.cpp model backend, default), `remote`
//! (served models over an OpenAI-compatible API, and the user's config
//! file of model profiles; default), `wasi` (the wasmtime sandbox, default)
//! and `cuda` (GPU offload for `llama`).

#![warn(missing_docs)]

#[cfg(feature = "remote")]
pub mod config;

pub use stack_agent as agent;
pub use stack_assets as assets;
pub use stack_core::{dispatch, gate, grounding, policy, tools, workspace};
pub use stack_egress as egress;
pub use stack_eval as eval;
pub use stack_mcp as mcp;
pub use stack_model as model;
pub use stack_sandbox as sandbox;
pub use stack_seal as seal;
pub use stack_serve as serve;
pub use stack_types::{message, outcome, text};
pub use stack_types::{EgressDecision, EgressProtocol, EgressRecord};
pub use stack_voice as voice;
