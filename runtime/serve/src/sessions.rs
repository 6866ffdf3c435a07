//! Agent sessions over HTTP: the embedding API ([`stack_agent::Session`])
//! for clients in any language.
//!
//! - `POST /v1/sessions` opens one ([`CreateSession`]): a workspace inside
//!   the server's allowed roots, a policy preset or inline TOML narrowed to
//!   the server's policy, session settings, or `resume` with the id of a
//!   saved session (its transcript).
//! - `POST /v1/sessions/{id}/turns` (`{"message": "..."}`) runs one turn
//!   and streams its events as server-sent events, one per
//!   [`stack_agent::Event`], named by its `event` field and ending with
//!   `turn_finished`. One turn at a time per session (`409` otherwise). A
//!   client that drops the stream cancels the turn; so does the server's
//!   per-turn time limit.
//! - `POST /v1/sessions/{id}/approvals/{call_id}` (`{"answer": "yes" |
//!   "no" | "always"}`) answers the `approval_needed` event of that call.
//! - `GET /v1/sessions` lists open and saved sessions; `GET
//!   /v1/sessions/{id}` shows one; `DELETE /v1/sessions/{id}` closes it
//!   (its transcript stays, for resume and export); `GET
//!   /v1/sessions/{id}/export` returns its transcript as ChatML JSON lines,
//!   once its owner allowed that (`POST /v1/sessions/{id}/training` with
//!   `{"allowed": true}`; refused with 403 until then).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use stack_agent::{AgentError, Event, SessionConfig, SessionScope, TranscriptError};
use stack_core::policy::{ApprovalAnswer, ApprovalHandler, ApprovalRequest, Policy};
use stack_model::{Routing, ToolChoice};

use crate::error::{JsonBody, PathParams, QueryParams};
use crate::{Admission, ApiError, AppState};

/// The open sessions.
#[derive(Default)]
pub(crate) struct SessionTable {
    open: Mutex<HashMap<String, Arc<Served>>>,
    /// Places taken: open sessions plus those being opened.
    taken: AtomicUsize,
    /// Ids being resumed now: a second resume of one is refused at once,
    /// before it opens (and could save) the same session's files.
    resuming: Mutex<std::collections::HashSet<String>>,
}

/// An id being resumed; taken off [`SessionTable::resuming`] when dropped.
struct Resuming<'a> {
    table: &'a SessionTable,
    id: String,
}

impl Drop for Resuming<'_> {
    fn drop(&mut self) {
        self.table
            .resuming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// An open session whose workspace holds `workspace`, or lies inside it
/// (not the same folder): sandboxed code of the outer one could replace
/// the inner one's folder with a link to anywhere between two of its
/// calls. The same folder is fine: no code inside a folder can replace
/// the folder itself.
fn nested_session<'a>(
    open: &'a HashMap<String, Arc<Served>>,
    workspace: &Path,
) -> Option<(&'a str, &'a Path)> {
    open.iter()
        .find(|(_, served)| {
            served.workspace != workspace
                && (served.workspace.starts_with(workspace)
                    || workspace.starts_with(&served.workspace))
        })
        .map(|(id, served)| (id.as_str(), served.workspace.as_path()))
}

fn nested_refusal(workspace: &Path, other: &str, other_workspace: &Path) -> ApiError {
    ApiError::Conflict(format!(
        "workspace {} and open session `{other}`'s workspace {} lie one inside the other; \
         code run in the outer one could replace the inner one's folder, so sessions open \
         at once get the same folder or folders apart",
        workspace.display(),
        other_workspace.display()
    ))
}

/// One open session and what the server keeps beside it.
pub(crate) struct Served {
    session: stack_agent::Session,
    workspace: PathBuf,
    approvals: Arc<HttpApprover>,
    busy: AtomicBool,
    turns: AtomicU64,
    created_ms: u64,
    /// The running turn's cancellation, while one runs.
    running: Mutex<Option<tokio_util::sync::CancellationToken>>,
}

impl Served {
    /// Cancels the running turn, if any, and refuses the approvals it waits
    /// for (so it ends instead of waiting for an answer).
    fn cancel_turn(&self) {
        if let Some(turn) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            turn.cancel();
        }
        self.approvals.clear();
    }
}

/// A session's approval requests, waiting for `POST
/// .../approvals/{call_id}`. A request is registered before the gate
/// awaits its answer, and a POST that arrives first (the client saw the
/// `approval_needed` event a moment before the gate got here) waits for it
/// up to [`APPROVAL_ARRIVAL`]. A request dropped unanswered (the turn
/// cancelled) counts as `no`.
pub(crate) struct HttpApprover {
    /// The server's admission: a turn's place is given up while it waits
    /// here for a person, and taken again before the turn goes on.
    admission: Admission,
    /// The place of the turn running now, if it holds one.
    place: Mutex<Option<crate::limits::Place>>,
    pending: Mutex<
        HashMap<
            String,
            (
                ApprovalRequest,
                tokio::sync::oneshot::Sender<ApprovalAnswer>,
            ),
        >,
    >,
    arrived: tokio::sync::Notify,
}

/// How long an approval POST waits for its request to be registered.
const APPROVAL_ARRIVAL: std::time::Duration = std::time::Duration::from_secs(5);

impl HttpApprover {
    pub(crate) fn new(admission: Admission) -> HttpApprover {
        HttpApprover {
            admission,
            place: Mutex::new(None),
            pending: Mutex::default(),
            arrived: tokio::sync::Notify::new(),
        }
    }

    /// The running turn's place, held until [`HttpApprover::end_turn`] (or
    /// given up while an approval waits).
    fn hold(&self, place: crate::limits::Place) {
        *self.place.lock().unwrap_or_else(|p| p.into_inner()) = Some(place);
    }

    /// The turn has ended: its place goes back.
    fn end_turn(&self) {
        self.place.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        HashMap<
            String,
            (
                ApprovalRequest,
                tokio::sync::oneshot::Sender<ApprovalAnswer>,
            ),
        >,
    > {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The requests waiting.
    fn waiting(&self) -> Vec<ApprovalRequest> {
        self.lock().values().map(|(r, _)| r.clone()).collect()
    }

    /// Answers the request of `call_id`, waiting a little for it to arrive.
    async fn answer(&self, call_id: &str, answer: ApprovalAnswer) -> bool {
        let deadline = tokio::time::Instant::now() + APPROVAL_ARRIVAL;
        loop {
            let arrived = self.arrived.notified();
            if let Some((_, reply)) = self.lock().remove(call_id) {
                return reply.send(answer).is_ok();
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return false;
            }
        }
    }

    fn clear(&self) {
        self.lock().clear();
    }
}

/// Takes a request out of the waiting list when the gate stops waiting
/// for it (answered, or the turn dropped), so none lingers.
struct Withdraw<'a> {
    approver: &'a HttpApprover,
    call_id: String,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        self.approver.lock().remove(&self.call_id);
    }
}

impl ApprovalHandler for HttpApprover {
    fn approve<'a>(
        &'a self,
        request: &'a ApprovalRequest,
    ) -> futures::future::BoxFuture<'a, ApprovalAnswer> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.lock()
            .insert(request.call_id.clone(), (request.clone(), reply));
        self.arrived.notify_waiters();
        let withdraw = Withdraw {
            approver: self,
            call_id: request.call_id.clone(),
        };
        Box::pin(async move {
            let _withdraw = withdraw;
            // No generation runs while a person decides: the place goes to
            // another turn or request meanwhile.
            let gave_up = self
                .place
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .is_some();
            let answer = match answer.await {
                Ok(answer) => answer,
                // The reply was dropped: the turn was cancelled (deleted,
                // timed out, shutting down), and it must end now, not wait
                // for a place it will not use.
                Err(_) => return ApprovalAnswer::No,
            };
            if gave_up {
                match self.admission.reenter().await {
                    Ok(place) => self.hold(place),
                    // Shutting down: the turn is being cancelled.
                    Err(_) => return ApprovalAnswer::No,
                }
            }
            answer
        })
    }
}

/// How long a client may leave a cancelled turn's events unread before
/// the stream is dropped.
const UNREAD_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Resolves when the client's end of the stream is gone; never without one.
async fn gone(client: Option<&tokio::sync::mpsc::Sender<SseEvent>>) {
    match client {
        Some(sender) => sender.closed().await,
        None => std::future::pending().await,
    }
}

impl SessionTable {
    /// Open sessions.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Served>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &str) -> Result<Arc<Served>, ApiError> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("no open session `{id}`")))
    }

    /// Approval requests waiting, over all sessions.
    pub(crate) fn pending_approvals(&self) -> usize {
        self.lock().values().map(|s| s.approvals.lock().len()).sum()
    }

    /// Saves every session's state and closes it (at shutdown, once turns
    /// have ended or been cancelled).
    pub(crate) async fn close_all(&self) {
        let all: Vec<Arc<Served>> = self.lock().drain().map(|(_, s)| s).collect();
        for served in &all {
            served.session.cancel_token().store(true, Ordering::SeqCst);
        }
        // All at once: a save waits for its session's cancelled turn to
        // end (its tools killed), and one slow session must not take the
        // others' time.
        futures::future::join_all(all.iter().map(|served| async move {
            let saved = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                served.session.save_state(),
            )
            .await;
            if !matches!(saved, Ok(Ok(()))) {
                tracing::warn!(
                    id = served.session.id(),
                    "the session's state was not saved at shutdown"
                );
            }
        }))
        .await;
    }
}

/// Gives a place back unless the session took it.
struct Reservation<'a> {
    table: &'a SessionTable,
    kept: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.table.taken.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The body of `POST /v1/sessions`. Every field is optional; unset ones
/// take the server's settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// A policy preset (`default`, `strict`, `trusted`), narrowed to the
    /// server's policy.
    #[serde(default)]
    pub policy: Option<String>,
    /// A policy as TOML text, narrowed to the server's policy. It may
    /// extend a preset, and may not name MCP servers or privacy settings
    /// (the server decides those).
    #[serde(default)]
    pub policy_toml: Option<String>,
    /// The workspace: a folder inside one of the server's allowed roots
    /// (default: the first root).
    #[serde(default)]
    pub workspace: Option<PathBuf>,
    /// The system prompt (an empty one sends none).
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Tool choice for the first step of each turn: `auto`, `none`,
    /// `required` or a tool name.
    #[serde(default)]
    pub tool_choice: Option<String>,
    /// Most model steps per turn.
    #[serde(default)]
    pub max_steps: Option<u32>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Random seed.
    #[serde(default)]
    pub seed: Option<u32>,
    /// Most tokens per model step.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// How the model decides to call a tool under `auto`.
    #[serde(default)]
    pub routing: Option<Routing>,
    /// Resume the saved session with this id.
    #[serde(default)]
    pub resume: Option<String>,
}

/// The body of `POST /v1/sessions/{id}/turns`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnRequest {
    /// The user's message, typed.
    #[serde(default)]
    pub message: Option<String>,
    /// Or spoken: a clip the server transcribes (see [`crate::audio`]);
    /// its transcript is the message. One of the two.
    #[serde(default)]
    pub audio: Option<crate::audio::InputAudio>,
}

/// The body of `POST /v1/sessions/{id}/training`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingBody {
    /// Whether the session's owner allows its use as training data.
    pub allowed: bool,
}

/// The body of `POST /v1/sessions/{id}/approvals/{call_id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalBody {
    /// `yes`, `no` or `always` (this tool or rule, for the rest of the
    /// session).
    pub answer: AnswerWord,
}

/// An approval answer on the wire.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerWord {
    /// Run the call.
    Yes,
    /// Refuse it.
    No,
    /// Run it, and allow what asked for the rest of the session.
    Always,
}

/// Whether `id` is a plain session id (the transcripts' rule), checked
/// before it names a file or a map entry.
fn check_id(id: &str) -> Result<(), ApiError> {
    stack_agent::check_session_id(id).map_err(|_| {
        ApiError::BadRequest(format!(
            "`{}` is not a session id (letters, digits, `-` and `_`)",
            id.escape_debug()
        ))
    })
}

/// The policy a client asks for, narrowed later to the server's.
fn client_policy(request: &CreateSession) -> Result<Option<Policy>, ApiError> {
    match (&request.policy, &request.policy_toml) {
        (Some(_), Some(_)) => Err(ApiError::BadRequest(
            "give `policy` (a preset) or `policy_toml`, not both".into(),
        )),
        (Some(name), None) => Policy::preset(name)
            .map(Some)
            .map_err(|e| ApiError::BadRequest(format!("`policy`: {e}"))),
        (None, Some(text)) => {
            let table: toml::Table = toml::from_str(text)
                .map_err(|e| ApiError::BadRequest(format!("`policy_toml`: {e}")))?;
            if let Some(base) = table.get("extends") {
                let preset = base.as_str().is_some_and(|name| {
                    stack_core::policy::file::PRESETS
                        .iter()
                        .any(|(p, _)| *p == name)
                });
                if !preset {
                    return Err(ApiError::Forbidden(
                        "`policy_toml` may extend a preset (default, strict, trusted), never a file on the server".into(),
                    ));
                }
            }
            for key in ["mcp_servers", "privacy"] {
                if table.contains_key(key) {
                    return Err(ApiError::Forbidden(format!(
                        "`policy_toml` may not set [{key}]: the server decides it"
                    )));
                }
            }
            Policy::from_toml(text, Path::new("<session policy>"))
                .map(Some)
                .map_err(|e| ApiError::BadRequest(format!("`policy_toml`: {e}")))
        }
        (None, None) => Ok(None),
    }
}

/// The workspace folder, resolved, once it is inside an allowed root.
async fn check_workspace(state: &AppState, asked: Option<&Path>) -> Result<PathBuf, ApiError> {
    let roots = &state.options.workspace_roots;
    let Some(asked) = asked else {
        return roots
            .first()
            .cloned()
            .ok_or_else(|| ApiError::Internal("the server has no workspace root".into()));
    };
    if !asked.is_absolute() {
        return Err(ApiError::BadRequest(format!(
            "`workspace` must be an absolute path, not {}",
            asked.display()
        )));
    }
    let resolved = tokio::fs::canonicalize(asked)
        .await
        .map_err(|e| ApiError::BadRequest(format!("`workspace` {}: {e}", asked.display())))?;
    let metadata = tokio::fs::metadata(&resolved)
        .await
        .map_err(|e| ApiError::BadRequest(format!("`workspace` {}: {e}", asked.display())))?;
    if !metadata.is_dir() {
        return Err(ApiError::BadRequest(format!(
            "`workspace` {} is not a folder",
            asked.display()
        )));
    }
    // The runtime's own state (its caches of compiled modules, its
    // configuration, transcripts and the audit log) is never a workspace,
    // nor inside one a client may pick.
    let mut state_folders: Vec<PathBuf> = stack_sandbox::process::runtime_state_folders()
        .into_iter()
        .map(|(folder, _)| folder)
        .collect();
    state_folders.extend(state.runtime.transcript_dir().map(Path::to_path_buf));
    for folder in state_folders {
        let folder = tokio::fs::canonicalize(&folder).await.unwrap_or(folder);
        if resolved.starts_with(&folder) {
            return Err(ApiError::Forbidden(format!(
                "`workspace` {} is inside the runtime's own state ({})",
                asked.display(),
                folder.display()
            )));
        }
    }
    if !roots.iter().any(|root| resolved.starts_with(root)) {
        return Err(ApiError::Forbidden(format!(
            "`workspace` {} is outside the folders this server allows ({})",
            asked.display(),
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(resolved)
}

fn session_config(
    defaults: &SessionConfig,
    request: &CreateSession,
) -> Result<SessionConfig, ApiError> {
    let mut config = defaults.clone();
    if let Some(system) = &request.system_prompt {
        config.system_prompt = (!system.is_empty()).then(|| system.clone());
    }
    if let Some(choice) = &request.tool_choice {
        config.tool_choice = match choice.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            name => ToolChoice::Named(name.to_string()),
        };
    }
    if let Some(steps) = request.max_steps {
        if !(1..=64).contains(&steps) {
            return Err(ApiError::BadRequest("`max_steps` must be 1 to 64".into()));
        }
        config.max_steps = steps;
    }
    if let Some(temperature) = request.temperature {
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::BadRequest(
                "`temperature` must be between 0 and 2".into(),
            ));
        }
        config.sampling.temperature = temperature;
    }
    if let Some(seed) = request.seed {
        config.sampling.seed = seed;
    }
    if let Some(max_tokens) = request.max_tokens {
        if max_tokens == 0 {
            return Err(ApiError::BadRequest(
                "`max_tokens` must be at least 1".into(),
            ));
        }
        config.sampling.max_tokens = max_tokens;
    }
    if let Some(routing) = request.routing {
        config.sampling.routing = routing;
    }
    config.resume = request.resume.clone();
    Ok(config)
}

fn agent_error(err: AgentError) -> ApiError {
    match err {
        AgentError::Transcript(TranscriptError::NotFound(id)) => {
            ApiError::NotFound(format!("no saved session `{id}` to resume"))
        }
        AgentError::Transcript(err @ (TranscriptError::Disabled | TranscriptError::BadId(_))) => {
            ApiError::BadRequest(err.to_string())
        }
        AgentError::Workspace(err) => ApiError::BadRequest(err.to_string()),
        other => ApiError::Internal(other.to_string()),
    }
}

/// `POST /v1/sessions`.
pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<CreateSession>,
) -> Result<Response, ApiError> {
    if state.draining.is_cancelled() {
        return Err(ApiError::ShuttingDown);
    }
    let table = &state.sessions;
    let limit = state.options.max_sessions;
    if table.taken.fetch_add(1, Ordering::SeqCst) >= limit {
        table.taken.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::TooMany(format!(
            "this server holds at most {limit} sessions; delete one first"
        )));
    }
    let mut reservation = Reservation { table, kept: false };
    let _resuming = match &request.resume {
        Some(id) => {
            check_id(id)?;
            let open = table.lock();
            let mut resuming = table.resuming.lock().unwrap_or_else(|p| p.into_inner());
            if open.contains_key(id) || !resuming.insert(id.clone()) {
                return Err(ApiError::Conflict(format!(
                    "session `{id}` is already open"
                )));
            }
            Some(Resuming {
                table,
                id: id.clone(),
            })
        }
        None => None,
    };
    let policy = client_policy(&request)?;
    let workspace = check_workspace(&state, request.workspace.as_deref()).await?;
    if let Some((other, other_workspace)) = nested_session(&table.lock(), &workspace) {
        return Err(nested_refusal(&workspace, other, other_workspace));
    }
    let config = session_config(&state.options.session_defaults, &request)?;
    if let ToolChoice::Named(name) = &config.tool_choice {
        if state.runtime.registry().get(name).is_none() {
            return Err(ApiError::BadRequest(format!(
                "`tool_choice` names `{name}`, which is not among this server's tools ({})",
                state.runtime.registry().names().join(", ")
            )));
        }
    }
    let approvals = Arc::new(HttpApprover::new(state.admission.clone()));
    let mut scope = SessionScope::default()
        .workspace(workspace.clone())
        .approval_handler(Arc::clone(&approvals) as Arc<dyn ApprovalHandler>);
    if let Some(policy) = policy {
        scope = scope.policy(policy);
    }
    let session = state
        .runtime
        .session_in(config, scope)
        .await
        .map_err(agent_error)?;
    let id = session.id().to_string();
    let resumed = if request.resume.is_some() {
        session.messages().await.len()
    } else {
        0
    };
    let served = Arc::new(Served {
        session,
        workspace: workspace.clone(),
        approvals,
        busy: AtomicBool::new(false),
        turns: AtomicU64::new(0),
        created_ms: stack_core::policy::audit::now_ms(),
        running: Mutex::new(None),
    });
    // Checked again where the session goes in, under the table's lock: two
    // sessions opened at once see each other here.
    let refused = {
        let mut open = table.lock();
        if open.contains_key(&id) {
            Some(ApiError::Conflict(format!(
                "session `{id}` is already open"
            )))
        } else if let Some((other, other_workspace)) = nested_session(&open, &workspace) {
            Some(nested_refusal(&workspace, other, other_workspace))
        } else {
            open.insert(id.clone(), Arc::clone(&served));
            None
        }
    };
    if let Some(refused) = refused {
        // Refused: this copy writes nothing as it closes.
        served.session.discard_storage().await;
        return Err(refused);
    }
    reservation.kept = true;
    let info = state.runtime.backend().info();
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "id": id,
            "object": "session",
            "workspace": workspace,
            "model": info.name,
            "resumed_messages": resumed,
            "transcript": state.runtime.transcript_dir().is_some(),
        })),
    )
        .into_response())
}

/// `GET /v1/sessions`.
pub(crate) async fn list(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let open: Vec<Value> = state
        .sessions
        .lock()
        .iter()
        .map(|(id, s)| json!({"id": id, "workspace": s.workspace, "busy": s.busy.load(Ordering::SeqCst)}))
        .collect();
    let saved = match state.runtime.transcript_dir().map(Path::to_path_buf) {
        Some(dir) => tokio::task::spawn_blocking(move || stack_agent::list_sessions(&dir))
            .await
            .unwrap_or_default(),
        None => Vec::new(),
    };
    Ok(axum::Json(json!({"object": "list", "data": open, "saved": saved})).into_response())
}

/// `GET /v1/sessions/{id}`: the conversation (unless a turn is running),
/// approvals waiting, and counters.
pub(crate) async fn show(
    State(state): State<Arc<AppState>>,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let served = state.sessions.get(&id)?;
    let busy = served.busy.load(Ordering::SeqCst);
    let pending = served.approvals.waiting();
    // The conversation waits for a running turn; a busy session answers
    // at once without it.
    let (messages, totals) = if busy {
        (Value::Null, Value::Null)
    } else {
        (
            json!(served.session.messages().await),
            json!(served.session.totals().await),
        )
    };
    Ok(axum::Json(json!({
        "id": id,
        "object": "session",
        "workspace": served.workspace,
        "busy": busy,
        "turns": served.turns.load(Ordering::SeqCst),
        "created_ms": served.created_ms,
        "pending_approvals": pending,
        "grants": served.session.grants().list(),
        "messages": messages,
        "totals": totals,
    }))
    .into_response())
}

/// The query of `DELETE /v1/sessions/{id}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// Also erase everything stored of the session (transcript, KV state,
    /// consent, history, audit records), as `agent sessions delete` does.
    #[serde(default)]
    pub erase: bool,
}

/// `DELETE /v1/sessions/{id}`: cancels a running turn, saves the state and
/// closes the session; its transcript stays for resume and export, unless
/// `?erase=true` erases everything stored of it.
pub(crate) async fn delete(
    State(state): State<Arc<AppState>>,
    PathParams(id): PathParams<String>,
    QueryParams(query): QueryParams<DeleteQuery>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let served = match state.sessions.get(&id) {
        Ok(served) => served,
        // A closed session's stored data can be erased too.
        Err(ApiError::NotFound(_)) if query.erase => return erase(&state, &id).await,
        Err(err) => return Err(err),
    };
    // The running turn ends first (cancelled, its approvals refused), and
    // the session stays in the table until it has: a resume of the same id
    // meanwhile is refused as already open, so no two sessions ever write
    // one transcript.
    if query.erase && state.runtime.store().is_none() {
        return Err(ApiError::BadRequest(
            "this server keeps no transcripts; there is nothing to erase".into(),
        ));
    }
    // The session is claimed as busy for good before it leaves the table,
    // so that no turn starts on it in between (one that got the session
    // before it was removed would find it busy and get 409).
    served.cancel_turn();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while served
        .busy
        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        // Another DELETE of it claimed it first.
        let still_open = state
            .sessions
            .lock()
            .get(&id)
            .is_some_and(|open| Arc::ptr_eq(open, &served));
        if !still_open {
            return Err(ApiError::NotFound(format!("no open session `{id}`")));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::Conflict(format!(
                "session `{id}`'s turn did not stop within 30 s; try again"
            )));
        }
        // A turn that started after the cancel above is cancelled too.
        served.cancel_turn();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if state.sessions.lock().remove(&id).is_some() {
        state.sessions.taken.fetch_sub(1, Ordering::SeqCst);
    }
    if query.erase {
        // Nothing more reaches the disk (no KV state saved as it closes),
        // then everything stored goes.
        served.session.discard_storage().await;
        drop(served);
        return erase(&state, &id).await;
    }
    if let Err(err) = served.session.save_state().await {
        tracing::warn!(%err, id, "saving the session's state failed");
    }
    Ok(axum::Json(json!({"id": id, "object": "session", "deleted": true})).into_response())
}

/// Erases everything stored of session `id` (see `SessionStore::delete`).
async fn erase(state: &AppState, id: &str) -> Result<Response, ApiError> {
    let Some(store) = state.runtime.store() else {
        return Err(ApiError::BadRequest(
            "this server keeps no transcripts; there is nothing to erase".into(),
        ));
    };
    let erasing = id.to_string();
    let removed = tokio::task::spawn_blocking(move || store.delete(&erasing))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|err| match err {
            TranscriptError::NotFound(id) => ApiError::NotFound(format!("no saved session `{id}`")),
            in_use @ TranscriptError::InUse(_) => ApiError::Conflict(in_use.to_string()),
            other => ApiError::Internal(other.to_string()),
        })?;
    Ok(axum::Json(json!({
        "id": id,
        "object": "session",
        "deleted": true,
        "erased": true,
        "files": removed.files,
        "audit_records": removed.audit_records,
    }))
    .into_response())
}

/// `POST /v1/sessions/{id}/approvals/{call_id}`.
pub(crate) async fn approve(
    State(state): State<Arc<AppState>>,
    PathParams((id, call_id)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<ApprovalBody>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let served = state.sessions.get(&id)?;
    let answer = match body.answer {
        AnswerWord::Yes => ApprovalAnswer::Yes,
        AnswerWord::No => ApprovalAnswer::No,
        AnswerWord::Always => ApprovalAnswer::Always,
    };
    // Only a running turn can be waiting for one (or about to be).
    let answered =
        served.busy.load(Ordering::SeqCst) && served.approvals.answer(&call_id, answer).await;
    if !answered {
        return Err(ApiError::NotFound(format!(
            "session `{id}` has no approval waiting for call `{}`",
            call_id.escape_debug()
        )));
    }
    Ok(axum::Json(json!({"id": id, "call_id": call_id, "answer": answer})).into_response())
}

/// `POST /v1/sessions/{id}/training`: whether the session's owner allows
/// its use as training data (export refuses it until then).
pub(crate) async fn training(
    State(state): State<Arc<AppState>>,
    PathParams(id): PathParams<String>,
    JsonBody(body): JsonBody<TrainingBody>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let served = state.sessions.get(&id)?;
    served
        .session
        .set_training_use(body.allowed)
        .await
        .map_err(|err| ApiError::BadRequest(err.to_string()))?;
    Ok(axum::Json(json!({"id": id, "training_use": body.allowed})).into_response())
}

/// `GET /v1/sessions/{id}/export`: the saved transcript as ChatML lines.
pub(crate) async fn export(
    State(state): State<Arc<AppState>>,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let dir = state
        .runtime
        .transcript_dir()
        .map(Path::to_path_buf)
        .ok_or_else(|| ApiError::BadRequest("this server keeps no transcripts".into()))?;
    let vault = Arc::clone(state.runtime.vault());
    let exported =
        tokio::task::spawn_blocking(move || stack_agent::export_chatml(&dir, &id, &vault))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|err| match err {
                TranscriptError::NotFound(id) => {
                    ApiError::NotFound(format!("no saved session `{id}`"))
                }
                refused @ TranscriptError::NoConsent(_) => ApiError::Forbidden(refused.to_string()),
                other => ApiError::Internal(other.to_string()),
            })?;
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], exported).into_response())
}

/// What a turn request carries.
enum TurnInput {
    Text(String),
    #[cfg_attr(not(feature = "voice"), allow(dead_code))]
    Wav(Vec<u8>),
}

/// Clears a session's busy flag when its turn's driver ends.
struct Busy(Arc<Served>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.approvals.end_turn();
        self.0.busy.store(false, Ordering::SeqCst);
    }
}

/// `POST /v1/sessions/{id}/turns`: runs a turn, streaming its events.
pub(crate) async fn turn(
    State(state): State<Arc<AppState>>,
    PathParams(id): PathParams<String>,
    JsonBody(body): JsonBody<TurnRequest>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    if state.draining.is_cancelled() {
        return Err(ApiError::ShuttingDown);
    }
    let input = match (body.message, body.audio) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give `message` or `audio`, not both".into(),
            ))
        }
        (None, None) => {
            return Err(ApiError::BadRequest(
                "give the turn's `message` (text) or `audio` (a base64 WAV clip)".into(),
            ))
        }
        (Some(message), None) if message.trim().is_empty() => {
            return Err(ApiError::BadRequest("`message` is empty".into()));
        }
        (Some(message), None) => TurnInput::Text(message),
        (None, Some(audio)) => {
            crate::audio::require_speech(&state)?;
            TurnInput::Wav(audio.decode()?)
        }
    };
    let served = state.sessions.get(&id)?;
    if served
        .busy
        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return Err(ApiError::Conflict(format!(
            "session `{id}` is running a turn; wait for its `turn_finished`"
        )));
    }
    let busy = Busy(Arc::clone(&served));
    served.approvals.hold(state.admission.enter().await?);
    served.turns.fetch_add(1, Ordering::SeqCst);
    let mut turn = match input {
        TurnInput::Text(message) => served.session.send(message),
        #[cfg(feature = "voice")]
        TurnInput::Wav(wav) => served.session.send_wav(wav),
        #[cfg(not(feature = "voice"))]
        TurnInput::Wav(_) => {
            return Err(ApiError::BadRequest(
                "this server was built without voice input (feature `voice`)".into(),
            ))
        }
    };
    *served.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(turn.cancellation());
    let (events, receiver) = tokio::sync::mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let deadline = tokio::time::sleep(state.options.turn_timeout);
        tokio::pin!(deadline);
        let mut cancelled = false;
        // The client's stream, until it goes away or stops reading: the
        // turn then goes on to its end (cancelled) with nobody to tell, so
        // a client never holds up the turn's limit, a DELETE or shutdown.
        let mut client = Some(events);
        loop {
            let event = tokio::select! {
                event = turn.next() => event,
                () = &mut deadline, if !cancelled => {
                    cancelled = true;
                    busy.0.cancel_turn();
                    Some(Event::Error { message: format!(
                        "the turn ran past this server's limit of {} s and was cancelled",
                        state.options.turn_timeout.as_secs()
                    )})
                }
                () = state.shutdown.cancelled(), if !cancelled => {
                    cancelled = true;
                    busy.0.cancel_turn();
                    Some(Event::Error { message: "the server is shutting down; the turn was cancelled".into() })
                }
                // A client that went away cancels the turn, also while
                // nothing is being sent (an approval, a long tool run).
                () = gone(client.as_ref()), if !cancelled => {
                    cancelled = true;
                    busy.0.cancel_turn();
                    client = None;
                    continue;
                }
            };
            let Some(event) = event else { break };
            match &event {
                Event::ToolFinished { outcome, .. } => {
                    let status = serde_json::to_value(outcome.status).unwrap_or_default();
                    state
                        .metrics
                        .count_tool_call(status.as_str().unwrap_or("unknown"));
                }
                Event::TurnFinished {
                    reason,
                    counters,
                    timings,
                    ..
                } => {
                    state.metrics.count_turn(reason.as_str());
                    // The model's own time: not the tools', nor the wait
                    // for a person's answer, nor a slow reader's.
                    state
                        .metrics
                        .count_generation(*counters, timings.model_ms() / 1000.0);
                }
                _ => {}
            }
            let last = matches!(event, Event::TurnFinished { .. });
            if let Some(sender) = &client {
                let data = serde_json::to_value(&event).unwrap_or_default();
                let name = data
                    .get("event")
                    .and_then(Value::as_str)
                    .unwrap_or("event")
                    .to_string();
                let sse = SseEvent::default().event(name).data(data.to_string());
                // A client that stops reading holds the send; the turn's
                // limit and shutdown still apply, and once the turn is
                // cancelled the client gets `UNREAD_GRACE` to read on.
                let delivered = {
                    let send = sender.send(sse);
                    tokio::pin!(send);
                    loop {
                        tokio::select! {
                            biased;
                            sent = &mut send => break sent.is_ok(),
                            () = &mut deadline, if !cancelled => {
                                cancelled = true;
                                busy.0.cancel_turn();
                            }
                            () = state.shutdown.cancelled(), if !cancelled => {
                                cancelled = true;
                                busy.0.cancel_turn();
                            }
                            () = tokio::time::sleep(UNREAD_GRACE), if cancelled => break false,
                        }
                    }
                };
                if !delivered {
                    client = None;
                    if !cancelled {
                        cancelled = true;
                        busy.0.cancel_turn();
                    }
                }
            }
            if last {
                break;
            }
        }
        *busy.0.running.lock().unwrap_or_else(|p| p.into_inner()) = None;
    });
    Ok(crate::sse_response(receiver))
}
