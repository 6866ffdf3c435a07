//! Capped in-memory stdout/stderr for WASI guests.
//!
//! Past the cap the guest keeps writing successfully; the excess is dropped
//! and `truncated` is set. It never turns into a guest I/O error.
//! A sink can also watch for an end-of-frame marker (stateful sessions).

use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// What a sink has collected.
#[derive(Debug, Default)]
pub(crate) struct Collected {
    /// Bytes kept (at most the cap) for the current frame.
    pub bytes: Vec<u8>,
    /// Whether bytes were dropped.
    pub truncated: bool,
    /// The marker, when one was seen: the text between the marker's prefix
    /// and its closing NUL (for example the exit status).
    pub marker: Option<String>,
    /// Bytes after the last marker that may be the start of the next one.
    tail: Vec<u8>,
}

#[derive(Debug)]
struct Shared {
    collected: Mutex<Collected>,
    changed: Condvar,
    cap: usize,
    marker_prefix: Option<Vec<u8>>,
}

/// A capped output sink; clones share the same buffer.
#[derive(Debug, Clone)]
pub(crate) struct CappedOutput {
    shared: Arc<Shared>,
}

impl CappedOutput {
    /// A sink keeping at most `cap` bytes.
    pub(crate) fn new(cap: usize) -> Self {
        Self::with_marker(cap, None)
    }

    /// A sink that also watches for `\0PREFIX...\0` frame markers.
    pub(crate) fn with_marker(cap: usize, marker_prefix: Option<Vec<u8>>) -> Self {
        CappedOutput {
            shared: Arc::new(Shared {
                collected: Mutex::new(Collected::default()),
                changed: Condvar::new(),
                cap,
                marker_prefix,
            }),
        }
    }

    fn push(&self, data: &[u8]) {
        let shared = &self.shared;
        let mut collected = shared.collected.lock().unwrap_or_else(|p| p.into_inner());
        match &shared.marker_prefix {
            None => keep(&mut collected, data, shared.cap),
            Some(prefix) => {
                // Look for "\0" + prefix + status + "\0" across write boundaries.
                let mut pending = std::mem::take(&mut collected.tail);
                pending.extend_from_slice(data);
                let mut start = 0;
                while let Some(pos) = find(&pending[start..], &[0]) {
                    let at = start + pos;
                    let rest = &pending[at + 1..];
                    if rest.len() < prefix.len() + 1
                        && prefix.starts_with(&rest[..rest.len().min(prefix.len())])
                    {
                        // Maybe a marker split across writes: keep for later.
                        keep(&mut collected, &pending[start..at], shared.cap);
                        collected.tail = pending[at..].to_vec();
                        shared.changed.notify_all();
                        return;
                    }
                    if rest.starts_with(prefix) {
                        if let Some(end) = find(&rest[prefix.len()..], &[0]) {
                            keep(&mut collected, &pending[start..at], shared.cap);
                            let status = &rest[prefix.len()..prefix.len() + end];
                            collected.marker = Some(String::from_utf8_lossy(status).into_owned());
                            start = at + 1 + prefix.len() + end + 1;
                            continue;
                        }
                        keep(&mut collected, &pending[start..at], shared.cap);
                        collected.tail = pending[at..].to_vec();
                        shared.changed.notify_all();
                        return;
                    }
                    keep(&mut collected, &pending[start..=at], shared.cap);
                    start = at + 1;
                }
                keep(&mut collected, &pending[start..], shared.cap);
            }
        }
        shared.changed.notify_all();
    }

    /// Takes what was collected so far, leaving the sink empty.
    pub(crate) fn take(&self) -> Collected {
        let mut collected = self
            .shared
            .collected
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let tail = std::mem::take(&mut collected.tail);
        let mut taken = std::mem::take(&mut *collected);
        collected.tail = tail;
        taken.tail = Vec::new();
        taken
    }
}

fn keep(collected: &mut Collected, data: &[u8], cap: usize) {
    let room = cap.saturating_sub(collected.bytes.len());
    if data.len() > room {
        collected.truncated = true;
    }
    collected
        .bytes
        .extend_from_slice(&data[..data.len().min(room)]);
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(1 << 20)
    }
}

impl tokio::io::AsyncWrite for CappedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excess_is_dropped_not_failed() {
        let sink = CappedOutput::new(10);
        sink.push(b"0123456789");
        assert!(!sink.take().truncated);
        sink.push(b"0123456789abc");
        let collected = sink.take();
        assert_eq!(
            (collected.bytes.as_slice(), collected.truncated),
            (&b"0123456789"[..], true)
        );
    }

    #[test]
    fn markers_are_found_across_writes_and_removed() {
        let sink = CappedOutput::with_marker(100, Some(b"N1:".to_vec()));
        for chunk in [&b"hello\n\0N"[..], b"1:", b"0", b"\0"] {
            sink.push(chunk);
        }
        let collected = sink.take();
        assert_eq!(collected.bytes, b"hello\n");
        assert_eq!(collected.marker.as_deref(), Some("0"));
        // A NUL that is not a marker is kept.
        sink.push(b"a\0b\0N1:3\0");
        let collected = sink.take();
        assert_eq!(
            (collected.bytes.as_slice(), collected.marker.as_deref()),
            (&b"a\0b"[..], Some("3"))
        );
    }
}
