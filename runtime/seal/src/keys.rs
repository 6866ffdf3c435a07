//! Where keys are kept: a key file in the user's config folder
//! (`$XDG_CONFIG_HOME/stack-runtime/keys/current`, else
//! `~/.config/stack-runtime/keys/current`), 0600 and the owner's alone,
//! created on first use; else the `STACK_RUNTIME_KEY` environment variable
//! (64 hex digits), for hosts that inject secrets that way. A key file is
//! refused (not read) when it is a symlink, not the user's, or readable by
//! anyone else.
//!
//! Rotation ([`KeyStore::begin_rotation`]) writes the new key to `next`
//! before anything is sealed with it and renames it over `current` only
//! when every file is sealed again, so a rotation cut short leaves every
//! file openable (with `current` or `next`) and is finished by running it
//! again. The old key is kept as `retired/<id>` (it still opens files the
//! rotation could not reach, such as an audit log given on the command
//! line, and an appender seals those again with the current key) unless
//! the rotation is told to forget it. Key files are written to a temporary
//! name, synced and then linked or renamed into place, so a crash never
//! leaves half a key. Every runtime that uses the key holds a shared `flock` on the
//! folder's `lock` file ([`KeyLease`]); a rotation takes it exclusively,
//! so it never runs while a runtime could still append with the old key.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::key::{BadKeyText, Key, KeySource, Vault};

/// The environment variable a key may come from.
pub const KEY_VARIABLE: &str = "STACK_RUNTIME_KEY";

/// Why keys could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file that must not be trusted.
    #[error("key file {}: {reason}; fix it (it must be a plain file of yours, mode 0600) or move it away", path.display())]
    Unsafe {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A key that is not one.
    #[error("the key from {source_of}: {reason}")]
    BadKey {
        /// Where it came from.
        source_of: KeySource,
        /// What is wrong.
        reason: BadKeyText,
    },
    /// I/O.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// No home or config folder to keep a key file in.
    #[error(
        "no place for a key file: neither XDG_CONFIG_HOME nor HOME is set; set STACK_RUNTIME_KEY"
    )]
    NoHome,
    /// A rotation while a runtime uses the key.
    #[error("a running agent (REPL or server) uses the key; stop it, then rotate")]
    InUse,
    /// A rotation with no key file to rotate.
    #[error("there is no key file to rotate ({}){}", path.display(), if *from_environment { "; the key comes from STACK_RUNTIME_KEY: move it into that key file (64 hex digits, mode 0600) and rotate, so that every file is sealed again before the old key goes" } else { "" })]
    NothingToRotate {
        /// The key file.
        path: PathBuf,
        /// Whether STACK_RUNTIME_KEY is set.
        from_environment: bool,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The folder keys are kept in.
#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
}

impl KeyStore {
    /// Keys in `dir`.
    pub fn at(dir: impl Into<PathBuf>) -> KeyStore {
        KeyStore { dir: dir.into() }
    }

    /// Keys in the user's config folder (see the module docs).
    pub fn for_user() -> Result<KeyStore, KeyError> {
        std::env::var_os("XDG_CONFIG_HOME")
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".config")))
            .map(|config| KeyStore::at(config.join("stack-runtime").join("keys")))
            .ok_or(KeyError::NoHome)
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key file new files are sealed with.
    pub fn current_path(&self) -> PathBuf {
        self.dir.join("current")
    }

    fn next_path(&self) -> PathBuf {
        self.dir.join("next")
    }

    fn retired_dir(&self) -> PathBuf {
        self.dir.join("retired")
    }

    /// Keys retired by earlier rotations, each with its file.
    fn retired(&self) -> Result<Vec<(Key, PathBuf)>, KeyError> {
        let mut found = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.retired_dir()) else {
            return Ok(found);
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                continue;
            }
            if let Some(key) = read_key_file(&path)? {
                found.push((key, path));
            }
        }
        found.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(found)
    }

    /// Whether any key is at hand (a key file, a rotation's, a retired
    /// one, or `STACK_RUNTIME_KEY`), without reading one.
    fn any_key(&self) -> bool {
        std::env::var_os(KEY_VARIABLE).is_some()
            || self.current_path().exists()
            || self.next_path().exists()
            || std::fs::read_dir(self.retired_dir()).is_ok_and(|mut d| d.next().is_some())
    }

    /// The vault of a runtime (see [`vault`](Self::vault)) with a lease on
    /// the keys, taken before they are read, so that a rotation running
    /// meanwhile is waited for and never leaves the runtime with a key it
    /// then removes. No lease (and no keys folder made) when encryption is
    /// off and there is no key at all.
    pub fn open(&self, encrypt: bool) -> Result<(Vault, Option<KeyLease>), KeyError> {
        if !encrypt && !self.any_key() {
            return Ok((Vault::plaintext(), None));
        }
        let lease = self.lease()?;
        Ok((self.vault(encrypt)?, Some(lease)))
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join("lock")
    }

    /// The vault of a runtime: with `encrypt`, sealing with the key file's
    /// key, else `STACK_RUNTIME_KEY`, else a key file made now; without,
    /// writing plaintext but opening whatever the keys at hand open.
    pub fn vault(&self, encrypt: bool) -> Result<Vault, KeyError> {
        let current = read_key_file(&self.current_path())?;
        let next = read_key_file(&self.next_path())?;
        let environment = key_from_environment()?;
        let mut keys: Vec<(Key, KeySource)> = Vec::new();
        if let Some(key) = current {
            keys.push((key, KeySource::File(self.current_path())));
        }
        if let Some(key) = environment {
            keys.push((key, KeySource::Environment));
        }
        if encrypt && keys.is_empty() {
            keys.push((self.create_current()?, KeySource::File(self.current_path())));
        }
        if let Some(key) = next {
            keys.push((key, KeySource::File(self.next_path())));
        }
        for (key, path) in self.retired()? {
            keys.push((key, KeySource::File(path)));
        }
        let mut keys = keys.into_iter();
        let Some((first, source)) = keys.next() else {
            return Ok(Vault::plaintext());
        };
        let vault = if encrypt {
            Vault::sealing(first, source)
        } else {
            Vault::opening_only(first, source)
        };
        // (Keys are tried in this order: the key file, the environment's,
        // a rotation's next key, retired ones.)
        Ok(keys.fold(vault, |vault, (key, source)| {
            vault.also_opening(key, source)
        }))
    }

    fn create_current(&self) -> Result<Key, KeyError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io(&self.dir))?;
        let path = self.current_path();
        let key = Key::generate();
        match write_key_file(&path, &key) {
            Ok(()) => Ok(key),
            // Another process made it first: use that one.
            Err(KeyError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                read_key_file(&path)?.ok_or_else(|| KeyError::Unsafe {
                    path,
                    reason: "vanished while it was read".into(),
                })
            }
            Err(err) => Err(err),
        }
    }

    /// A shared hold on the keys for as long as a runtime uses them (a
    /// rotation waits for none).
    pub fn lease(&self) -> Result<KeyLease, KeyError> {
        let file = self.open_lock()?;
        file.lock_shared().map_err(io(&self.lock_path()))?;
        Ok(KeyLease { _file: file })
    }

    fn open_lock(&self) -> Result<File, KeyError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io(&self.dir))?;
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.lock_path())
            .map_err(io(&self.lock_path()))
    }

    /// Starts (or takes up again) a rotation: refuses while a runtime
    /// holds a lease, writes a new key to `next` (keeping one an earlier
    /// rotation left), and returns a vault that opens files sealed with
    /// either key.
    pub fn begin_rotation(&self) -> Result<Rotation, KeyError> {
        let current_path = self.current_path();
        let Some(current) = read_key_file(&current_path)? else {
            return Err(KeyError::NothingToRotate {
                path: current_path,
                from_environment: std::env::var_os(KEY_VARIABLE).is_some(),
            });
        };
        let lock = self.open_lock()?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(KeyError::InUse),
            Err(std::fs::TryLockError::Error(err)) => return Err(io(&self.lock_path())(err)),
        }
        let next_path = self.next_path();
        let new = match read_key_file(&next_path)? {
            Some(key) => key,
            None => {
                let key = Key::generate();
                write_key_file(&next_path, &key)?;
                key
            }
        };
        let mut vault = Vault::sealing(new.clone(), KeySource::File(next_path))
            .also_opening(current.clone(), KeySource::File(current_path));
        if let Some(key) = key_from_environment()? {
            vault = vault.also_opening(key, KeySource::Environment);
        }
        Ok(Rotation {
            store: self.clone(),
            _lock: lock,
            vault,
            old: current,
            new,
        })
    }
}

/// A runtime's hold on the keys (see [`KeyStore::lease`]).
#[derive(Debug)]
pub struct KeyLease {
    _file: File,
}

/// A rotation under way: seal every file again with
/// [`new_key`](Self::new_key) (opening them with [`vault`](Self::vault)),
/// then [`finish`](Self::finish).
#[derive(Debug)]
pub struct Rotation {
    store: KeyStore,
    _lock: File,
    vault: Vault,
    old: Key,
    new: Key,
}

impl Rotation {
    /// Opens files sealed with the old key or the new.
    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    /// The key files are sealed with from now on.
    pub fn new_key(&self) -> &Key {
        &self.new
    }

    /// The key being retired.
    pub fn old_key(&self) -> &Key {
        &self.old
    }

    /// Makes the new key the current one. The old key is kept as
    /// `retired/<id>` (it still opens files the rotation did not reach),
    /// or, with `forget_old`, removed.
    pub fn finish(self, forget_old: bool) -> Result<(), KeyError> {
        let current = self.store.current_path();
        let retired = self.store.retired_dir();
        if !forget_old {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&retired)
                .map_err(io(&retired))?;
            let path = retired.join(self.old.id().to_string());
            match write_key_file(&path, &self.old) {
                Ok(()) => {}
                Err(KeyError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(err) => return Err(err),
            }
        }
        std::fs::rename(self.store.next_path(), &current).map_err(io(&current))?;
        if forget_old {
            // Every retired key goes too: the user asked for old keys gone.
            let _ = std::fs::remove_dir_all(&retired);
        }
        if let Ok(folder) = File::open(self.store.dir()) {
            let _ = folder.sync_all();
        }
        Ok(())
    }
}

/// The key in `path`, `None` when there is no such file; refused when the
/// file is a symlink, not this user's, or open to others.
fn read_key_file(path: &Path) -> Result<Option<Key>, KeyError> {
    use std::io::Read;
    let unsafe_because = |reason: String| KeyError::Unsafe {
        path: path.to_path_buf(),
        reason,
    };
    // Opened without following a symlink, then checked on the open file
    // (no gap between the check and the read).
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) if err.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(unsafe_because("is a symlink".into()))
        }
        Err(err) => return Err(io(path)(err)),
    };
    let meta = file.metadata().map_err(io(path))?;
    if !meta.is_file() {
        return Err(unsafe_because("is not a plain file".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(unsafe_because(format!(
            "belongs to uid {}, not to you (uid {me})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(unsafe_because(format!(
            "is open to others (mode {:04o})",
            meta.mode() & 0o7777
        )));
    }
    let mut text = zeroize::Zeroizing::new(String::with_capacity(128));
    (&file)
        .take(256)
        .read_to_string(&mut text)
        .map_err(io(path))?;
    Key::from_hex(&text)
        .map(Some)
        .map_err(|reason| KeyError::BadKey {
            source_of: KeySource::File(path.to_path_buf()),
            reason,
        })
}

/// Writes `key` to `path`, which must not exist: to a temporary file,
/// synced, then hard-linked into place (so a crash leaves no half key and
/// a key another process made first is kept: `AlreadyExists`).
fn write_key_file(path: &Path, key: &Key) -> Result<(), KeyError> {
    let mut temporary = path.as_os_str().to_os_string();
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let written = (|| {
        let mut file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&temporary)?;
        let mut text = key.to_hex();
        text.push('\n');
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::hard_link(&temporary, path)
    })();
    let _ = std::fs::remove_file(&temporary);
    written.map_err(io(path))?;
    if let Some(folder) = path.parent().and_then(|p| File::open(p).ok()) {
        let _ = folder.sync_all();
    }
    Ok(())
}

fn key_from_environment() -> Result<Option<Key>, KeyError> {
    match std::env::var(KEY_VARIABLE) {
        Ok(text) => Key::from_hex(&text)
            .map(Some)
            .map_err(|reason| KeyError::BadKey {
                source_of: KeySource::Environment,
                reason,
            }),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(KeyError::BadKey {
            source_of: KeySource::Environment,
            reason: BadKeyText("not UTF-8".into()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_file_is_made_0600_on_first_use_and_read_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = KeyStore::at(dir.path().join("keys"));
        assert!(!store.vault(false).expect("vault").has_keys());
        let vault = store.vault(true).expect("vault");
        let key = vault.sealing_key().expect("key").id();
        let meta = std::fs::metadata(store.current_path()).expect("file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            store.vault(true).expect("again").sealing_key().map(Key::id),
            Some(key)
        );
        // Off: no sealing, but the key still opens what it sealed.
        let off = store.vault(false).expect("off");
        assert!(!off.seals() && off.key(key).is_some());
    }

    #[test]
    fn an_open_or_linked_key_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = KeyStore::at(dir.path());
        store.vault(true).expect("vault");
        let path = store.current_path();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = store.vault(true).expect_err("open to others");
        assert!(err.to_string().contains("mode 0644"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::rename(&path, dir.path().join("elsewhere")).expect("move");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &path).expect("link");
        let err = store.vault(true).expect_err("symlink");
        assert!(err.to_string().contains("symlink"), "{err}");
    }

    /// Without `--forget-old`, the old key is kept as retired and still
    /// opens what it sealed; a key file is never half written.
    #[test]
    fn a_retired_key_still_opens_what_it_sealed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = KeyStore::at(dir.path());
        let old = store
            .vault(true)
            .expect("vault")
            .sealing_key()
            .expect("key")
            .id();
        let rotation = store.begin_rotation().expect("rotate");
        let new = rotation.new_key().id();
        rotation.finish(false).expect("finish");
        let vault = store.vault(true).expect("vault");
        assert_eq!(vault.sealing_key().map(Key::id), Some(new));
        assert!(vault.key(old).is_some(), "{}", vault.describe_keys());
        assert!(dir.path().join("retired").join(old.to_string()).exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn rotation_is_refused_while_a_runtime_holds_a_lease_and_moves_to_the_new_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = KeyStore::at(dir.path());
        let old = store
            .vault(true)
            .expect("vault")
            .sealing_key()
            .expect("key")
            .id();
        let lease = store.lease().expect("lease");
        assert!(matches!(store.begin_rotation(), Err(KeyError::InUse)));
        drop(lease);
        let rotation = store.begin_rotation().expect("rotate");
        let new = rotation.new_key().id();
        assert!(rotation.vault().key(old).is_some());
        // Cut short here: both keys are at hand to a runtime.
        drop(rotation);
        let between = store.vault(true).expect("vault");
        assert!(between.key(old).is_some() && between.key(new).is_some());
        let rotation = store.begin_rotation().expect("again");
        assert_eq!(rotation.new_key().id(), new);
        rotation.finish(true).expect("finish");
        assert!(!dir.path().join("retired").exists());
        let after = store.vault(true).expect("vault");
        assert_eq!(after.sealing_key().map(Key::id), Some(new));
        assert!(after.key(old).is_none());
    }
}
