//! The process sandbox: untrusted code in a subprocess under landlock,
//! seccomp, namespaces, rlimits and a cgroup.
//!
//! # Threat model
//!
//! The code is hostile and knows it is sandboxed. It runs with the session's
//! workspace as its only writable place and tries to: read secrets elsewhere
//! (home folders, `/root`, `/etc/shadow`, the runtime's environment, other
//! workspaces, `/proc/<ppid>/…`), write outside the workspace, reach the
//! network, exhaust memory, processes, CPU, disk or the output pipes, outlive
//! its call (double fork, `setsid`), attack the runtime (signals, `ptrace`,
//! abstract sockets), or gain privilege (setuid binaries, capabilities,
//! namespaces, kernel interfaces). The runtime itself is trusted and may run
//! as root; the kernel is trusted.
//!
//! Each rule below has at least one attack test in `tests/process_escape.rs`:
//!
//! 1. **Filesystem** — landlock: read-only system dirs, the interpreter's
//!    prefix, a few named `/etc` files and device nodes; read-write only the
//!    workspace and a private tmp dir. Everything else, reads included, is
//!    denied; `/proc` is not reachable at all. Landlock checks the resolved
//!    file, so a symlink in the workspace grants nothing.
//! 2. **Network** — `none` (default): an empty network namespace, landlock
//!    denies TCP bind/connect, seccomp allows only `AF_UNIX` sockets.
//!    `loopback`: a private namespace with only `lo`. `full`: the host's.
//! 3. **Scope** — landlock ABI 6 scoping: no signals to, and no abstract
//!    Unix sockets of, processes outside the sandbox.
//! 4. **Syscalls** — a seccomp denylist (see [`seccomp`]); `no_new_privs`.
//! 5. **Identity** — never root: a root runtime drops the child to the
//!    workspace owner (or `nobody`) before anything else; the child then
//!    lives in its own user namespace, mapping only that uid, and `execve`
//!    leaves it with zero capabilities and an empty bounding set.
//! 6. **Lifetime** — a PID namespace whose PID 1 is the target: when it
//!    exits or the runtime kills the call, every descendant dies, detached
//!    ones included. The call's cgroup and process group are killed too.
//! 7. **Environment** — built from a fixed allowlist; nothing of the
//!    runtime's environment passes. stdin is `/dev/null` (or the tool's
//!    JSON arguments for command tools).
//! 8. **Limits** — rlimits (CPU, address space, processes, file size, open
//!    files, no core dumps), a memory and pids cgroup where writable, a
//!    wall-clock timeout, and stdout/stderr capped in memory while still
//!    drained so the child never blocks.
//! 9. **Fail closed** — if the kernel lacks landlock (at the ABI the policy
//!    needs), user namespaces or seccomp, the call is refused with a message
//!    naming what is missing; it never runs weaker.

mod capture;
mod cgroup;
mod helper;
mod probe;
mod seccomp;
mod spec;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::libc;
use tokio::io::AsyncWriteExt;

pub use cgroup::CgroupLayout;
pub use helper::helper_main;
pub use probe::{Guarantee, KernelProbe};
pub use spec::{NetworkMode, ResourceLimits};

use crate::outcome::{Status, ToolOutcome};
use crate::tools::Language;
use cgroup::CallCgroup;
use spec::{HelperSpec, SPEC_ENV, STATUS_FD};

/// File name of the helper binary.
pub const HELPER_NAME: &str = "stack-sandbox-exec";

/// `PATH` inside the sandbox; programs named without a `/` are found here.
pub const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The uid/gid a root runtime uses when the workspace belongs to root.
const NOBODY: u32 = 65534;

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

/// Why a sandboxed call could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The helper binary is not where it was looked for.
    #[error("the sandbox helper `{HELPER_NAME}` was not found (looked in {0}); build it with the runtime or set STACK_RUNTIME_SANDBOX_HELPER")]
    HelperMissing(String),
    /// The kernel cannot give a guarantee the policy needs.
    #[error("sandbox refused: {0}")]
    KernelLacks(String),
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
/// no network, default limits, no extra paths, landlock ABI 6 required.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessPolicy {
    /// Network reach.
    pub network: NetworkMode,
    /// Resource limits.
    pub limits: ResourceLimits,
    /// Extra read-only paths.
    pub extra_read_only: Vec<PathBuf>,
    /// The landlock ABI needed at least; 6 gives signal and socket scoping.
    pub min_landlock_abi: i32,
}

impl Default for ProcessPolicy {
    fn default() -> Self {
        ProcessPolicy {
            network: NetworkMode::None,
            limits: ResourceLimits::default(),
            extra_read_only: Vec::new(),
            min_landlock_abi: 6,
        }
    }
}

/// Runs programs in the process sandbox.
#[derive(Debug, Clone)]
pub struct ProcessSandbox {
    helper: PathBuf,
}

impl ProcessSandbox {
    /// Uses the helper at `helper`.
    pub fn with_helper(helper: impl Into<PathBuf>) -> Self {
        ProcessSandbox {
            helper: helper.into(),
        }
    }

    /// Finds the helper: `$STACK_RUNTIME_SANDBOX_HELPER`, else next to the
    /// running executable (or one folder up, for test binaries).
    pub fn locate() -> Result<Self, SandboxError> {
        if let Some(path) = std::env::var_os("STACK_RUNTIME_SANDBOX_HELPER") {
            let path = PathBuf::from(path);
            return if path.is_file() {
                Ok(Self::with_helper(path))
            } else {
                Err(SandboxError::HelperMissing(path.display().to_string()))
            };
        }
        let exe =
            std::env::current_exe().map_err(|e| SandboxError::HelperMissing(e.to_string()))?;
        let dir = exe.parent().unwrap_or(Path::new("/"));
        let candidates = [dir.join(HELPER_NAME), dir.join("..").join(HELPER_NAME)];
        candidates
            .iter()
            .find(|c| c.is_file())
            .map(|c| Self::with_helper(c.clone()))
            .ok_or_else(|| SandboxError::HelperMissing(dir.display().to_string()))
    }

    /// Runs `code` in `language` (python or bash) with `workspace` as the
    /// working directory.
    pub async fn run_code(
        &self,
        language: Language,
        code: &str,
        workspace: &Path,
        policy: &ProcessPolicy,
    ) -> ToolOutcome {
        let (program, file) = match language {
            Language::Python => ("python3", "main.py"),
            Language::Bash => ("bash", "main.sh"),
            Language::Javascript => {
                return ToolOutcome::internal_error(
                    "javascript runs in the WASI sandbox, not the process sandbox",
                )
            }
        };
        let request = Request {
            argv: vec![program.to_string()],
            code: Some((file, code.as_bytes().to_vec())),
            stdin: None,
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
    ) -> ToolOutcome {
        let request = Request {
            argv: argv.to_vec(),
            code: None,
            stdin,
        };
        self.run_request(request, workspace, policy).await
    }

    async fn run_request(
        &self,
        request: Request,
        workspace: &Path,
        policy: &ProcessPolicy,
    ) -> ToolOutcome {
        let started = std::time::Instant::now();
        let mut outcome = match self.run_inner(request, workspace, policy).await {
            Ok(outcome) => outcome,
            Err(err @ SandboxError::ProgramNotFound(_)) => ToolOutcome::failed(err.to_string()),
            Err(err) => ToolOutcome::internal_error(err.to_string()),
        };
        outcome.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        outcome
    }

    async fn run_inner(
        &self,
        request: Request,
        workspace: &Path,
        policy: &ProcessPolicy,
    ) -> Result<ToolOutcome, SandboxError> {
        let probe = KernelProbe::get();
        if let Some(missing) = probe.missing_requirements(policy.min_landlock_abi) {
            return Err(SandboxError::KernelLacks(missing));
        }
        if !self.helper.is_file() {
            return Err(SandboxError::HelperMissing(
                self.helper.display().to_string(),
            ));
        }
        let prepare = |e: std::io::Error| SandboxError::Prepare(e.to_string());
        let workspace = std::fs::canonicalize(workspace).map_err(prepare)?;
        let (uid, gid) = sandbox_identity(&workspace).map_err(prepare)?;
        let private = PrivateTmp::create(uid, gid).map_err(prepare)?;

        let mut argv = request.argv;
        let program = resolve_program(&argv[0])?;
        argv[0] = program.display().to_string();
        if let Some((name, code)) = &request.code {
            let path = private.path.join(name);
            std::fs::write(&path, code).map_err(prepare)?;
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).map_err(prepare)?;
            argv.push(path.display().to_string());
        }

        let mut read_only: Vec<PathBuf> = SYSTEM_READ_ONLY.iter().map(PathBuf::from).collect();
        read_only.extend(python_etc_dirs());
        if policy.network != NetworkMode::None {
            read_only.extend(NETWORK_READ_ONLY.iter().map(PathBuf::from));
        }
        read_only.extend(probe::prefix_of(&program));
        read_only.extend(policy.extra_read_only.iter().cloned());

        let cgroup = match &probe.cgroup {
            Some(layout) => match CallCgroup::create(
                layout,
                policy.limits.memory_bytes,
                policy.limits.processes,
            ) {
                Ok(group) => Some(group),
                Err(err) => {
                    tracing::warn!(%err, "no cgroup for this call; rlimits still apply");
                    None
                }
            },
            None => None,
        };
        let home = private.path.display().to_string();
        let spec = HelperSpec {
            argv,
            env: vec![
                ("PATH".into(), SANDBOX_PATH.into()),
                ("HOME".into(), home.clone()),
                ("TMPDIR".into(), home),
                ("LANG".into(), "C.UTF-8".into()),
                ("LC_ALL".into(), "C.UTF-8".into()),
                ("TERM".into(), "dumb".into()),
                ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
                ("PYTHONIOENCODING".into(), "utf-8".into()),
            ],
            cwd: workspace.clone(),
            read_write: vec![workspace.clone(), private.path.clone()],
            read_only,
            read_only_files: ["/dev/urandom", "/dev/random", "/dev/zero"]
                .iter()
                .map(PathBuf::from)
                .collect(),
            read_write_files: vec![PathBuf::from("/dev/null")],
            network: policy.network,
            limits: policy.limits,
            uid,
            gid,
            cgroup_procs: cgroup
                .as_ref()
                .map(CallCgroup::procs_files)
                .unwrap_or_default(),
            min_landlock_abi: policy.min_landlock_abi,
        };
        let result = self
            .spawn_and_wait(&spec, request.stdin, cgroup.as_ref())
            .await;
        drop(cgroup);
        drop(private);
        result
    }

    async fn spawn_and_wait(
        &self,
        spec: &HelperSpec,
        stdin: Option<Vec<u8>>,
        cgroup: Option<&CallCgroup>,
    ) -> Result<ToolOutcome, SandboxError> {
        let spec_json =
            serde_json::to_string(spec).map_err(|e| SandboxError::Prepare(e.to_string()))?;
        let (status_read, status_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| SandboxError::Prepare(format!("pipe: {e}")))?;
        let mut command = tokio::process::Command::new(&self.helper);
        command
            .env_clear()
            .env(SPEC_ENV, spec_json)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let status_raw = status_write.as_raw_fd();
        // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if status_raw == STATUS_FD {
                    if libc::fcntl(STATUS_FD, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(status_raw, STATUS_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            SandboxError::Prepare(format!("starting {}: {e}", self.helper.display()))
        })?;
        drop(status_write);
        let pid = child.id().map(|p| p as i32);

        let cap = spec.limits.output_bytes;
        let stdout = child
            .stdout
            .take()
            .map(|s| tokio::spawn(capture::read_capped(s, cap)));
        let stderr = child
            .stderr
            .take()
            .map(|s| tokio::spawn(capture::read_capped(s, cap)));
        let status_task = tokio::task::spawn_blocking(move || read_all(status_read));
        if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
            tokio::spawn(async move {
                // The child may exit without reading; a broken pipe is fine.
                let _ = pipe.write_all(&bytes).await;
            });
        }

        let wall = Duration::from_millis(spec.limits.wall_ms);
        let (status, timed_out) = match tokio::time::timeout(wall, child.wait()).await {
            Ok(status) => (status.ok(), false),
            Err(_) => (stop(&mut child, pid, cgroup).await, true),
        };
        // Whatever is left in the cgroup (it should be nothing: the PID
        // namespace died with its PID 1).
        if let Some(group) = cgroup {
            group.kill_all();
        }
        let oom = cgroup.is_some_and(CallCgroup::oom_killed);

        let setup_error = status_task.await.unwrap_or_default();
        let drain = Duration::from_secs(2);
        let (stdout, out_cut) = join_capture(stdout, drain).await;
        let (stderr, err_cut) = join_capture(stderr, drain).await;
        if !setup_error.is_empty() {
            return Err(SandboxError::Setup(
                String::from_utf8_lossy(&setup_error).into_owned(),
            ));
        }
        let mut outcome = ToolOutcome::from_output(&stdout, &stderr, out_cut || err_cut);
        outcome.exit_code = None;
        classify(&mut outcome, status, timed_out, oom, &spec.limits);
        Ok(outcome)
    }

    /// The helper binary in use.
    pub fn helper(&self) -> &Path {
        &self.helper
    }
}

struct Request {
    argv: Vec<String>,
    code: Option<(&'static str, Vec<u8>)>,
    stdin: Option<Vec<u8>>,
}

fn classify(
    outcome: &mut ToolOutcome,
    status: Option<std::process::ExitStatus>,
    timed_out: bool,
    oom: bool,
    limits: &ResourceLimits,
) {
    let limit_hit = |outcome: &mut ToolOutcome, limit: &str, message: String| {
        outcome.status = Status::Killed;
        outcome.limit = Some(limit.to_string());
        outcome.error = Some(message);
    };
    if timed_out {
        outcome.status = Status::Timeout;
        outcome.limit = Some("wall_time".into());
        outcome.error = Some(format!(
            "timed out after {} ms; the whole process tree was killed",
            limits.wall_ms
        ));
        return;
    }
    let Some(status) = status else {
        outcome.status = Status::Error;
        outcome.error = Some("lost track of the sandboxed process".into());
        return;
    };
    if let Some(code) = status.code() {
        outcome.exit_code = Some(code);
        if code == 0 {
            outcome.status = Status::Ok;
        } else if oom {
            limit_hit(
                outcome,
                "memory",
                format!(
                    "a process ran out of its {} MiB memory limit and was killed; exit code {code}",
                    limits.memory_bytes >> 20
                ),
            );
        } else {
            outcome.status = Status::Failed;
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
            "cpu",
            format!(
                "killed by {name}: CPU time limit of {} s reached",
                limits.cpu_seconds
            ),
        ),
        libc::SIGXFSZ => limit_hit(
            outcome,
            "file_size",
            format!(
                "killed by {name}: file size limit of {} MiB reached",
                limits.file_size_bytes >> 20
            ),
        ),
        libc::SIGKILL if oom => limit_hit(
            outcome,
            "memory",
            format!(
                "killed by {name}: memory limit of {} MiB reached",
                limits.memory_bytes >> 20
            ),
        ),
        libc::SIGKILL => limit_hit(
            outcome,
            "cpu",
            format!(
                "killed by {name}: CPU time hard limit of {} s reached",
                limits.cpu_seconds + 1
            ),
        ),
        _ => {
            outcome.status = Status::Failed;
            outcome.error = Some(format!("terminated by {name}"));
        }
    }
}

/// Stops a running call: SIGTERM asks the outer helper to kill PID 1 of the
/// namespace (and with it every descendant) and reap it; if the helper does
/// not exit within a second, the process group, the cgroup and the helper
/// are killed outright.
async fn stop(
    child: &mut tokio::process::Child,
    pid: Option<i32>,
    cgroup: Option<&CallCgroup>,
) -> Option<std::process::ExitStatus> {
    use nix::sys::signal::{kill, killpg, Signal};
    if let Some(pid) = pid {
        let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM);
    }
    if let Ok(status) = tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
        return status.ok();
    }
    if let Some(pid) = pid {
        // The helper called setsid, so its pid is the process group id, and
        // it is not reaped yet, so the id cannot have been reused.
        let _ = killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
    if let Some(group) = cgroup {
        group.kill_all();
    }
    let _ = child.start_kill();
    child.wait().await.ok()
}

async fn join_capture(
    task: Option<tokio::task::JoinHandle<(Vec<u8>, bool)>>,
    limit: Duration,
) -> (Vec<u8>, bool) {
    let Some(task) = task else {
        return (Vec::new(), false);
    };
    let abort = task.abort_handle();
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(result)) => result,
        _ => {
            abort.abort();
            (Vec::new(), true)
        }
    }
}

fn read_all(fd: OwnedFd) -> Vec<u8> {
    use std::io::Read;
    let mut bytes = Vec::new();
    let _ = std::fs::File::from(fd)
        .take(64 * 1024)
        .read_to_end(&mut bytes);
    bytes
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

/// Debian keeps Python's `sitecustomize` under `/etc/python3.*`.
fn python_etc_dirs() -> Vec<PathBuf> {
    std::fs::read_dir("/etc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().as_bytes().starts_with(b"python3"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// The uid/gid sandboxed code runs as. Never 0: a root runtime uses the
/// workspace owner, or hands a root-owned workspace to `nobody`.
fn sandbox_identity(workspace: &Path) -> std::io::Result<(u32, u32)> {
    let euid = nix::unistd::geteuid().as_raw();
    if euid != 0 {
        let egid = nix::unistd::getegid().as_raw();
        return Ok((euid, if egid == 0 { NOBODY } else { egid }));
    }
    let meta = std::fs::metadata(workspace)?;
    if meta.uid() != 0 {
        return Ok((
            meta.uid(),
            if meta.gid() == 0 { NOBODY } else { meta.gid() },
        ));
    }
    tracing::info!(workspace = %workspace.display(), "handing the root-owned workspace to uid {NOBODY} so sandboxed code can write it without root");
    hand_over(workspace, NOBODY, NOBODY)?;
    Ok((NOBODY, NOBODY))
}

fn hand_over(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(dir)?.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                hand_over(&entry.path(), uid, gid)?;
            } else {
                std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid))?;
            }
        }
    }
    Ok(())
}

/// A private tmp folder for one call, removed afterwards.
struct PrivateTmp {
    path: PathBuf,
}

impl PrivateTmp {
    fn create(uid: u32, gid: u32) -> std::io::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir().join(format!("stack-runtime-{}", nix::unistd::geteuid()));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&base)?;
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o711))?;
        let path = base.join(format!(
            "call-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
        Ok(PrivateTmp { path })
    }
}

impl Drop for PrivateTmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
