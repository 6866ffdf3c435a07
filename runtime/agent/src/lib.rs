//! The agent loop and the embedding API.
//!
//! [`Runtime::builder`] takes the model, tool folders, Rust tools, the
//! policy, an approval handler and the workspace; [`Runtime::session`] opens
//! a [`Session`], and [`Session::send`] runs one user turn and streams
//! [`Event`]s. Each turn: the model generates → tool calls are parsed →
//! each goes through the [`Gate`] (validation, budgets, policy and approval,
//! sandboxed execution, redaction, audit) → results go back as `tool`
//! messages → repeat until the model answers without tools, or a step,
//! budget or repeat limit ends the turn with a visible reason.

#![warn(missing_docs)]

pub mod store;
mod transcript;
pub mod voice;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use transcript::{
    check_session_id, export_chatml, list_sessions, read_transcript, TranscriptError,
};

use stack_core::dispatch;
use stack_core::dispatch::ToolContext;
use stack_core::gate::{Admission, Gate};
use stack_core::grounding::GroundedValues;
pub use stack_core::grounding::GroundingMode;
use stack_core::policy::{
    ApprovalAnswer, ApprovalHandler, ApprovalRequest, AuditLog, Grants, Policy, PolicyError,
};
use stack_core::tools::{LoadDiagnostic, RegisterError, Registry};
use stack_core::workspace::{Workspace, WorkspaceError};
#[cfg(feature = "llama")]
use stack_model::llama::Model;
use stack_model::ToolChoice;
use stack_model::{
    ArgumentValues, BackendSession, CallPath, CompletionRequest, Counters, Generation,
    ModelBackend, ModelError, SamplingOptions, StopReason,
};
use stack_seal::{StateFile, Vault};
use stack_types::message::{Message, ToolCall};
use stack_types::outcome::{Status, ToolOutcome};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Why the runtime or a session could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The policy failed to load.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A Rust tool could not be registered.
    #[error(transparent)]
    Register(#[from] RegisterError),
    /// The workspace is unusable.
    #[error(transparent)]
    Workspace(#[from] WorkspaceError),
    /// Transcripts could not be written or read.
    #[error(transparent)]
    Transcript(#[from] TranscriptError),
    /// No model was given.
    #[error("no model: give RuntimeBuilder::model or ::backend")]
    NoModel,
    /// A task of the runtime itself failed (a bug).
    #[error("internal error: {0}")]
    Internal(String),
    /// Audio could not be transcribed (bad audio, or the speech model
    /// failed).
    #[error(transparent)]
    Voice(#[from] stack_voice::VoiceError),
    /// Audio was sent to a runtime built without a speech model.
    #[error("no speech model: build the runtime with RuntimeBuilder::speech_model (or pass --speech-model)")]
    NoSpeechModel,
    /// The audit log could not be opened.
    #[error("audit log {path}: {source}")]
    AuditLog {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `[privacy] encrypt = true` and no key could be had (or a key file
    /// that must not be trusted).
    #[error("encryption at rest: {0}")]
    Keys(#[from] stack_seal::keys::KeyError),
    /// The policy asks for encryption at rest and the vault the host gave
    /// seals nothing: refused rather than write plaintext.
    #[error("the policy says `[privacy] encrypt = true`, but the vault given to the runtime has no key to seal with")]
    NotSealing,
}

/// What happens during a turn, in order.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A spoken command was transcribed: what was heard (the turn's user
    /// message, unless the user edited it), with the audio's sha256,
    /// duration and timings. The first event of a spoken turn.
    Transcribed {
        /// What was heard.
        #[serde(flatten)]
        transcription: stack_voice::Transcription,
    },
    /// A piece of generated text.
    Token {
        /// The text.
        text: String,
    },
    /// The model finished a message (possibly with tool calls).
    AssistantMessage {
        /// The message.
        message: Message,
    },
    /// The model proposed a call.
    ToolCallProposed {
        /// The call.
        call: ToolCall,
        /// How the call came to be: under the runtime's grammar, under
        /// the structural tag sent to the server, a server's native (or
        /// strict) call, or recovered from text.
        via: Option<CallPath>,
    },
    /// The policy asked for approval.
    ApprovalNeeded {
        /// What is asked.
        request: ApprovalRequest,
    },
    /// A call started running (it passed validation and the policy, or not:
    /// its result says).
    ToolStarted {
        /// The call id.
        id: String,
        /// The tool.
        name: String,
    },
    /// A connection a call's code asked the egress proxy for (a policy
    /// network allowlist), allowed or refused; sent before the call's
    /// [`Event::ToolFinished`], in order.
    Egress {
        /// The call id.
        id: String,
        /// The tool.
        name: String,
        /// What was asked, decided and sent.
        record: stack_types::EgressRecord,
    },
    /// A call finished.
    ToolFinished {
        /// The call id.
        id: String,
        /// The tool.
        name: String,
        /// Its outcome (redacted).
        outcome: ToolOutcome,
    },
    /// The turn ended: always the last event of a turn.
    TurnFinished {
        /// Why.
        reason: TurnEnd,
        /// Model steps taken.
        steps: u32,
        /// Token counters for this turn.
        counters: Counters,
        /// Where the turn's time went.
        timings: TurnTimings,
    },
    /// Something failed; the session is still usable.
    Error {
        /// What.
        message: String,
    },
}

/// Where a turn's time went, in milliseconds: each step's model work as
/// its backend reports it ([`Generation`](stack_model::Generation)), the
/// tools', and the whole. What the parts leave of the whole
/// ([`TurnTimings::other_ms`]) is the runtime's own: validation, policy,
/// approvals, transcripts and events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TurnTimings {
    /// The whole turn, from when it had the session to its last event.
    pub total_ms: f64,
    /// Surveying the workspace for the call grammar's grounded values,
    /// over the turn's steps.
    pub grounding_ms: f64,
    /// The constrained routing steps (in process; see
    /// [`Routing::Constrained`](stack_model::Routing::Constrained)).
    pub routing_ms: f64,
    /// Evaluating the prompts not reused from the KV cache (a served
    /// model: until its first token came).
    pub prompt_ms: f64,
    /// Generating, sampling included.
    pub generation_ms: f64,
    /// Of `generation_ms`, picking tokens: the sampler chain and the call
    /// grammar (in process).
    pub sampling_ms: f64,
    /// Running the calls: each step's, from its first call started to its
    /// last finished (an approval asked between two calls of one step
    /// counts).
    pub tools_ms: f64,
}

impl TurnTimings {
    /// What the parts leave of the whole: the runtime's own work
    /// (validation, policy, approvals, transcripts, events).
    pub fn other_ms(&self) -> f64 {
        let parts = self.grounding_ms
            + self.routing_ms
            + self.prompt_ms
            + self.generation_ms
            + self.tools_ms;
        (self.total_ms - parts).max(0.0)
    }

    /// The model's own time (prompts, routing, generation): not the
    /// tools', an approval's or the runtime's.
    pub fn model_ms(&self) -> f64 {
        self.prompt_ms + self.routing_ms + self.generation_ms
    }

    /// Adds what a model step reports.
    fn add_step(&mut self, generation: &Generation) {
        self.routing_ms += generation.routing_ms;
        self.prompt_ms += generation.prompt_ms;
        self.generation_ms += generation.generation_ms;
        self.sampling_ms += generation.sampling_ms;
    }
}

/// Why a turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TurnEnd {
    /// The model answered without calling a tool.
    Answered,
    /// The model's reply ran into the token limit (`max_tokens`, or the
    /// end of the context) before it ended: an answer cut short, or a call
    /// cut off before it was whole (such a call is not proposed).
    TokenLimit,
    /// The turn used its `max_steps` model steps.
    StepLimit,
    /// The same call failed `max_repeated_failures` times.
    RepeatedFailures,
    /// A session budget ran out.
    Budget,
    /// The host cancelled it (the token, or dropping the stream).
    Cancelled,
    /// Something failed; an [`Event::Error`] said what. The session is
    /// still usable.
    Error,
}

impl TurnEnd {
    /// Its name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            TurnEnd::Answered => "answered",
            TurnEnd::TokenLimit => "token_limit",
            TurnEnd::StepLimit => "step_limit",
            TurnEnd::RepeatedFailures => "repeated_failures",
            TurnEnd::Budget => "budget",
            TurnEnd::Cancelled => "cancelled",
            TurnEnd::Error => "error",
        }
    }
}

impl std::fmt::Display for TurnEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a session runs. Default: a short system prompt that mentions file
/// and code tools, `tool_choice` auto, [`SamplingOptions::default`], at
/// most 8 model steps a turn, and a turn stopped after 3 identical failing
/// calls.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The system prompt.
    pub system_prompt: Option<String>,
    /// Tool choice for the first step of each turn; later steps use `auto`.
    pub tool_choice: ToolChoice,
    /// Sampling.
    pub sampling: SamplingOptions,
    /// Most model steps in one turn.
    pub max_steps: u32,
    /// Identical failing calls allowed before the turn stops.
    pub max_repeated_failures: u32,
    /// Resume this saved session instead of starting a new one.
    pub resume: Option<String>,
    /// How far the call grammar narrows the built-in tools' parameters:
    /// by default ([`GroundingMode::Auto`]), for a large or served model,
    /// the reading tools' paths to the paths that exist in the workspace
    /// at each step, a new file's path to one inside the workspace, and
    /// code to code that does not end open; for a small in-process model,
    /// also a new file's path and text, and a search's pattern, to words of
    /// the user's request (see [`stack_core::grounding`]).
    pub grounding: GroundingMode,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            system_prompt: Some("You are a helpful assistant. You can call tools to read and write files in the workspace and to run code.".into()),
            tool_choice: ToolChoice::Auto,
            sampling: SamplingOptions::default(),
            max_steps: 8,
            max_repeated_failures: 3,
            resume: None,
            grounding: GroundingMode::Auto,
        }
    }
}

/// A tool registration put off until [`RuntimeBuilder::build`].
type AddTool = Box<dyn FnOnce(&mut Registry) -> Result<(), AgentError> + Send>;

/// Builds a [`Runtime`].
///
/// What a runtime built with nothing but a model may do, and keep:
/// * **tools:** the built-ins (`read_file`, `write_file`, `list_dir`,
///   `search_files`, `execute_code`), over the current folder;
/// * **policy:** the `default` preset. It allows reads and searches
///   without asking, asks before writes and code, and sandboxes code with
///   no network. With no approver (the default here) every `ask` is
///   denied, so only reads and searches run;
/// * **on disk:** the `default` preset keeps transcripts and an audit log
///   under `~/.local/share/stack-runtime/sessions` (turn that off with
///   [`transcripts(None)`](Self::transcripts) and
///   [`audit_log(None)`](Self::audit_log), or a policy that keeps none);
///   `build` reads the user's key store, to open files sealed before.
///
/// Every setter only records; tool folders are read, tools registered and
/// the workspace checked in [`build`](Self::build), which returns the
/// first error. The order of the calls does not matter.
pub struct RuntimeBuilder {
    backend: Option<Arc<dyn ModelBackend>>,
    builtin_tools: bool,
    tool_dirs: Vec<PathBuf>,
    tools: Vec<AddTool>,
    policy: Option<Policy>,
    approver: Option<Arc<dyn ApprovalHandler>>,
    workspace: PathBuf,
    transcripts: Option<Option<PathBuf>>,
    audit_log: Option<Option<PathBuf>>,
    vault: Option<Arc<Vault>>,
    speech: voice::Speech,
}

impl RuntimeBuilder {
    /// Uses an already loaded model (sessions share it).
    #[cfg(feature = "llama")]
    pub fn model(mut self, model: Arc<Model>) -> Self {
        self.backend = Some(model);
        self
    }

    /// Uses any model backend (sessions share it): the in-process llama.cpp
    /// [`Model`](stack_model::llama::Model), a served model, or a scripted
    /// one in tests.
    pub fn backend(mut self, backend: Arc<dyn ModelBackend>) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Loads tools from a folder of schema files, at [`build`](Self::build);
    /// broken files are kept as diagnostics (see [`Runtime::diagnostics`]).
    pub fn tool_dir(mut self, dir: &Path) -> Self {
        self.tool_dirs.push(dir.to_path_buf());
        self
    }

    /// Whether the built-in tools (files, search, `execute_code`) are
    /// offered; they are unless this says otherwise. A tool folder that
    /// documents a built-in offers it again, whatever the order of calls.
    pub fn builtin_tools(mut self, offer: bool) -> Self {
        self.builtin_tools = offer;
        self
    }

    /// Registers a Rust tool with a typed argument struct, at
    /// [`build`](Self::build) (which fails on a bad name or a duplicate).
    pub fn rust_tool<A, F>(mut self, name: &str, description: &str, handler: F) -> Self
    where
        A: JsonSchema + DeserializeOwned + 'static,
        F: Fn(A, &ToolContext) -> Result<String, String> + Send + Sync + 'static,
    {
        let (name, description) = (name.to_string(), description.to_string());
        self.tools.push(Box::new(move |registry: &mut Registry| {
            registry
                .register_host_tool(&name, &description, handler)
                .map_err(AgentError::from)
        }));
        self
    }

    /// Registers a tool the host built itself (an MCP server's, say), at
    /// [`build`](Self::build) (which fails on a duplicate).
    pub fn tool(mut self, spec: stack_core::tools::ToolSpec) -> Self {
        self.tools.push(Box::new(move |registry: &mut Registry| {
            registry.register(spec).map_err(AgentError::from)
        }));
        self
    }

    /// The policy every session runs under.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Who answers `ask` decisions.
    pub fn approval_handler(mut self, approver: Arc<dyn ApprovalHandler>) -> Self {
        self.approver = Some(approver);
        self
    }

    /// The workspace root (default: the current folder).
    pub fn workspace(mut self, root: impl Into<PathBuf>) -> Self {
        self.workspace = root.into();
        self
    }

    /// Where transcripts go, when the policy keeps them (default: the
    /// policy's `transcript_dir`). `None` keeps none, whatever the policy says.
    pub fn transcripts(mut self, dir: Option<PathBuf>) -> Self {
        self.transcripts = Some(dir);
        self
    }

    /// Where every session's audit log goes: one JSON line per decision and
    /// per result (default: `audit/audit.jsonl` in the transcript folder, when the
    /// policy's `audit_log` is on and transcripts are kept). `None` keeps
    /// none.
    pub fn audit_log(mut self, path: Option<PathBuf>) -> Self {
        self.audit_log = Some(path);
        self
    }

    /// The keys that seal and open what sessions keep (default: with
    /// `[privacy] encrypt = true`, the user's key file or
    /// `STACK_RUNTIME_KEY`, see [`stack_seal::keys`]; without, plaintext,
    /// opening what those keys sealed before).
    pub fn vault(mut self, vault: Arc<Vault>) -> Self {
        self.vault = Some(vault);
        self
    }

    /// The speech model spoken turns are transcribed with
    /// ([`Session::send_audio`], [`Runtime::transcribe`]).
    #[cfg(feature = "voice")]
    pub fn speech_model(mut self, model: Arc<stack_voice::SpeechModel>) -> Self {
        self.speech.model = Some(model);
        self
    }

    /// How spoken turns are transcribed (default: beam 5, the language
    /// detected by multilingual models).
    pub fn transcribe_options(mut self, options: stack_voice::TranscribeOptions) -> Self {
        self.speech.options = options;
        self
    }

    /// How much audio one spoken turn may carry (default: 120 s).
    pub fn audio_limits(mut self, limits: stack_voice::AudioLimits) -> Self {
        self.speech.limits = limits;
        self
    }

    /// Builds the runtime: registers the tools, checks the workspace, and
    /// opens the audit log and the keys. Any error of the chain is
    /// returned here. It blocks: file I/O, and, when the keys are in the OS
    /// keyring, D-Bus calls (each at most `stack_seal::keyring::TIMEOUT`);
    /// async hosts call it from a blocking thread (`spawn_blocking`) or
    /// before their runtime starts, as the `agent` binary does.
    pub fn build(self) -> Result<Runtime, AgentError> {
        let mut registry = if self.builtin_tools {
            Registry::with_builtins()
        } else {
            Registry::new()
        };
        let mut diagnostics = Vec::new();
        for dir in &self.tool_dirs {
            diagnostics.extend(registry.load_dir(dir));
        }
        for add in self.tools {
            add(&mut registry)?;
        }
        let backend = self.backend.ok_or(AgentError::NoModel)?;
        // Checked here, so that a missing folder is the builder's error
        // and not the first session's.
        drop(Workspace::open(&self.workspace)?);
        let policy = match self.policy {
            Some(policy) => policy,
            None => Policy::preset("default")?,
        };
        let keep = policy.privacy.keep_transcripts.unwrap_or(false);
        let transcripts = match (keep, self.transcripts) {
            (false, _) | (true, Some(None)) => None,
            (true, Some(Some(dir))) => Some(dir),
            (true, None) => policy.privacy.transcript_dir.as_deref().map(expand_home),
        };
        let audit_path = match self.audit_log {
            Some(path) => path,
            None if policy.privacy.audit_log.unwrap_or(false) => transcripts
                .as_ref()
                .map(|dir| dir.join("audit/audit.jsonl")),
            None => None,
        };
        let encrypt = policy.privacy.encrypt.unwrap_or(false);
        let (vault, lease) = match self.vault {
            Some(vault) => (vault, None),
            None => {
                let keys = stack_seal::keys::KeyStore::for_user();
                match (encrypt, keys) {
                    // The lease before the keys are read (a rotation under
                    // way is waited for; see `KeyStore::open`).
                    (true, keys) => {
                        let (vault, lease) = keys?.open(true)?;
                        (Arc::new(vault), lease)
                    }
                    // Off: plaintext, but files sealed before still open
                    // with the keys at hand.
                    (false, Ok(keys)) => match keys.open(false) {
                        Ok((vault, lease)) => (Arc::new(vault), lease),
                        Err(err) => {
                            tracing::warn!(%err, "keys for files sealed before are not at hand");
                            (Arc::new(Vault::plaintext()), None)
                        }
                    },
                    (false, Err(_)) => (Arc::new(Vault::plaintext()), None),
                }
            }
        };
        if encrypt && !vault.seals() {
            return Err(AgentError::NotSealing);
        }
        let audit = match audit_path {
            Some(path) => Some(Arc::new(
                AuditLog::open_with(&path, Arc::clone(&vault))
                    .map_err(|source| AgentError::AuditLog { path, source })?,
            )),
            None => None,
        };
        Ok(Runtime {
            audit,
            backend,
            registry: Arc::new(registry),
            diagnostics,
            policy: Arc::new(policy),
            approver: self.approver,
            workspace: self.workspace,
            transcripts,
            vault,
            _lease: lease,
            speech: Arc::new(self.speech),
        })
    }
}

/// Expands a leading `~/` to the home folder.
pub fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// The loaded model, tools and policy, shared by sessions.
pub struct Runtime {
    backend: Arc<dyn ModelBackend>,
    registry: Arc<Registry>,
    diagnostics: Vec<LoadDiagnostic>,
    policy: Arc<Policy>,
    approver: Option<Arc<dyn ApprovalHandler>>,
    workspace: PathBuf,
    transcripts: Option<PathBuf>,
    audit: Option<Arc<AuditLog>>,
    vault: Arc<Vault>,
    /// Held while the runtime may seal with the key (`agent keys rotate`
    /// waits for no runtime).
    _lease: Option<stack_seal::keys::KeyLease>,
    speech: Arc<voice::Speech>,
}

impl Runtime {
    /// Starts building a runtime.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder {
            backend: None,
            builtin_tools: true,
            tool_dirs: Vec::new(),
            tools: Vec::new(),
            policy: None,
            approver: None,
            workspace: PathBuf::from("."),
            transcripts: None,
            audit_log: None,
            vault: None,
            speech: voice::Speech::default(),
        }
    }

    /// How much audio a spoken turn may carry.
    pub fn audio_limits(&self) -> stack_voice::AudioLimits {
        self.speech.limits
    }

    /// The speech model, if the runtime has one.
    #[cfg(feature = "voice")]
    pub fn speech_model(&self) -> Option<&Arc<stack_voice::SpeechModel>> {
        self.speech.model.as_ref()
    }

    /// Transcribes `audio` with the runtime's speech model, on a blocking
    /// thread (a host that shows the text before sending it, then calls
    /// [`Session::send_spoken`]).
    #[cfg(feature = "voice")]
    pub async fn transcribe(
        &self,
        audio: stack_voice::Audio,
    ) -> Result<stack_voice::Transcription, AgentError> {
        voice::transcribe(Arc::clone(&self.speech), voice::AudioInput::Decoded(audio))
            .await
            .map(|(transcription, _)| transcription)
    }

    /// [`transcribe`](Self::transcribe) with other options than the
    /// runtime's (a request's own language, say).
    #[cfg(feature = "voice")]
    pub async fn transcribe_with(
        &self,
        audio: stack_voice::Audio,
        options: stack_voice::TranscribeOptions,
    ) -> Result<stack_voice::Transcription, AgentError> {
        let speech = voice::Speech {
            model: self.speech.model.clone(),
            options,
            limits: self.speech.limits,
        };
        voice::transcribe(Arc::new(speech), voice::AudioInput::Decoded(audio))
            .await
            .map(|(transcription, _)| transcription)
    }

    /// How spoken turns are transcribed.
    pub fn transcribe_options(&self) -> &stack_voice::TranscribeOptions {
        &self.speech.options
    }

    /// The keys that seal and open what its sessions keep.
    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    /// Problems found while loading tool folders.
    pub fn diagnostics(&self) -> &[LoadDiagnostic] {
        &self.diagnostics
    }

    /// The model.
    pub fn backend(&self) -> &Arc<dyn ModelBackend> {
        &self.backend
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The tools.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The sessions kept on disk (transcripts, KV state, consent, history),
    /// when the policy keeps transcripts.
    pub fn store(&self) -> Option<store::SessionStore> {
        self.transcripts
            .clone()
            .map(|dir| store::SessionStore::new(dir).with_vault(Arc::clone(&self.vault)))
    }

    /// Purges what is older than the policy's `[privacy] max_age_days`
    /// (sessions, and audit records), on the blocking pool. `None` when
    /// the policy sets no retention or keeps no transcripts.
    pub async fn purge_expired(&self) -> Result<Option<store::Removed>, AgentError> {
        // The policy's folder even when this runtime keeps nothing now:
        // what was kept before still expires.
        let folder = self.transcripts.clone().or_else(|| {
            self.policy
                .privacy
                .transcript_dir
                .as_deref()
                .map(expand_home)
        });
        let (Some(folder), Some(days)) = (folder, self.policy.privacy.max_age_days) else {
            return Ok(None);
        };
        let store = store::SessionStore::new(folder).with_vault(Arc::clone(&self.vault));
        let age = std::time::Duration::from_secs(days.saturating_mul(86_400));
        tokio::task::spawn_blocking(move || store.purge(Some(age)))
            .await
            .map_err(|e| AgentError::Internal(format!("purging expired sessions: {e}")))?
            .map(Some)
            .map_err(AgentError::from)
    }

    /// Where transcripts are saved, if anywhere.
    pub fn transcript_dir(&self) -> Option<&Path> {
        self.transcripts.as_deref()
    }

    /// Opens a session (or resumes a saved one). The model context is made
    /// on the session's own model thread; this waits for it without
    /// blocking the caller's thread.
    pub async fn session(&self, config: SessionConfig) -> Result<Session, AgentError> {
        self.session_in(config, SessionScope::default()).await
    }

    /// Opens a session (or resumes a saved one) with its own workspace,
    /// policy or approver instead of the runtime's (`agent serve` gives
    /// each client session its own). The scope's policy is narrowed to
    /// the runtime's ([`Policy::within`]): it can take rights away, never
    /// add them.
    pub async fn session_in(
        &self,
        config: SessionConfig,
        scope: SessionScope,
    ) -> Result<Session, AgentError> {
        let mut config = config;
        config.grounding = config.grounding.resolved(self.backend.info().is_small());
        let model = Arc::clone(&self.backend).open_session().await?;
        let policy = match scope.policy {
            Some(policy) => Arc::new(policy.within(Arc::clone(&self.policy))),
            None => Arc::clone(&self.policy),
        };
        let approver = scope.approver.or_else(|| self.approver.clone());
        // Opening the workspace (canonicalize), reading a transcript and
        // creating one are file work: on a blocking thread, not the caller's.
        let (root, transcripts, resume, vault) = (
            scope.workspace.unwrap_or_else(|| self.workspace.clone()),
            self.transcripts.clone(),
            config.resume.clone(),
            Arc::clone(&self.vault),
        );
        let opened = tokio::task::spawn_blocking(move || {
            let ctx = ToolContext::new(Workspace::open(&root)?);
            let (id, messages) = match &resume {
                Some(id) => {
                    let dir = transcripts.as_deref().ok_or(TranscriptError::Disabled)?;
                    (id.clone(), read_transcript(dir, id, &vault)?)
                }
                None => (new_session_id(), Vec::new()),
            };
            let transcript = match &transcripts {
                Some(dir) => Some(transcript::Writer::open(dir, &id, &vault)?),
                None => None,
            };
            let state_path = transcripts
                .as_ref()
                .map(|dir| StateFile::new(dir.join(format!("{id}.kv")), format!("kv:{id}"), vault));
            let pending_restore =
                resume.is_some() && state_path.as_ref().is_some_and(StateFile::exists);
            Ok::<_, AgentError>((ctx, id, messages, transcript, state_path, pending_restore))
        })
        .await
        .map_err(|e| AgentError::Internal(format!("opening the session: {e}")))??;
        let (ctx, id, mut messages, transcript, state_path, pending_restore) = opened;
        let relay = Arc::new(ApprovalRelay {
            inner: approver,
            events: Default::default(),
        });
        let gate = Gate::new(Arc::clone(&self.registry), policy, id.clone())
            .with_approver(Arc::clone(&relay) as Arc<dyn ApprovalHandler>);
        let gate = match &self.audit {
            Some(audit) => gate.with_audit_log(Arc::clone(audit)),
            None => gate,
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let grants = gate.grants().clone();
        let mut state = SessionState {
            messages: Vec::new(),
            gate,
            relay,
            ctx: ctx.clone(),
            model,
            config,
            transcript,
            state_path,
            pending_restore,
            turn_start: 0,
            turn_timings: TurnTimings::default(),
            cancel: Arc::clone(&cancel),
            kept_audio: None,
        };
        if messages.is_empty() {
            if let Some(system) = state.config.system_prompt.clone() {
                state.record(Message::system(system))?;
            }
        } else {
            state.messages.append(&mut messages);
        }
        let keep_audio = self.policy.privacy.keep_audio.unwrap_or(false);
        state.kept_audio = match (&self.transcripts, keep_audio) {
            (Some(dir), true) => Some(voice::AudioFile::new(dir, &id, Arc::clone(&self.vault))),
            _ => None,
        };
        Ok(Session {
            id,
            state: Arc::new(tokio::sync::Mutex::new(state)),
            cancel,
            grants,
            ctx,
            store: self.store(),
            speech: Arc::clone(&self.speech),
        })
    }
}

/// A session id unique on this machine: the time, the process, and a
/// count of the sessions this process opened (two may open in the same
/// millisecond).
fn new_session_id() -> String {
    static OPENED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{:x}-{:x}-{}",
        stack_core::policy::audit::now_ms(),
        std::process::id(),
        OPENED.fetch_add(1, Ordering::Relaxed)
    )
}

/// What one session may have of its own instead of the runtime's (see
/// [`Runtime::session_in`]). Empty by default: the runtime's workspace,
/// policy and approver.
#[derive(Default)]
pub struct SessionScope {
    workspace: Option<PathBuf>,
    policy: Option<Policy>,
    approver: Option<Arc<dyn ApprovalHandler>>,
}

impl SessionScope {
    /// The session's workspace root.
    pub fn workspace(mut self, root: impl Into<PathBuf>) -> Self {
        self.workspace = Some(root.into());
        self
    }

    /// A policy for this session, narrowed to the runtime's.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Who answers this session's `ask` decisions.
    pub fn approval_handler(mut self, approver: Arc<dyn ApprovalHandler>) -> Self {
        self.approver = Some(approver);
        self
    }
}

/// One conversation. Cheap to share between tasks: its state lives behind
/// an async lock that a running turn holds, so turns sent while one runs
/// wait their turn, and the accessors below wait for a running turn.
pub struct Session {
    id: String,
    state: Arc<tokio::sync::Mutex<SessionState>>,
    cancel: Arc<AtomicBool>,
    grants: Grants,
    ctx: ToolContext,
    /// Where its files are, when the policy keeps transcripts.
    store: Option<store::SessionStore>,
    speech: Arc<voice::Speech>,
}

/// What a session owns; a turn's task holds it while the turn runs.
struct SessionState {
    messages: Vec<Message>,
    gate: Gate,
    relay: Arc<ApprovalRelay>,
    ctx: ToolContext,
    model: Box<dyn BackendSession>,
    config: SessionConfig,
    transcript: Option<transcript::Writer>,
    /// Where the KV cache is saved after each turn, and restored from on resume.
    state_path: Option<StateFile>,
    /// A saved KV cache still to be restored before the next turn.
    pending_restore: bool,
    /// How many messages there were before the running turn's user message.
    turn_start: usize,
    /// Where the running turn's time went so far (its total is taken when
    /// it ends).
    turn_timings: TurnTimings,
    cancel: Arc<AtomicBool>,
    /// Where spoken turns' audio is kept (`[privacy] keep_audio`).
    kept_audio: Option<voice::AudioFile>,
}

impl Drop for SessionState {
    /// Saves the KV cache for a later resume without waiting: the model
    /// thread writes it after its last job and then ends (best effort; see
    /// `ModelWorker::save_detached`). Never blocks the dropping thread.
    fn drop(&mut self) {
        if let Some(path) = self.state_path.clone() {
            self.model.save_state_detached(path);
        }
    }
}

/// Forwards approval requests to the host's handler, emitting an event first.
struct ApprovalRelay {
    inner: Option<Arc<dyn ApprovalHandler>>,
    events: std::sync::Mutex<Option<EventSink>>,
}

impl ApprovalHandler for ApprovalRelay {
    fn approve<'a>(
        &'a self,
        request: &'a ApprovalRequest,
    ) -> futures::future::BoxFuture<'a, ApprovalAnswer> {
        Box::pin(async move {
            let events = self
                .events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(events) = events {
                events
                    .emit(Event::ApprovalNeeded {
                        request: request.clone(),
                    })
                    .await;
            }
            match &self.inner {
                Some(handler) => handler.approve(request).await,
                None => ApprovalAnswer::No,
            }
        })
    }
}

/// Where a turn's events go: a bounded channel, so a host that reads
/// slowly slows the turn down (backpressure) instead of queueing without
/// end. A host that stopped reading (dropped the stream) loses the rest.
#[derive(Clone)]
struct EventSink(tokio::sync::mpsc::Sender<Event>);

impl EventSink {
    async fn emit(&self, event: Event) {
        let _ = self.0.send(event).await;
    }
}

/// How many events a turn may have sent ahead of its reader.
const EVENT_BUFFER: usize = 256;

/// One turn: a [`Stream`](futures::Stream) of its [`Event`]s, ending with
/// [`Event::TurnFinished`]. The turn runs in a task of its own, whether or
/// not the stream is polled (up to [`EVENT_BUFFER`] events ahead).
/// Dropping the stream, or cancelling [`Turn::cancellation`], cancels the
/// turn: generation stops, running tools are killed, and the session stays
/// usable for the next turn.
pub struct Turn {
    events: tokio::sync::mpsc::Receiver<Event>,
    cancel: CancellationToken,
    _cancel_on_drop: tokio_util::sync::DropGuard,
}

impl Turn {
    /// A token that cancels this turn.
    pub fn cancellation(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

impl futures::Stream for Turn {
    type Item = Event;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Event>> {
        self.events.poll_recv(cx)
    }
}

impl Session {
    /// The session id (also the transcript's name).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Records whether this session's owner allows its use as training
    /// data (`agent export` refuses it otherwise; not allowed until set).
    /// Fails when the policy keeps no transcripts (there is nothing to
    /// export then).
    pub async fn set_training_use(&self, allowed: bool) -> Result<(), AgentError> {
        let store = self.store.clone().ok_or(TranscriptError::Disabled)?;
        let id = self.id.clone();
        tokio::task::spawn_blocking(move || store.set_training_use(&id, allowed))
            .await
            .map_err(|e| AgentError::Internal(format!("recording consent: {e}")))?
            .map_err(AgentError::from)
    }

    /// Stops this session from writing anything more to disk: no more
    /// transcript lines, and no KV state saved when it closes. Called
    /// before its stored data is erased while it is still open, so that
    /// nothing comes back after the erase.
    pub async fn discard_storage(&self) {
        let mut state = self.state.lock().await;
        state.transcript = None;
        state.state_path = None;
    }

    /// Whether this session's owner allowed its use as training data.
    pub async fn training_use(&self) -> bool {
        let Some(store) = self.store.clone() else {
            return false;
        };
        let id = self.id.clone();
        tokio::task::spawn_blocking(move || store.training_use(&id).unwrap_or(false))
            .await
            .unwrap_or(false)
    }

    /// The conversation so far (waits for a running turn).
    pub async fn messages(&self) -> Vec<Message> {
        self.state.lock().await.messages.clone()
    }

    /// The session's `always` grants (shared with its gate).
    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    /// The session's tool context (workspace, sandboxes).
    pub fn tool_context(&self) -> &ToolContext {
        &self.ctx
    }

    /// A flag that, once set, stops the current generation or turn (as
    /// cancelling its [`Turn::cancellation`] does).
    pub fn cancel_token(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.cancel)
    }

    /// Token counters over the session (waits for a running turn).
    pub async fn totals(&self) -> Counters {
        self.state.lock().await.model.totals().await
    }

    /// Saves the KV cache next to the transcript, so that a resumed session
    /// reuses it on its next turn, and waits until it is written. Dropping
    /// the session also saves it, without waiting.
    pub async fn save_state(&self) -> Result<(), AgentError> {
        let mut state = self.state.lock().await;
        match state.state_path.clone() {
            Some(path) => Ok(state.model.save_state(path).await?),
            None => Ok(()),
        }
    }

    /// Forgets the conversation (the system prompt stays).
    pub async fn reset(&self) {
        let mut state = self.state.lock().await;
        state
            .messages
            .retain(|m| m.role == stack_types::message::Role::System);
        state.model.clear();
    }

    /// Runs one user turn in a task of its own and returns its events as a
    /// [`Turn`] stream. Needs a Tokio runtime; outside one the stream says
    /// so and ends.
    pub fn send(&self, text: impl Into<String>) -> Turn {
        self.start_turn(voice::TurnInput::Text(text.into()))
    }

    /// Runs one spoken turn: `samples` (mono, in [-1, 1], at `sample_rate`
    /// Hz) are checked and transcribed on a blocking thread, an
    /// [`Event::Transcribed`] says what was heard, and the text runs as
    /// the user's message. Bad audio ends the turn with an [`Event::Error`]
    /// that names the problem; the session goes on.
    #[cfg(feature = "voice")]
    pub fn send_audio(&self, samples: Vec<f32>, sample_rate: u32) -> Turn {
        self.start_turn(voice::TurnInput::Audio(voice::AudioInput::Samples {
            samples,
            sample_rate,
        }))
    }

    /// Runs one spoken turn from a WAV file's bytes (see
    /// [`Session::send_audio`]).
    #[cfg(feature = "voice")]
    pub fn send_wav(&self, wav: Vec<u8>) -> Turn {
        self.start_turn(voice::TurnInput::Audio(voice::AudioInput::Wav(wav)))
    }

    /// Runs one turn whose message was spoken and transcribed already
    /// (by [`Runtime::transcribe`], or by the host's own engine): `text`
    /// is what is sent (the transcript, or the user's edit of it); the
    /// transcript records both, with the audio's sha256. `audio` is kept
    /// only under `[privacy] keep_audio`.
    pub fn send_spoken(
        &self,
        transcription: stack_voice::Transcription,
        text: impl Into<String>,
        audio: Option<stack_voice::Audio>,
    ) -> Turn {
        self.start_turn(voice::TurnInput::Spoken(voice::Spoken {
            transcription,
            text: text.into(),
            audio,
        }))
    }

    fn start_turn(&self, input: voice::TurnInput) -> Turn {
        let (sender, receiver) = tokio::sync::mpsc::channel(EVENT_BUFFER);
        let cancel = CancellationToken::new();
        let turn = Turn {
            events: receiver,
            cancel: cancel.clone(),
            _cancel_on_drop: cancel.clone().drop_guard(),
        };
        let events = EventSink(sender);
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            let _ = events.0.try_send(Event::Error {
                message: "Session::send needs a Tokio runtime".into(),
            });
            let _ = events.0.try_send(Event::TurnFinished {
                reason: TurnEnd::Error,
                steps: 0,
                counters: Counters::default(),
                timings: TurnTimings::default(),
            });
            return turn;
        };
        let (state, flag, speech) = (
            Arc::clone(&self.state),
            Arc::clone(&self.cancel),
            Arc::clone(&self.speech),
        );
        handle.spawn(async move {
            let mut state = state.lock_owned().await;
            let started = std::time::Instant::now();
            // Transcription is cancellable too: a turn cancelled while its
            // audio is transcribed records nothing. The blocking work cannot
            // be stopped midway, so the turn ends when it has: whoever
            // admitted the turn (a server's `--max-running`) counts it until
            // its CPU work is over. The audio length limit bounds the wait.
            let resolve = voice::resolve(input, speech);
            tokio::pin!(resolve);
            let resolved = tokio::select! {
                resolved = &mut resolve => Some(resolved),
                () = cancel.cancelled() => {
                    let _ = resolve.await;
                    None
                }
            };
            let (text, spoken) = match resolved {
                None => {
                    events
                        .emit(Event::TurnFinished {
                            reason: TurnEnd::Cancelled,
                            steps: 0,
                            counters: Counters::default(),
                            timings: TurnTimings::default(),
                        })
                        .await;
                    return;
                }
                Some(Ok(resolved)) => resolved,
                Some(Err(err)) => {
                    events
                        .emit(Event::Error {
                            message: err.to_string(),
                        })
                        .await;
                    events
                        .emit(Event::TurnFinished {
                            reason: TurnEnd::Error,
                            steps: 0,
                            counters: Counters::default(),
                            timings: TurnTimings::default(),
                        })
                        .await;
                    return;
                }
            };
            if let Some(spoken) = &spoken {
                events
                    .emit(Event::Transcribed {
                        transcription: spoken.transcription.clone(),
                    })
                    .await;
            }
            // The token and the session's flag both stop the turn; a flag
            // left set by an earlier cancellation does not stop this one.
            flag.store(false, Ordering::SeqCst);
            let watcher = tokio::spawn({
                let (cancel, flag) = (cancel.clone(), Arc::clone(&flag));
                async move {
                    cancel.cancelled().await;
                    flag.store(true, Ordering::SeqCst);
                }
            });
            let ended = state.run(&text, spoken, &events).await;
            watcher.abort();
            let (reason, steps, counters) = match ended {
                Ok(ended) => ended,
                Err(err) => {
                    events
                        .emit(Event::Error {
                            message: err.to_string(),
                        })
                        .await;
                    (TurnEnd::Error, 0, Counters::default())
                }
            };
            let timings = TurnTimings {
                total_ms: started.elapsed().as_secs_f64() * 1000.0,
                ..std::mem::take(&mut state.turn_timings)
            };
            events
                .emit(Event::TurnFinished {
                    reason,
                    steps,
                    counters,
                    timings,
                })
                .await;
        });
        turn
    }
}

impl SessionState {
    /// Runs one user turn, sending events as they happen.
    async fn run(
        &mut self,
        text: &str,
        spoken: Option<voice::Spoken>,
        events: &EventSink,
    ) -> Result<(TurnEnd, u32, Counters), AgentError> {
        if std::mem::take(&mut self.pending_restore) {
            if let Some(path) = self.state_path.clone() {
                if let Err(err) = self.model.load_state(path).await {
                    tracing::warn!(%err, "the saved KV cache could not be restored; this turn evaluates the whole prompt");
                }
            }
        }
        self.turn_start = self.messages.len();
        self.turn_timings = TurnTimings::default();
        match spoken {
            Some(spoken) => {
                let kept = match (&self.kept_audio, &spoken.audio) {
                    (Some(file), Some(audio)) => Some(file.keep(audio).await?),
                    _ => None,
                };
                let note = spoken.transcript_note(kept);
                self.record_with(Message::user(text), Some(note))?;
            }
            None => self.record(Message::user(text))?,
        }
        self.gate.budget().start_turn();
        *self.relay.events.lock().unwrap_or_else(|p| p.into_inner()) = Some(events.clone());
        let result = self.run_turn(events).await;
        *self.relay.events.lock().unwrap_or_else(|p| p.into_inner()) = None;
        result
    }

    async fn run_turn(
        &mut self,
        events: &EventSink,
    ) -> Result<(TurnEnd, u32, Counters), AgentError> {
        let tools = self.gate.registry().openai_tools();
        let mut counters = Counters::default();
        let mut failures: Vec<(String, String)> = Vec::new();
        let mut steps = 0;
        while steps < self.config.max_steps {
            steps += 1;
            let choice = if steps == 1 {
                self.config.tool_choice.clone()
            } else if self.config.tool_choice == ToolChoice::None {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            };
            let (token_tx, mut token_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            let forward = {
                let events = events.clone();
                tokio::spawn(async move {
                    while let Some(text) = token_rx.recv().await {
                        events.emit(Event::Token { text }).await;
                    }
                })
            };
            // The workspace as it is now, surveyed on a blocking thread.
            let surveying = std::time::Instant::now();
            let user_request = self
                .messages
                .get(self.turn_start..)
                .and_then(|turn| {
                    turn.iter()
                        .find(|m| m.role == stack_types::message::Role::User)
                })
                .map(Message::text)
                .unwrap_or_default();
            let grounding = (self.config.grounding != GroundingMode::Off
                && choice != ToolChoice::None)
                .then(|| {
                    self.gate.grounding_job(
                        Arc::clone(&self.ctx.workspace),
                        self.config.grounding,
                        user_request,
                    )
                });
            let argument_values = argument_values(grounding).await;
            self.turn_timings.grounding_ms += surveying.elapsed().as_secs_f64() * 1000.0;
            let request = CompletionRequest {
                messages: self.messages.clone(),
                tools: tools.clone(),
                tool_choice: choice,
                sampling: self.config.sampling.clone(),
                response_format: None,
                argument_values,
            };
            let generation = self
                .model
                .complete(request, token_tx, Arc::clone(&self.cancel))
                .await;
            let _ = forward.await;
            let generation = match generation {
                Ok(generation) => generation,
                Err(err) => {
                    let mut message = err.to_string();
                    if err.is_context_overflow() && self.turn_start < self.messages.len() {
                        // What this turn added no longer fits: the turn is
                        // taken back out of the conversation (the
                        // transcript still records it), so the session can
                        // go on with a shorter message.
                        self.messages.truncate(self.turn_start);
                        message
                            .push_str("; this turn's messages were not added to the conversation");
                    }
                    events.emit(Event::Error { message }).await;
                    return Ok((TurnEnd::Error, steps, counters));
                }
            };
            counters.prompt_evaluated += generation.counters.prompt_evaluated;
            counters.prompt_reused += generation.counters.prompt_reused;
            counters.generated += generation.counters.generated;
            self.turn_timings.add_step(&generation);
            let calls = generation.turn.tool_calls.clone();
            let message = if calls.is_empty() {
                Message::assistant(generation.turn.content.clone().unwrap_or_default())
            } else {
                Message::assistant_tool_calls(generation.turn.content.clone(), calls.clone())
            };
            self.record(message.clone())?;
            events.emit(Event::AssistantMessage { message }).await;
            if self.cancel.load(Ordering::SeqCst) {
                return Ok((TurnEnd::Cancelled, steps, counters));
            }
            if calls.is_empty() {
                let end = if generation.stop == StopReason::MaxTokens {
                    TurnEnd::TokenLimit
                } else {
                    TurnEnd::Answered
                };
                return Ok((end, steps, counters));
            }
            // Decide every call first, in order (approval prompts come one
            // at a time), then run the admitted ones concurrently.
            // A call's result is written to the transcript (in the order the
            // model wrote the calls) before its `ToolFinished` event, so that
            // what a host saw finish is on record (see `record_finished`).
            let mut outcomes: Vec<Option<ToolOutcome>> = vec![None; calls.len()];
            let mut tools_started: Option<std::time::Instant> = None;
            let mut recorded = 0;
            let mut running = tokio::task::JoinSet::new();
            let mut task_calls: std::collections::HashMap<tokio::task::Id, usize> =
                std::collections::HashMap::new();
            for (index, call) in calls.iter().enumerate() {
                events
                    .emit(Event::ToolCallProposed {
                        call: call.clone(),
                        via: generation.call_path,
                    })
                    .await;
                // A cancelled turn does not wait for an approval that may
                // never come: the admission (and its pending request) is
                // dropped, and the call is reported as not run.
                let admitted = {
                    let cancel = Arc::clone(&self.cancel);
                    tokio::select! {
                        admitted = self.gate.admit(call) => Some(admitted),
                        () = cancelled(&cancel) => None,
                    }
                };
                let Some(admitted) = admitted else {
                    outcomes[index] = Some(self.gate.finish(
                        call,
                        ToolOutcome::internal_error(
                            "the turn was cancelled before this call was decided",
                        ),
                    ));
                    self.record_finished(&calls, &outcomes, &mut recorded, events)
                        .await?;
                    continue;
                };
                match admitted {
                    Admission::Refused(outcome) => {
                        outcomes[index] = Some(outcome);
                        self.record_finished(&calls, &outcomes, &mut recorded, events)
                            .await?;
                    }
                    Admission::Run(authorized) => {
                        tools_started.get_or_insert_with(std::time::Instant::now);
                        events
                            .emit(Event::ToolStarted {
                                id: call.id.clone(),
                                name: call.function.name.clone(),
                            })
                            .await;
                        let ctx = self.ctx.clone();
                        let span = self.gate.span(call);
                        let task = running.spawn(async move {
                            (
                                index,
                                dispatch::execute(&authorized, &ctx).instrument(span).await,
                            )
                        });
                        task_calls.insert(task.id(), index);
                    }
                }
            }
            while !running.is_empty() {
                tokio::select! {
                    joined = running.join_next_with_id() => {
                        let (index, outcome) = match joined {
                            Some(Ok((_, done))) => done,
                            // A tool that panicked is a runtime bug, not a
                            // cancellation: say so (a cancelled one stays
                            // unanswered and is reported as cancelled below).
                            Some(Err(failed)) if failed.is_panic() => {
                                let Some(&index) = task_calls.get(&failed.id()) else { continue };
                                (index, ToolOutcome::internal_error(format!(
                                    "the tool crashed (a bug in the runtime or a host tool): {}",
                                    panic_text(failed.into_panic())
                                )))
                            }
                            _ => continue,
                        };
                        if let Some(call) = calls.get(index) {
                            outcomes[index] = Some(self.gate.finish(call, outcome));
                            self.record_finished(&calls, &outcomes, &mut recorded, events).await?;
                        }
                    }
                    () = tokio::time::sleep(std::time::Duration::from_millis(50)) => {
                        if self.cancel.load(Ordering::SeqCst) {
                            // Dropping the tasks kills their sandboxed processes.
                            running.abort_all();
                        }
                    }
                }
            }
            if let Some(tools_started) = tools_started {
                self.turn_timings.tools_ms += tools_started.elapsed().as_secs_f64() * 1000.0;
            }
            for (call, outcome) in calls.iter().zip(outcomes.iter_mut()) {
                if outcome.is_none() {
                    *outcome = Some(self.gate.finish(
                        call,
                        ToolOutcome::internal_error("the call was cancelled before it finished"),
                    ));
                }
            }
            self.record_finished(&calls, &outcomes, &mut recorded, events)
                .await?;
            let mut over_budget = false;
            for (call, outcome) in calls.iter().zip(outcomes.into_iter().flatten()) {
                if outcome.status != Status::Ok {
                    failures.push((call.function.name.clone(), call.function.arguments.clone()));
                    over_budget |= outcome.limit == Some(stack_types::Limit::Budget);
                }
            }
            let repeated = failures
                .iter()
                .map(|key| (key, failures.iter().filter(|f| *f == key).count() as u32))
                .find(|(_, repeats)| *repeats >= self.config.max_repeated_failures)
                .map(|(key, repeats)| (key.clone(), repeats));
            if let Some((key, repeats)) = repeated {
                {
                    events.emit(Event::Error {
                        message: format!("`{}` failed {repeats} times with the same arguments; stopping this turn", key.0),
                    }).await;
                    return Ok((TurnEnd::RepeatedFailures, steps, counters));
                }
            }
            if over_budget {
                return Ok((TurnEnd::Budget, steps, counters));
            }
            if self.cancel.load(Ordering::SeqCst) {
                return Ok((TurnEnd::Cancelled, steps, counters));
            }
        }
        events
            .emit(Event::Error {
                message: format!(
                    "the turn reached its limit of {} model steps",
                    self.config.max_steps
                ),
            })
            .await;
        Ok((TurnEnd::StepLimit, steps, counters))
    }

    /// Records the results of the calls after the first `recorded` whose
    /// outcomes are in (a prefix, in the model's order) as `tool` messages,
    /// then emits their `ToolFinished` events: a call a host saw finish is
    /// in the transcript (and, by `Gate::finish`, the audit log), so both
    /// survive the runtime being killed right after.
    async fn record_finished(
        &mut self,
        calls: &[ToolCall],
        outcomes: &[Option<ToolOutcome>],
        recorded: &mut usize,
        events: &EventSink,
    ) -> Result<(), AgentError> {
        while let (Some(call), Some(Some(outcome))) =
            (calls.get(*recorded), outcomes.get(*recorded))
        {
            let text = self.gate.text_for_model(outcome);
            self.record(Message::tool_result(call.id.clone(), text))?;
            for record in &outcome.egress {
                events
                    .emit(Event::Egress {
                        id: call.id.clone(),
                        name: call.function.name.clone(),
                        record: record.clone(),
                    })
                    .await;
            }
            events
                .emit(Event::ToolFinished {
                    id: call.id.clone(),
                    name: call.function.name.clone(),
                    outcome: outcome.clone(),
                })
                .await;
            *recorded += 1;
        }
        Ok(())
    }

    fn record(&mut self, message: Message) -> Result<(), AgentError> {
        self.record_with(message, None)
    }

    /// Records `message`, with `note` (an object of fields the transcript
    /// keeps beside the message, such as a spoken turn's `voice`).
    fn record_with(
        &mut self,
        message: Message,
        note: Option<serde_json::Value>,
    ) -> Result<(), AgentError> {
        if let Some(writer) = &mut self.transcript {
            // What reaches the disk is redacted like what reaches the
            // model: the user's prompt and the model's words too.
            writer.append_redacted(&message, note, self.gate.policy().redactor())?;
        }
        self.messages.push(message);
        Ok(())
    }
}

/// Resolves once `flag` is set (polled: the flag is the session's plain
/// cancellation flag, shared with the model thread).
async fn cancelled(flag: &AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The message a panic carried, when it is text.
fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}

// Every path a survey may list (and the few a request names) fits in what
// the grammar narrows to; past it a parameter would silently stay free.
const _: () = assert!(
    stack_core::grounding::MAX_SURVEYED + 1 + 64 <= stack_model::grammar::MAX_GROUNDED_VALUES
);
// The shapes fit the grammar's bound on a pattern.
const _: () = assert!(
    stack_core::grounding::NEW_PATH_PATTERN.len() <= stack_model::grammar::MAX_GROUNDED_VALUE_BYTES
        && stack_core::grounding::PROGRAM_PATTERN.len()
            <= stack_model::grammar::MAX_GROUNDED_VALUE_BYTES
);

/// Runs a grounding job (see [`Gate::grounding_job`]) on a blocking thread
/// and gathers its values; no job, or one that failed, grounds nothing.
async fn argument_values(
    job: Option<impl FnOnce() -> Vec<stack_core::grounding::GroundedParameter> + Send + 'static>,
) -> ArgumentValues {
    let mut values = ArgumentValues::none();
    let Some(job) = job else {
        return values;
    };
    match tokio::task::spawn_blocking(job).await {
        Ok(grounded) => {
            for parameter in grounded {
                match parameter.values {
                    GroundedValues::OneOf(listed) => {
                        values.set(&parameter.tool, parameter.parameter, listed);
                    }
                    GroundedValues::Matching(pattern) => {
                        values.set_pattern(&parameter.tool, parameter.parameter, pattern);
                    }
                }
            }
        }
        Err(err) => tracing::warn!(%err, "surveying the workspace for grounded arguments failed"),
    }
    values
}
