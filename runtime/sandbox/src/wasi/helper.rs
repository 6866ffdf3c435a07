//! WASI guests of a runtime that is not root, in a process of their own.
//!
//! # Threat model
//!
//! A guest must not change `.git`, `.envrc` and the other protected paths
//! of its workspace, nor see `.env`, `.ssh`, … (red-team finding H3: a hook
//! or `core.fsmonitor` planted in `.git` runs, unsandboxed, at the user's
//! next `git status`). The guest's filesystem calls are made by wasmtime in
//! the runtime's own process, so only the kernel's view of that process
//! can keep them off those paths: a mount namespace in which they are bound
//! read-only or hidden (see [`super::identity`]).
//!
//! A root runtime makes that namespace for the guest's thread. A runtime
//! that is not root cannot: it holds no `CAP_SYS_ADMIN`, and the user
//! namespace that would give it one can only be made by a single-threaded
//! process. So where a workspace holds protected paths, a runtime that is
//! not root runs the guest in the WASI helper: the sandbox helper binary,
//! started with [`GUEST_HELPER_ARG`], which
//!
//! 1. makes a user namespace while it is still single-threaded, mapping only
//!    the runtime's own uid and gid (it gains no access to any file: the
//!    kernel still checks every open as that user's), and sets
//!    `no_new_privs` and non-dumpable;
//! 2. runs the guest exactly as the runtime would, on a thread that makes
//!    its own mount namespace and binds the protected paths read-only or
//!    hides them before the workspace is preopened;
//! 3. answers with the [`Execution`]; for a stateful Python session it
//!    stays alive and answers one frame after another.
//!
//! Fail closed: if the helper is missing, or the kernel refuses the user
//! namespace, the call is refused with the reason, never run without the
//! protection. The runtime kills a helper that outlives the call's wall
//! time by more than [`HELPER_GRACE`] (the guest's own epoch deadline
//! stops it first). A workspace with no protected paths needs none of
//! this, and its guests run in process as before.

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use super::{Prepared, WasiEngine, WasiPolicy, WasiSandbox};
use crate::execution::Execution;
use crate::process::ProtectedPath;

/// Exit code of a helper that could not set up (as the process sandbox's).
const SETUP_FAILED_EXIT: i32 = 125;

/// The first argument that starts the sandbox helper as the WASI helper.
pub const GUEST_HELPER_ARG: &str = "--wasi-guest";

/// How long past the call's wall time the runtime waits for the helper
/// (its start, loading the module, reporting) before killing it.
pub(crate) const HELPER_GRACE: Duration = Duration::from_secs(15);

/// Set in the WASI helper once it holds a user namespace of its own.
static IN_HELPER: AtomicBool = AtomicBool::new(false);

/// Whether this process is the WASI helper.
pub(crate) fn in_helper() -> bool {
    IN_HELPER.load(Ordering::SeqCst)
}

/// Whether a guest in a workspace holding `present` protected paths must
/// run in the helper: the runtime is not root (root confines the guest's
/// thread in process) and is not the helper itself.
pub(crate) fn needed(present: &[ProtectedPath]) -> bool {
    !present.is_empty() && !in_helper() && !nix::unistd::geteuid().is_root()
}

/// What the runtime asks of the helper, as the first line on its stdin.
#[derive(Debug, Serialize, Deserialize)]
struct GuestRequest {
    /// The engine's module cache, and whether it meters fuel.
    cache_dir: std::path::PathBuf,
    fuel: bool,
    /// The module, and its key in the cache (loaded without rehashing).
    module: std::path::PathBuf,
    cache_key: String,
    /// The canonical workspace.
    workspace: std::path::PathBuf,
    policy: WasiPolicy,
    job: Job,
}

/// One call, or a stateful Python session.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Job {
    /// Run a module once with these arguments and stdin.
    Call {
        argv: Vec<String>,
        stdin: Option<Vec<u8>>,
    },
    /// Keep a Python interpreter and run the [`Frame`]s that follow.
    Session,
}

/// One piece of code for a session, as a line on the helper's stdin.
#[derive(Debug, Serialize, Deserialize)]
struct Frame {
    code: String,
    wall_ms: u64,
}

/// What the helper says, one line each on its stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum FromHelper {
    /// Confined and ready for the job.
    Ready,
    /// It could not confine itself; nothing ran.
    SetupFailed { message: String },
    /// A call's or a frame's outcome, and (for a session) how many times
    /// its interpreter has been reset so far.
    Outcome { outcome: Execution, resets: u64 },
}

fn request(
    sandbox: &WasiSandbox,
    prepared: &Prepared,
    module: &Path,
    workspace: &Path,
    policy: &WasiPolicy,
    job: Job,
) -> Result<String, String> {
    let request = GuestRequest {
        cache_dir: sandbox.engine.cache_dir().to_path_buf(),
        fuel: sandbox.engine.fuel(),
        module: module.to_path_buf(),
        cache_key: prepared.key.clone(),
        workspace: workspace.to_path_buf(),
        policy: policy.clone(),
        job,
    };
    serde_json::to_string(&request)
        .map(|line| line + "\n")
        .map_err(|e| format!("encoding the WASI helper's request: {e}"))
}

fn command() -> Result<std::process::Command, String> {
    let helper = crate::process::locate_helper().map_err(|e| {
        format!("the workspace has protected paths and this runtime is not root, so WASI guests run in the sandbox helper: {e}")
    })?;
    let mut command = std::process::Command::new(helper);
    command
        .arg(GUEST_HELPER_ARG)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(command)
}

/// Why a helper's answer is not an outcome.
fn unexpected(reply: Option<FromHelper>, stderr: &str) -> String {
    let stderr = stderr.trim();
    let said = if stderr.is_empty() {
        String::new()
    } else {
        format!(": {}", stderr.chars().take(2000).collect::<String>())
    };
    match reply {
        Some(FromHelper::SetupFailed { message }) => {
            format!("the WASI helper could not confine the guest, so it did not run: {message}")
        }
        Some(other) => format!("the WASI helper answered out of turn ({other:?}){said}"),
        None => format!("the WASI helper ended without an answer{said}"),
    }
}

/// Runs one guest in a fresh helper. Blocking.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_call(
    sandbox: &WasiSandbox,
    prepared: &Prepared,
    module: &Path,
    argv: &[String],
    stdin: Option<Vec<u8>>,
    workspace: &Path,
    policy: &WasiPolicy,
    deadline: &super::Deadline,
) -> Execution {
    let job = Job::Call {
        argv: argv.to_vec(),
        stdin,
    };
    let line = match request(sandbox, prepared, module, workspace, policy, job) {
        Ok(line) => line,
        Err(err) => return Execution::internal_error(err),
    };
    let mut child = match command().and_then(|mut c| {
        c.spawn()
            .map_err(|e| format!("starting the WASI helper: {e}"))
    }) {
        Ok(child) => child,
        Err(err) => return Execution::internal_error(err),
    };
    if let Some(mut input) = child.stdin.take() {
        // A helper that died at once is reported from its stdout below.
        let _ = input.write_all(line.as_bytes());
    }
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Execution::internal_error("the WASI helper's pipes were not set up");
    };
    // stderr is drained on a thread of its own, so that a helper that
    // writes much of it never blocks before closing stdout.
    let said = std::thread::Builder::new()
        .name("stack-wasi-helper-stderr".into())
        .spawn(move || {
            let mut said = Vec::new();
            let mut stderr = stderr;
            let _ = (&mut stderr).take(64 << 10).read_to_end(&mut said);
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            String::from_utf8_lossy(&said).into_owned()
        });
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::Builder::new()
        .name("stack-wasi-helper-reader".into())
        .spawn(move || {
            let mut replies = Vec::new();
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(reply) = serde_json::from_str::<FromHelper>(&line) {
                    replies.push(reply);
                }
            }
            let said = said.ok().and_then(|t| t.join().ok()).unwrap_or_default();
            let _ = tx.send((replies, said));
        });
    if let Err(err) = reader {
        let _ = child.kill();
        let _ = child.wait();
        return Execution::internal_error(format!("reading the WASI helper: {err}"));
    }
    let limit = Duration::from_millis(policy.wall_ms) + HELPER_GRACE;
    let give_up = std::time::Instant::now() + limit;
    // Waits in short steps: an abandoned call (its deadline moved to now,
    // see `EndOnDrop`) has its helper killed at once.
    let answer = loop {
        let now = std::time::Instant::now();
        let cancelled = deadline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|deadline| deadline <= now);
        if cancelled || now >= give_up {
            break Err(cancelled);
        }
        match rx.recv_timeout(CANCEL_POLL.min(give_up - now)) {
            Ok(answer) => break Ok(answer),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break Err(false),
        }
    };
    if answer.is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
    if matches!(answer, Err(true)) {
        return Execution::internal_error("the call was cancelled; its WASI helper was killed");
    }
    let Ok((replies, said)) = answer else {
        return Execution::timed_out(format!(
            "the WASI helper did not finish within {} ms and was killed",
            limit.as_millis()
        ));
    };
    let mut replies = replies.into_iter();
    match (replies.next(), replies.next()) {
        (Some(FromHelper::Ready), Some(FromHelper::Outcome { outcome, .. })) => outcome,
        (Some(FromHelper::Ready), other) => Execution::internal_error(unexpected(other, &said)),
        (first, _) => Execution::internal_error(unexpected(first, &said)),
    }
}

/// How often a one-shot helper call checks whether it was abandoned.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// Kills a helper (by pid) if dropped armed: a frame abandoned mid-run.
/// The helper is a child the runtime has not reaped, so its pid cannot
/// have been reused.
pub(super) struct KillHelperOnDrop(Option<nix::unistd::Pid>);

impl KillHelperOnDrop {
    /// Leaves the helper alone when dropped.
    pub(super) fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for KillHelperOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// A stateful Python session living in a helper of its own.
pub(super) struct HelperSession {
    child: tokio::process::Child,
    input: tokio::process::ChildStdin,
    output: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    /// Resets the helper's session had reported by the last frame.
    resets: u64,
}

impl std::fmt::Debug for HelperSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HelperSession")
            .field("pid", &self.child.id())
            .finish()
    }
}

impl HelperSession {
    /// Starts a helper holding a Python interpreter over `workspace`.
    pub(super) async fn start(
        sandbox: &WasiSandbox,
        prepared: &Prepared,
        module: &Path,
        workspace: &Path,
        policy: &WasiPolicy,
    ) -> Result<HelperSession, String> {
        let line = request(sandbox, prepared, module, workspace, policy, Job::Session)?;
        let mut child = tokio::process::Command::from(command()?)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting the WASI helper: {e}"))?;
        let (Some(mut input), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err("the WASI helper's pipes were not set up".into());
        };
        // Its stderr is only for a failure to report: drain it so the
        // helper never blocks on it.
        tokio::spawn(async move {
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(
                &mut tokio::io::AsyncReadExt::take(stderr, 1 << 20),
                &mut sink,
            )
            .await;
        });
        input
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("writing to the WASI helper: {e}"))?;
        let mut output = tokio::io::BufReader::new(stdout).lines();
        match next_reply(&mut output, HELPER_GRACE).await {
            Some(FromHelper::Ready) => Ok(HelperSession {
                child,
                input,
                output,
                resets: 0,
            }),
            other => Err(unexpected(other, "")),
        }
    }

    /// Runs `code` under `wall_ms`; returns the outcome and how many more
    /// times the interpreter was reset. An `Err` means the helper is gone
    /// (or was killed for overrunning), and its state with it.
    /// A guard that kills this helper if dropped before it is disarmed.
    pub(super) fn kill_on_drop(&self) -> KillHelperOnDrop {
        KillHelperOnDrop(
            self.child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .map(nix::unistd::Pid::from_raw),
        )
    }

    pub(super) async fn run(
        &mut self,
        code: &str,
        wall_ms: u64,
    ) -> Result<(Execution, u64), Execution> {
        let frame = Frame {
            code: code.to_string(),
            wall_ms,
        };
        let line = serde_json::to_string(&frame)
            .map_err(|e| Execution::internal_error(format!("encoding a frame: {e}")))?
            + "\n";
        let wrote = self.input.write_all(line.as_bytes()).await;
        let limit = Duration::from_millis(wall_ms) + HELPER_GRACE;
        let reply = match wrote {
            Ok(()) => next_reply(&mut self.output, limit).await,
            Err(_) => None,
        };
        match reply {
            Some(FromHelper::Outcome { outcome, resets }) => {
                let more = resets.saturating_sub(self.resets);
                self.resets = resets;
                Ok((outcome, more))
            }
            other => {
                let _ = self.child.start_kill();
                if wrote.is_ok() && self.child.try_wait().ok().flatten().is_none() {
                    return Err(Execution::timed_out(format!(
                        "the WASI helper did not answer within {} ms and was killed",
                        limit.as_millis()
                    )));
                }
                Err(Execution::internal_error(unexpected(other, "")))
            }
        }
    }

    /// Whether the helper is still running.
    pub(super) fn is_live(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

async fn next_reply(
    output: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    limit: Duration,
) -> Option<FromHelper> {
    let line = tokio::time::timeout(limit, output.next_line())
        .await
        .ok()?
        .ok()??;
    serde_json::from_str(&line).ok()
}

/// Entry point of the sandbox helper started with [`GUEST_HELPER_ARG`].
/// Never returns.
pub fn guest_helper_main() -> ! {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut first = String::new();
    let request = match input.read_line(&mut first) {
        Ok(_) => serde_json::from_str::<GuestRequest>(&first)
            .map_err(|e| format!("bad request from the runtime: {e}")),
        Err(e) => Err(format!("reading the request: {e}")),
    };
    let ready = request.and_then(|request| {
        confine()?;
        Ok(request)
    });
    let request = match ready {
        Ok(request) => request,
        Err(message) => {
            say(&FromHelper::SetupFailed { message });
            std::process::exit(SETUP_FAILED_EXIT)
        }
    };
    let sandbox = match WasiEngine::new(request.cache_dir.clone(), request.fuel) {
        Ok(engine) => WasiSandbox::new(engine),
        Err(err) => {
            say(&FromHelper::SetupFailed {
                message: err.to_string(),
            });
            std::process::exit(SETUP_FAILED_EXIT)
        }
    };
    let prepared = match sandbox.prepare_with(&request.module, Some(&request.cache_key)) {
        Ok(prepared) => prepared,
        Err(err) => {
            say(&FromHelper::SetupFailed {
                message: err.to_string(),
            });
            std::process::exit(SETUP_FAILED_EXIT)
        }
    };
    say(&FromHelper::Ready);
    match request.job {
        Job::Call { argv, stdin } => {
            let outcome = sandbox.run_guest(
                &prepared,
                &argv,
                stdin,
                &request.workspace,
                &request.policy,
                Default::default(),
            );
            say(&FromHelper::Outcome { outcome, resets: 0 });
        }
        Job::Session => serve_session(sandbox, &request, input),
    }
    std::process::exit(0)
}

/// Runs frames in one interpreter until the runtime closes stdin.
fn serve_session(sandbox: WasiSandbox, request: &GuestRequest, input: std::io::StdinLock<'_>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            say(&FromHelper::Outcome {
                outcome: Execution::internal_error(format!("the WASI helper's runtime: {err}")),
                resets: 0,
            });
            return;
        }
    };
    let mut session =
        super::PythonSession::new(sandbox, &request.workspace, request.policy.clone());
    session.python = Some(request.module.clone());
    for line in input.lines() {
        let Ok(line) = line else { return };
        let frame = match serde_json::from_str::<Frame>(&line) {
            Ok(frame) => frame,
            Err(err) => {
                say(&FromHelper::Outcome {
                    outcome: Execution::internal_error(format!("bad frame: {err}")),
                    resets: session.resets(),
                });
                continue;
            }
        };
        let policy = WasiPolicy {
            wall_ms: frame.wall_ms,
            ..request.policy.clone()
        };
        session.set_policy(&policy);
        let outcome = runtime.block_on(session.run(&frame.code));
        say(&FromHelper::Outcome {
            outcome,
            resets: session.resets(),
        });
    }
}

fn say(reply: &FromHelper) {
    let Ok(line) = serde_json::to_string(reply) else {
        return;
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Step 1 of the module docs: a user namespace of this process's own.
fn confine() -> Result<(), String> {
    use nix::sched::{unshare, CloneFlags};
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| {
        format!("the kernel refused a user namespace ({e}), which a runtime that is not root needs to keep the workspace's protected paths (.git, .env, …) out of a WASI guest's reach; allow unprivileged user namespaces (user.max_user_namespaces > 0, no AppArmor restriction), run the runtime as root, or drop the names from `[sandbox] read_only_in_workspace`/`hidden_in_workspace`")
    })?;
    let write = |path: &str, text: String| {
        std::fs::write(path, text).map_err(|e| format!("writing {path}: {e}"))
    };
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    write("/proc/self/gid_map", format!("{gid} {gid} 1"))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("PR_SET_DUMPABLE: {e}"))?;
    IN_HELPER.store(true, Ordering::SeqCst);
    Ok(())
}
