//! Stateful Python: one live interpreter per session, as in a notebook.
//!
//! The guest runs a small driver (`driver.py`) that reads code frames from
//! stdin and runs each in one persistent globals dict, then writes the
//! frame's exit status to stdout behind a per-session nonce. The instance
//! runs on its own thread. A deadline, memory or crash trap ends the
//! instance; the result says the state was lost, and the next call starts a
//! fresh one.
//!
//! A frame ends when the guest waits on an empty stdin, which the host
//! sees for itself (see [`super::feed`]), never on anything the guest
//! prints; the deadline holds until then. The nonce only separates the
//! status from the output: code that finds it can at worst misstate its own
//! frame's status, never end a frame early or outrun the deadline.
//!
//! Where a runtime that is not root must keep protected paths out of the
//! guest's reach, the interpreter lives in a WASI helper process instead
//! (see [`super::helper`]), which runs this same code and answers frame by
//! frame. Either way an instance is ended, and the next call says the
//! state was lost, when the workspace's protected paths change under it:
//! its mount namespace was made for the ones there were.

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime_wasi::WasiCtxBuilder;

use super::feed::{frame_feed, FrameEnd, FrameFeed};
use super::output::CappedOutput;
use super::{classify, grant_mounts, WasiPolicy, WasiSandbox, GUEST_ENV};
use crate::execution::{ExecStatus, Execution};
use crate::process::ProtectedPath;
use stack_assets::Asset;

/// The driver, after the cell runner it calls (see `../cell.py`).
const DRIVER: &str = concat!(include_str!("../cell.py"), include_str!("driver.py"));

/// What the outcome says when an instance had to be reset.
pub const STATE_LOST: &str =
    "the Python session was reset: variables and imports from earlier calls are gone";

struct Live {
    stdin: FrameFeed,
    stdout: CappedOutput,
    stderr: CappedOutput,
    deadline: Arc<Mutex<Option<Instant>>>,
    /// Set between frames (see `StoreState::between_frames`).
    between_frames: Arc<AtomicBool>,
    /// Set when the watchdog interrupted the guest in a blocked host call.
    interrupted: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
    memory_hit: Arc<AtomicBool>,
    /// What the current frame has added to the workspace.
    disk: Arc<super::budget::DiskMeter>,
    thread: std::thread::JoinHandle<wasmtime::Result<()>>,
}

/// Where a session's interpreter lives.
enum Instance {
    /// On a thread of this process.
    InProcess(Live),
    /// In a WASI helper process.
    Helper(Box<super::helper::HelperSession>),
}

/// A live Python interpreter that keeps its state between calls.
pub struct PythonSession {
    sandbox: WasiSandbox,
    workspace: PathBuf,
    policy: WasiPolicy,
    live: Option<Instance>,
    /// The protected paths the workspace held when the instance started,
    /// with their inodes (its binds are of those objects).
    protected_at_start: Vec<ProtectedPath>,
    /// `python.wasm`, where it is not the embedded asset's usual place (the
    /// WASI helper is told it).
    pub(super) python: Option<PathBuf>,
    resets: u64,
    /// Why the last instance was ended between calls, for the next outcome.
    restarted: Option<String>,
    /// Set while a call runs; still set at the next call if the last one
    /// was abandoned (its future dropped) before it finished.
    in_call: bool,
}

impl std::fmt::Debug for PythonSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PythonSession")
            .field("workspace", &self.workspace)
            .field("live", &self.live.is_some())
            .field("resets", &self.resets)
            .finish()
    }
}

impl PythonSession {
    /// A session over `workspace`; the interpreter starts on the first call.
    pub fn new(sandbox: WasiSandbox, workspace: &Path, policy: WasiPolicy) -> Self {
        PythonSession {
            sandbox,
            workspace: workspace.to_path_buf(),
            policy,
            live: None,
            protected_at_start: Vec::new(),
            python: None,
            resets: 0,
            restarted: None,
            in_call: false,
        }
    }

    /// Makes `policy` the one the next calls run under. The wall-clock limit
    /// applies from the next call on; a different memory cap, fuel budget,
    /// output cap or set of mounts can only be given to a new interpreter,
    /// so a live one is ended and the next call's outcome says the state was
    /// lost and why. A session never runs a call under limits other than
    /// the ones in force for that call.
    pub fn set_policy(&mut self, policy: &WasiPolicy) {
        if *policy == self.policy {
            return;
        }
        let instance_level = |p: &WasiPolicy| {
            (
                p.memory_bytes,
                p.fuel,
                p.output_bytes,
                p.read_only.clone(),
                p.protected.clone(),
                p.open_files,
                p.disk,
            )
        };
        if instance_level(policy) != instance_level(&self.policy) {
            if let Some(instance) = self.live.take() {
                end(instance);
                self.resets += 1;
                self.restarted = Some(format!(
                    "the sandbox policy for this call differs from the one the Python session started under (memory, fuel, output, open files, disk budget or mounts), so it was restarted; {STATE_LOST}"
                ));
            }
        }
        self.policy = policy.clone();
    }

    /// Whether an interpreter is running.
    pub fn is_live(&mut self) -> bool {
        match self.live.as_mut() {
            Some(Instance::InProcess(live)) => !live.finished.load(Ordering::SeqCst),
            Some(Instance::Helper(helper)) => helper.is_live(),
            None => false,
        }
    }

    /// How many times the interpreter was reset by a trap or exit.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Starts the interpreter now (so the first call is warm).
    pub async fn start(&mut self) -> Result<(), String> {
        self.start_surveyed(None).await
    }

    /// [`PythonSession::start`], with the workspace's protected paths when
    /// the caller has just surveyed them.
    async fn start_surveyed(&mut self, present: Option<Vec<ProtectedPath>>) -> Result<(), String> {
        if self.is_live() {
            return Ok(());
        }
        if let Some(instance) = self.live.take() {
            // It stopped between calls (a helper that died, say): the
            // next outcome says the state went with it.
            end(instance);
            self.resets += 1;
            self.restarted.get_or_insert_with(|| {
                format!("the Python session's interpreter had stopped; {STATE_LOST}")
            });
        }
        let sandbox = self.sandbox.clone();
        let (workspace, policy) = (self.workspace.clone(), self.policy.clone());
        let python = self.python.clone();
        let looked = tokio::task::spawn_blocking(move || {
            let canonical = std::fs::canonicalize(&workspace)
                .map_err(|e| format!("workspace {}: {e}", workspace.display()))?;
            let present = present.unwrap_or_else(|| {
                crate::process::protect::survey(&canonical, &policy.protected).0
            });
            let python = match python {
                Some(python) => python,
                None => Asset::PythonWasm.locate().map_err(|e| e.to_string())?,
            };
            let prepared = sandbox.prepare(&python).map_err(|e| e.to_string())?;
            let in_helper = super::helper::needed(&present);
            Ok::<_, String>((canonical, present, python, prepared, in_helper))
        })
        .await
        .map_err(|e| e.to_string())??;
        let (canonical, present, python, prepared, in_helper) = looked;
        self.protected_at_start = present;
        let instance = if in_helper {
            Instance::Helper(Box::new(
                super::helper::HelperSession::start(
                    &self.sandbox,
                    &prepared,
                    &python,
                    &canonical,
                    &self.policy,
                )
                .await?,
            ))
        } else {
            let sandbox = self.sandbox.clone();
            let policy = self.policy.clone();
            Instance::InProcess(
                tokio::task::spawn_blocking(move || {
                    start_instance(&sandbox, &prepared, &canonical, &policy)
                })
                .await
                .map_err(|e| e.to_string())??,
            )
        };
        self.live = Some(instance);
        Ok(())
    }

    /// Runs `code` in the live interpreter (starting one if needed).
    pub async fn run(&mut self, code: &str) -> Execution {
        let started = Instant::now();
        let (workspace, protected) = (self.workspace.clone(), self.policy.protected.clone());
        let (present, snapshot) = tokio::task::spawn_blocking(move || {
            std::fs::canonicalize(&workspace)
                .map(|ws| crate::process::protect::survey(&ws, &protected))
                .unwrap_or_default()
        })
        .await
        .unwrap_or_default();
        if present != self.protected_at_start {
            if let Some(instance) = self.live.take() {
                end(instance);
                self.resets += 1;
                self.restarted = Some(format!(
                    "the workspace's protected paths (.git, .env, …) were added, removed or replaced since the Python session started, so it was restarted to keep them protected; {STATE_LOST}"
                ));
            }
        }
        if self.in_call {
            // The last call was cancelled mid-frame: its code was stopped
            // wherever it was, so the interpreter's state is not trusted.
            if let Some(instance) = self.live.take() {
                end(instance);
                self.resets += 1;
                self.restarted = Some(format!(
                    "the previous call was cancelled while it ran, so the Python session was restarted; {STATE_LOST}"
                ));
            }
        }
        self.in_call = true;
        // Abandoned mid-frame, the code is stopped (see `run_frame`) and
        // what it did to protected paths is undone once it has stopped.
        let mut undo = crate::process::protect::UndoIfAbandoned::new(
            snapshot,
            self.workspace.clone(),
            Some(crate::process::protect::AbandonedCall::Guest(
                ABANDONED_GUEST_STOPS_WITHIN,
            )),
        );
        let mut outcome = self.run_frame(code, present).await;
        self.in_call = false;
        let snapshot = undo.take().unwrap_or_default();
        if !snapshot.is_empty() {
            let workspace = self.workspace.clone();
            let undone = tokio::task::spawn_blocking(move || snapshot.undo_changes(&workspace))
                .await
                .unwrap_or_default();
            if !undone.is_empty() {
                crate::process::protect::report(&mut outcome, &undone);
            }
        }
        if let Some(note) = self.restarted.take() {
            outcome.error = Some(match outcome.error.take() {
                Some(error) => format!("{error}; {note}"),
                None => note,
            });
        }
        outcome.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        outcome
    }

    async fn run_frame(&mut self, code: &str, present: Vec<ProtectedPath>) -> Execution {
        if let Err(err) = self.start_surveyed(Some(present)).await {
            return Execution::internal_error(format!("starting the Python session: {err}"));
        }
        let live = match self.live.as_mut() {
            Some(Instance::InProcess(live)) => live,
            Some(Instance::Helper(helper)) => {
                // Dropped mid-frame (the call was cancelled), this kills the
                // helper, and with it the code.
                let mut kill_if_abandoned = helper.kill_on_drop();
                let reply = helper.run(code, self.policy.wall_ms).await;
                kill_if_abandoned.disarm();
                return match reply {
                    Ok((outcome, resets)) => {
                        self.resets += resets;
                        outcome
                    }
                    Err(mut outcome) => {
                        self.live = None;
                        self.resets += 1;
                        let reason = outcome.error.take().unwrap_or_default();
                        outcome.error = Some(format!("{reason}; {STATE_LOST}"));
                        super::budget::charge_unknown(&mut outcome, self.policy.disk);
                        outcome
                    }
                };
            }
            None => return Execution::internal_error("the Python session did not start"),
        };
        let wall = Duration::from_millis(self.policy.wall_ms);
        // The deadline holds until the guest is seen waiting for the next
        // frame: a marker it prints ends nothing.
        let deadline = Instant::now() + wall;
        *live.deadline.lock().unwrap_or_else(|p| p.into_inner()) = Some(deadline);
        live.between_frames.store(false, Ordering::SeqCst);
        live.disk.start_call();
        live.stdin
            .push(format!("{}\n{code}", code.len()).as_bytes());
        let waiter = live.stdin.waiter();
        // Dropped mid-frame (the call was cancelled), this stops the code.
        let mut stop_if_abandoned = super::EndOnDrop::new(Arc::clone(&live.deadline));
        let ended =
            tokio::task::spawn_blocking(move || waiter.wait_idle(wall + Duration::from_secs(2)))
                .await
                .unwrap_or(FrameEnd::TimedOut);
        stop_if_abandoned.disarm();
        let out = live.stdout.take();
        let err = live.stderr.take();
        let mut outcome =
            Execution::from_output(&out.bytes, &err.bytes, out.truncated || err.truncated);
        match (ended, out.marker.as_deref()) {
            (FrameEnd::Idle, Some(status)) => {
                // Blocked reading stdin until the next frame: the
                // wall-clock deadline is lifted, and any code run before
                // then is interrupted at once.
                live.between_frames.store(true, Ordering::SeqCst);
                *live.deadline.lock().unwrap_or_else(|p| p.into_inner()) = None;
                let code: i32 = status.parse().unwrap_or(1);
                outcome.exit_code = Some(code);
                if code != 0 {
                    outcome.status = ExecStatus::Failed;
                    outcome.error = Some(format!("exited with code {code}"));
                }
                live.disk.account(&mut outcome);
                return outcome;
            }
            (FrameEnd::Idle, None) => {
                // The cell itself read the session's stdin and now waits on
                // it: the driver never got control back.
                outcome.status = ExecStatus::Failed;
                outcome.error = Some(format!(
                    "the code read the Python session's own input, which it cannot use, so the session was reset; {STATE_LOST}"
                ));
                live.disk.account(&mut outcome);
                if let Some(instance) = self.live.take() {
                    end(instance);
                }
                self.resets += 1;
                return outcome;
            }
            (FrameEnd::Gone | FrameEnd::TimedOut, _) => {}
        }
        // The instance ended (trap, exit or crash): report why and reset.
        let Some(Instance::InProcess(live)) = self.live.take() else {
            return outcome;
        };
        let interrupted = live.interrupted.load(Ordering::SeqCst);
        let disk = Arc::clone(&live.disk);
        let (memory_hit, thread) = end_instance(live);
        let memory_hit = memory_hit.load(Ordering::SeqCst);
        let result = tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(|e| wasmtime::Error::msg(e.to_string()))
            .and_then(|joined| {
                joined.unwrap_or_else(|_| Err(wasmtime::Error::msg("the session thread panicked")))
            });
        let result = match result {
            // A clean return without a marker means the driver stopped.
            Ok(()) => Err(wasmtime::Error::msg(
                "the interpreter stopped without finishing the call",
            )),
            other => other,
        };
        classify(&mut outcome, result, memory_hit, &self.policy);
        super::mark_overdue(&mut outcome, interrupted, &self.policy);
        disk.account(&mut outcome);
        if outcome.status == ExecStatus::Ok {
            outcome.status = ExecStatus::Failed;
        }
        self.resets += 1;
        let reason = outcome
            .error
            .take()
            .unwrap_or_else(|| "the interpreter exited".to_string());
        outcome.error = Some(format!("{reason}; {STATE_LOST}"));
        outcome
    }
}

impl Drop for PythonSession {
    fn drop(&mut self) {
        if let Some(instance) = self.live.take() {
            end(instance);
        }
    }
}

/// Ends an instance without waiting for it: an in-process one is
/// interrupted and its thread ends on its own; a helper is killed.
fn end(instance: Instance) {
    match instance {
        Instance::InProcess(live) => drop(end_instance(live)),
        Instance::Helper(helper) => drop(helper),
    }
}

/// How long an abandoned frame's code may take to stop once its deadline
/// has moved to now (an epoch tick; a host call interrupted by the
/// watchdog within its grace) or its helper was killed.
const ABANDONED_GUEST_STOPS_WITHIN: Duration = Duration::from_millis(750);

/// Interrupts any running code and closes stdin: the driver sees end of
/// input and returns, and the instance's thread ends on its own. Returns
/// what is left to learn how it ended: whether it hit the memory cap, and
/// its thread.
fn end_instance(
    live: Live,
) -> (
    Arc<AtomicBool>,
    std::thread::JoinHandle<wasmtime::Result<()>>,
) {
    *live.deadline.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    drop(live.stdin);
    (live.memory_hit, live.thread)
}

fn nonce() -> String {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id()));
    let a = hasher.finish();
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(a);
    format!("{a:016x}{:016x}", hasher.finish())
}

fn start_instance(
    sandbox: &WasiSandbox,
    prepared: &super::Prepared,
    workspace: &Path,
    policy: &WasiPolicy,
) -> Result<Live, String> {
    let prepared = prepared.clone();
    let nonce = nonce();
    let stdout =
        CappedOutput::with_marker(policy.output_bytes, Some(format!("{nonce}:").into_bytes()));
    let stderr = CappedOutput::new(policy.output_bytes);
    // Reads are answered on whatever runtime the guest's host call runs on;
    // no reader task is spawned, so no caller's runtime is involved.
    let (host_side, guest_stdin) = frame_feed();
    let gone = guest_stdin.clone();
    let finished = Arc::new(AtomicBool::new(false));
    let done = Arc::clone(&finished);
    let (guest_stdout, guest_stderr) = (stdout.clone(), stderr.clone());
    let (sandbox, workspace, policy) = (sandbox.clone(), workspace.to_path_buf(), policy.clone());
    // The instance is made on its own thread, which is confined first (see
    // `identity`): the workspace must be preopened from there.
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("stack-python-session".into())
        .spawn(move || {
            let made = (|| {
                let guest = super::identity::GuestThread::enter(&workspace, &policy.protected)?;
                let mut builder = WasiCtxBuilder::new();
                builder
                    .args(&["python", "-I", "-c", DRIVER])
                    .envs(GUEST_ENV)
                    .env("STACK_FRAME_NONCE", &nonce)
                    .stdin(guest_stdin)
                    .stdout(guest_stdout)
                    .stderr(guest_stderr);
                grant_mounts(&mut builder, &workspace, &policy)?;
                let store = sandbox.new_store(&mut builder, &policy, None)?;
                Ok::<_, String>((guest, store))
            })();
            let (_guest, mut store) = match made {
                Ok(made) => made,
                Err(err) => {
                    done.store(true, Ordering::SeqCst);
                    let _ = ready_tx.send(Err(err.clone()));
                    return Err(wasmtime::Error::msg(err));
                }
            };
            let _ = ready_tx.send(Ok((
                Arc::clone(&store.data().deadline),
                Arc::clone(&store.data().limiter.hit),
                Arc::clone(&store.data().between_frames),
                store.data().watch.fired(),
                Arc::clone(&store.data().disk),
            )));
            let result = prepared
                .pre
                .instantiate(&mut store)
                .and_then(|instance| instance.get_typed_func::<(), ()>(&mut store, "_start"))
                .and_then(|start| start.call(&mut store, ()));
            done.store(true, Ordering::SeqCst);
            gone.guest_gone();
            result
        })
        .map_err(|e| format!("starting the session thread: {e}"))?;
    let (deadline, memory_hit, between_frames, interrupted, disk) = ready_rx
        .recv()
        .map_err(|_| "the session thread ended before its interpreter was made".to_string())??;
    Ok(Live {
        stdin: host_side,
        stdout,
        stderr,
        deadline,
        between_frames,
        interrupted,
        finished,
        memory_hit,
        disk,
        thread,
    })
}
