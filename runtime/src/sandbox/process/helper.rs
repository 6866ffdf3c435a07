//! The sandbox helper: runs in the fresh `stack-sandbox-exec` process,
//! restricts itself, then executes the target.
//!
//! Order matters, and each step fails closed (the helper reports the failure
//! on [`STATUS_FD`] and exits 125 without running the target):
//!
//! 1. `setsid`: a new session and process group.
//! 2. Join the call's cgroups while still privileged.
//! 3. If root: drop to the unprivileged uid/gid from the spec (all
//!    capabilities go with it) and check that no id is 0 any more.
//! 4. `unshare` user, PID, IPC, UTS and (unless the network is `full`)
//!    network namespaces; map only our own uid/gid; bring `lo` up for
//!    `loopback`.
//! 5. `fork` twice: a minimal init becomes PID 1 of the new PID namespace
//!    and the target PID 2. When the target exits the init exits too, and
//!    the kernel kills every process left in the namespace; the init also
//!    dies with the outer process (`PR_SET_PDEATHSIG`). The outer process
//!    only waits and exits exactly as the target did.
//! 6. rlimits; `chdir` to the workspace.
//! 7. landlock (filesystem, TCP, signal and abstract-socket scopes), which
//!    also sets `no_new_privs`; the capability bounding set is emptied;
//!    signal dispositions are reset to their defaults.
//! 8. seccomp filters; every fd above 2 is marked close-on-exec.
//! 9. `execve` with the prepared environment.

use std::convert::Infallible;
use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use landlock::{
    path_beneath_rules, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use nix::libc;
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::unistd::{
    fork, getgid, getpid, getuid, setgroups, setresgid, setresuid, setsid, ForkResult, Gid, Uid,
};

use super::probe::landlock_abi;
use super::seccomp;
use super::spec::{HelperSpec, NetworkMode, SPEC_ENV, STATUS_FD};

/// Exit code of the helper when the sandbox could not be set up.
pub(crate) const SETUP_FAILED_EXIT: i32 = 125;

/// Entry point of the `stack-sandbox-exec` binary. Never returns.
pub fn helper_main() -> ! {
    let error = match run() {
        Ok(never) => match never {},
        Err(message) => message,
    };
    report_and_exit(&error)
}

fn report_and_exit(message: &str) -> ! {
    // SAFETY: STATUS_FD was set up by the runtime for this purpose; if it is
    // not open the write fails harmlessly.
    let status = unsafe { OwnedFd::from_raw_fd(STATUS_FD) };
    let _ = nix::unistd::write(&status, message.as_bytes());
    drop(status);
    std::process::exit(SETUP_FAILED_EXIT)
}

fn run() -> Result<Infallible, String> {
    let raw = std::env::var(SPEC_ENV)
        .map_err(|_| format!("{SPEC_ENV} is not set; this program is started by stack-runtime"))?;
    let spec: HelperSpec =
        serde_json::from_str(&raw).map_err(|err| format!("bad sandbox spec: {err}"))?;

    setsid().map_err(|e| format!("setsid: {e}"))?;
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, getpid().to_string())
            .map_err(|e| format!("joining cgroup {}: {e}", procs.display()))?;
    }
    drop_identity(&spec)?;
    enter_namespaces(&spec)?;
    become_pid_one()?;
    apply_rlimits(&spec)?;
    std::env::set_current_dir(&spec.cwd)
        .map_err(|e| format!("chdir {}: {e}", spec.cwd.display()))?;
    let argv = cstrings(&spec.argv)?;
    let env = cstrings(
        &spec
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>(),
    )?;
    apply_landlock(&spec)?;
    drop_bounding_set();
    reset_signals();
    mark_fds_cloexec();
    seccomp::install(spec.network).map_err(|e| format!("seccomp: {e}"))?;
    let program = argv.first().ok_or("empty argv")?;
    let err = nix::unistd::execve(program, &argv, &env).err();
    Err(format!(
        "cannot execute {}: {}",
        spec.argv[0],
        err.map_or("unknown error".into(), |e| e.desc().to_string())
    ))
}

fn cstrings(items: &[String]) -> Result<Vec<CString>, String> {
    items
        .iter()
        .map(|s| CString::new(s.as_bytes()).map_err(|_| format!("NUL byte in {s:?}")))
        .collect()
}

fn drop_identity(spec: &HelperSpec) -> Result<(), String> {
    if spec.uid == 0 || spec.gid == 0 {
        return Err("refusing to run sandboxed code as uid or gid 0".into());
    }
    if getuid().is_root() || nix::unistd::geteuid().is_root() {
        let gid = Gid::from_raw(spec.gid);
        let uid = Uid::from_raw(spec.uid);
        setgroups(&[gid]).map_err(|e| format!("setgroups: {e}"))?;
        setresgid(gid, gid, gid).map_err(|e| format!("setresgid: {e}"))?;
        setresuid(uid, uid, uid).map_err(|e| format!("setresuid: {e}"))?;
        // Changing credentials cleared the dumpable flag, which leaves
        // /proc/self owned by root; the namespace setup must write there.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
    }
    let uids = nix::unistd::getresuid().map_err(|e| e.to_string())?;
    let gids = nix::unistd::getresgid().map_err(|e| e.to_string())?;
    let any_root_uid = [uids.real, uids.effective, uids.saved]
        .iter()
        .any(|u| u.is_root());
    let any_root_gid = [gids.real, gids.effective, gids.saved]
        .iter()
        .any(|g| g.as_raw() == 0);
    if any_root_uid || any_root_gid {
        return Err("could not leave root: an id is still 0".into());
    }
    Ok(())
}

fn enter_namespaces(spec: &HelperSpec) -> Result<(), String> {
    let (uid, gid) = (getuid(), getgid());
    let mut flags = CloneFlags::CLONE_NEWUSER
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    if spec.network != NetworkMode::Full {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(|e| {
        format!("cannot create user/PID/network namespaces ({e}); the kernel must allow unprivileged user namespaces (user.max_user_namespaces > 0)")
    })?;
    write_proc("/proc/self/setgroups", "deny")?;
    write_proc("/proc/self/uid_map", &format!("{uid} {uid} 1"))?;
    write_proc("/proc/self/gid_map", &format!("{gid} {gid} 1"))?;
    if spec.network == NetworkMode::Loopback {
        loopback_up()?;
    }
    Ok(())
}

fn write_proc(path: &str, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("writing {path}: {e}"))
}

fn loopback_up() -> Result<(), String> {
    // SAFETY: plain socket/ioctl calls on a zeroed, correctly sized ifreq.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let sock = OwnedFd::from_raw_fd(sock);
        let mut request: libc::ifreq = std::mem::zeroed();
        for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        use std::os::fd::AsRawFd;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(format!(
                "reading lo flags: {}",
                std::io::Error::last_os_error()
            ));
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(format!(
                "bringing lo up: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Splits into three processes: the outer helper (in the runtime's PID
/// namespace), a minimal init (PID 1 of the new namespace, which reaps
/// orphans) and the target (PID 2), which returns from here to exec.
///
/// The target is not PID 1 on purpose: the kernel drops default-action
/// signals sent to an init, which would make SIGXFSZ, SIGXCPU or a plain
/// `kill` behave differently inside the sandbox.
fn become_pid_one() -> Result<(), String> {
    let (status_read, status_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: this process is single-threaded (a fresh helper), so fork is safe.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Parent { child } => {
            drop(status_write);
            mirror_init(child, status_read)
        }
        ForkResult::Child => {
            drop(status_read);
            // (Should the outer process die before this prctl, the call's
            // cgroup is still killed by the runtime.)
            // SAFETY: prctl with constant arguments.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
            // SAFETY: still single-threaded.
            match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
                ForkResult::Parent { child } => run_init(child, status_write),
                ForkResult::Child => {
                    drop(status_write);
                    Ok(())
                }
            }
        }
    }
}

/// PID 1: reap every child; when the target exits, pass its raw wait status
/// to the outer helper and exit, which makes the kernel kill whatever is
/// left in the namespace.
fn run_init(target: nix::unistd::Pid, status_write: OwnedFd) -> ! {
    use std::os::fd::AsRawFd;
    let keep = status_write.as_raw_fd();
    // SAFETY: closing our own fds, all but the status pipe.
    unsafe {
        libc::syscall(libc::SYS_close_range, 0u32, (keep - 1).max(0) as u32, 0u32);
        libc::syscall(libc::SYS_close_range, (keep + 1) as u32, u32::MAX, 0u32);
    }
    if keep == 0 {
        // close_range(0, 0) above closed the pipe itself; nothing to report to.
        std::process::exit(SETUP_FAILED_EXIT);
    }
    loop {
        let mut raw: libc::c_int = 0;
        // SAFETY: waitpid on any child with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut raw, 0) };
        if pid == target.as_raw() {
            let _ = nix::unistd::write(&status_write, &raw.to_ne_bytes());
            std::process::exit(0);
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            std::process::exit(SETUP_FAILED_EXIT);
        }
    }
}

/// The namespace's init, for the outer helper's signal handler.
static INIT_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn kill_init(_: libc::c_int) {
    let pid = INIT_PID.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The outer helper: holds nothing open but the status pipe, waits for the
/// init, and exits exactly as the target did.
///
/// The runtime stops a call by sending this process SIGTERM: it kills the
/// init (the kernel then kills the rest of the namespace) and still reaps
/// it, so nothing is left behind as an orphaned zombie.
fn mirror_init(init: nix::unistd::Pid, status_read: OwnedFd) -> ! {
    use std::os::fd::AsRawFd;
    INIT_PID.store(init.as_raw(), std::sync::atomic::Ordering::SeqCst);
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only calls kill(2) on a stored pid.
        let _ = unsafe { signal(sig, SigHandler::Handler(kill_init)) };
    }
    let keep = status_read.as_raw_fd();
    // SAFETY: closing our own fds, all but the status pipe.
    unsafe {
        if keep > 0 {
            libc::syscall(libc::SYS_close_range, 0u32, (keep - 1) as u32, 0u32);
        }
        libc::syscall(libc::SYS_close_range, (keep + 1) as u32, u32::MAX, 0u32);
    }
    let init_status = loop {
        let mut raw: libc::c_int = 0;
        // SAFETY: waitpid on our child with a valid status pointer.
        let pid = unsafe { libc::waitpid(init.as_raw(), &mut raw, 0) };
        if pid == init.as_raw() {
            break raw;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            std::process::exit(SETUP_FAILED_EXIT);
        }
    };
    let mut bytes = [0u8; 4];
    let target_status = match nix::unistd::read(&status_read, &mut bytes) {
        Ok(4) => i32::from_ne_bytes(bytes),
        _ => init_status,
    };
    if libc::WIFSIGNALED(target_status) {
        let sig = libc::WTERMSIG(target_status);
        // SAFETY: restoring the default disposition, then dying of the same signal.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::kill(libc::getpid(), sig);
        }
        std::process::exit(128 + sig);
    }
    std::process::exit(if libc::WIFEXITED(target_status) {
        libc::WEXITSTATUS(target_status)
    } else {
        SETUP_FAILED_EXIT
    })
}

fn apply_rlimits(spec: &HelperSpec) -> Result<(), String> {
    let l = &spec.limits;
    let limits = [
        (Resource::RLIMIT_CPU, l.cpu_seconds, l.cpu_seconds + 1),
        (
            Resource::RLIMIT_AS,
            l.address_space_bytes,
            l.address_space_bytes,
        ),
        (Resource::RLIMIT_NPROC, l.processes, l.processes),
        (Resource::RLIMIT_FSIZE, l.file_size_bytes, l.file_size_bytes),
        (Resource::RLIMIT_NOFILE, l.open_files, l.open_files),
        (Resource::RLIMIT_CORE, 0, 0),
    ];
    for (resource, soft, hard) in limits {
        setrlimit(resource, soft, hard).map_err(|e| format!("setrlimit {resource:?}: {e}"))?;
    }
    Ok(())
}

fn abi_from(version: i32) -> ABI {
    match version {
        i32::MIN..=1 => ABI::V1,
        2 => ABI::V2,
        3 => ABI::V3,
        4 => ABI::V4,
        5 => ABI::V5,
        6 => ABI::V6,
        _ => ABI::V7,
    }
}

fn apply_landlock(spec: &HelperSpec) -> Result<(), String> {
    let version = landlock_abi().ok_or("landlock is not available in this kernel (needs Linux 5.13+ with landlock in the LSM list)")?;
    if version < spec.min_landlock_abi {
        return Err(format!(
            "landlock ABI {version} is older than the ABI {} this policy needs",
            spec.min_landlock_abi
        ));
    }
    let abi = abi_from(version);
    let err = |e: landlock::RulesetError| format!("landlock: {e}");
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?;
    if version >= 4 && spec.network == NetworkMode::None {
        ruleset = ruleset
            .handle_access(AccessNet::from_all(abi))
            .map_err(err)?;
    }
    if version >= 6 {
        ruleset = ruleset.scope(Scope::from_all(abi)).map_err(err)?;
    }
    let existing = |paths: &[PathBuf]| {
        paths
            .iter()
            .filter(|p| p.exists())
            .cloned()
            .collect::<Vec<_>>()
    };
    let status = ruleset
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(
            existing(&spec.read_only),
            AccessFs::from_read(abi),
        ))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            existing(&spec.read_only_files),
            AccessFs::from_read(abi),
        ))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            existing(&spec.read_write),
            AccessFs::from_all(abi),
        ))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            existing(&spec.read_write_files),
            AccessFs::from_read(abi) | AccessFs::WriteFile,
        ))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    if status.ruleset != RulesetStatus::FullyEnforced || !status.no_new_privs {
        return Err(format!("landlock was only partly enforced ({status:?})"));
    }
    Ok(())
}

/// The target starts with default signal dispositions and nothing blocked,
/// whatever the runtime had (ignored SIGPIPE or SIGXFSZ would otherwise be
/// inherited across exec).
fn reset_signals() {
    for sig in Signal::iterator() {
        if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
            // SAFETY: restoring default dispositions before exec.
            let _ = unsafe { signal(sig, SigHandler::SigDfl) };
        }
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
}

fn drop_bounding_set() {
    for cap in 0..=63 {
        // SAFETY: prctl with integer arguments; EINVAL past the last cap is expected.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
}

fn mark_fds_cloexec() {
    const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
    // SAFETY: marks our own fds close-on-exec; nothing is closed now.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) };
}
