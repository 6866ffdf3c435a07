//! The OS keyring as a home for keys: the freedesktop Secret Service over
//! the user's D-Bus session (GNOME Keyring, KWallet, KeePassXC), through
//! the `keyring` crate.
//!
//! # Threat model
//!
//! A key in the keyring is kept encrypted by the keyring under the user's
//! login secret (GNOME Keyring's file in `~/.local/share/keyrings` is in a
//! backup of the home folder, but sealed, unless the login password is
//! empty), and is handed out over the session bus to processes of this
//! uid that can reach the bus. Unlike a key file, it is not in plaintext in
//! a backup, a cloud sync of `~/.config`, or a disk image taken while the
//! keyring is locked. It does **not** protect against code running as the
//! user outside the sandbox while the keyring is unlocked: such code can
//! ask the Secret Service, as it could read a key file. Sandboxed code
//! cannot: the process sandbox's filesystem view has no `/run` (the bus's
//! socket cannot be named), its network namespace (and at landlock ABI 6+
//! its scope) keeps it off abstract sockets (see `stack-sandbox`'s mounts),
//! its environment is cleared, and WASI code has no sockets at all. The
//! D-Bus client's copies of the key in transit are not wiped from memory.
//!
//! Every call is bounded in time ([`TIMEOUT`]): a keyring that asks to be
//! unlocked and gets no answer (a prompt on a screen nobody watches)
//! counts as unavailable rather than hanging the runtime.
//!
//! Each key folder has its own entries: service `stack-runtime`, user
//! `SLOT@FOLDER` (`current`, `next` and `retired`, the last holding the
//! retired keys one per line), so two folders (two users' configurations,
//! a test's) never share a key. What the folder holds when its keys are in
//! the keyring is a marker file (see [`crate::keys`]), never a key.

use std::path::Path;
use std::time::Duration;

use zeroize::Zeroizing;

/// The Secret Service's `service` attribute of every entry.
pub const SERVICE: &str = "stack-runtime";

/// How long one keyring call may take (an unlock prompt included).
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A key's place in a key store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The key new files are sealed with.
    Current,
    /// The key a rotation under way moves to.
    Next,
    /// Keys earlier rotations retired (64 hex digits a line).
    Retired,
}

impl Slot {
    fn name(self) -> &'static str {
        match self {
            Slot::Current => "current",
            Slot::Next => "next",
            Slot::Retired => "retired",
        }
    }
}

/// Why the keyring could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    /// There is no Secret Service on this session (no session bus, no
    /// service on it), or it is locked and was not unlocked.
    #[error("the OS keyring is not reachable: {0}")]
    Unavailable(String),
    /// The keyring answered with an error.
    #[error("the OS keyring failed: {0}")]
    Failed(String),
}

/// The Secret Service entries of one key folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsKeyring {
    folder: String,
}

impl OsKeyring {
    /// The entries of the key folder `dir`.
    pub fn for_folder(dir: &Path) -> OsKeyring {
        OsKeyring::named(dir.display().to_string())
    }

    /// The entries named after `folder` (as a key folder's marker spells
    /// it).
    pub fn named(folder: String) -> OsKeyring {
        OsKeyring { folder }
    }

    /// The folder the entries are named after.
    pub fn folder(&self) -> &str {
        &self.folder
    }

    /// The entry's `user` attribute for `slot`.
    pub fn account(&self, slot: Slot) -> String {
        format!("{}@{}", slot.name(), self.folder)
    }

    /// Runs `op` on `slot`'s entry on a thread of its own, for at most
    /// [`TIMEOUT`].
    fn call<T: Send + 'static>(
        &self,
        slot: Slot,
        op: impl FnOnce(keyring::Entry) -> Result<T, KeyringError> + Send + 'static,
    ) -> Result<T, KeyringError> {
        // Without a session bus, libdbus would try (and fail) to start one;
        // say what is missing instead.
        if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_none_or(|a| a.is_empty()) {
            return Err(KeyringError::Unavailable(
                "there is no session bus (DBUS_SESSION_BUS_ADDRESS is not set)".into(),
            ));
        }
        let account = self.account(slot);
        let (answer, answered) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("os-keyring".into())
            .spawn(move || {
                let result = keyring::Entry::new(SERVICE, &account)
                    .map_err(classify)
                    .and_then(op);
                let _ = answer.send(result);
            })
            .map_err(|err| KeyringError::Failed(format!("no thread for the call: {err}")))?;
        answered.recv_timeout(TIMEOUT).unwrap_or_else(|_| {
            Err(KeyringError::Unavailable(format!(
                "it did not answer within {} s (an unlock prompt nobody answered?)",
                TIMEOUT.as_secs()
            )))
        })
    }

    /// What `slot` holds; `None` when it holds nothing.
    pub fn read(&self, slot: Slot) -> Result<Option<Zeroizing<String>>, KeyringError> {
        self.call(slot, |entry| match entry.get_password() {
            Ok(text) => Ok(Some(Zeroizing::new(text))),
            Err(keyring::Error::NoEntry) => Ok(None),
            Err(err) => Err(classify(err)),
        })
    }

    /// Puts `text` in `slot`, replacing what it held.
    pub fn write(&self, slot: Slot, text: &str) -> Result<(), KeyringError> {
        let text = Zeroizing::new(text.to_string());
        self.call(slot, move |entry| {
            entry.set_password(&text).map_err(classify)
        })
    }

    /// Empties `slot` (nothing to do when it is empty).
    pub fn delete(&self, slot: Slot) -> Result<(), KeyringError> {
        self.call(slot, |entry| match entry.delete_credential() {
            Ok(()) | Err(keyring::Error::NoEntry) => Ok(()),
            Err(err) => Err(classify(err)),
        })
    }
}

fn classify(err: keyring::Error) -> KeyringError {
    match err {
        keyring::Error::NoStorageAccess(cause) => KeyringError::Unavailable(cause.to_string()),
        keyring::Error::PlatformFailure(cause) => KeyringError::Unavailable(cause.to_string()),
        other => KeyringError::Failed(other.to_string()),
    }
}
