//! # stack-mcp: Stack Runtime over the Model Context Protocol
//!
//! Serves the registry's tools (built-ins, schema-file tools, host tools) to
//! any MCP client, with the official Rust SDK (`rmcp`), over stdio
//! ([`serve_stdio`]) or Streamable HTTP ([`http::McpHttpServer`]). Every
//! call goes through the same gate as a model's call in the agent loop:
//! validation, budgets, policy and approval (as an MCP elicitation), the
//! sandbox, redaction and the audit log. See [`server`] for the sessions
//! and [`http`] for who may reach the HTTP server.
//!
//! The other way round, [`client`] runs the MCP servers a policy names
//! inside the process sandbox and adds their tools to the registry, where
//! the same gate decides every call.

#![warn(missing_docs)]

pub mod client;
pub mod http;
pub mod server;

pub use client::{AttachError, McpServers};
pub use server::{McpSession, ServerOptions, ToolService, UnansweredAsk};

use rmcp::ServiceExt;

/// Why serving over stdio stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// The `initialize` handshake did not complete.
    #[error("the MCP client did not complete the handshake: {0}")]
    Handshake(String),
    /// The session ended abnormally.
    #[error("the MCP session failed: {0}")]
    Session(String),
}

/// Serves one MCP session over this process's stdin and stdout until the
/// client closes stdin. Logs must go to stderr: stdout carries the protocol.
pub async fn serve_stdio(service: &ToolService) -> Result<(), StdioError> {
    let running = service
        .session()
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|err| StdioError::Handshake(err.to_string()))?;
    running
        .waiting()
        .await
        .map(drop)
        .map_err(|err| StdioError::Session(err.to_string()))
}
