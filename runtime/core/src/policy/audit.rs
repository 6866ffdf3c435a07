//! The audit log: one JSON line per decision and per result, appended as
//! it goes, and mirrored as `tracing` events.
//!
//! Durability: [`AuditLog::append`] returns once its line is written to
//! the file (one `write` to an `O_APPEND` descriptor), so a record survives
//! the runtime being killed (`kill -9`) right after. Making it survive a
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

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// An append-only JSONL audit log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: std::sync::Arc<Mutex<File>>,
    /// Wakes the syncer thread (a full channel means a sync is pending).
    sync: std::sync::mpsc::SyncSender<()>,
}

impl AuditLog {
    /// Opens (creating, 0600) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = open_for_append(path)?;
        let file = std::sync::Arc::new(Mutex::new(file));
        let syncing = std::sync::Arc::clone(&file);
        let (sync, wake) = std::sync::mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("stack-audit-sync".into())
            .spawn(move || {
                // Whatever file the log has now (a rewrite may have
                // replaced it), synced outside the lock.
                let current = || {
                    syncing
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .try_clone()
                };
                while wake.recv().is_ok() {
                    if let Err(err) = current().and_then(|file| file.sync_data()) {
                        tracing::warn!(%err, "syncing the audit log failed");
                    }
                }
                let _ = current().and_then(|file| file.sync_data());
            })?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            file,
            sync,
        })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record to the file; the syncer thread then puts it on
    /// disk (see the module docs).
    pub fn append(&self, record: &AuditRecord) -> std::io::Result<()> {
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
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // Shared lock: a rewrite (exclusive) is not in progress; and the
        // descriptor must still be the file at the path (a rewrite that
        // finished replaced it).
        let _shared = loop {
            let locked = FileLock::take(&file, nix::libc::LOCK_SH)?;
            if same_file(&file, &self.path) {
                break locked;
            }
            drop(locked);
            *file = open_for_append(&self.path)?;
        };
        (&*file).write_all(&line)?;
        // Full: a sync is already due and will cover this line.
        let _ = self.sync.try_send(());
        Ok(())
    }
}

fn open_for_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Whether `file` is the file now at `path`.
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// A `flock` held until dropped.
struct FileLock<'a>(&'a File);

impl<'a> FileLock<'a> {
    fn take(file: &'a File, how: nix::libc::c_int) -> std::io::Result<FileLock<'a>> {
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: flock on a descriptor `file` keeps open.
            if unsafe { nix::libc::flock(file.as_raw_fd(), how) } == 0 {
                return Ok(FileLock(file));
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: unlocking a descriptor the borrowed file keeps open.
        unsafe { nix::libc::flock(self.0.as_raw_fd(), nix::libc::LOCK_UN) };
    }
}

/// Rewrites the audit log at `path` without the records `drop` picks (each
/// record as parsed JSON; lines that are not JSON are kept), then appends
/// the record `last` makes of how many went (none: nothing appended, and
/// the file is left alone when nothing went either); returns that count. The new file replaces the
/// old by `rename` while an exclusive `flock` on the old one holds every
/// appender off (see the module docs); it is synced before the rename, so
/// a crash leaves the old log or the new one, never neither. Blocking file
/// work: call it off async threads.
pub fn rewrite(
    path: &Path,
    drop: impl Fn(&Value) -> bool,
    last: impl FnOnce(usize) -> Option<AuditRecord>,
) -> std::io::Result<usize> {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let old = open_for_append(path)?;
    let exclusive = FileLock::take(&old, nix::libc::LOCK_EX)?;
    if !same_file(&old, path) {
        // Another rewrite replaced it meanwhile: lock the new one.
        std::mem::drop(exclusive);
        return rewrite(path, drop, last);
    }
    let reader = BufReader::new(File::open(path)?);
    let temporary = path.with_extension(format!("rewrite-{}", std::process::id()));
    // A rewrite that fails half-way leaves no copy of the log behind.
    struct RemoveOnError<'a>(&'a Path, bool);
    impl Drop for RemoveOnError<'_> {
        fn drop(&mut self) {
            if !self.1 {
                let _ = std::fs::remove_file(self.0);
            }
        }
    }
    let mut guard = RemoveOnError(&temporary, false);
    let mut new = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    let mut removed = 0;
    for line in reader.split(b'\n') {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        let dropped = serde_json::from_slice::<Value>(&line).is_ok_and(|record| drop(&record));
        if dropped {
            removed += 1;
        } else {
            new.write_all(&line)?;
            new.write_all(b"\n")?;
        }
    }
    let last = last(removed);
    if removed == 0 && last.is_none() {
        return Ok(0);
    }
    if let Some(last) = last {
        let mut closing = serde_json::to_vec(&last).map_err(std::io::Error::other)?;
        closing.push(b'\n');
        new.write_all(&closing)?;
    }
    new.sync_all()?;
    std::fs::rename(&temporary, path)?;
    guard.1 = true;
    if let Some(parent) = path.parent() {
        if let Ok(folder) = File::open(parent) {
            let _ = folder.sync_all();
        }
    }
    std::mem::drop(exclusive);
    Ok(removed)
}
