//! MCP servers as tool sources: the servers a policy names under
//! `[mcp_servers.NAME]` run inside the process sandbox, and their tools join
//! the registry as `NAME__tool`, behind the same gate as every other tool.
//!
//! # Threat model
//!
//! An MCP server is third-party code the user chose to run; it may be
//! buggy, compromised or hostile, and so may everything it says.
//!
//! - **What it can reach.** It runs as a long-lived process in the process
//!   sandbox ([`ProcessSandbox::spawn_service`]): never root, landlock (the
//!   system folders, the workspace, and the `read_only` paths its section
//!   names for its own install), seccomp, its own PID, IPC, mount and
//!   network namespaces (no network unless its section grants it), rlimits
//!   and the cgroup. Of the runtime's environment it gets only the variables
//!   its section lists. Dropping the [`McpServers`] (or the registry that
//!   holds its tools) kills it and every process it made; it cannot outlive
//!   its session.
//! - **What it says.** Tool names are sanitized to `NAME__tool` (a name that
//!   collides is skipped), each `inputSchema` is compiled by the registry
//!   (one it rejects skips that tool), descriptions are capped. Arguments
//!   are validated against that schema and decided by the policy before the
//!   server sees them. A result is cut to the call's output cap; a response
//!   the SDK cannot parse, one longer than [`MAX_MESSAGE_BYTES`], or any
//!   protocol error becomes a failed call with a clear error. Its stderr
//!   is logged with the policy's secrets masked, at most
//!   [`MAX_STDERR_LOGGED`] bytes a start. Requests it sends us wait on
//!   their answers, which it must read: past [`MAX_UNANSWERED_REQUESTS`]
//!   unread answers (a server flooding requests while never reading its
//!   stdin would otherwise grow this process's memory without end) the
//!   connection is closed and the server started again on the next call.
//! - **Time.** Each call has a timeout (`timeout_ms`, default 60 s); past
//!   it, or when the caller abandons the call, the server is sent
//!   `notifications/cancelled` and the call ends. A server that dies is
//!   reported and started again on the next call; a handshake or listing
//!   that hangs fails after [`START_TIMEOUT`].
//!
//! - **HTTP servers** (`url`) run elsewhere, outside any sandbox of ours,
//!   and the runtime only connects to them (the SDK's Streamable HTTP
//!   client). The policy is checked when loaded: `https://`, or `http://`
//!   on a loopback address only, no credentials in the URL; the bearer
//!   token is read from the variable the section names when the runtime
//!   connects, and never logged. Redirects stay on the same origin. Each
//!   JSON response or SSE event is capped at [`MAX_MESSAGE_BYTES`]; tools,
//!   schemas, results, time and the server's own unanswered requests
//!   ([`MAX_UNANSWERED_REQUESTS`]: its POSTed answers left hanging count)
//!   are held exactly as for a stdio server.
//!
//! Not covered: what the server does inside its grants (its workspace
//! writes, and its network if the policy gives it one), and what an HTTP
//! server does on its own machine.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ContentBlock, JsonRpcMessage, PaginatedRequestParams,
    RequestId, ServerNotification,
};
use rmcp::service::{RoleClient, RunningService, RxJsonRpcMessage, ServiceError, TxJsonRpcMessage};
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, Transport};
use rmcp::ServiceExt;
use serde_json::Value;

use stack_core::context::ToolContext;
use stack_core::policy::redact::Redactor;
use stack_core::policy::{mcp_tool_name, McpEndpoint, McpServerSpec, Policy};
use stack_core::tools::{Executor, ExternalTool, Registry, ToolOrigin, ToolSpec};
use stack_sandbox::process::{ProcessPolicy, ProcessSandbox, ServiceHandle};
use stack_types::outcome::{Status, ToolOutcome};

/// How long a server has to start, answer `initialize` and list its tools.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest line (one JSON-RPC message) read from a server.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// The most tools one server may list.
const MAX_TOOLS: usize = 512;

/// The most pages of `tools/list` read from one server.
const MAX_LIST_PAGES: usize = 16;

/// The largest `inputSchema` (as JSON) a tool may have.
const MAX_SCHEMA_BYTES: usize = 64 << 10;

/// The longest tool description kept.
const MAX_DESCRIPTION_BYTES: usize = 4096;

/// The default per-call timeout.
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a server's tools did not join the registry.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The server could not be started in the sandbox.
    #[error("MCP server `{server}`: cannot start it in the sandbox: {message}")]
    Start {
        /// The server.
        server: String,
        /// Why.
        message: String,
    },
    /// It started, but did not complete the handshake or the listing.
    #[error("MCP server `{server}`: {message}")]
    Handshake {
        /// The server.
        server: String,
        /// Why.
        message: String,
    },
    /// One of its tools was left out.
    #[error("MCP server `{server}`: tool `{tool}` left out: {message}")]
    Tool {
        /// The server.
        server: String,
        /// The tool, as the server named it.
        tool: String,
        /// Why.
        message: String,
    },
}

/// The MCP servers of a policy, running; their tools are in the registry
/// [`McpServers::attach`] was given. Dropping this (and the registry) stops
/// them.
#[derive(Default)]
pub struct McpServers {
    servers: Vec<Arc<ServerSource>>,
}

impl McpServers {
    /// Starts every server `policy` names, lists its tools and registers
    /// them in `registry` as `NAME__tool`. A server that fails is reported
    /// and left out; the others still join.
    pub async fn attach(
        registry: &mut Registry,
        policy: &Policy,
        workspace: &Path,
        sandbox: Option<Arc<ProcessSandbox>>,
    ) -> (McpServers, Vec<AttachError>) {
        Self::attach_only(registry, policy, workspace, sandbox, None).await
    }

    /// [`McpServers::attach`], for the server named `only` alone when it is
    /// given (one tool run starts no other server). Without a process
    /// sandbox, stdio servers are refused (they run only in it).
    pub async fn attach_only(
        registry: &mut Registry,
        policy: &Policy,
        workspace: &Path,
        sandbox: Option<Arc<ProcessSandbox>>,
        only: Option<&str>,
    ) -> (McpServers, Vec<AttachError>) {
        let mut servers = Vec::new();
        let mut errors = Vec::new();
        let chosen = policy
            .mcp_servers()
            .iter()
            .filter(|(name, _)| only.is_none_or(|only| only == name.as_str()));
        for (name, spec) in chosen {
            let source = Arc::new(ServerSource {
                name: name.clone(),
                spec: spec.clone(),
                sandbox_policy: policy.mcp_server_sandbox(spec),
                redactor: policy.redactor().clone(),
                sandbox: sandbox.clone(),
                workspace: workspace.to_path_buf(),
                live: tokio::sync::Mutex::new(None),
                starts: std::sync::atomic::AtomicU64::new(0),
            });
            let tools = match source.list_tools().await {
                Ok(tools) => tools,
                Err(err) => {
                    errors.push(err);
                    continue;
                }
            };
            let mut taken = BTreeSet::new();
            for tool in tools {
                let original = tool.name.to_string();
                let registered = mcp_tool_name(name, &original);
                let refuse = |message: String| AttachError::Tool {
                    server: name.clone(),
                    // The server chose it: shown escaped, never as
                    // terminal controls.
                    tool: stack_types::text::one_line(&original).into_owned(),
                    message,
                };
                if !taken.insert(registered.clone()) || registry.get(&registered).is_some() {
                    errors.push(refuse(format!(
                        "its registry name `{registered}` is taken already"
                    )));
                    continue;
                }
                let schema = Value::Object((*tool.input_schema).clone());
                let schema_bytes = schema.to_string().len();
                if schema_bytes > MAX_SCHEMA_BYTES {
                    errors.push(refuse(format!(
                        "its inputSchema is {schema_bytes} bytes, over the {MAX_SCHEMA_BYTES} allowed"
                    )));
                    continue;
                }
                let mut description = tool.description.as_deref().unwrap_or("").to_string();
                if description.len() > MAX_DESCRIPTION_BYTES {
                    description.truncate(description.floor_char_boundary(MAX_DESCRIPTION_BYTES));
                }
                let spec = ToolSpec {
                    name: registered.clone(),
                    description,
                    parameters: schema,
                    executor: Executor::External(Arc::new(McpTool {
                        source: Arc::clone(&source),
                        name: original.clone(),
                    })),
                    origin: ToolOrigin::Mcp {
                        server: name.clone(),
                    },
                };
                if let Err(err) = registry.register(spec) {
                    errors.push(refuse(err.to_string()));
                }
            }
            servers.push(source);
        }
        (McpServers { servers }, errors)
    }

    /// The servers' names.
    pub fn names(&self) -> Vec<&str> {
        self.servers.iter().map(|s| s.name.as_str()).collect()
    }
}

/// One configured server, started on first use and again after it died.
struct ServerSource {
    name: String,
    spec: McpServerSpec,
    sandbox_policy: ProcessPolicy,
    /// The policy's secret masking, applied to the server's stderr before
    /// it is logged.
    redactor: Redactor,
    /// Where stdio servers run; `None` where there is no process sandbox.
    sandbox: Option<Arc<ProcessSandbox>>,
    workspace: PathBuf,
    live: tokio::sync::Mutex<Option<Live>>,
    starts: std::sync::atomic::AtomicU64,
}

/// A running server: the MCP client over its pipes and the sandboxed
/// process (killed when this is dropped), or over HTTP.
struct Live {
    client: RunningService<RoleClient, ()>,
    /// The sandboxed process of a stdio server.
    service: Option<ServiceHandle>,
    /// Why the connection was cut off, if it was.
    cut_off: Arc<CutOffCell>,
    /// Which start of the server this is: a call that failed on an earlier
    /// one never ends a later one.
    generation: u64,
    /// Calls in a row that timed out; at [`TIMEOUTS_BEFORE_RESTART`] the
    /// server is started again.
    timeouts: u32,
}

impl Live {
    /// Whether the server (or the connection to it) has ended.
    fn ended(&mut self) -> bool {
        self.client.is_closed()
            || self.client.peer().is_transport_closed()
            || self.cut_off.get().is_some()
            || self.service.as_mut().is_some_and(|service| {
                !matches!(
                    service.ended.try_recv(),
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty)
                )
            })
    }
}

/// Timed-out calls in a row after which a server is taken for hung and
/// started again.
const TIMEOUTS_BEFORE_RESTART: u32 = 3;

impl ServerSource {
    /// The server's tools (starting it if needed).
    async fn list_tools(&self) -> Result<Vec<rmcp::model::Tool>, AttachError> {
        let mut live = self.live.lock().await;
        let client = self.running(&mut live).await?;
        let listing = async {
            let mut tools = Vec::new();
            let mut cursor = None;
            for _ in 0..MAX_LIST_PAGES {
                let params = cursor.take().map(|cursor| {
                    let mut params = PaginatedRequestParams::default();
                    params.cursor = Some(cursor);
                    params
                });
                let page = client.list_tools(params).await?;
                tools.extend(page.tools);
                if tools.len() > MAX_TOOLS {
                    return Ok::<_, ServiceError>(Err(format!(
                        "it lists more than {MAX_TOOLS} tools"
                    )));
                }
                match page.next_cursor {
                    Some(next) => cursor = Some(next),
                    None => return Ok(Ok(tools)),
                }
            }
            Ok(Err(format!(
                "it lists its tools in more than {MAX_LIST_PAGES} pages"
            )))
        };
        match tokio::time::timeout(START_TIMEOUT, listing).await {
            Ok(Ok(Ok(tools))) => Ok(tools),
            Ok(Ok(Err(message))) => Err(self.handshake_error(message)),
            Ok(Err(err)) => Err(self.handshake_error(format!(
                "listing its tools failed: {}",
                stack_types::text::one_line(&err.to_string())
            ))),
            Err(_) => Err(self.handshake_error(format!(
                "it did not list its tools within {} s",
                START_TIMEOUT.as_secs()
            ))),
        }
    }

    fn handshake_error(&self, message: String) -> AttachError {
        AttachError::Handshake {
            server: self.name.clone(),
            message,
        }
    }

    /// The live client, started (again) if there is none or it has ended.
    async fn running<'a>(
        &self,
        live: &'a mut Option<Live>,
    ) -> Result<&'a RunningService<RoleClient, ()>, AttachError> {
        let ended = live.as_mut().is_none_or(Live::ended);
        if ended {
            if live.take().is_some() {
                tracing::warn!(server = %self.name, "the MCP server had ended; starting it again");
            }
            *live = Some(self.start().await?);
        }
        match live.as_ref() {
            Some(current) => Ok(&current.client),
            None => Err(self.handshake_error("it is not running".into())),
        }
    }

    async fn start(&self) -> Result<Live, AttachError> {
        match self.spec.endpoint() {
            McpEndpoint::Stdio { command, args } => self.start_stdio(command, args).await,
            McpEndpoint::Http {
                url,
                bearer_token_env,
            } => self.start_http(url, bearer_token_env).await,
        }
    }

    /// Connects to a Streamable HTTP server (see the module docs).
    async fn start_http(&self, url: &str, token_env: Option<&str>) -> Result<Live, AttachError> {
        let mut config = StreamableHttpClientTransportConfig::with_uri(url)
            .max_json_response_size(MAX_MESSAGE_BYTES)
            .max_sse_event_size(MAX_MESSAGE_BYTES);
        if let Some(var) = token_env {
            match std::env::var(var) {
                Ok(token) if !token.trim().is_empty() => {
                    config = config.auth_header(token.trim().to_string());
                }
                _ => {
                    return Err(AttachError::Start {
                        server: self.name.clone(),
                        message: format!(
                            "its bearer token is read from the environment variable `{var}`, which is not set"
                        ),
                    })
                }
            }
        }
        // The SDK's reqwest verifies certificates with rustls, through the
        // process's crypto provider: ring, as for the rest of this graph.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cut_off = Arc::<CutOffCell>::default();
        let transport = Bounded::new(
            StreamableHttpClientTransport::from_config(config),
            Arc::clone(&cut_off),
        );
        let client = self.handshake(().serve(transport)).await?;
        Ok(Live {
            client,
            service: None,
            cut_off,
            generation: self.starts.fetch_add(1, Ordering::SeqCst) + 1,
            timeouts: 0,
        })
    }

    /// Waits for the MCP handshake, for at most [`START_TIMEOUT`].
    async fn handshake<E: std::fmt::Display>(
        &self,
        serving: impl std::future::Future<Output = Result<RunningService<RoleClient, ()>, E>>,
    ) -> Result<RunningService<RoleClient, ()>, AttachError> {
        match tokio::time::timeout(START_TIMEOUT, serving).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(err)) => {
                let said = err.to_string();
                // The SDK's transport errors name its worker's type first;
                // what the server answered is what helps.
                let said = said
                    .split_once("unexpected server response: ")
                    .map_or(said.as_str(), |(_, answer)| answer);
                let hint = if said.contains("HTTP 401") || said.contains("HTTP 403") {
                    match self.spec.bearer_token_env.as_deref() {
                        Some(var) => format!(" (the server refused the bearer token in `{var}`)"),
                        None => {
                            " (the server wants a token: name its variable in `bearer_token_env`)"
                                .to_string()
                        }
                    }
                } else {
                    String::new()
                };
                Err(self.handshake_error(format!(
                    "the MCP handshake failed: {}{hint}",
                    stack_types::text::one_line(said)
                )))
            }
            Err(_) => Err(self.handshake_error(format!(
                "it did not complete the MCP handshake within {} s",
                START_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Starts a stdio server in the process sandbox.
    async fn start_stdio(&self, command: &str, args: &[String]) -> Result<Live, AttachError> {
        let start_error = |message: String| AttachError::Start {
            server: self.name.clone(),
            message,
        };
        let mut argv = vec![command.to_string()];
        argv.extend(args.iter().cloned());
        // Only the variables the section names, and only those set here.
        let env: Vec<(String, String)> = self
            .spec
            .env
            .iter()
            .filter_map(|name| std::env::var(name).ok().map(|value| (name.clone(), value)))
            .collect();
        let sandbox = self.sandbox.as_ref().ok_or_else(|| {
            start_error(
                "a stdio MCP server runs only in the process sandbox, which is not available here"
                    .into(),
            )
        })?;
        let service = sandbox
            .spawn_service(&argv, &env, &self.workspace, &self.sandbox_policy)
            .await
            .map_err(|err| start_error(err.to_string()))?;
        let ((stdin, stdout, stderr), service) = service.into_parts();
        forward_stderr(self.name.clone(), self.redactor.clone(), stderr);
        let cut_off = Arc::<CutOffCell>::default();
        let reader = LineCap {
            inner: stdout,
            since_newline: 0,
            cut_off: Arc::clone(&cut_off),
        };
        let transport = Bounded::new(
            AsyncRwTransport::new_client(reader, stdin),
            Arc::clone(&cut_off),
        );
        let client = self.handshake(().serve(transport)).await?;
        Ok(Live {
            client,
            service: Some(service),
            cut_off,
            generation: self.starts.fetch_add(1, Ordering::SeqCst) + 1,
            timeouts: 0,
        })
    }

    /// Runs one call of `tool` (the server's own name for it).
    async fn call(&self, tool: &str, arguments: &Value, cap: usize) -> ToolOutcome {
        let timeout = self
            .spec
            .timeout_ms
            .map_or(DEFAULT_CALL_TIMEOUT, Duration::from_millis);
        let (peer, generation, cut_off) = {
            let mut live = self.live.lock().await;
            if let Err(err) = self.running(&mut live).await {
                return ToolOutcome::failed(err.to_string());
            }
            match live.as_ref() {
                Some(l) => (
                    l.client.peer().clone(),
                    l.generation,
                    Arc::clone(&l.cut_off),
                ),
                None => {
                    return ToolOutcome::failed(format!(
                        "MCP server `{}` is not running",
                        self.name
                    ))
                }
            }
        };
        let mut params = CallToolRequestParams::new(tool.to_string());
        if let Value::Object(arguments) = arguments {
            params = params.with_arguments(arguments.clone());
        }
        // On timeout (or when this future is dropped) the SDK sends
        // `notifications/cancelled` for the request.
        match tokio::time::timeout(timeout, peer.call_tool(params)).await {
            Ok(Ok(result)) => {
                if let Some(l) = self.live.lock().await.as_mut() {
                    if l.generation == generation {
                        l.timeouts = 0;
                    }
                }
                outcome_of(result, cap)
            }
            Ok(Err(err)) => {
                let mut live = self.live.lock().await;
                let cut_off = cut_off.get();
                let same = live.as_ref().is_some_and(|l| l.generation == generation);
                let closed = matches!(err, ServiceError::TransportClosed)
                    || cut_off.is_some()
                    || (same && live.as_mut().is_some_and(Live::ended));
                if closed && same {
                    // Whatever is left of it is stopped now; the next call
                    // starts it again. (A later start is left alone.)
                    *live = None;
                }
                let name = &self.name;
                ToolOutcome::failed(match err {
                    _ if cut_off.is_some() => cut_off_message(name, cut_off),
                    _ if closed => format!(
                        "MCP server `{name}` ended during the call; it will be started again on the next call"
                    ),
                    ServiceError::McpError(error) => format!(
                        "MCP server `{name}` refused the call: {} (code {})",
                        stack_types::text::one_line(&error.message),
                        error.code.0
                    ),
                    ServiceError::UnexpectedResponse => format!(
                        "MCP server `{name}` answered with something that is not a tool result"
                    ),
                    other => format!("MCP server `{name}`: {other}"),
                })
            }
            Err(_) => {
                let mut live = self.live.lock().await;
                let same = live.as_ref().is_some_and(|l| l.generation == generation);
                // Cut off while the call waited: that is why it got no
                // answer, and the connection is gone.
                if let Some(why) = cut_off.get() {
                    if same {
                        *live = None;
                    }
                    return ToolOutcome::failed(cut_off_message(&self.name, Some(why)));
                }
                let hung = match live.as_mut() {
                    Some(l) if l.generation == generation => {
                        l.timeouts += 1;
                        l.timeouts >= TIMEOUTS_BEFORE_RESTART
                    }
                    _ => false,
                };
                if hung {
                    *live = None;
                }
                let mut outcome = ToolOutcome::failed(format!(
                    "MCP server `{}` did not answer within {} ms; the call was cancelled{}",
                    self.name,
                    timeout.as_millis(),
                    if hung {
                        format!(" (after {TIMEOUTS_BEFORE_RESTART} such calls in a row it is taken for hung, and started again on the next call)")
                    } else {
                        String::new()
                    }
                ));
                outcome.status = Status::Timeout;
                outcome.limit = Some(stack_types::Limit::WallTime);
                outcome
            }
        }
    }
}

/// The most answers to a server's own requests (pings, sampling, roots,
/// elicitation: each answered, mostly with an error) that may wait to be
/// written to it at once. A server that reads its stdin has one or two.
pub const MAX_UNANSWERED_REQUESTS: usize = 32;

/// Why the runtime closed its connection to a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CutOff {
    /// It sent a line over [`MAX_MESSAGE_BYTES`].
    Oversized,
    /// It left over [`MAX_UNANSWERED_REQUESTS`] answers unread.
    Flooded,
}

/// A [`CutOff`] shared between the transport, which sets it, and the
/// calls, which say why they failed.
#[derive(Debug, Default)]
struct CutOffCell(std::sync::atomic::AtomicU8);

impl CutOffCell {
    fn set(&self, why: CutOff) {
        let code = match why {
            CutOff::Oversized => 1,
            CutOff::Flooded => 2,
        };
        let _ = self
            .0
            .compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst);
    }

    fn get(&self) -> Option<CutOff> {
        match self.0.load(Ordering::SeqCst) {
            1 => Some(CutOff::Oversized),
            2 => Some(CutOff::Flooded),
            _ => None,
        }
    }
}

/// The transport to a server, bounding what the server's own requests can
/// make this process hold. The SDK answers each request the server sends
/// on a task of its own, and each answer waits to be written to the
/// server's stdin (or, over HTTP, to be POSTed, the POSTs running side by
/// side while the SSE stream is read on); a server that floods requests
/// and never reads (or never answers the POSTs) would pile up tasks and
/// answers without end. So the requests not yet
/// answered are kept by id, and past [`MAX_UNANSWERED_REQUESTS`] the
/// connection is cut off: `receive` ends, and the answers still waiting to
/// be written are dropped (which frees the pipe's writer for the close),
/// so the calls fail at once, saying why, and the server is started again
/// on the next one. (A `notifications/cancelled` only takes off a request
/// it names that is still unanswered.)
struct Bounded<T> {
    inner: T,
    unanswered: Arc<std::sync::Mutex<HashMap<RequestId, usize>>>,
    cut_off: Arc<CutOffCell>,
    /// Cancelled when the connection is cut off.
    cut: tokio_util::sync::CancellationToken,
}

impl<T> Bounded<T> {
    fn new(inner: T, cut_off: Arc<CutOffCell>) -> Self {
        Bounded {
            inner,
            unanswered: Arc::default(),
            cut_off,
            cut: tokio_util::sync::CancellationToken::new(),
        }
    }
}

/// Takes one request `id` off `unanswered`, if it is there.
fn answered(unanswered: &std::sync::Mutex<HashMap<RequestId, usize>>, id: &RequestId) {
    let mut unanswered = unanswered
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(count) = unanswered.get_mut(id) {
        *count -= 1;
        if *count == 0 {
            unanswered.remove(id);
        }
    }
}

impl<T> Transport<RoleClient> for Bounded<T>
where
    T: Transport<RoleClient>,
{
    type Error = std::io::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleClient>,
    ) -> impl std::future::Future<Output = Result<(), Self::Error>> + Send + 'static {
        let answer_to = match &item {
            JsonRpcMessage::Response(response) => Some(response.id.clone()),
            JsonRpcMessage::Error(error) => error.id.clone(),
            _ => None,
        };
        let unanswered = Arc::clone(&self.unanswered);
        let cut = self.cut.clone();
        let sent = self.inner.send(item);
        async move {
            let result = tokio::select! {
                result = sent => result.map_err(into_io_error),
                () = cut.cancelled() => Err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "the connection to the MCP server was cut off",
                )),
            };
            if let Some(id) = answer_to {
                answered(&unanswered, &id);
            }
            result
        }
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleClient>> {
        if self.cut.is_cancelled() {
            return None;
        }
        let message = self.inner.receive().await?;
        match &message {
            JsonRpcMessage::Request(request) => {
                let mut unanswered = self
                    .unanswered
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let waiting: usize = unanswered.values().sum();
                if waiting >= MAX_UNANSWERED_REQUESTS {
                    drop(unanswered);
                    self.cut_off.set(CutOff::Flooded);
                    self.cut.cancel();
                    return None;
                }
                *unanswered.entry(request.id.clone()).or_default() += 1;
            }
            JsonRpcMessage::Notification(notification) => {
                if let ServerNotification::CancelledNotification(cancelled) =
                    &notification.notification
                {
                    if let Some(id) = &cancelled.params.request_id {
                        answered(&self.unanswered, id);
                    }
                }
            }
            _ => {}
        }
        Some(message)
    }

    fn close(&mut self) -> impl std::future::Future<Output = Result<(), Self::Error>> + Send {
        let cut = self.cut.is_cancelled();
        let closing = self.inner.close();
        async move {
            // Cut off: a close would wait on the full pipe (or the POSTs
            // the server never answers); a stdio server is killed with its
            // handle instead, and an HTTP connection is dropped.
            if cut {
                return Ok(());
            }
            closing.await.map_err(into_io_error)
        }
    }
}

/// The inner transport's error as an I/O error: itself where it is one
/// (a stdio pipe's, whose kind then stays `BrokenPipe` and the like),
/// wrapped otherwise (the HTTP client's).
fn into_io_error<E>(error: E) -> std::io::Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(error);
    match boxed.downcast::<std::io::Error>() {
        Ok(io) => *io,
        Err(other) => std::io::Error::other(other),
    }
}

/// Why a call failed when the connection was cut off.
fn cut_off_message(name: &str, why: Option<CutOff>) -> String {
    match why {
        Some(CutOff::Oversized) => format!(
            "MCP server `{name}` sent a message over {} MiB, so the connection to it was closed; it will be started (or connected to) again on the next call",
            MAX_MESSAGE_BYTES >> 20
        ),
        Some(CutOff::Flooded) => format!(
            "MCP server `{name}` sent requests faster than it read the answers (over {MAX_UNANSWERED_REQUESTS} unanswered), so the connection to it was closed; it will be started (or connected to) again on the next call"
        ),
        None => format!("MCP server `{name}` ended during the call; it will be started (or connected to) again on the next call"),
    }
}

/// A server's stdout that ends (with an error) at the first line longer
/// than [`MAX_MESSAGE_BYTES`]: the connection closes, the call fails and
/// says why, and no runtime memory goes to a message that size.
struct LineCap<R> {
    inner: R,
    since_newline: usize,
    cut_off: Arc<CutOffCell>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for LineCap<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &polled {
            let mut since = self.since_newline;
            for &byte in &buf.filled()[before..] {
                since = if byte == b'\n' { 0 } else { since + 1 };
                if since > MAX_MESSAGE_BYTES {
                    self.cut_off.set(CutOff::Oversized);
                    return std::task::Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("a message over {MAX_MESSAGE_BYTES} bytes"),
                    )));
                }
            }
            self.since_newline = since;
        }
        polled
    }
}

/// The most bytes of one server start's stderr that reach the log; past
/// it, lines are read and dropped (and the log says so once).
const MAX_STDERR_LOGGED: usize = 256 << 10;

/// The server's stderr into the log, a line at a time: each line cut at
/// 2000 bytes (the rest of it read and dropped, never buffered), secrets
/// masked by the policy's redactor (servers get keys through `env`, and
/// many print their settings), bytes that are not UTF-8 shown as such, at
/// most [`MAX_STDERR_LOGGED`] bytes in all; read to the end, so that the
/// server never blocks on, or is killed by, a full or closed pipe.
fn forward_stderr(
    server: String,
    redactor: Redactor,
    mut stderr: tokio::net::unix::pipe::Receiver,
) {
    use tokio::io::AsyncReadExt;
    const LINE: usize = 2000;
    tokio::spawn(async move {
        let mut line: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut logged = 0usize;
        let mut in_private_key = false;
        let mut say = |line: &[u8]| {
            if logged >= MAX_STDERR_LOGGED {
                return;
            }
            logged += line.len() + 1;
            if logged >= MAX_STDERR_LOGGED {
                tracing::warn!(target: "stack_mcp::server_stderr", server = %server, "the server wrote over {} KiB to stderr; the rest is dropped", MAX_STDERR_LOGGED >> 10);
                return;
            }
            let raw = String::from_utf8_lossy(line);
            // A PEM private key spans lines, and the redactor sees one at a
            // time: its body lines are dropped here, up to its END line.
            if in_private_key {
                in_private_key = !(raw.contains("-----END") && raw.contains("PRIVATE KEY-----"));
                return;
            }
            if raw.contains("-----BEGIN") && raw.contains("PRIVATE KEY-----") {
                in_private_key = !raw.contains("-----END");
            }
            let text = redactor.redact(&raw);
            tracing::info!(target: "stack_mcp::server_stderr", server = %server, "{}", stack_types::text::one_line(&text));
        };
        loop {
            let read = match stderr.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            for &byte in &chunk[..read] {
                if byte == b'\n' {
                    say(&line);
                    line.clear();
                } else if line.len() < LINE {
                    line.push(byte);
                }
            }
        }
        if !line.is_empty() {
            say(&line);
        }
    });
}

/// A tool call's result as an outcome: its text content (other content
/// named), or its structured content; `isError` makes it a failure.
fn outcome_of(result: CallToolResult, cap: usize) -> ToolOutcome {
    let mut text = String::new();
    for block in &result.content {
        match block {
            ContentBlock::Text(t) => text.push_str(&t.text),
            ContentBlock::Image(image) => {
                text.push_str(&format!("[image: {}]", image.mime_type));
            }
            ContentBlock::Audio(audio) => {
                text.push_str(&format!("[audio: {}]", audio.mime_type));
            }
            ContentBlock::Resource(_) => text.push_str("[embedded resource]"),
            ContentBlock::ResourceLink(link) => {
                text.push_str(&format!("[resource: {}]", link.uri));
            }
            _ => text.push_str("[content of a kind this runtime does not show]"),
        }
    }
    if text.is_empty() {
        if let Some(structured) = &result.structured_content {
            text = structured.to_string();
        }
    }
    let truncated = text.len() > cap;
    if truncated {
        text.truncate(text.floor_char_boundary(cap));
    }
    if result.is_error == Some(true) {
        let mut outcome = ToolOutcome::failed(if text.is_empty() {
            "the MCP tool reported an error".to_string()
        } else {
            text.clone()
        });
        outcome.stdout = text;
        outcome.truncated = truncated;
        outcome
    } else {
        ToolOutcome::ok_text(text, truncated)
    }
}

/// One MCP tool as the registry's executor.
struct McpTool {
    source: Arc<ServerSource>,
    name: String,
}

impl ExternalTool for McpTool {
    fn call<'a>(
        &'a self,
        arguments: &'a Value,
        ctx: &'a ToolContext,
    ) -> BoxFuture<'a, ToolOutcome> {
        Box::pin(
            self.source
                .call(&self.name, arguments, ctx.max_output_bytes),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stdio pipe's error keeps its kind through the bounded transport;
    /// another transport's error is wrapped, its text kept.
    #[test]
    fn an_io_error_keeps_its_kind_and_another_is_wrapped() {
        let pipe = into_io_error(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "gone"));
        assert_eq!(pipe.kind(), std::io::ErrorKind::BrokenPipe);
        assert_eq!(pipe.to_string(), "gone");
        let other = into_io_error(std::fmt::Error);
        assert_eq!(other.kind(), std::io::ErrorKind::Other);
        assert_eq!(other.to_string(), std::fmt::Error.to_string());
    }
}
