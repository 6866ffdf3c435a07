//! Streamable HTTP: `agent mcp --http ADDR`.
//!
//! # Threat model
//!
//! The server runs sandboxed code for whoever reaches it, so who may reach
//! it is the boundary:
//!
//! - **Remote hosts.** Without a bearer token the server binds loopback
//!   addresses only; [`McpHttpServer::bind`] refuses any other address
//!   ([`HttpError::PublicWithoutToken`]).
//! - **Other local users and processes, sandboxed code included.** A
//!   sandboxed call with `network = "full"` reaches the host's loopback; a
//!   tokenless server would let it call tools and answer its own approval
//!   elicitations. So `agent mcp --http` always has a token unless told
//!   `--no-auth`: the one given with `--token-env VAR` (an environment
//!   variable, never the command line, which every local user can read in
//!   `/proc`), or a random 256-bit one made for the run and printed to the
//!   user's terminal. Every request must carry `Authorization: Bearer
//!   <token>`; anything else gets `401` before it reaches MCP. The token is
//!   compared in constant time.
//! - **Web pages in the user's browser (DNS rebinding, cross-origin
//!   posts).** rmcp checks `Host` against the allowed hosts (loopback names
//!   by default, plus any named with `--allow-host`) and refuses a request
//!   whose `Origin` is not a loopback origin.
//! - **Sessionless requests.** Every request but `initialize` must name its
//!   session (`Mcp-Session-Id`), so budgets, grants and the Python
//!   interpreter always belong to one session; a sessionless request (the
//!   2026-07-28 revision's stateless style, or a `server/discover` probe)
//!   is answered with JSON-RPC error -32022 listing the versions served,
//!   and clients fall back to `initialize`.
//! - **Oversized bodies.** rmcp caps a request body (413 past it); a
//!   sessionless one is read only up to [`MAX_SESSIONLESS_BODY`].
//!
//! Not covered: TLS (put a reverse proxy in front for non-loopback use) and
//! a peer that holds the token (it has the rights the policy grants).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::server::ToolService;

/// Where MCP is served on the HTTP listener.
pub const MCP_PATH: &str = "/mcp";

/// How to serve MCP over HTTP.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// The address to listen on (port 0 picks a free one).
    pub addr: SocketAddr,
    /// The bearer token every request must carry; required for an address
    /// that is not loopback. `None` on loopback means no authentication:
    /// every local user and process (sandboxed code with full network
    /// too) may call the tools and answer elicitations. Host and Origin
    /// are checked either way.
    pub bearer_token: Option<String>,
    /// Host names (or `host:port`) accepted in `Host` besides the loopback
    /// names, for a server reached by name.
    pub allowed_hosts: Vec<String>,
}

/// Why the HTTP server did not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// A non-loopback address without a token.
    #[error("refusing to serve MCP on {0}: it is not a loopback address and no bearer token is configured (give one with --token-env VAR)")]
    PublicWithoutToken(SocketAddr),
    /// An empty token.
    #[error("the bearer token is empty")]
    EmptyToken,
    /// The listener could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("the MCP HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// A bound, not yet running, MCP HTTP server.
pub struct McpHttpServer {
    listener: tokio::net::TcpListener,
    router: Router,
    local_addr: SocketAddr,
}

impl McpHttpServer {
    /// Checks the options and binds the listener.
    pub async fn bind(
        service: ToolService,
        options: HttpOptions,
        shutdown: CancellationToken,
    ) -> Result<McpHttpServer, HttpError> {
        if options.bearer_token.as_deref() == Some("") {
            return Err(HttpError::EmptyToken);
        }
        if options.bearer_token.is_none() && !options.addr.ip().is_loopback() {
            return Err(HttpError::PublicWithoutToken(options.addr));
        }
        let listener = tokio::net::TcpListener::bind(options.addr)
            .await
            .map_err(|source| HttpError::Bind {
                addr: options.addr,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| HttpError::Bind {
            addr: options.addr,
            source,
        })?;
        let router = router(service, &options, local_addr, shutdown);
        Ok(McpHttpServer {
            listener,
            router,
            local_addr,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` (given to [`McpHttpServer::bind`]) is
    /// cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), HttpError> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(HttpError::Serve)
    }
}

fn router(
    service: ToolService,
    options: &HttpOptions,
    local_addr: SocketAddr,
    shutdown: CancellationToken,
) -> Router {
    let mut allowed_hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if !local_addr.ip().is_loopback() && !local_addr.ip().is_unspecified() {
        allowed_hosts.push(local_addr.ip().to_string());
    }
    allowed_hosts.extend(options.allowed_hosts.iter().cloned());
    let config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(allowed_hosts)
        .with_allowed_origins(["http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*"])
        .with_cancellation_token(shutdown.child_token());
    let mcp = StreamableHttpService::new(
        move || Ok(service.session()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let router = Router::new()
        .nest_service(MCP_PATH, mcp)
        .layer(middleware::from_fn(sessions_only));
    match &options.bearer_token {
        Some(token) => router.layer(middleware::from_fn_with_state(
            Arc::new(token.clone()),
            require_bearer,
        )),
        None => router,
    }
}

/// The most of a sessionless request's body that is read (to see whether
/// it is an `initialize`).
pub const MAX_SESSIONLESS_BODY: usize = 1 << 20;

/// Lets through only requests of a session, and the `initialize` that
/// starts one (see the module docs).
async fn sessions_only(request: Request, next: Next) -> Response {
    if request.method() != Method::POST || request.headers().contains_key("mcp-session-id") {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_SESSIONLESS_BODY).await else {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            "a request without Mcp-Session-Id must be a JSON-RPC initialize of at most 1 MiB\n",
        )
            .into_response();
    };
    let message: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if message.get("method").and_then(Value::as_str) == Some("initialize") {
        return next
            .run(Request::from_parts(parts, axum::body::Body::from(bytes)))
            .await;
    }
    let supported = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];
    let error = serde_json::json!({
        "jsonrpc": "2.0",
        "id": message.get("id").cloned().unwrap_or(Value::Null),
        "error": {
            "code": -32022,
            "message": "this server serves MCP sessions only: start one with initialize (protocol 2024-11-05 to 2025-11-25), then send Mcp-Session-Id with every request",
            "data": {
                "supported": supported,
                "requested": message.pointer("/params/_meta/io.modelcontextprotocol~1protocolVersion").cloned().unwrap_or(Value::Null),
            },
        },
    });
    (StatusCode::BAD_REQUEST, axum::Json(error)).into_response()
}

/// Refuses a request without the bearer token.
async fn require_bearer(
    State(token): State<Arc<String>>,
    request: Request,
    next: Next,
) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    match stack_types::secret::check_bearer(authorization, &token) {
        stack_types::secret::Bearer::Matches => next.run(request).await,
        _ => {
            let mut response = (
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (Authorization: Bearer <token>)\n",
            )
                .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"stack-runtime\""),
            );
            response
        }
    }
}
