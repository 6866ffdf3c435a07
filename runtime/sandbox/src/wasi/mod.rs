//! The WASI sandbox: CPython (`python.wasm`) and QuickJS (`quickjs.wasm`)
//! in wasmtime, plus script tools and raw WASI modules.
//!
//! # Threat model
//!
//! Guest code is hostile. It gets exactly what the builder grants, and by
//! default that is nothing but the session workspace:
//!
//! 1. **Filesystem** — the only preopens are the workspace (read-write, at
//!    `/workspace` and as the current directory) and the read-only mounts the
//!    policy names; nothing else exists for the guest.
//! 2. **No network, no inherited state** — no sockets are granted, the
//!    environment holds only what the runtime sets, and the arguments are
//!    fixed by the runtime.
//! 3. **Memory** — each instance is capped by a resource limiter (256 MiB by
//!    default); a denied growth is reported as the memory limit.
//! 4. **CPU and time** — an epoch deadline interrupts the guest at the
//!    wall-clock timeout, and a guest asleep in `poll_oneoff` is woken and
//!    stopped at it too (see [`sleep`]); optional fuel gives a
//!    deterministic instruction budget.
//! 5. **Output** — stdout and stderr are captured in memory with caps; past
//!    the cap the guest keeps running and the excess is dropped.
//! 6. **Isolation between calls and sessions** — every call or session has
//!    its own store; a trap ends that instance only and never the runtime.
//! 7. **Identity** — a root runtime never lets a guest act as root: the
//!    thread that runs the guest, on which every filesystem call of the
//!    guest is made, takes the process sandbox's identity for the workspace
//!    (its owner, or the dedicated sandbox uid) as its filesystem uid, gid
//!    and groups (see [`identity`]), so the kernel checks the guest's opens
//!    as that user's and what it creates belongs to them.
//! 8. **Protected paths** — as in the process sandbox, `.git`, `.envrc`, …
//!    are read-only and `.env`, `.ssh`, … hidden, through a mount namespace
//!    of the guest thread's own (see [`identity`]). A root runtime makes it
//!    in process; a runtime that is not root cannot, so where the
//!    workspace holds protected paths its guests run in the WASI helper, a
//!    process with a user namespace of its own (see [`helper`]), and if the
//!    kernel refuses that namespace the call is refused. A protected path a
//!    call creates is moved aside after it, the call failing.
//!
//! Each rule has tests in `tests/wasi_sandbox.rs`.

mod budget;
mod engine;
mod feed;
mod helper;
mod identity;
mod output;
mod session;
mod sleep;
mod watchdog;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use wasmtime::{InstancePre, Linker, Store, Trap, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{ClosedInputStream, MemoryInputPipe};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder, WasiView};

pub use engine::{ModuleSource, WasiEngine, WasiError};
pub use helper::{guest_helper_main, GUEST_HELPER_ARG};
pub use session::PythonSession;

use crate::execution::{ExecStatus, Execution};
use output::CappedOutput;
use stack_assets::Asset;

/// Where the workspace appears inside the guest.
pub const GUEST_WORKSPACE: &str = "/workspace";

/// What a WASI call may use. The guest always sees the workspace,
/// read-write, at [`GUEST_WORKSPACE`], and nothing else of the host but
/// `read_only`. Default: 10 s wall, 256 MiB of linear memory, no fuel
/// bound, 1 MiB of stdout and of stderr, 256 open files, the default
/// protected names, and [`DiskBudget::default`](crate::process::DiskBudget).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WasiPolicy {
    /// Wall-clock timeout in milliseconds.
    pub wall_ms: u64,
    /// Linear memory cap per instance, in bytes.
    pub memory_bytes: usize,
    /// Instruction budget, when the engine meters fuel. `None`: no
    /// instruction bound; only the wall-clock deadline stops the guest.
    pub fuel: Option<u64>,
    /// Cap on stdout and on stderr, each.
    pub output_bytes: usize,
    /// Extra read-only mounts: host path, guest path.
    pub read_only: Vec<(PathBuf, String)>,
    /// Workspace paths (relative) the guest may not change or see, as in
    /// the process sandbox (see `ProcessPolicy::protected`); enforced by a
    /// mount namespace (see [`identity`] and [`helper`]), and a created one
    /// is removed after the call in every case.
    pub protected: Vec<(PathBuf, crate::process::ProtectedMode)>,
    /// How many files and directories the guest may hold open at once.
    /// Each is a descriptor of the runtime's own process, so this keeps one
    /// guest from using up the runtime's descriptor table (red-team M4);
    /// past it the guest is stopped with `limit = "open_files"`.
    pub open_files: usize,
    /// What one call may add to the workspace (bytes past files' ends,
    /// new names), counted on the host (see [`budget`]); past it the write
    /// fails with `ENOSPC` and the call reports `limit = "disk"`. `None`:
    /// counted, not bounded.
    #[serde(default)]
    pub disk: Option<crate::process::DiskBudget>,
}

/// Table entries a store needs besides the guest's open files and its
/// read-only mounts: stdio, the workspace preopens and the streams a call
/// makes for a moment.
const TABLE_RESERVE: usize = 32;

impl Default for WasiPolicy {
    fn default() -> Self {
        WasiPolicy {
            wall_ms: 10_000,
            memory_bytes: 256 << 20,
            fuel: None,
            output_bytes: 1 << 20,
            read_only: Vec::new(),
            protected: crate::process::default_protected(),
            open_files: 256,
            disk: Some(crate::process::DiskBudget::default()),
        }
    }
}

/// A store's deadline, shared with whoever may move it.
pub(crate) type Deadline = Arc<Mutex<Option<Instant>>>;

/// Moves a guest's deadline to now when dropped: the guest of an abandoned
/// call ends at the next epoch tick (or, blocked in a host call, when the
/// watchdog interrupts it). Harmless once the guest has ended.
pub(crate) struct EndOnDrop(Option<Deadline>);

impl EndOnDrop {
    /// Guards `deadline`.
    pub(crate) fn new(deadline: Deadline) -> EndOnDrop {
        EndOnDrop(Some(deadline))
    }

    /// Leaves the deadline alone when dropped.
    pub(crate) fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        if let Some(deadline) = self.0.take() {
            let mut slot = deadline.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            *slot = Some(slot.map_or(now, |deadline| deadline.min(now)));
        }
    }
}

/// Per-store state: the WASI context, the memory limiter and the deadline.
pub(crate) struct StoreState {
    wasi: WasiP1Ctx,
    limiter: MemoryLimiter,
    deadline: Arc<Mutex<Option<Instant>>>,
    /// Set while a stateful session waits for its next frame: the guest is
    /// then blocked reading stdin, and any WebAssembly it ran would be
    /// interrupted at once.
    between_frames: Arc<std::sync::atomic::AtomicBool>,
    /// What the guest's monotonic clock counts from (see [`sleep`]).
    clock_epoch: Instant,
    /// wasmtime-wasi's own `poll_oneoff`, callable from the host (see
    /// [`sleep`]); made on first use.
    poll_oneoff: Option<sleep::Poll>,
    /// The deadline's watch over host calls the guest is blocked in.
    watch: watchdog::Watch,
    /// What the current call has added to the workspace (see [`budget`]).
    disk: Arc<budget::DiskMeter>,
}

/// Caps linear memory and remembers whether the cap was hit.
pub(crate) struct MemoryLimiter {
    max: usize,
    hit: Arc<std::sync::atomic::AtomicBool>,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max {
            self.hit.store(true, std::sync::atomic::Ordering::SeqCst);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// A compiled, linked module ready to instantiate.
#[derive(Clone)]
pub(crate) struct Prepared {
    pre: InstancePre<StoreState>,
    /// Whether it came from the cache.
    pub source: ModuleSource,
    /// Its key in the engine's module cache.
    key: String,
}

/// Runs guests in wasmtime. Cheap to clone; clones share the engine and the
/// prepared modules.
#[derive(Clone)]
pub struct WasiSandbox {
    engine: Arc<WasiEngine>,
    prepared: Arc<Mutex<HashMap<PathBuf, Prepared>>>,
    /// Held while a module is compiled or loaded, never while a prepared
    /// one is looked up: one compile at a time, and none twice.
    compiling: Arc<Mutex<()>>,
}

impl std::fmt::Debug for WasiSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasiSandbox")
            .field("engine", &self.engine)
            .finish()
    }
}

/// The fixed environment of every guest.
const GUEST_ENV: &[(&str, &str)] = &[
    ("PYTHONUTF8", "1"),
    ("PYTHONDONTWRITEBYTECODE", "1"),
    ("PYTHONIOENCODING", "utf-8"),
    ("LC_ALL", "C.UTF-8"),
    ("HOME", GUEST_WORKSPACE),
    ("PWD", GUEST_WORKSPACE),
];

impl WasiSandbox {
    /// A sandbox over `engine`.
    pub fn new(engine: Arc<WasiEngine>) -> Self {
        WasiSandbox {
            engine,
            prepared: Arc::new(Mutex::new(HashMap::new())),
            compiling: Arc::new(Mutex::new(())),
        }
    }

    /// A sandbox with the default cache folder and no fuel metering.
    pub fn with_defaults() -> Result<Self, WasiError> {
        Ok(Self::new(WasiEngine::new(
            WasiEngine::default_cache_dir(),
            false,
        )?))
    }

    /// The process-wide default sandbox: one engine, one set of compiled
    /// interpreters, shared by every session (cheap clones of one value).
    pub fn shared() -> Result<Self, String> {
        static SHARED: std::sync::OnceLock<Result<WasiSandbox, String>> =
            std::sync::OnceLock::new();
        SHARED
            .get_or_init(|| Self::with_defaults().map_err(|e| e.to_string()))
            .clone()
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<WasiEngine> {
        &self.engine
    }

    /// Compiles (or loads from cache) and links a module, once per sandbox.
    pub(crate) fn prepare(&self, path: &Path) -> Result<Prepared, WasiError> {
        self.prepare_with(path, None)
    }

    /// As [`WasiSandbox::prepare`], trying the cache entry `key` first
    /// (the WASI helper, told the key by the runtime, then never reads or
    /// hashes the module file).
    pub(crate) fn prepare_with(
        &self,
        path: &Path,
        key: Option<&str>,
    ) -> Result<Prepared, WasiError> {
        let lookup = || {
            self.prepared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(path)
                .cloned()
        };
        if let Some(ready) = lookup() {
            return Ok(ready);
        }
        // Compiling python.wasm takes seconds: never under the map's lock,
        // which every call takes, but under a lock of its own, so that two
        // first calls do not both compile and write the cache.
        let _compiling = self.compiling.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ready) = lookup() {
            return Ok(ready);
        }
        let cached = key.and_then(|key| {
            self.engine
                .load_key(key)
                .map(|module| (module, ModuleSource::Cache, key.to_string()))
        });
        let (module, source, key) = match cached {
            Some(found) => found,
            None => self.engine.load_keyed(path)?,
        };
        let mut linker: Linker<StoreState> = Linker::new(self.engine.engine());
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |state: &mut StoreState| {
            &mut state.wasi
        })
        .map_err(|e| WasiError::Engine(e.to_string()))?;
        sleep::bound_sleeps(&mut linker).map_err(|e| WasiError::Engine(e.to_string()))?;
        budget::count_writes(&mut linker).map_err(|e| WasiError::Engine(e.to_string()))?;
        let pre = linker
            .instantiate_pre(&module)
            .map_err(|e| WasiError::Module {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let ready = Prepared { pre, source, key };
        Ok(self
            .prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(path.to_path_buf())
            .or_insert(ready)
            .clone())
    }

    /// Prepares the embedded interpreters ahead of time; returns how each was
    /// obtained.
    pub fn warm_up(&self) -> Result<Vec<(Asset, ModuleSource)>, String> {
        [Asset::PythonWasm, Asset::QuickjsWasm]
            .into_iter()
            .map(|asset| {
                let path = asset.locate().map_err(|e| e.to_string())?;
                self.prepare(&path)
                    .map(|p| (asset, p.source))
                    .map_err(|e| e.to_string())
            })
            .collect()
    }

    /// Runs Python `code` in a fresh interpreter, as a notebook cell (a
    /// last bare expression's value printed; see [`crate::cell`]).
    pub async fn run_python(&self, code: &str, workspace: &Path, policy: &WasiPolicy) -> Execution {
        let argv = vec![
            "python".to_string(),
            "-I".into(),
            "-c".into(),
            crate::cell::PYTHON_MAIN.into(),
            "--code".into(),
            code.to_string(),
        ];
        self.run_asset(Asset::PythonWasm, argv, None, workspace, policy)
            .await
    }

    /// Runs JavaScript `code` in a fresh QuickJS (with `std` and `os`), a
    /// script's completion value printed (see [`crate::cell`]).
    pub async fn run_javascript(
        &self,
        code: &str,
        workspace: &Path,
        policy: &WasiPolicy,
    ) -> Execution {
        let mut argv = vec!["qjs".to_string(), "--std".into(), "-e".into()];
        if crate::cell::javascript_is_script(code) {
            argv.extend([crate::cell::JAVASCRIPT_MAIN.into(), "--".into()]);
        }
        argv.push(code.to_string());
        self.run_asset(Asset::QuickjsWasm, argv, None, workspace, policy)
            .await
    }

    /// Runs a script tool: `script` on the embedded interpreter, with the
    /// tool's JSON arguments on stdin. The script's folder is mounted
    /// read-only at `/tool`.
    pub async fn run_script(
        &self,
        runtime: stack_types::ScriptRuntime,
        script: &Path,
        stdin: Vec<u8>,
        workspace: &Path,
        policy: &WasiPolicy,
    ) -> Execution {
        let (Some(folder), Some(name)) =
            (script.parent(), script.file_name().and_then(|n| n.to_str()))
        else {
            return Execution::internal_error(format!("bad script path {}", script.display()));
        };
        let mut policy = policy.clone();
        policy
            .read_only
            .push((folder.to_path_buf(), "/tool".to_string()));
        let guest_script = format!("/tool/{name}");
        let (asset, argv) = match runtime {
            stack_types::ScriptRuntime::Python => (
                Asset::PythonWasm,
                vec!["python".into(), "-I".into(), guest_script],
            ),
            stack_types::ScriptRuntime::Javascript => (
                Asset::QuickjsWasm,
                vec!["qjs".into(), "--std".into(), guest_script],
            ),
        };
        self.run_asset(asset, argv, Some(stdin), workspace, &policy)
            .await
    }

    /// Runs a raw WASI preview-1 command module with fixed arguments.
    pub async fn run_module(
        &self,
        module: &Path,
        args: &[String],
        stdin: Vec<u8>,
        workspace: &Path,
        policy: &WasiPolicy,
    ) -> Execution {
        let mut argv = vec![module
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("module")
            .to_string()];
        argv.extend(args.iter().cloned());
        self.run_path(module.to_path_buf(), argv, Some(stdin), workspace, policy)
            .await
    }

    async fn run_asset(
        &self,
        asset: Asset,
        argv: Vec<String>,
        stdin: Option<Vec<u8>>,
        workspace: &Path,
        policy: &WasiPolicy,
    ) -> Execution {
        match asset.locate() {
            Ok(path) => self.run_path(path, argv, stdin, workspace, policy).await,
            Err(err) => Execution::internal_error(err.to_string()),
        }
    }

    async fn run_path(
        &self,
        module: PathBuf,
        argv: Vec<String>,
        stdin: Option<Vec<u8>>,
        workspace: &Path,
        policy: &WasiPolicy,
    ) -> Execution {
        let started = Instant::now();
        let sandbox = self.clone();
        let (workspace, policy) = (workspace.to_path_buf(), policy.clone());
        // The guest runs on a thread of its own, which dropping this future
        // cannot stop: the guard moves its deadline to now instead, and the
        // epoch check (or, in a host call, the watchdog) ends it.
        let deadline = Arc::new(Mutex::new(None));
        let _end_on_drop = EndOnDrop::new(Arc::clone(&deadline));
        let mut outcome = match tokio::task::spawn_blocking(move || {
            sandbox.run_blocking(&module, &argv, stdin, &workspace, &policy, deadline)
        })
        .await
        {
            Ok(outcome) => outcome,
            Err(err) => Execution::internal_error(format!("WASI runner crashed: {err}")),
        };
        outcome.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        outcome
    }

    fn run_blocking(
        &self,
        module: &Path,
        argv: &[String],
        stdin: Option<Vec<u8>>,
        workspace: &Path,
        policy: &WasiPolicy,
        deadline: Deadline,
    ) -> Execution {
        let prepared = match self.prepare(module) {
            Ok(prepared) => prepared,
            Err(err) => return Execution::internal_error(err.to_string()),
        };
        let canonical = match std::fs::canonicalize(workspace) {
            Ok(canonical) => canonical,
            Err(err) => {
                return Execution::internal_error(format!(
                    "workspace {}: {err}",
                    workspace.display()
                ))
            }
        };
        if let Some(folder) =
            crate::process::protect::workspace_within_protected(&canonical, &policy.protected)
        {
            return Execution::internal_error(crate::process::protect::refuse_workspace(
                &canonical, &folder,
            ));
        }
        let (present, snapshot) = crate::process::protect::survey(&canonical, &policy.protected);
        let mut outcome = if helper::needed(&present) {
            // Not root, and there are protected paths to keep: only a
            // process of its own can have the mount namespace for that.
            {
                let mut outcome = helper::run_call(
                    self, &prepared, module, argv, stdin, &canonical, policy, &deadline,
                );
                // Killed or lost, the helper reported nothing: the call
                // counts as having used its whole budget.
                budget::charge_unknown(&mut outcome, policy.disk);
                outcome
            }
        } else if nix::unistd::geteuid().is_root() {
            let run = move || self.run_guest(&prepared, argv, stdin, &canonical, policy, deadline);
            // A root runtime confines the guest's thread (its identity and
            // mount namespace, see `identity`): never a pool thread, which
            // would keep them.
            std::thread::scope(|scope| {
                std::thread::Builder::new()
                    .name("stack-wasi-guest".into())
                    .spawn_scoped(scope, run)
                    .map_err(|e| e.to_string())
                    .and_then(|guest| guest.join().map_err(|_| "it panicked".to_string()))
            })
            .unwrap_or_else(|err| {
                Execution::internal_error(format!("the WASI guest thread failed: {err}"))
            })
        } else {
            self.run_guest(&prepared, argv, stdin, &canonical, policy, deadline)
        };
        let undone = snapshot.undo_changes(workspace);
        if !undone.is_empty() {
            crate::process::protect::report(&mut outcome, &undone);
        }
        outcome
    }

    /// Runs one guest on the calling thread, which it confines first.
    fn run_guest(
        &self,
        prepared: &Prepared,
        argv: &[String],
        stdin: Option<Vec<u8>>,
        workspace: &Path,
        policy: &WasiPolicy,
        deadline: Deadline,
    ) -> Execution {
        let _guest = match identity::GuestThread::enter(workspace, &policy.protected) {
            Ok(guest) => guest,
            Err(err) => return Execution::internal_error(err),
        };
        let stdout = CappedOutput::new(policy.output_bytes);
        let stderr = CappedOutput::new(policy.output_bytes);
        let mut builder = WasiCtxBuilder::new();
        builder
            .args(argv)
            .envs(GUEST_ENV)
            .stdout(stdout.clone())
            .stderr(stderr.clone());
        match stdin {
            Some(bytes) => builder.stdin(MemoryInputPipe::new(bytes)),
            None => builder.stdin(ClosedInputStream),
        };
        if let Err(err) = grant_mounts(&mut builder, workspace, policy) {
            return Execution::internal_error(err);
        }
        {
            // A call cancelled before its guest started has a deadline
            // already, in the past; it stays.
            let wall = Instant::now() + std::time::Duration::from_millis(policy.wall_ms);
            let mut slot = deadline.lock().unwrap_or_else(|p| p.into_inner());
            *slot = Some(slot.map_or(wall, |earlier| earlier.min(wall)));
        }
        let mut store = match self.store_with_deadline(&mut builder, policy, deadline) {
            Ok(store) => store,
            Err(err) => return Execution::internal_error(err),
        };
        let memory_hit = Arc::clone(&store.data().limiter.hit);
        let disk = Arc::clone(&store.data().disk);
        let fired = store.data().watch.fired();
        let result = prepared
            .pre
            .instantiate(&mut store)
            .and_then(|instance| instance.get_typed_func::<(), ()>(&mut store, "_start"))
            .and_then(|start| start.call(&mut store, ()));
        let out = stdout.take();
        let err = stderr.take();
        let mut outcome =
            Execution::from_output(&out.bytes, &err.bytes, out.truncated || err.truncated);
        classify(
            &mut outcome,
            result,
            memory_hit.load(std::sync::atomic::Ordering::SeqCst),
            policy,
        );
        mark_overdue(
            &mut outcome,
            fired.load(std::sync::atomic::Ordering::SeqCst),
            policy,
        );
        disk.account(&mut outcome);
        outcome
    }

    /// A store for one instance, with the WASI context `builder` makes, the
    /// policy's memory cap and fuel, and `deadline`, which also holds for
    /// host calls the guest blocks in (see [`watchdog`]). Make it on the
    /// thread that will run the instance.
    pub(crate) fn new_store(
        &self,
        builder: &mut WasiCtxBuilder,
        policy: &WasiPolicy,
        deadline: Option<Instant>,
    ) -> Result<Store<StoreState>, String> {
        self.store_with_deadline(builder, policy, Arc::new(Mutex::new(deadline)))
    }

    /// [`WasiSandbox::new_store`] with a deadline that someone else may
    /// move (to cancel the call).
    fn store_with_deadline(
        &self,
        builder: &mut WasiCtxBuilder,
        policy: &WasiPolicy,
        deadline: Deadline,
    ) -> Result<Store<StoreState>, String> {
        let clock_epoch = sleep::install_clock(builder);
        let state = StoreState {
            wasi: builder.build_p1(),
            clock_epoch,
            poll_oneoff: None,
            between_frames: Arc::default(),
            limiter: MemoryLimiter {
                max: policy.memory_bytes,
                hit: Arc::default(),
            },
            watch: watchdog::watch_store(&deadline),
            deadline: Arc::clone(&deadline),
            disk: budget::DiskMeter::new(policy.disk),
        };
        let mut state = state;
        state.wasi.ctx().table.set_max_capacity(
            policy
                .open_files
                .saturating_add(TABLE_RESERVE)
                .saturating_add(2 * policy.read_only.len()),
        );
        let mut store = Store::new(self.engine.engine(), state);
        store.limiter(|state| &mut state.limiter);
        if self.engine.fuel() {
            store
                .set_fuel(policy.fuel.unwrap_or(u64::MAX))
                .map_err(|e| e.to_string())?;
        }
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |ctx| {
            if ctx
                .data()
                .between_frames
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return Ok(UpdateDeadline::Interrupt);
            }
            let deadline = *ctx
                .data()
                .deadline
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match deadline {
                Some(deadline) if Instant::now() >= deadline => Ok(UpdateDeadline::Interrupt),
                _ => Ok(UpdateDeadline::Continue(1)),
            }
        });
        Ok(store)
    }
}

/// Preopens the workspace (read-write, at `/workspace` and `.`) and the
/// policy's read-only mounts. Nothing else.
pub(crate) fn grant_mounts(
    builder: &mut WasiCtxBuilder,
    workspace: &Path,
    policy: &WasiPolicy,
) -> Result<(), String> {
    // Every filesystem call runs on the guest's own thread, which carries
    // the sandbox's identity (see `identity`), never on a shared pool.
    builder.allow_blocking_current_thread(true);
    builder
        .preopened_dir(workspace, GUEST_WORKSPACE, FsPerms::ReadWrite)
        .and_then(|b| b.preopened_dir(workspace, ".", FsPerms::ReadWrite))
        .map_err(|e| format!("mounting the workspace {}: {e}", workspace.display()))?;
    for (host, guest) in &policy.read_only {
        builder
            .preopened_dir(host, guest, FsPerms::ReadOnly)
            .map_err(|e| format!("mounting {} at {guest}: {e}", host.display()))?;
    }
    Ok(())
}

/// Maps how a guest run ended onto the tool statuses.
/// A call that the watchdog had to interrupt in a blocked host call (see
/// [`watchdog`]) timed out, however it ended.
pub(crate) fn mark_overdue(outcome: &mut Execution, interrupted: bool, policy: &WasiPolicy) {
    if outcome.status != ExecStatus::Timeout && interrupted {
        outcome.status = ExecStatus::Timeout;
        outcome.limit = Some(stack_types::Limit::WallTime);
        outcome.exit_code = None;
        outcome.error = Some(format!(
            "timed out after {} ms while blocked in a host call (opening a FIFO, say); the guest was interrupted and stopped",
            policy.wall_ms
        ));
    }
}

pub(crate) fn classify(
    outcome: &mut Execution,
    result: wasmtime::Result<()>,
    memory_hit: bool,
    policy: &WasiPolicy,
) {
    let memory_message = || {
        format!(
            "the guest reached its memory limit of {} MiB",
            policy.memory_bytes >> 20
        )
    };
    let error = match result {
        Ok(()) => return,
        Err(error) => error,
    };
    if let Some(exit) = error.downcast_ref::<I32Exit>() {
        outcome.exit_code = Some(exit.0);
        if exit.0 != 0 {
            if memory_hit {
                outcome.status = ExecStatus::Killed;
                outcome.limit = Some(stack_types::Limit::Memory);
                outcome.error = Some(memory_message());
            } else {
                outcome.status = ExecStatus::Failed;
                outcome.error = Some(format!("exited with code {}", exit.0));
            }
        }
        return;
    }
    outcome.exit_code = None;
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => {
            outcome.status = ExecStatus::Timeout;
            outcome.limit = Some(stack_types::Limit::WallTime);
            outcome.error = Some(format!(
                "timed out after {} ms; the guest was interrupted",
                policy.wall_ms
            ));
        }
        Some(Trap::OutOfFuel) => {
            outcome.status = ExecStatus::Killed;
            outcome.limit = Some(stack_types::Limit::Fuel);
            outcome.error = Some("the guest used up its instruction budget (fuel)".into());
        }
        _ if memory_hit => {
            outcome.status = ExecStatus::Killed;
            outcome.limit = Some(stack_types::Limit::Memory);
            outcome.error = Some(memory_message());
        }
        _ if error.chain().any(|cause| {
            matches!(
                cause.downcast_ref::<wasmtime::component::ResourceTableError>(),
                Some(wasmtime::component::ResourceTableError::Full)
            )
        }) =>
        {
            outcome.status = ExecStatus::Killed;
            outcome.limit = Some(stack_types::Limit::OpenFiles);
            outcome.error = Some(format!(
                "the guest tried to hold more than {} files open at once and was stopped",
                policy.open_files
            ));
        }
        Some(trap) => {
            outcome.status = ExecStatus::Failed;
            outcome.error = Some(format!("the guest crashed: {trap}"));
        }
        None => {
            outcome.status = ExecStatus::Error;
            outcome.error = Some(format!("running the guest failed: {error:#}"));
        }
    }
}
