//! Record files: a header, then records appended one `write` each.
//!
//! A sealed file is
//! `magic (8) ‖ key id (8) ‖ kind (1) ‖ file id (16, random) ‖ context
//! length (1) ‖ context`, then records, each `length (u32 LE) ‖ nonce (24)
//! ‖ ciphertext ‖ tag (16)`, each bound to the whole header (so a record
//! cannot be moved to another file, even one with the same context) and
//! to its length (so a changed length is caught). The magic's last byte is
//! the format, which names the records' cipher ([`RecordCipher`]): 1,
//! XChaCha20-Poly1305 (also every blob), the header and length field as
//! associated data; 2, AES-256-GCM the same way under a per-appender
//! subkey (the previous release's); 3, AES-256-GCM under a subkey of the
//! appender's prefix and the header, records padded to whole blocks. A
//! plaintext file is one record per line (JSON lines, UTF-8). Readers take
//! all four; appenders keep a file's format, except that a plaintext file
//! is sealed (rewritten whole, in the vault's record cipher) when the
//! vault seals, and a file sealed with an older key is sealed again with
//! the current one (and cipher).
//!
//! Nothing is thrown away: bytes an appender must cut off (a record torn by
//! a crash, a header cut short) are first kept beside the file as
//! `NAME.torn-<ms>`, and a file that is neither a sealed file this code
//! knows nor UTF-8 text is refused, never converted.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::key::{
    Key, KeyId, OpenFailure, RecordCipher, RecordOpener, RecordSealer, Vault, NONCE_LEN, TAG_LEN,
};
use crate::SealError;

/// What a sealed file of format 1 (XChaCha20-Poly1305) starts with.
pub const MAGIC_XCHACHA20_POLY1305: &[u8; 8] = b"STKSEAL\x01";
/// What a sealed record file of format 2 (AES-256-GCM, the header as
/// associated data) starts with.
pub const MAGIC_AES_256_GCM_V2: &[u8; 8] = b"STKSEAL\x02";
/// What a sealed record file of format 3 (AES-256-GCM, the header in the
/// subkey, records padded) starts with.
pub const MAGIC_AES_256_GCM: &[u8; 8] = b"STKSEAL\x03";
/// The part of the magic every format shares: what every sealed file
/// starts with.
pub const MAGIC_FAMILY: &[u8; 7] = b"STKSEAL";
/// Bytes of a header before its context.
const HEADER_FIXED: usize = 8 + 8 + 1 + 16 + 1;
/// Largest record a reader accepts (a length past it is corruption, not
/// a record).
pub const MAX_RECORD: usize = 256 << 20;

/// What a sealed file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Records appended one by one.
    Records = 1,
    /// One blob in chunks.
    Blob = 2,
}

/// A sealed file's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The key it is sealed with.
    pub key: KeyId,
    /// The cipher of its records (its format); a blob's is always
    /// XChaCha20-Poly1305.
    pub cipher: RecordCipher,
    /// What it holds.
    pub kind: Kind,
    /// Random, drawn when the file is made: binds its records to it.
    pub file: [u8; 16],
    /// What it is for (`transcript:ID`, `audit`, ...).
    pub context: String,
}

impl Header {
    /// A header for a new record file whose records `cipher` seals.
    pub fn records(key: &Key, cipher: RecordCipher, context: &str) -> Header {
        Header::new(key, cipher, Kind::Records, context)
    }

    /// A header for a new blob.
    pub fn blob(key: &Key, context: &str) -> Header {
        Header::new(key, RecordCipher::XChaCha20Poly1305, Kind::Blob, context)
    }

    fn new(key: &Key, cipher: RecordCipher, kind: Kind, context: &str) -> Header {
        Header {
            key: key.id(),
            cipher,
            kind,
            file: crate::key::random_bytes(),
            context: context.to_string(),
        }
    }

    /// Its bytes (the associated data of every record in formats 1 and
    /// 2; part of every appender's subkey in format 3).
    pub fn to_bytes(&self) -> Vec<u8> {
        let context = self.context.as_bytes();
        let mut bytes = Vec::with_capacity(HEADER_FIXED + context.len());
        bytes.extend_from_slice(MAGIC_FAMILY);
        bytes.push(self.cipher.format());
        bytes.extend_from_slice(&self.key.0);
        bytes.push(self.kind as u8);
        bytes.extend_from_slice(&self.file);
        bytes.push(u8::try_from(context.len()).unwrap_or(u8::MAX));
        bytes.extend_from_slice(&context[..context.len().min(255)]);
        bytes
    }

    /// Parses a header at the start of `bytes`; `Ok(None)` when `bytes`
    /// does not start with the magic (plaintext); also returns its length.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Option<(Header, usize)>, SealError> {
        let malformed = |reason: &str| SealError::Malformed {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if !bytes.starts_with(MAGIC_FAMILY) {
            return Ok(None);
        }
        let Some(cipher) = bytes
            .get(MAGIC_FAMILY.len())
            .and_then(|v| RecordCipher::of_format(*v))
        else {
            return Err(malformed(
                "sealed by another version of the runtime (unknown format)",
            ));
        };
        if bytes.len() < HEADER_FIXED {
            return Err(malformed("the header is cut short"));
        }
        let mut key = [0u8; 8];
        key.copy_from_slice(&bytes[8..16]);
        let kind = match bytes[16] {
            1 => Kind::Records,
            2 => Kind::Blob,
            other => return Err(malformed(&format!("unknown kind {other}"))),
        };
        if kind == Kind::Blob && cipher != RecordCipher::XChaCha20Poly1305 {
            return Err(malformed(&format!(
                "a blob in the format of {} records, which no blob is written in",
                cipher.name()
            )));
        }
        let mut file = [0u8; 16];
        file.copy_from_slice(&bytes[17..33]);
        let length = usize::from(bytes[33]);
        let context = bytes
            .get(HEADER_FIXED..HEADER_FIXED + length)
            .ok_or_else(|| malformed("the header is cut short"))?;
        let context = std::str::from_utf8(context)
            .map_err(|_| malformed("the context is not UTF-8"))?
            .to_string();
        Ok(Some((
            Header {
                key: KeyId(key),
                cipher,
                kind,
                file,
                context,
            },
            HEADER_FIXED + length,
        )))
    }

    pub(crate) fn check(
        &self,
        path: &Path,
        kind: Kind,
        context: Option<&str>,
    ) -> Result<(), SealError> {
        if self.kind != kind {
            return Err(SealError::Malformed {
                path: path.to_path_buf(),
                reason: format!("holds a {:?}, not {:?}", self.kind, kind),
            });
        }
        match context {
            Some(expected) if expected != self.context => Err(SealError::WrongContext {
                path: path.to_path_buf(),
                expected: expected.to_string(),
                found: self.context.clone(),
            }),
            _ => Ok(()),
        }
    }
}

/// The key of `vault` that opens a file sealed with `id`.
pub(crate) fn key_for<'v>(vault: &'v Vault, path: &Path, id: KeyId) -> Result<&'v Key, SealError> {
    vault.key(id).ok_or_else(|| {
        if vault.has_keys() {
            SealError::WrongKey {
                path: path.to_path_buf(),
                key: id,
                have: vault.describe_keys(),
            }
        } else {
            SealError::KeyMissing {
                path: path.to_path_buf(),
                key: id,
            }
        }
    })
}

/// The records of a file, opened.
#[derive(Debug, Default)]
pub struct Records {
    /// Each record's bytes (a plaintext file's lines, without `\n`; empty
    /// lines skipped).
    pub items: Vec<Vec<u8>>,
    /// Bytes of a record torn at the end (a crash while it was written),
    /// which are not in `items`.
    pub torn_bytes: u64,
    /// The header, when the file is sealed.
    pub header: Option<Header>,
}

/// Where the records of a file's bytes lie, without opening them.
struct Layout {
    header: Option<(Header, usize)>,
    /// Each record: where its length field starts, where its sealed bytes
    /// (or line) start, and where they end.
    spans: Vec<(usize, usize, usize)>,
    /// Where the complete records end.
    valid_len: usize,
}

/// Calls `with` on the associated data of a record: the header and its
/// length field, side by side on the stack for any header this code
/// writes (no allocation per record), on the heap past that.
pub(crate) fn with_record_aad<R>(header: &[u8], length: &[u8], with: impl FnOnce(&[u8]) -> R) -> R {
    let mut joined = [0u8; HEADER_FIXED + 255 + 4];
    let size = header.len() + length.len();
    match joined.get_mut(..size) {
        Some(aad) => {
            aad[..header.len()].copy_from_slice(header);
            aad[header.len()..].copy_from_slice(length);
            with(aad)
        }
        None => with(&[header, length].concat()),
    }
}

/// Whether `bytes` is a sealed header cut short by a crash (the magic of
/// a format this code knows, or the start of it, and nothing past the
/// header's fixed part).
fn torn_header(bytes: &[u8]) -> bool {
    let family = MAGIC_FAMILY.len();
    !bytes.is_empty()
        && bytes.len() < HEADER_FIXED
        && MAGIC_FAMILY.starts_with(&bytes[..bytes.len().min(family)])
        && bytes
            .get(family)
            .is_none_or(|v| RecordCipher::of_format(*v).is_some())
}

fn layout(path: &Path, bytes: &[u8]) -> Result<Layout, SealError> {
    let mut spans = Vec::new();
    if torn_header(bytes) {
        // Made, then a crash before its header was whole: no record yet.
        return Ok(Layout {
            header: None,
            spans,
            valid_len: 0,
        });
    }
    match Header::parse(path, bytes)? {
        None => {
            if std::str::from_utf8(bytes).is_err() {
                return Err(SealError::Malformed {
                    path: path.to_path_buf(),
                    reason: "neither a sealed file nor text; it is left as it is".into(),
                });
            }
            let mut start = 0;
            while let Some(end) = bytes[start..].iter().position(|b| *b == b'\n') {
                if end > 0 {
                    spans.push((start, start, start + end));
                }
                start += end + 1;
            }
            Ok(Layout {
                header: None,
                spans,
                valid_len: start,
            })
        }
        Some((header, header_len)) => {
            header.check(path, Kind::Records, None)?;
            let mut at = header_len;
            while let Some(length) = bytes.get(at..at + 4) {
                let mut raw = [0u8; 4];
                raw.copy_from_slice(length);
                let length = u32::from_le_bytes(raw) as usize;
                if bytes[at..].iter().all(|b| *b == 0) {
                    // A tail the file system zero-filled after a power
                    // loss: torn, like a record cut short.
                    break;
                }
                if !(NONCE_LEN + TAG_LEN..=MAX_RECORD).contains(&length) {
                    return Err(SealError::Malformed {
                        path: path.to_path_buf(),
                        reason: format!(
                            "record {} at byte {at} claims {length} bytes",
                            spans.len()
                        ),
                    });
                }
                if bytes.len() < at + 4 + length {
                    break;
                }
                spans.push((at, at + 4, at + 4 + length));
                at += 4 + length;
            }
            Ok(Layout {
                header: Some((header, header_len)),
                spans,
                valid_len: at,
            })
        }
    }
}

fn read_all(path: &Path) -> Result<Vec<u8>, SealError> {
    std::fs::read(path).map_err(SealError::io(path))
}

/// Reads and opens every record of the file at `path` (sealed or
/// plaintext). A record torn at the end is dropped and counted; a record
/// that fails authentication is an error ([`SealError::Tampered`]). With
/// `context`, a sealed file must have been sealed for it.
pub fn read_records(
    path: &Path,
    context: Option<&str>,
    vault: &Vault,
) -> Result<Records, SealError> {
    let bytes = read_all(path)?;
    open_records(path, &bytes, context, vault)
}

fn open_records(
    path: &Path,
    bytes: &[u8],
    context: Option<&str>,
    vault: &Vault,
) -> Result<Records, SealError> {
    let layout = layout(path, bytes)?;
    let torn_bytes = (bytes.len() - layout.valid_len) as u64;
    let Some((header, header_len)) = layout.header else {
        return Ok(Records {
            items: layout
                .spans
                .iter()
                .map(|(_, start, end)| bytes[*start..*end].to_vec())
                .collect(),
            torn_bytes,
            header: None,
        });
    };
    header.check(path, Kind::Records, context)?;
    let key = key_for(vault, path, header.key)?;
    let mut opener = RecordOpener::new(key, header.cipher, &bytes[..header_len]);
    let mut items = Vec::with_capacity(layout.spans.len());
    for (index, (at, start, end)) in layout.spans.iter().enumerate() {
        let opened = opener
            .open(&bytes[*start..*end], &bytes[*at..*start])
            .map_err(|failure| match failure {
                OpenFailure::Authentication => SealError::Tampered {
                    path: path.to_path_buf(),
                    record: index,
                    offset: *at as u64,
                },
                OpenFailure::Padding => SealError::Malformed {
                    path: path.to_path_buf(),
                    reason: format!(
                        "record {index} (at byte {at}) is authentic but not padded as {} \
                         pads its records: written by a faulty writer that held the key",
                        header.cipher.name()
                    ),
                },
            })?;
        items.push(opened.to_vec());
    }
    Ok(Records {
        items,
        torn_bytes,
        header: Some(header),
    })
}

/// How an [`Appender`] holds its file against other processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// A shared `flock` for as long as it is open (a session's own file:
    /// a deletion, which takes an exclusive one, sees it is in use).
    Shared,
    /// No lock between appends (a log many processes append to, each
    /// append taking a shared lock of its own).
    Nothing,
    /// As [`Hold::Nothing`], but opened only if nobody holds the file now:
    /// otherwise [`Busy`] (inside [`SealError::Io`], kind `WouldBlock`), so
    /// that a caller that must not wait can try again later.
    NothingIfFree,
}

/// A record file opened for appending.
#[derive(Debug)]
pub struct Appender {
    path: PathBuf,
    file: File,
    sealing: Option<RecordSealer>,
}

/// A file that another process holds and that would have to be repaired
/// or sealed before appending.
#[derive(Debug, thiserror::Error)]
#[error("{} is in use by another process", path.display())]
pub struct Busy {
    /// The file.
    pub path: PathBuf,
}

impl Appender {
    /// Opens (creating, 0600) the record file at `path` for appending,
    /// after cutting off a record torn by a crash and bringing it to the
    /// vault's format: a plaintext file is sealed when the vault seals, a
    /// file sealed with another key the vault has is sealed again with
    /// the vault's sealing key, a sealed file stays sealed when the vault
    /// writes plaintext. Takes an exclusive `flock` for that (blocking for
    /// [`Hold::Nothing`]; for [`Hold::Shared`], a file another process
    /// holds is used as it is, or refused with [`Busy`] inside
    /// [`SealError::Io`] when it would need a change).
    pub fn open(
        path: &Path,
        context: &str,
        vault: &Vault,
        hold: Hold,
    ) -> Result<Appender, SealError> {
        let io = SealError::io(path);
        loop {
            let file = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(&io)?;
            let exclusive = match hold {
                Hold::Nothing => {
                    file.lock().map_err(&io)?;
                    true
                }
                Hold::NothingIfFree => match file.try_lock() {
                    Ok(()) => true,
                    Err(std::fs::TryLockError::WouldBlock) => {
                        return Err(io(std::io::Error::new(
                            std::io::ErrorKind::WouldBlock,
                            Busy {
                                path: path.to_path_buf(),
                            },
                        )))
                    }
                    Err(std::fs::TryLockError::Error(err)) => return Err(io(err)),
                },
                Hold::Shared => match file.try_lock() {
                    Ok(()) => true,
                    Err(std::fs::TryLockError::WouldBlock) => {
                        file.lock_shared().map_err(&io)?;
                        false
                    }
                    Err(std::fs::TryLockError::Error(err)) => return Err(io(err)),
                },
            };
            if !same_file(&file, path) {
                // Replaced between the open and the lock: again.
                continue;
            }
            let prepared = prepare(path, &file, context, vault, exclusive)?;
            match prepared {
                Prepared::Replaced => continue,
                Prepared::Ready(sealing) => {
                    match hold {
                        Hold::Nothing | Hold::NothingIfFree => file.unlock().map_err(&io)?,
                        // Shared from here on (a conversion of the lock).
                        Hold::Shared if exclusive => file.lock_shared().map_err(&io)?,
                        Hold::Shared => {}
                    }
                    return Ok(Appender {
                        path: path.to_path_buf(),
                        file,
                        sealing: sealing
                            .map(|(key, cipher, header)| key.record_sealer(cipher, header)),
                    });
                }
            }
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (to lock, or to compare with the path).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether it seals what it appends.
    pub fn seals(&self) -> bool {
        self.sealing.is_some()
    }

    /// The bytes that append `record` (one line, or one sealed record);
    /// refused past what a record may hold (see [`check_size`]).
    pub fn encode(&self, record: &[u8]) -> Result<Vec<u8>, SealError> {
        check_size(&self.path, record)?;
        Ok(encode(self.sealing.as_ref(), record))
    }

    /// Appends `record` with one `write` (see the module docs).
    pub fn append(&mut self, record: &[u8]) -> Result<(), SealError> {
        let bytes = self.encode(record)?;
        (&self.file)
            .write_all(&bytes)
            .map_err(SealError::io(&self.path))
    }
}

/// Refuses a record too large to be read back (past [`MAX_RECORD`]) in
/// any format: sealed with its nonce, tag and the most padding a format
/// adds (so a record this accepts can later be sealed again in any).
pub fn check_size(path: &Path, record: &[u8]) -> Result<(), SealError> {
    if record.len() + crate::key::MAX_PADDING + NONCE_LEN + TAG_LEN > MAX_RECORD {
        return Err(SealError::Malformed {
            path: path.to_path_buf(),
            reason: format!(
                "a record of {} bytes is past the {} MiB a record may hold",
                record.len(),
                MAX_RECORD >> 20
            ),
        });
    }
    Ok(())
}

fn encode(sealing: Option<&RecordSealer>, record: &[u8]) -> Vec<u8> {
    match sealing {
        Some(sealer) => sealer.seal_framed(record),
        None => {
            let mut bytes = Vec::with_capacity(record.len() + 1);
            bytes.extend_from_slice(record);
            bytes.push(b'\n');
            bytes
        }
    }
}

enum Prepared {
    /// Ready to append (with the key, cipher and header to seal with).
    Ready(Option<(Key, RecordCipher, Vec<u8>)>),
    /// The file at the path was replaced: open it again.
    Replaced,
}

fn prepare(
    path: &Path,
    file: &File,
    context: &str,
    vault: &Vault,
    exclusive: bool,
) -> Result<Prepared, SealError> {
    let io = SealError::io(path);
    let mut bytes = Vec::new();
    (&*file).read_to_end(&mut bytes).map_err(&io)?;
    let busy = || SealError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            Busy {
                path: path.to_path_buf(),
            },
        ),
    };
    if torn_header(&bytes) {
        if !exclusive {
            return Err(busy());
        }
        keep_torn(path, &bytes)?;
        file.set_len(0).map_err(&io)?;
        bytes.clear();
    }
    if bytes.is_empty() {
        return match vault.sealing_key() {
            None => Ok(Prepared::Ready(None)),
            Some(key) if exclusive => {
                let cipher = vault.record_cipher();
                let header = Header::records(key, cipher, context).to_bytes();
                (&*file).write_all(&header).map_err(&io)?;
                Ok(Prepared::Ready(Some((key.clone(), cipher, header))))
            }
            Some(_) => Err(busy()),
        };
    }
    let layout = layout(path, &bytes)?;
    let wanted = match (&layout.header, vault.sealing_key()) {
        (None, None) => None,
        (None, Some(key)) => Some(key),
        (Some((header, _)), None) => Some(key_for(vault, path, header.key)?),
        (Some((header, _)), Some(key)) => {
            key_for(vault, path, header.key)?;
            Some(key)
        }
    };
    if let Some((header, _)) = &layout.header {
        header.check(path, Kind::Records, Some(context))?;
    }
    let same_format = match (&layout.header, wanted) {
        (None, None) => true,
        (Some((header, _)), Some(key)) => header.key == key.id(),
        _ => false,
    };
    if same_format {
        if layout.valid_len < bytes.len() {
            if !exclusive {
                return Err(busy());
            }
            // A record torn by a crash: cut it off (kept beside), or the
            // next would follow garbage.
            keep_torn(path, &bytes[layout.valid_len..])?;
            file.set_len(layout.valid_len as u64).map_err(&io)?;
        }
        let sealing = match (layout.header, wanted) {
            (Some((header, length)), Some(key)) => {
                Some((key.clone(), header.cipher, bytes[..length].to_vec()))
            }
            _ => None,
        };
        return Ok(Prepared::Ready(sealing));
    }
    if !exclusive {
        return Err(busy());
    }
    // Another format (plaintext to seal, or an older key): rewrite whole.
    let records = open_records(path, &bytes, Some(context), vault)?;
    let sealing = wanted.map(|key| (key, vault.record_cipher()));
    let mut writer = RecordWriter::create(path, context, sealing)?;
    for record in &records.items {
        writer.write(record)?;
    }
    writer.finish()?;
    Ok(Prepared::Replaced)
}

/// A new record file written beside `path` and put in its place when
/// finished (synced, then renamed over it): for rewrites.
#[derive(Debug)]
pub struct RecordWriter {
    path: PathBuf,
    temporary: PathBuf,
    file: Option<File>,
    sealing: Option<RecordSealer>,
    buffer: Vec<u8>,
}

impl RecordWriter {
    /// Starts a file for `path`, its records sealed with `key` and
    /// `cipher` (plaintext with none).
    pub fn create(
        path: &Path,
        context: &str,
        sealing: Option<(&Key, RecordCipher)>,
    ) -> Result<RecordWriter, SealError> {
        let temporary = temporary_beside(path);
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(SealError::io(&temporary))?;
        let sealing = sealing.map(|(key, cipher)| {
            let header = Header::records(key, cipher, context).to_bytes();
            key.record_sealer(cipher, header)
        });
        let mut writer = RecordWriter {
            path: path.to_path_buf(),
            temporary,
            file: Some(file),
            buffer: sealing
                .as_ref()
                .map(|s| s.header().to_vec())
                .unwrap_or_default(),
            sealing,
        };
        writer.flush_if_full()?;
        Ok(writer)
    }

    /// Adds a record.
    pub fn write(&mut self, record: &[u8]) -> Result<(), SealError> {
        check_size(&self.path, record)?;
        let bytes = encode(self.sealing.as_ref(), record);
        self.buffer.extend_from_slice(&bytes);
        self.flush_if_full()
    }

    fn flush_if_full(&mut self) -> Result<(), SealError> {
        if self.buffer.len() >= 1 << 20 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SealError> {
        if let Some(file) = &mut self.file {
            file.write_all(&self.buffer)
                .map_err(SealError::io(&self.temporary))?;
        }
        self.buffer.clear();
        Ok(())
    }

    /// Syncs the new file and renames it over the old.
    pub fn finish(mut self) -> Result<(), SealError> {
        self.flush()?;
        let file = self.file.take();
        if let Some(file) = &file {
            file.sync_all().map_err(SealError::io(&self.temporary))?;
        }
        replace(&self.temporary, &self.path)
    }
}

impl Drop for RecordWriter {
    fn drop(&mut self) {
        // Not finished: leave no copy behind.
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

/// Keeps `bytes` an appender is about to cut off a file beside it, as
/// `NAME.torn-<ms>` (0600), so that nothing is thrown away: a record torn
/// by a crash, or what a damaged length field made look like one.
fn keep_torn(path: &Path, bytes: &[u8]) -> Result<(), SealError> {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".torn-{millis}"));
    let kept = path.with_file_name(name);
    let mut file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&kept)
        .map_err(SealError::io(&kept))?;
    file.write_all(bytes).map_err(SealError::io(&kept))?;
    file.sync_all().map_err(SealError::io(&kept))?;
    Ok(())
}

/// A temporary name beside `path`, unique to this process and call.
pub(crate) fn temporary_beside(path: &Path) -> PathBuf {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let count = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".seal-{}-{count}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Renames `temporary` over `path`, then syncs the folder, so a crash
/// leaves the old file or the new one.
pub(crate) fn replace(temporary: &Path, path: &Path) -> Result<(), SealError> {
    std::fs::rename(temporary, path).map_err(SealError::io(path))?;
    if let Some(parent) = path.parent() {
        if let Ok(folder) = File::open(parent) {
            let _ = folder.sync_all();
        }
    }
    Ok(())
}

/// Whether `file` is the file now at `path`.
pub fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// The key a file is sealed with, `None` for plaintext (or a missing or
/// empty file).
pub fn sealed_with(path: &Path) -> Result<Option<Header>, SealError> {
    let mut start = [0u8; HEADER_FIXED + 255];
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(SealError::io(path)(err)),
    };
    let mut filled = 0;
    while filled < start.len() {
        match file.read(&mut start[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(SealError::io(path)(err)),
        }
    }
    if torn_header(&start[..filled]) {
        return Ok(None);
    }
    Ok(Header::parse(path, &start[..filled])?.map(|(header, _)| header))
}

/// Seals the file at `path` again with `key` (records or blob, whatever
/// it holds; records in the vault's record cipher), opening it with the
/// vault's keys; a plaintext file is left alone. Returns whether it was
/// rewritten. For `agent keys rotate`; the caller makes sure nobody
/// appends meanwhile.
pub fn reseal(path: &Path, vault: &Vault, key: &Key) -> Result<bool, SealError> {
    let Some(header) = sealed_with(path)? else {
        return Ok(false);
    };
    if header.key == key.id() {
        return Ok(false);
    }
    match header.kind {
        Kind::Records => {
            let records = read_records(path, Some(&header.context), vault)?;
            let mut writer =
                RecordWriter::create(path, &header.context, Some((key, vault.record_cipher())))?;
            for record in &records.items {
                writer.write(record)?;
            }
            writer.finish()?;
        }
        Kind::Blob => {
            let blob = crate::blob::open_blob(path, &header.context, vault)?;
            crate::blob::seal_blob(path, &header.context, key, &blob)?;
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeySource;

    /// Every record cipher: each test runs once for each.
    const CIPHERS: [RecordCipher; 3] = [
        RecordCipher::Aes256Gcm,
        RecordCipher::Aes256GcmV2,
        RecordCipher::XChaCha20Poly1305,
    ];

    fn sealing(cipher: RecordCipher) -> Vault {
        Vault::sealing(Key::generate(), KeySource::Given).with_record_cipher(cipher)
    }

    /// The record reading `path` reports as failing authentication, if
    /// reading fails that way.
    fn tampered_record(path: &Path, context: &str, vault: &Vault) -> Option<usize> {
        match read_records(path, Some(context), vault) {
            Err(SealError::Tampered { record, .. }) => Some(record),
            _ => None,
        }
    }

    #[test]
    fn appended_records_read_back_and_hide_their_text() {
        for cipher in CIPHERS {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("t.jsonl");
            let vault = sealing(cipher);
            let mut appender =
                Appender::open(&path, "transcript:a", &vault, Hold::Shared).expect("open");
            appender
                .append(b"{\"secret\":\"hunter2\"}")
                .expect("append");
            appender.append(b"second").expect("append");
            drop(appender);
            let bytes = std::fs::read(&path).expect("read");
            assert!(!bytes.windows(7).any(|w| w == b"hunter2"));
            let records = read_records(&path, Some("transcript:a"), &vault).expect("read");
            assert_eq!(
                records.items,
                vec![b"{\"secret\":\"hunter2\"}".to_vec(), b"second".to_vec()]
            );
            assert!(matches!(
                read_records(&path, Some("transcript:b"), &vault),
                Err(SealError::WrongContext { .. })
            ));
            assert!(matches!(
                read_records(&path, None, &sealing(cipher)),
                Err(SealError::WrongKey { .. })
            ));
            assert!(matches!(
                read_records(&path, None, &Vault::plaintext()),
                Err(SealError::KeyMissing { .. })
            ));
        }
    }

    #[test]
    fn a_torn_record_is_dropped_then_cut_off_and_a_flipped_byte_is_reported() {
        for cipher in CIPHERS {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("t.jsonl");
            let vault = sealing(cipher);
            let mut appender = Appender::open(&path, "c", &vault, Hold::Shared).expect("open");
            appender.append(b"one").expect("append");
            appender.append(b"two").expect("append");
            drop(appender);
            let full = std::fs::read(&path).expect("read");
            std::fs::write(&path, &full[..full.len() - 5]).expect("tear");
            let records = read_records(&path, Some("c"), &vault).expect("read");
            assert_eq!(records.items, vec![b"one".to_vec()]);
            assert!(records.torn_bytes > 0);
            let mut appender = Appender::open(&path, "c", &vault, Hold::Shared).expect("open");
            appender.append(b"three").expect("append");
            drop(appender);
            let records = read_records(&path, Some("c"), &vault).expect("read");
            assert_eq!(records.items, vec![b"one".to_vec(), b"three".to_vec()]);
            assert_eq!(records.torn_bytes, 0);
            let mut bytes = std::fs::read(&path).expect("read");
            let last = bytes.len() - 3;
            bytes[last] ^= 0x20;
            std::fs::write(&path, &bytes).expect("flip");
            assert_eq!(tampered_record(&path, "c", &vault), Some(1));
            // An appender (which reads no record) still appends after it, and
            // leaves it as it is.
            assert!(Appender::open(&path, "c", &vault, Hold::Shared).is_ok());
            assert_eq!(std::fs::read(&path).expect("read"), bytes);
        }
    }

    /// What an appender must cut off is kept beside the file, and what is
    /// neither sealed nor text (or sealed by an unknown version) is refused
    /// and left as it is.
    #[test]
    fn nothing_is_thrown_away_and_unknown_files_are_refused() {
        for cipher in CIPHERS {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("t.jsonl");
            let vault = sealing(cipher);
            let mut appender = Appender::open(&path, "c", &vault, Hold::Nothing).expect("open");
            for record in [&b"one"[..], b"two", b"three"] {
                appender.append(record).expect("append");
            }
            drop(appender);
            let whole = std::fs::read(&path).expect("read");
            // A damaged length field of record 1 that points past the end:
            // records 1 and 2 look torn; an appender keeps them aside.
            let header_len = HEADER_FIXED + 1;
            let padded = |len: usize| len + cipher.padding(len).len();
            let record_len = 4 + NONCE_LEN + padded(3) + TAG_LEN;
            let mut damaged = whole.clone();
            damaged[header_len + record_len..header_len + record_len + 4]
                .copy_from_slice(&10_000u32.to_le_bytes());
            std::fs::write(&path, &damaged).expect("damage");
            let records = read_records(&path, Some("c"), &vault).expect("read");
            assert_eq!(records.items, vec![b"one".to_vec()]);
            drop(Appender::open(&path, "c", &vault, Hold::Nothing).expect("open"));
            let kept: Vec<_> = std::fs::read_dir(dir.path())
                .expect("dir")
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("t.jsonl.torn-"))
                .collect();
            assert_eq!(kept.len(), 1);
            assert_eq!(
                std::fs::read(kept[0].path()).expect("kept"),
                damaged[header_len + record_len..].to_vec()
            );
            // A zero-filled tail (a power loss) is torn, not malformed.
            let mut zeros = whole.clone();
            zeros.extend_from_slice(&[0u8; 64]);
            std::fs::write(&path, &zeros).expect("zeros");
            assert_eq!(
                read_records(&path, Some("c"), &vault)
                    .expect("read")
                    .items
                    .len(),
                3
            );
            // A length field changed so that the record still looks whole
            // (one byte shorter) fails authentication: the length is bound.
            let mut bumped = whole.clone();
            let last = whole.len() - (4 + NONCE_LEN + padded(5) + TAG_LEN);
            bumped[last..last + 4]
                .copy_from_slice(&((NONCE_LEN + padded(5) - 1 + TAG_LEN) as u32).to_le_bytes());
            bumped.pop();
            std::fs::write(&path, &bumped).expect("bump");
            assert_eq!(tampered_record(&path, "c", &vault), Some(2));
            // Neither sealed nor text; another version's magic.
            for (name, bytes) in [
                ("garbage", vec![0xffu8, 0xfe, b'\n', 0x80, b'\n']),
                ("future", b"STKSEAL\x04 later".to_vec()),
            ] {
                let other = dir.path().join(name);
                std::fs::write(&other, &bytes).expect("write");
                assert!(matches!(
                    Appender::open(&other, "c", &vault, Hold::Nothing),
                    Err(SealError::Malformed { .. })
                ));
                assert_eq!(std::fs::read(&other).expect("read"), bytes);
            }
            // A header cut short by a crash: no records, and appending starts
            // the file again (the bytes kept aside).
            let torn = dir.path().join("h");
            std::fs::write(&torn, &MAGIC_FAMILY[..5]).expect("write");
            assert!(read_records(&torn, None, &vault)
                .expect("read")
                .items
                .is_empty());
            let mut appender = Appender::open(&torn, "c", &vault, Hold::Nothing).expect("open");
            appender.append(b"again").expect("append");
            assert_eq!(
                read_records(&torn, Some("c"), &vault).expect("read").items,
                vec![b"again".to_vec()]
            );
        }
    }

    /// Two files of the same context: a record copied from one into the
    /// other fails (each file has its own random id in its header).
    #[test]
    fn a_record_spliced_from_another_file_is_caught() {
        for cipher in CIPHERS {
            let dir = tempfile::tempdir().expect("tempdir");
            let vault = sealing(cipher);
            let (a, b) = (dir.path().join("a"), dir.path().join("b"));
            for path in [&a, &b] {
                let mut appender =
                    Appender::open(path, "audit", &vault, Hold::Nothing).expect("open");
                appender.append(b"record").expect("append");
            }
            let from_a = std::fs::read(&a).expect("a");
            let mut b_bytes = std::fs::read(&b).expect("b");
            let record = &from_a[HEADER_FIXED + 5..];
            b_bytes.extend_from_slice(record);
            std::fs::write(&b, &b_bytes).expect("splice");
            assert_eq!(tampered_record(&b, "audit", &vault), Some(1));
        }
    }

    #[test]
    fn a_record_too_large_to_read_back_is_refused() {
        for cipher in CIPHERS {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("t");
            let mut appender =
                Appender::open(&path, "c", &sealing(cipher), Hold::Nothing).expect("open");
            assert!(appender.append(&vec![b'x'; MAX_RECORD]).is_err());
            assert!(appender.append(b"small").is_ok());
        }
    }

    #[test]
    fn plaintext_is_sealed_when_the_vault_seals_and_rotation_reseals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.jsonl");
        std::fs::write(&path, b"{\"a\":1}\n{\"b\":2}\n{\"torn").expect("write");
        let plain = read_records(&path, None, &Vault::plaintext()).expect("read");
        assert_eq!(plain.items.len(), 2);
        let old = Key::generate();
        let vault = Vault::sealing(old.clone(), KeySource::Given);
        let mut appender = Appender::open(&path, "c", &vault, Hold::Nothing).expect("open");
        appender.append(b"{\"c\":3}").expect("append");
        drop(appender);
        assert!(sealed_with(&path).expect("header").is_some());
        let new = Key::generate();
        let both = vault.clone().also_opening(new.clone(), KeySource::Given);
        assert!(reseal(&path, &both, &new).expect("reseal"));
        let records =
            read_records(&path, Some("c"), &Vault::sealing(new, KeySource::Given)).expect("read");
        assert_eq!(records.items.len(), 3);
        assert!(read_records(&path, None, &vault).is_err());
    }

    /// Files as this code wrote them when each format was made (key
    /// `5e` × 32; one appender's two records, counts 0 and 1, then another
    /// appender's one): readers must open them for as long as such files
    /// may exist.
    #[test]
    fn files_sealed_in_each_format_still_open() {
        const XCHACHA20_POLY1305: &str = "53544b5345414c0185b6677836dda61b0163b02aae6eed067bc4dab0ed67026b44127472616e7363726970743a6669787475726549000000518f5eabb746501bce469a4ef409335e00000000000000002475344821be86e9fd0b7c2214fc6fef2a1dd2c32c38532db605aaf6eee7fda09f128dd490c6c71e80442515bf47fed5fd2f000000518f5eabb746501bce469a4ef409335e0100000000000000a66c531f6f3f117be1b7d33136c309f5ef60b3f6711a632f0000004103726d3812c663d6a21e78226bc67800000000000000005f86ab2c53ed741eeeb1122a400ff2b1d3a8fa5a87bdee";
        const AES_256_GCM_V2: &str = "53544b5345414c0285b6677836dda61b01b398bdddd5a21c028d939ee1b1e4a1e0127472616e7363726970743a66697874757265490000005bf369416705527af802e865919aabf30000000000000000c842ac3cceb72578330b077a732c4068f675413a2f8e13513bf9a44fdd6f6c2f442fff5b626d07039d3bc0652590b9ac202f0000005bf369416705527af802e865919aabf301000000000000009763853d447d53c743bf45dc7e22f01498a37cbbb0cee32f000000767cac7483b031a847d7dc32a806b4560000000000000000ffbc0fe04eac0009c00e42a38cce7488baf0ff0c6a7b51";
        const AES_256_GCM: &str = "53544b5345414c0385b6677836dda61b01aada0763276245bdb67331c7a37d1839127472616e7363726970743a66697874757265580000005c77b2d400a46a3f8071c352d0b6253a0000000000000000cb67dfd6983577bdfe5e31a38737c6f792dbb47a4d4a103446f016ecfed97003b62e5ffb306b67f8c238fa46bc72c8b0248547e54f35f994d1cf45a9da1e96d3380000005c77b2d400a46a3f8071c352d0b6253a010000000000000067d4b84fb6d15aca4c275ee79ed4863e34e201deb515c2eb134314146071542a3800000049ab470aafd597ccf4e6ae228c355fee0000000000000000e460df00f7019fbc4405dcf3f98a867db82dbbde68a6f29084c20e89d05177a7";
        let key = Key::from_hex(&"5e".repeat(32)).expect("key");
        let dir = tempfile::tempdir().expect("tempdir");
        for (hex, cipher) in [
            (XCHACHA20_POLY1305, RecordCipher::XChaCha20Poly1305),
            (AES_256_GCM_V2, RecordCipher::Aes256GcmV2),
            (AES_256_GCM, RecordCipher::Aes256Gcm),
        ] {
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|at| u8::from_str_radix(&hex[at..at + 2], 16).expect("hex"))
                .collect();
            let path = dir.path().join(cipher.name());
            std::fs::write(&path, &bytes).expect("write");
            for vault_cipher in CIPHERS {
                let vault =
                    Vault::sealing(key.clone(), KeySource::Given).with_record_cipher(vault_cipher);
                let records = read_records(&path, Some("transcript:fixture"), &vault)
                    .expect("a file of a known format opens");
                assert_eq!(records.header.expect("sealed").cipher, cipher);
                assert_eq!(
                    records.items,
                    vec![
                        br#"{"role":"user","content":"hello"}"#.to_vec(),
                        br#"{"n":2}"#.to_vec(),
                        br#"{"n":3}"#.to_vec()
                    ]
                );
            }
        }
    }

    /// Appending keeps a file's cipher whatever the vault's (no rewrite of
    /// a file another process may be appending to); sealing it again with
    /// a new key moves it to the vault's.
    #[test]
    fn a_file_keeps_its_cipher_until_it_is_sealed_again() {
        for (from, to) in [
            (RecordCipher::XChaCha20Poly1305, RecordCipher::Aes256Gcm),
            (RecordCipher::Aes256Gcm, RecordCipher::XChaCha20Poly1305),
            (RecordCipher::Aes256GcmV2, RecordCipher::Aes256Gcm),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("t.jsonl");
            let key = Key::generate();
            let old = Vault::sealing(key.clone(), KeySource::Given).with_record_cipher(from);
            let mut appender = Appender::open(&path, "c", &old, Hold::Shared).expect("open");
            appender.append(b"one").expect("append");
            drop(appender);
            let new = Vault::sealing(key, KeySource::Given).with_record_cipher(to);
            let mut appender = Appender::open(&path, "c", &new, Hold::Shared).expect("open");
            appender.append(b"two").expect("append");
            drop(appender);
            let header = sealed_with(&path).expect("header").expect("sealed");
            assert_eq!(header.cipher, from);
            let records = read_records(&path, Some("c"), &new).expect("read");
            assert_eq!(records.items, vec![b"one".to_vec(), b"two".to_vec()]);
            let rotated = Key::generate();
            let both = new.clone().also_opening(rotated.clone(), KeySource::Given);
            assert!(reseal(&path, &both, &rotated).expect("reseal"));
            let header = sealed_with(&path).expect("header").expect("sealed");
            assert_eq!((header.cipher, header.key), (to, rotated.id()));
            assert_eq!(
                read_records(&path, Some("c"), &both).expect("read").items,
                vec![b"one".to_vec(), b"two".to_vec()]
            );
        }
    }

    /// Several appenders at once (the audit log, appended by every
    /// process): their records interleave, each under its own prefix (and,
    /// for AES-256-GCM, its own subkey), and all open in order. A record
    /// whose prefix is changed fails: another prefix is another key.
    #[test]
    fn interleaved_appenders_read_back_and_a_changed_prefix_fails() {
        for cipher in CIPHERS {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("audit.jsonl");
            let vault = sealing(cipher);
            let mut first = Appender::open(&path, "audit", &vault, Hold::Nothing).expect("open");
            let mut second = Appender::open(&path, "audit", &vault, Hold::Nothing).expect("open");
            let mut expected = Vec::new();
            for index in 0..6 {
                let record = format!("record {index}").into_bytes();
                let appender = if index % 3 == 0 {
                    &mut second
                } else {
                    &mut first
                };
                appender.append(&record).expect("append");
                expected.push(record);
            }
            drop((first, second));
            assert_eq!(
                read_records(&path, Some("audit"), &vault)
                    .expect("read")
                    .items,
                expected
            );
            let mut bytes = std::fs::read(&path).expect("read");
            // The first record's nonce: after the header and its length.
            let prefix = HEADER_FIXED + "audit".len() + 4;
            bytes[prefix + 3] ^= 0x01;
            std::fs::write(&path, &bytes).expect("write");
            assert_eq!(
                tampered_record(&path, "audit", &vault),
                Some(0),
                "{cipher:?}"
            );
        }
    }

    /// Blobs are written only in format 1: a blob header in an AES
    /// format is a damaged or forged file, refused.
    #[test]
    fn a_blob_in_the_aes_format_is_refused() {
        let key = Key::generate();
        for magic in [MAGIC_AES_256_GCM, MAGIC_AES_256_GCM_V2] {
            let mut bytes = Header::blob(&key, "kv:a").to_bytes();
            assert!(Header::parse(Path::new("kv"), &bytes).is_ok());
            bytes[..magic.len()].copy_from_slice(magic);
            assert!(matches!(
                Header::parse(Path::new("kv"), &bytes),
                Err(SealError::Malformed { .. })
            ));
        }
    }

    /// Every byte of the header is bound to every record, whether as
    /// associated data (formats 1 and 2) or in the subkey (format 3): a
    /// change to any byte past the format (the key id, the kind, the file
    /// id, the context) is refused, read with no expected context, and a
    /// change to the file id or the context's letters is caught by the
    /// record itself. A changed context length moves where the records
    /// start: they then read as a torn tail (kept aside, never opened),
    /// as a file cut short does, which the threat model leaves open.
    #[test]
    fn an_edited_header_fails_its_records() {
        for cipher in CIPHERS {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("t.jsonl");
            let vault = sealing(cipher);
            let mut appender = Appender::open(&path, "ctx", &vault, Hold::Shared).expect("open");
            appender.append(b"zero").expect("append");
            drop(appender);
            let bytes = std::fs::read(&path).expect("read");
            let header_len = HEADER_FIXED + "ctx".len();
            for at in MAGIC_FAMILY.len() + 1..header_len {
                let mut edited = bytes.clone();
                edited[at] ^= 0x01;
                std::fs::write(&path, &edited).expect("write");
                let read = read_records(&path, None, &vault);
                if at == HEADER_FIXED - 1 {
                    assert!(
                        read.as_ref()
                            .map_or(true, |r| r.items.is_empty() && r.torn_bytes > 0),
                        "{cipher:?}: {read:?}"
                    );
                    continue;
                }
                assert!(read.is_err(), "{cipher:?}: byte {at} changed, and read");
                let record_caught = (17..33).contains(&at) || at >= HEADER_FIXED;
                if record_caught {
                    assert!(
                        matches!(read, Err(SealError::Tampered { record: 0, .. })),
                        "{cipher:?}: byte {at}: {read:?}"
                    );
                }
            }
        }
    }

    /// An authentic format-3 record that is not padded (which only a
    /// faulty writer with the key makes) is reported as malformed, by
    /// record, and not as a changed file.
    #[test]
    fn an_authentic_record_without_padding_is_malformed_not_tampered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.jsonl");
        let key = Key::generate();
        let vault = Vault::sealing(key.clone(), KeySource::Given)
            .with_record_cipher(RecordCipher::Aes256Gcm);
        let mut appender = Appender::open(&path, "c", &vault, Hold::Shared).expect("open");
        appender.append(b"padded").expect("append");
        drop(appender);
        let mut bytes = std::fs::read(&path).expect("read");
        let header_len = HEADER_FIXED + 1;
        let prefix = [9u8; 16];
        let cipher = key.record_key(RecordCipher::Aes256Gcm, &prefix, &bytes[..header_len]);
        let mut body = b"not padded".to_vec();
        let tag = cipher
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key([0u8; 12]),
                ring::aead::Aad::empty(),
                &mut body,
            )
            .expect("seal");
        let sealed_len = (NONCE_LEN + body.len() + TAG_LEN) as u32;
        bytes.extend_from_slice(&sealed_len.to_le_bytes());
        bytes.extend_from_slice(&prefix);
        bytes.extend_from_slice(&[0u8; 8]);
        bytes.extend_from_slice(&body);
        bytes.extend_from_slice(tag.as_ref());
        std::fs::write(&path, &bytes).expect("write");
        match read_records(&path, Some("c"), &vault) {
            Err(SealError::Malformed { reason, .. }) => {
                assert!(reason.contains("record 1"), "{reason}");
                assert!(reason.contains("authentic but not padded"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// The largest record any format can hold is accepted, one byte more
    /// is refused before anything is written (nonce, tag and the most
    /// padding included).
    #[test]
    fn the_record_size_limit_counts_the_padding() {
        let path = Path::new("t");
        let largest = MAX_RECORD - NONCE_LEN - TAG_LEN - crate::key::MAX_PADDING;
        assert!(check_size(path, &vec![0u8; largest]).is_ok());
        assert!(check_size(path, &vec![0u8; largest + 1]).is_err());
        let padded = largest + RecordCipher::Aes256Gcm.padding(largest).len();
        assert!(NONCE_LEN + padded + TAG_LEN <= MAX_RECORD);
    }

    /// Format 3 pads each record to whole 16-byte blocks (so a record's
    /// exact length is hidden to within 16 bytes) and strips it on read;
    /// every length reads back as written.
    #[test]
    fn format_3_pads_records_to_whole_blocks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.jsonl");
        let vault = sealing(RecordCipher::Aes256Gcm);
        let mut appender = Appender::open(&path, "c", &vault, Hold::Shared).expect("open");
        let records: Vec<Vec<u8>> = (0..=48).map(|len| vec![0u8; len]).collect();
        for record in &records {
            appender.append(record).expect("append");
        }
        drop(appender);
        let bytes = std::fs::read(&path).expect("read");
        let spans = layout(&path, &bytes).expect("layout").spans;
        for ((_, start, end), record) in spans.iter().zip(&records) {
            let body = end - start - NONCE_LEN - TAG_LEN;
            assert_eq!(body % 16, 0, "a record of {} bytes", record.len());
            assert!(body > record.len() && body <= record.len() + 16);
        }
        assert_eq!(
            read_records(&path, Some("c"), &vault).expect("read").items,
            records
        );
    }

    /// Each sealer counts its records in their nonces (0, 1, 2, … after
    /// its prefix), and the count is bound: a changed count fails, as does
    /// the format byte of a file with records changed to the other format.
    #[test]
    fn the_count_and_the_format_are_bound() {
        for cipher in CIPHERS {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("t.jsonl");
            let vault = sealing(cipher);
            let mut appender = Appender::open(&path, "c", &vault, Hold::Shared).expect("open");
            for record in [&b"zero"[..], b"one", b"two"] {
                appender.append(record).expect("append");
            }
            drop(appender);
            let bytes = std::fs::read(&path).expect("read");
            let spans = layout(&path, &bytes).expect("layout").spans;
            let nonces: Vec<&[u8]> = spans
                .iter()
                .map(|(_, start, _)| &bytes[*start..*start + NONCE_LEN])
                .collect();
            for (count, nonce) in nonces.iter().enumerate() {
                assert_eq!(nonce[..16], nonces[0][..16], "one prefix per sealer");
                assert_eq!(nonce[16..], (count as u64).to_le_bytes(), "{cipher:?}");
            }
            let mut recounted = bytes.clone();
            recounted[spans[1].1 + 16] ^= 0x01;
            std::fs::write(&path, &recounted).expect("write");
            assert_eq!(tampered_record(&path, "c", &vault), Some(1), "{cipher:?}");
            for other in CIPHERS.into_iter().filter(|other| *other != cipher) {
                let mut reformatted = bytes.clone();
                reformatted[MAGIC_FAMILY.len()] = other.format();
                std::fs::write(&path, &reformatted).expect("write");
                assert_eq!(
                    tampered_record(&path, "c", &vault),
                    Some(0),
                    "{cipher:?} as {other:?}"
                );
            }
        }
    }

    /// A header cut short at any length of either format's magic is torn
    /// (no records; appending starts again, the bytes kept aside); one of
    /// an unknown format is refused.
    #[test]
    fn a_header_cut_short_in_either_format_is_torn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vault = sealing(RecordCipher::Aes256Gcm);
        let cut: [&[u8]; 6] = [
            &MAGIC_FAMILY[..],
            &MAGIC_AES_256_GCM[..],
            &MAGIC_AES_256_GCM_V2[..],
            &[&MAGIC_AES_256_GCM_V2[..], &[7, 7, 7]].concat(),
            &[&MAGIC_AES_256_GCM[..], &[7, 7, 7]].concat(),
            &[&MAGIC_XCHACHA20_POLY1305[..], &[7, 7, 7]].concat(),
        ];
        for (index, bytes) in cut.iter().enumerate() {
            let path = dir.path().join(format!("h{index}"));
            std::fs::write(&path, bytes).expect("write");
            let records = read_records(&path, None, &vault).expect("torn, not refused");
            assert!(records.items.is_empty());
            let mut appender = Appender::open(&path, "c", &vault, Hold::Nothing).expect("open");
            appender.append(b"again").expect("append");
            assert_eq!(
                read_records(&path, Some("c"), &vault).expect("read").items,
                vec![b"again".to_vec()]
            );
        }
        let unknown = dir.path().join("unknown");
        std::fs::write(&unknown, b"STKSEAL\x09").expect("write");
        assert!(matches!(
            read_records(&unknown, None, &vault),
            Err(SealError::Malformed { .. })
        ));
    }
}
