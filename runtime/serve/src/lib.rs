//! `agent serve`: the runtime as a local HTTP service, for host apps in any
//! language.
//!
//! Two APIs on one listener, both on the runtime's one loaded model:
//!
//! - **OpenAI-compatible model serving** ([`completions`]):
//!   `GET /v1/models` and `POST /v1/chat/completions`, streaming or not,
//!   with `tools`, `tool_choice`, `parallel_tool_calls`, `response_format`
//!   and `usage`. Tool calls come out of the runtime's grammar, so they
//!   match the tools' schemas.
//! - **Agent sessions** ([`sessions`]): the embedding API over HTTP.
//!   `POST /v1/sessions` opens one (its own workspace inside the server's
//!   allowed roots, and optionally a policy that can only narrow the
//!   server's); `POST /v1/sessions/{id}/turns` runs a turn and streams its
//!   events as SSE; `POST /v1/sessions/{id}/approvals/{call_id}` answers
//!   an `ask`; `GET`/`DELETE /v1/sessions/{id}`; `GET
//!   /v1/sessions/{id}/export`; resume by `POST /v1/sessions` with
//!   `resume`. Tools run here, in the sandbox, under the policy, with the
//!   audit log and transcripts.
//! - **Spoken input** ([`audio`], with a speech model): OpenAI's
//!   `POST /v1/audio/transcriptions`, and turns whose `audio` is a WAV
//!   clip, transcribed locally; each transcription holds a place of the
//!   admission, as a generation does.
//! - **Operations**: `GET /health` (no token), `GET /metrics`
//!   (Prometheus text, [`metrics`]), and a graceful shutdown that gives
//!   running turns a grace period, cancels the rest and saves every
//!   session's state.
//!
//! # Threat model
//!
//! The service runs code (in the sandbox) for whoever reaches it, so who
//! may reach it is the boundary; the sandbox and the policy bound what a
//! caller that gets through may do.
//!
//! - **Remote hosts.** The server binds loopback by default and refuses a
//!   non-loopback address unless the operator gave the token
//!   ([`ServeError::PublicWithoutToken`]).
//! - **Other local users and processes, sandboxed code included** (a call
//!   under `network = "full"` reaches loopback). Every route but `/health`
//!   needs `Authorization: Bearer <token>`, compared in constant time; a
//!   missing or wrong token gets `401` before any handler runs.
//! - **Web pages in the user's browser.** No CORS headers are ever sent,
//!   so a page can neither read a response nor send the `Authorization`
//!   header cross-origin (the preflight fails); DNS rebinding gains
//!   nothing without the token.
//! - **Clients with the token.** They get what the server's policy grants
//!   and no more: a session's own policy is narrowed to the server's
//!   ([`stack_core::policy::Policy::within`]), may only name presets or
//!   inline TOML (never a file on the server), and may not declare MCP
//!   servers; a session's workspace must lie inside an allowed root
//!   (checked after resolving links), and never inside or around another
//!   open session's (whose sandboxed code could otherwise replace it with
//!   a link to anywhere before the sandbox next resolves it); session ids
//!   are checked before they name a file.
//! - **Resource exhaustion.** Request bodies are capped (`413`); sessions
//!   are capped (`429`); generation runs under a concurrency limit with a
//!   bounded queue (`429` past it); each turn has a time limit, after
//!   which it is cancelled and its tools killed, also when its client
//!   stopped reading. Connections are capped and must send a request's
//!   head in time (see `connections.rs`), and one refused for its token is
//!   closed; shutdown never waits on a stalled client. (A local process
//!   that keeps opening connections can still hold the places up to the
//!   cap, as any server's; it cannot take the process's descriptors.)
//! - **Malformed input.** Bad JSON, unknown fields, wrong types, unknown
//!   sessions and invalid ids get a `4xx` with a JSON error that says what
//!   is wrong; no handler panics on input, and one client's error leaves
//!   other sessions untouched.
//!
//! Not covered: TLS (put a reverse proxy in front for non-loopback use).

#![warn(missing_docs)]

pub mod audio;
pub mod completions;
mod connections;
mod error;
mod limits;
pub mod metrics;
pub mod sessions;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use stack_agent::{Runtime, SessionConfig};
use tokio_util::sync::CancellationToken;

pub use error::ApiError;
pub use limits::Admission;

/// How the service runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where to listen (port 0 picks a free one).
    pub addr: SocketAddr,
    /// The bearer token every route but `/health` requires.
    pub token: String,
    /// Whether the operator gave the token (environment or file), rather
    /// than it being made for this run: only then may the address be one
    /// other than loopback.
    pub token_given: bool,
    /// Folders a session's workspace must lie in (the first is the default
    /// workspace).
    pub workspace_roots: Vec<PathBuf>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Most open sessions.
    pub max_sessions: usize,
    /// Most generations (completions and turns) running at once.
    pub max_running: usize,
    /// Most requests waiting for one of those; more get `429`.
    pub max_queue: usize,
    /// Longest a turn may run before it is cancelled.
    pub turn_timeout: Duration,
    /// How long running turns get to finish at shutdown before they are
    /// cancelled.
    pub shutdown_grace: Duration,
    /// What a session gets unless its client asks otherwise.
    pub session_defaults: SessionConfig,
}

impl ServeOptions {
    /// Options with the defaults: loopback port 8080, 1 MiB bodies, 16
    /// sessions, 4 running, 32 queued, 10-minute turns, 10 s grace.
    pub fn new(token: impl Into<String>, workspace_root: PathBuf) -> ServeOptions {
        ServeOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: token.into(),
            token_given: false,
            workspace_roots: vec![workspace_root],
            max_body_bytes: 1 << 20,
            max_sessions: 16,
            max_running: 4,
            max_queue: 32,
            turn_timeout: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(10),
            session_defaults: SessionConfig::default(),
        }
    }
}

/// Why the service did not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A non-loopback address without a token the operator gave.
    #[error("refusing to serve on {0}: it is not a loopback address and no bearer token was given (set STACK_RUNTIME_TOKEN or --token-file)")]
    PublicWithoutToken(SocketAddr),
    /// An empty or too short token.
    #[error("the bearer token must be at least 16 characters")]
    WeakToken,
    /// No usable workspace root.
    #[error("workspace root {path}: {source}")]
    WorkspaceRoot {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The listener could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// What every handler shares.
pub(crate) struct AppState {
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) options: ServeOptions,
    pub(crate) admission: Admission,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) slots: completions::Slots,
    pub(crate) sessions: sessions::SessionTable,
    /// Cancelled when the server starts shutting down: no new sessions,
    /// turns or completions from then on.
    pub(crate) draining: CancellationToken,
    /// Cancelled when the grace period is over: what still runs is
    /// cancelled.
    pub(crate) shutdown: CancellationToken,
}

/// A bound, not yet running, server.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    local_addr: SocketAddr,
}

impl Server {
    /// Checks the options and binds the listener. The workspace roots are
    /// resolved (links and all) here, once.
    pub async fn bind(
        runtime: Arc<Runtime>,
        mut options: ServeOptions,
    ) -> Result<Server, ServeError> {
        if options.token.len() < 16 {
            return Err(ServeError::WeakToken);
        }
        if !options.token_given && !options.addr.ip().is_loopback() {
            return Err(ServeError::PublicWithoutToken(options.addr));
        }
        let mut roots = Vec::new();
        for root in &options.workspace_roots {
            let resolved = tokio::fs::canonicalize(root).await.map_err(|source| {
                ServeError::WorkspaceRoot {
                    path: root.clone(),
                    source,
                }
            })?;
            roots.push(resolved);
        }
        options.workspace_roots = roots;
        let listener = tokio::net::TcpListener::bind(options.addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: options.addr,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: options.addr,
            source,
        })?;
        let state = Arc::new(AppState {
            admission: Admission::new(options.max_running, options.max_queue),
            slots: completions::Slots::new(Arc::clone(runtime.backend())),
            metrics: metrics::Metrics::default(),
            sessions: sessions::SessionTable::default(),
            draining: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            runtime,
            options,
        });
        Ok(Server {
            listener,
            state,
            local_addr,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` is cancelled; then stops accepting, gives
    /// running turns the grace period, cancels what is left, and saves
    /// every open session's state.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServeError> {
        let state = Arc::clone(&self.state);
        let router = router(Arc::clone(&self.state));
        let stopping = {
            let (state, shutdown) = (Arc::clone(&state), shutdown.clone());
            async move {
                shutdown.cancelled().await;
                state.draining.cancel();
                // Requests still in line get 503 rather than a place in
                // the grace period.
                state.admission.close();
                tracing::info!("shutting down: finishing running turns");
                let grace = state.options.shutdown_grace;
                let deadline = tokio::time::Instant::now() + grace;
                while state.admission.running() > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // What is still running is cancelled: turns end with
                // `cancelled`, their tools are killed, streams close.
                state.shutdown.cancel();
            }
        };
        // `[privacy] max_age_days`: a running server purges what has
        // expired once a day (the CLI purged once at start).
        let purging = {
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let mut daily = tokio::time::interval(Duration::from_secs(86_400));
                daily.tick().await;
                loop {
                    tokio::select! {
                        _ = state.shutdown.cancelled() => return,
                        _ = daily.tick() => {}
                    }
                    match state.runtime.purge_expired().await {
                        Ok(Some(removed)) if !removed.sessions.is_empty() => tracing::info!(
                            sessions = removed.sessions.len(),
                            "purged sessions past the policy's max_age_days"
                        ),
                        Ok(_) => {}
                        Err(err) => tracing::warn!(%err, "purging expired sessions failed"),
                    }
                }
            })
        };
        connections::serve(
            self.listener,
            router,
            connections::MAX_CONNECTIONS,
            stopping,
        )
        .await;
        purging.abort();
        state.sessions.close_all().await;
        Ok(())
    }
}

/// The routes, with the token check on all but `/health`.
fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/v1/models", get(completions::models))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/audio/transcriptions", post(audio::transcriptions))
        .route("/v1/sessions", post(sessions::create).get(sessions::list))
        .route(
            "/v1/sessions/{id}",
            get(sessions::show).delete(sessions::delete),
        )
        .route("/v1/sessions/{id}/turns", post(sessions::turn))
        .route(
            "/v1/sessions/{id}/approvals/{call_id}",
            post(sessions::approve),
        )
        .route("/v1/sessions/{id}/export", get(sessions::export))
        .route("/v1/sessions/{id}/training", post(sessions::training))
        .route("/metrics", get(metrics::render))
        // Before the token check's layer, so that it covers these too.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_bearer,
        ));
    Router::new()
        .route("/health", get(health))
        .method_not_allowed_fallback(method_not_allowed)
        .merge(protected)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.options.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            count_responses,
        ))
        .with_state(state)
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(serde_json::json!({
        "status": if state.draining.is_cancelled() { "stopping" } else { "ok" },
        "model": state.runtime.backend().info().name,
    }))
    .into_response()
}

async fn not_found(request: Request) -> Response {
    ApiError::NotFound(format!(
        "no route {} {} (see GET /v1/models, POST /v1/chat/completions, /v1/sessions)",
        request.method(),
        request.uri().path()
    ))
    .into_response()
}

async fn method_not_allowed(request: Request) -> Response {
    ApiError::MethodNotAllowed(format!(
        "{} is not a method of {}",
        request.method(),
        request.uri().path()
    ))
    .into_response()
}

/// A server-sent event stream of what a task sends on `receiver`, ending
/// when the task drops its sender; a client that goes away drops the
/// receiver, so the task's next send fails.
pub(crate) fn sse_response(
    receiver: tokio::sync::mpsc::Receiver<axum::response::sse::Event>,
) -> Response {
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|event| (Ok::<_, std::convert::Infallible>(event), receiver))
    });
    axum::response::sse::Sse::new(stream)
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response()
}

/// Refuses a request without the bearer token (`401`, with a JSON error).
async fn require_bearer(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    use stack_types::secret::{check_bearer, Bearer};
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let mut refused = match check_bearer(authorization, &state.options.token) {
        Bearer::Matches => return next.run(request).await,
        Bearer::Wrong => ApiError::Unauthorized("wrong bearer token").into_response(),
        Bearer::Missing => ApiError::Unauthorized(
            "this server needs a bearer token: send Authorization: Bearer <token>",
        )
        .into_response(),
    };
    // A caller without the token keeps no connection open (one of the
    // `MAX_CONNECTIONS` places) past its refusal.
    refused.headers_mut().insert(
        header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    refused
}

/// Counts responses by status code for `/metrics`.
async fn count_responses(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    state.metrics.count_response(response.status().as_u16());
    response
}
