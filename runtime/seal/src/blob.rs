//! Sealed blobs: a file written whole (a saved KV state), in chunks of
//! 1 MiB, each authenticated with the header, its index and whether it is
//! the last, so a blob cut short, reordered or spliced fails to open.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use zeroize::Zeroizing;

use crate::key::{Key, Vault};
use crate::record::{key_for, replace, temporary_beside, Header, Kind, MAX_RECORD};
use crate::SealError;

/// Bytes of plaintext per chunk.
pub const CHUNK: usize = 1 << 20;

fn chunk_aad(header: &[u8], index: u64, last: bool) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + 9);
    aad.extend_from_slice(header);
    aad.extend_from_slice(&index.to_le_bytes());
    aad.push(u8::from(last));
    aad
}

/// Writes `blob` to `path` sealed with `key`: to a temporary file, synced,
/// then renamed over `path`.
pub fn seal_blob(path: &Path, context: &str, key: &Key, blob: &[u8]) -> Result<(), SealError> {
    let header = Header::blob(key, context).to_bytes();
    let temporary = temporary_beside(path);
    let io = SealError::io(&temporary);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(&io)?;
        let mut out = std::io::BufWriter::with_capacity(CHUNK + 64, &mut file);
        out.write_all(&header).map_err(&io)?;
        let chunks: Vec<&[u8]> = if blob.is_empty() {
            vec![&[][..]]
        } else {
            blob.chunks(CHUNK).collect()
        };
        let count = chunks.len();
        for (index, chunk) in chunks.into_iter().enumerate() {
            let sealed = key.seal(chunk, &chunk_aad(&header, index as u64, index + 1 == count));
            out.write_all(
                &u32::try_from(sealed.len())
                    .unwrap_or(u32::MAX)
                    .to_le_bytes(),
            )
            .map_err(&io)?;
            out.write_all(&sealed).map_err(&io)?;
        }
        out.flush().map_err(&io)?;
        drop(out);
        file.sync_all().map_err(&io)
    })();
    if let Err(err) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(err);
    }
    replace(&temporary, path)
}

/// Opens a blob [`seal_blob`] wrote for `context`.
pub fn open_blob(
    path: &Path,
    context: &str,
    vault: &Vault,
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let bytes = std::fs::read(path).map_err(SealError::io(path))?;
    let Some((header, header_len)) = Header::parse(path, &bytes)? else {
        return Err(SealError::Malformed {
            path: path.to_path_buf(),
            reason: "not sealed".into(),
        });
    };
    header.check(path, Kind::Blob, Some(context))?;
    let key = key_for(vault, path, header.key)?;
    let aad_header = &bytes[..header_len];
    let mut blob = Zeroizing::new(Vec::with_capacity(bytes.len()));
    let mut at = header_len;
    let mut index = 0u64;
    loop {
        let Some(length) = bytes.get(at..at + 4) else {
            return Err(SealError::Truncated {
                path: path.to_path_buf(),
            });
        };
        let mut raw = [0u8; 4];
        raw.copy_from_slice(length);
        let length = u32::from_le_bytes(raw) as usize;
        if length > MAX_RECORD {
            return Err(SealError::Malformed {
                path: path.to_path_buf(),
                reason: format!("chunk {index} claims {length} bytes"),
            });
        }
        let Some(sealed) = bytes.get(at + 4..at + 4 + length) else {
            return Err(SealError::Truncated {
                path: path.to_path_buf(),
            });
        };
        let tampered = SealError::Tampered {
            path: path.to_path_buf(),
            record: index as usize,
            offset: at as u64,
        };
        at += 4 + length;
        let last = at == bytes.len();
        match key.open(sealed, &chunk_aad(aad_header, index, last)) {
            Some(chunk) => blob.extend_from_slice(&chunk),
            // Not the last chunk though it ends the file: cut short.
            None if last
                && key
                    .open(sealed, &chunk_aad(aad_header, index, false))
                    .is_some() =>
            {
                return Err(SealError::Truncated {
                    path: path.to_path_buf(),
                })
            }
            None => return Err(tampered),
        }
        if last {
            return Ok(blob);
        }
        index += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeySource;

    #[test]
    fn a_blob_round_trips_and_a_cut_or_changed_one_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.kv");
        let key = Key::generate();
        let vault = Vault::sealing(key.clone(), KeySource::Given);
        let blob: Vec<u8> = (0..(CHUNK * 2 + 100)).map(|i| (i % 251) as u8).collect();
        seal_blob(&path, "kv:a", &key, &blob).expect("seal");
        assert_eq!(
            open_blob(&path, "kv:a", &vault).expect("open").as_slice(),
            &blob[..]
        );
        assert!(matches!(
            open_blob(&path, "kv:b", &vault),
            Err(SealError::WrongContext { .. })
        ));
        let bytes = std::fs::read(&path).expect("read");
        // Cut after the first chunk: the missing last chunk is noticed.
        let first_end = bytes.len() - (4 + 24 + 100 + 16) - (4 + 24 + CHUNK + 16);
        std::fs::write(&path, &bytes[..first_end]).expect("cut");
        assert!(matches!(
            open_blob(&path, "kv:a", &vault),
            Err(SealError::Truncated { .. })
        ));
        let mut flipped = bytes.clone();
        flipped[first_end + 100] ^= 1;
        std::fs::write(&path, &flipped).expect("flip");
        assert!(matches!(
            open_blob(&path, "kv:a", &vault),
            Err(SealError::Tampered { record: 1, .. })
        ));
    }
}
