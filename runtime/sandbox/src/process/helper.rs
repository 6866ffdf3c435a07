//! The sandbox helper, `stack-sandbox-exec`: started once per workspace and
//! policy as a *zygote* that confines itself, then forks a fresh, already
//! isolated process for every call (see [`super::zygote`]).
//!
//! Order matters, and each step fails closed (the helper reports the failure
//! on the control socket and exits 125 without running anything):
//!
//! Once, in the zygote:
//! 1. `setsid`: a new session and process group.
//! 2. Join the zygote's cgroups while still privileged; every call forked
//!    from here on is born inside them.
//! 3. If root: for a root-owned workspace, clone it with root's ids mapped
//!    to the sandbox's (see [`super::share`]); then drop to the
//!    unprivileged uid/gid from the spec (all capabilities go with it) and
//!    check that no id is 0 any more.
//! 4. `unshare` user, mount, IPC, UTS and (unless the network is `full`)
//!    network namespaces; map only our own uid/gid; bring `lo` up for
//!    `loopback`; build the private root (see [`super::mounts`]) and move
//!    into it; become non-dumpable, so that no host process of the same uid
//!    can ptrace the zygote or take its descriptors (`pidfd_getfd`).
//! 5. `no_new_privs`, an empty capability bounding set, default signal
//!    dispositions, the seccomp denylist (all but the namespace rules, which
//!    the zygote itself must break for every spare); open the system paths
//!    every call may read.
//!
//! Per call, in [`super::zygote`]: a new PID and IPC namespace whose PID 1
//! is a minimal init and whose PID 2 becomes the target. Before its call
//! arrives, the target (see [`prepare_target`]):
//! 6. installs the per-call seccomp filters (no `CLONE_NEW*`, `unshare`,
//!    `setns`; `clone3` looks unimplemented);
//! 7. creates its landlock ruleset (filesystem, TCP, signal and
//!    abstract-socket scopes) with the zygote's read-only rules and the
//!    read-write rules for the workspace and its private tmp dir.
//!
//! When the call arrives (see [`confine_and_exec`]):
//! 8. it takes its stdin, stdout and stderr from the request, and writes
//!    the call's code (a sealed memfd) into its private tmp dir; rlimits;
//!    `chdir` to the workspace;
//! 9. with a network allowlist ([`NetworkMode::Proxied`]), binds a
//!    listening socket on `127.0.0.1` in the zygote's network namespace,
//!    hands it to the runtime (whose egress proxy serves it), keeps no
//!    copy, and adds a landlock rule allowing TCP connects to that port
//!    only (binds and every other port stay refused); `HTTP_PROXY`,
//!    `HTTPS_PROXY` and `ALL_PROXY` name it;
//! 9. adds the call's read-only rules (interpreter prefix, policy extras)
//!    and enforces the ruleset; every fd above 2 is marked close-on-exec;
//!    the init is moved to this CPU, where it will report the exit;
//! 10. `execve` with the fixed environment (see `sandbox_environment`).

use std::convert::Infallible;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath, PathFd,
    Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use nix::libc;
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::unistd::{getgid, getpid, getuid, setgroups, setresgid, setresuid, setsid, Gid, Uid};

use super::packet;
use super::probe::landlock_abi;
use super::seccomp::Filters;
use super::spec::{
    CallReport, CallSpec, FromZygote, NetworkMode, ZygoteSpec, CONTROL_FD, ZYGOTE_ENV,
};
use super::zygote;

/// Exit code of the helper (or a call's target) when setting up failed.
pub(crate) const SETUP_FAILED_EXIT: i32 = 125;

/// The first argument that makes the helper try what the sandbox needs of
/// user namespaces and exit (see [`probe_main`]).
pub const PROBE_ARG: &str = "--probe-namespaces";

/// Tries, in this (single-threaded) process, what every zygote does first:
/// a user, mount and network namespace with only our own ids mapped, and
/// a tmpfs mounted in it. Exits 0 when all of it works; otherwise prints
/// the step that failed and exits 1. AppArmor's userns restriction and a
/// container's seccomp profile fail one of these steps.
pub fn probe_main() -> ! {
    let tried = (|| -> Result<(), String> {
        let (uid, gid) = (getuid(), getgid());
        unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("unshare of user, mount and network namespaces failed ({e})"))?;
        write_proc("/proc/self/setgroups", "deny")?;
        write_proc("/proc/self/uid_map", &format!("{uid} {uid} 1"))?;
        write_proc("/proc/self/gid_map", &format!("{gid} {gid} 1"))?;
        super::mount_api::fresh_tmpfs(&[("size", "4k")], 0)
            .map(drop)
            .map_err(|e| format!("a tmpfs in a new user namespace could not be made ({e})"))
    })();
    match tried {
        Ok(()) => std::process::exit(0),
        Err(why) => {
            println!("{why}");
            std::process::exit(1)
        }
    }
}

/// Entry point of the `stack-sandbox-exec` binary. Never returns.
pub fn helper_main() -> ! {
    // SAFETY: the runtime passes the control socket as CONTROL_FD; if it is
    // not open every send below fails and the helper just exits.
    let control = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    match setup_zygote() {
        Ok((spec, filters, base)) => {
            if packet::send(control.as_fd(), &FromZygote::Ready, &[]).is_err() {
                std::process::exit(SETUP_FAILED_EXIT);
            }
            zygote::serve(control, &spec, &filters, &base)
        }
        Err(message) => {
            let _ = packet::send(control.as_fd(), &FromZygote::SetupFailed { message }, &[]);
            std::process::exit(SETUP_FAILED_EXIT)
        }
    }
}

fn setup_zygote() -> Result<(ZygoteSpec, Filters, BaseRules), String> {
    let raw = std::env::var(ZYGOTE_ENV).map_err(|_| {
        format!("{ZYGOTE_ENV} is not set; this program is started by stack-runtime")
    })?;
    let spec: ZygoteSpec =
        serde_json::from_str(&raw).map_err(|err| format!("bad sandbox spec: {err}"))?;
    setsid().map_err(|e| format!("setsid: {e}"))?;
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, getpid().to_string())
            .map_err(|e| format!("joining cgroup {}: {e}", procs.display()))?;
    }
    // A root-owned workspace is cloned and idmapped while still root (see
    // `share`); the clone is attached in the private root below.
    let shared = if spec.shares_root_workspace {
        if !getuid().is_root() {
            return Err("a root-owned workspace can only be shared by a root runtime".into());
        }
        Some(super::share::SharedWorkspace::prepare(
            &spec.workspace,
            spec.uid,
            spec.gid,
        )?)
    } else {
        None
    };
    drop_identity(&spec)?;
    enter_namespaces(&spec, shared)?;
    let filters = Filters::build(spec.network).map_err(|e| format!("seccomp: {e}"))?;
    // Everything below holds for every call, so it is done once, here, and
    // inherited: no_new_privs, an empty bounding set (the zygote never
    // execs, so it keeps the capabilities it needs in its user namespace),
    // default signal dispositions, the shared seccomp denylist, and the
    // system paths every call may read, opened once.
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    drop_bounding_set();
    reset_signals();
    filters
        .install_shared()
        .map_err(|e| format!("seccomp: {e}"))?;
    let base = BaseRules::open(&spec)?;
    Ok((spec, filters, base))
}

/// The zygote's fixed rules (system paths every call may read, the device
/// files), as `O_PATH` descriptors opened once and inherited by every spare,
/// which builds its landlock ruleset from them without a path lookup.
pub(crate) struct BaseRules {
    entries: Vec<BaseEntry>,
}

struct BaseEntry {
    fd: PathFd,
    directory: bool,
    writable: bool,
}

impl BaseRules {
    fn open(spec: &ZygoteSpec) -> Result<BaseRules, String> {
        let read_only = spec
            .read_only
            .iter()
            .chain(&spec.read_only_files)
            .map(|p| (p, false));
        let writable = spec.read_write_files.iter().map(|p| (p, true));
        let mut entries = Vec::new();
        for (path, writable) in read_only.chain(writable) {
            if let Some((fd, directory)) = rule_target(path)? {
                entries.push(BaseEntry {
                    fd,
                    directory,
                    writable,
                });
            }
        }
        Ok(BaseRules { entries })
    }

    /// The descriptors a spare's init must keep open for its target.
    pub(crate) fn fds(&self) -> Vec<RawFd> {
        self.entries
            .iter()
            .map(|entry| entry.fd.as_fd().as_raw_fd())
            .collect()
    }
}

/// What a waiting target has already done to itself before its call is
/// known: everything that does not depend on the call.
pub(crate) struct Prepared {
    ruleset: RulesetCreated,
    abi: ABI,
    version: i32,
    network: NetworkMode,
}

/// Run by a spare's target while it waits: the per-call seccomp filters
/// (no namespaces, no `clone3`) and a landlock ruleset (not yet enforced)
/// holding the zygote's read-only rules and read-write rules for the
/// workspace and `tmp`, the call's private tmp dir.
pub(crate) fn prepare_target(
    spec: &ZygoteSpec,
    filters: &Filters,
    base: &BaseRules,
    tmp: &Path,
) -> Result<Prepared, String> {
    filters
        .install_per_call()
        .map_err(|e| format!("seccomp: {e}"))?;
    let mut prepared = base_ruleset(spec, base)?;
    let read_write =
        [spec.workspace.as_path(), tmp].map(|path| (path, AccessFs::from_all(prepared.abi)));
    prepared.ruleset = add_path_rules(prepared.ruleset, prepared.abi, read_write)?;
    Ok(prepared)
}

/// Confines the calling process (a call's PID 2) for `call` and executes
/// its target in `workspace`. Returns only on failure.
pub(crate) fn confine_and_exec(
    call: &CallSpec,
    workspace: &Path,
    tmp: &Path,
    mut fds: Vec<OwnedFd>,
    mut prepared: Prepared,
    channel: BorrowedFd<'_>,
) -> Result<Infallible, String> {
    let wanted = if call.code_file.is_some() { 4 } else { 3 };
    if fds.len() != wanted {
        return Err(format!("expected {wanted} descriptors, got {}", fds.len()));
    }
    let mut argv = call.argv.clone();
    if let Some(name) = &call.code_file {
        let code = fds.pop().ok_or("no code descriptor")?;
        argv.push(write_code(tmp, name, code)?);
    }
    let stdio = fds;
    for (target, fd) in stdio.iter().enumerate() {
        // SAFETY: dup2 onto 0, 1, 2 of this single-threaded process.
        if unsafe { libc::dup2(fd.as_raw_fd(), target as libc::c_int) } < 0 {
            return Err(format!("dup2: {}", std::io::Error::last_os_error()));
        }
    }
    drop(stdio);
    apply_rlimits(call)?;
    std::env::set_current_dir(workspace)
        .map_err(|e| format!("chdir {}: {e}", workspace.display()))?;
    let (argv, mut env) = exec_strings(&argv, tmp)?;
    if prepared.network == NetworkMode::Proxied {
        let port = hand_over_egress_listener(channel)?;
        prepared.ruleset = prepared
            .ruleset
            .add_rule(NetPort::new(port, AccessNet::ConnectTcp))
            .map_err(|e| format!("landlock: {e}"))?;
        let http = format!("http://127.0.0.1:{port}");
        let socks = format!("socks5h://127.0.0.1:{port}");
        for (name, value) in [
            ("HTTP_PROXY", &http),
            ("http_proxy", &http),
            ("HTTPS_PROXY", &http),
            ("https_proxy", &http),
            ("ALL_PROXY", &socks),
            ("all_proxy", &socks),
            ("NO_PROXY", &String::new()),
            ("no_proxy", &String::new()),
        ] {
            env.push(CString::new(format!("{name}={value}")).map_err(|e| e.to_string())?);
        }
    }
    for (name, value) in &call.env {
        // The runtime refused names of the fixed environment; the target
        // gets the first of any duplicate, so a fixed one always wins.
        env.push(CString::new(format!("{name}={value}")).map_err(|e| e.to_string())?);
    }
    enforce_landlock(call, prepared)?;
    mark_fds_cloexec();
    keep_init_near();
    let program = argv.first().ok_or("empty argv")?;
    let err = nix::unistd::execve(program, &argv, &env).err();
    Err(format!(
        "cannot execute {}: {}",
        call.argv[0],
        err.map_or("unknown error".into(), |e| e.desc().to_string())
    ))
}

/// Binds the call's egress listener on `127.0.0.1` (an ephemeral port, in
/// the call's network namespace), hands it to the runtime on `channel`,
/// and keeps no copy: the sandboxed process can connect to it, never
/// accept on it. Returns its port.
fn hand_over_egress_listener(channel: BorrowedFd<'_>) -> Result<u16, String> {
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| format!("binding the egress proxy's socket: {e}"))?;
    let port = listener
        .local_addr()
        .map_err(|e| format!("egress proxy socket: {e}"))?
        .port();
    packet::send(
        channel,
        &CallReport::EgressListening { port },
        &[listener.as_raw_fd()],
    )
    .map_err(|e| format!("handing the egress proxy's socket over: {e}"))?;
    Ok(port)
}

/// `argv` and the environment of a call whose private tmp dir is `tmp`, as
/// `execve` takes them.
pub(crate) fn exec_strings(
    argv: &[String],
    tmp: &Path,
) -> Result<(Vec<CString>, Vec<CString>), String> {
    let env: Vec<String> = super::sandbox_environment(tmp)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    Ok((cstrings(argv)?, cstrings(&env)?))
}

/// Writes the call's code (a memfd the runtime sealed) to `name` in the
/// call's private tmp dir, which lives in the zygote's own tmpfs: no other
/// process, and not the runtime, can see or swap it. Returns its path.
fn write_code(tmp: &Path, name: &str, code: OwnedFd) -> Result<String, String> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let plain = Path::new(name)
        .file_name()
        .is_some_and(|file| file == std::ffi::OsStr::new(name));
    if !plain {
        return Err(format!("bad code file name {name:?}"));
    }
    let path = tmp.join(name);
    let err = |e: std::io::Error| format!("writing the code to {}: {e}", path.display());
    let mut source = std::fs::File::from(code);
    source.seek(SeekFrom::Start(0)).map_err(err)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(err)?;
    std::io::copy(&mut source, &mut file).map_err(err)?;
    Ok(path.display().to_string())
}

fn cstrings(items: &[String]) -> Result<Vec<CString>, String> {
    items
        .iter()
        .map(|s| CString::new(s.as_bytes()).map_err(|_| format!("NUL byte in {s:?}")))
        .collect()
}

fn drop_identity(spec: &ZygoteSpec) -> Result<(), String> {
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
        let _ = nix::sys::prctl::set_dumpable(true);
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

fn enter_namespaces(
    spec: &ZygoteSpec,
    shared: Option<super::share::SharedWorkspace>,
) -> Result<(), String> {
    let (uid, gid) = (getuid(), getgid());
    let mut flags = CloneFlags::CLONE_NEWUSER
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    if spec.network != NetworkMode::Full {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(|e| {
        format!("cannot create user/network namespaces ({e}); the kernel must allow unprivileged user namespaces (user.max_user_namespaces > 0)")
    })?;
    write_proc("/proc/self/setgroups", "deny")?;
    write_proc("/proc/self/uid_map", &format!("{uid} {uid} 1"))?;
    write_proc("/proc/self/gid_map", &format!("{gid} {gid} 1"))?;
    if matches!(spec.network, NetworkMode::Loopback | NetworkMode::Proxied) {
        loopback_up()?;
        // MPTCP off in this namespace, behind the seccomp rule that already
        // refuses its sockets (see `seccomp`); a kernel without MPTCP has
        // no such file.
        let _ = std::fs::write("/proc/sys/net/mptcp/enabled", "0");
    }
    super::mounts::enter_private_root(spec, shared)?;
    // From here on no host process may ptrace this zygote (or the spares
    // it forks, until their exec) or take its descriptors: the mm's user
    // namespace is the host's, where this uid holds no CAP_SYS_PTRACE.
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("PR_SET_DUMPABLE: {e}"))?;
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

fn apply_rlimits(spec: &CallSpec) -> Result<(), String> {
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

/// Opens `path` (`O_PATH`) for a landlock rule and says whether it is a
/// directory; `None` when it does not exist (it grants nothing then). Any
/// other failure is an error: a rule the policy asked for is never dropped.
fn rule_target(path: &Path) -> Result<Option<(PathFd, bool)>, String> {
    match PathFd::new(path) {
        Ok(fd) => {
            let stat = nix::sys::stat::fstat(fd.as_fd())
                .map_err(|e| format!("landlock: stat {}: {e}", path.display()))?;
            let directory = stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
            Ok(Some((fd, directory)))
        }
        Err(_) if !path.exists() => Ok(None),
        Err(err) => Err(format!("landlock: {err}")),
    }
}

/// `access` as a rule on a directory allows it, or on a file, the part of
/// it that applies to files.
fn rule_access(abi: ABI, access: BitFlags<AccessFs>, directory: bool) -> BitFlags<AccessFs> {
    if directory {
        access
    } else {
        access & AccessFs::from_file(abi)
    }
}

fn base_ruleset(spec: &ZygoteSpec, base: &BaseRules) -> Result<Prepared, String> {
    let version = landlock_abi()
        .map(|kernel| kernel.min(spec.landlock_abi))
        .filter(|abi| *abi > 0)
        .ok_or("landlock is not available in this kernel (needs Linux 5.13+ with landlock in the LSM list)")?;
    let abi = abi_from(version);
    let err = |e: landlock::RulesetError| format!("landlock: {e}");
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?;
    if spec.network == NetworkMode::Proxied && version < 4 {
        return Err(format!("a network allowlist needs landlock ABI 4 (TCP port rules); this kernel has ABI {version}"));
    }
    if version >= 4 && matches!(spec.network, NetworkMode::None | NetworkMode::Proxied) {
        ruleset = ruleset
            .handle_access(AccessNet::from_all(abi))
            .map_err(err)?;
    }
    if version >= 6 {
        ruleset = ruleset.scope(Scope::from_all(abi)).map_err(err)?;
    }
    let rules = base.entries.iter().map(|entry| {
        let mut access = AccessFs::from_read(abi);
        if entry.writable {
            access |= AccessFs::WriteFile;
        }
        PathBeneath::new(&entry.fd, rule_access(abi, access, entry.directory))
    });
    let ruleset = ruleset
        .create()
        .map_err(err)?
        .add_rules(rules.map(Ok::<_, landlock::RulesetError>))
        .map_err(err)?;
    Ok(Prepared {
        ruleset,
        abi,
        version,
        network: spec.network,
    })
}

/// Adds a rule granting `access` beneath each path (a missing path grants
/// nothing; see [`rule_target`]).
fn add_path_rules<'a>(
    ruleset: RulesetCreated,
    abi: ABI,
    requested: impl IntoIterator<Item = (&'a Path, BitFlags<AccessFs>)>,
) -> Result<RulesetCreated, String> {
    let mut rules = Vec::new();
    for (path, access) in requested {
        if let Some((fd, directory)) = rule_target(path)? {
            rules.push(PathBeneath::new(fd, rule_access(abi, access, directory)));
        }
    }
    ruleset
        .add_rules(rules.into_iter().map(Ok::<_, landlock::RulesetError>))
        .map_err(|e| format!("landlock: {e}"))
}

fn enforce_landlock(call: &CallSpec, prepared: Prepared) -> Result<(), String> {
    let Prepared {
        ruleset,
        abi,
        version,
        network: _,
    } = prepared;
    if version < call.min_landlock_abi {
        return Err(format!(
            "landlock ABI {version} is older than the ABI {} this policy needs",
            call.min_landlock_abi
        ));
    }
    let err = |e: landlock::RulesetError| format!("landlock: {e}");
    let read_only = call
        .read_only
        .iter()
        .map(|path| (path.as_path(), AccessFs::from_read(abi)));
    let status = add_path_rules(ruleset, abi, read_only)?
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

/// Moves the call's init (PID 1 here) to the CPU this target runs on, where
/// it will most likely exit: the init then reports the exit from that CPU
/// as soon as the target is gone, instead of first waking a CPU that may
/// have gone idle (slow on a VM). Only where the init waits; a failure
/// changes nothing else.
fn keep_init_near() {
    // SAFETY: sched_getcpu has no arguments; a CPU set is plain data, and
    // sched_setaffinity reads it for PID 1 of this namespace (our init).
    unsafe {
        let cpu = libc::sched_getcpu();
        if cpu >= 0 {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu as usize, &mut set);
            libc::sched_setaffinity(1, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

fn mark_fds_cloexec() {
    const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
    // SAFETY: marks our own fds close-on-exec; nothing is closed now.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) };
}
