//! What a session keeps on disk, and taking it away again: the files of
//! each session, its owner's consent to training use, deletion, and
//! retention.
//!
//! A session with id `ID` keeps, in the transcript folder (or its `serve/`
//! subfolder, for `agent serve` sessions):
//! - `ID.jsonl`: the transcript, one message per line;
//! - `ID.kv`: the model's saved KV state (a local model only);
//! - `ID.consent.json`: whether its owner allowed its use as training data
//!   (absent: not allowed);
//! - `history/ID`: the REPL lines typed in it (the REPL's up-arrow
//!   history);
//! - `ID.audio`: the audio of its spoken turns, only under `[privacy]
//!   keep_audio = true` (one JSON record per clip, see `crate::voice`);
//!
//! and its records in the shared audit log, `audit/audit.jsonl`.
//!
//! With `[privacy] encrypt = true` the transcript, KV state, history, kept
//! audio and audit log are sealed ([`stack_seal`]); the store reads and rewrites
//! them with its vault ([`SessionStore::with_vault`]).
//!
//! Deleting a session removes all of these, its audit records included
//! (the log is rewritten without them, see
//! [`stack_core::policy::audit::rewrite`]), and leaves one `deleted` audit
//! record that names the session and no content. Purging by age does the
//! same for every session whose newest file is older than the cut-off, and
//! drops audit records older than it. Every removal here is blocking file
//! work: async callers run it on the blocking pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use stack_seal::record::{read_records, Appender, Hold};
use stack_seal::Vault;

use stack_core::policy::audit::{self, AuditRecord, Removal};

use crate::transcript::{check_session_id, TranscriptError};

/// File suffixes of a session's files in its folder.
const SESSION_SUFFIXES: &[&str] = &[".jsonl", ".kv", ".consent.json", ".audio"];

/// Files a session may leave besides those (an interrupted consent write).
const LEFTOVER_SUFFIXES: &[&str] = &[".consent.json.tmp"];

/// The subfolder of `agent serve` sessions.
const SERVE_FOLDER: &str = "serve";

/// A session on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// Its id.
    pub id: String,
    /// The folder its files are in (the transcript folder or `serve/`).
    pub folder: PathBuf,
    /// When its newest file last changed.
    pub modified: SystemTime,
    /// Bytes of its files.
    pub bytes: u64,
    /// Whether its owner allowed its use as training data.
    pub training_use: bool,
}

/// What a deletion or purge removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removed {
    /// Sessions removed.
    pub sessions: Vec<String>,
    /// Files removed.
    pub files: usize,
    /// Audit records removed.
    pub audit_records: usize,
}

/// The sessions kept under one transcript folder.
#[derive(Debug, Clone)]
pub struct SessionStore {
    dir: PathBuf,
    vault: Arc<Vault>,
}

impl SessionStore {
    /// The store of `dir` (a policy's `transcript_dir`), writing
    /// plaintext and opening no sealed file.
    pub fn new(dir: impl Into<PathBuf>) -> SessionStore {
        SessionStore {
            dir: dir.into(),
            vault: Arc::new(Vault::plaintext()),
        }
    }

    /// With the keys that seal and open its files.
    pub fn with_vault(mut self, vault: Arc<Vault>) -> SessionStore {
        self.vault = vault;
        self
    }

    /// The keys it seals and opens files with.
    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    /// The messages of session `id`.
    pub fn read_transcript(
        &self,
        id: &str,
    ) -> Result<Vec<stack_types::message::Message>, TranscriptError> {
        let folder = self
            .find(id)?
            .map_or_else(|| self.dir.clone(), |s| s.folder);
        crate::transcript::read_transcript(&folder, id, &self.vault)
    }

    /// Session `id` as a training example (see
    /// [`export_chatml`](crate::transcript::export_chatml)).
    pub fn export_chatml(&self, id: &str) -> Result<String, TranscriptError> {
        let folder = self
            .find(id)?
            .map_or_else(|| self.dir.clone(), |s| s.folder);
        crate::transcript::export_chatml(&folder, id, &self.vault)
    }

    /// The lines typed in session `id`'s REPL, oldest first (none when it
    /// has no history).
    pub fn history(&self, id: &str) -> Result<Vec<String>, TranscriptError> {
        let path = self.history_file(id)?;
        if !path.exists() {
            return Ok(Vec::new());
        }
        let records = read_records(&path, Some(&format!("history:{id}")), &self.vault)
            .map_err(|err| TranscriptError::sealing(id, err))?;
        Ok(records
            .items
            .into_iter()
            .map(|line| String::from_utf8_lossy(&line).into_owned())
            .collect())
    }

    /// Opens session `id`'s history for appending typed lines (sealed
    /// when the vault seals).
    pub fn open_history(&self, id: &str) -> Result<History, TranscriptError> {
        use std::os::unix::fs::DirBuilderExt;
        let path = self.history_file(id)?;
        if let Some(parent) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|source| TranscriptError::Io {
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
        let context = format!("history:{id}");
        let file = Appender::open(&path, &context, &self.vault, Hold::Nothing)
            .map_err(|err| TranscriptError::sealing(id, err))?;
        Ok(History {
            file,
            context,
            vault: Arc::clone(&self.vault),
        })
    }

    /// The transcript folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The audit log every session of this folder shares.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit/audit.jsonl")
    }

    /// Where the REPL keeps the lines typed in session `id`.
    pub fn history_file(&self, id: &str) -> Result<PathBuf, TranscriptError> {
        check_session_id(id)?;
        Ok(self.dir.join("history").join(id))
    }

    /// Every session, newest first.
    pub fn list(&self) -> Vec<StoredSession> {
        let mut found: Vec<StoredSession> = Vec::new();
        for folder in [self.dir.clone(), self.dir.join(SERVE_FOLDER)] {
            let Ok(entries) = std::fs::read_dir(&folder) else {
                continue;
            };
            let mut ids: Vec<String> = entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    SESSION_SUFFIXES
                        .iter()
                        .find_map(|suffix| name.strip_suffix(suffix).map(str::to_string))
                })
                .filter(|id| check_session_id(id).is_ok())
                .collect();
            ids.sort();
            ids.dedup();
            for id in ids {
                if let Some(session) = self.describe(&folder, &id) {
                    found.push(session);
                }
            }
        }
        found.sort_by_key(|s| std::cmp::Reverse(s.modified));
        found
    }

    /// Session `id`, if any of its files exist.
    pub fn find(&self, id: &str) -> Result<Option<StoredSession>, TranscriptError> {
        check_session_id(id)?;
        Ok([self.dir.clone(), self.dir.join(SERVE_FOLDER)]
            .iter()
            .find_map(|folder| self.describe(folder, id)))
    }

    fn files_of(&self, folder: &Path, id: &str) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = SESSION_SUFFIXES
            .iter()
            .chain(LEFTOVER_SUFFIXES)
            .map(|suffix| folder.join(format!("{id}{suffix}")))
            .collect();
        files.push(folder.join("history").join(id));
        if folder != self.dir {
            files.push(self.dir.join("history").join(id));
        }
        files
    }

    fn describe(&self, folder: &Path, id: &str) -> Option<StoredSession> {
        let mut modified = None;
        let mut bytes = 0;
        for file in self.files_of(folder, id) {
            if let Ok(meta) = std::fs::symlink_metadata(&file) {
                bytes += meta.len();
                if let Ok(time) = meta.modified() {
                    modified = Some(modified.map_or(time, |m: SystemTime| m.max(time)));
                }
            }
        }
        let has_own_file = SESSION_SUFFIXES
            .iter()
            .any(|suffix| folder.join(format!("{id}{suffix}")).exists());
        if !has_own_file {
            return None;
        }
        Some(StoredSession {
            id: id.to_string(),
            folder: folder.to_path_buf(),
            modified: modified.unwrap_or(SystemTime::UNIX_EPOCH),
            bytes,
            training_use: read_consent(&folder.join(format!("{id}.consent.json"))),
        })
    }

    /// Whether session `id`'s owner allowed its use as training data
    /// (`agent export` refuses it otherwise).
    pub fn training_use(&self, id: &str) -> Result<bool, TranscriptError> {
        Ok(self.find(id)?.is_some_and(|s| s.training_use))
    }

    /// Records whether session `id`'s owner allows its use as training
    /// data.
    pub fn set_training_use(&self, id: &str, allowed: bool) -> Result<(), TranscriptError> {
        let folder = match self.find(id)? {
            Some(session) => session.folder,
            None => return Err(TranscriptError::NotFound(id.to_string())),
        };
        write_consent(&folder.join(format!("{id}.consent.json")), allowed)
    }

    /// Deletes session `id`: its audit records first (so that a delete
    /// cut short can be run again), then its transcript, KV state, consent
    /// record and history; leaves a `deleted` audit record. Refused while
    /// the session is open in a running agent ([`TranscriptError::InUse`]).
    pub fn delete(&self, id: &str) -> Result<Removed, TranscriptError> {
        check_session_id(id)?;
        let session = self.find(id)?;
        if let Some(session) = &session {
            self.check_closed(session)?;
        }
        let files = session.as_ref().map_or(0, |s| {
            self.files_of(&s.folder, &s.id)
                .iter()
                .filter(|f| f.exists())
                .count()
        });
        let audit_records = self.rewrite_audit(
            |record| record.get("session").and_then(|s| s.as_str()) == Some(id),
            id,
            Removal::Delete,
            files,
        )?;
        let Some(session) = session else {
            return if audit_records > 0 {
                Ok(Removed {
                    sessions: vec![id.to_string()],
                    files: 0,
                    audit_records,
                })
            } else {
                Err(TranscriptError::NotFound(id.to_string()))
            };
        };
        let files = self.remove_files(&session)?;
        Ok(Removed {
            sessions: vec![id.to_string()],
            files,
            audit_records,
        })
    }

    /// Refuses a session whose transcript a running agent holds open (its
    /// `Writer` keeps a shared lock on it).
    fn check_closed(&self, session: &StoredSession) -> Result<(), TranscriptError> {
        let path = session.folder.join(format!("{}.jsonl", session.id));
        let Ok(file) = std::fs::File::open(&path) else {
            return Ok(());
        };
        match file.try_lock() {
            Ok(()) => Ok(()),
            Err(std::fs::TryLockError::WouldBlock) => {
                Err(TranscriptError::InUse(session.id.clone()))
            }
            Err(std::fs::TryLockError::Error(source)) => Err(TranscriptError::Io { path, source }),
        }
    }

    /// Deletes every session whose newest file is older than `max_age`
    /// (every session with `None`), and the audit records older than it
    /// (all of them with `None`) or of a session removed.
    pub fn purge(&self, max_age: Option<Duration>) -> Result<Removed, TranscriptError> {
        let now = SystemTime::now();
        let cutoff = max_age.map(|age| now.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH));
        // Open sessions (a running agent holds them) are left, records and
        // all, for the next purge.
        let (expired, open): (Vec<StoredSession>, Vec<StoredSession>) = self
            .list()
            .into_iter()
            .filter(|s| cutoff.is_none_or(|cutoff| s.modified < cutoff))
            .partition(|s| self.check_closed(s).is_ok());
        let open: Vec<String> = open.into_iter().map(|s| s.id).collect();
        let mut removed = Removed::default();
        for session in &expired {
            removed.files += self.remove_files(session)?;
            removed.sessions.push(session.id.clone());
        }
        let cutoff_ms = cutoff.map(|cutoff| {
            cutoff
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        });
        let gone: Vec<String> = removed.sessions.clone();
        {
            removed.audit_records = self.rewrite_audit(
                |record| {
                    let old = match cutoff_ms {
                        Some(cutoff) => record
                            .get("time_ms")
                            .and_then(|t| t.as_u64())
                            .is_some_and(|t| t < cutoff),
                        None => true,
                    };
                    let session = record.get("session").and_then(|s| s.as_str());
                    let of_removed = session.is_some_and(|s| gone.iter().any(|g| g == s));
                    let of_open = session.is_some_and(|s| open.iter().any(|o| o == s));
                    !of_open && (old || of_removed)
                },
                "*",
                if max_age.is_some() {
                    Removal::PurgeExpired
                } else {
                    Removal::PurgeAll
                },
                removed.files,
            )?;
        }
        Ok(removed)
    }

    fn remove_files(&self, session: &StoredSession) -> Result<usize, TranscriptError> {
        let mut removed = 0;
        // Temporary files a seal or rewrite cut short left
        // (`ID.jsonl.seal-….tmp`), and torn records kept aside
        // (`ID.jsonl.torn-…`), beside the transcript and in `history/`.
        let leftovers = [
            session.folder.clone(),
            session.folder.join("history"),
            self.dir.join("history"),
        ]
        .into_iter()
        .flat_map(|folder| std::fs::read_dir(folder).into_iter().flatten())
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(&format!("{}.", session.id)))
                .is_some_and(|rest| {
                    (rest.contains(".seal-") && rest.ends_with(".tmp"))
                        || rest.contains("torn-")
                        || rest.starts_with("seal-")
                })
        });
        let files: Vec<PathBuf> = self
            .files_of(&session.folder, &session.id)
            .into_iter()
            .chain(leftovers)
            .collect();
        for file in files {
            match std::fs::remove_file(&file) {
                Ok(()) => removed += 1,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(TranscriptError::Io { path: file, source }),
            }
        }
        Ok(removed)
    }

    fn rewrite_audit(
        &self,
        drop: impl Fn(&serde_json::Value) -> bool,
        session: &str,
        removal: Removal,
        files: usize,
    ) -> Result<usize, TranscriptError> {
        // The folder's own log, and the log of its `serve/` sessions where
        // there is one.
        let serve_log = self.dir.join(SERVE_FOLDER).join("audit/audit.jsonl");
        let mut logs = vec![self.audit_log()];
        if serve_log.exists() {
            logs.push(serve_log);
        }
        // Records of earlier removals name no content and stay: they are
        // what shows that data was removed.
        let drop = |record: &serde_json::Value| {
            record.get("event").and_then(|e| e.as_str()) != Some("deleted") && drop(record)
        };
        let mut removed = 0;
        let main = self.audit_log();
        for path in logs {
            // A removal of files is always on record (the folder's log is
            // made for it); a log that is not there has nothing to drop.
            let made_for_the_record = files > 0 && path == main;
            if !(path.exists() || made_for_the_record) {
                continue;
            }
            // A `deleted` record when anything went (from this log, or
            // files); a purge that found nothing leaves the log alone.
            let session = session.to_string();
            removed += audit::rewrite(&path, &self.vault, drop, |audit_records| {
                (audit_records > 0 || files > 0).then(|| AuditRecord::Deleted {
                    time_ms: audit::now_ms(),
                    session,
                    removal,
                    files,
                    audit_records,
                })
            })
            .map_err(|source| TranscriptError::Io { path, source })?;
        }
        Ok(removed)
    }
}

/// A session's REPL history, open for appending.
#[derive(Debug)]
pub struct History {
    file: Appender,
    context: String,
    vault: Arc<Vault>,
}

impl History {
    /// Appends one typed line (a newline in it becomes a space).
    pub fn append(&mut self, line: &str) -> Result<(), TranscriptError> {
        let line = line.replace('\n', " ");
        // Sealed or rotated meanwhile (the file at the path replaced):
        // append to the new one, not the unlinked old one.
        if !stack_seal::record::same_file(self.file.file(), self.file.path()) {
            let path = self.file.path().to_path_buf();
            self.file = Appender::open(&path, &self.context, &self.vault, Hold::Nothing).map_err(
                |err| match err {
                    stack_seal::SealError::Io { path, source } => {
                        TranscriptError::Io { path, source }
                    }
                    other => TranscriptError::Sealed(other),
                },
            )?;
        }
        self.file.append(line.as_bytes()).map_err(|err| match err {
            stack_seal::SealError::Io { path, source } => TranscriptError::Io { path, source },
            other => TranscriptError::Sealed(other),
        })
    }
}

fn read_consent(path: &Path) -> bool {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|value| value.get("training_use").and_then(|v| v.as_bool()))
        .unwrap_or(false)
}

fn write_consent(path: &Path, allowed: bool) -> Result<(), TranscriptError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| TranscriptError::Io {
        path: path.to_path_buf(),
        source,
    };
    let record = serde_json::json!({
        "training_use": allowed,
        "time_ms": audit::now_ms(),
    });
    let temporary = path.with_extension("json.tmp");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(io)?;
    file.write_all(record.to_string().as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, path).map_err(io)
}
