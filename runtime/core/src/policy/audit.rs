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
    file: Mutex<File>,
    /// Wakes the syncer thread (a full channel means a sync is pending).
    sync: std::sync::mpsc::SyncSender<()>,
}

impl AuditLog {
    /// Opens (creating, 0600) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        let syncing = file.try_clone()?;
        let (sync, wake) = std::sync::mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("stack-audit-sync".into())
            .spawn(move || {
                while wake.recv().is_ok() {
                    if let Err(err) = syncing.sync_data() {
                        tracing::warn!(%err, "syncing the audit log failed");
                    }
                }
                let _ = syncing.sync_data();
            })?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            file: Mutex::new(file),
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
        }
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(&line)?;
        // Full: a sync is already due and will cover this line.
        let _ = self.sync.try_send(());
        Ok(())
    }
}
