//! Encryption at rest for everything a session keeps: transcripts, the
//! audit log, REPL history (record files, appended one record at a time)
//! and saved KV state (blobs, written whole).
//!
//! # Threat model
//!
//! **Protects against** someone who reads or copies the data folders but
//! not the key: a stolen disk or backup, another local user who gets a
//! copy of a file, a cloud sync of `~/.local/share`. With `[privacy]
//! encrypt = true` every such file is sealed with an authenticated cipher
//! (see [`RecordCipher`]): the records of new record files with
//! AES-256-GCM where the CPU has AES and carry-less multiply instructions
//! (ring's, under an HKDF-SHA256 subkey of the key, a random
//! per-appender prefix and the file's header; format 3), else with
//! XChaCha20-Poly1305 (ring's assembly ChaCha20-Poly1305
//! under the HChaCha20 subkey of that prefix, XChaCha20-Poly1305 byte for
//! byte), and blobs with XChaCha20-Poly1305 (RustCrypto's
//! `chacha20poly1305`). The file's header names its cipher, so files of
//! every format open on any CPU. The reader learns nothing of the content
//! but sizes and timing, and any change to a sealed byte is detected and
//! reported ([`SealError::Tampered`]), never silently read. Nonces never
//! repeat under a key: each appender draws a 128-bit random prefix and
//! counts its records after it (for AES-256-GCM, the prefix also makes a
//! key of its own, so 96-bit nonces are a count under a fresh key).
//!
//! **Binds each record to its file.** Every file starts with a header that
//! names the key (its [`KeyId`], a hash that reveals nothing of it), the
//! kind of file, a random file id, and its context (`transcript:ID`,
//! `audit`, `kv:ID`, `history:ID`); every record is authenticated together
//! with that header (as associated data, or, in format 3, because the
//! header is part of the appender's subkey) and its own length field (as
//! associated data, or in format 3 because GCM authenticates the
//! ciphertext's length, which the length field must match), so a record
//! copied in from
//! another file (even one of the same context), a whole file moved to
//! another session's name, a changed length or an edited header fails to
//! open. A blob's chunks also carry their index and whether they are the
//! last, so a blob cut short or reordered fails.
//!
//! **Crash safety.** Records are appended one `write` each, so `kill -9`
//! can tear at most the record being written: readers drop a torn last
//! record ([`Records::torn_bytes`]) and appenders cut it off before they
//! append (keeping the cut bytes beside the file as `NAME.torn-<ms>`, in
//! case a damaged length field made good records look torn), so a crash
//! loses that record and never the file. A zero-filled tail (a power loss)
//! and a header cut short count as torn too. Blobs, rewrites and key files
//! go to a temporary file, synced, then renamed (or linked) over. A file
//! that is neither sealed nor UTF-8 text, or sealed by an unknown version,
//! is refused and never converted.
//!
//! **Keys.** A key is 32 random bytes, held in memory that is wiped on
//! drop. Two derived values are not wiped, because ring does not wipe
//! them: its copy of an appender's subkey (it opens only that appender's
//! records, and lives in the process as the key does), and the HKDF
//! pseudorandom key from which AES-256-GCM subkeys are expanded, which is
//! as strong as the key itself and is left on the stack when a sealer or
//! reader is made. Reading the process's memory is outside what this
//! crate protects against (below). It
//! comes from the OS keyring where one answers (see [`keyring`]), else
//! from a 0600 key file the owner alone can read, created on first use,
//! else from `STACK_RUNTIME_KEY` (see [`keys`]). A wrong or
//! missing key is a clear error naming the key the file needs; nothing is
//! ever rewritten or removed because it could not be opened.
//!
//! **Does not protect against** an attacker who can run code as the user
//! outside the sandbox while the runtime runs (they can read the key file
//! or the process's memory; sandboxed code cannot: the configuration
//! folder with the key is hidden from it), against dropping, reordering
//! or duplicating whole records within one file (records carry no
//! sequence number: several processes append to the audit log), against
//! someone who can write the data folder replacing a sealed file by a
//! plaintext one (read, and then sealed, as a file from before encryption
//! was on), or against traffic analysis of file sizes (format 3 pads each
//! record to whole 16-byte blocks, so a record's length shows only to
//! within 16 bytes; formats 1 and 2 show it exactly). Plaintext files
//! written before encryption was turned on are sealed the next time they
//! are appended to, and by `agent keys rotate`; the blocks the plaintext
//! held are freed, not wiped, by the file system. A KV state in a `memfd`
//! is process memory, and may be swapped like any. The `tracing` mirror of
//! audit records (tool, call id, rule, decision; no arguments) is not
//! sealed: it goes wherever the host sends its logs.

pub mod blob;
pub mod key;
pub mod keyring;
pub mod keys;
pub mod record;
pub mod state;

pub use key::{Key, KeyId, RecordCipher, Vault};
pub use record::{Appender, Records};
pub use state::StateFile;

use std::path::PathBuf;

/// Why a sealed file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// I/O.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is sealed and no key is at hand.
    #[error("{} is encrypted (key {key}) and this runtime has no key: set `[privacy] encrypt = true`, or restore the key file (or the OS keyring's entry), or set STACK_RUNTIME_KEY to the key it was written with; the file is left as it is", path.display())]
    KeyMissing {
        /// The file.
        path: PathBuf,
        /// The key it needs.
        key: KeyId,
    },
    /// The file is sealed with a key the runtime does not have.
    #[error("{} is encrypted with key {key}, which is not this runtime's ({have}); restore that key (key file, OS keyring entry or STACK_RUNTIME_KEY); the file is left as it is", path.display())]
    WrongKey {
        /// The file.
        path: PathBuf,
        /// The key it needs.
        key: KeyId,
        /// The keys at hand.
        have: String,
    },
    /// A record or chunk failed authentication: the file was changed (a
    /// flipped byte, an edit) or moved from another session's name.
    #[error("{}: record {record} (at byte {offset}) fails authentication: the file was changed or does not belong here; it is left as it is", path.display())]
    Tampered {
        /// The file.
        path: PathBuf,
        /// The record (from 0).
        record: usize,
        /// Its byte offset.
        offset: u64,
    },
    /// The header or the framing is not what a sealed file holds.
    #[error("{}: not a sealed file this runtime can read: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A sealed blob ends before its last chunk.
    #[error("{}: the sealed file ends before its last chunk (cut short)", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
    },
    /// The file belongs to another context (another session's file renamed).
    #[error("{}: sealed for `{found}`, not `{expected}`", path.display())]
    WrongContext {
        /// The file.
        path: PathBuf,
        /// The context the caller expected.
        expected: String,
        /// The context in the header.
        found: String,
    },
}

impl SealError {
    pub(crate) fn io(path: &std::path::Path) -> impl Fn(std::io::Error) -> SealError + '_ {
        move |source| SealError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
