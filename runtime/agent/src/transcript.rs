//! Session transcripts: one JSON record per message, appended and flushed
//! as the conversation goes, so a crash loses nothing already said (but
//! the message being written, which readers drop). Sealed when the
//! runtime's vault seals ([`stack_seal`]); read either way.

use std::path::{Path, PathBuf};

use stack_seal::record::{read_records, Appender, Hold};
use stack_seal::{SealError, Vault};

use stack_types::message::Message;

/// Why a transcript could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TranscriptError {
    /// Transcripts are off for this runtime.
    #[error("transcripts are not kept under this policy, so there is nothing to resume")]
    Disabled,
    /// No transcript has that id.
    #[error("no saved session `{0}`")]
    NotFound(String),
    /// The id is not a plain name.
    #[error("`{0}` is not a session id")]
    BadId(String),
    /// I/O.
    #[error("transcript {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The session is open in a running agent (its transcript is locked):
    /// deleting it now would leave what it writes next.
    #[error("session `{0}` is open in a running agent (REPL or server); close it, then delete it")]
    InUse(String),
    /// `agent export` of a session whose owner did not allow its use as
    /// training data.
    #[error("session `{0}` is not exported: its owner has not allowed its use as training data (in its REPL: /training allow; or `agent sessions training {0} allow`)")]
    NoConsent(String),
    /// The transcript is sealed and cannot be opened (no key, another
    /// key, a changed byte): nothing is changed.
    #[error(transparent)]
    Sealed(SealError),
    /// A line is not a message.
    #[error("transcript {path}:{line}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The line.
        line: usize,
        /// Why.
        reason: String,
    },
}

/// Checks that `id` is a plain session id (1 to 128 letters, digits, `-`
/// and `_`), so it can name a file and nothing else.
pub fn check_session_id(id: &str) -> Result<(), TranscriptError> {
    let plain = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if plain {
        Ok(())
    } else {
        Err(TranscriptError::BadId(id.to_string()))
    }
}

fn path_of(dir: &Path, id: &str) -> Result<PathBuf, TranscriptError> {
    check_session_id(id)?;
    Ok(dir.join(format!("{id}.jsonl")))
}

/// The context a session's transcript is sealed for.
fn context_of(id: &str) -> String {
    format!("transcript:{id}")
}

impl TranscriptError {
    /// A sealing error of session `id`'s file, as a transcript error (a
    /// file another process holds is [`TranscriptError::InUse`]).
    pub(crate) fn sealing(id: &str, err: SealError) -> TranscriptError {
        match err {
            SealError::Io { source, .. } if source.kind() == std::io::ErrorKind::WouldBlock => {
                TranscriptError::InUse(id.to_string())
            }
            SealError::Io { path, source } => TranscriptError::Io { path, source },
            other => TranscriptError::Sealed(other),
        }
    }
}

pub(crate) struct Writer {
    path: PathBuf,
    file: Appender,
}

impl Writer {
    pub(crate) fn open(dir: &Path, id: &str, vault: &Vault) -> Result<Writer, TranscriptError> {
        use std::os::unix::fs::DirBuilderExt;
        let path = path_of(dir, id)?;
        let io = |source| TranscriptError::Io {
            path: path.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        // A shared lock, held while the session is open: `agent sessions
        // delete` in another process sees it and refuses rather than leave
        // what it writes next.
        let file = Appender::open(&path, &context_of(id), vault, Hold::Shared)
            .map_err(|err| TranscriptError::sealing(id, err))?;
        Ok(Writer { path, file })
    }

    /// Appends `message` with the policy's secret patterns masked (in every
    /// string of it, the arguments of its tool calls included).
    pub(crate) fn append_redacted(
        &mut self,
        message: &Message,
        note: Option<serde_json::Value>,
        redactor: &stack_core::policy::Redactor,
    ) -> Result<(), TranscriptError> {
        let io = |source| TranscriptError::Io {
            path: self.path.clone(),
            source,
        };
        let mut value = serde_json::to_value(message).map_err(|e| io(std::io::Error::other(e)))?;
        // A note's fields go beside the message's; reading the transcript
        // back as messages ignores them.
        if let (Some(serde_json::Value::Object(fields)), serde_json::Value::Object(line)) =
            (note, &mut value)
        {
            for (key, field) in fields {
                line.entry(key).or_insert(field);
            }
        }
        redact_strings(&mut value, redactor);
        let line = serde_json::to_vec(&value).map_err(|e| io(std::io::Error::other(e)))?;
        self.file.append(&line).map_err(|err| match err {
            SealError::Io { source, .. } => io(source),
            other => TranscriptError::Sealed(other),
        })
    }
}

/// Masks secrets in every string of `value` but its structural fields
/// (role, ids, names, types), which a pattern must never rewrite: a call and
/// its result are paired by id on resume.
fn redact_strings(value: &mut serde_json::Value, redactor: &stack_core::policy::Redactor) {
    const STRUCTURAL: &[&str] = &["role", "id", "tool_call_id", "name", "type", "audio_sha256"];
    match value {
        serde_json::Value::String(text) => *text = redactor.redact(text),
        serde_json::Value::Array(items) => {
            for item in items {
                redact_strings(item, redactor);
            }
        }
        serde_json::Value::Object(fields) => {
            for (key, field) in fields.iter_mut() {
                if !(STRUCTURAL.contains(&key.as_str()) && field.is_string()) {
                    redact_strings(field, redactor);
                }
            }
        }
        _ => {}
    }
}

/// The messages of a saved session (sealed or plaintext; a message torn
/// by a crash while it was written is left out).
pub fn read_transcript(
    dir: &Path,
    id: &str,
    vault: &Vault,
) -> Result<Vec<Message>, TranscriptError> {
    let path = path_of(dir, id)?;
    if !path.exists() {
        return Err(TranscriptError::NotFound(id.to_string()));
    }
    let records = read_records(&path, Some(&context_of(id)), vault)
        .map_err(|err| TranscriptError::sealing(id, err))?;
    if records.torn_bytes > 0 {
        tracing::warn!(path = %path.display(), bytes = records.torn_bytes, "the transcript's last message was cut short (a crash while it was written); it is left out");
    }
    let mut messages = Vec::with_capacity(records.items.len());
    for (index, record) in records.items.iter().enumerate() {
        if record.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let message = serde_json::from_slice(record).map_err(|e| TranscriptError::Corrupt {
            path: path.clone(),
            line: index + 1,
            reason: e.to_string(),
        })?;
        messages.push(message);
    }
    Ok(messages)
}

/// Saved session ids, newest first.
pub fn list_sessions(dir: &Path) -> Vec<String> {
    let mut found: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e
                .file_name()
                .to_string_lossy()
                .strip_suffix(".jsonl")?
                .to_string();
            Some((e.metadata().and_then(|m| m.modified()).ok()?, name))
        })
        .collect();
    found.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    found.into_iter().map(|(_, name)| name).collect()
}

/// A saved session as one Stack 2.9 training example:
/// `{"messages": [...]}` with ChatML roles and OpenAI `tool_calls`; refused
/// ([`TranscriptError::NoConsent`]) unless the session's owner allowed its
/// use as training data.
pub fn export_chatml(dir: &Path, id: &str, vault: &Vault) -> Result<String, TranscriptError> {
    if !crate::store::SessionStore::new(dir).training_use(id)? {
        // Said only of a session that exists.
        read_transcript(dir, id, vault)?;
        return Err(TranscriptError::NoConsent(id.to_string()));
    }
    let messages = read_transcript(dir, id, vault)?;
    Ok(serde_json::json!({ "messages": messages }).to_string())
}
