//! A saved state file (a model's KV cache) that may be sealed: llama.cpp
//! writes and reads state by path, so a sealed state passes through an
//! anonymous in-memory file (`memfd`, named to llama.cpp as
//! `/proc/self/fd/N`) and its plaintext never touches a disk.

use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::blob::{open_blob, seal_blob};
use crate::key::Vault;
use crate::record::sealed_with;
use crate::SealError;

/// Where a session's state is saved, and how.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
    context: String,
    vault: Arc<Vault>,
}

/// Why a state could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum StateError<E: std::fmt::Display> {
    /// Sealing or opening.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// What the caller's write or read said.
    #[error("{0}")]
    Inner(E),
}

impl StateFile {
    /// State at `path`, sealed for `context` when `vault` seals.
    pub fn new(
        path: impl Into<PathBuf>,
        context: impl Into<String>,
        vault: Arc<Vault>,
    ) -> StateFile {
        StateFile {
            path: path.into(),
            context: context.into(),
            vault,
        }
    }

    /// State at `path` in plaintext.
    pub fn plain(path: impl Into<PathBuf>) -> StateFile {
        StateFile::new(path, String::new(), Arc::new(Vault::plaintext()))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether there is a saved state.
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Runs `write` with a path to write the state to; when the vault
    /// seals, that is an in-memory file whose bytes are then sealed to
    /// the state's path (written beside it and renamed over).
    pub fn save_with<E: std::fmt::Display>(
        &self,
        write: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<(), StateError<E>> {
        let Some(key) = self.vault.sealing_key() else {
            return write(&self.path).map_err(StateError::Inner);
        };
        let (memory, named) = memory_file(&self.path)?;
        write(&named).map_err(StateError::Inner)?;
        let mut file = std::fs::File::from(memory);
        let io = SealError::io(&self.path);
        file.rewind().map_err(&io)?;
        let mut bytes = zeroize::Zeroizing::new(Vec::new());
        file.read_to_end(&mut bytes).map_err(&io)?;
        Ok(seal_blob(&self.path, &self.context, key, &bytes)?)
    }

    /// Runs `read` with a path to read the saved state from: the file
    /// itself when it is plaintext, else an in-memory file holding it
    /// opened.
    pub fn load_with<T, E: std::fmt::Display>(
        &self,
        read: impl FnOnce(&Path) -> Result<T, E>,
    ) -> Result<T, StateError<E>> {
        if sealed_with(&self.path)?.is_none() {
            return read(&self.path).map_err(StateError::Inner);
        }
        let blob = open_blob(&self.path, &self.context, &self.vault)?;
        let (memory, named) = memory_file(&self.path)?;
        let mut file = std::fs::File::from(memory);
        let io = SealError::io(&self.path);
        file.write_all(&blob).map_err(&io)?;
        file.rewind().map_err(&io)?;
        let read = read(&named).map_err(StateError::Inner);
        drop(file);
        read
    }
}

/// An anonymous in-memory file, and the path that names it in this process.
fn memory_file(for_path: &Path) -> Result<(OwnedFd, PathBuf), SealError> {
    let fd = nix::sys::memfd::memfd_create(c"stack-state", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(|errno| SealError::io(for_path)(std::io::Error::from(errno)))?;
    let named = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    Ok((fd, named))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{Key, KeySource};

    #[test]
    fn a_sealed_state_passes_through_memory_and_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vault = Arc::new(Vault::sealing(Key::generate(), KeySource::Given));
        let state = StateFile::new(dir.path().join("a.kv"), "kv:a", Arc::clone(&vault));
        state
            .save_with(|path| {
                assert!(path.starts_with("/proc/self/fd"));
                std::fs::write(path, b"kv cache with prompt text")
            })
            .expect("save");
        let on_disk = std::fs::read(state.path()).expect("read");
        assert!(!on_disk.windows(6).any(|w| w == b"prompt"));
        let back = state.load_with(|p| std::fs::read(p)).expect("load");
        assert_eq!(back, b"kv cache with prompt text");
        let plain = StateFile::plain(dir.path().join("b.kv"));
        plain
            .save_with(|path| std::fs::write(path, b"plain"))
            .expect("save");
        assert_eq!(
            plain.load_with(|p| std::fs::read(p)).expect("load"),
            b"plain"
        );
    }
}
