//! The process sandbox: untrusted code in a subprocess under landlock,
//! seccomp, namespaces, rlimits and a cgroup.
//!
//! # Threat model
//!
//! The code is hostile and knows it is sandboxed. It runs with the session's
//! workspace as its only writable place and tries to: read secrets elsewhere
//! (home folders, `/root`, `/etc/shadow`, the runtime's environment, other
//! workspaces, `/proc/<ppid>/…`), write outside the workspace, reach the
//! network or host unix sockets, exhaust memory, processes, CPU, disk or the
//! output pipes, outlive its call (double fork, `setsid`), plant what the
//! host runs later (git hooks and config, `.envrc`), attack the runtime
//! (signals, `ptrace`, abstract sockets, forged messages), or gain privilege
//! (setuid binaries, capabilities, namespaces, kernel interfaces).
//!
//! Who is trusted: the runtime (which may run as root) and the kernel. Not
//! trusted: the code, and everything that runs as the sandbox's uid — the
//! zygote and its spares included, since they share that uid with the code
//! and, for a user-owned workspace, with the owner's other processes. So
//! the runtime never resolves a path inside a folder that uid can write
//! (it only opens the workspace itself, canonicalized, and reaches
//! protected paths from its descriptor, following no link), hands code over in a sealed memfd rather than a
//! file, and takes nothing from the zygote but a socket and a pidfd that it
//! checks is a live child of its own zygote running as that uid.
//! Other local users are not trusted either: nothing the sandbox uses lives
//! at a predictable path in a shared folder (there is no host tmp dir at
//! all). The workspace's owner, when the workspace is not root's, is
//! trusted with what is theirs: they can already change every file the
//! call reads, and may signal or trace the code their uid runs.
//!
//! Each rule below has at least one attack test in `tests/process_escape.rs`:
//!
//! 1. **Filesystem** — a private mount namespace whose root holds only the
//!    read-only system dirs, the interpreter's prefix, a few named `/etc`
//!    files and device nodes, the workspace and a private `/tmp` tmpfs (see
//!    [`mounts`]): nothing else exists, so nothing else can be read,
//!    `stat`ed or connected to. Within that, landlock: read-only for the
//!    system paths, read-write only the workspace and the call's own tmp
//!    dir. `/proc` is not there at all. Landlock checks the resolved file,
//!    so a symlink in the workspace grants nothing.
//! 2. **Network** — `none` (default): an empty network namespace, landlock
//!    denies TCP bind/connect, seccomp allows only `AF_UNIX` sockets, and
//!    the only pathname sockets that can be named are the ones in the
//!    workspace and the private tmp (host sockets in `/tmp`, `/run`, a
//!    user's ssh-agent or D-Bus do not exist in the sandbox's root).
//!    `loopback`: a private namespace with only `lo`. `full`: the host's.
//! 3. **Scope** — landlock ABI 6 scoping: no signals to, and no abstract
//!    Unix sockets of, processes outside the sandbox.
//! 4. **Syscalls** — a seccomp denylist (see [`seccomp`]); `no_new_privs`.
//! 5. **Identity** — never root: a root runtime drops the child to the
//!    workspace owner, or, for a root-owned workspace, to a dedicated uid
//!    that no host process shares ([`sandbox_id`]; the sandbox then sees
//!    the workspace through an idmapped mount of its own, and nothing on
//!    disk changes: see [`share`]) before anything else; the
//!    child then lives in its own user namespace, mapping only that uid,
//!    and `execve` leaves it with zero capabilities and an empty bounding
//!    set. The zygote is not dumpable: no host process of its uid can
//!    trace it or take its descriptors.
//! 6. **Lifetime** — each call has its own PID namespace, whose PID 1 is a
//!    minimal init and PID 2 the target: when the target exits or the
//!    runtime kills the call, every descendant dies, detached ones included,
//!    and the call is reported over only after that. Each call also has its
//!    own IPC namespace, so calls share no SysV IPC.
//! 7. **Environment** — built from a fixed allowlist by the target itself;
//!    nothing of the runtime's environment passes. stdin is `/dev/null` (or
//!    the tool's JSON arguments for command tools).
//! 8. **Limits** — rlimits per call (CPU, address space, processes, file
//!    size, open files, no core dumps), a memory and pids cgroup where
//!    writable (one per zygote, see below; where none is, the address-space
//!    rlimit is lowered to the memory limit), a wall-clock timeout, and
//!    stdout/stderr capped in memory while still drained so the child never
//!    blocks.
//! 9. **Fail closed** — if the kernel lacks landlock (at the ABI the policy
//!    needs), user or mount namespaces, `mount_setattr` or seccomp, the
//!    call is refused with a message naming what is missing; it never runs
//!    weaker.
//! 10. **Protected paths** — workspace paths that host tools run by
//!     themselves (`.git` and its submodules' and hooks folder, `.envrc`,
//!     `.vscode`, …) are bound read-only, and secrets (`.env`, `.ssh`, …)
//!     hidden, in the sandbox's mount namespace (see
//!     [`ProcessPolicy::protected`]); one that a call creates or replaces
//!     is moved aside when the call ends, and the call fails saying so
//!     (see [`protect`]).
//!
//! # Zygotes
//!
//! Namespaces and cgroup membership are set up once per workspace, identity,
//! network mode and cgroup limits, in a long-lived helper process (the
//! *zygote*, see [`zygote`]); each call is a fresh process forked from it
//! into its own PID and IPC namespace, which then applies the per-call
//! rlimits, landlock and seccomp. What calls of one zygote share is what
//! they could already reach through their common workspace, plus the user
//! and network namespace (empty, or loopback only) and the cgroup limits.
//! Each call's private tmp dir is made by the zygote with its process, ahead
//! of the call, in the zygote's own tmpfs (which no host process can see),
//! and removed by it after. Everything a call leaves behind
//! (reaping, removing its tmp dir, making its successor) waits until the
//! runtime has finished the call, so that it never competes with it.

mod capture;
mod cgroup;
pub(crate) mod disk;
mod helper;
pub(crate) mod mount_api;
pub(crate) mod mounts;
mod network;
mod packet;
mod pool;
mod probe;
pub(crate) mod protect;
mod seccomp;
pub(crate) mod share;
mod spec;
mod zygote;

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nix::libc;
use tokio::io::AsyncWriteExt;

pub use cgroup::CgroupLayout;
pub use helper::{helper_main, probe_main, PROBE_ARG};
pub use network::Network;
pub use pool::wait_for_cleanup;
pub use probe::{Guarantee, KernelProbe, Tier, FORCE_LANDLOCK_ABI_ENV};
#[cfg(feature = "wasi")]
pub(crate) use spec::ProtectedPath;
pub use spec::{DiskBudget, DiskUse, NetworkMode, ProtectedMode, ResourceLimits};
pub use stack_egress::{Allowlist, EgressRules};

use crate::execution::{ExecStatus, Execution};
use pool::{Zygote, ZygoteKey, ZygotePool};
use spec::CallSpec;
use stack_types::Language;

/// File name of the helper binary.
pub const HELPER_NAME: &str = "stack-sandbox-exec";

/// `PATH` inside the sandbox; programs named without a `/` are found here.
pub const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The uid and gid a root runtime runs sandboxed code as when the
/// workspace belongs to root (or when the owner's group is root's), unless
/// `STACK_RUNTIME_SANDBOX_UID` names another. It lies in the range
/// 0x70000000–0x7FFDFFFF that no distribution or systemd assigns, so no
/// host process shares it: unlike `nobody`, which daemons run as, nothing
/// outside the sandbox can signal, trace or read what it owns or is
/// granted.
pub const DEFAULT_SANDBOX_ID: u32 = 2_000_000_000;

/// The dedicated sandbox uid/gid (see [`DEFAULT_SANDBOX_ID`]).
pub fn sandbox_id() -> u32 {
    static ID: OnceLock<u32> = OnceLock::new();
    *ID.get_or_init(|| {
        std::env::var("STACK_RUNTIME_SANDBOX_UID")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|id| *id != 0 && *id != u32::MAX)
            .unwrap_or(DEFAULT_SANDBOX_ID)
    })
}

/// Workspace paths sandboxed code may read but never change, by default:
/// what tools on the host run by themselves (git hooks and config, direnv,
/// editor tasks) and the runtime's own state. Code that could write them
/// would run again outside the sandbox, at the user's next `git status`.
pub const DEFAULT_READ_ONLY_IN_WORKSPACE: &[&str] = &[
    ".git", ".hg", ".svn", ".stack", ".envrc", ".vscode", ".idea",
];

/// Workspace paths sandboxed code may not even read, by default: secrets.
pub const DEFAULT_HIDDEN_IN_WORKSPACE: &[&str] = &[".env", ".ssh", ".gnupg", ".aws", ".netrc"];

/// System locations every sandboxed program may read.
const SYSTEM_READ_ONLY: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/bin",
    "/sbin",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/alternatives",
];

/// Extra `/etc` files that name resolution and TLS need, for `loopback`/`full`.
const NETWORK_READ_ONLY: &[&str] = &[
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/host.conf",
    "/etc/ssl",
    "/etc/ca-certificates",
];

/// The helper binary: `$STACK_RUNTIME_SANDBOX_HELPER`, else next to the
/// running executable (or one folder up, for test binaries).
pub fn locate_helper() -> Result<PathBuf, SandboxError> {
    if let Some(path) = std::env::var_os("STACK_RUNTIME_SANDBOX_HELPER") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(SandboxError::HelperMissing(path.display().to_string()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| SandboxError::HelperMissing(e.to_string()))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    [dir.join(HELPER_NAME), dir.join("..").join(HELPER_NAME)]
        .into_iter()
        .find(|c| c.is_file())
        .ok_or_else(|| SandboxError::HelperMissing(dir.display().to_string()))
}

/// Why a sandboxed call could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The helper binary is not where it was looked for.
    #[error("the sandbox helper `{HELPER_NAME}` was not found (looked in {0}); build it with the runtime or set STACK_RUNTIME_SANDBOX_HELPER")]
    HelperMissing(String),
    /// The kernel cannot give a guarantee the policy needs.
    #[error("sandbox refused: {0}")]
    KernelLacks(String),
    /// The workspace is one of the runtime's own folders, or inside one
    /// (see `runtime_state_folders`), which sandboxed code may not write.
    #[error("sandbox refused: {0}")]
    WorkspaceIsRuntimeState(String),
    /// The program to run does not exist.
    #[error("program `{0}` not found on the sandbox PATH ({SANDBOX_PATH})")]
    ProgramNotFound(String),
    /// Preparing the call failed.
    #[error("preparing the sandbox: {0}")]
    Prepare(String),
    /// The helper could not set up the sandbox.
    #[error("sandbox setup failed: {0}")]
    Setup(String),
}

/// What the sandbox allows one call. The default denies everything it can:
/// no network, [`ResourceLimits::default`], no extra paths, the default
/// protected names, and landlock ABI 1 or newer (every
/// [`Tier`](crate::process::Tier) keeps every guarantee the policy needs, or
/// the call is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessPolicy {
    /// Network reach.
    pub network: Network,
    /// Resource limits.
    pub limits: ResourceLimits,
    /// Extra read-only paths.
    pub extra_read_only: Vec<PathBuf>,
    /// The landlock ABI needed at least. Every tier from 1 up gives every
    /// guarantee, from landlock or from a compensating control (see
    /// [`Tier`]); a policy that wants landlock itself to hold a rule asks
    /// for more (6: signal and socket scoping).
    pub min_landlock_abi: i32,
    /// Use at most this landlock ABI, whatever the kernel offers: to test
    /// each [`Tier`] on a new kernel (`agent` takes it from
    /// [`FORCE_LANDLOCK_ABI_ENV`]). `None`: the kernel's.
    pub landlock_abi_limit: Option<i32>,
    /// Paths relative to the workspace that code may not change (read-only)
    /// or see (hidden). One that exists is bound over in the sandbox's
    /// mount namespace; one that a call creates or replaces is moved aside
    /// after it and the call fails (see [`protect`]). The default protects [`DEFAULT_READ_ONLY_IN_WORKSPACE`]
    /// and hides [`DEFAULT_HIDDEN_IN_WORKSPACE`].
    pub protected: Vec<(PathBuf, ProtectedMode)>,
}

impl Default for ProcessPolicy {
    fn default() -> Self {
        ProcessPolicy {
            network: Network::None,
            limits: ResourceLimits::default(),
            extra_read_only: Vec::new(),
            min_landlock_abi: 1,
            landlock_abi_limit: None,
            protected: default_protected(),
        }
    }
}

/// The default protected workspace paths (see [`ProcessPolicy::protected`]).
pub fn default_protected() -> Vec<(PathBuf, ProtectedMode)> {
    protected_list(None, None)
}

/// The protected workspace paths: `read_only` and `hidden`, each
/// [`DEFAULT_READ_ONLY_IN_WORKSPACE`] or [`DEFAULT_HIDDEN_IN_WORKSPACE`]
/// where not given, then the runtime's own folders (see
/// [`runtime_state_folders`]), which a policy cannot leave out.
pub fn protected_list(
    read_only: Option<&[PathBuf]>,
    hidden: Option<&[PathBuf]>,
) -> Vec<(PathBuf, ProtectedMode)> {
    let list = |given: Option<&[PathBuf]>, default: &[&str]| -> Vec<PathBuf> {
        given.map_or_else(
            || default.iter().map(PathBuf::from).collect(),
            <[_]>::to_vec,
        )
    };
    list(read_only, DEFAULT_READ_ONLY_IN_WORKSPACE)
        .into_iter()
        .map(|p| (p, ProtectedMode::ReadOnly))
        .chain(
            list(hidden, DEFAULT_HIDDEN_IN_WORKSPACE)
                .into_iter()
                .map(|p| (p, ProtectedMode::Hidden)),
        )
        .chain(runtime_state_folders())
        .collect()
}

/// The runtime's own folders, as absolute protected paths (they count only
/// where a workspace contains them, as when it is the user's home folder):
/// `stack-runtime` under the cache folder (the compiled WASI modules, which
/// the runtime maps as native code, and the assets), read-only; under the
/// configuration folder (the config file, and the key that encrypts stored
/// data at rest) and under the data folder (sessions, transcripts, the
/// audit log, history), hidden. `$XDG_CACHE_HOME`,
/// `$XDG_CONFIG_HOME` and `$XDG_DATA_HOME`, else their places in `$HOME`;
/// and `$STACK_RUNTIME_ASSETS`, read-only; the folder of the running
/// executable and `$STACK_RUNTIME_GGML_BACKENDS`, read-only (llama.cpp's
/// shared libraries and CPU backends load from there, see
/// `stack_model::cpu_backends`). Code that could write the module
/// cache or those folders could plant native code the runtime runs next;
/// code that could write the sessions could forge the audit log.
pub fn runtime_state_folders() -> Vec<(PathBuf, ProtectedMode)> {
    let env_dir = |var: &str, fallback: &str| {
        std::env::var_os(var)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(fallback)))
    };
    let mut folders: Vec<(PathBuf, ProtectedMode)> = [
        (env_dir("XDG_CACHE_HOME", ".cache"), ProtectedMode::ReadOnly),
        (env_dir("XDG_CONFIG_HOME", ".config"), ProtectedMode::Hidden),
        (
            env_dir("XDG_DATA_HOME", ".local/share"),
            ProtectedMode::Hidden,
        ),
    ]
    .into_iter()
    .filter_map(|(base, mode)| Some((base?.join("stack-runtime"), mode)))
    .filter(|(folder, _)| folder.is_absolute())
    .collect();
    for var in ["STACK_RUNTIME_ASSETS", "STACK_RUNTIME_GGML_BACKENDS"] {
        if let Some(folder) = std::env::var_os(var).filter(|d| !d.is_empty()) {
            let folder = PathBuf::from(folder);
            if folder.is_absolute() {
                folders.push((folder, ProtectedMode::ReadOnly));
            }
        }
    }
    if let Some(beside) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        folders.push((beside, ProtectedMode::ReadOnly));
    }
    folders
}

/// Runs programs in the process sandbox. Clones share their zygotes.
#[derive(Debug, Clone)]
pub struct ProcessSandbox {
    helper: PathBuf,
    zygotes: Arc<ZygotePool>,
}

impl ProcessSandbox {
    /// Uses the helper at `helper`.
    pub fn with_helper(helper: impl Into<PathBuf>) -> Self {
        let helper = helper.into();
        ProcessSandbox {
            zygotes: Arc::new(ZygotePool::new(helper.clone())),
            helper,
        }
    }

    /// How many zygotes (long-lived helper processes) are running.
    pub fn zygote_count(&self) -> usize {
        self.zygotes.len()
    }

    /// Finds the helper: `$STACK_RUNTIME_SANDBOX_HELPER`, else next to the
    /// running executable (or one folder up, for test binaries).
    pub fn locate() -> Result<Self, SandboxError> {
        locate_helper().map(Self::with_helper)
    }

    /// Runs `code` in `language` (python or bash) with `workspace` as the
    /// working directory; Python as a notebook cell (see [`crate::cell`]).
    pub async fn run_code(
        &self,
        language: Language,
        code: &str,
        workspace: &Path,
        policy: &ProcessPolicy,
    ) -> Execution {
        let (argv, file) = match language {
            // As a notebook cell (see `crate::cell`); the code file's path
            // comes last.
            Language::Python => (
                vec![
                    "python3".to_string(),
                    "-c".into(),
                    crate::cell::PYTHON_MAIN.into(),
                    "--file".into(),
                ],
                "main.py",
            ),
            Language::Bash => (vec!["bash".to_string()], "main.sh"),
            Language::Javascript => {
                return Execution::internal_error(
                    "javascript runs in the WASI sandbox, not the process sandbox",
                )
            }
        };
        let request = Request {
            argv,
            code: Some((file, code.as_bytes().to_vec())),
            stdin: None,
            env: Vec::new(),
        };
        self.run_request(request, workspace, policy).await
    }

    /// Runs `argv` (program first) with optional bytes on stdin.
    pub async fn run(
        &self,
        argv: &[String],
        stdin: Option<Vec<u8>>,
        workspace: &Path,
        policy: &ProcessPolicy,
    ) -> Execution {
        let request = Request {
            argv: argv.to_vec(),
            code: None,
            stdin,
            env: Vec::new(),
        };
        self.run_request(request, workspace, policy).await
    }

    async fn run_request(
        &self,
        request: Request,
        workspace: &Path,
        policy: &ProcessPolicy,
    ) -> Execution {
        let started = std::time::Instant::now();
        let mut outcome = match self.run_inner(request, workspace, policy).await {
            Ok(outcome) => outcome,
            Err(err @ SandboxError::ProgramNotFound(_)) => Execution::failed(err.to_string()),
            Err(err) => Execution::internal_error(err.to_string()),
        };
        outcome.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        outcome
    }

    async fn run_inner(
        &self,
        request: Request,
        workspace: &Path,
        policy: &ProcessPolicy,
    ) -> Result<Execution, SandboxError> {
        let handed = self.hand_over(request, workspace, policy).await?;
        let HandedOver {
            zygote,
            channel,
            pidfd,
            stdio,
            workspace,
            snapshot,
            egress,
        } = handed;
        // Abandoned, the call is killed (in `run_call`) and then, once its
        // processes are gone, what it did to protected paths is undone.
        let watch_init = pidfd.try_clone().ok().map(protect::AbandonedCall::Init);
        let mut undo = protect::UndoIfAbandoned::new(snapshot, workspace.clone(), watch_init);
        let mut outcome = run_call(&zygote, channel, pidfd, policy.limits, stdio).await?;
        if let Some(proxy) = egress {
            // The call's processes are gone: its connections end now.
            let report = proxy.finish().await;
            outcome.egress = report.records;
            if report.dropped > 0 {
                outcome.stderr.push_str(&format!(
                    "\n[egress proxy: {} more connections decided but not recorded]",
                    report.dropped
                ));
            }
        }
        let snapshot = undo.take().unwrap_or_default();
        if !snapshot.is_empty() {
            let undone = off_the_runtime(move || snapshot.undo_changes(&workspace))
                .await
                .unwrap_or_default();
            if !undone.is_empty() {
                protect::report(&mut outcome, &undone);
            }
        }
        Ok(outcome)
    }

    /// Starts a long-lived program in the sandbox with its stdin, stdout
    /// and stderr connected to the runtime (an MCP server, say): the same
    /// boundary as a call (identity, namespaces, landlock, seccomp, rlimits,
    /// cgroup, network), and no wall-clock limit; it lives until it exits
    /// or the [`SandboxedService`] is dropped, which kills it and every
    /// process it made. `policy.limits.cpu_seconds` counts over its whole
    /// life.
    ///
    /// `env` is added to the sandbox's fixed environment (`PATH`, `HOME`,
    /// `TMPDIR`, the locale…), which it cannot replace; a name that is one
    /// of those, or is not a plain name, is refused.
    pub async fn spawn_service(
        &self,
        argv: &[String],
        env: &[(String, String)],
        workspace: &Path,
        policy: &ProcessPolicy,
    ) -> Result<SandboxedService, SandboxError> {
        let fixed = sandbox_environment(Path::new("/"));
        for (name, value) in env {
            let plain = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !plain || value.contains('\0') {
                return Err(SandboxError::Prepare(format!(
                    "environment variable `{name}`: not a plain name, or its value holds a NUL"
                )));
            }
            if fixed.iter().any(|(fixed, _)| fixed == name) {
                return Err(SandboxError::Prepare(format!(
                    "environment variable `{name}` is set by the sandbox itself and cannot be passed in"
                )));
            }
        }
        let request = Request {
            argv: argv.to_vec(),
            code: None,
            stdin: None,
            env: env.to_vec(),
        };
        let handed = self
            .hand_over_with(request, workspace, policy, StdinMode::Interactive)
            .await?;
        SandboxedService::start(handed)
    }

    async fn hand_over(
        &self,
        request: Request,
        workspace: &Path,
        policy: &ProcessPolicy,
    ) -> Result<HandedOver, SandboxError> {
        self.hand_over_with(request, workspace, policy, StdinMode::Bytes)
            .await
    }

    /// Everything up to the moment a spare has the call: the checks, the
    /// zygote, the pipes, the spec.
    async fn hand_over_with(
        &self,
        request: Request,
        workspace: &Path,
        policy: &ProcessPolicy,
        stdin_mode: StdinMode,
    ) -> Result<HandedOver, SandboxError> {
        let probe = KernelProbe::get().limited_to(policy.landlock_abi_limit);
        if let Some(missing) = probe.missing_requirements(policy.min_landlock_abi) {
            return Err(SandboxError::KernelLacks(missing));
        }
        if let Some(refused) = probe.network_refused(policy.network.mode()) {
            return Err(SandboxError::KernelLacks(refused));
        }
        if policy.network.allowlist().is_some() {
            if let Some(missing) = probe.egress_filtering_missing() {
                return Err(SandboxError::KernelLacks(missing));
            }
        }
        let program_name = request
            .argv
            .first()
            .ok_or_else(|| SandboxError::Prepare("no program to run (empty argv)".into()))?
            .clone();
        // Path lookups and the protected-path survey touch the
        // filesystem: on the blocking pool, never on a runtime thread.
        let workspace = workspace.to_path_buf();
        let protected_names = policy.protected.clone();
        let extra_read_only = policy.extra_read_only.clone();
        let (workspace, identity, program, read_only, protected, snapshot) =
            off_the_runtime(move || {
                let prepare = |e: std::io::Error| SandboxError::Prepare(e.to_string());
                let workspace = std::fs::canonicalize(&workspace).map_err(prepare)?;
                let identity = sandbox_identity(&workspace).map_err(prepare)?;
                let program = resolve_program(&program_name)?;
                // A call's interpreter brings its install folder; a service
                // (an MCP server, named in a policy) gets only what its
                // policy lists. Never `/` or a home folder, whatever the
                // program's path: that would open `.ssh` and the like.
                let mut read_only: Vec<PathBuf> = probe::prefix_of(&program)
                    .filter(|prefix| !covered_by_base(prefix))
                    .filter(|prefix| !too_broad_to_grant(prefix))
                    .filter(|_| matches!(stdin_mode, StdinMode::Bytes))
                    .into_iter()
                    .collect();
                read_only.extend(extra_read_only);
                if let Some(folder) =
                    protect::workspace_within_protected(&workspace, &protected_names)
                {
                    return Err(SandboxError::WorkspaceIsRuntimeState(
                        protect::refuse_workspace(&workspace, &folder),
                    ));
                }
                let (protected, snapshot) = protect::survey(&workspace, &protected_names);
                Ok::<_, SandboxError>((
                    workspace, identity, program, read_only, protected, snapshot,
                ))
            })
            .await
            .map_err(|e| SandboxError::Prepare(format!("preparing the call: {e}")))??;
        let key = ZygoteKey {
            workspace: workspace.clone(),
            uid: identity.uid,
            gid: identity.gid,
            shares_root_workspace: identity.shares_root_workspace,
            network: policy.network.mode(),
            egress: policy.network.allowlist().map(|list| {
                use std::hash::{Hash, Hasher};
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                list.hash(&mut hasher);
                hasher.finish()
            }),
            memory_bytes: policy.limits.memory_bytes,
            processes: policy.limits.processes,
            landlock_abi: probe.landlock_abi.unwrap_or(0),
            // A service (an MCP server) lives on and writes as it goes: its
            // writes cannot wait for its end to be written back.
            disk: match stdin_mode {
                StdinMode::Bytes => policy.limits.disk,
                StdinMode::Interactive => None,
            },
            read_only: read_only.clone(),
            protected,
        };
        let (zygote, mut spare) = self.acquire(&key, probe.cgroup.as_ref()).await?;
        // The spare has slept, maybe on a CPU that has gone idle, which
        // takes a while to wake: wake it now, and it waits for its call
        // awake while the rest is prepared here.
        let _ = packet::send_bytes(spare.channel.as_fd(), spec::WAKE_UP, &[]);
        // Everything the wait needs is set up before the call is sent, so
        // that nothing here competes with the target once it has its call.
        let stdio = match stdin_mode {
            StdinMode::Bytes => CallStdio::open(request.stdin)?,
            StdinMode::Interactive => CallStdio::open_interactive()?,
        };
        let code = match &request.code {
            Some((name, code)) => Some((name.to_string(), sealed_code(code)?)),
            None => None,
        };
        let mut fds = stdio.child_fds().to_vec();
        if let Some((_, memfd)) = &code {
            use std::os::fd::AsRawFd;
            fds.push(memfd.as_raw_fd());
        }
        let mut argv = request.argv.clone();
        argv[0] = program.display().to_string();
        let mut limits = policy.limits;
        if !zygote.has_cgroup() {
            // No memory cgroup to hold the policy's memory limit (an
            // unprivileged runtime on cgroup v1, say): the address-space
            // rlimit holds it instead, more strictly, rather than not at all.
            limits.address_space_bytes = limits.address_space_bytes.min(limits.memory_bytes);
        }
        let spec = CallSpec {
            argv,
            code_file: code.as_ref().map(|(name, _)| name.clone()),
            read_only,
            limits,
            min_landlock_abi: policy.min_landlock_abi,
            env: request.env.clone(),
        };
        // A spare that died while queued fails the send; try the next one.
        let mut attempts = 0;
        let (channel, pidfd) = loop {
            let pool::Spare { channel, pidfd } = spare;
            let channel =
                watch(channel).map_err(|e| SandboxError::Prepare(format!("report: {e}")))?;
            match packet::send(channel.get_ref().as_fd(), &spec, &fds) {
                Ok(()) => break (channel, pidfd),
                Err(err) if attempts >= 2 => {
                    return Err(SandboxError::Setup(format!(
                        "handing the call to its sandboxed process: {err}"
                    )))
                }
                Err(_) => {
                    attempts += 1;
                    spare = zygote.take_spare().await?;
                }
            }
        };
        drop(code);
        let egress = match policy.network.allowlist() {
            Some(allowlist) => {
                let wall = Duration::from_millis(policy.limits.wall_ms);
                let listener = egress_listener(&channel, wall).await?;
                let proxy = stack_egress::EgressProxy::start(listener, allowlist.clone())
                    .map_err(|e| SandboxError::Setup(format!("starting the egress proxy: {e}")))?;
                Some(proxy)
            }
            None => None,
        };
        Ok(HandedOver {
            zygote,
            channel,
            pidfd,
            stdio,
            workspace,
            snapshot,
            egress,
        })
    }

    /// A spare of the zygote for `key`; a zygote found dead (killed from
    /// outside, say) is replaced once.
    async fn acquire(
        &self,
        key: &ZygoteKey,
        cgroups: Option<&CgroupLayout>,
    ) -> Result<(Arc<Zygote>, pool::Spare), SandboxError> {
        let zygote = self.zygotes.get(key, cgroups).await?;
        match zygote.take_spare().await {
            Ok(spare) => Ok((zygote, spare)),
            Err(_) if !zygote.is_alive() => {
                tracing::warn!("the sandbox zygote died; starting a new one");
                let zygote = self.zygotes.get(key, cgroups).await?;
                let spare = zygote.take_spare().await?;
                Ok((zygote, spare))
            }
            Err(err) => Err(err),
        }
    }

    /// The helper binary in use.
    pub fn helper(&self) -> &Path {
        &self.helper
    }
}

/// Runs blocking filesystem work (a few `stat`s and `open`s, once a grant
/// walk) without holding up the async runtime's other tasks: on a
/// multi-threaded runtime in place, after telling the scheduler to move
/// this worker's other tasks elsewhere (`block_in_place`: no thread hop,
/// which on a small machine costs more than the work); elsewhere on the
/// blocking pool.
async fn off_the_runtime<R: Send + 'static>(
    work: impl FnOnce() -> R + Send + 'static,
) -> Result<R, tokio::task::JoinError> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let multi_threaded = Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == RuntimeFlavor::MultiThread);
    if multi_threaded {
        Ok(tokio::task::block_in_place(work))
    } else {
        tokio::task::spawn_blocking(work).await
    }
}

/// How a call's wait for its report ended.
enum Ended {
    /// The init reported the target's exit.
    Exited {
        status: i32,
        cpu_ms: u64,
        /// Other processes of the call were alive at the target's exit.
        others_left: bool,
        /// With a disk budget: what the call used, and the write back.
        disk: Option<spec::DiskUse>,
        setup_error: Option<String>,
    },
    /// The call's socket closed without a report: its init is gone.
    Lost { setup_error: Option<String> },
    /// The wall-clock limit passed; the call was killed.
    TimedOut,
}

/// Extra time the output pipes get after the wall-clock limit.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// A call its spare has: what waiting for it needs. Dropped as it is, the
/// call is killed (its `pidfd` is wrapped at once by whoever takes it).
struct HandedOver {
    zygote: Arc<Zygote>,
    channel: tokio::io::unix::AsyncFd<OwnedFd>,
    pidfd: OwnedFd,
    stdio: CallStdio,
    workspace: PathBuf,
    snapshot: protect::Snapshot,
    /// The call's egress proxy, serving its listener (a network allowlist).
    egress: Option<stack_egress::EgressProxy>,
}

/// A service has no wall-clock limit: this stands for "for ever" (136
/// years) where a deadline is needed.
const SERVICE_LIFETIME: Duration = Duration::from_secs(u32::MAX as u64);

/// What the target's stdin is.
#[derive(Clone, Copy)]
enum StdinMode {
    /// `/dev/null`, or a pipe fed the request's bytes and closed.
    Bytes,
    /// A pipe the runtime keeps writing to.
    Interactive,
}

/// A long-lived sandboxed program (see [`ProcessSandbox::spawn_service`]):
/// its stdio, and how it ended. Dropping it kills the program and every
/// process it made.
pub struct SandboxedService {
    /// Its standard input.
    pub stdin: tokio::net::unix::pipe::Sender,
    /// Its standard output.
    pub stdout: tokio::net::unix::pipe::Receiver,
    /// Its standard error.
    pub stderr: tokio::net::unix::pipe::Receiver,
    /// Resolves when it has ended (and its protected paths are checked).
    pub ended: tokio::sync::oneshot::Receiver<ServiceEnd>,
    /// Kills it on drop, through the waiter task's cancellation.
    _kill: tokio_util_free::AbortOnDrop,
}

/// How a sandboxed service ended.
#[derive(Debug, Clone)]
pub enum ServiceEnd {
    /// It exited with this wait status (an exit code, or the signal that
    /// killed it: an rlimit, the memory cgroup).
    Exited {
        /// The raw wait status.
        status: i32,
        /// The CPU time it used, in milliseconds.
        cpu_ms: u64,
    },
    /// Its sandbox reported a setup failure, or its report channel broke.
    Failed(String),
}

impl std::fmt::Display for ServiceEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceEnd::Exited { status, .. } => {
                let status = std::process::ExitStatus::from_raw(*status);
                match (status.code(), status.signal()) {
                    (Some(code), _) => write!(f, "exited with code {code}"),
                    (None, Some(signal)) => match nix::sys::signal::Signal::try_from(signal) {
                        Ok(name) => write!(f, "killed by {}", name.as_str()),
                        Err(_) => write!(f, "killed by signal {signal}"),
                    },
                    _ => write!(f, "ended ({status})"),
                }
            }
            ServiceEnd::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// What is left of a [`SandboxedService`] once its pipes are taken
/// ([`SandboxedService::into_parts`]): how it ended, and the program's
/// life. Dropping it kills the program and every process it made.
pub struct ServiceHandle {
    /// Resolves when it has ended.
    pub ended: tokio::sync::oneshot::Receiver<ServiceEnd>,
    _kill: tokio_util_free::AbortOnDrop,
}

/// A service's pipes: its stdin, stdout and stderr.
pub type ServicePipes = (
    tokio::net::unix::pipe::Sender,
    tokio::net::unix::pipe::Receiver,
    tokio::net::unix::pipe::Receiver,
);

impl SandboxedService {
    /// Its pipes, and the handle that keeps it alive.
    pub fn into_parts(self) -> (ServicePipes, ServiceHandle) {
        (
            (self.stdin, self.stdout, self.stderr),
            ServiceHandle {
                ended: self.ended,
                _kill: self._kill,
            },
        )
    }

    fn start(handed: HandedOver) -> Result<SandboxedService, SandboxError> {
        let HandedOver {
            zygote,
            channel,
            pidfd,
            stdio,
            workspace,
            snapshot,
            egress,
        } = handed;
        // From here on, dropping `init` (this function failing, or the
        // waiter task being aborted) kills the service.
        let mut init = KillOnDrop(Some(pidfd));
        let CallStdio {
            child,
            stdout,
            stderr,
            stdin_feed,
        } = stdio;
        drop(child);
        let Some((stdin, _)) = stdin_feed else {
            return Err(SandboxError::Prepare(
                "a service needs a stdin pipe".to_string(),
            ));
        };
        let (tell, ended) = tokio::sync::oneshot::channel();
        let watch_init = init
            .0
            .as_ref()
            .and_then(|pidfd| pidfd.try_clone().ok())
            .map(protect::AbandonedCall::Init);
        // Aborted (the service dropped), the waiter still undoes what the
        // service did to protected paths, once it is gone.
        let mut undo = protect::UndoIfAbandoned::new(snapshot, workspace.clone(), watch_init);
        let waiter = tokio::spawn(async move {
            let end = match wait_report(&channel, SERVICE_LIFETIME).await {
                Ended::Exited {
                    setup_error: Some(message),
                    ..
                }
                | Ended::Lost {
                    setup_error: Some(message),
                } => ServiceEnd::Failed(message),
                Ended::Exited {
                    status,
                    cpu_ms,
                    others_left,
                    ..
                } => {
                    if let Some(pidfd) = init.disarm() {
                        end_call(&zygote, pidfd, others_left).await;
                    }
                    ServiceEnd::Exited { status, cpu_ms }
                }
                Ended::Lost { .. } => {
                    ServiceEnd::Failed("its sandbox's report channel closed".into())
                }
                Ended::TimedOut => ServiceEnd::Failed("timed out".into()),
            };
            drop(init);
            // Its connections were logged (`tracing`) as they were decided.
            if let Some(proxy) = egress {
                proxy.finish().await;
            }
            let snapshot = undo.take().unwrap_or_default();
            if !snapshot.is_empty() {
                let undone = off_the_runtime(move || snapshot.undo_changes(&workspace))
                    .await
                    .unwrap_or_default();
                if !undone.is_empty() {
                    tracing::warn!(?undone, "a sandboxed service changed protected workspace paths; they were moved aside");
                }
            }
            let _ = tell.send(end);
        });
        Ok(SandboxedService {
            stdin,
            stdout,
            stderr,
            ended,
            _kill: tokio_util_free::AbortOnDrop(waiter),
        })
    }
}

/// A tokio task aborted when this is dropped (no tokio-util here).
mod tokio_util_free {
    /// Aborts the task on drop.
    pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
}

/// The pipes of one call: the target's ends (stdin is `/dev/null`, or a
/// pipe fed with the request's bytes) and the runtime's, already
/// registered with tokio.
struct CallStdio {
    /// The ends the target gets, in stdin, stdout, stderr order.
    child: [OwnedFd; 3],
    stdout: tokio::net::unix::pipe::Receiver,
    stderr: tokio::net::unix::pipe::Receiver,
    /// The write end of stdin and what to feed it, if any.
    stdin_feed: Option<(tokio::net::unix::pipe::Sender, Vec<u8>)>,
}

impl CallStdio {
    fn open(stdin: Option<Vec<u8>>) -> Result<CallStdio, SandboxError> {
        use nix::fcntl::OFlag;
        use tokio::net::unix::pipe;
        let prepare = |what: &str, e: std::io::Error| SandboxError::Prepare(format!("{what}: {e}"));
        let new_pipe =
            || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| prepare("pipe", e.into()));
        let (stdout, out_write) = new_pipe()?;
        let (stderr, err_write) = new_pipe()?;
        let (stdin_child, stdin_feed): (OwnedFd, _) = match stdin {
            Some(bytes) => {
                let (read, write) = new_pipe()?;
                let sender = pipe::Sender::from_owned_fd(write).map_err(|e| prepare("stdin", e))?;
                (read, Some((sender, bytes)))
            }
            None => (
                std::fs::File::open("/dev/null")
                    .map_err(|e| prepare("/dev/null", e))?
                    .into(),
                None,
            ),
        };
        Ok(CallStdio {
            child: [stdin_child, out_write, err_write],
            stdout: pipe::Receiver::from_owned_fd(stdout).map_err(|e| prepare("stdout", e))?,
            stderr: pipe::Receiver::from_owned_fd(stderr).map_err(|e| prepare("stderr", e))?,
            stdin_feed,
        })
    }

    /// Pipes for a long-lived program: the runtime keeps stdin's write end
    /// (returned as the feed, with nothing queued).
    fn open_interactive() -> Result<CallStdio, SandboxError> {
        use nix::fcntl::OFlag;
        use tokio::net::unix::pipe;
        let prepare = |what: &str, e: std::io::Error| SandboxError::Prepare(format!("{what}: {e}"));
        let (read, write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| prepare("pipe", e.into()))?;
        let sender = pipe::Sender::from_owned_fd(write).map_err(|e| prepare("stdin", e))?;
        let mut stdio = CallStdio::open(None)?;
        stdio.child[0] = read;
        stdio.stdin_feed = Some((sender, Vec::new()));
        Ok(stdio)
    }

    fn child_fds(&self) -> [std::os::fd::RawFd; 3] {
        use std::os::fd::AsRawFd;
        self.child.each_ref().map(|fd| fd.as_raw_fd())
    }
}

/// A call's code in a sealed memfd: the target copies it into its private
/// tmp dir itself, so the runtime never writes (or names) a file in a
/// folder the sandbox's uid controls, and nothing can change the code
/// between here and there.
fn sealed_code(code: &[u8]) -> Result<OwnedFd, SandboxError> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let prepare = |e: nix::Error| SandboxError::Prepare(format!("passing the code: {e}"));
    let fd = memfd_create(
        c"stack-call-code",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(prepare)?;
    let mut written = 0;
    while written < code.len() {
        written += nix::unistd::write(&fd, &code[written..]).map_err(prepare)?;
    }
    let seals = SealFlag::F_SEAL_SEAL
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE;
    fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).map_err(prepare)?;
    Ok(fd)
}

/// Waits for a call that has been handed to a spare (`report`: its socket;
/// `pidfd`: its init): reads the output and the init's report in this task
/// until the call is over (or the wall-clock limit kills it).
async fn run_call(
    zygote: &Zygote,
    report: tokio::io::unix::AsyncFd<OwnedFd>,
    pidfd: OwnedFd,
    limits: ResourceLimits,
    stdio: CallStdio,
) -> Result<Execution, SandboxError> {
    let CallStdio {
        child,
        stdout,
        stderr,
        stdin_feed,
    } = stdio;
    drop(child);
    if let Some((mut sender, bytes)) = stdin_feed {
        tokio::spawn(async move {
            // The child may exit without reading; a broken pipe is fine.
            let _ = sender.write_all(&bytes).await;
        });
    }
    let wall = Duration::from_millis(limits.wall_ms);
    let cap = limits.output_bytes;
    // Until the call is over, dropping this future (a cancelled turn, an
    // MCP client's `notifications/cancelled`) kills the call's init, and
    // with it every process of the call.
    let mut init = KillOnDrop(Some(pidfd));
    let mut stopped_disk = None;
    let (ended, stdout, stderr) = tokio::join!(
        async {
            let ended = wait_report(&report, wall).await;
            match (&ended, init.disarm()) {
                (Ended::TimedOut, Some(pidfd)) if limits.disk.is_some() => {
                    // Stopped, not killed: the init kills the call and
                    // writes back what it wrote (see `disk`), then reports.
                    if pool::signal_init(&pidfd, disk::STOP_SIGNAL).is_ok() {
                        if let Ended::Exited { disk, .. } =
                            wait_report(&report, WRITE_BACK_GRACE).await
                        {
                            stopped_disk = disk;
                        }
                    }
                    end_call(zygote, pidfd, true).await
                }
                (Ended::TimedOut, Some(pidfd)) => end_call(zygote, pidfd, true).await,
                // The init kills them as it exits; the call is over when it
                // has.
                (
                    Ended::Exited {
                        others_left: true, ..
                    },
                    Some(pidfd),
                ) => end_call(zygote, pidfd, false).await,
                _ => {}
            }
            ended
        },
        tokio::time::timeout(wall + DRAIN_GRACE, capture::read_capped(stdout, cap)),
        tokio::time::timeout(wall + DRAIN_GRACE, capture::read_capped(stderr, cap)),
    );
    let ended_badly = match &ended {
        Ended::Exited { status, .. } => *status != 0,
        Ended::Lost { .. } => true,
        Ended::TimedOut => false,
    };
    let oom = ended_badly && zygote.new_oom_kills();
    let (stdout, out_cut) = stdout.unwrap_or((Vec::new(), true));
    let (stderr, err_cut) = stderr.unwrap_or((Vec::new(), true));
    let disk = match &ended {
        Ended::Exited { disk, .. } => disk.clone(),
        _ => stopped_disk,
    };
    let (status, cpu_ms, timed_out) = match ended {
        Ended::Exited {
            setup_error: Some(message),
            ..
        }
        | Ended::Lost {
            setup_error: Some(message),
        } => return Err(SandboxError::Setup(message)),
        Ended::Exited { status, cpu_ms, .. } => (
            Some(std::process::ExitStatus::from_raw(status)),
            Some(cpu_ms),
            false,
        ),
        Ended::Lost { .. } => (None, None, false),
        Ended::TimedOut => (None, None, true),
    };
    let mut outcome = Execution::from_output(&stdout, &stderr, out_cut || err_cut);
    outcome.exit_code = None;
    classify(&mut outcome, status, cpu_ms, timed_out, oom, &limits);
    if let Some(disk) = disk {
        account_disk(&mut outcome, &disk, &limits);
    }
    Ok(outcome)
}

/// How long a call stopped at its wall-clock limit has to write its
/// changes back (see `disk`) before it is killed outright.
const WRITE_BACK_GRACE: Duration = Duration::from_secs(10);

/// Adds what a call with a disk budget used, and how the write back went,
/// to its outcome: a budget that ran out is the call's limit (unless
/// another ended it first), and changes that could not be written back
/// fail the call, naming each.
fn account_disk(outcome: &mut Execution, disk: &spec::DiskUse, limits: &ResourceLimits) {
    outcome.disk = Some(stack_types::DiskAdded {
        bytes: disk.bytes,
        files: disk.files,
    });
    let budget = limits.disk.unwrap_or_default();
    if (disk.bytes_full || disk.files_full) && outcome.limit.is_none() {
        let which = if disk.bytes_full {
            format!("{} MiB", budget.bytes >> 20)
        } else {
            format!("{} files", budget.files)
        };
        outcome.status = ExecStatus::Killed;
        outcome.limit = Some(stack_types::Limit::Disk);
        let before = outcome.error.take();
        outcome.error = Some(match before {
            Some(before) => format!("the call's disk budget ({which} added to the workspace and tmp) ran out: writes past it failed with ENOSPC; {before}"),
            None => format!("the call's disk budget ({which} added to the workspace and tmp) ran out: writes past it failed with ENOSPC"),
        });
    }
    if !disk.not_written_back.is_empty() {
        let list = disk.not_written_back.join("\n  ");
        outcome.stderr.push_str(&format!(
            "\n[sandbox: changes not written back to the workspace:\n  {list}]"
        ));
        if outcome.status == ExecStatus::Ok {
            outcome.status = ExecStatus::Failed;
        }
        let note = format!(
            "{} of the call's changes could not be written back to the workspace (see stderr)",
            disk.not_written_back.len()
        );
        outcome.error = Some(match outcome.error.take() {
            Some(before) => format!("{before}; {note}"),
            None => note,
        });
    }
}

/// A call's init (its pidfd), killed if dropped before [`KillOnDrop::disarm`].
struct KillOnDrop(Option<OwnedFd>);

impl KillOnDrop {
    /// The pidfd, no longer killed on drop.
    fn disarm(&mut self) -> Option<OwnedFd> {
        self.0.take()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pidfd) = self.0.take() {
            if let Err(err) = pool::kill_init(&pidfd) {
                tracing::warn!(%err, "could not kill an abandoned call's processes");
            }
        }
    }
}

/// The listening socket a [`NetworkMode::Proxied`] call's target binds in
/// its network namespace and sends before it confines itself (see
/// `helper::hand_over_egress_listener`): the first packet on the call's
/// socket. A setup failure instead is the call's error.
async fn egress_listener(
    report: &tokio::io::unix::AsyncFd<OwnedFd>,
    wall: Duration,
) -> Result<std::net::TcpListener, SandboxError> {
    use std::os::fd::AsFd;
    let setup = |why: String| SandboxError::Setup(format!("egress proxy: {why}"));
    let deadline = tokio::time::Instant::now() + wall;
    loop {
        let mut ready = match tokio::time::timeout_at(deadline, report.readable()).await {
            Ok(Ok(ready)) => ready,
            Ok(Err(err)) => return Err(setup(err.to_string())),
            Err(_) => return Err(setup("the sandbox did not hand over its socket".into())),
        };
        match packet::recv(report.get_ref().as_fd(), true) {
            Ok(Some(mut packet)) => match packet.decode::<spec::CallReport>() {
                Ok(spec::CallReport::EgressListening { .. }) if packet.fds.len() == 1 => {
                    let fd = packet.fds.remove(0);
                    // A TCP socket that listens, or nothing is served.
                    let listening =
                        nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::AcceptConn)
                            .unwrap_or(false);
                    let listener = std::net::TcpListener::from(fd);
                    let loopback = listener
                        .local_addr()
                        .is_ok_and(|address| address.ip().is_loopback());
                    if !listening || !loopback {
                        return Err(setup("the sandbox sent something other than a TCP socket listening on loopback".into()));
                    }
                    return Ok(listener);
                }
                Ok(spec::CallReport::SetupFailed { message }) => {
                    return Err(SandboxError::Setup(message))
                }
                Ok(other) => return Err(setup(format!("unexpected report {other:?}"))),
                Err(err) => return Err(setup(err.to_string())),
            },
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => ready.clear_ready(),
            Ok(None) => return Err(setup("the sandbox closed its report channel".into())),
            Err(err) => return Err(setup(err.to_string())),
        }
    }
}

/// Registers `fd` with tokio for readability.
fn watch(fd: OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd keeps its one descriptor open, unchanged, for as
    // long as the AsyncFd owns it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
}

/// Reads the call's socket until the init reports the target's exit, the
/// socket closes, or `wall` passes.
async fn wait_report(report: &tokio::io::unix::AsyncFd<OwnedFd>, wall: Duration) -> Ended {
    use std::os::fd::AsFd;
    let deadline = tokio::time::Instant::now() + wall;
    let mut setup_error = None;
    loop {
        let mut ready = match tokio::time::timeout_at(deadline, report.readable()).await {
            Ok(Ok(ready)) => ready,
            Ok(Err(_)) => return Ended::Lost { setup_error },
            Err(_) => return Ended::TimedOut,
        };
        match packet::recv(report.get_ref().as_fd(), true) {
            Ok(Some(packet)) => match packet.decode::<spec::CallReport>() {
                Ok(spec::CallReport::Exited {
                    status,
                    cpu_ms,
                    others_left,
                    disk,
                }) => {
                    return Ended::Exited {
                        status,
                        cpu_ms,
                        others_left,
                        disk,
                        setup_error,
                    }
                }
                Ok(spec::CallReport::SetupFailed { message }) => setup_error = Some(message),
                // Read by `egress_listener` before the wait; never twice.
                Ok(spec::CallReport::EgressListening { .. }) => {}
                Err(_) => {}
            },
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => ready.clear_ready(),
            Ok(None) | Err(_) => return Ended::Lost { setup_error },
        }
    }
}

/// Waits until a call's init is gone, and with it (the kernel kills what is
/// left of its PID namespace as it exits) every process of the call; with
/// `kill`, kills the init first. If that takes over two seconds, kills the
/// zygote and with it everything it made.
async fn end_call(zygote: &Zygote, pidfd: OwnedFd, kill: bool) {
    let killed = if kill {
        pool::kill_init(&pidfd)
    } else {
        Ok(())
    };
    let gone = match watch(pidfd) {
        Ok(pidfd) => tokio::time::timeout(Duration::from_secs(2), pidfd.readable())
            .await
            .is_ok_and(|ready| ready.is_ok()),
        Err(_) => false,
    };
    if !gone || killed.is_err() {
        tracing::warn!("a call's processes did not end; killing its zygote");
        zygote.terminate();
    }
}

struct Request {
    argv: Vec<String>,
    code: Option<(&'static str, Vec<u8>)>,
    stdin: Option<Vec<u8>>,
    /// Added to the sandbox's fixed environment (services only).
    env: Vec<(String, String)>,
}

/// Fills in how the call ended. `cpu_ms` is the CPU time the target used
/// (it tells the kernel's `RLIMIT_CPU` SIGKILL from any other).
fn classify(
    outcome: &mut Execution,
    status: Option<std::process::ExitStatus>,
    cpu_ms: Option<u64>,
    timed_out: bool,
    oom: bool,
    limits: &ResourceLimits,
) {
    let limit_hit = |outcome: &mut Execution, limit: stack_types::Limit, message: String| {
        outcome.status = ExecStatus::Killed;
        outcome.limit = Some(limit);
        outcome.error = Some(message);
    };
    if timed_out {
        outcome.status = ExecStatus::Timeout;
        outcome.limit = Some(stack_types::Limit::WallTime);
        outcome.error = Some(format!(
            "timed out after {} ms; the whole process tree was killed",
            limits.wall_ms
        ));
        return;
    }
    let Some(status) = status else {
        outcome.status = ExecStatus::Error;
        outcome.error = Some("lost track of the sandboxed process".into());
        return;
    };
    if let Some(code) = status.code() {
        outcome.exit_code = Some(code);
        if code == 0 {
            outcome.status = ExecStatus::Ok;
        } else if oom {
            limit_hit(
                outcome,
                stack_types::Limit::Memory,
                format!(
                    "a process ran out of its {} MiB memory limit and was killed; exit code {code}",
                    limits.memory_bytes >> 20
                ),
            );
        } else {
            outcome.status = ExecStatus::Failed;
            outcome.error = Some(format!("exited with code {code}"));
        }
        return;
    }
    let signal = status.signal().unwrap_or(0);
    outcome.signal = Some(signal);
    let name = nix::sys::signal::Signal::try_from(signal)
        .map_or_else(|_| format!("signal {signal}"), |s| s.as_str().to_string());
    match signal {
        libc::SIGXCPU => limit_hit(
            outcome,
            stack_types::Limit::Cpu,
            format!(
                "killed by {name}: CPU time limit of {} s reached",
                limits.cpu_seconds
            ),
        ),
        libc::SIGXFSZ => limit_hit(
            outcome,
            stack_types::Limit::FileSize,
            format!(
                "killed by {name}: file size limit of {} MiB reached",
                limits.file_size_bytes >> 20
            ),
        ),
        libc::SIGKILL if oom => limit_hit(
            outcome,
            stack_types::Limit::Memory,
            format!(
                "killed by {name}: memory limit of {} MiB reached",
                limits.memory_bytes >> 20
            ),
        ),
        libc::SIGKILL if cpu_ms.is_some_and(|ms| ms >= limits.cpu_seconds * 1000) => limit_hit(
            outcome,
            stack_types::Limit::Cpu,
            format!(
                "killed by {name}: CPU time hard limit of {} s reached",
                limits.cpu_seconds + 1
            ),
        ),
        _ => {
            outcome.status = ExecStatus::Failed;
            outcome.error = Some(format!("terminated by {name}"));
        }
    }
}

/// Finds `name` on the sandbox PATH, or checks an explicit path.
fn resolve_program(name: &str) -> Result<PathBuf, SandboxError> {
    if name.contains('/') {
        let path = PathBuf::from(name);
        return if path.is_absolute() && path.is_file() {
            Ok(path)
        } else {
            Err(SandboxError::ProgramNotFound(name.to_string()))
        };
    }
    SANDBOX_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| SandboxError::ProgramNotFound(name.to_string()))
}

/// The complete environment of sandboxed code whose home (and tmp) is
/// `home`: nothing of the runtime's own environment passes.
pub fn sandbox_environment(home: &Path) -> Vec<(String, String)> {
    let home = home.display().to_string();
    vec![
        ("PATH".into(), SANDBOX_PATH.into()),
        ("HOME".into(), home.clone()),
        ("TMPDIR".into(), home),
        ("LANG".into(), "C.UTF-8".into()),
        ("LC_ALL".into(), "C.UTF-8".into()),
        ("TERM".into(), "dumb".into()),
        ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
        ("PYTHONIOENCODING".into(), "utf-8".into()),
    ]
}

/// Whether granting `path` (a program's install folder) would open far
/// more than an install: `/`, or a home folder (the runtime's, root's, or
/// any under `/home`).
fn too_broad_to_grant(path: &Path) -> bool {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    path.parent().is_none()
        || path == Path::new("/root")
        || path.parent() == Some(Path::new("/home"))
        || home.is_some_and(|home| path == home)
}

/// Whether `path` (canonical) lies in a system folder every call may read
/// already (an interpreter's prefix usually does: `/usr`), so that it needs
/// no rule of its own.
fn covered_by_base(path: &Path) -> bool {
    SYSTEM_READ_ONLY.iter().any(|base| path.starts_with(base))
}

/// The read-only paths every call of a zygote with `network` gets.
fn base_read_only(network: NetworkMode) -> Vec<PathBuf> {
    let mut read_only: Vec<PathBuf> = SYSTEM_READ_ONLY.iter().map(PathBuf::from).collect();
    read_only.extend(python_etc_dirs().iter().cloned());
    if network != NetworkMode::None {
        read_only.extend(NETWORK_READ_ONLY.iter().map(PathBuf::from));
    }
    read_only
}

/// Device files every call may read.
const READ_ONLY_DEVICES: &[&str] = &["/dev/urandom", "/dev/random", "/dev/zero"];

/// Device files every call may write.
const READ_WRITE_DEVICES: &[&str] = &["/dev/null"];

/// Debian keeps Python's `sitecustomize` under `/etc/python3.*`.
fn python_etc_dirs() -> &'static [PathBuf] {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DIRS.get_or_init(|| {
        std::fs::read_dir("/etc")
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_name().as_bytes().starts_with(b"python3"))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Who sandboxed code runs as, in both sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SandboxIdentity {
    /// The uid (never 0).
    pub uid: u32,
    /// The gid (never 0).
    pub gid: u32,
    /// The workspace is root's, and the sandbox sees it through an
    /// idmapped mount that makes root's files its own (see [`share`]).
    pub shares_root_workspace: bool,
}

/// Who sandboxed code runs as (`workspace` is canonical). Never root: a
/// root runtime uses the workspace owner, or for a root-owned workspace the
/// dedicated sandbox uid, which then sees it through an idmapped mount (see
/// [`share`]; a system folder or root's home is refused). Blocking (a
/// `stat`).
pub(crate) fn sandbox_identity(workspace: &Path) -> std::io::Result<SandboxIdentity> {
    let euid = nix::unistd::geteuid().as_raw();
    let id = sandbox_id();
    if euid != 0 {
        let egid = nix::unistd::getegid().as_raw();
        return Ok(SandboxIdentity {
            uid: euid,
            gid: if egid == 0 { id } else { egid },
            shares_root_workspace: false,
        });
    }
    let meta = std::fs::metadata(workspace)?;
    if meta.uid() != 0 {
        return Ok(SandboxIdentity {
            uid: meta.uid(),
            gid: if meta.gid() == 0 { id } else { meta.gid() },
            shares_root_workspace: false,
        });
    }
    share::refuse_unsafe_root(workspace)?;
    Ok(SandboxIdentity {
        uid: id,
        gid: id,
        shares_root_workspace: true,
    })
}

#[cfg(test)]
mod tests {
    /// The configuration folder holds the key that encrypts stored data:
    /// sandboxed code in a home-folder workspace must not read it.
    #[test]
    fn the_config_folder_with_the_key_is_hidden_and_the_cache_read_only() {
        let folders = super::runtime_state_folders();
        let config = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|d| !d.is_empty())
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".config"))
            })
            .expect("HOME or XDG_CONFIG_HOME")
            .join("stack-runtime");
        assert!(
            folders.contains(&(config, super::ProtectedMode::Hidden)),
            "{folders:?}"
        );
        assert!(folders
            .iter()
            .any(|(p, m)| p.ends_with(".cache/stack-runtime")
                && *m == super::ProtectedMode::ReadOnly
                || std::env::var_os("XDG_CACHE_HOME").is_some()));
        // The executable's own folder, where llama.cpp's libraries may lie.
        let beside = std::env::current_exe()
            .expect("current_exe")
            .parent()
            .expect("a folder")
            .to_path_buf();
        assert!(
            folders.contains(&(beside, super::ProtectedMode::ReadOnly)),
            "{folders:?}"
        );
    }

    #[test]
    fn an_install_folder_that_is_root_or_a_home_is_never_granted() {
        use super::too_broad_to_grant;
        use std::path::Path;
        for broad in ["/", "/root", "/home/alice"] {
            assert!(too_broad_to_grant(Path::new(broad)), "{broad}");
        }
        if let Some(home) = std::env::var_os("HOME") {
            assert!(too_broad_to_grant(Path::new(&home)));
        }
        for install in ["/opt/venv", "/home/alice/venvs/mcp", "/usr/local/lib/node"] {
            assert!(!too_broad_to_grant(Path::new(install)), "{install}");
        }
    }

    use super::*;

    fn signalled(signal: i32) -> Option<std::process::ExitStatus> {
        Some(std::process::ExitStatus::from_raw(signal))
    }

    fn exited(code: i32) -> Option<std::process::ExitStatus> {
        Some(std::process::ExitStatus::from_raw(code << 8))
    }

    /// (case, status, cpu_ms, timed_out, oom) → (status, limit)
    #[test]
    fn endings_are_classified_by_what_caused_them() {
        let limits = ResourceLimits::default();
        let cpu_limit_ms = limits.cpu_seconds * 1000;
        type Case = (
            &'static str,
            Option<std::process::ExitStatus>,
            Option<u64>,
            bool,
            bool,
            ExecStatus,
            Option<&'static str>,
        );
        let cases: &[Case] = &[
            (
                "clean exit",
                exited(0),
                Some(5),
                false,
                false,
                ExecStatus::Ok,
                None,
            ),
            (
                "failing exit",
                exited(3),
                Some(5),
                false,
                false,
                ExecStatus::Failed,
                None,
            ),
            (
                "exit after an OOM kill",
                exited(137),
                Some(5),
                false,
                true,
                ExecStatus::Killed,
                Some("memory"),
            ),
            (
                "wall clock",
                None,
                None,
                true,
                false,
                ExecStatus::Timeout,
                Some("wall_time"),
            ),
            (
                "SIGXCPU",
                signalled(libc::SIGXCPU),
                Some(cpu_limit_ms),
                false,
                false,
                ExecStatus::Killed,
                Some("cpu"),
            ),
            (
                "SIGXFSZ",
                signalled(libc::SIGXFSZ),
                Some(5),
                false,
                false,
                ExecStatus::Killed,
                Some("file_size"),
            ),
            (
                "SIGKILL by the memory controller",
                signalled(libc::SIGKILL),
                Some(5),
                false,
                true,
                ExecStatus::Killed,
                Some("memory"),
            ),
            (
                "SIGKILL at the CPU hard limit",
                signalled(libc::SIGKILL),
                Some(cpu_limit_ms + 1000),
                false,
                false,
                ExecStatus::Killed,
                Some("cpu"),
            ),
            (
                "SIGKILL from the code itself",
                signalled(libc::SIGKILL),
                Some(3),
                false,
                false,
                ExecStatus::Failed,
                None,
            ),
            (
                "SIGSEGV",
                signalled(libc::SIGSEGV),
                Some(3),
                false,
                false,
                ExecStatus::Failed,
                None,
            ),
            ("lost", None, None, false, false, ExecStatus::Error, None),
        ];
        for (case, status, cpu_ms, timed_out, oom, want_status, want_limit) in cases {
            let mut outcome = Execution::from_output(b"", b"", false);
            outcome.exit_code = None;
            classify(&mut outcome, *status, *cpu_ms, *timed_out, *oom, &limits);
            assert_eq!(outcome.status, *want_status, "{case}: {outcome:?}");
            assert_eq!(
                outcome.limit.map(stack_types::Limit::as_str),
                *want_limit,
                "{case}: {outcome:?}"
            );
        }
    }
}
