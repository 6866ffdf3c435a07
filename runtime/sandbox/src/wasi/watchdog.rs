//! The deadline for host calls a guest is blocked in.
//!
//! # Threat model
//!
//! The epoch deadline stops a guest only while it runs WebAssembly. A guest
//! blocked inside a host call is out of its reach, and one host call can
//! block for ever: opening a FIFO, which waits for the other end. Sandboxed
//! code in the process sandbox can make a FIFO in the workspace (any depth,
//! any mode, among any number of other files), and a WASI guest that opens
//! it would then outlive its `timeout_ms` for as long as nobody opens the
//! other end (red-team finding M2).
//!
//! This watchdog watches every live store's deadline. Once one has passed
//! by [`GRACE`] and its guest is still there, it interrupts the guest's
//! thread with a signal ([`INTERRUPT`]) whose handler does nothing and is
//! installed without `SA_RESTART`: a blocking system call on that thread
//! (a FIFO's `open`, a read of one) fails with `EINTR`, the host call
//! returns an error to the guest, and the epoch deadline stops the guest as
//! soon as it runs WebAssembly again. The signal repeats every [`TICK`]
//! until the store is gone, so a guest that retries the call is interrupted
//! again. Nothing is opened and no path is walked: permissions, depth,
//! mounts and tree size make no difference, and the runtime never touches
//! what the guest planted.
//!
//! A store's entry names the thread the guest runs on (the thread that made
//! the store). The entry is removed, under the registry's lock, before the
//! store is dropped, so the watchdog never signals a thread whose guest has
//! ended; signalling a thread between calls is harmless (the handler does
//! nothing, and only a blocked system call notices).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::pthread::{pthread_kill, pthread_self, Pthread};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// How long past its deadline a guest may stay blocked in a host call.
pub(crate) const GRACE: Duration = Duration::from_millis(500);
/// How often the watchdog looks.
const TICK: Duration = Duration::from_millis(100);
/// The signal that interrupts a blocked guest thread. `SIGURG` is ignored
/// by default and used by nothing else in the runtime.
const INTERRUPT: Signal = Signal::SIGURG;

type Deadline = Arc<Mutex<Option<Instant>>>;

struct Watched {
    deadline: Deadline,
    thread: Pthread,
    fired: Arc<AtomicBool>,
}

#[derive(Default)]
struct Registry {
    watched: Mutex<HashMap<u64, Watched>>,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

extern "C" fn interrupted(_: nix::libc::c_int) {}

/// Installs the signal handler and starts the watchdog's thread, once per
/// process. Call it from an unconfined thread (engine creation): a thread
/// inherits its spawner's credentials and mount namespace.
pub(crate) fn start() -> std::io::Result<()> {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            let action = SigAction::new(
                SigHandler::Handler(interrupted),
                // No SA_RESTART: the point is that blocked calls fail.
                SaFlags::empty(),
                SigSet::empty(),
            );
            // SAFETY: the handler does nothing at all, so it is
            // async-signal-safe; replacing SIGURG's default (ignore) affects
            // no other part of the runtime, and exec resets it for children.
            unsafe { sigaction(INTERRUPT, &action) }.map_err(|e| e.to_string())?;
            std::thread::Builder::new()
                .name("stack-wasi-watchdog".into())
                .spawn(watch)
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(std::io::Error::other)
}

/// A store's entry in the watchdog; dropping it ends the watch.
pub(crate) struct Watch {
    id: u64,
    fired: Arc<AtomicBool>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("id", &self.id).finish()
    }
}

impl Watch {
    /// Whether the watchdog had to interrupt this store's guest.
    pub(crate) fn fired(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.fired)
    }
}

/// Watches `deadline` for a guest that runs on the calling thread.
pub(crate) fn watch_store(deadline: &Deadline) -> Watch {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let fired = Arc::new(AtomicBool::new(false));
    registry()
        .watched
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            id,
            Watched {
                deadline: Arc::clone(deadline),
                thread: pthread_self(),
                fired: Arc::clone(&fired),
            },
        );
    Watch { id, fired }
}

impl Drop for Watch {
    fn drop(&mut self) {
        registry()
            .watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

fn watch() {
    loop {
        std::thread::sleep(TICK);
        // The lock is held while signalling: a store's entry leaves the
        // registry (under this lock) before its thread can end.
        let watched = registry().watched.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for entry in watched.values() {
            let overdue = entry
                .deadline
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|deadline| now >= deadline + GRACE);
            if overdue {
                entry.fired.store(true, Ordering::SeqCst);
                if let Err(err) = pthread_kill(entry.thread, INTERRUPT) {
                    tracing::warn!(%err, "could not interrupt a WASI guest past its deadline");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread blocked opening a FIFO (nobody at the other end) is let go
    /// once its deadline has passed by the grace.
    #[test]
    fn a_thread_blocked_on_a_fifo_is_interrupted_past_its_deadline() {
        start().expect("watchdog");
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let deadline: Deadline = Arc::new(Mutex::new(Some(Instant::now())));
        let started = Instant::now();
        let blocked = std::thread::spawn(move || {
            let watch = watch_store(&deadline);
            // Retry on EINTR as a guest would, until the deadline is gone.
            let opened = loop {
                match nix::fcntl::open(
                    &fifo,
                    nix::fcntl::OFlag::O_RDONLY,
                    nix::sys::stat::Mode::empty(),
                ) {
                    Err(nix::errno::Errno::EINTR) if started.elapsed() < Duration::from_secs(2) => {
                        continue
                    }
                    other => break other,
                }
            };
            (opened.map(drop), watch.fired().load(Ordering::SeqCst))
        });
        let (opened, fired) = blocked.join().expect("thread");
        assert_eq!(opened, Err(nix::errno::Errno::EINTR));
        assert!(fired);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
