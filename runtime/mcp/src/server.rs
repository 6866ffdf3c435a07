//! The MCP server: the registry's tools, each call through the gate.
//!
//! A [`ToolService`] holds what every MCP session shares (the registry, the
//! policy, the audit log, the sandboxes and the workspace).
//! [`ToolService::session`] makes one [`McpSession`] per MCP session: over
//! stdio there is one, over Streamable HTTP one per `Mcp-Session-Id`. Each
//! session has its own [`Gate`] (budgets, and the grants an `always`
//! approval makes) and its own stateful Python interpreter, so one client's
//! state never reaches another's.
//!
//! Budgets are per session: each `tools/call` is a turn of its own (the
//! client runs the model's loop), so `calls_per_turn` counts one call and
//! the session-wide limits (`calls_per_session`, sandbox time) count all of
//! a session's calls. They bound a runaway client loop, not a hostile
//! client, which can open another session; the policy's per-call limits and
//! decisions hold for every session alike.
//!
//! Every `tools/call` goes through [`Gate::admit`] (validation, budgets,
//! policy and approval), [`dispatch::execute`] (the sandbox) and
//! [`Gate::finish`] (redaction, accounting, audit), exactly as a model's
//! call in the agent loop does. The result carries the text the model
//! would see, the whole [`ToolOutcome`] as structured content, and
//! `isError` for every status but `ok`.
//!
//! A policy `ask` becomes a form elicitation when the client declared the
//! capability; otherwise the [`UnansweredAsk`] fallback decides it (deny,
//! or approve for `--yes`). A client's `notifications/cancelled` stops the
//! call: the future that runs it is dropped, which kills its sandboxed
//! process.
//!
//! The server offers the handshake-era protocol versions (2024-11-05 to
//! 2025-11-25), where a connection is a session: the per-session state above
//! has nowhere to live in the sessionless 2026-07-28 revision. Clients that
//! probe `server/discover` (the Python SDK's `auto` mode) fall back to the
//! `initialize` handshake.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListToolsResult, PaginatedRequestParams, ProtocolVersion, ServerCapabilities,
    ServerConfig, Tool,
};
use rmcp::service::{ElicitationError, ElicitationMode, Peer, RequestContext, RoleServer};
use rmcp::{ErrorData as McpError, ServerHandler};
use serde_json::Value;
use tracing::Instrument;

use stack_core::dispatch::{self, ToolContext};
use stack_core::gate::{Admission, Gate};
use stack_core::policy::{
    ApprovalAnswer, ApprovalHandler, ApprovalRequest, AuditLog, Policy, Verdict,
};
use stack_core::tools::Registry;
use stack_types::message::ToolCall;
use stack_types::outcome::{Status, ToolOutcome};
use stack_types::text::one_line;

/// The newest protocol revision served (see the module docs for why not
/// 2026-07-28).
const NEWEST_PROTOCOL: ProtocolVersion = ProtocolVersion::V_2025_11_25;

/// What decides a policy `ask` when the client cannot be asked (it did not
/// declare the elicitation capability).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UnansweredAsk {
    /// Refuse the call (the default).
    #[default]
    Deny,
    /// Run it, as `--yes` does.
    Approve,
}

/// What an MCP server serves.
pub struct ServerOptions {
    /// The tools.
    pub registry: Arc<Registry>,
    /// The policy every call obeys.
    pub policy: Arc<Policy>,
    /// Sandboxes, limits and the workspace, shared by the sessions (each
    /// session gets its own Python interpreter).
    pub context: ToolContext,
    /// Who decides an `ask` the client cannot answer.
    pub unanswered_ask: UnansweredAsk,
    /// Where decisions and results are recorded, if anywhere.
    pub audit: Option<Arc<AuditLog>>,
}

/// What every MCP session shares; cheap to clone.
#[derive(Clone)]
pub struct ToolService {
    shared: Arc<Shared>,
}

struct Shared {
    registry: Arc<Registry>,
    policy: Arc<Policy>,
    context: ToolContext,
    unanswered_ask: UnansweredAsk,
    audit: Option<Arc<AuditLog>>,
    tools: Vec<Tool>,
    sessions: AtomicU64,
}

impl ToolService {
    /// A service over `options`.
    pub fn new(options: ServerOptions) -> ToolService {
        let tools = options.registry.tools().map(mcp_tool).collect();
        ToolService {
            shared: Arc::new(Shared {
                registry: options.registry,
                policy: options.policy,
                context: options.context,
                unanswered_ask: options.unanswered_ask,
                audit: options.audit,
                tools,
                sessions: AtomicU64::new(0),
            }),
        }
    }

    /// A new session: its own gate and Python interpreter.
    pub fn session(&self) -> McpSession {
        let number = self.shared.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("mcp-{}-{number}", std::process::id());
        let mut gate = Gate::new(
            Arc::clone(&self.shared.registry),
            Arc::clone(&self.shared.policy),
            name.clone(),
        );
        if let Some(audit) = &self.shared.audit {
            gate = gate.with_audit_log(Arc::clone(audit));
        }
        let context = self.shared.context.for_new_session();
        McpSession {
            shared: Arc::clone(&self.shared),
            gate: Arc::new(tokio::sync::Mutex::new(gate)),
            context,
            name,
        }
    }

    /// The tools as MCP lists them.
    pub fn tools(&self) -> &[Tool] {
        &self.shared.tools
    }
}

/// One MCP session: the rmcp [`ServerHandler`].
#[derive(Clone)]
pub struct McpSession {
    shared: Arc<Shared>,
    gate: Arc<tokio::sync::Mutex<Gate>>,
    context: ToolContext,
    name: String,
}

impl McpSession {
    /// The session's name in the audit log and the traces.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs one call through the gate. An approval the policy asks for is
    /// obtained first, without holding the gate, so that one pending
    /// elicitation never holds up this session's other calls; the gate then
    /// decides the call again and, if it asks, gets that answer.
    /// `admitted` is set to the time the gate admitted the call, if it did.
    async fn run(
        &self,
        call: &ToolCall,
        peer: &Peer<RoleServer>,
        admitted: &std::sync::Mutex<Option<std::time::Instant>>,
    ) -> ToolOutcome {
        let request = approval_request(&*self.gate.lock().await, call);
        let approver: Option<Arc<dyn ApprovalHandler>> = match request {
            None => None,
            Some(request) => self.ask(&request, peer).await.map(|answer| {
                Arc::new(move |_: &ApprovalRequest| answer) as Arc<dyn ApprovalHandler>
            }),
        };
        let admission = {
            let mut gate = self.gate.lock().await;
            // Each MCP call is a turn of its own (the client runs the loop):
            // per-turn limits count one call, session limits all of them.
            gate.budget().start_turn();
            gate.set_approver(approver);
            let admission = gate.admit(call).await;
            gate.set_approver(None);
            admission
        };
        match admission {
            Admission::Refused(outcome) => outcome,
            Admission::Run(authorized) => {
                *admitted
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(std::time::Instant::now());
                let span = tracing::info_span!("tool_call", session = %self.name, call_id = %call.id, tool = %call.function.name);
                let outcome = dispatch::execute(&authorized, &self.context)
                    .instrument(span)
                    .await;
                self.gate.lock().await.finish(call, outcome)
            }
        }
    }

    /// The answer to an `ask`: the client's, through a form elicitation
    /// when it supports one; otherwise the `--yes` fallback, or `None` (no
    /// one can approve, and the refusal says so).
    async fn ask(
        &self,
        request: &ApprovalRequest,
        peer: &Peer<RoleServer>,
    ) -> Option<ApprovalAnswer> {
        if peer
            .supported_elicitation_modes()
            .contains(&ElicitationMode::Form)
        {
            return Some(elicit_approval(peer, request).await);
        }
        match self.shared.unanswered_ask {
            UnansweredAsk::Approve => Some(ApprovalAnswer::Yes),
            UnansweredAsk::Deny => None,
        }
    }
}

/// What the policy would ask about `call`, if it would ask (validation,
/// grants and all); `None` when it would not, or the call is invalid (the
/// gate then refuses it itself).
fn approval_request(gate: &Gate, call: &ToolCall) -> Option<ApprovalRequest> {
    let validated = gate.registry().validate(call).ok()?;
    let tool = validated.tool().name.clone();
    let decision = gate
        .policy()
        .decide(&tool, validated.arguments(), gate.grants());
    (decision.verdict == Verdict::Ask).then(|| ApprovalRequest {
        call_id: call.id.clone(),
        tool,
        arguments: validated.arguments().clone(),
        rule: decision.rule,
        reason: decision.reason,
    })
}

impl ServerHandler for McpSession {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "stack-runtime",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_protocol_version(NEWEST_PROTOCOL)
            .with_instructions(
                "Stack Runtime's tools. Code runs in a sandbox (landlock, seccomp, namespaces, \
                 rlimits; or WASI) under the server's policy; file tools reach only the \
                 workspace. A refused or failed call comes back with isError and says why.",
            )
    }

    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        Cow::Borrowed(ProtocolVersion::known_up_to(&NEWEST_PROTOCOL))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(self.shared.tools.clone()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.shared.tools.iter().find(|t| t.name == name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let arguments = Value::Object(request.arguments.unwrap_or_default());
        // The id is the client's too, and goes into every audit record.
        let call_id = cut_text(&format!("mcp-{}", request_id_text(&context)));
        // An unknown tool is a protocol error (the MCP spec's
        // `-32602`), not a tool's failure: there is no tool to fail. The
        // gate still sees the call, whose validation refuses it and
        // records it in the audit log, as it does a model's call to a tool
        // that does not exist: a client probing for tools leaves a trace.
        // The name is the client's, bounded only by the message size, so
        // it is recorded (and echoed) cut to [`MAX_RECORDED_BYTES`]; the
        // arguments are not recorded (validation fails on the name).
        {
            let mut gate = self.gate.lock().await;
            if gate.registry().get(request.name.as_ref()).is_none() {
                let name = cut_text(&request.name);
                let probe = ToolCall::function(call_id, name.clone(), "{}".to_string());
                let refused = gate.admit(&probe).await;
                debug_assert!(matches!(refused, Admission::Refused(_)));
                return Err(McpError::invalid_params(
                    format!(
                        "unknown tool `{}`; tools/list names the tools",
                        one_line(&name)
                    ),
                    None,
                ));
            }
        }
        let call = ToolCall::function(call_id, request.name.to_string(), arguments.to_string());
        // When the gate admitted the call: a call cancelled before then
        // (while its approval was asked, or while it waited for the gate)
        // never ran, and is charged nothing.
        let admitted = std::sync::Mutex::new(None);
        let outcome = tokio::select! {
            outcome = self.run(&call, &context.peer, &admitted) => outcome,
            () = context.ct.cancelled() => {
                // Dropping `run` stopped the call (see invariant 19).
                let admitted = *admitted.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match admitted {
                    Some(at) => self.gate.lock().await.finish_abandoned(&call, at.elapsed()),
                    None => ToolOutcome::failed("cancelled by the caller before it ran; nothing ran"),
                }
            }
        };
        let text = self.gate.lock().await.text_for_model(&outcome);
        Ok(CallToolResponse::Complete(call_result(
            &within_text(&outcome, &text),
            text,
        )))
    }
}

/// Longest client text (a call's id, an unknown tool's name) recorded in
/// the audit log as it came.
const MAX_RECORDED_BYTES: usize = 256;

/// `text` cut to [`MAX_RECORDED_BYTES`] (at a character boundary), marked
/// where it was cut.
fn cut_text(text: &str) -> String {
    if text.len() <= MAX_RECORDED_BYTES {
        return text.to_string();
    }
    let kept = text.floor_char_boundary(MAX_RECORDED_BYTES);
    format!("{}… (cut from {} bytes)", &text[..kept], text.len())
}

fn request_id_text(context: &RequestContext<RoleServer>) -> String {
    match serde_json::to_value(&context.id) {
        Ok(Value::String(text)) => text,
        Ok(other) => other.to_string(),
        Err(_) => "call".to_string(),
    }
}

/// The outcome as far as `text` (what the session's output budget let
/// through, [`Gate::text_for_model`]) holds it: unchanged when nothing was
/// cut; otherwise its error, stdout and stderr cut, in that order, to
/// `text`'s length in all, and marked truncated. So the structured content
/// of a result never carries more than its text (a client that hands the
/// model `structuredContent` gets no more than the budget).
fn within_text(outcome: &ToolOutcome, text: &str) -> ToolOutcome {
    if text == outcome.to_model_text() {
        return outcome.clone();
    }
    let mut within = outcome.clone();
    let mut left = text.len();
    let mut cut = |field: &mut String| {
        let kept = field.floor_char_boundary(left.min(field.len()));
        field.truncate(kept);
        left -= kept;
    };
    if let Some(error) = &mut within.error {
        cut(error);
    }
    cut(&mut within.stdout);
    cut(&mut within.stderr);
    within.truncated = true;
    within
}

/// The MCP result of an outcome: the model's text, the outcome itself as
/// structured content (see [`within_text`] for an outcome the budget
/// cut), and `isError` unless it succeeded.
pub fn call_result(outcome: &ToolOutcome, text: String) -> CallToolResult {
    let mut result = if outcome.status == Status::Ok {
        CallToolResult::success(vec![ContentBlock::text(text)])
    } else {
        CallToolResult::error(vec![ContentBlock::text(text)])
    };
    result.structured_content = serde_json::to_value(outcome).ok();
    result
}

/// A registry tool as MCP lists it.
fn mcp_tool(spec: &stack_core::tools::ToolSpec) -> Tool {
    let schema: JsonObject = match &spec.parameters {
        Value::Object(object) => object.clone(),
        // The registry only admits object schemas; an empty object schema is
        // the safe reading of anything else.
        _ => serde_json::Map::from_iter([("type".to_string(), Value::from("object"))]),
    };
    Tool::new(
        spec.name.clone(),
        spec.description.clone(),
        Arc::new(schema),
    )
}

/// The form a client fills in to answer an `ask`.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct ApprovalForm {
    /// Run this call?
    approve: bool,
    /// Also allow what asked (this tool, or this rule) for the rest of the
    /// session without asking again.
    #[serde(default)]
    remember: bool,
}

rmcp::elicit_safe!(ApprovalForm);

/// How long a client has to answer an approval before it counts as no.
const APPROVAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Asks the client, with a form elicitation, whether to run a call.
async fn elicit_approval(peer: &Peer<RoleServer>, request: &ApprovalRequest) -> ApprovalAnswer {
    let message = approval_message(request);
    match peer
        .elicit_with_timeout::<ApprovalForm>(message, Some(APPROVAL_TIMEOUT))
        .await
    {
        Ok(Some(ApprovalForm {
            approve: true,
            remember: true,
        })) => ApprovalAnswer::Always,
        Ok(Some(ApprovalForm { approve: true, .. })) => ApprovalAnswer::Yes,
        Ok(Some(_) | None)
        | Err(ElicitationError::UserDeclined | ElicitationError::UserCancelled) => {
            ApprovalAnswer::No
        }
        Err(err) => {
            tracing::warn!(%err, tool = %request.tool, "the approval elicitation failed; the call is refused");
            ApprovalAnswer::No
        }
    }
}

/// What the approval form says: why the policy asks, then the whole call
/// as [`ApprovalRequest::describe`] writes it (every argument, code as its
/// lines, control and bidi characters escaped). Never a prefix: what is
/// approved, and with `remember` granted for the session, is what was
/// shown. (The client sent these arguments itself, so it can show them.)
fn approval_message(request: &ApprovalRequest) -> String {
    let reason = request
        .reason
        .as_deref()
        .map_or_else(String::new, |r| format!(" ({})", one_line(r)));
    format!(
        "The policy asks before running `{}`{reason}; rule {}.\n{}",
        one_line(&request.tool),
        one_line(&request.rule),
        request.describe().join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use stack_core::workspace::Workspace;

    /// A client's id or unknown tool name is recorded whole up to the
    /// bound, and cut at a character boundary past it, saying so.
    #[test]
    fn client_text_is_cut_before_it_is_recorded() {
        assert_eq!(cut_text("no_such_tool"), "no_such_tool");
        // Byte 256 falls inside an `é`: the cut keeps 255 bytes.
        let hostile = format!("a{}", "é".repeat(1 << 20));
        let cut = cut_text(&hostile);
        let (kept, marker) = cut.split_once('…').expect("marked");
        assert_eq!(kept.len(), MAX_RECORDED_BYTES - 1);
        assert!(kept.starts_with("aé"));
        assert_eq!(marker, format!(" (cut from {} bytes)", hostile.len()));
    }

    /// A host tool's arguments.
    #[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
    struct Greeting {
        /// Who to greet.
        name: String,
    }

    /// A result's structured content never carries more than the text the
    /// budget let through: 1 MiB of output fed as 16 KiB gives at most
    /// 16 KiB of structured stdout, marked truncated; an uncut result's
    /// structured content is the whole outcome.
    #[test]
    fn structured_content_is_held_to_what_the_budget_fed() {
        let outcome = ToolOutcome::from_output(&vec![b'x'; 1 << 20], b"warning", false);
        let mut budget =
            stack_core::policy::budget::BudgetTracker::new(stack_core::policy::BudgetSettings {
                result_bytes_to_model: Some(16 << 10),
                ..Default::default()
            });
        let text = budget.feed_to_model(&outcome.to_model_text());
        let result = call_result(&within_text(&outcome, &text), text.clone());
        let structured = result.structured_content.expect("structured content");
        let stdout = structured["stdout"].as_str().expect("stdout");
        let stderr = structured["stderr"].as_str().expect("stderr");
        assert!(
            stdout.len() + stderr.len() <= text.len(),
            "{}",
            stdout.len()
        );
        assert!(stdout.len() > 8 << 10, "cut too far: {}", stdout.len());
        assert_eq!(structured["truncated"], true);

        let small = ToolOutcome::from_output(b"42\n", b"", false);
        let text = budget.feed_to_model(&small.to_model_text());
        let result = call_result(&within_text(&small, &text), text);
        assert_eq!(result.structured_content, serde_json::to_value(&small).ok());
    }

    /// Every kind of tool the registry holds is served, each with its own
    /// schema: the built-ins, schema-file tools and a host's Rust tools.
    #[test]
    fn built_in_schema_file_and_host_tools_are_all_listed_with_their_schemas() {
        let mut registry = Registry::with_builtins();
        registry
            .register_host_tool::<Greeting, _>("greet", "Greets someone.", |args, _| {
                Ok(format!("hello {}", args.name))
            })
            .expect("host tool");
        let tools_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools");
        assert!(
            registry.load_dir(&tools_dir).is_empty(),
            "the shipped tools load"
        );
        let workspace = tempfile::tempdir().expect("tempdir");
        let service = ToolService::new(ServerOptions {
            registry: Arc::new(registry),
            policy: Arc::new(Policy::preset("default").expect("policy")),
            context: ToolContext::new(Workspace::open(workspace.path()).expect("workspace")),
            unanswered_ask: UnansweredAsk::Deny,
            audit: None,
        });
        let schema_of = |name: &str| {
            let tool = service
                .tools()
                .iter()
                .find(|t| t.name == name)
                .unwrap_or_else(|| panic!("{name} is not listed"));
            Value::Object((*tool.input_schema).clone())
        };
        assert_eq!(schema_of("greet")["properties"]["name"]["type"], "string");
        assert_eq!(schema_of("greet")["required"], serde_json::json!(["name"]));
        assert_eq!(
            schema_of("unit_convert")["required"],
            serde_json::json!(["value", "from", "to"])
        );
        assert_eq!(
            schema_of("read_file")["required"],
            serde_json::json!(["path"])
        );
    }
}
