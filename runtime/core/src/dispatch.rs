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

use crate::policy::{process_policy, AuthorizedCall, Backend};
use crate::tools::builtin::{run_file_tool, ExecuteCodeArgs};
use crate::tools::{Builtin, Executor, Language};
use stack_sandbox::process::ProcessSandbox;
use stack_types::outcome::ToolOutcome;

pub use crate::context::{SandboxKind, ToolContext};

/// Runs a validated call and reports how it went. Never panics on what the
/// call contains; every failure becomes a [`ToolOutcome`].
pub async fn execute(authorized: &AuthorizedCall, ctx: &ToolContext) -> ToolOutcome {
    let started = Instant::now();
    let call = authorized.call();
    let mut outcome = match &call.tool().executor {
        Executor::Builtin(Builtin::ExecuteCode) => execute_code(authorized, ctx).await,
        Executor::Builtin(builtin) => {
            let (builtin, ctx) = (*builtin, ctx.clone());
            let authorized = authorized.clone();
            blocking(move || {
                let denied = |relative: &str| authorized.denied_path(relative);
                run_file_tool(builtin, authorized.call().arguments(), &ctx, &denied)
            })
            .await
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
        Executor::Wasi(wasi) => run_wasi_tool(wasi, authorized, ctx).await,
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
                    .into()
            }
            Err(outcome) => *outcome,
        },
        Executor::External(tool) => {
            cap_external(tool.call(call.arguments(), ctx).await, ctx.max_output_bytes)
        }
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
        (SandboxKind::Wasi, language) => {
            run_code_in_wasi(language, &args.code, authorized, ctx).await
        }
        (SandboxKind::Process, language) => match process_sandbox(ctx) {
            Ok(sandbox) => sandbox
                .run_code(
                    language,
                    &args.code,
                    ctx.workspace.root(),
                    &process_policy(authorized.sandbox()),
                )
                .await
                .into(),
            Err(outcome) => *outcome,
        },
    }
}

#[cfg(feature = "wasi")]
fn wasi_sandbox(ctx: &ToolContext) -> Result<&stack_sandbox::wasi::WasiSandbox, Box<ToolOutcome>> {
    ctx.wasi.as_ref().ok_or_else(|| {
        Box::new(ToolOutcome::internal_error(
            "the WASI sandbox could not be started (see the log for why)",
        ))
    })
}

#[cfg(feature = "wasi")]
async fn run_code_in_wasi(
    language: Language,
    code: &str,
    authorized: &AuthorizedCall,
    ctx: &ToolContext,
) -> ToolOutcome {
    use stack_sandbox::wasi::PythonSession;
    let sandbox = match wasi_sandbox(ctx) {
        Ok(sandbox) => sandbox,
        Err(outcome) => return *outcome,
    };
    let policy = crate::policy::wasi_policy(authorized.sandbox());
    let root = ctx.workspace.root();
    match language {
        Language::Javascript => sandbox.run_javascript(code, root, &policy).await.into(),
        Language::Python if authorized.sandbox().stateful.unwrap_or(false) => {
            let mut slot = ctx.python_session.lock().await;
            let session = slot
                .get_or_insert_with(|| PythonSession::new(sandbox.clone(), root, policy.clone()));
            // Each call runs under the limits in force for it, not the first
            // call's.
            session.set_policy(&policy);
            session.run(code).await.into()
        }
        Language::Python => sandbox.run_python(code, root, &policy).await.into(),
        Language::Bash => ToolOutcome::denied(
            "bash runs only in the process sandbox, and this call is set to use the WASI sandbox",
        ),
    }
}

#[cfg(not(feature = "wasi"))]
async fn run_code_in_wasi(
    language: Language,
    _: &str,
    _: &AuthorizedCall,
    _: &ToolContext,
) -> ToolOutcome {
    ToolOutcome::internal_error(format!(
        "execute_code cannot run `{}`: this build of stack-runtime has no WASI sandbox (feature `wasi`)",
        language.name()
    ))
}

#[cfg(feature = "wasi")]
async fn run_wasi_tool(
    wasi: &crate::tools::WasiExecutor,
    authorized: &AuthorizedCall,
    ctx: &ToolContext,
) -> ToolOutcome {
    use crate::tools::WasiExecutor;
    let sandbox = match wasi_sandbox(ctx) {
        Ok(sandbox) => sandbox,
        Err(outcome) => return *outcome,
    };
    let policy = crate::policy::wasi_policy(authorized.sandbox());
    let stdin = authorized.call().arguments().to_string().into_bytes();
    let root = ctx.workspace.root();
    match wasi {
        WasiExecutor::Script { runtime, script } => sandbox
            .run_script(*runtime, script, stdin, root, &policy)
            .await
            .into(),
        WasiExecutor::Module { module, args } => sandbox
            .run_module(module, args, stdin, root, &policy)
            .await
            .into(),
    }
}

#[cfg(not(feature = "wasi"))]
async fn run_wasi_tool(
    _: &crate::tools::WasiExecutor,
    authorized: &AuthorizedCall,
    _: &ToolContext,
) -> ToolOutcome {
    ToolOutcome::internal_error(format!(
        "tool `{}` runs in the WASI sandbox, and this build of stack-runtime has none (feature `wasi`)",
        authorized.call().tool().name
    ))
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

/// An external tool's outcome held to the call's output cap: stdout and
/// stderr cut to `max` bytes each (marked truncated), and the error too,
/// which the far side writes as well (a JSON-RPC error's message), with a
/// marker saying how much was cut.
fn cap_external(mut outcome: ToolOutcome, max: usize) -> ToolOutcome {
    for stream in [&mut outcome.stdout, &mut outcome.stderr] {
        if stream.len() > max {
            *stream = cut_to(std::mem::take(stream), max);
            outcome.truncated = true;
        }
    }
    if let Some(error) = &mut outcome.error {
        if error.len() > max {
            let cut = error.len() - error.floor_char_boundary(max);
            let mut kept = cut_to(std::mem::take(error), max);
            kept.push_str(&format!(" [... {cut} more bytes cut ...]"));
            *error = kept;
        }
    }
    outcome
}

fn cut_to(mut text: String, limit: usize) -> String {
    text.truncate(text.floor_char_boundary(limit));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers with megabytes (as output or as an error
    /// message) gets the call's output cap on every field it wrote.
    #[test]
    fn an_external_tools_output_and_error_are_held_to_the_cap() {
        let mut outcome = ToolOutcome::failed("é".repeat(3 << 20));
        outcome.stdout = "o".repeat(5000);
        outcome.stderr = "short".to_string();
        let capped = cap_external(outcome, 4096);
        assert_eq!(capped.stdout.len(), 4096);
        assert_eq!(capped.stderr, "short");
        assert!(capped.truncated);
        let error = capped.error.expect("an error");
        assert!(error.len() < 4096 + 64, "{}", error.len());
        assert!(
            error.starts_with('é') && error.ends_with("more bytes cut ...]"),
            "{error:.40}"
        );
        let small = cap_external(ToolOutcome::failed("refused"), 4096);
        assert_eq!(small.error.as_deref(), Some("refused"));
        assert!(!small.truncated);
    }
}
