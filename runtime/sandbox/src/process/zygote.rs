//! The zygote: a confined, single-threaded process that makes fresh,
//! already isolated processes, one per call, and hands them to the runtime.
//!
//! Creating user and network namespaces and joining a cgroup cost more than
//! a whole `bash -c true`, so the zygote does that once (see
//! [`super::helper`]) and each call only gets what must be its own: a
//! *spare*, a new PID and IPC namespace whose PID 1 (a minimal init) has
//! already forked the future target (PID 2). The target confines itself as
//! far as it can without knowing its call (seccomp, capabilities, the
//! landlock ruleset's fixed rules) and waits on a socket. The zygote hands
//! that socket and a pidfd for the init to the runtime, which sends the call
//! straight to the target and reads the init's report straight back: the
//! zygote is not on a call's path, it only makes spares ahead of time and
//! reaps the inits.
//!
//! Each spare also gets its private tmp dir, made by the zygote (as the
//! sandbox's uid) before the fork and already read-write in the target's
//! landlock ruleset, together with the workspace. When the spare's init has
//! exited, and with it every process of the call, the zygote removes the
//! dir; its capabilities in its own user namespace let it remove whatever a
//! call left there, modes changed to 000 included. None of this is on a
//! call's path either.
//!
//! Invariants:
//! - **Single-threaded.** The zygote forks without exec; nothing else runs
//!   in it while it does.
//! - **A call ends with its namespace.** The init reports the target's exit
//!   and exits at once, and the kernel then kills every process left in the
//!   namespace, detached grandchildren included. Killing a call is killing
//!   its init (the runtime holds a pidfd for it).
//! - **Nothing outlives the runtime.** End of stream on the control socket
//!   makes the zygote kill every init it made and exit; every init dies with
//!   the zygote (`PR_SET_PDEATHSIG`), and with it its namespace. A spare the
//!   runtime drops unused sees end of stream and exits.
//! - **Calls do not meet.** Each call has its own PID and IPC namespace and
//!   its own landlock domain, so it cannot see, signal or share SysV IPC with
//!   another call of the same zygote.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::libc;

use super::helper::{confine_and_exec, prepare_target, BaseRules, SETUP_FAILED_EXIT};
use super::packet;
use super::seccomp::Filters;
use super::spec::{CallReport, CallSpec, FromZygote, ToZygote, ZygoteSpec, WAKE_UP};

/// How long after a call's init has exited the zygote reaps it, removes the
/// call's tmp dir and makes its successor: long enough for the runtime to
/// finish the call first on a small machine, short enough that a caller
/// making calls back to back rarely finds no spare waiting.
const CLEANUP_DELAY: Duration = Duration::from_millis(1);

/// The zygote's own tmpfs (see [`super::mounts`]), where each spare's
/// private tmp dir is made.
const PRIVATE_TMP: &str = "/tmp";

/// An init this zygote made and has not reaped yet.
struct Init {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    /// Its call's private tmp dir.
    tmp: PathBuf,
    /// With a disk budget, the (empty, here) folder its budget was
    /// mounted on in the call's own mount namespace.
    budget: Option<PathBuf>,
}

impl Init {
    fn kill(&self) {
        // `pid` is our unreaped child, so the pid is still its own.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    /// Waits for the init (whose exit ends every process of its call) and
    /// removes the call's tmp dir. True when the init ran a call (it
    /// reported, or was killed), so that a spare should take its place.
    fn reap(&self) -> bool {
        use nix::sys::wait::{waitpid, WaitStatus};
        let ran_a_call = loop {
            match waitpid(nix::unistd::Pid::from_raw(self.pid), None) {
                Ok(WaitStatus::Exited(_, code)) => break code == 0,
                Ok(_) => break true,
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => break false,
            }
        };
        let _ = std::fs::remove_dir_all(&self.tmp);
        if let Some(budget) = &self.budget {
            let _ = std::fs::remove_dir(budget);
        }
        ran_a_call
    }
}

/// Exit code of an init whose report nobody received: the runtime dropped
/// its spare unused (or gave up on the call), so it is not replaced.
const UNHEARD_EXIT: i32 = 1;

/// Serves spawn requests until the runtime closes the control socket.
/// Never returns.
pub(crate) fn serve(control: OwnedFd, spec: &ZygoteSpec, filters: &Filters, base: &BaseRules) -> ! {
    // Inits whose calls run (or wait), and inits that have exited but are
    // not reaped yet: reaping them, removing their tmp dirs and making their
    // successors waits CLEANUP_DELAY, so that the runtime finishes the call
    // first.
    let mut inits: Vec<Init> = Vec::new();
    let mut ended: Vec<Init> = Vec::new();
    let mut cleanup_due: Option<Instant> = None;
    let mut wanted = 0usize;
    let mut made = 0u64;
    loop {
        if wanted > 0 {
            // A call is waiting for this one: make it now.
            wanted -= 1;
            made += 1;
            let tmp = Path::new(PRIVATE_TMP).join(format!("call-{made}"));
            hand_over_spare(&control, spec, filters, base, tmp, &mut inits, &ended);
            continue;
        }
        let now = Instant::now();
        if cleanup_due.is_some_and(|due| now >= due) {
            cleanup_due = None;
            for init in ended.drain(..) {
                if init.reap() {
                    // A call has ended: its successor is made now, off the
                    // path of any call.
                    wanted += 1;
                }
            }
            continue;
        }
        let timeout = cleanup_due.map(|due| due.saturating_duration_since(now));
        let mut polled = vec![pollfd(control.as_raw_fd())];
        polled.extend(inits.iter().map(|init| pollfd(init.pidfd.as_raw_fd())));
        if !wait(&mut polled, timeout) {
            shutdown(&inits, &ended);
        }
        let (gone, running): (Vec<_>, Vec<_>) = std::mem::take(&mut inits)
            .into_iter()
            .zip(&polled[1..])
            .partition(|(_, poll)| poll.revents != 0);
        inits = running.into_iter().map(|(init, _)| init).collect();
        let gone: Vec<Init> = gone.into_iter().map(|(init, _)| init).collect();
        if !gone.is_empty() {
            ended.extend(gone);
            cleanup_due.get_or_insert_with(|| Instant::now() + CLEANUP_DELAY);
        }
        if polled[0].revents != 0 {
            match packet::recv(control.as_fd(), true) {
                Ok(Some(request)) => {
                    if let Ok(ToZygote::Spawn) = request.decode::<ToZygote>() {
                        wanted += 1;
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                Ok(None) | Err(_) => shutdown(&inits, &ended),
            }
        }
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Polls `polled` until one is ready or `timeout` passes; false when
/// polling itself fails.
fn wait(polled: &mut [libc::pollfd], timeout: Option<Duration>) -> bool {
    let limit = timeout.map(|t| libc::timespec {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(t.subsec_nanos()),
    });
    let limit_ptr = limit
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: a valid, correctly sized pollfd array and timespec (or null).
    let ready = unsafe {
        libc::ppoll(
            polled.as_mut_ptr(),
            polled.len() as libc::nfds_t,
            limit_ptr,
            std::ptr::null(),
        )
    };
    ready >= 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
}

/// Makes a spare and sends it to the runtime (or says why it could not).
fn hand_over_spare(
    control: &OwnedFd,
    spec: &ZygoteSpec,
    filters: &Filters,
    base: &BaseRules,
    tmp: PathBuf,
    inits: &mut Vec<Init>,
    ended: &[Init],
) {
    let sent = match spawn_spare(spec, filters, base, tmp) {
        Ok((init, channel)) => {
            let fds = [channel.as_raw_fd(), init.pidfd.as_raw_fd()];
            let sent = packet::send(control.as_fd(), &FromZygote::Spare, &fds);
            if sent.is_err() {
                init.kill();
            }
            inits.push(init);
            sent
        }
        Err(err) => packet::send(
            control.as_fd(),
            &FromZygote::SpawnFailed {
                message: format!("could not start a sandboxed process: {err}"),
            },
            &[],
        ),
    };
    if sent.is_err() {
        shutdown(inits, ended);
    }
}

fn shutdown(inits: &[Init], ended: &[Init]) -> ! {
    for init in inits {
        init.kill();
    }
    for init in inits.iter().chain(ended) {
        let _ = init.reap();
    }
    std::process::exit(0)
}

/// Makes a spare: its private tmp dir `tmp`, and a new PID and IPC
/// namespace with its init (PID 1) and the future target (PID 2) waiting
/// for a call.
fn spawn_spare(
    spec: &ZygoteSpec,
    filters: &Filters,
    base: &BaseRules,
    mut tmp: PathBuf,
) -> std::io::Result<(Init, OwnedFd)> {
    {
        use std::os::unix::fs::DirBuilderExt;
        // A workspace bound under /tmp may hold this name already; the
        // zygote then takes the next one.
        let mut tmp_name = tmp.clone();
        let mut attempt = 0;
        loop {
            match std::fs::DirBuilder::new().mode(0o700).create(&tmp_name) {
                Ok(()) => break,
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => {
                    attempt += 1;
                    tmp_name.set_file_name(format!(
                        "{}-{attempt}",
                        tmp.file_name().and_then(|n| n.to_str()).unwrap_or("call")
                    ));
                }
                Err(err) => return Err(err),
            }
        }
        tmp = tmp_name;
    }
    let budget = match spec.disk {
        Some(_) => {
            use std::os::unix::fs::DirBuilderExt;
            let folder = super::disk::budget_folder(&tmp);
            if let Err(err) = std::fs::DirBuilder::new().mode(0o700).create(&folder) {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(err);
            }
            Some(folder)
        }
        None => None,
    };
    let spawned = fork_spare(spec, filters, base, &tmp);
    match spawned {
        Ok((pid, pidfd, channel)) => Ok((
            Init {
                pid,
                pidfd,
                tmp,
                budget,
            },
            channel,
        )),
        Err(err) => {
            let _ = std::fs::remove_dir_all(&tmp);
            if let Some(folder) = &budget {
                let _ = std::fs::remove_dir(folder);
            }
            Err(err)
        }
    }
}

fn fork_spare(
    spec: &ZygoteSpec,
    filters: &Filters,
    base: &BaseRules,
    tmp: &Path,
) -> std::io::Result<(libc::pid_t, OwnedFd, OwnedFd)> {
    let (ours, theirs) = packet::pair()?;
    let flags = (libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: clone without CLONE_VM and with a null stack behaves as fork;
    // the zygote is single-threaded, so the child may run any code.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        drop(ours);
        run_init(theirs, spec, filters, base, tmp);
    }
    drop(theirs);
    let init = pid as libc::pid_t;
    // SAFETY: pidfd_open on our own, unreaped child.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, init, 0) };
    if pidfd < 0 {
        let err = std::io::Error::last_os_error();
        // SAFETY: killing and reaping our own child.
        unsafe {
            libc::kill(init, libc::SIGKILL);
            libc::waitpid(init, std::ptr::null_mut(), 0);
        }
        return Err(err);
    }
    // SAFETY: pidfd_open returned a new descriptor that we now own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    Ok((init, pidfd, ours))
}

/// Closes every descriptor above stdio but those in `keep`: what a spare
/// inherits from the zygote (the control socket, other spares' sockets and
/// pidfds) is none of its business.
fn close_all_but(mut keep: Vec<RawFd>) {
    keep.sort_unstable();
    let mut next: u32 = 3;
    for fd in keep.into_iter().filter_map(|fd| u32::try_from(fd).ok()) {
        if fd > next {
            // SAFETY: closing descriptors this process owns and does not use.
            unsafe { libc::syscall(libc::SYS_close_range, next, fd - 1, 0u32) };
        }
        next = next.max(fd + 1);
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, next, u32::MAX, 0u32) };
}

/// PID 1 of a call's namespace: forks the target, reaps every child, and
/// when the target exits reports its wait status to the runtime and exits,
/// which makes the kernel kill whatever is left in the namespace.
///
/// The target is not PID 1 on purpose: the kernel drops default-action
/// signals sent to an init, which would make SIGXFSZ, SIGXCPU or a plain
/// `kill` behave differently inside the sandbox.
fn run_init(
    channel: OwnedFd,
    spec: &ZygoteSpec,
    filters: &Filters,
    base: &BaseRules,
    tmp: &Path,
) -> ! {
    // SAFETY: prctl with constant arguments; the parent is the zygote.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    let mut keep = base.fds();
    keep.push(channel.as_raw_fd());
    close_all_but(keep);
    let _ = nix::unistd::setsid();
    // With a disk budget, the call's writes go to an overlay of its own
    // (see `disk`), mounted before the target exists; a failure is the
    // call's setup error, which the target reports when the call comes.
    let mut overlay = None;
    let mut setup_error = None;
    if let Some(budget) = spec.disk {
        match super::disk::mount_call_overlay(spec, budget, tmp) {
            Ok(mounted) => {
                catch_stop_signal();
                overlay = Some(mounted);
            }
            Err(message) => setup_error = Some(message),
        }
    }
    // SAFETY: this process is single-threaded (a fork of the zygote).
    let target = unsafe { libc::fork() };
    if target < 0 {
        exit_now(SETUP_FAILED_EXIT);
    }
    if target == 0 {
        drop(overlay);
        run_target(channel, spec, filters, base, tmp, setup_error);
    }
    let mut stopping = false;
    loop {
        if !stopping && STOPS.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            // The runtime stops the call (its wall-clock limit): every
            // process of it, the target included, dies now; what it wrote
            // is written back below, once the target is reaped.
            stopping = true;
            kill_all_others();
        }
        let mut raw: libc::c_int = 0;
        // SAFETY: all-zero is a valid rusage.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on any child with valid status and rusage pointers.
        let pid = unsafe { libc::wait4(-1, &mut raw, 0, &mut usage) };
        if pid == target {
            let millis = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
            let cpu_ms = millis(usage.ru_utime) + millis(usage.ru_stime);
            let (others_left, disk) = match overlay.take() {
                Some(overlay) => {
                    // Nothing may write while the changes are written
                    // back: the rest of the call dies first.
                    kill_all_others();
                    reap_all();
                    // A stop that came before the write back stopped the
                    // call; one that comes during it stops the write back.
                    let stops_before = STOPS.load(std::sync::atomic::Ordering::Relaxed);
                    let stop = || STOPS.load(std::sync::atomic::Ordering::Relaxed) > stops_before;
                    (false, Some(overlay.write_back(&stop)))
                }
                None => (!namespace_is_empty(), None),
            };
            let report = CallReport::Exited {
                status: raw,
                cpu_ms,
                others_left,
                disk,
            };
            let sent = packet::send(channel.as_fd(), &report, &[]);
            // What is left, tearing down the call's namespaces, runs at the
            // lowest priority, so that on a busy (or small) machine it
            // yields to the runtime and the next call. Lowering one's own
            // priority needs no privilege.
            // SAFETY: setpriority on this process with a constant value.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
            exit_now(if sent.is_ok() { 0 } else { UNHEARD_EXIT })
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            exit_now(SETUP_FAILED_EXIT);
        }
    }
}

/// How many times [`super::disk::STOP_SIGNAL`] came: the runtime stops the
/// call (at its deadline), or, when it comes during the write back, stops
/// that too.
static STOPS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

extern "C" fn on_stop(_: libc::c_int) {
    STOPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Async-signal-safe: the call ends now, whatever the init was doing.
    kill_all_others();
}

/// Has [`super::disk::STOP_SIGNAL`] interrupt the init's wait (no
/// `SA_RESTART`), kill the call and count in [`STOPS`]. An init ignores signals it has no
/// handler for, so only an init with a disk budget can be stopped this way.
fn catch_stop_signal() {
    // SAFETY: a handler that only stores to an atomic; a zeroed sigaction
    // with an empty mask is valid.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_stop as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(super::disk::STOP_SIGNAL, &action, std::ptr::null_mut());
    }
}

/// Kills every other process of the call's namespace (the init is PID 1:
/// `kill(-1)` reaches all of them, and not itself).
fn kill_all_others() {
    // SAFETY: kill with constant arguments.
    unsafe { libc::kill(-1, libc::SIGKILL) };
}

/// Reaps every child until none is left (all were killed).
fn reap_all() {
    loop {
        // SAFETY: waitpid on any child; no status needed.
        let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::__WALL) };
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// Whether the init is alone in its namespace: it reaps every child that
/// has exited and finds none left. Every other process of the namespace
/// descends from one of its children (orphans are reparented to the init),
/// so no children means no one else.
fn namespace_is_empty() -> bool {
    loop {
        // SAFETY: waitpid on any child, without blocking; no status needed.
        let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG | libc::__WALL) };
        match pid {
            0 => return false,
            p if p > 0 => continue,
            _ => match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ECHILD) => return true,
                Some(libc::EINTR) => continue,
                _ => return false,
            },
        }
    }
}

/// PID 2: confines itself as far as it can without its call, waits for the
/// call, then finishes confining itself and executes it.
fn run_target(
    channel: OwnedFd,
    spec: &ZygoteSpec,
    filters: &Filters,
    base: &BaseRules,
    tmp: &Path,
    setup_error: Option<String>,
) -> ! {
    let prepared = match setup_error {
        Some(message) => Err(message),
        None => prepare_target(spec, filters, base, tmp),
    };
    warm_up(tmp);
    let request = match receive_call(channel.as_fd()) {
        Some(request) => request,
        // The zygote dropped this spare (or is gone): nothing to run.
        None => exit_now(0),
    };
    let message = match (prepared, request.decode::<CallSpec>()) {
        (Ok(prepared), Ok(call)) => {
            match confine_and_exec(
                &call,
                &spec.workspace,
                tmp,
                request.fds,
                prepared,
                channel.as_fd(),
            ) {
                Ok(never) => match never {},
                Err(message) => message,
            }
        }
        (Err(message), _) => message,
        (_, Err(err)) => format!("bad call spec: {err}"),
    };
    let _ = packet::send(channel.as_fd(), &CallReport::SetupFailed { message }, &[]);
    exit_now(SETUP_FAILED_EXIT)
}

/// How long a woken spare waits for its call awake before it sleeps again.
const AWAKE_WAIT: Duration = Duration::from_millis(2);

/// Waits for the call: asleep until the runtime says one is coming
/// ([`WAKE_UP`]), then awake (polling the socket) for at most
/// [`AWAKE_WAIT`], so that the call starts the moment it arrives rather than
/// after the CPU has woken up. `None` at end of stream.
fn receive_call(channel: std::os::fd::BorrowedFd<'_>) -> Option<packet::Packet> {
    let mut woken_at = None;
    loop {
        let awake = woken_at.is_some_and(|at: Instant| at.elapsed() < AWAKE_WAIT);
        match packet::recv(channel, awake) {
            Ok(Some(packet)) if packet.bytes == WAKE_UP && packet.fds.is_empty() => {
                woken_at = Some(Instant::now());
            }
            Ok(Some(packet)) => return Some(packet),
            // Yield, not spin: the runtime may be preparing the call on
            // this very CPU.
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                // SAFETY: sched_yield has no arguments and cannot fail.
                unsafe { libc::sched_yield() };
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Ok(None) | Err(_) => return None,
        }
    }
}

/// Runs, while the spare waits, the code its call will run first (decoding
/// a call spec like a real one, building C strings), so that the page faults
/// of a freshly forked process are taken now rather than on the call's path.
fn warm_up(tmp: &Path) {
    let sample = CallSpec {
        argv: vec!["/usr/bin/python3".into(), "-c".into(), "print(1)".into()],
        code_file: None,
        read_only: vec![PathBuf::from("/usr")],
        limits: super::ResourceLimits::default(),
        min_landlock_abi: 6,
        env: Vec::new(),
    };
    if let Ok(bytes) = serde_json::to_vec(&sample) {
        if let Ok(decoded) = serde_json::from_slice::<CallSpec>(&bytes) {
            let _ = std::hint::black_box(super::helper::exec_strings(&decoded.argv, tmp));
        }
    }
}

/// Ends a forked process (an init or a target) at once: `_exit`, not
/// `exit`, so none of the zygote's `atexit` handlers and C++ static
/// destructors (the helper links the whole runtime) run again in it, which
/// would cost a call's init hundreds of microseconds.
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process without touching shared state.
    unsafe { libc::_exit(code) }
}
