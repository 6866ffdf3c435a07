//! The audit log: one JSON line per decision and per result, appended as
//! it goes, and mirrored as `tracing` events.
//!
//! Durability: [`AuditLog::append`] returns once its line is written to
//! the file (one `write` to an `O_APPEND` descriptor), so a record survives
//! the runtime being killed (`kill -9`) right after; only while a rewrite
//! holds the log does it hand the record to a writer thread of the log's
//! own instead of waiting (an async caller must not block), which appends
//! it, in order, when the rewrite is done. Making it survive a
//! power loss (`fdatasync`) is the job of a syncer thread of the log's own,
//! woken by every append and syncing whatever arrived since its last sync,
//! so that no caller (an async task) waits for the disk; a record reaches
//! the disk one sync after it was appended, and the thread syncs a last
//! time when the log is dropped.
//!
//! Deleting a session, or purging expired data, rewrites the log without
//! the records concerned ([`rewrite`]): the new file replaces the old one by
//! `rename` under an exclusive `flock`, and every append takes a shared
//! `flock` and checks that its descriptor is still the file at the path,
//! reopening it if not, so that no record another process appends while a
//! rewrite runs is lost.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use stack_seal::record::{read_records, same_file, Appender, Hold, RecordWriter};
use stack_seal::Vault;

use serde::Serialize;
use serde_json::Value;

/// One audit record.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum AuditRecord {
    /// The policy decided about a call (before anything ran).
    Decision {
        /// Unix time in milliseconds.
        time_ms: u64,
        /// The session.
        session: String,
        /// The call id.
        call_id: String,
        /// The tool.
        tool: String,
        /// The arguments (redacted).
        arguments: Value,
        /// The rule that decided.
        rule: String,
        /// allow, ask or deny.
        decision: String,
        /// The approval answer, when asked.
        approval: Option<String>,
        /// The reason, when there is one.
        reason: Option<String>,
    },
    /// A call finished (or was refused).
    Result {
        /// Unix time in milliseconds.
        time_ms: u64,
        /// The session.
        session: String,
        /// The call id.
        call_id: String,
        /// The tool.
        tool: String,
        /// The outcome status.
        status: String,
        /// Wall time.
        duration_ms: u64,
        /// The limit that stopped it, if any.
        limit: Option<stack_types::Limit>,
        /// The error, if any (redacted).
        error: Option<String>,
    },
    /// A connection a call's code asked the egress proxy for (a network
    /// allowlist), allowed or refused.
    Egress {
        /// Unix time in milliseconds (when the call's result was recorded).
        time_ms: u64,
        /// The session.
        session: String,
        /// The call id.
        call_id: String,
        /// The tool.
        tool: String,
        /// The host, port, resolved address, protocol, decision, rule and
        /// bytes each way.
        #[serde(flatten)]
        record: stack_types::EgressRecord,
    },
    /// Stored data was removed: a session deleted (`agent sessions
    /// delete`), or data past `[privacy] max_age_days` purged. Names no
    /// content: the session id (or `*` for a purge by age), what kind of
    /// removal, and how many files and audit records went.
    Deleted {
        /// Unix time in milliseconds.
        time_ms: u64,
        /// The session deleted, or `*`.
        session: String,
        /// `delete`, `purge_expired` or `purge_all`.
        removal: Removal,
        /// Files removed (transcripts, KV state, consent records, history).
        files: usize,
        /// Audit records removed.
        audit_records: usize,
    },
}

/// Why stored data was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Removal {
    /// One session, on its owner's request.
    Delete,
    /// Everything older than the retention period.
    PurgeExpired,
    /// Every session.
    PurgeAll,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The context the audit log is sealed for.
const CONTEXT: &str = "audit";

/// An append-only JSONL audit log (sealed when its vault seals: see
/// [`stack_seal`]).
#[derive(Debug)]
pub struct AuditLog {
    shared: Arc<Shared>,
    /// Records a rewrite held off, for the writer thread, in order.
    deferred: std::sync::mpsc::Sender<Vec<u8>>,
}

/// What the log's callers, its syncer and its writer thread share.
#[derive(Debug)]
struct Shared {
    path: PathBuf,
    vault: Arc<Vault>,
    /// Also the syncer thread's (which holds nothing else, so that it ends
    /// when the last holder of `sync` does).
    file: Arc<Mutex<Appender>>,
    /// Wakes the syncer thread (a full channel means a sync is pending).
    sync: std::sync::mpsc::SyncSender<()>,
    /// Records handed to the writer thread and not yet written: while any
    /// are, later ones queue behind them, so the log keeps their order.
    pending: std::sync::atomic::AtomicUsize,
}

/// Whether an append went to the file now.
enum Appended {
    /// Written.
    Now,
    /// A rewrite holds the log, or replaced it: the writer thread must.
    Later,
}

fn sealing_error(err: stack_seal::SealError) -> std::io::Error {
    match err {
        stack_seal::SealError::Io { source, .. } => source,
        other => std::io::Error::other(other),
    }
}

impl Shared {
    /// Appends `line` if that needs no waiting: the file is not held by a
    /// rewrite (a shared `flock` taken without blocking) and is still the
    /// one at the path.
    fn try_append(&self, line: &[u8]) -> std::io::Result<Appended> {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match file.file().try_lock_shared() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => return Ok(Appended::Later),
                Err(std::fs::TryLockError::Error(err)) => return Err(err),
            }
            if same_file(file.file(), &self.path) {
                break;
            }
            // A rewrite that finished replaced it: the new file, if nobody
            // holds it now.
            let _ = file.file().unlock();
            match Appender::open(&self.path, CONTEXT, &self.vault, Hold::NothingIfFree) {
                Ok(reopened) => *file = reopened,
                Err(stack_seal::SealError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::WouldBlock =>
                {
                    return Ok(Appended::Later)
                }
                Err(err) => return Err(sealing_error(err)),
            }
        }
        // A line past what a record may hold is refused before anything is
        // written, or the log would not read back.
        let written = file
            .encode(line)
            .map_err(sealing_error)
            .and_then(|bytes| file.file().write_all(&bytes));
        // The shared lock taken above.
        let _ = file.file().unlock();
        written?;
        // Full: a sync is already due and will cover this line.
        let _ = self.sync.try_send(());
        Ok(Appended::Now)
    }

    /// Waits (on the writer thread) until no rewrite holds the log, and
    /// opens the file now at the path if a rewrite replaced it.
    fn wait_for_rewrite(&self) -> std::io::Result<()> {
        if let Ok(probe) = std::fs::File::open(&self.path) {
            probe.lock_shared()?;
            let _ = probe.unlock();
        }
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if !same_file(file.file(), &self.path) {
            *file = Appender::open(&self.path, CONTEXT, &self.vault, Hold::Nothing)
                .map_err(sealing_error)?;
        }
        Ok(())
    }
}

impl Drop for AuditLog {
    /// Gives the writer thread a moment to write what a rewrite held off
    /// (a process about to exit would lose it).
    fn drop(&mut self) {
        if !self.wait_written(std::time::Duration::from_secs(5)) {
            tracing::error!(path = %self.shared.path.display(), "audit records held off by a rewrite were not written before the log was closed");
        }
    }
}

impl AuditLog {
    /// Opens (creating, 0600) `path` for appending, in plaintext (a log
    /// sealed before is still appended to sealed, if its key is at hand:
    /// see [`open_with`](Self::open_with)).
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        AuditLog::open_with(path, Arc::new(Vault::plaintext()))
    }

    /// Opens (creating, 0600) `path` for appending, sealed with the
    /// vault's key when it seals.
    pub fn open_with(path: &Path, vault: Arc<Vault>) -> std::io::Result<AuditLog> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = Appender::open(path, CONTEXT, &vault, Hold::Nothing).map_err(sealing_error)?;
        let (sync, wake) = std::sync::mpsc::sync_channel::<()>(1);
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            vault,
            file: Arc::new(Mutex::new(file)),
            sync,
            pending: std::sync::atomic::AtomicUsize::new(0),
        });
        let syncing = Arc::clone(&shared.file);
        std::thread::Builder::new()
            .name("stack-audit-sync".into())
            .spawn(move || {
                // Whatever file the log has now (a rewrite may have
                // replaced it), synced outside the lock.
                let current = || {
                    syncing
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .file()
                        .try_clone()
                };
                while wake.recv().is_ok() {
                    if let Err(err) = current().and_then(|file| file.sync_data()) {
                        tracing::warn!(%err, "syncing the audit log failed");
                    }
                }
                let _ = current().and_then(|file| file.sync_data());
            })?;
        let (deferred, queue) = std::sync::mpsc::channel::<Vec<u8>>();
        let writing = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("stack-audit-write".into())
            .spawn(move || {
                use std::sync::atomic::Ordering;
                // Until the log is dropped and the queue drained.
                while let Ok(line) = queue.recv() {
                    loop {
                        match writing.try_append(&line) {
                            Ok(Appended::Now) => break,
                            Ok(Appended::Later) => {
                                if let Err(err) = writing.wait_for_rewrite() {
                                    tracing::error!(%err, path = %writing.path.display(), "could not write the audit log");
                                    break;
                                }
                            }
                            Err(err) => {
                                tracing::error!(%err, path = %writing.path.display(), "could not write the audit log");
                                break;
                            }
                        }
                    }
                    writing.pending.fetch_sub(1, Ordering::SeqCst);
                }
            })?;
        Ok(AuditLog { shared, deferred })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Waits until every record a rewrite held off is written, or
    /// `within` passes; returns whether they all are. Blocking: call it off
    /// async threads (dropping the log does, for up to 5 s).
    pub fn wait_written(&self, within: std::time::Duration) -> bool {
        use std::sync::atomic::Ordering;
        let deadline = std::time::Instant::now() + within;
        while self.shared.pending.load(Ordering::SeqCst) > 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }

    /// Whether it is sealed.
    pub fn sealed(&self) -> bool {
        self.shared
            .file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seals()
    }

    /// Appends one record to the file, and never waits to: when a rewrite
    /// (a deletion, a purge) holds the log, the record goes to the log's
    /// writer thread, which appends it, in order, once the rewrite is done.
    /// The syncer thread then puts it on disk (see the module docs).
    pub fn append(&self, record: &AuditRecord) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        match record {
            AuditRecord::Decision {
                tool,
                rule,
                decision,
                approval,
                call_id,
                ..
            } => {
                tracing::info!(target: "stack_runtime::audit", call_id, tool, rule, decision, approval = approval.as_deref(), "policy decision");
            }
            AuditRecord::Result {
                tool,
                status,
                duration_ms,
                limit,
                call_id,
                ..
            } => {
                tracing::info!(target: "stack_runtime::audit", call_id, tool, status, duration_ms, limit = limit.map(stack_types::Limit::as_str), "tool result");
            }
            AuditRecord::Egress {
                call_id,
                tool,
                record,
                ..
            } => {
                tracing::info!(target: "stack_runtime::audit", call_id, tool, host = %record.host, port = record.port, decision = ?record.decision, rule = %record.rule, "egress");
            }
            AuditRecord::Deleted {
                session,
                removal,
                files,
                ..
            } => {
                tracing::info!(target: "stack_runtime::audit", session, ?removal, files, "stored data removed");
            }
        }
        let line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        let shared = &self.shared;
        if shared.pending.load(Ordering::SeqCst) == 0 {
            if let Appended::Now = shared.try_append(&line)? {
                return Ok(());
            }
        }
        shared.pending.fetch_add(1, Ordering::SeqCst);
        self.deferred
            .send(line)
            .map_err(|_| std::io::Error::other("the audit log's writer thread is gone"))
    }
}

/// Rewrites the audit log at `path` without the records `drop` picks (each
/// record as parsed JSON; records that are not JSON are kept), then
/// appends the record `last` makes of how many went (none: nothing
/// appended, and the file is left alone when nothing went either); returns
/// that count. The log stays sealed when it was (with the vault's sealing
/// key, or its own), and is sealed when the vault seals. The new file
/// replaces the old by `rename` while an exclusive `flock` on the old one
/// holds every appender off (see the module docs); it is synced before the
/// rename, so a crash leaves the old log or the new one, never neither. A
/// record that fails authentication stops the rewrite, and the log is left
/// as it was. Blocking file work: call it off async threads.
pub fn rewrite(
    path: &Path,
    vault: &Vault,
    drop: impl Fn(&Value) -> bool,
    last: impl FnOnce(usize) -> Option<AuditRecord>,
) -> std::io::Result<usize> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let (old, last) = loop {
        let old = Appender::open(path, CONTEXT, vault, Hold::Nothing).map_err(sealing_error)?;
        old.file().lock()?;
        if same_file(old.file(), path) {
            break (old, last);
        }
        // Another rewrite replaced it meanwhile: lock the new one.
    };
    let records = read_records(path, Some(CONTEXT), vault).map_err(sealing_error)?;
    let key = match (vault.sealing_key(), &records.header) {
        (Some(key), _) => Some(key),
        (None, Some(header)) => vault.key(header.key),
        (None, None) => None,
    };
    // A sealed log keeps its cipher and format (a runtime from before
    // AES-256-GCM records, or before format 3, may still append to it); a
    // plaintext one takes the vault's.
    let cipher = records
        .header
        .as_ref()
        .map_or(vault.record_cipher(), |header| header.cipher);
    let mut new =
        RecordWriter::create(path, CONTEXT, key.map(|key| (key, cipher))).map_err(sealing_error)?;
    let mut removed = 0;
    for record in &records.items {
        let dropped = serde_json::from_slice::<Value>(record).is_ok_and(|record| drop(&record));
        if dropped {
            removed += 1;
        } else {
            new.write(record).map_err(sealing_error)?;
        }
    }
    let last = last(removed);
    if removed == 0 && last.is_none() {
        return Ok(0);
    }
    if let Some(last) = last {
        let closing = serde_json::to_vec(&last).map_err(std::io::Error::other)?;
        new.write(&closing).map_err(sealing_error)?;
    }
    new.finish().map_err(sealing_error)?;
    let _ = old.file().unlock();
    Ok(removed)
}
