//! A served model behind an OpenAI-compatible API (vLLM, SGLang,
//! llama-server, Ollama, any `/v1/chat/completions`), as a [`ModelBackend`]:
//! the agent loop drives it exactly as it drives the in-process model, so
//! every call still goes through validation, policy, the sandbox, redaction,
//! audit and transcripts.
//!
//! # Two paths for tool calls
//!
//! * **Native** (the default): streaming chat completions with `tools` and
//!   `tool_choice`; the server's own tool parser returns `tool_calls`,
//!   assembled here from their deltas. Calls a server leaves in the text
//!   (Qwen printing `{"name": …}` as chat, Hermes `<tool_call>` left in the
//!   content) are recovered by the runtime's own parsers. With `strict`,
//!   function definitions ask OpenAI-style servers for schema-exact calls.
//! * **Prompted**, for llama-server serving a model whose template cannot
//!   show tools (llama-server would ignore them): the runtime renders the
//!   prompt with the model's own template (from `/props`) or its ChatML
//!   tools fallback, exactly as the in-process backend does, and sends it
//!   to llama-server's `/completion` with the same lazy tool-call grammar,
//!   so every call is valid by construction, remotely too.
//!
//! # Robustness
//!
//! Separate connect, first-token and idle timeouts; retries with backoff
//! on connect errors, 429 and 5xx, only before anything has streamed;
//! cancellation drops the HTTP stream (closing the connection, which stops
//! generation on llama-server and vLLM); and every failure is a specific
//! [`RemoteError`] that leaves the session usable for the next turn.
//!
//! # Secrets
//!
//! The API key comes from an environment variable or a file, is held in an
//! [`ApiKey`] whose `Debug` shows nothing, and is only ever written into the
//! `Authorization` header: never into logs, errors, transcripts or events.

mod sse;
mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::backend::{
    offered_tools, prompt_tools, tool_name, BackendInfo, BackendSession, CallPath, Capabilities,
    CompletionRequest, Counters, Generation, ModelBackend, ModelError, StopReason,
};
use crate::call_grammar::CallCount;
use crate::formats::ToolFormat;
use crate::grammar::ToolChoice;
use crate::template::PromptRenderer;
use crate::toolcall::{parse_reply, ParsedTurn};
use sse::SseDecoder;
use wire::{Assembler, Finish, StreamProblem};

/// What kind of server answers, as far as its `/models` listing tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerKind {
    /// llama.cpp's `llama-server`.
    LlamaServer,
    /// vLLM.
    Vllm,
    /// SGLang.
    Sglang,
    /// Ollama.
    Ollama,
    /// Any other OpenAI-compatible server.
    Generic,
}

impl ServerKind {
    fn from_owner(owned_by: &str) -> ServerKind {
        match owned_by {
            "llamacpp" => ServerKind::LlamaServer,
            "vllm" => ServerKind::Vllm,
            "sglang" => ServerKind::Sglang,
            "library" | "ollama" => ServerKind::Ollama,
            _ => ServerKind::Generic,
        }
    }

    /// Its name, for banners.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerKind::LlamaServer => "llama-server",
            ServerKind::Vllm => "vLLM",
            ServerKind::Sglang => "SGLang",
            ServerKind::Ollama => "Ollama",
            ServerKind::Generic => "OpenAI-compatible server",
        }
    }
}

/// How tool calls travel (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolPath {
    /// Prompted where the server is llama-server and the model's template
    /// cannot show tools; native otherwise.
    #[default]
    Auto,
    /// `tools` in a chat-completions request; the server parses calls.
    Native,
    /// The runtime renders the prompt and constrains calls (llama-server).
    Prompted,
}

/// An API key. Its `Debug` and `Display` show nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// A key given directly (from a config the caller read).
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into().trim().to_string())
    }

    /// The key in environment variable `var`.
    pub fn from_env(var: &str) -> Result<ApiKey, RemoteError> {
        match std::env::var(var) {
            Ok(key) if !key.trim().is_empty() => Ok(ApiKey::new(key)),
            _ => Err(RemoteError::Config(format!(
                "the API key variable {var} is not set (or empty)"
            ))),
        }
    }

    /// The key in file `path` (its first line).
    ///
    /// A file that others may write is refused: whoever can write it
    /// chooses the key, and so the server this runtime's requests go to
    /// believe they come from. One that others may read is read with a
    /// warning (container secrets are often mounted 0444 or 0644).
    pub fn from_file(path: &std::path::Path) -> Result<ApiKey, RemoteError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(path) {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o022 != 0 {
                    return Err(RemoteError::Config(format!(
                        "the API key file {} may be written by other users (mode {mode:o}); run chmod 600 on it",
                        path.display()
                    )));
                }
                if mode & 0o044 != 0 {
                    tracing::warn!(
                        file = %path.display(),
                        mode = format!("{mode:o}"),
                        "the API key file may be read by other users; run chmod 600 on it"
                    );
                }
            }
        }
        let text = std::fs::read_to_string(path).map_err(|err| {
            RemoteError::Config(format!(
                "reading the API key file {}: {err}",
                path.display()
            ))
        })?;
        match text.lines().next().map(str::trim) {
            Some(key) if !key.is_empty() => Ok(ApiKey::new(key)),
            _ => Err(RemoteError::Config(format!(
                "the API key file {} is empty",
                path.display()
            ))),
        }
    }
}

impl ApiKey {
    /// `text` with every copy of the key blanked out: a server that echoes
    /// the `Authorization` header in its error must not put the key in
    /// the runtime's errors, logs or transcripts.
    fn scrub(&self, text: &str) -> String {
        if self.0.is_empty() {
            text.to_string()
        } else {
            text.replace(&self.0, "<redacted>")
        }
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Timeouts, each for one phase of a request. Default: 10 s to connect,
/// 300 s to the first token, 60 s between chunks; no limit on the whole
/// request while chunks keep coming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing the connection.
    pub connect: Duration,
    /// From sending the request to the first streamed token (prompt
    /// processing on the server, queueing included).
    pub first_token: Duration,
    /// Between two streamed chunks.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            first_token: Duration::from_secs(300),
            idle: Duration::from_secs(60),
        }
    }
}

/// Where the model is served and how to talk to it.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// The API base, for example `http://127.0.0.1:8080/v1`.
    pub base_url: String,
    /// The model to ask for; the server's first model when `None`.
    pub model: Option<String>,
    /// The API key, if the server wants one. It is sent as a bearer token
    /// on every request: over `http://` to a host that is not loopback it
    /// crosses the network in plain text, which `connect` warns about.
    pub api_key: Option<ApiKey>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Attempts after the first, on connect errors, 429 and 5xx, before
    /// anything has streamed.
    pub retries: u32,
    /// How tool calls travel.
    pub tool_path: ToolPath,
    /// Send OpenAI `strict` function schemas (servers that support them
    /// then return only schema-valid calls).
    pub strict: bool,
    /// Whether to ask the server to constrain calls under `tool_choice:
    /// auto` with a structural tag.
    pub call_constraint: CallConstraint,
    /// A PEM file of CA certificates to trust for `https://` besides the
    /// public roots: a server behind an internal CA. Nothing else is
    /// trusted; no check is ever turned off.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Whether the runtime asks a served model's server to constrain calls
/// made under `tool_choice: auto` (under `required` or a named tool, vLLM
/// and SGLang constrain them on their own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallConstraint {
    /// A structural tag where the server is vLLM or SGLang; nothing
    /// elsewhere.
    #[default]
    Auto,
    /// A structural tag whatever the server (a proxy in front of vLLM or
    /// SGLang, say).
    StructuralTag,
    /// Never: calls are validated and fed back.
    Off,
}

impl RemoteConfig {
    /// A config for the server at `base_url`, with defaults for the rest:
    /// the server's first model, no API key, [`Timeouts::default`], 3
    /// retries, [`ToolPath::Auto`], no `strict` schemas. The HTTP client
    /// follows the environment's proxy settings (`HTTPS_PROXY`, ...).
    pub fn new(base_url: impl Into<String>) -> Self {
        RemoteConfig {
            base_url: base_url.into(),
            model: None,
            api_key: None,
            timeouts: Timeouts::default(),
            retries: 3,
            tool_path: ToolPath::Auto,
            strict: false,
            call_constraint: CallConstraint::Auto,
            ca_file: None,
        }
    }
}

/// The certificates in the PEM file `path`, refused (naming the file) when
/// it cannot be read or holds none.
async fn ca_certificates(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, RemoteError> {
    let pem = tokio::fs::read(path).await.map_err(|err| {
        RemoteError::Config(format!("reading the CA file {}: {err}", path.display()))
    })?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|err| {
        RemoteError::Config(format!(
            "the CA file {} is not PEM certificates: {err}",
            path.display()
        ))
    })?;
    if certificates.is_empty() {
        return Err(RemoteError::Config(format!(
            "the CA file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certificates)
}

/// Whether a key sent to `base` would cross the network unencrypted:
/// `http://` to a host that is not loopback.
fn model_key_in_plain_text(base: &str, has_key: bool) -> bool {
    let Ok(url) = reqwest::Url::parse(base) else {
        return false;
    };
    let loopback = url.host_str().is_some_and(|host| {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    has_key && url.scheme() == "http" && !loopback
}

/// Which phase of a request timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connecting.
    Connect,
    /// Waiting for the first token.
    FirstToken,
    /// Waiting for the next chunk.
    Idle,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connecting",
            Phase::FirstToken => "waiting for the first token",
            Phase::Idle => "waiting for the next token",
        })
    }
}

/// Why a served model could not answer. Each leaves the session usable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteError {
    /// The server could not be reached.
    #[error("could not reach the model server at {url}: {reason} (is it running?)")]
    Connect {
        /// The URL tried.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The server refused the credentials.
    #[error("the model server refused the request (HTTP {status}): wrong or missing API key ({message})")]
    Unauthorized {
        /// 401 or 403.
        status: u16,
        /// What the server said.
        message: String,
    },
    /// The server does not serve the model asked for.
    #[error("the model server has no model `{model}`{}", served_list(available))]
    UnknownModel {
        /// The name asked for.
        model: String,
        /// The names it serves.
        available: Vec<String>,
    },
    /// The conversation no longer fits the served context.
    #[error("the conversation is longer than the served model's context ({message}); start a new session (/reset) or use a model with a longer context")]
    ContextExceeded {
        /// What the server said.
        message: String,
    },
    /// Any other HTTP error.
    #[error("the model server answered HTTP {status}: {message}")]
    Http {
        /// The status.
        status: u16,
        /// What it said.
        message: String,
    },
    /// The connection ended before the turn did.
    #[error("the model server closed the stream in the middle of the answer ({reason}); the partial answer was dropped")]
    Disconnected {
        /// What happened.
        reason: String,
    },
    /// The stream was not a chat-completions stream.
    #[error("the model server sent a malformed stream: {0}")]
    MalformedStream(String),
    /// A phase took too long.
    #[error("the model server timed out {phase} (after {} s)", after.as_secs_f32())]
    Timeout {
        /// Which phase.
        phase: Phase,
        /// How long it waited.
        after: Duration,
    },
    /// The configuration cannot work.
    #[error("remote model: {0}")]
    Config(String),
}

/// A served model.
pub struct RemoteModel {
    client: reqwest::Client,
    config: RemoteConfig,
    /// The API base without a trailing slash.
    base: String,
    /// The server root (the base without `/v1`), for llama-server's own
    /// endpoints.
    root: String,
    model: String,
    kind: ServerKind,
    context_length: Option<u32>,
    /// Set when calls take the prompted path.
    renderer: Option<PromptRenderer>,
    /// Set once the server refused a structural tag (an HTTP 400 or 422
    /// that the same request without it did not get): it is not sent
    /// again.
    structural_tag_refused: AtomicBool,
    /// Set once the server refused a `tool_choice` for want of a tool
    /// parser (vLLM without `--enable-auto-tool-choice`): from then on the
    /// tools go in the system message and calls are parsed from the text,
    /// a forced call held to its schema by a `response_format`.
    tool_choice_refused: AtomicBool,
}

impl std::fmt::Debug for RemoteModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteModel")
            .field("base", &shown_url(&self.base))
            .field("model", &self.model)
            .field("kind", &self.kind)
            .field("prompted", &self.renderer.is_some())
            .finish()
    }
}

/// The system prompt the tools fallback uses (as in process).
const DEFAULT_SYSTEM: &str = "You are a helpful assistant that can call tools.";

impl RemoteModel {
    /// Connects to the server: lists its models, checks the one asked for,
    /// and learns what it can (context length; for llama-server, the chat
    /// template and whether it shows tools).
    pub async fn connect(config: RemoteConfig) -> Result<Arc<RemoteModel>, ModelError> {
        let base = config.base_url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(RemoteError::Config(format!(
                "the model URL must start with http:// or https:// (got {})",
                shown_url(&base)
            ))
            .into());
        }
        if model_key_in_plain_text(&base, config.api_key.is_some()) {
            // The host only: a URL may carry credentials of its own.
            let host = reqwest::Url::parse(&base)
                .ok()
                .and_then(|url| url.host_str().map(str::to_string))
                .unwrap_or_default();
            tracing::warn!(
                %host,
                "the API key will cross the network in plain text: use https:// for a model server that is not on this machine"
            );
        }
        let root = base
            .strip_suffix("/v1")
            .unwrap_or(base.as_str())
            .to_string();
        let mut client = reqwest::Client::builder()
            .connect_timeout(config.timeouts.connect)
            .tcp_nodelay(true);
        if let Some(path) = &config.ca_file {
            for certificate in ca_certificates(path).await? {
                client = client.add_root_certificate(certificate);
            }
        }
        let client = client
            .build()
            .map_err(|err| RemoteError::Config(format!("making the HTTP client: {err}")))?;
        let mut model = RemoteModel {
            client,
            base,
            root,
            model: String::new(),
            kind: ServerKind::Generic,
            context_length: None,
            renderer: None,
            structural_tag_refused: AtomicBool::new(false),
            tool_choice_refused: AtomicBool::new(false),
            config,
        };
        let listing = model.get_json(&format!("{}/models", model.base)).await?;
        let entries: Vec<&Value> = listing
            .get("data")
            .and_then(Value::as_array)
            .map(|d| d.iter().collect())
            .unwrap_or_default();
        let ids: Vec<String> = entries
            .iter()
            .filter_map(|e| e.get("id").and_then(Value::as_str).map(str::to_string))
            .collect();
        let chosen = match &model.config.model {
            Some(name) => entries
                .iter()
                .find(|e| {
                    e.get("id").and_then(Value::as_str) == Some(name.as_str())
                        || e.get("aliases")
                            .and_then(Value::as_array)
                            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(name.as_str())))
                })
                .copied()
                .ok_or_else(|| RemoteError::UnknownModel {
                    model: name.clone(),
                    available: ids.clone(),
                })?,
            None => entries.first().copied().ok_or_else(|| {
                RemoteError::Config("the server lists no models at /models".into())
            })?,
        };
        model.model = match &model.config.model {
            Some(name) => name.clone(),
            None => chosen
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        };
        model.kind = ServerKind::from_owner(
            chosen
                .get("owned_by")
                .and_then(Value::as_str)
                .unwrap_or_default(),
        );
        let number = |v: Option<&Value>| {
            v.and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n > 0)
        };
        model.context_length = number(chosen.pointer("/meta/n_ctx"))
            .or_else(|| number(chosen.get("max_model_len")))
            .or_else(|| number(chosen.get("context_length")));
        if model.kind == ServerKind::LlamaServer {
            if let Ok(props) = model.get_json(&format!("{}/props", model.root)).await {
                model.context_length = number(props.pointer("/default_generation_settings/n_ctx"))
                    .or(model.context_length);
                let template = props
                    .get("chat_template")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let shows_tools = props
                    .pointer("/chat_template_caps/supports_tools")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                let prompted = match model.config.tool_path {
                    ToolPath::Prompted => true,
                    ToolPath::Native => false,
                    ToolPath::Auto => !shows_tools,
                };
                if prompted && !template.is_empty() {
                    model.renderer = Some(PromptRenderer::new(template, DEFAULT_SYSTEM)?);
                }
            }
        }
        if model.kind == ServerKind::Ollama {
            model.context_length = model.ollama_context().await.or(model.context_length);
        }
        if model.config.tool_path == ToolPath::Prompted && model.renderer.is_none() {
            return Err(RemoteError::Config(
                "the prompted tool path needs llama-server (its /props and /completion endpoints)"
                    .into(),
            )
            .into());
        }
        Ok(Arc::new(model))
    }

    /// The context Ollama runs the model with, where it says: the loaded
    /// model's in `/api/ps`, else the `num_ctx` its Modelfile sets (from
    /// `/api/show`). Ollama's OpenAI endpoint cannot set it per request,
    /// and a prompt over it is cut from the start without an error (see
    /// `PromptSeen`), so the banner should show it. `None` where neither
    /// says: then the server's default (`OLLAMA_CONTEXT_LENGTH`) applies.
    async fn ollama_context(&self) -> Option<u32> {
        let number = |v: Option<&Value>| {
            v.and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n > 0)
        };
        if let Ok(running) = self.get_json(&format!("{}/api/ps", self.root)).await {
            let loaded = running
                .get("models")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|m| {
                    m.get("name").and_then(Value::as_str) == Some(self.model.as_str())
                        || m.get("model").and_then(Value::as_str) == Some(self.model.as_str())
                })
                .and_then(|m| number(m.get("context_length")));
            if loaded.is_some() {
                return loaded;
            }
        }
        let shown = self
            .authorized(self.client.post(format!("{}/api/show", self.root)))
            .timeout(self.config.timeouts.connect + self.config.timeouts.idle)
            .json(&json!({"model": self.model}))
            .send()
            .await
            .ok()
            .filter(|response| response.status().is_success())?
            .json::<Value>()
            .await
            .ok()?;
        let num_ctx = shown
            .get("parameters")
            .and_then(Value::as_str)
            .into_iter()
            .flat_map(str::lines)
            .find_map(|line| {
                let mut words = line.split_whitespace();
                (words.next() == Some("num_ctx"))
                    .then(|| words.next().and_then(|n| n.parse::<u32>().ok()))
                    .flatten()
                    .filter(|n| *n > 0)
            });
        if num_ctx.is_none() {
            let trained = shown
                .get("model_info")
                .and_then(Value::as_object)
                .and_then(|info| {
                    info.iter()
                        .find(|(key, _)| key.ends_with(".context_length"))
                        .and_then(|(_, v)| number(Some(v)))
                });
            tracing::info!(
                model = %self.model,
                trained = ?trained,
                "Ollama runs this model with its default context (OLLAMA_CONTEXT_LENGTH), which may be far below what it was trained for; a longer conversation is cut from the start"
            );
        }
        num_ctx
    }

    /// The model's name as the server knows it.
    pub fn model_name(&self) -> &str {
        &self.model
    }

    /// The kind of server.
    pub fn server_kind(&self) -> ServerKind {
        self.kind
    }

    /// Whether native requests carry a structural tag for the calls.
    fn sends_structural_tag(&self) -> bool {
        let wanted = match self.config.call_constraint {
            CallConstraint::Auto => matches!(self.kind, ServerKind::Vllm | ServerKind::Sglang),
            CallConstraint::StructuralTag => true,
            CallConstraint::Off => false,
        };
        wanted && !self.structural_tag_refused.load(Ordering::SeqCst)
    }

    /// Whether calls take the prompted path (see the module docs).
    pub fn prompted(&self) -> bool {
        self.renderer.is_some()
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.config.api_key {
            Some(ApiKey(key)) => request.bearer_auth(key),
            None => request,
        }
    }

    /// `text` from the server, without the API key in it.
    fn scrubbed(&self, text: &str) -> String {
        match &self.config.api_key {
            Some(key) => key.scrub(text),
            None => text.to_string(),
        }
    }

    async fn get_json(&self, url: &str) -> Result<Value, RemoteError> {
        let response = self
            .authorized(self.client.get(url))
            .timeout(self.config.timeouts.connect + self.config.timeouts.idle)
            .send()
            .await
            .map_err(|err| connect_error(url, &err))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(RemoteError::Config(format!(
                "{} does not exist (HTTP 404): is the model URL the API base, such as http://host:port/v1?",
                shown_url(url)
            )));
        }
        if !status.is_success() {
            let body = tokio::time::timeout(self.config.timeouts.idle, response.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            return Err(http_error(
                status.as_u16(),
                &self.scrubbed(&body),
                &self.model,
            ));
        }
        response.json::<Value>().await.map_err(|err| {
            RemoteError::MalformedStream(format!("{}: {}", shown_url(url), err.without_url()))
        })
    }

    /// Sends `body` to `url` and returns the streaming response, retrying
    /// connect, timeout and on-the-wire request errors, 429 and 5xx with
    /// backoff (nothing has streamed yet).
    /// `None` when `cancel` was set first (llama-server sends its headers
    /// only with the first token, so this can take a whole prompt).
    async fn post_stream(
        &self,
        url: &str,
        body: &Value,
        cancel: &AtomicBool,
    ) -> Result<Option<reqwest::Response>, RemoteError> {
        let mut attempt = 0;
        loop {
            let send = tokio::time::timeout(
                self.config.timeouts.connect + self.config.timeouts.first_token,
                self.authorized(self.client.post(url)).json(body).send(),
            );
            let Some(sent) = until_cancelled(send, cancel).await else {
                return Ok(None);
            };
            let retry_after = match sent {
                Err(_) => {
                    return Err(RemoteError::Timeout {
                        phase: Phase::FirstToken,
                        after: self.config.timeouts.connect + self.config.timeouts.first_token,
                    })
                }
                // Nothing came back, so nothing has streamed: a refused
                // connection, a timeout, or a request that failed on the
                // wire (a kept-alive connection the server had closed:
                // "connection closed before message completed") is tried
                // again. A redirect or body error would fail the same way.
                Ok(Err(err)) if err.is_connect() || err.is_timeout() || err.is_request() => {
                    if attempt >= self.config.retries {
                        return Err(connect_error(url, &err));
                    }
                    None
                }
                Ok(Err(err)) => return Err(connect_error(url, &err)),
                Ok(Ok(response)) => {
                    let status = response.status().as_u16();
                    if response.status().is_success() {
                        return Ok(Some(response));
                    }
                    let retryable = status == 429 || (500..600).contains(&status);
                    let wait = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| retry_after(v, std::time::SystemTime::now()));
                    let text = tokio::time::timeout(self.config.timeouts.idle, response.text())
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or_default();
                    let error = http_error(status, &self.scrubbed(&text), &self.model);
                    if !retryable
                        || attempt >= self.config.retries
                        || matches!(error, RemoteError::ContextExceeded { .. })
                    {
                        return Err(error);
                    }
                    wait
                }
            };
            let backoff = Duration::from_millis(250u64 << attempt.min(6));
            let pause = tokio::time::sleep(retry_after.unwrap_or(backoff));
            if until_cancelled(pause, cancel).await.is_none() {
                return Ok(None);
            }
            attempt += 1;
        }
    }
}

/// How long a `Retry-After` header asks to wait: seconds, or an HTTP date
/// (RFC 9110 §10.2.3; a date already past is no wait), at most 30 s so a
/// turn is not held for minutes. `None` where it is neither, and the
/// usual backoff applies.
fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(Duration::from_secs(30)))
}

/// Runs `future` until it ends, or returns `None` once `cancel` is set.
async fn until_cancelled<F: std::future::Future>(
    future: F,
    cancel: &AtomicBool,
) -> Option<F::Output> {
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    tokio::pin!(future);
    loop {
        tokio::select! {
            output = &mut future => return Some(output),
            _ = poll.tick() => {
                if cancel.load(Ordering::SeqCst) {
                    return None;
                }
            }
        }
    }
}

/// A URL as errors, logs and banners show it: without a user name,
/// password or query string, where credentials may ride along
/// (`https://user:key@host/v1`, `?api_key=...`).
pub fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            let had_query = parsed.query().is_some();
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.set_query(None);
            parsed.set_fragment(None);
            let mut shown = parsed.to_string();
            if had_query {
                shown.push_str("?…");
            }
            // `Url` writes a bare host with a `/` path; keep what was given.
            if !url.ends_with('/') && shown.ends_with('/') && !had_query {
                shown.pop();
            }
            shown
        }
        // Not a URL: what follows the last `@`, before any `?` or `#`.
        Err(_) => {
            let (prefix, rest) = match url.rfind('@') {
                Some(at) => ("…@", &url[at + 1..]),
                None => ("", url),
            };
            let cut = rest.find(['?', '#']).unwrap_or(rest.len());
            let more = if cut < rest.len() { "?…" } else { "" };
            format!("{prefix}{}{more}", &rest[..cut])
        }
    }
}

fn connect_error(url: &str, err: &reqwest::Error) -> RemoteError {
    // reqwest's own text names the URL (with any credentials in it): that
    // part is shown redacted; the chain says why.
    let named = err.url().map(|u| (u.to_string(), shown_url(u.as_str())));
    let mut reason = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(err);
    while let Some(cause) = source {
        let mut text = cause.to_string();
        if let Some((full, shown)) = &named {
            text = text.replace(full.as_str(), shown);
        }
        if !reason.contains(&text) {
            if !reason.is_empty() {
                reason.push_str(": ");
            }
            reason.push_str(&text);
        }
        source = cause.source();
    }
    if err.is_timeout() {
        reason.push_str(" (timed out)");
    }
    if reason.contains("certificate") && url.starts_with("https://") {
        reason.push_str(
            " (a server behind an internal CA: give its certificate with --model-ca-file or a profile's ca_file)",
        );
    }
    RemoteError::Connect {
        url: shown_url(url),
        reason,
    }
}

/// The error for a non-2xx answer with `body`.
fn http_error(status: u16, body: &str, model: &str) -> RemoteError {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("message"))
                .or_else(|| v.get("error").filter(|e| e.is_string()))
                .or_else(|| v.get("detail"))
        })
        .map(|m| m.as_str().map_or_else(|| m.to_string(), str::to_string))
        .unwrap_or_else(|| wire::preview(body.trim()));
    let kind = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/type").or_else(|| v.get("type")))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let lower = format!("{kind} {}", message.to_lowercase());
    // Where the server gives both numbers they decide: a prompt that fits
    // with too little room for the answer is asked again (see `run`).
    let over_context = match context_and_prompt(&message) {
        Some((window, prompt)) => prompt >= window,
        None => is_context_message(&lower),
    };
    match status {
        401 | 403 => RemoteError::Unauthorized { status, message },
        _ if over_context => RemoteError::ContextExceeded { message },
        404 if lower.contains("model") => RemoteError::UnknownModel {
            model: model.to_string(),
            available: Vec::new(),
        },
        _ => RemoteError::Http { status, message },
    }
}

/// `; it serves: a, b`, or where the list is not known, where to find it.
fn served_list(available: &[String]) -> String {
    if available.is_empty() {
        " (see its /v1/models for the names it serves)".into()
    } else {
        format!("; it serves: {}", available.join(", "))
    }
}

/// The context window and the prompt's length, where the server's error
/// says a request asked for more tokens than its context holds: vLLM
/// (`This model's maximum context length is 4096 tokens and your request
/// has 3700 input tokens (512 > 4096 - 3700)`, and before 0.10 `However,
/// you requested 4612 tokens (4100 in the messages, 512 in the
/// completion)`), SGLang (`... maximum context length of 4096 tokens ...
/// 4100 tokens from the input messages ...`). These servers refuse a
/// request whose prompt plus `max_tokens` does not fit, where llama-server
/// cuts the answer short.
fn context_and_prompt(message: &str) -> Option<(u64, u64)> {
    // `128,000` is one number.
    let mut lower = String::with_capacity(message.len());
    let mut chars = message.chars().peekable();
    while let Some(c) = chars.next() {
        let between_digits = c == ','
            && lower.ends_with(|p: char| p.is_ascii_digit())
            && chars.peek().is_some_and(char::is_ascii_digit);
        if !between_digits {
            lower.extend(c.to_lowercase());
        }
    }
    let window = ["maximum context length is ", "maximum context length of "]
        .iter()
        .find_map(|needle| number_after(&lower, needle))?;
    let prompt = [
        " input tokens",
        " in the messages",
        " tokens from the input",
        " prompt tokens",
    ]
    .iter()
    .find_map(|needle| number_before(&lower, needle))?;
    Some((window, prompt))
}

/// The number that directly follows `needle` in `text`.
fn number_after(text: &str, needle: &str) -> Option<u64> {
    let start = text.find(needle)? + needle.len();
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The number that directly precedes `needle` in `text`.
fn number_before(text: &str, needle: &str) -> Option<u64> {
    let end = text.find(needle)?;
    let head = &text[..end];
    let start = head
        .char_indices()
        .rev()
        .find(|(_, c)| !c.is_ascii_digit())
        .map_or(0, |(i, c)| i + c.len_utf8());
    head[start..].parse().ok()
}

/// The answer's room in the context, where `message` is a server's refusal
/// of a prompt that fits but not with `max_tokens` more. One token short
/// of the window: SGLang refuses a request that would fill it exactly.
fn answer_room(message: &str) -> Option<u64> {
    context_and_prompt(message)
        .and_then(|(window, prompt)| window.checked_sub(prompt + 1))
        .filter(|room| *room > 0)
}

fn is_context_message(lower: &str) -> bool {
    lower.contains("exceed_context_size")
        || (lower.contains("context")
            && (lower.contains("exceed")
                || lower.contains("larger than")
                || lower.contains("too long")
                || lower.contains("longer than")
                || (lower.contains("maximum context length") && !lower.contains("max_tokens"))))
}

impl From<RemoteError> for ModelError {
    fn from(err: RemoteError) -> Self {
        ModelError::Remote(err)
    }
}

impl ModelBackend for RemoteModel {
    fn info(&self) -> BackendInfo {
        let path = if self.prompted() {
            "prompted tool calls under the runtime's grammar"
        } else if self.tool_choice_refused.load(Ordering::SeqCst) {
            "tools in the prompt: the server has no tool parser"
        } else {
            "native tool_calls"
        };
        BackendInfo {
            name: self.model.clone(),
            detail: format!(
                "served by {} at {} ({path})",
                self.kind.as_str(),
                shown_url(&self.base)
            ),
            context_length: self.context_length,
            parameters: None,
            capabilities: Capabilities {
                constrained_decoding: (self.prompted() && cfg!(feature = "llama"))
                    || self.config.strict
                    || (!self.prompted() && self.sends_structural_tag()),
                kv_prefix_reuse: matches!(
                    self.kind,
                    ServerKind::LlamaServer | ServerKind::Vllm | ServerKind::Sglang
                ),
                native_tool_calls: !self.prompted(),
                saved_state: false,
                shared_context: true,
            },
        }
    }

    fn open_session(
        self: Arc<Self>,
    ) -> BoxFuture<'static, Result<Box<dyn BackendSession>, ModelError>> {
        Box::pin(async move {
            Ok(Box::new(RemoteSession {
                model: self,
                totals: Counters::default(),
                calls_made: 0,
                last_prompt: None,
            }) as Box<dyn BackendSession>)
        })
    }
}

/// One conversation with a served model. The server keeps no state for it
/// beyond its prefix cache; each turn sends the whole conversation.
pub struct RemoteSession {
    model: Arc<RemoteModel>,
    totals: Counters,
    calls_made: u64,
    /// The last answered request, to tell a prompt the server cut.
    last_prompt: Option<PromptSeen>,
}

/// A request as far as telling a cut prompt needs: how many messages it
/// had, a digest of them with the tools offered, and the prompt tokens
/// the server reported for it.
#[derive(Debug, Clone, Copy)]
struct PromptSeen {
    messages: usize,
    digest: u64,
    tokens: u64,
}

/// A digest of `messages` under `tools` and how they were sent.
fn prompt_digest(messages: &[stack_types::message::Message], tools: &[Value], shape: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    shape.hash(&mut hasher);
    serde_json::to_string(tools)
        .unwrap_or_default()
        .hash(&mut hasher);
    serde_json::to_string(messages)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

/// How a turn ended on the wire.
enum Ending {
    Finished(Finish),
    Cancelled,
}

impl RemoteSession {
    async fn run(
        &mut self,
        request: CompletionRequest,
        deltas: tokio::sync::mpsc::UnboundedSender<String>,
        cancel: Arc<AtomicBool>,
    ) -> Result<Generation, ModelError> {
        let model = Arc::clone(&self.model);
        let offered = offered_tools(&request.tools, &request.tool_choice);
        let (url, mut body) = match &model.renderer {
            Some(renderer) => {
                // As in process: every tool whenever any is offered.
                let rendered = prompt_tools(&request.tools, &offered);
                let prompt = renderer.render(&request.messages, rendered)?;
                (
                    format!("{}/completion", model.root),
                    prompt_body(&prompt, renderer.call_format(), &request, &offered)?,
                )
            }
            None => (
                format!("{}/chat/completions", model.base),
                wire::chat_body(
                    &model.model,
                    &request,
                    model.kind,
                    model.config.strict,
                    model.renderer.is_none() && model.sends_structural_tag(),
                ),
            ),
        };
        // As many tokens as the context holds: where the server stops at
        // the context's end on its own (vLLM and SGLang would refuse the
        // whole context as `max_tokens`), its default, the room the prompt
        // leaves; elsewhere (Ollama shifts its context and may never
        // stop) the context as the limit.
        if let Some(context) = model
            .context_length
            .filter(|context| request.sampling.max_tokens >= *context)
        {
            if let Some(fields) = body.as_object_mut() {
                match model.kind {
                    ServerKind::Vllm | ServerKind::Sglang | ServerKind::LlamaServer => {
                        fields.remove("max_tokens");
                        if fields.contains_key("n_predict") {
                            fields.insert("n_predict".into(), (-1).into());
                        }
                    }
                    ServerKind::Ollama | ServerKind::Generic => {
                        fields.insert("max_tokens".into(), context.into());
                    }
                }
            }
        }
        let mut tagged = body
            .pointer("/response_format/type")
            .and_then(Value::as_str)
            == Some("structural_tag");
        // Tools offered with a choice other than `none` (the chat body has
        // a `tool_choice` only then).
        let chooses_tools = model.renderer.is_none() && body.get("tool_choice").is_some();
        let mut tools_in_prompt = false;
        let mut forced_format = false;
        // The tools into the prompt, for a server with no tool parser; a
        // forced call held to its schema by a `response_format` instead of
        // the structural tag.
        // Returns whether a forced call's schema went with them.
        let into_prompt = |body: &mut Value, tagged: &mut bool| -> bool {
            if offered.is_empty() {
                // A named tool that is not among the tools: none offered,
                // none shown (as in process).
                if let Some(fields) = body.as_object_mut() {
                    for key in ["tools", "tool_choice", "parallel_tool_calls"] {
                        fields.remove(key);
                    }
                }
                return false;
            }
            wire::tools_into_prompt(body, DEFAULT_SYSTEM);
            match wire::forced_call_format(&request.tools, &request.tool_choice)
                .filter(|_| request.tool_choice != ToolChoice::Auto)
            {
                Some(format) => {
                    body["response_format"] = format;
                    *tagged = false;
                    true
                }
                None => false,
            }
        };
        if chooses_tools && model.tool_choice_refused.load(Ordering::SeqCst) {
            forced_format = into_prompt(&mut body, &mut tagged);
            tools_in_prompt = true;
        }
        let started = Instant::now();
        let mut sent = model.post_stream(&url, &body, &cancel).await;
        // A refusal before anything was generated may be mended and the
        // request sent again; each mend at most once, in whatever order a
        // server's checks name them.
        let mut room_asked = false;
        let mut tag_dropped: Option<(u16, String)> = None;
        while let Err(RemoteError::Http { status, message }) = &sent {
            let (status, message) = (*status, message.clone());
            if status == 400
                && chooses_tools
                && !tools_in_prompt
                && wire::refuses_tool_choice(&message)
            {
                // A server without a tool parser (vLLM started without
                // `--enable-auto-tool-choice`) refuses `tool_choice: auto`
                // (and, from vLLM 0.32, `required` and a named tool): the
                // tools go in the prompt instead, now and for the rest of
                // this model's sessions.
                if !model.tool_choice_refused.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        %message,
                        "the model server has no tool parser; the tools go in the system prompt and calls are parsed from the text (for native calls start vLLM with --enable-auto-tool-choice --tool-call-parser hermes)"
                    );
                }
                forced_format = into_prompt(&mut body, &mut tagged);
                tools_in_prompt = true;
            } else if let Some(room) = answer_room(&message)
                .filter(|_| status == 400 && !room_asked)
                .filter(|room| {
                    body.get("max_tokens")
                        .and_then(Value::as_u64)
                        .is_some_and(|asked| *room < asked)
                })
            {
                // vLLM and SGLang refuse a prompt that fits but leaves less
                // room than `max_tokens`: asked again for what room there
                // is, the answer may be cut short (`length`), as
                // llama-server cuts it.
                tracing::info!(
                    room,
                    "the served context leaves room for {room} tokens of answer; asking for that many"
                );
                body["max_tokens"] = room.into();
                room_asked = true;
            } else if forced_format
                && matches!(status, 400 | 422)
                && !is_context_message(&message.to_lowercase())
            {
                // A server that cannot take the call's JSON schema (one it
                // cannot compile): the call is asked for in the prompt
                // alone and read back from the text, then validated.
                tracing::warn!(
                    %status,
                    %message,
                    "the model server refused the forced call's JSON schema; the call is parsed from the text and validated"
                );
                if let Some(fields) = body.as_object_mut() {
                    fields.remove("response_format");
                }
                forced_format = false;
            } else if tagged && matches!(status, 400 | 422) {
                // A server that cannot take the tag: the same request
                // without it, and no tag from then on if that one is taken.
                if let Some(fields) = body.as_object_mut() {
                    fields.remove("response_format");
                }
                tagged = false;
                tag_dropped = Some((status, message));
            } else {
                break;
            }
            sent = model.post_stream(&url, &body, &cancel).await;
        }
        let sent = sent?;
        if let (Some((status, message)), Some(_)) = (&tag_dropped, &sent) {
            tracing::warn!(
                %status,
                %message,
                "the model server refused the structural tag for tool calls; calls are validated instead"
            );
            model.structural_tag_refused.store(true, Ordering::SeqCst);
        }
        let Some(response) = sent else {
            return Ok(Generation {
                text: String::new(),
                turn: ParsedTurn {
                    content: None,
                    tool_calls: Vec::new(),
                },
                stop: StopReason::Cancelled,
                counters: Counters::default(),
                routing_prompt_evaluated: 0,
                prompt_ms: started.elapsed().as_secs_f64() * 1e3,
                routing_ms: 0.0,
                generation_ms: 0.0,
                sampling_ms: 0.0,
                call_path: None,
                server_ms: None,
            });
        };
        // A JSON body where an event stream was asked for: an error some
        // servers and proxies send with status 200, or an answer that did
        // not stream. Named as such rather than read as an empty stream.
        let is_json = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("application/json"));
        if is_json {
            let text = tokio::time::timeout(model.config.timeouts.idle, response.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let text = model.scrubbed(&text);
            let has_error = serde_json::from_str::<Value>(&text)
                .is_ok_and(|v| v.get("error").is_some_and(|e| !e.is_null()));
            return Err(if has_error {
                http_error(200, &text, &model.model)
            } else {
                RemoteError::MalformedStream(format!(
                    "a JSON body instead of an event stream: {}",
                    wire::preview(&text)
                ))
            }
            .into());
        }
        let mut stream = response.bytes_stream();
        let mut last_data = Instant::now();
        let mut decoder = SseDecoder::default();
        let mut turn = Assembler::default();
        let mut first_token: Option<Instant> = None;
        let mut raw = RawCompletion::default();
        let mut poll = tokio::time::interval(Duration::from_millis(20));
        let ending = 'stream: loop {
            let limit = if turn.started || raw.started {
                model.config.timeouts.idle
            } else {
                model.config.timeouts.first_token
            };
            // Counted from the last event with data: keep-alive comments
            // (llama-server sends one every 30 s) do not keep a stuck
            // server alive.
            let left = limit.saturating_sub(last_data.elapsed());
            let next = tokio::time::timeout(left, async {
                loop {
                    tokio::select! {
                        chunk = stream.next() => return Some(chunk),
                        _ = poll.tick() => {
                            if cancel.load(Ordering::SeqCst) {
                                return None;
                            }
                        }
                    }
                }
            })
            .await;
            let chunk = match next {
                // The turn had finished; only the closing lines are late.
                Err(_) if turn.finish.or(raw.finish).is_some() => {
                    break 'stream Ending::Finished(
                        turn.finish.or(raw.finish).unwrap_or(Finish::Stop),
                    )
                }
                Err(_) => {
                    return Err(RemoteError::Timeout {
                        phase: if turn.started || raw.started {
                            Phase::Idle
                        } else {
                            Phase::FirstToken
                        },
                        after: limit,
                    }
                    .into())
                }
                // Cancelled: dropping the stream closes the connection.
                Ok(None) => break 'stream Ending::Cancelled,
                Ok(Some(None)) => {
                    // End of body: a turn that never said it finished was cut.
                    if let Some(data) = decoder.finish() {
                        self.take_event(&model, &data, &mut turn, &mut raw, &deltas)?;
                    }
                    if let Some(finish) = turn.finish.or(raw.finish) {
                        break 'stream Ending::Finished(finish);
                    }
                    return Err(RemoteError::Disconnected {
                        reason: "the response ended without a finish reason".into(),
                    }
                    .into());
                }
                Ok(Some(Some(Err(err)))) => {
                    let reason = match connect_error(&url, &err) {
                        RemoteError::Connect { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    return Err(RemoteError::Disconnected { reason }.into());
                }
                Ok(Some(Some(Ok(bytes)))) => bytes,
            };
            let events = decoder
                .push(&chunk)
                .map_err(|err| RemoteError::MalformedStream(err.0))?;
            for data in events {
                last_data = Instant::now();
                self.take_event(&model, &data, &mut turn, &mut raw, &deltas)?;
                if first_token.is_none() && (turn.started || raw.started) {
                    first_token = Some(Instant::now());
                }
                if raw.finish.is_some() || turn.done {
                    break 'stream Ending::Finished(
                        turn.finish.or(raw.finish).unwrap_or(Finish::Stop),
                    );
                }
            }
        };
        drop(stream);
        if let Ending::Finished(Finish::Aborted) = ending {
            // SGLang's `abort`, or `error`: what came is a fragment.
            return Err(RemoteError::Disconnected {
                reason: "the server ended the answer with finish_reason `abort` or `error`".into(),
            }
            .into());
        }
        let finished = Instant::now();
        let first = first_token.unwrap_or(finished);
        let counters = turn.usage.or(raw.usage).unwrap_or_default();
        self.totals.add(counters);
        // A server that cuts a prompt over its context instead of refusing
        // it (Ollama, at its `num_ctx`: 2,048 or 4,096 tokens unless
        // raised) drops the start of the conversation (the system prompt,
        // the tools) without a word. It shows in the usage: a conversation
        // that grew reported as fewer prompt tokens than before, and that
        // can no longer fit. (A drop alone is not enough: some servers
        // count only the tokens they did not have cached, and templates
        // may drop an earlier turn's reasoning. vLLM, SGLang and
        // llama-server refuse a prompt over their context.)
        let prompt_tokens = counters.prompt_evaluated + counters.prompt_reused;
        if matches!(model.kind, ServerKind::Ollama | ServerKind::Generic) && prompt_tokens > 0 {
            let shape = format!("{:?} {tools_in_prompt} {}", request.tool_choice, url);
            let seen = PromptSeen {
                messages: request.messages.len(),
                digest: prompt_digest(&request.messages, &offered, &shape),
                tokens: prompt_tokens,
            };
            // The conversation before grew into this one, yet was counted
            // as more tokens.
            let fell_from = self.last_prompt.filter(|before| {
                before.messages < seen.messages
                    && prompt_tokens < before.tokens
                    && prompt_digest(&request.messages[..before.messages], &offered, &shape)
                        == before.digest
            });
            if let Some(before) = fell_from {
                let context = match model.context_length {
                    Some(context) => Some(context),
                    // Loaded by now, so `/api/ps` knows.
                    None if model.kind == ServerKind::Ollama => model.ollama_context().await,
                    None => None,
                };
                // What the new messages add, at six characters a token
                // (about four in English prose): low, so that only a
                // conversation that surely outgrew the context counts.
                let added: usize = request.messages[before.messages..]
                    .iter()
                    .map(|message| {
                        message.content.as_ref().map_or(0, |content| {
                            serde_json::to_string(content).map_or(0, |text| text.len())
                        })
                    })
                    .sum();
                if let Some(context) = context
                    .filter(|context| before.tokens + (added / 6) as u64 >= u64::from(*context))
                {
                    return Err(RemoteError::ContextExceeded {
                        message: format!(
                            "the server cut the prompt to {prompt_tokens} tokens, fewer than the {} of the shorter conversation before it, to fit its context of {context} tokens, so the model no longer saw its start{}",
                            before.tokens,
                            if model.kind == ServerKind::Ollama {
                                "; raise Ollama's context (OLLAMA_CONTEXT_LENGTH, or num_ctx in a Modelfile)"
                            } else {
                                ""
                            }
                        ),
                    }
                    .into());
                }
            }
            if matches!(ending, Ending::Finished(_)) {
                self.last_prompt = Some(seen);
            }
        }
        let stop = match ending {
            Ending::Cancelled => StopReason::Cancelled,
            Ending::Finished(Finish::Length) => StopReason::MaxTokens,
            Ending::Finished(Finish::Stop) => StopReason::EndOfTurn,
            // Returned as an error above.
            Ending::Finished(Finish::Aborted) => StopReason::Cancelled,
        };
        let calls_made = &mut self.calls_made;
        let mut next_id = || {
            *calls_made += 1;
            format!("call_{}", *calls_made)
        };
        let names: Vec<&str> = offered.iter().filter_map(tool_name).collect();
        let server_ms = turn.server_ms.or(raw.server_ms);
        let (text, parsed, path) = if model.renderer.is_some() {
            let parsed = parse_reply(&raw.text, &offered, stop, &mut next_id);
            let path = if cfg!(feature = "llama") && !names.is_empty() {
                CallPath::Grammar
            } else {
                CallPath::Parsed
            };
            (raw.text, parsed, path)
        } else {
            let mut native = turn.calls(&mut next_id);
            match stop {
                // A cancelled turn proposes nothing; one cut by the token
                // budget keeps only calls whose arguments are whole JSON.
                StopReason::Cancelled => native.clear(),
                StopReason::MaxTokens => native
                    .retain(|call| serde_json::from_str::<Value>(&call.function.arguments).is_ok()),
                StopReason::EndOfTurn | StopReason::GrammarDeadEnd => {}
            }
            if native.is_empty() && !names.is_empty() && stop != StopReason::Cancelled {
                // The server left the call in the text: recover it.
                let parsed = parse_reply(&turn.content, &offered, stop, &mut next_id);
                // With the tools in the prompt the text is where calls
                // belong, and the structural tag (or, for a forced call,
                // the JSON schema) held them to their schemas.
                let path = if tools_in_prompt && tagged {
                    CallPath::StructuralTag
                } else if forced_format {
                    CallPath::JsonSchema
                } else {
                    CallPath::Parsed
                };
                (turn.content, parsed, path)
            } else {
                let content = turn.content.trim();
                let parsed = ParsedTurn {
                    content: (!content.is_empty()).then(|| content.to_string()),
                    tool_calls: native,
                };
                // vLLM holds a forced call to its `strict` schema; under
                // `auto` only the structural tag does.
                let forced = matches!(
                    request.tool_choice,
                    ToolChoice::Required | ToolChoice::Named(_)
                );
                let path = if tagged {
                    CallPath::StructuralTag
                } else if model.config.strict || (forced && model.kind == ServerKind::Vllm) {
                    CallPath::Strict
                } else {
                    CallPath::Native
                };
                (turn.content, parsed, path)
            }
        };
        let mut parsed = parsed;
        if request.sampling.calls_per_reply == CallCount::One {
            // A server may ignore `parallel_tool_calls: false` (and the
            // structural tag allows several): the first call is the reply's.
            parsed.tool_calls.truncate(1);
        }
        let call_path = (!parsed.tool_calls.is_empty()).then_some(path);
        Ok(Generation {
            text,
            turn: parsed,
            stop,
            counters,
            routing_prompt_evaluated: 0,
            prompt_ms: (first - started).as_secs_f64() * 1e3,
            routing_ms: 0.0,
            generation_ms: (finished - first).as_secs_f64() * 1e3,
            sampling_ms: 0.0,
            call_path,
            server_ms,
        })
    }

    fn take_event(
        &self,
        model: &RemoteModel,
        data: &str,
        turn: &mut Assembler,
        raw: &mut RawCompletion,
        deltas: &tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<(), RemoteError> {
        // Whatever the server sends, the key is blanked out of it before it
        // can reach an error, a log or the conversation.
        let scrubbed;
        let data = match &model.config.api_key {
            Some(key) if data.contains(key.0.as_str()) => {
                scrubbed = key.scrub(data);
                scrubbed.as_str()
            }
            _ => data,
        };
        let delta = if model.renderer.is_some() {
            raw.take(data)
        } else {
            turn.take(data)
        };
        match delta {
            Ok(Some(text)) => {
                let _ = deltas.send(text);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(StreamProblem::Malformed(detail)) => Err(RemoteError::MalformedStream(detail)),
            Err(StreamProblem::ServerError(message)) => {
                if is_context_message(&message.to_lowercase()) {
                    Err(RemoteError::ContextExceeded { message })
                } else {
                    Err(RemoteError::Http {
                        status: 200,
                        message,
                    })
                }
            }
        }
    }
}

impl BackendSession for RemoteSession {
    fn complete(
        &mut self,
        request: CompletionRequest,
        deltas: tokio::sync::mpsc::UnboundedSender<String>,
        cancel: Arc<AtomicBool>,
    ) -> BoxFuture<'_, Result<Generation, ModelError>> {
        Box::pin(self.run(request, deltas, cancel))
    }

    fn totals(&mut self) -> BoxFuture<'_, Counters> {
        let totals = self.totals;
        Box::pin(std::future::ready(totals))
    }

    fn clear(&mut self) {}

    fn save_state(
        &mut self,
        _file: stack_seal::StateFile,
    ) -> BoxFuture<'_, Result<(), ModelError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// The body of a streaming llama-server `/completion` for `prompt` under
/// `sampling`, before any grammar: what the prompted path sends for a
/// step with no tools (the remote benchmark's bare client sends it too).
pub fn completion_body(prompt: &str, sampling: &crate::backend::SamplingOptions) -> Value {
    json!({
        "prompt": prompt,
        "stream": true,
        "cache_prompt": true,
        "n_predict": sampling.max_tokens,
        "temperature": wire::decimal(sampling.temperature),
        "top_p": wire::decimal(sampling.top_p),
        "top_k": sampling.top_k_or_default(),
        "min_p": wire::decimal(sampling.min_p_or_default()),
        "repeat_penalty": wire::decimal(sampling.repeat_penalty_or_default()),
        "frequency_penalty": wire::decimal(sampling.frequency_penalty),
        "presence_penalty": wire::decimal(sampling.presence_penalty),
        "seed": sampling.seed,
    })
}

/// The body of a streaming llama-server `/completion` for a prompt the
/// runtime rendered, with the tool-call grammar (lazy under `auto`).
fn prompt_body(
    prompt: &str,
    format: ToolFormat,
    request: &CompletionRequest,
    offered: &[Value],
) -> Result<Value, ModelError> {
    let mut body = completion_body(prompt, &request.sampling);
    #[cfg(feature = "llama")]
    if !offered.is_empty() && request.tool_choice != ToolChoice::None {
        // In the syntax of the template the prompt was rendered with, as
        // in process.
        let crate::call_grammar::CallGrammar { gbnf, trigger } = crate::llama::format_grammar(
            format,
            offered,
            &request.argument_values,
            request.sampling.calls_per_reply,
        )?;
        body["grammar"] = gbnf.into();
        // The format's marker words, where one is a single token, come
        // back as text (llama-server leaves other special tokens out).
        body["preserved_tokens"] = json!(format.markers());
        if request.tool_choice == ToolChoice::Auto {
            body["grammar_lazy"] = true.into();
            // llama-server's trigger types are numbers: 2 is a pattern,
            // searched for the way the in-process sampler searches it.
            body["grammar_triggers"] = trigger
                .patterns()
                .into_iter()
                .map(|pattern| json!({"type": 2, "value": pattern}))
                .collect();
        }
    }
    #[cfg(not(feature = "llama"))]
    let _ = (offered, format);
    if let Some(schema) = &request.response_format {
        if body.get("grammar").is_none() {
            body["json_schema"] = schema.clone();
        }
    }
    Ok(body)
}

/// A llama-server `/completion` stream being read.
#[derive(Debug, Default)]
struct RawCompletion {
    server_ms: Option<f64>,
    text: String,
    finish: Option<Finish>,
    usage: Option<Counters>,
    started: bool,
}

impl RawCompletion {
    fn take(&mut self, data: &str) -> Result<Option<String>, StreamProblem> {
        let chunk: Value = serde_json::from_str(data)
            .map_err(|err| StreamProblem::Malformed(format!("{err} in {}", wire::preview(data))))?;
        if let Some(error) = chunk.get("error") {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| error.to_string(), str::to_string);
            return Err(StreamProblem::ServerError(message));
        }
        if chunk.get("stop").and_then(Value::as_bool) == Some(true) {
            self.finish = Some(
                if chunk.get("stop_type").and_then(Value::as_str) == Some("limit") {
                    Finish::Length
                } else {
                    Finish::Stop
                },
            );
            let usage = json!({
                "prompt_tokens": chunk.get("tokens_evaluated"),
                "completion_tokens": chunk.get("tokens_predicted"),
            });
            self.usage = Some(wire::counters(&usage, chunk.get("timings")));
            self.server_ms = wire::server_ms(chunk.get("timings"));
        }
        match chunk.get("content").and_then(Value::as_str) {
            Some(text) if !text.is_empty() => {
                self.started = true;
                self.text.push_str(text);
                Ok(Some(text.to_string()))
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn retry_after_is_read_as_seconds_or_as_a_date() {
        use std::time::{Duration, UNIX_EPOCH};
        // Wed, 21 Oct 2015 07:28:00 GMT
        let date = UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        let now = date - Duration::from_secs(7);
        for (header, wait) in [
            ("5", Some(5)),
            (" 12 ", Some(12)),
            ("3600", Some(30)),
            ("Wed, 21 Oct 2015 07:28:00 GMT", Some(7)),
            // RFC 850 and asctime forms, which RFC 9110 still accepts.
            ("Wednesday, 21-Oct-15 07:28:00 GMT", Some(7)),
            ("Wed Oct 21 07:28:00 2015", Some(7)),
            ("Tue, 20 Oct 2015 07:28:00 GMT", Some(0)),
            ("Thu, 22 Oct 2015 07:28:00 GMT", Some(30)),
            ("soon", None),
            ("-1", None),
        ] {
            assert_eq!(
                super::retry_after(header, now),
                wait.map(Duration::from_secs),
                "{header}"
            );
        }
    }

    #[test]
    fn a_key_file_is_read_only_when_it_is_the_users_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, "sk-test-1234\nignored second line\n").expect("write");
        for mode in [0o666, 0o620, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let open = ApiKey::from_file(&path).expect_err("a key others can write");
            assert!(open.to_string().contains("chmod 600"), "{open}");
            assert!(!open.to_string().contains("sk-test"), "{open}");
        }
        // Readable by others (a container's secret): read, with a warning.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).expect("chmod");
        assert!(ApiKey::from_file(&path).is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let key = ApiKey::from_file(&path).expect("the user's own key");
        assert_eq!(key.scrub("auth sk-test-1234 !"), "auth <redacted> !");
        std::fs::write(&path, "\n").expect("write");
        let empty = ApiKey::from_file(&path).expect_err("an empty file");
        assert!(empty.to_string().contains("is empty"), "{empty}");
    }

    #[test]
    fn a_context_too_small_for_max_tokens_is_told_from_one_too_small_for_the_prompt() {
        // As vLLM (0.10 and later, then before) and SGLang word them.
        let cases = [
            (
                "'max_tokens' or 'max_completion_tokens' is too large: 512. This model's maximum context length is 4096 tokens and your request has 3700 input tokens (512 > 4096 - 3700).",
                Some(395),
                false,
            ),
            (
                "This model's maximum context length is 4096 tokens. However, you requested 4612 tokens (4100 in the messages, 512 in the completion). Please reduce the length of the messages or completion.",
                None,
                true,
            ),
            (
                "Requested token count exceeds the model's maximum context length of 2048 tokens. You requested a total of 2100 tokens: 1900 tokens from the input messages and 200 tokens for the completion.",
                Some(147),
                false,
            ),
            (
                "This model's maximum context length is 4096 tokens. However, your request has 5000 input tokens. Please reduce the length of the input messages.",
                None,
                true,
            ),
            ("the request exceeds the available context size", None, true),
            ("Invalid value for tool_choice", None, false),
            // Peer text in any script: no panic, no room.
            ("maximum context length is 99 tokens…42 input tokens", Some(56), false),
            (
                "This model's maximum context length is 128,000 tokens and your request has 127,000 input tokens",
                Some(999),
                false,
            ),
            ("maximum context length is ∞ tokens, é input tokens", None, true),
        ];
        for (message, room, context) in cases {
            assert_eq!(answer_room(message), room, "{message}");
            let error = http_error(
                400,
                &json!({"error": {"message": message}}).to_string(),
                "m",
            );
            assert_eq!(
                matches!(error, RemoteError::ContextExceeded { .. }),
                context,
                "{message}: {error:?}"
            );
        }
        let unknown = RemoteError::UnknownModel {
            model: "m".into(),
            available: Vec::new(),
        };
        assert!(!unknown.to_string().contains("serves: "), "{unknown}");
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        for (url, shown) in [
            ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1"),
            (
                "https://user:sk-secret@models.example/v1",
                "https://models.example/v1",
            ),
            (
                "https://models.example/v1?api_key=sk-secret",
                "https://models.example/v1?…",
            ),
            ("not a url user:sk-secret@host", "…@host"),
            ("localhost:8080/v1?key=sk-secret", "localhost:8080/v1?…"),
        ] {
            assert_eq!(shown_url(url), shown, "{url}");
        }
    }

    #[tokio::test]
    async fn a_connect_error_does_not_show_the_urls_credentials() {
        // Nothing listens on port 1 of loopback.
        let url = "http://user:sk-secret@127.0.0.1:1/v1/models?key=sk-query";
        let err = reqwest::Client::new()
            .get(url)
            .send()
            .await
            .expect_err("nothing listens there");
        let err = connect_error(url, &err);
        assert!(matches!(err, RemoteError::Connect { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            !text.contains("sk-secret") && !text.contains("sk-query"),
            "{text}"
        );
        assert!(text.contains("127.0.0.1:1"), "{text}");
    }
    use super::*;

    /// The prompted path's `/completion` body carries the grammar of the
    /// template's own call syntax, its lazy trigger as llama-server
    /// pattern triggers, and the format's markers as preserved tokens.
    #[cfg(feature = "llama")]
    #[test]
    fn the_prompted_body_speaks_the_templates_call_syntax() {
        let tool = json!({"type": "function", "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        }});
        let offered = vec![tool.clone()];
        for format in [
            ToolFormat::Pythonic,
            ToolFormat::Qwen3CoderXml,
            ToolFormat::FunctionGemma,
            ToolFormat::Hermes,
        ] {
            let mut request = CompletionRequest {
                messages: Vec::new(),
                tools: offered.clone(),
                tool_choice: ToolChoice::Auto,
                sampling: Default::default(),
                response_format: None,
                argument_values: Default::default(),
            };
            let body = prompt_body("PROMPT", format, &request, &offered).expect("body");
            let expected = crate::llama::format_grammar(
                format,
                &offered,
                &request.argument_values,
                crate::call_grammar::CallCount::Many,
            )
            .expect("grammar");
            assert_eq!(body["grammar"], expected.gbnf, "{format:?}");
            assert_eq!(body["grammar_lazy"], true, "{format:?}");
            let triggers = body["grammar_triggers"].as_array().expect("triggers");
            assert!(!triggers.is_empty(), "{format:?}");
            for trigger in triggers {
                assert_eq!(trigger["type"], 2, "a pattern trigger: {trigger}");
            }
            // The patterns are the ones the in-process sampler searches for.
            let patterns: Vec<&str> = triggers
                .iter()
                .filter_map(|t| t["value"].as_str())
                .collect();
            assert_eq!(patterns, expected.trigger.patterns(), "{format:?}");
            assert_eq!(
                body["preserved_tokens"],
                json!(format.markers()),
                "{format:?}"
            );
            // A call that must be made is constrained from the first token.
            request.tool_choice = ToolChoice::Required;
            let body = prompt_body("PROMPT", format, &request, &offered).expect("body");
            assert_eq!(body["grammar"], expected.gbnf);
            assert!(body.get("grammar_lazy").is_none() && body.get("grammar_triggers").is_none());
        }
        // Pythonic calls open the grammar only at the start of the reply.
        let pythonic = crate::llama::format_grammar(
            ToolFormat::Pythonic,
            &offered,
            &crate::grammar::ArgumentValues::none(),
            crate::call_grammar::CallCount::Many,
        )
        .expect("grammar");
        assert_eq!(
            pythonic.trigger.find("  [get_weather(city=\"Paris\")]"),
            Some(2)
        );
        assert_eq!(
            pythonic.trigger.find("Try [get_weather(city=\"Paris\")]"),
            None
        );
    }

    #[test]
    fn a_key_over_plain_http_is_flagged_only_off_this_machine() {
        for (url, key, flagged) in [
            ("http://gpu-box:8000/v1", true, true),
            ("http://10.0.0.7:8000/v1", true, true),
            ("http://127.0.0.1:8080/v1", true, false),
            ("http://localhost:8080/v1", true, false),
            ("http://[::1]:8080/v1", true, false),
            ("https://gpu-box/v1", true, false),
            ("http://gpu-box:8000/v1", false, false),
        ] {
            assert_eq!(
                model_key_in_plain_text(url, key),
                flagged,
                "{url} key={key}"
            );
        }
    }

    #[test]
    fn http_errors_are_told_apart() {
        let llama_ctx = r#"{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error"}}"#;
        assert!(matches!(
            http_error(400, llama_ctx, "m"),
            RemoteError::ContextExceeded { .. }
        ));
        let vllm_ctx = r#"{"object":"error","message":"This model's maximum context length is 2048 tokens. However, you requested 5000 tokens.","type":"BadRequestError","code":400}"#;
        assert!(matches!(
            http_error(400, vllm_ctx, "m"),
            RemoteError::ContextExceeded { .. }
        ));
        let auth =
            r#"{"error":{"code":401,"message":"Invalid API Key","type":"authentication_error"}}"#;
        assert!(matches!(
            http_error(401, auth, "m"),
            RemoteError::Unauthorized { status: 401, .. }
        ));
        let missing = r#"{"object":"error","message":"The model `x` does not exist.","code":404}"#;
        assert!(matches!(
            http_error(404, missing, "x"),
            RemoteError::UnknownModel { .. }
        ));
        assert!(matches!(
            http_error(502, "<html>bad gateway</html>", "m"),
            RemoteError::Http { status: 502, .. }
        ));
    }

    #[test]
    fn an_api_key_never_shows_in_debug_output() {
        let key = ApiKey::new("sk-very-secret");
        let config = RemoteConfig {
            api_key: Some(key.clone()),
            ..RemoteConfig::new("http://127.0.0.1:1/v1")
        };
        let shown = format!("{key:?} {config:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
    }

    #[test]
    fn raw_completion_chunks_give_text_stop_and_counters() {
        let mut raw = RawCompletion::default();
        assert_eq!(
            raw.take(r#"{"content":"<tool","stop":false}"#)
                .ok()
                .flatten()
                .as_deref(),
            Some("<tool")
        );
        raw.take(r#"{"content":"","stop":true,"stop_type":"eos","tokens_evaluated":50,"tokens_predicted":7,"timings":{"cache_n":40}}"#)
            .expect("final chunk");
        assert_eq!(raw.finish, Some(Finish::Stop));
        assert_eq!(
            raw.usage,
            Some(Counters {
                prompt_evaluated: 10,
                prompt_reused: 40,
                generated: 7
            })
        );
    }
}
