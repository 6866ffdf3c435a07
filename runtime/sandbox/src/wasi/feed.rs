//! The stdin of a stateful Python session, and the one signal the host
//! trusts for "this frame is over".
//!
//! # Threat model
//!
//! The guest is hostile: it can read everything in its own linear memory
//! (the driver's nonce included) and write anything to stdout and stderr.
//! So nothing the guest *writes* can say that a frame has ended: a forged
//! end-of-frame marker once made the host report a call as finished while
//! the code kept running with no deadline (red-team finding M6).
//!
//! What the guest cannot forge is being *blocked reading stdin with
//! nothing left to read*. The host hands each frame over in one piece; the
//! guest then runs until it makes a blocking read of this stream and there
//! is nothing to read. At that moment it sits inside a host call and,
//! having no threads, cannot run again until the host hands over the next
//! frame. Only a blocking read counts: polling stdin (`select`,
//! `poll_oneoff`) returns to the guest and so says nothing, and the mark is
//! taken back when the read ends. Between frames the store also interrupts
//! any WebAssembly at once (`StoreState::between_frames`). So:
//!
//! * a frame ends only when the guest waits on an empty stdin
//!   ([`FrameFeed::wait_idle`]), never on anything it printed;
//! * the wall-clock deadline stays in force until then, so code that
//!   prints a forged marker and keeps running is stopped by the deadline;
//! * code that reads the session's stdin itself ends its own frame early
//!   and is then blocked, not running; without the driver's status the
//!   host resets the session. (Code that also forges the status keeps the
//!   session and gets the next frame's code: no more than a cell that
//!   replaces `compile` in its own persistent state could do.)
//!
//! The exit status still comes from the driver's marker, which the guest
//! can forge, but only for its own frame: that is no more than code that
//! catches its own exception.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdinStream};
use wasmtime_wasi::p2::{InputStream, Pollable, StreamError, StreamResult};

#[derive(Debug, Default)]
struct State {
    /// Bytes handed over and not yet read by the guest.
    pending: VecDeque<u8>,
    /// The host closed stdin: the guest reads end of input.
    closed: bool,
    /// The guest asked for input while none was pending.
    waiting: bool,
    /// The guest's instance has ended.
    gone: bool,
    /// Async readers to wake when input arrives.
    readers: Vec<Waker>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the host when the guest starts waiting or ends.
    host: Condvar,
    /// Wakes the guest when input arrives or stdin closes.
    guest: tokio::sync::Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How a wait for the end of a frame ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameEnd {
    /// The guest read the whole frame and is waiting for the next one.
    Idle,
    /// The guest's instance ended (trap, exit or crash).
    Gone,
    /// Neither happened before the timeout.
    TimedOut,
}

/// The host's end: hands frames over and learns when the guest is idle.
/// Dropping it closes the guest's stdin.
#[derive(Debug)]
pub(crate) struct FrameFeed {
    shared: Arc<Shared>,
}

/// The guest's end, given to the WASI context as its stdin.
#[derive(Debug, Clone)]
pub(crate) struct GuestStdin {
    shared: Arc<Shared>,
}

/// A new feed and the stdin it feeds.
pub(crate) fn frame_feed() -> (FrameFeed, GuestStdin) {
    let shared = Arc::new(Shared::default());
    (
        FrameFeed {
            shared: Arc::clone(&shared),
        },
        GuestStdin { shared },
    )
}

impl FrameFeed {
    /// Hands `frame` to the guest in one piece.
    pub(crate) fn push(&self, frame: &[u8]) {
        let readers = {
            let mut state = self.shared.lock();
            state.pending.extend(frame);
            state.waiting = false;
            std::mem::take(&mut state.readers)
        };
        self.shared.guest.notify_one();
        readers.into_iter().for_each(Waker::wake);
    }

    /// Closes the guest's stdin: its next read sees end of input.
    pub(crate) fn close(&self) {
        let readers = {
            let mut state = self.shared.lock();
            state.closed = true;
            std::mem::take(&mut state.readers)
        };
        self.shared.guest.notify_one();
        readers.into_iter().for_each(Waker::wake);
    }

    /// A handle that waits for the guest to finish the frame.
    pub(crate) fn waiter(&self) -> IdleWaiter {
        IdleWaiter {
            shared: Arc::clone(&self.shared),
        }
    }
}

/// Waits, on any thread, for the end of a frame.
#[derive(Debug, Clone)]
pub(crate) struct IdleWaiter {
    shared: Arc<Shared>,
}

impl IdleWaiter {
    /// Blocks until the guest has read everything and waits for more, its
    /// instance ends, or `timeout` passes.
    pub(crate) fn wait_idle(&self, timeout: Duration) -> FrameEnd {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if state.gone {
                return FrameEnd::Gone;
            }
            if state.waiting && state.pending.is_empty() {
                return FrameEnd::Idle;
            }
            let now = Instant::now();
            if now >= deadline {
                return FrameEnd::TimedOut;
            }
            state = self
                .shared
                .host
                .wait_timeout(state, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

impl GuestStdin {
    /// Marks the guest's instance as ended (its thread calls this).
    pub(crate) fn guest_gone(&self) {
        self.shared.lock().gone = true;
        self.shared.host.notify_all();
    }

    /// Takes up to `size` pending bytes; `None` at end of input.
    fn take(&self, size: usize) -> Option<Vec<u8>> {
        let mut state = self.shared.lock();
        if state.pending.is_empty() && state.closed {
            return None;
        }
        let n = size.min(state.pending.len());
        Some(state.pending.drain(..n).collect())
    }

    /// Whether input (or end of input) is there.
    fn is_ready(&self) -> bool {
        let state = self.shared.lock();
        !state.pending.is_empty() || state.closed
    }

    /// [`GuestStdin::is_ready`]; if not, records that the guest is blocked
    /// reading and tells the host. The mark holds until `_reading` is
    /// dropped.
    fn ready_or_wait(&self, _reading: &Reading<'_>) -> bool {
        let mut state = self.shared.lock();
        if !state.pending.is_empty() || state.closed {
            return true;
        }
        state.waiting = true;
        self.shared.host.notify_all();
        false
    }
}

/// A blocking read in progress; takes its "waiting" mark back when it ends
/// (data came, or the host call was abandoned).
struct Reading<'a> {
    shared: &'a Shared,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.shared.lock().waiting = false;
    }
}

impl IsTerminal for GuestStdin {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdinStream for GuestStdin {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncRead + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn InputStream> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestStdin {
    /// A poll (`select`, `poll_oneoff`): waits for input without saying the
    /// guest is blocked, since a poll returns to the guest.
    async fn ready(&mut self) {
        loop {
            // Registered before the check, so a push in between still wakes.
            let notified = self.shared.guest.notified();
            if self.is_ready() {
                return;
            }
            notified.await;
        }
    }
}

#[wasmtime_wasi::async_trait]
impl InputStream for GuestStdin {
    fn read(&mut self, size: usize) -> StreamResult<Bytes> {
        match self.take(size) {
            Some(bytes) => Ok(Bytes::from(bytes)),
            None => Err(StreamError::Closed),
        }
    }

    /// The guest's blocking `fd_read` of stdin: the one place the guest is
    /// marked as waiting for the next frame.
    async fn blocking_read(&mut self, size: usize) -> StreamResult<Bytes> {
        let shared = Arc::clone(&self.shared);
        let reading = Reading { shared: &shared };
        loop {
            let notified = shared.guest.notified();
            if self.ready_or_wait(&reading) {
                return self.read(size);
            }
            notified.await;
        }
    }
}

impl tokio::io::AsyncRead for GuestStdin {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        match self.take(buf.remaining()) {
            None => Poll::Ready(Ok(())),
            Some(bytes) if !bytes.is_empty() => {
                buf.put_slice(&bytes);
                Poll::Ready(Ok(()))
            }
            Some(_) => {
                let mut state = self.shared.lock();
                if !state.pending.is_empty() || state.closed {
                    cx.waker().wake_by_ref();
                } else {
                    state.waiting = true;
                    state.readers.push(cx.waker().clone());
                    self.shared.host.notify_all();
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for FrameFeed {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_only_once_everything_handed_over_was_read_and_more_was_asked_for() {
        let (feed, mut stdin) = frame_feed();
        feed.push(b"3\nabc");
        assert_eq!(feed.waiter().wait_idle(Duration::ZERO), FrameEnd::TimedOut);
        assert_eq!(
            stdin.read(2).map(|b| b.to_vec()).ok(),
            Some(b"3\n".to_vec())
        );
        assert!(stdin.is_ready(), "input is still pending");
        assert_eq!(
            stdin.read(10).map(|b| b.to_vec()).ok(),
            Some(b"abc".to_vec())
        );
        // Read out, but not yet asking for more: still running.
        assert_eq!(feed.waiter().wait_idle(Duration::ZERO), FrameEnd::TimedOut);
        // A poll says nothing; a blocking read does, while it lasts.
        assert!(!stdin.is_ready());
        assert_eq!(feed.waiter().wait_idle(Duration::ZERO), FrameEnd::TimedOut);
        {
            let reading = Reading {
                shared: &stdin.shared,
            };
            assert!(!stdin.ready_or_wait(&reading));
            assert_eq!(feed.waiter().wait_idle(Duration::ZERO), FrameEnd::Idle);
        }
        assert_eq!(feed.waiter().wait_idle(Duration::ZERO), FrameEnd::TimedOut);
        feed.push(b"1\nx");
        assert_eq!(feed.waiter().wait_idle(Duration::ZERO), FrameEnd::TimedOut);
        feed.close();
        assert_eq!(
            stdin.read(10).map(|b| b.to_vec()).ok(),
            Some(b"1\nx".to_vec())
        );
        assert!(matches!(stdin.read(10), Err(StreamError::Closed)));
        stdin.guest_gone();
        assert_eq!(feed.waiter().wait_idle(Duration::ZERO), FrameEnd::Gone);
    }

    #[test]
    fn a_waiting_guest_wakes_when_a_frame_arrives() {
        let (feed, mut stdin) = frame_feed();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let reader = std::thread::spawn(move || runtime.block_on(stdin.blocking_read(16)));
        assert_eq!(
            feed.waiter().wait_idle(Duration::from_secs(10)),
            FrameEnd::Idle
        );
        feed.push(b"hi");
        let got = reader.join().expect("the reader thread");
        assert_eq!(got.map(|b| b.to_vec()).ok(), Some(b"hi".to_vec()));
    }
}
