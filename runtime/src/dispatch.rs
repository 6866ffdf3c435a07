//! Running an authorized call: the single path from a tool call to whatever
//! executes it.
//!
//! [`execute`] takes an [`AuthorizedCall`], which only
//! [`Policy::authorize`](crate::policy::Policy::authorize) makes, from a
//! [`ValidatedCall`](crate::tools::ValidatedCall) that only
//! [`Registry::validate`](crate::tools::Registry::validate) makes: nothing
//! runs unless it was validated and decided (invariant 1 in ARCHITECTURE.md).

use std::sync::Arc;
use std::time::Instant;

use crate::outcome::ToolOutcome;
use crate::policy::{process_policy, AuthorizedCall, Backend};
use crate::sandbox::process::ProcessSandbox;
use crate::tools::builtin::{run_file_tool, ExecuteCodeArgs};
use crate::tools::{Builtin, Executor, Language};
use crate::workspace::Workspace;

/// Which sandbox runs code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxKind {
    /// wasmtime with WASI preview 1.
    Wasi,
    /// A subprocess under landlock, seccomp, namespaces and rlimits.
    Process,
}

impl SandboxKind {
    /// `wasi` or `process`.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxKind::Wasi => "wasi",
            SandboxKind::Process => "process",
        }
    }
}

/// What a tool may use while it runs.
#[derive(Debug, Clone)]
pub struct ToolContext {
    /// The session workspace; file tools cannot reach past it.
    pub workspace: Arc<Workspace>,
    /// Cap on the result text (and on each of stdout and stderr).
    pub max_output_bytes: usize,
    /// The sandbox for code when the caller chose one (overrides the policy's backend).
    pub sandbox: Option<SandboxKind>,
    /// The process sandbox, when its helper was found.
    pub process: Option<Arc<ProcessSandbox>>,
}

impl ToolContext {
    /// A context over `workspace` with default limits and no sandbox preference.
    pub fn new(workspace: Workspace) -> Self {
        ToolContext {
            workspace: Arc::new(workspace),
            max_output_bytes: crate::sandbox::process::ResourceLimits::default().output_bytes,
            sandbox: None,
            process: ProcessSandbox::locate().ok().map(Arc::new),
        }
    }
}

/// Runs a validated call and reports how it went. Never panics on what the
/// call contains; every failure becomes a [`ToolOutcome`].
pub async fn execute(authorized: &AuthorizedCall, ctx: &ToolContext) -> ToolOutcome {
    let started = Instant::now();
    let call = authorized.call();
    let mut outcome = match &call.tool().executor {
        Executor::Builtin(Builtin::ExecuteCode) => execute_code(authorized, ctx).await,
        Executor::Builtin(builtin) => {
            let (builtin, arguments, ctx) = (*builtin, call.arguments().clone(), ctx.clone());
            blocking(move || run_file_tool(builtin, &arguments, &ctx)).await
        }
        Executor::Host(handler) => {
            let (handler, arguments, ctx) = (Arc::clone(handler), call.arguments().clone(), ctx.clone());
            blocking(move || match handler.call(&arguments, &ctx) {
                Ok(text) => {
                    let truncated = text.len() > ctx.max_output_bytes;
                    ToolOutcome::ok_text(cut_to(text, ctx.max_output_bytes), truncated)
                }
                Err(message) => ToolOutcome::failed(message),
            })
            .await
        }
        Executor::Wasi(_) => ToolOutcome::internal_error(format!(
            "tool `{}` runs in the WASI sandbox, which this build of stack-runtime does not provide yet",
            call.tool().name
        )),
        Executor::Command(_) if backend(authorized, ctx) == SandboxKind::Wasi => {
            ToolOutcome::denied(format!(
                "tool `{}` runs in the process sandbox, and the policy allows only the WASI sandbox",
                call.tool().name
            ))
        }
        Executor::Command(command) => match process_sandbox(ctx) {
            Ok(sandbox) => {
                let stdin = call.arguments().to_string().into_bytes();
                let policy = process_policy(authorized.sandbox());
                sandbox
                    .run(&command.argv, Some(stdin), ctx.workspace.root(), &policy)
                    .await
            }
            Err(outcome) => *outcome,
        },
        Executor::Unbound => ToolOutcome::internal_error(format!(
            "tool `{}` is declared but nothing is bound to run it; give its schema file an \"executor\" or register a host handler for it",
            call.tool().name
        )),
    };
    outcome.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    outcome
}

async fn execute_code(authorized: &AuthorizedCall, ctx: &ToolContext) -> ToolOutcome {
    let args: ExecuteCodeArgs = match serde_json::from_value(authorized.call().arguments().clone())
    {
        Ok(args) => args,
        Err(err) => {
            return ToolOutcome::internal_error(format!(
                "validated arguments did not fit execute_code: {err}"
            ))
        }
    };
    let backend = if args.language == Language::Javascript {
        SandboxKind::Wasi
    } else {
        backend(authorized, ctx)
    };
    match (backend, args.language) {
        (SandboxKind::Wasi, language) => ToolOutcome::internal_error(format!(
            "execute_code cannot run `{}` in the WASI sandbox: this build of stack-runtime does not provide it yet",
            language.name()
        )),
        (SandboxKind::Process, language) => match process_sandbox(ctx) {
            Ok(sandbox) => {
                sandbox
                    .run_code(
                        language,
                        &args.code,
                        ctx.workspace.root(),
                        &process_policy(authorized.sandbox()),
                    )
                    .await
            }
            Err(outcome) => *outcome,
        },
    }
}

/// The sandbox a call runs in: the caller's choice, else the policy's,
/// else the process sandbox.
fn backend(authorized: &AuthorizedCall, ctx: &ToolContext) -> SandboxKind {
    ctx.sandbox.unwrap_or(match authorized.sandbox().backend {
        Some(Backend::Wasi) => SandboxKind::Wasi,
        Some(Backend::Process) | None => SandboxKind::Process,
    })
}

fn process_sandbox(ctx: &ToolContext) -> Result<&ProcessSandbox, Box<ToolOutcome>> {
    match &ctx.process {
        Some(sandbox) => Ok(sandbox),
        None => Err(Box::new(ToolOutcome::internal_error(
            ProcessSandbox::locate().err().map_or_else(
                || "the process sandbox is not configured".to_string(),
                |e| e.to_string(),
            ),
        ))),
    }
}

async fn blocking(work: impl FnOnce() -> ToolOutcome + Send + 'static) -> ToolOutcome {
    match tokio::task::spawn_blocking(work).await {
        Ok(outcome) => outcome,
        Err(err) => ToolOutcome::internal_error(format!("tool handler crashed: {err}")),
    }
}

fn cut_to(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}
