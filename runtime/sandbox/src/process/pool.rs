//! The runtime's side of the zygotes: one per workspace, identity, network
//! mode and cgroup limits, started on first use and kept while the sandbox
//! lives.
//!
//! A [`Zygote`] owns the helper process, its control socket, the cgroup its
//! calls share, a queue of [`Spare`]s (processes waiting for one call each)
//! and a reader thread that fills the queue. A call takes a spare and talks
//! to it directly; the zygote makes its successor when the call has ended
//! (so that making it never competes with the call, and the runtime sends
//! nothing for it), and a call that finds no spare asks for one. A zygote
//! that dies is noticed
//! (its reader sees end of stream), every call waiting on it fails with a
//! clear error, and the next call starts a new one.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::libc;
use tokio::sync::Notify;

use super::cgroup::{CgroupLayout, SandboxCgroup};
use super::packet;
use super::spec::{
    DiskBudget, FromZygote, NetworkMode, ProtectedPath, ToZygote, ZygoteSpec, CONTROL_FD,
    ZYGOTE_ENV,
};
use super::SandboxError;

/// Zygotes kept at most; past this, idle ones are shut down, oldest first.
const MAX_ZYGOTES: usize = 16;

/// Spares a zygote keeps ready: two, so that a call made right after
/// another (before the zygote has cleaned up after that one and made its
/// successor) still finds one waiting.
const SPARES_READY: usize = 2;

/// Spares kept waiting at most; more are left after a burst of concurrent
/// calls, since each call is replaced when it ends.
const MAX_IDLE_SPARES: usize = SPARES_READY;

/// How long a new zygote may take to confine itself.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How many spares in a row may arrive with their init already exited
/// before the zygote is given up on.
const MAX_GONE_IN_A_ROW: u32 = 16;

/// What makes two calls share a zygote: everything the zygote fixes once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ZygoteKey {
    pub workspace: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// A root-owned workspace, seen through an idmapped mount.
    pub shares_root_workspace: bool,
    pub network: NetworkMode,
    /// With a network allowlist, a hash of it: calls under different
    /// allowlists never share a network namespace (where a call that got
    /// past landlock could use another call's proxy).
    pub egress: Option<u64>,
    pub memory_bytes: u64,
    pub processes: u64,
    /// Each call's disk budget (see `disk`); `None` for services.
    pub disk: Option<DiskBudget>,
    /// The landlock ABI its calls use (the kernel's, or lower: see
    /// `ProcessPolicy::landlock_abi_limit`).
    pub landlock_abi: i32,
    /// Read-only paths beyond the system ones (bound into the zygote's
    /// root): the interpreter's prefix where it is elsewhere, policy extras.
    pub read_only: Vec<PathBuf>,
    /// The protected workspace paths that exist (a path that appears later
    /// makes a new zygote, which protects it too).
    pub protected: Vec<ProtectedPath>,
}

/// A process waiting for one call: the socket its target listens on (and
/// its init reports on) and a pidfd for its init.
pub(crate) struct Spare {
    pub channel: OwnedFd,
    pub pidfd: OwnedFd,
}

impl Spare {
    /// Whether its init still runs (its pidfd turns readable at exit).
    fn is_alive(&self) -> bool {
        matches!(
            readable_within(self.pidfd.as_fd(), Duration::ZERO),
            Ok(false)
        )
    }
}

/// Kills a call's init through its pidfd (no pid can be reused under it),
/// and with it every process of the call.
pub(crate) fn kill_init(pidfd: &OwnedFd) -> std::io::Result<()> {
    signal_init(pidfd, libc::SIGKILL)
}

/// Sends `signal` to a call's init through its pidfd; one that has exited
/// already is not an error.
pub(crate) fn signal_init(pidfd: &OwnedFd, signal: libc::c_int) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal on a pidfd we own; no siginfo.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if sent == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    // ESRCH: it has exited already, which is what we wanted.
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(err)
    }
}

/// What the reader thread shares with callers.
struct Shared {
    spares: Mutex<VecDeque<Spare>>,
    failure: Mutex<Option<String>>,
    /// Spawn requests not answered yet.
    pending: AtomicUsize,
    changed: Notify,
    alive: AtomicBool,
}

/// The zygotes of one [`super::ProcessSandbox`].
pub(crate) struct ZygotePool {
    helper: PathBuf,
    zygotes: Mutex<HashMap<ZygoteKey, Arc<Zygote>>>,
    uses: AtomicU64,
}

impl std::fmt::Debug for ZygotePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.zygotes.lock().map_or(0, |z| z.len());
        f.debug_struct("ZygotePool")
            .field("helper", &self.helper)
            .field("zygotes", &count)
            .finish()
    }
}

impl ZygotePool {
    pub(crate) fn new(helper: PathBuf) -> Self {
        ZygotePool {
            helper,
            zygotes: Mutex::new(HashMap::new()),
            uses: AtomicU64::new(0),
        }
    }

    /// The live zygote for `key`, started if there is none.
    pub(crate) async fn get(
        &self,
        key: &ZygoteKey,
        cgroups: Option<&CgroupLayout>,
    ) -> Result<Arc<Zygote>, SandboxError> {
        let stamp = self.uses.fetch_add(1, Ordering::Relaxed);
        if let Some(zygote) = self.lookup(key) {
            zygote.last_used.store(stamp, Ordering::Relaxed);
            return Ok(zygote);
        }
        if !self.helper.is_file() {
            return Err(SandboxError::HelperMissing(
                self.helper.display().to_string(),
            ));
        }
        let helper = self.helper.clone();
        let owned_key = key.clone();
        let layout = cgroups.cloned();
        let zygote = tokio::task::spawn_blocking(move || {
            Zygote::start(&helper, &owned_key, layout.as_ref())
        })
        .await
        .map_err(|e| SandboxError::Setup(format!("starting the sandbox zygote: {e}")))??;
        zygote.last_used.store(stamp, Ordering::Relaxed);
        let zygote = Arc::new(zygote);
        let mut zygotes = self.zygotes.lock().unwrap_or_else(|e| e.into_inner());
        zygotes.retain(|_, z| z.is_alive());
        if let Some(existing) = zygotes.get(key) {
            // Another call started one meanwhile; use it, drop ours.
            return Ok(existing.clone());
        }
        while zygotes.len() >= MAX_ZYGOTES {
            let idle = zygotes
                .iter()
                // Held by the pool alone: no call is using it.
                .filter(|(_, z)| Arc::strong_count(z) == 1)
                .min_by_key(|(_, z)| z.last_used.load(Ordering::Relaxed))
                .map(|(k, _)| k.clone());
            match idle {
                Some(k) => zygotes.remove(&k),
                None => break,
            };
        }
        zygotes.insert(key.clone(), zygote.clone());
        Ok(zygote)
    }

    fn lookup(&self, key: &ZygoteKey) -> Option<Arc<Zygote>> {
        let zygotes = self.zygotes.lock().unwrap_or_else(|e| e.into_inner());
        zygotes.get(key).filter(|z| z.is_alive()).cloned()
    }

    /// How many zygotes are running.
    pub(crate) fn len(&self) -> usize {
        let zygotes = self.zygotes.lock().unwrap_or_else(|e| e.into_inner());
        zygotes.values().filter(|z| z.is_alive()).count()
    }
}

/// One running zygote.
pub(crate) struct Zygote {
    control: Arc<OwnedFd>,
    send_lock: Mutex<()>,
    shared: Arc<Shared>,
    last_used: AtomicU64,
    /// The cgroup's OOM kill count when last read.
    oom_seen: AtomicU64,
    process: Option<Child>,
    cgroup: Option<SandboxCgroup>,
}

impl Zygote {
    /// Starts the helper as a zygote and waits until it is confined.
    /// Blocking.
    fn start(
        helper: &Path,
        key: &ZygoteKey,
        cgroups: Option<&CgroupLayout>,
    ) -> Result<Zygote, SandboxError> {
        // Where a cgroup hierarchy is there to use, the limits live in it
        // and a cgroup that cannot be made refuses the call (fail closed).
        // Where none is (an unprivileged runtime on cgroup v1), the caller
        // holds memory with the address-space rlimit instead.
        let cgroup = match cgroups {
            Some(layout) => Some(
                // A disk budget is tmpfs pages, charged to the memory
                // cgroup of whoever writes them: the memory limit holds
                // what a call's processes use and what it has written but
                // not yet written back, together.
                SandboxCgroup::create(layout, key.memory_bytes, key.processes).map_err(|err| {
                    SandboxError::KernelLacks(format!(
                        "the policy's memory and process limits need a cgroup, and none could be made in {}: {err}",
                        layout.describe()
                    ))
                })?,
            ),
            None => None,
        };
        let mut read_only = super::base_read_only(key.network);
        read_only.extend(key.read_only.iter().cloned());
        let spec = ZygoteSpec {
            uid: key.uid,
            gid: key.gid,
            network: key.network,
            workspace: key.workspace.clone(),
            shares_root_workspace: key.shares_root_workspace,
            protected: key.protected.clone(),
            tmp_bytes: key.memory_bytes,
            disk: key.disk,
            landlock_abi: key.landlock_abi,
            cgroup_procs: cgroup
                .as_ref()
                .map(SandboxCgroup::procs_files)
                .unwrap_or_default(),
            read_only,
            read_only_files: super::READ_ONLY_DEVICES.iter().map(PathBuf::from).collect(),
            read_write_files: super::READ_WRITE_DEVICES
                .iter()
                .map(PathBuf::from)
                .collect(),
        };
        let spec_json =
            serde_json::to_string(&spec).map_err(|e| SandboxError::Prepare(e.to_string()))?;
        let (ours, theirs) =
            packet::pair().map_err(|e| SandboxError::Prepare(format!("socketpair: {e}")))?;
        let mut command = Command::new(helper);
        command
            .env_clear()
            .env(ZYGOTE_ENV, spec_json)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let theirs_raw = theirs.as_raw_fd();
        // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                if theirs_raw == CONTROL_FD {
                    if libc::fcntl(CONTROL_FD, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(theirs_raw, CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut process = command
            .spawn()
            .map_err(|e| SandboxError::Prepare(format!("starting {}: {e}", helper.display())))?;
        drop(theirs);
        let control = Arc::new(ours);
        let first = match readable_within(control.as_fd(), START_TIMEOUT) {
            Ok(true) => packet::recv(control.as_fd(), false),
            Ok(false) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer within 10 s",
            )),
            Err(err) => Err(err),
        };
        let setup = match first.map(|p| p.map(|p| p.decode::<FromZygote>())) {
            Ok(Some(Ok(FromZygote::Ready))) => Ok(()),
            // A namespace the kernel refused: say what to do about it here
            // (AppArmor, a container's seccomp profile, a namespace limit).
            Ok(Some(Ok(FromZygote::SetupFailed { message })))
                if message.starts_with("cannot create user/network namespaces") =>
            {
                Err(super::KernelProbe::get().advice(&message))
            }
            Ok(Some(Ok(FromZygote::SetupFailed { message }))) => Err(message),
            Ok(Some(Ok(other))) => Err(format!("unexpected first message {other:?}")),
            Ok(Some(Err(err))) => Err(format!("unreadable first message: {err}")),
            Ok(None) => Err("the helper exited before it was ready".into()),
            Err(err) => Err(format!("waiting for the helper: {err}")),
        };
        if let Err(message) = setup {
            let _ = process.kill();
            let _ = process.wait();
            return Err(SandboxError::Setup(message));
        }
        let shared = Arc::new(Shared {
            spares: Mutex::new(VecDeque::new()),
            failure: Mutex::new(None),
            pending: AtomicUsize::new(0),
            changed: Notify::new(),
            alive: AtomicBool::new(true),
        });
        let (reader_control, reader_shared) = (control.clone(), shared.clone());
        let expected = SpareOwner {
            zygote_pid: process.id(),
            uid: key.uid,
        };
        std::thread::Builder::new()
            .name("sandbox-zygote".into())
            .spawn(move || read_replies(&reader_control, &reader_shared, expected))
            .map_err(|e| SandboxError::Prepare(format!("reader thread: {e}")))?;
        let zygote = Zygote {
            control,
            send_lock: Mutex::new(()),
            shared,
            last_used: AtomicU64::new(0),
            oom_seen: AtomicU64::new(0),
            process: Some(process),
            cgroup,
        };
        // The first calls should find spares waiting.
        for _ in 0..SPARES_READY {
            zygote.request_spare();
        }
        Ok(zygote)
    }

    /// Whether the zygote process is still there.
    pub(crate) fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    fn request_spare(&self) {
        self.shared.pending.fetch_add(1, Ordering::SeqCst);
        let _guard = self.send_lock.lock().unwrap_or_else(|e| e.into_inner());
        if packet::send(self.control.as_fd(), &ToZygote::Spawn, &[]).is_err() {
            self.shared.pending.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// The first live spare in the queue. Spares beyond
    /// [`MAX_IDLE_SPARES`] (left from a burst of concurrent calls, each of
    /// which was replaced when it ended) are dropped: their inits exit
    /// unheard, and the zygote does not replace them.
    fn pop_live_spare(&self) -> Option<Spare> {
        let mut spares = self.shared.spares.lock().unwrap_or_else(|e| e.into_inner());
        while spares.len() > MAX_IDLE_SPARES + 1 {
            spares.pop_back();
        }
        while let Some(spare) = spares.pop_front() {
            if spare.is_alive() {
                return Some(spare);
            }
        }
        None
    }

    /// Takes a waiting process for one call; if none is waiting, asks for
    /// one and waits for it. (The zygote makes each call's successor itself
    /// when the call has ended.)
    pub(crate) async fn take_spare(&self) -> Result<Spare, SandboxError> {
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(spare) = self.pop_live_spare() {
                return Ok(spare);
            }
            // A named failure first: a zygote given up on is also not alive.
            let failure = self
                .shared
                .failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(message) = failure {
                return Err(SandboxError::Setup(message));
            }
            if !self.is_alive() {
                return Err(SandboxError::Setup("the sandbox zygote has exited".into()));
            }
            if self.shared.pending.load(Ordering::SeqCst) == 0 {
                self.request_spare();
            }
            if tokio::time::timeout(START_TIMEOUT, changed).await.is_err() {
                return Err(SandboxError::Setup(
                    "no sandboxed process became ready within 10 s".into(),
                ));
            }
        }
    }

    /// Kills the zygote itself, and with it every call it made.
    pub(crate) fn terminate(&self) {
        if let Some(process) = &self.process {
            // Our own child, not reaped before drop, so the pid is its own.
            if let Ok(pid) = i32::try_from(process.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        self.shared.alive.store(false, Ordering::SeqCst);
    }

    /// Whether this zygote's calls run in a memory and pids cgroup.
    pub(crate) fn has_cgroup(&self) -> bool {
        self.cgroup.is_some()
    }

    /// Whether the memory controller has killed a process in this zygote's
    /// cgroup since the last time anyone asked (calls that share the cgroup
    /// share the count; a call only asks when it ended badly).
    pub(crate) fn new_oom_kills(&self) -> bool {
        let Some(cgroup) = &self.cgroup else {
            return false;
        };
        let now = cgroup.oom_kills();
        self.oom_seen.swap(now, Ordering::SeqCst) < now
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        self.shared.alive.store(false, Ordering::SeqCst);
        // End of stream tells the zygote to kill what it made and exit.
        let _ =
            nix::sys::socket::shutdown(self.control.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let process = self.process.take();
        let cgroup = self.cgroup.take();
        // Reaping and removing the cgroup may wait; never on the caller.
        // (The calls' tmp dirs live in the zygote's own tmpfs and go with
        // its mount namespace.) A process about to exit waits for these
        // threads in [`wait_for_cleanup`], so its cgroups go with it.
        let spawned = std::thread::Builder::new()
            .name("sandbox-zygote-exit".into())
            .spawn(move || {
                if let Some(mut process) = process {
                    let _ = process.wait();
                }
                drop(cgroup);
            });
        if let Ok(handle) = spawned {
            let mut pending = CLEANUPS.lock().unwrap_or_else(|p| p.into_inner());
            pending.retain(|h| !h.is_finished());
            pending.push(handle);
        }
    }
}

/// Clean-up threads of zygotes that were dropped (see [`wait_for_cleanup`]).
static CLEANUPS: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// Waits, up to `limit`, until every dropped zygote has exited and its
/// cgroup is removed. A program that exits right after its last call (the
/// `agent` CLI) calls this after dropping its sandboxes; otherwise its
/// cgroups would outlive it until another runtime sweeps them. Returns
/// whether everything was cleaned up in time. Blocking.
pub fn wait_for_cleanup(limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let mut pending = CLEANUPS.lock().unwrap_or_else(|p| p.into_inner());
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut *pending)
            .into_iter()
            .partition(|h| h.is_finished());
        *pending = waiting;
        let empty = pending.is_empty();
        drop(pending);
        for handle in done {
            let _ = handle.join();
        }
        if empty {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether `fd` turns readable within `limit` (zero: right now).
fn readable_within(fd: std::os::fd::BorrowedFd<'_>, limit: Duration) -> std::io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let millis = i32::try_from(limit.as_millis()).unwrap_or(i32::MAX);
    let timeout = PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX);
    let mut entries = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut entries, timeout)
        .map(|ready| ready > 0)
        .map_err(std::io::Error::from)
}

/// The reader thread: queues each spare the zygote sends; at end of stream
/// marks the zygote dead. Every change wakes the callers waiting for one.
fn read_replies(control: &OwnedFd, shared: &Shared, expected: SpareOwner) {
    // Spares that arrive dead, in a row: a few happen as the zygote shuts
    // down; an endless run would keep callers waiting for ever.
    let mut gone_in_a_row = 0u32;
    while let Ok(Some(reply)) = packet::recv(control.as_fd(), false) {
        match reply.decode::<FromZygote>() {
            Ok(FromZygote::Spare) => {
                let mut fds = reply.fds.into_iter();
                if let (Some(channel), Some(pidfd), None) = (fds.next(), fds.next(), fds.next()) {
                    match expected.check(&pidfd) {
                        Ok(()) => {
                            gone_in_a_row = 0;
                            shared
                                .spares
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push_back(Spare { channel, pidfd })
                        }
                        Err(SpareRejection::Gone) if gone_in_a_row >= MAX_GONE_IN_A_ROW => {
                            *shared.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(
                                "the sandbox zygote keeps sending processes that have exited"
                                    .into(),
                            );
                            break;
                        }
                        // Its init died before it arrived (the zygote shuts
                        // down as the runtime exits, or the init was
                        // killed): nothing to use and nothing amiss.
                        Err(SpareRejection::Gone) => {
                            gone_in_a_row += 1;
                            tracing::debug!("a spare's init exited before it was handed over");
                        }
                        Err(SpareRejection::Foreign(why)) => {
                            tracing::error!(%why, "the sandbox zygote sent a spare that is not its own; stopping it");
                            *shared.failure.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(format!("the sandbox zygote sent a bad spare: {why}"));
                            break;
                        }
                    }
                }
            }
            Ok(FromZygote::SpawnFailed { message }) => {
                *shared.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
            }
            _ => continue,
        }
        let _ = shared
            .pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        shared.changed.notify_waiters();
    }
    shared.alive.store(false, Ordering::SeqCst);
    shared.changed.notify_waiters();
}

/// What a spare's init must be: a child of the zygote this runtime started,
/// running as the sandbox's uid. The zygote runs as that uid, so what it
/// sends is untrusted input: a pidfd that named any other process would let
/// whoever speaks for the zygote make the runtime kill that process when a
/// call times out.
#[derive(Debug, Clone, Copy)]
struct SpareOwner {
    zygote_pid: u32,
    uid: u32,
}

impl SpareOwner {
    /// Checks `pidfd` against this owner: its pid from `fdinfo`, then that
    /// pid's parent and uids, then that the pidfd's process is still alive
    /// (so the pid was not reused in between).
    fn check(&self, pidfd: &OwnedFd) -> Result<(), SpareRejection> {
        let foreign = SpareRejection::Foreign;
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))
            .map_err(|e| foreign(format!("fdinfo: {e}")))?;
        let pid = field(&fdinfo, "Pid:")
            .and_then(|v| v.parse::<i64>().ok())
            .ok_or_else(|| foreign("the descriptor is not a pidfd".into()))?;
        if pid <= 0 {
            // The kernel shows -1 for a pidfd whose process has been reaped.
            return Err(SpareRejection::Gone);
        }
        let status = match std::fs::read_to_string(format!("/proc/{pid}/status")) {
            Ok(status) => status,
            // Gone between the two reads: the directory is missing, or
            // the read finds the process dead (ESRCH).
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ESRCH) =>
            {
                return Err(SpareRejection::Gone)
            }
            Err(e) => return Err(foreign(format!("status of {pid}: {e}"))),
        };
        let parent = field(&status, "PPid:").and_then(|v| v.parse::<u32>().ok());
        if parent != Some(self.zygote_pid) {
            return Err(foreign(format!(
                "process {pid} is not a child of the zygote"
            )));
        }
        let uid = self.uid.to_string();
        let uids_match =
            field(&status, "Uid:").is_some_and(|v| v.split_whitespace().all(|id| id == uid));
        if !uids_match {
            return Err(foreign(format!(
                "process {pid} does not run as uid {}",
                self.uid
            )));
        }
        match readable_within(pidfd.as_fd(), Duration::ZERO) {
            Ok(false) => Ok(()),
            Ok(true) => Err(SpareRejection::Gone),
            Err(e) => Err(foreign(format!("polling the pidfd of {pid}: {e}"))),
        }
    }
}

/// Why a spare the zygote sent is not used.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SpareRejection {
    /// Its init has exited already: dropped, and the zygote goes on.
    Gone,
    /// It is not a live child of the zygote running as the sandbox uid:
    /// the zygote is not trusted any further.
    Foreign(String),
}

/// The value of `key` (`"PPid:"`) in a `/proc` status-style text.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|line| line.strip_prefix(key))
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pidfd_of(pid: u32) -> OwnedFd {
        // SAFETY: pidfd_open with a plain pid; the result is checked.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        // SAFETY: pidfd_open returned a new descriptor that we now own.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) }
    }

    /// What a zygote sends is untrusted: a pidfd for any process but a live
    /// child of the runtime's own zygote, running as the sandbox's uid, is
    /// refused (else a timeout would make the runtime kill that process).
    #[test]
    fn spares_that_are_not_the_zygotes_own_children_are_refused() {
        let me = std::process::id();
        let uid = nix::unistd::geteuid().as_raw();
        let mut child = Command::new("sleep").arg("5").spawn().expect("spawn");
        let child_fd = pidfd_of(child.id());
        let cases = [
            (
                "our child, as if we were the zygote",
                SpareOwner {
                    zygote_pid: me,
                    uid,
                },
                &child_fd,
                true,
            ),
            (
                "a child of another zygote",
                SpareOwner {
                    zygote_pid: me + 1,
                    uid,
                },
                &child_fd,
                false,
            ),
            (
                "a process of another uid",
                SpareOwner {
                    zygote_pid: me,
                    uid: uid.wrapping_add(1),
                },
                &child_fd,
                false,
            ),
        ];
        for (case, owner, fd, accepted) in cases {
            let verdict = owner.check(fd);
            if accepted {
                assert_eq!(verdict, Ok(()), "{case}");
            } else {
                assert!(
                    matches!(verdict, Err(SpareRejection::Foreign(_))),
                    "{case}: {verdict:?}"
                );
            }
        }
        // Not a child of anyone here: this very process.
        let own = pidfd_of(me);
        assert!(SpareOwner {
            zygote_pid: me,
            uid
        }
        .check(&own)
        .is_err_and(|why| matches!(why, SpareRejection::Foreign(_))));
        // An exited child, even at the right parent and uid, is not used,
        // but it is no sign of a foreign zygote either: the zygote kills
        // its inits as the runtime exits. Both before and after the reap
        // (fdinfo then says `Pid: -1`).
        let owner = SpareOwner {
            zygote_pid: me,
            uid,
        };
        let _ = child.kill();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !readable_within(child_fd.as_fd(), Duration::from_millis(50)).unwrap_or(false) {
            assert!(
                std::time::Instant::now() < deadline,
                "the child never exited"
            );
        }
        assert_eq!(
            owner.check(&child_fd),
            Err(SpareRejection::Gone),
            "a zombie"
        );
        let _ = child.wait();
        assert_eq!(owner.check(&child_fd), Err(SpareRejection::Gone), "reaped");
        // A descriptor that is no pidfd at all.
        let file: OwnedFd = std::fs::File::open("/dev/null").expect("open").into();
        assert!(SpareOwner {
            zygote_pid: me,
            uid
        }
        .check(&file)
        .is_err());
    }

    /// A hostile zygote could answer every spawn request with a spare whose
    /// process has already exited, keeping a caller waiting for ever: past
    /// a run of them it is given up on, with a named failure. A few (as at
    /// shutdown) are dropped quietly.
    #[test]
    fn a_zygote_that_keeps_sending_dead_spares_is_given_up_on() {
        let uid = nix::unistd::geteuid().as_raw();
        let mut child = Command::new("true").spawn().expect("spawn");
        let dead = pidfd_of(child.id());
        let _ = child.wait();
        for (sent, given_up) in [(3, false), (MAX_GONE_IN_A_ROW as usize + 4, true)] {
            let (ours, theirs) = packet::pair().expect("socketpair");
            for _ in 0..sent {
                packet::send(
                    theirs.as_fd(),
                    &FromZygote::Spare,
                    &[dead.as_raw_fd(), dead.as_raw_fd()],
                )
                .expect("send");
            }
            drop(theirs);
            let shared = Shared {
                spares: Mutex::new(VecDeque::new()),
                failure: Mutex::new(None),
                pending: AtomicUsize::new(sent),
                changed: Notify::new(),
                alive: AtomicBool::new(true),
            };
            let owner = SpareOwner {
                zygote_pid: std::process::id(),
                uid,
            };
            read_replies(&ours, &shared, owner);
            let failure = shared.failure.lock().expect("lock").clone();
            assert_eq!(
                failure.is_some_and(|f| f.contains("keeps sending processes that have exited")),
                given_up,
                "{sent} dead spares"
            );
            assert!(shared.spares.lock().expect("lock").is_empty());
            assert!(!shared.alive.load(Ordering::SeqCst));
        }
    }
}
