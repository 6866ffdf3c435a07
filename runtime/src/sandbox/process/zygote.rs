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
use std::time::{Duration, Instant};

use nix::libc;

use super::helper::{confine_and_exec, prepare_target, BaseRules, SETUP_FAILED_EXIT};
use super::packet;
use super::seccomp::Filters;
use super::spec::{CallReport, CallSpec, FromZygote, ToZygote, ZygoteSpec};

/// How long the zygote waits before making a spare that no call is waiting
/// for, so that the call that just took the last one gets the CPU first.
const SPARE_DELAY: Duration = Duration::from_micros(500);

/// An init this zygote made and has not reaped yet.
struct Init {
    pid: libc::pid_t,
    pidfd: OwnedFd,
}

impl Init {
    fn kill(&self) {
        // SAFETY: `pid` is our unreaped child, so the pid is still its own.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }

    fn reap(&self) {
        loop {
            // SAFETY: waitpid on our own child; the status is not needed.
            let pid = unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
            if pid == self.pid
                || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)
            {
                return;
            }
        }
    }
}

/// Serves spawn requests until the runtime closes the control socket.
/// Never returns.
pub(crate) fn serve(control: OwnedFd, spec: &ZygoteSpec, filters: &Filters, base: &BaseRules) -> ! {
    let mut inits: Vec<Init> = Vec::new();
    let mut wanted = 0usize;
    let mut urgent = false;
    let mut last_request = Instant::now();
    loop {
        let mut timeout = None;
        if wanted > 0 {
            let waited = last_request.elapsed();
            if urgent || waited >= SPARE_DELAY {
                wanted -= 1;
                urgent = urgent && wanted > 0;
                hand_over_spare(&control, spec, filters, base, &mut inits);
                continue;
            }
            timeout = Some(SPARE_DELAY - waited);
        }
        let mut polled = vec![pollfd(control.as_raw_fd())];
        polled.extend(inits.iter().map(|init| pollfd(init.pidfd.as_raw_fd())));
        if !wait(&mut polled, timeout) {
            shutdown(&inits);
        }
        let mut index = 1;
        inits.retain(|init| {
            let exited = polled[index].revents != 0;
            index += 1;
            if exited {
                init.reap();
            }
            !exited
        });
        if polled[0].revents != 0 {
            match packet::recv(control.as_fd(), true) {
                Ok(Some(request)) => {
                    if let Ok(ToZygote::Spawn { urgent: now }) = request.decode::<ToZygote>() {
                        wanted += 1;
                        urgent |= now;
                        last_request = Instant::now();
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                Ok(None) | Err(_) => shutdown(&inits),
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

/// Polls `polled` for at most `timeout`; false when polling itself fails.
fn wait(polled: &mut [libc::pollfd], timeout: Option<Duration>) -> bool {
    let limit = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
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
    inits: &mut Vec<Init>,
) {
    let sent = match spawn_spare(spec, filters, base) {
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
        shutdown(inits);
    }
}

fn shutdown(inits: &[Init]) -> ! {
    for init in inits {
        init.kill();
    }
    for init in inits {
        init.reap();
    }
    std::process::exit(0)
}

/// Makes a spare: a new PID and IPC namespace with its init (PID 1) and the
/// future target (PID 2) waiting for a call.
fn spawn_spare(
    spec: &ZygoteSpec,
    filters: &Filters,
    base: &BaseRules,
) -> std::io::Result<(Init, OwnedFd)> {
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
        run_init(theirs, spec, filters, base);
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
    let init = Init {
        pid: init,
        // SAFETY: pidfd_open returned a new descriptor that we now own.
        pidfd: unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) },
    };
    Ok((init, ours))
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
fn run_init(channel: OwnedFd, spec: &ZygoteSpec, filters: &Filters, base: &BaseRules) -> ! {
    // SAFETY: prctl with constant arguments; the parent is the zygote.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    let mut keep = base.fds();
    keep.push(channel.as_raw_fd());
    close_all_but(keep);
    let _ = nix::unistd::setsid();
    // SAFETY: this process is single-threaded (a fork of the zygote).
    let target = unsafe { libc::fork() };
    if target < 0 {
        std::process::exit(SETUP_FAILED_EXIT);
    }
    if target == 0 {
        run_target(channel, spec, filters, base);
    }
    loop {
        let mut raw: libc::c_int = 0;
        // SAFETY: all-zero is a valid rusage.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on any child with valid status and rusage pointers.
        let pid = unsafe { libc::wait4(-1, &mut raw, 0, &mut usage) };
        if pid == target {
            let millis = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
            let report = CallReport::Exited {
                status: raw,
                cpu_ms: millis(usage.ru_utime) + millis(usage.ru_stime),
            };
            let _ = packet::send(channel.as_fd(), &report, &[]);
            std::process::exit(0);
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            std::process::exit(SETUP_FAILED_EXIT);
        }
    }
}

/// PID 2: confines itself as far as it can without its call, waits for the
/// call, then finishes confining itself and executes it.
fn run_target(channel: OwnedFd, spec: &ZygoteSpec, filters: &Filters, base: &BaseRules) -> ! {
    let prepared = prepare_target(spec, filters, base);
    let request = match packet::recv(channel.as_fd(), false) {
        Ok(Some(request)) => request,
        // The zygote dropped this spare (or is gone): nothing to run.
        _ => std::process::exit(0),
    };
    let message = match (prepared, request.decode::<CallSpec>()) {
        (Ok(prepared), Ok(call)) => match confine_and_exec(&call, request.fds, prepared) {
            Ok(never) => match never {},
            Err(message) => message,
        },
        (Err(message), _) => message,
        (_, Err(err)) => format!("bad call spec: {err}"),
    };
    let _ = packet::send(channel.as_fd(), &CallReport::SetupFailed { message }, &[]);
    std::process::exit(SETUP_FAILED_EXIT)
}
