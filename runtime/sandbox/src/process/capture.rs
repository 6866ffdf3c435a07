//! Capped capture of a child's output: keep the first `cap` bytes, keep
//! reading (and dropping) the rest so the child never blocks on a full pipe.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Reads `reader` to its end; returns at most `cap` bytes and whether more came.
pub(crate) async fn read_capped(mut reader: impl AsyncRead + Unpin, cap: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                if n > room {
                    truncated = true;
                }
                kept.extend_from_slice(&buffer[..n.min(room)]);
            }
        }
    }
    (kept, truncated)
}
