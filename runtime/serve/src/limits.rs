//! Admission to the model: at most `max_running` generations (chat
//! completions and session turns) at once, at most `max_queue` waiting for
//! a place, and `429` past that, so a burst of clients gets a clear answer
//! instead of an unbounded wait. A session turn gives its place up while it
//! waits for a person to answer an approval, and takes one again
//! ([`Admission::reenter`]) before it goes on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::ApiError;

/// The running and waiting places (clones share them).
#[derive(Debug, Clone)]
pub struct Admission {
    running: Arc<Semaphore>,
    capacity: usize,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    /// Set at shutdown: new requests, and those still in line, are turned
    /// away; a turn that was admitted before still gets its place back.
    closed: CancellationToken,
}

/// A place among the running; dropping it lets the next one in.
#[derive(Debug)]
pub struct Place {
    _permit: OwnedSemaphorePermit,
}

/// Counts one waiter for as long as it waits (also when its request is
/// dropped while waiting).
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admission {
    /// Places for `running` at once and `waiting` in line.
    pub fn new(running: usize, waiting: usize) -> Admission {
        let running = running.max(1);
        Admission {
            running: Arc::new(Semaphore::new(running)),
            capacity: running,
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiting: waiting,
            closed: CancellationToken::new(),
        }
    }

    /// Waits for a place, or refuses at once when the line is full.
    pub async fn enter(&self) -> Result<Place, ApiError> {
        if self.closed.is_cancelled() {
            return Err(ApiError::ShuttingDown);
        }
        if let Ok(permit) = Arc::clone(&self.running).try_acquire_owned() {
            return Ok(Place { _permit: permit });
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::TooMany(format!(
                "the server is busy: {} generations running and {} waiting (its limits); retry later",
                self.capacity, self.max_waiting
            )));
        }
        let _waiting = Waiting(Arc::clone(&self.waiting));
        let permit = tokio::select! {
            permit = Arc::clone(&self.running).acquire_owned() => {
                permit.map_err(|_| ApiError::ShuttingDown)?
            }
            () = self.closed.cancelled() => return Err(ApiError::ShuttingDown),
        };
        Ok(Place { _permit: permit })
    }

    /// Waits for a running place for a turn that was admitted already and
    /// gave its place up while it waited for a person (an approval): it is
    /// not a new request, so the waiting line's limit does not apply.
    pub async fn reenter(&self) -> Result<Place, ApiError> {
        let permit = Arc::clone(&self.running)
            .acquire_owned()
            .await
            .map_err(|_| ApiError::ShuttingDown)?;
        Ok(Place { _permit: permit })
    }

    /// Admits no new request: those waiting for a place, and those that
    /// come later, get [`ApiError::ShuttingDown`]. Places held run on, and
    /// a turn that gave its place up for an approval still takes one
    /// again ([`Admission::reenter`]) within the grace period.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Generations running now.
    pub fn running(&self) -> usize {
        self.capacity - self.running.available_permits()
    }

    /// Requests waiting for a place.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn past_the_line_requests_are_refused_and_places_come_back() {
        let admission = Arc::new(Admission::new(1, 1));
        let first = admission.enter().await.expect("a free place");
        assert_eq!(admission.running(), 1);
        let second = tokio::spawn({
            let admission = Arc::clone(&admission);
            async move { admission.enter().await.map(|_| ()) }
        });
        while admission.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        let third = admission.enter().await;
        assert!(matches!(third, Err(ApiError::TooMany(_))), "{third:?}");
        drop(first);
        second.await.expect("joined").expect("the waiter got in");
        assert_eq!(admission.waiting(), 0);
        assert_eq!(admission.running(), 0);
    }

    #[tokio::test]
    async fn once_closed_waiters_and_newcomers_are_turned_away() {
        let admission = Arc::new(Admission::new(1, 4));
        let running = admission.enter().await.expect("a free place");
        let waiter = tokio::spawn({
            let admission = Arc::clone(&admission);
            async move { admission.enter().await.map(|_| ()) }
        });
        while admission.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        admission.close();
        let waited = waiter.await.expect("joined");
        assert!(matches!(waited, Err(ApiError::ShuttingDown)), "{waited:?}");
        drop(running);
        let later = admission.enter().await;
        assert!(matches!(later, Err(ApiError::ShuttingDown)), "{later:?}");
        // A turn that was admitted (and gave its place up for a person's
        // answer) goes on within the grace period.
        let again = admission.reenter().await.expect("an admitted turn");
        assert_eq!(admission.running(), 1);
        drop(again);
        assert_eq!(admission.running(), 0);
    }
}
