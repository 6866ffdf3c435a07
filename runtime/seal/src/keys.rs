//! Where keys are kept. A key folder in the user's config folder
//! (`$XDG_CONFIG_HOME/stack-runtime/keys`, else
//! `~/.config/stack-runtime/keys`) holds either
//! - the key files `current` (and a rotation's `next`, and `retired/<id>`),
//!   each 0600 and the owner's alone; or
//! - when the keys are in the OS keyring (see [`crate::keyring`]), only the
//!   marker file `in-keyring`, which names the entries and holds no key.
//!
//! A new key (the first time encryption is on) goes to the OS keyring where
//! one answers on the session bus and takes it ([`KeyStore::for_user`]; not
//! with `STACK_RUNTIME_KEYRING=off`), else to a new key file. Keys already
//! in key files stay there. Failing both, the `STACK_RUNTIME_KEY`
//! environment variable (64 hex digits) serves hosts that inject secrets
//! that way. A key file is refused (not read) when it is a symlink, not the
//! user's, or readable by anyone else. When the marker says the keys are
//! in the keyring and the keyring does not answer (locked, or no desktop
//! session), that is an error naming the keyring; when it answers but its
//! entry is gone, that is an error too: no new key is ever made beside
//! keys the marker says exist. Key creation is serialized across processes
//! by an exclusive lock on `create.lock`. Keyring calls block (a D-Bus
//! round trip, at most [`crate::keyring::TIMEOUT`] with a prompt): async
//! callers run [`KeyStore::open`] on a blocking thread.
//!
//! Rotation ([`KeyStore::begin_rotation`]) writes the new key to `next`
//! (a file, or the keyring's `next` entry) before anything is sealed with
//! it and makes it `current` only when every file is sealed again (in the
//! keyring: the retired keys written first, then `current`, then `next`
//! emptied), so a rotation cut short leaves every
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
use crate::keyring::{KeyringError, OsKeyring, Slot};

/// The environment variable a key may come from.
pub const KEY_VARIABLE: &str = "STACK_RUNTIME_KEY";

/// The environment variable that, set to `off`, keeps new keys out of the
/// OS keyring (key files instead).
pub const KEYRING_VARIABLE: &str = "STACK_RUNTIME_KEYRING";

/// The marker file of a key folder whose keys are in the OS keyring.
const MARKER: &str = "in-keyring";

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
    /// Keys kept in the OS keyring that cannot be had now.
    #[error("the keys of {} are kept in the OS keyring (see its `{MARKER}` file), and {reason}; unlock the keyring or start one (a desktop session's), or set STACK_RUNTIME_KEY to the key; nothing was changed", dir.display())]
    Keyring {
        /// The key folder.
        dir: PathBuf,
        /// What the keyring said.
        reason: KeyringError,
    },
    /// The marker says the keys are in the OS keyring, whose entry is gone.
    #[error("the keys of {} are kept in the OS keyring, but its entry `{account}` is missing (a keyring that was reset, or another Secret Service answering); no new key is made beside the old one: restore the entry, set STACK_RUNTIME_KEY to the key, or remove {} to start over with a new key (files sealed with the old one stay unreadable)", dir.display(), marker.display())]
    KeyringEntryMissing {
        /// The key folder.
        dir: PathBuf,
        /// The entry's user attribute.
        account: String,
        /// The folder's marker file.
        marker: PathBuf,
    },
    /// A key in the OS keyring that is not one.
    #[error("the OS keyring's entry {account}: {reason}")]
    BadKeyringKey {
        /// The entry's user attribute.
        account: String,
        /// What is wrong.
        reason: BadKeyText,
    },
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

/// The folder keys are kept in (or that says they are in the OS keyring).
#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
    /// Where a new key may go instead of a key file.
    keyring: Option<OsKeyring>,
}

/// Where a key store's keys are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyHome {
    /// Key files in the folder (or none yet).
    Files,
    /// The OS keyring's entries for the folder.
    Keyring(OsKeyring),
}

/// The keys a store holds, each with where it came from.
struct Held {
    home: KeyHome,
    current: Option<(Key, KeySource)>,
    next: Option<(Key, KeySource)>,
    retired: Vec<(Key, KeySource)>,
}

impl KeyStore {
    /// Keys in `dir`, new ones in key files (see
    /// [`with_os_keyring`](Self::with_os_keyring)).
    pub fn at(dir: impl Into<PathBuf>) -> KeyStore {
        KeyStore {
            dir: dir.into(),
            keyring: None,
        }
    }

    /// New keys go to the OS keyring when one answers (see the module
    /// docs); keys already in key files stay there.
    pub fn with_os_keyring(mut self) -> KeyStore {
        self.keyring = Some(OsKeyring::for_folder(&self.dir));
        self
    }

    /// Keys in the user's config folder (see the module docs), new ones in
    /// the OS keyring where one answers, unless `STACK_RUNTIME_KEYRING` is
    /// `off`.
    pub fn for_user() -> Result<KeyStore, KeyError> {
        let store = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".config")))
            .map(|config| KeyStore::at(config.join("stack-runtime").join("keys")))
            .ok_or(KeyError::NoHome)?;
        let off = std::env::var(KEYRING_VARIABLE)
            .is_ok_and(|v| matches!(v.trim(), "off" | "0" | "no" | "false"));
        Ok(if off { store } else { store.with_os_keyring() })
    }

    /// Where the keys are: the OS keyring when the folder's marker says so,
    /// else key files.
    pub fn home(&self) -> KeyHome {
        match std::fs::read_to_string(self.marker_path()) {
            // The entries are named after the folder as it was spelled
            // when the key was made (the marker keeps that spelling).
            Ok(text) => KeyHome::Keyring(
                text.lines()
                    .find_map(|line| line.strip_prefix("folder="))
                    .map_or_else(
                        || OsKeyring::for_folder(&self.dir),
                        |folder| OsKeyring::named(folder.to_string()),
                    ),
            ),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => KeyHome::Files,
            // There but unreadable: the keys are not in files either.
            Err(_) => KeyHome::Keyring(OsKeyring::for_folder(&self.dir)),
        }
    }

    /// Where the keys are, or where a new one would go, in words.
    pub fn describe_home(&self) -> String {
        match (self.home(), &self.keyring) {
            (KeyHome::Keyring(keyring), _) => format!(
                "the OS keyring (Secret Service: service {}, user {})",
                crate::keyring::SERVICE,
                keyring.account(Slot::Current)
            ),
            (KeyHome::Files, _) if self.current_path().exists() => {
                format!("key file {}", self.current_path().display())
            }
            (KeyHome::Files, Some(_)) => format!(
                "none yet: a new key goes to the OS keyring where one answers, else to the key file {} (0600)",
                self.current_path().display()
            ),
            (KeyHome::Files, None) => format!(
                "none yet: a new key goes to the key file {} (0600)",
                self.current_path().display()
            ),
        }
    }

    fn marker_path(&self) -> PathBuf {
        self.dir.join(MARKER)
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
            || self.marker_path().exists()
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
        let environment = key_from_environment()?;
        let held = match self.held() {
            Ok(held) => held,
            // The keyring does not answer, but the host gave the key.
            Err(KeyError::Keyring { .. }) if environment.is_some() => Held {
                home: self.home(),
                current: None,
                next: None,
                retired: Vec::new(),
            },
            Err(err) => return Err(err),
        };
        let mut keys: Vec<(Key, KeySource)> = Vec::new();
        if let Some(current) = held.current {
            keys.push(current);
        }
        if let Some(key) = environment {
            keys.push((key, KeySource::Environment));
        }
        if encrypt && keys.is_empty() {
            keys.push(self.create_current()?);
        }
        keys.extend(held.next);
        keys.extend(held.retired);
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

    /// The keys the store holds, from its key files or its keyring entries.
    fn held(&self) -> Result<Held, KeyError> {
        match self.home() {
            KeyHome::Files => Ok(Held {
                home: KeyHome::Files,
                current: read_key_file(&self.current_path())?
                    .map(|key| (key, KeySource::File(self.current_path()))),
                next: read_key_file(&self.next_path())?
                    .map(|key| (key, KeySource::File(self.next_path()))),
                retired: self
                    .retired()?
                    .into_iter()
                    .map(|(key, path)| (key, KeySource::File(path)))
                    .collect(),
            }),
            KeyHome::Keyring(keyring) => {
                let unreachable = self.keyring_error();
                let read = |slot| -> Result<Vec<(Key, KeySource)>, KeyError> {
                    let account = keyring.account(slot);
                    let Some(text) = keyring.read(slot).map_err(unreachable)? else {
                        return Ok(Vec::new());
                    };
                    text.lines()
                        .filter(|line| !line.trim().is_empty())
                        .map(|line| {
                            Key::from_hex(line)
                                .map(|key| (key, KeySource::Keyring(account.clone())))
                                .map_err(|reason| KeyError::BadKeyringKey {
                                    account: account.clone(),
                                    reason,
                                })
                        })
                        .collect()
                };
                let current = read(Slot::Current)?.into_iter().next();
                let next = read(Slot::Next)?.into_iter().next();
                let mut retired = read(Slot::Retired)?;
                // Key files beside the marker (from a process that did not
                // see it) still open what they sealed.
                for path in [self.current_path(), self.next_path()] {
                    if let Some(key) = read_key_file(&path)? {
                        retired.push((key, KeySource::File(path)));
                    }
                }
                for (key, path) in self.retired()? {
                    retired.push((key, KeySource::File(path)));
                }
                Ok(Held {
                    home: KeyHome::Keyring(keyring),
                    current,
                    next,
                    retired,
                })
            }
        }
    }

    /// The current key, made now if there is none: in the OS keyring when
    /// the store may use one, one answers and no key file exists, else in
    /// a new key file. Serialized with other processes by an exclusive lock
    /// on the folder's `create.lock`, under which what exists is looked at
    /// again. When the marker says the keys are in the keyring and its
    /// entry is empty, no key is made ([`KeyError::KeyringEntryMissing`]).
    fn create_current(&self) -> Result<(Key, KeySource), KeyError> {
        let lock_path = self.dir.join("create.lock");
        let lock = self.open_lock_file(&lock_path)?;
        lock.lock().map_err(io(&lock_path))?;
        if let KeyHome::Keyring(keyring) = self.home() {
            return match self.held()?.current {
                Some(current) => Ok(current),
                None => Err(KeyError::KeyringEntryMissing {
                    dir: self.dir.clone(),
                    account: keyring.account(Slot::Current),
                    marker: self.marker_path(),
                }),
            };
        }
        if let Some(key) = read_key_file(&self.current_path())? {
            return Ok((key, KeySource::File(self.current_path())));
        }
        let key_files = self.next_path().exists() || !self.retired()?.is_empty();
        if let (Some(keyring), false) = (&self.keyring, key_files) {
            // No keyring on this session (a headless host), or one that
            // would not take the key (locked, a prompt dismissed or not
            // answered): a key file, as the module docs say.
            if let Ok(made) = self.create_in_keyring(keyring) {
                return Ok(made);
            }
        }
        let path = self.current_path();
        let key = Key::generate();
        match write_key_file(&path, &key) {
            Ok(()) => Ok((key, KeySource::File(path))),
            // Another process made it first: use that one.
            Err(KeyError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                let key = read_key_file(&path)?.ok_or_else(|| KeyError::Unsafe {
                    path: path.clone(),
                    reason: "vanished while it was read".into(),
                })?;
                Ok((key, KeySource::File(path)))
            }
            Err(err) => Err(err),
        }
    }

    /// Makes the current key in the OS keyring (under `create_current`'s
    /// lock), then writes the marker. A crash between the two leaves a key
    /// in the keyring and no marker; the next start takes that key up
    /// again the same way.
    fn create_in_keyring(&self, keyring: &OsKeyring) -> Result<(Key, KeySource), KeyError> {
        let failed = self.keyring_error();
        let account = keyring.account(Slot::Current);
        let key = match keyring.read(Slot::Current).map_err(failed)? {
            Some(text) => Key::from_hex(&text).map_err(|reason| KeyError::BadKeyringKey {
                account: account.clone(),
                reason,
            })?,
            None => {
                let key = Key::generate();
                keyring
                    .write(Slot::Current, &key.to_hex())
                    .map_err(failed)?;
                key
            }
        };
        let marker = self.marker_path();
        let note = format!(
            "The keys of this folder are in the OS keyring (Secret Service), as the entries\nservice {}, user current@FOLDER, next@FOLDER and retired@FOLDER. No key is kept here.\nfolder={}\n",
            crate::keyring::SERVICE,
            keyring.folder()
        );
        write_new_file(&marker, note.as_bytes()).map_err(io(&marker))?;
        Ok((key, KeySource::Keyring(account)))
    }

    /// A shared hold on the keys for as long as a runtime uses them (a
    /// rotation waits for none).
    pub fn lease(&self) -> Result<KeyLease, KeyError> {
        let file = self.open_lock()?;
        file.lock_shared().map_err(io(&self.lock_path()))?;
        Ok(KeyLease { _file: file })
    }

    fn open_lock(&self) -> Result<File, KeyError> {
        self.open_lock_file(&self.lock_path())
    }

    /// Opens (making the folder and the file if need be) a lock file of
    /// the folder: `lock` (leases and rotations) or `create.lock`.
    fn open_lock_file(&self, path: &Path) -> Result<File, KeyError> {
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
            .open(path)
            .map_err(io(path))
    }

    /// The error of a keyring call for this folder's keys.
    fn keyring_error(&self) -> impl Fn(KeyringError) -> KeyError + Copy + '_ {
        move |reason| KeyError::Keyring {
            dir: self.dir.clone(),
            reason,
        }
    }

    /// Starts (or takes up again) a rotation: refuses while a runtime
    /// holds a lease, writes a new key to `next` (keeping one an earlier
    /// rotation left), and returns a vault that opens files sealed with
    /// either key.
    pub fn begin_rotation(&self) -> Result<Rotation, KeyError> {
        let lock = self.open_lock()?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(KeyError::InUse),
            Err(std::fs::TryLockError::Error(err)) => return Err(io(&self.lock_path())(err)),
        }
        // Read under the lock: a rotation that finished meanwhile is seen.
        let held = self.held()?;
        let Some((current, current_source)) = held.current else {
            return Err(match &held.home {
                KeyHome::Keyring(keyring) => KeyError::KeyringEntryMissing {
                    dir: self.dir.clone(),
                    account: keyring.account(Slot::Current),
                    marker: self.marker_path(),
                },
                KeyHome::Files => KeyError::NothingToRotate {
                    path: self.current_path(),
                    from_environment: std::env::var_os(KEY_VARIABLE).is_some(),
                },
            });
        };
        // A `next` equal to `current` is what a rotation cut short after
        // making it current leaves: not a new key.
        let next = held.next.filter(|(key, _)| key.id() != current.id());
        let (new, new_source) = match (next, &held.home) {
            (Some(next), _) => next,
            (None, KeyHome::Files) => {
                let key = Key::generate();
                write_key_file(&self.next_path(), &key)?;
                (key, KeySource::File(self.next_path()))
            }
            (None, KeyHome::Keyring(keyring)) => {
                let key = Key::generate();
                keyring
                    .write(Slot::Next, &key.to_hex())
                    .map_err(self.keyring_error())?;
                (key, KeySource::Keyring(keyring.account(Slot::Next)))
            }
        };
        let mut vault =
            Vault::sealing(new.clone(), new_source).also_opening(current.clone(), current_source);
        if let Some(key) = key_from_environment()? {
            vault = vault.also_opening(key, KeySource::Environment);
        }
        Ok(Rotation {
            store: self.clone(),
            home: held.home,
            retired: held.retired.into_iter().map(|(key, _)| key).collect(),
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
    home: KeyHome,
    /// The keys retired before (kept in the keyring's one entry).
    retired: Vec<Key>,
    _lock: File,
    vault: Vault,
    old: Key,
    new: Key,
}

impl Rotation {
    /// Where the old key is kept once the rotation is finished without
    /// `forget_old`, in words ("as FILE", "in the OS keyring's entry ...").
    pub fn old_key_kept(&self) -> String {
        match &self.home {
            KeyHome::Files => format!(
                "as {}",
                self.store
                    .retired_dir()
                    .join(self.old.id().to_string())
                    .display()
            ),
            KeyHome::Keyring(keyring) => format!(
                "in the OS keyring's entry {}",
                keyring.account(Slot::Retired)
            ),
        }
    }

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
        if let KeyHome::Keyring(keyring) = &self.home {
            let failed = self.store.keyring_error();
            if forget_old {
                keyring
                    .write(Slot::Current, &self.new.to_hex())
                    .map_err(failed)?;
                keyring.delete(Slot::Next).map_err(failed)?;
                keyring.delete(Slot::Retired).map_err(failed)?;
            } else {
                // Retired first: a rotation cut short anywhere leaves every
                // key at hand (a `next` equal to `current` is harmless).
                let mut retired = zeroize::Zeroizing::new(String::new());
                for key in self.retired.iter().chain([&self.old]) {
                    if key.id() != self.new.id() && !retired.contains(key.to_hex().as_str()) {
                        retired.push_str(&key.to_hex());
                        retired.push('\n');
                    }
                }
                keyring.write(Slot::Retired, &retired).map_err(failed)?;
                keyring
                    .write(Slot::Current, &self.new.to_hex())
                    .map_err(failed)?;
                keyring.delete(Slot::Next).map_err(failed)?;
            }
            return Ok(());
        }
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

/// Writes `bytes` to `path` (0600) by way of a synced temporary file
/// renamed into place.
fn write_new_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_os_string();
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let written = (|| {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written?;
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
