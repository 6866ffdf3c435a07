//! The runtime's side of protected workspace paths (`.git`, `.envrc`, `.env`,
//! …): which exist before a call (for the zygote to bind read-only or hide),
//! and what a call changed among them (to undo after it).
//!
//! # Threat model
//!
//! Sandboxed code cannot change a protected path that existed when its
//! zygote started: it is a read-only bind mount there (see [`super::mounts`]).
//! What the code can still do, in the workspace it may write:
//! - create a protected name that did not exist (`git init`, a `.envrc`);
//! - replace one that is a symlink, or was removed under it (by another,
//!   concurrent call's clean-up, or the user), or one that a host editor
//!   replaced after the zygote started;
//! - turn a parent of a multi-part name (`.github` of `.github/workflows`)
//!   into a symlink, to steer the runtime's clean-up outside;
//! - make what it creates as deep or wide as it likes.
//!
//! So, around every call, the runtime (possibly root) records what each
//! protected name is (absent, or which inode) and, after the call, *moves
//! aside* every read-only name that is now something else, and every hidden
//! name that appeared: one `renameat2(RENAME_NOREPLACE)` to
//! `<name>.stack-quarantine-<time>-<n>` in the same folder, which git,
//! direnv and editors ignore. It never deletes (no recursion a deep tree
//! could exhaust, no user data lost to a race with the user), and never
//! resolves a symlink: the folder is opened from the workspace's own
//! descriptor with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, and a name whose
//! parent became a symlink has that symlink moved aside instead. The call
//! then fails and says what was moved where. Each zygote is keyed by the
//! inodes of the protected paths it binds, so one that was replaced gets a
//! new zygote rather than a stale bind.
//!
//! The runtime's own state: where a workspace contains the runtime's cache,
//! configuration or data folder (a workspace that is the home folder), they
//! are protected too, so code cannot plant native code in the compiled
//! module cache or forge the audit log (see
//! [`super::runtime_state_folders`]): a protected list may hold absolute
//! paths, which count where the workspace contains them.
//!
//! Submodules and hooks: git also runs what `<submodule>/.git` points to and
//! the folder `core.hooksPath` names, so when `.git` exists, the `.git` of
//! every path in `.gitmodules` and the `core.hooksPath` folder inside the
//! workspace are protected read-only too. Not covered: a nested repository
//! that is no submodule (`sub/.git`, which git at the top never reads) and
//! build files such as a `Makefile`, which sandboxed code may edit by
//! design.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::libc;
use nix::sys::stat::{fstatat, Mode};

use super::spec::{ProtectedMode, ProtectedPath};
use crate::execution::{ExecStatus, Execution};

/// What a protected name is at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Nothing there.
    Absent,
    /// This inode (`st_mode & S_IFMT` in `kind`).
    Object { dev: u64, ino: u64, kind: u32 },
    /// A folder on the way is a symlink (or leads out): the name cannot be
    /// reached without following one.
    Unresolvable,
}

/// Every protected name of a workspace with what it was when a call began.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    entries: Vec<(PathBuf, ProtectedMode, State)>,
}

/// One protected name a call changed, and what was done about it.
#[derive(Debug, Clone)]
pub(crate) struct Undone {
    /// The name (relative to the workspace) that was changed.
    pub name: PathBuf,
    /// Where it was moved (relative to the workspace), or why it could not be.
    pub moved_to: Result<PathBuf, String>,
}

/// The protected paths the zygote must bind (existing ones, resolved, with
/// their inodes), and the snapshot to compare with after the call.
/// `workspace` is canonical. Blocking.
pub(crate) fn survey(
    workspace: &Path,
    names: &[(PathBuf, ProtectedMode)],
) -> (Vec<ProtectedPath>, Snapshot) {
    let Ok(root) = open_root(workspace) else {
        return (Vec::new(), Snapshot::default());
    };
    let absolute = absolute_entries(workspace, names);
    let mut names: Vec<(PathBuf, ProtectedMode)> = names
        .iter()
        .filter(|(name, _)| is_relative_name(name))
        .cloned()
        .collect();
    for (name, mode) in absolute {
        if !names.iter().any(|(n, _)| *n == name) {
            names.push((name, mode));
        }
    }
    names.extend(git_extras(&root, workspace, &names));
    let mut present = Vec::new();
    let mut entries = Vec::new();
    for (name, mode) in names {
        let state = state_of(&root, &name);
        if let State::Object { dev, ino, kind } = state {
            if kind == libc::S_IFLNK {
                // A link to a path inside the workspace protects that path;
                // one that leads out is the landlock rules' and the mount
                // namespace's business. The link itself is in the snapshot.
                if let Ok(real) = std::fs::canonicalize(workspace.join(&name)) {
                    if let (Ok(meta), true) = (
                        std::fs::symlink_metadata(&real),
                        real.starts_with(workspace) && real != workspace,
                    ) {
                        use std::os::unix::fs::MetadataExt;
                        present.push(ProtectedPath {
                            path: real,
                            mode,
                            object: (meta.dev(), meta.ino()),
                        });
                    }
                }
            } else {
                present.push(ProtectedPath {
                    path: workspace.join(&name),
                    mode,
                    object: (dev, ino),
                });
            }
        }
        entries.push((name, mode, state));
    }
    present.sort_by(|a, b| a.path.cmp(&b.path));
    present.dedup();
    (present, Snapshot { entries })
}

/// The absolute entries of a protected list as names in `workspace`,
/// where it contains them (the runtime's own folders, see
/// `runtime_state_folders`). A runtime that is not root makes a missing one
/// first, so that it is bound from the first call (one a call made would
/// only be moved aside after it); root never makes folders by a path a
/// workspace's owner controls.
fn absolute_entries(
    workspace: &Path,
    names: &[(PathBuf, ProtectedMode)],
) -> Vec<(PathBuf, ProtectedMode)> {
    let root = nix::unistd::geteuid().is_root();
    let mut found: Vec<(PathBuf, ProtectedMode)> = Vec::new();
    for (folder, mode) in names.iter().filter(|(p, _)| p.is_absolute()) {
        // Inside or not is decided on the resolved path (a home folder is
        // often reached through a symlink), never on the spelling.
        let Some(resolved) = resolve_existing_prefix(folder) else {
            continue;
        };
        if !resolved.starts_with(workspace) {
            continue;
        }
        if !root && !folder.exists() {
            use std::os::unix::fs::DirBuilderExt;
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(folder);
        }
        let Ok(real) = std::fs::canonicalize(folder) else {
            continue;
        };
        let Ok(name) = real.strip_prefix(workspace) else {
            continue;
        };
        let name = name.to_path_buf();
        if is_relative_name(&name) && !found.iter().any(|(n, _)| *n == name) {
            found.push((name, *mode));
        }
    }
    found
}

/// The runtime's own folder (an absolute entry of `names`, see
/// `runtime_state_folders`) that is `workspace` or holds it, if any. Such
/// a folder cannot be kept read-only or hidden inside the workspace (it
/// would be the whole workspace), so sandboxed code must not run there at
/// all: it could plant native code the runtime loads next (a compiled
/// module, a llama.cpp backend beside the binary). `workspace` is
/// canonical. Blocking.
pub(crate) fn workspace_within_protected(
    workspace: &Path,
    names: &[(PathBuf, ProtectedMode)],
) -> Option<PathBuf> {
    names
        .iter()
        .filter(|(folder, _)| folder.is_absolute())
        .find_map(|(folder, _)| {
            let resolved = std::fs::canonicalize(folder).ok()?;
            workspace.starts_with(&resolved).then(|| folder.clone())
        })
}

/// The refusal of a call in such a workspace.
pub(crate) fn refuse_workspace(workspace: &Path, folder: &Path) -> String {
    format!(
        "the workspace {} is inside {}, one of the runtime's own folders, which sandboxed code \
         may not write; choose another workspace",
        workspace.display(),
        folder.display()
    )
}

/// `path` with its longest existing prefix resolved (symlinks followed)
/// and the rest appended as written.
fn resolve_existing_prefix(path: &Path) -> Option<PathBuf> {
    let mut rest = Vec::new();
    for ancestor in path.ancestors() {
        if let Ok(real) = std::fs::canonicalize(ancestor) {
            return Some(rest.iter().rev().fold(real, |p, c| p.join(c)));
        }
        rest.push(ancestor.file_name()?);
    }
    None
}

impl Snapshot {
    /// Moves aside what the call changed (see the module docs). Blocking.
    pub(crate) fn undo_changes(&self, workspace: &Path) -> Vec<Undone> {
        let Ok(root) = open_root(workspace) else {
            return Vec::new();
        };
        let mut undone = Vec::new();
        for (name, mode, before) in &self.entries {
            let now = state_of(&root, name);
            let changed = match mode {
                ProtectedMode::ReadOnly => now != *before,
                ProtectedMode::Hidden => *before == State::Absent && now != State::Absent,
            };
            if !changed || now == State::Absent {
                continue;
            }
            let target = match now {
                State::Unresolvable => first_symlink(&root, name),
                _ => Some(name.clone()),
            };
            if let Some(target) = target {
                if undone.iter().any(|u: &Undone| u.name == target) {
                    continue;
                }
                let moved_to = move_aside(&root, &target);
                undone.push(Undone {
                    name: target,
                    moved_to,
                });
            }
        }
        undone
    }

    /// Whether there is anything to compare.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What to wait for before undoing an abandoned call's changes: its
/// processes' end.
pub(crate) enum AbandonedCall {
    /// The call's init, killed already: its pidfd turns readable once it
    /// (and with it the call's PID namespace) is gone.
    Init(OwnedFd),
    /// A guest whose deadline was moved to now: it stops within this.
    #[cfg_attr(not(feature = "wasi"), allow(dead_code))]
    Guest(std::time::Duration),
}

/// Undoes a call's changes to protected paths even when the call is
/// abandoned (its future dropped: a cancelled turn, an MCP client's
/// cancellation), where the code after the call that would undo them never
/// runs. Without it, code that plants a protected name (`.envrc`) and then
/// waits to be cancelled would keep it. Take the snapshot back with
/// [`UndoIfAbandoned::take`] when the call ends normally.
pub(crate) struct UndoIfAbandoned(Option<(Snapshot, PathBuf, Option<AbandonedCall>)>);

impl UndoIfAbandoned {
    /// Guards `snapshot` of the call over `workspace`.
    pub(crate) fn new(
        snapshot: Snapshot,
        workspace: PathBuf,
        wait: Option<AbandonedCall>,
    ) -> UndoIfAbandoned {
        UndoIfAbandoned(Some((snapshot, workspace, wait)))
    }

    /// The snapshot, for the caller to undo and report itself.
    pub(crate) fn take(&mut self) -> Option<Snapshot> {
        self.0.take().map(|(snapshot, _, _)| snapshot)
    }
}

impl Drop for UndoIfAbandoned {
    fn drop(&mut self) {
        let Some((snapshot, workspace, wait)) = self.0.take() else {
            return;
        };
        if snapshot.is_empty() {
            return;
        }
        let undo = move || {
            let undone = snapshot.undo_changes(&workspace);
            if !undone.is_empty() {
                tracing::warn!(
                    workspace = %workspace.display(),
                    moved = ?undone,
                    "an abandoned call had changed protected workspace paths; they were moved aside"
                );
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    match wait {
                        Some(AbandonedCall::Init(pidfd)) => {
                            // SAFETY: the OwnedFd stays open, unchanged, for
                            // as long as the AsyncFd owns it.
                            if let Ok(pidfd) = unsafe {
                                tokio::io::unix::AsyncFd::register_with_interest(
                                    pidfd,
                                    tokio::io::Interest::READABLE,
                                )
                            } {
                                let _ = tokio::time::timeout(
                                    std::time::Duration::from_secs(2),
                                    pidfd.readable(),
                                )
                                .await;
                            }
                        }
                        Some(AbandonedCall::Guest(within)) => tokio::time::sleep(within).await,
                        None => {}
                    }
                    let _ = tokio::task::spawn_blocking(undo).await;
                });
            }
            // No runtime to wait on: undo now, on this thread.
            Err(_) => undo(),
        }
    }
}

/// Turns a call that changed protected paths into a failure that says what
/// was moved where.
pub(crate) fn report(outcome: &mut Execution, undone: &[Undone]) {
    let parts: Vec<String> = undone
        .iter()
        .map(|u| match &u.moved_to {
            Ok(to) => format!("`{}` (moved aside to `{}`)", u.name.display(), to.display()),
            Err(why) => format!("`{}` (could not be moved aside: {why})", u.name.display()),
        })
        .collect();
    let message = format!(
        "the call created or replaced {}, which sandboxed code may not create or change (host tools such as git run what is in them)",
        parts.join(", ")
    );
    if matches!(outcome.status, ExecStatus::Ok | ExecStatus::Failed) {
        outcome.status = ExecStatus::Failed;
    }
    outcome.error = Some(match outcome.error.take() {
        Some(earlier) => format!("{earlier}; {message}"),
        None => message,
    });
}

fn is_relative_name(name: &Path) -> bool {
    !name.as_os_str().is_empty() && name.components().all(|c| matches!(c, Component::Normal(_)))
}

fn open_root(workspace: &Path) -> nix::Result<OwnedFd> {
    nix::fcntl::open(
        workspace,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Opens the folder `relative` below `root` without following any symlink
/// and without leaving `root`.
fn open_beneath(root: &OwnedFd, relative: &Path) -> nix::Result<OwnedFd> {
    super::mount_api::beneath(
        root.as_fd(),
        relative,
        OFlag::O_PATH | OFlag::O_DIRECTORY,
        super::mount_api::Mounts::Cross,
    )
}

fn split(name: &Path) -> Option<(&Path, &std::ffi::OsStr)> {
    Some((name.parent().unwrap_or(Path::new("")), name.file_name()?))
}

fn state_of(root: &OwnedFd, name: &Path) -> State {
    let Some((parent, last)) = split(name) else {
        return State::Absent;
    };
    let folder = match open_beneath(root, parent) {
        Ok(folder) => folder,
        Err(Errno::ENOENT) => return State::Absent,
        Err(_) => return State::Unresolvable,
    };
    match fstatat(folder.as_fd(), last, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) => State::Object {
            dev: stat.st_dev,
            ino: stat.st_ino,
            kind: stat.st_mode & libc::S_IFMT,
        },
        Err(Errno::ENOENT) => State::Absent,
        Err(_) => State::Unresolvable,
    }
}

/// The first folder of `name` (from the root down) that is a symlink.
fn first_symlink(root: &OwnedFd, name: &Path) -> Option<PathBuf> {
    let mut so_far = PathBuf::new();
    for component in name.components() {
        so_far.push(component);
        if let State::Object { kind, .. } = state_of(root, &so_far) {
            if kind == libc::S_IFLNK {
                return Some(so_far);
            }
        } else {
            return None;
        }
    }
    None
}

/// Renames `name` to a quarantine name beside it; never replaces anything.
fn move_aside(root: &OwnedFd, name: &Path) -> Result<PathBuf, String> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let (parent, last) = split(name).ok_or("no name")?;
    let folder = open_beneath(root, parent).map_err(|e| e.to_string())?;
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for _ in 0..16 {
        let aside = format!(
            "{}.stack-quarantine-{seconds}-{}",
            last.to_string_lossy(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        match nix::fcntl::renameat2(
            folder.as_fd(),
            last,
            folder.as_fd(),
            aside.as_str(),
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => return Ok(parent.join(aside)),
            Err(Errno::EEXIST) => continue,
            Err(err) => return Err(err.to_string()),
        }
    }
    Err("no free quarantine name".into())
}

/// With `.git` among the names: the `.git` of each submodule path in
/// `.gitmodules`, and the `core.hooksPath` folder, when inside the
/// workspace (git runs what they hold, too).
fn git_extras(
    root: &OwnedFd,
    workspace: &Path,
    names: &[(PathBuf, ProtectedMode)],
) -> Vec<(PathBuf, ProtectedMode)> {
    let guards_git = names
        .iter()
        .any(|(n, m)| n == Path::new(".git") && *m == ProtectedMode::ReadOnly);
    if !guards_git || !matches!(state_of(root, Path::new(".git")), State::Object { .. }) {
        return Vec::new();
    }
    let mut extras = vec![(PathBuf::from(".gitmodules"), ProtectedMode::ReadOnly)];
    let values = |file: &str, key: &str| -> Vec<String> {
        let Ok(text) = read_small(root, Path::new(file)) else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|line| {
                let (k, v) = line.split_once('=')?;
                (k.trim().eq_ignore_ascii_case(key)).then(|| v.trim().trim_matches('"').to_string())
            })
            .collect()
    };
    for path in values(".gitmodules", "path") {
        let submodule = PathBuf::from(path).join(".git");
        if is_relative_name(&submodule) {
            extras.push((submodule, ProtectedMode::ReadOnly));
        }
    }
    for hooks in values(".git/config", "hookspath") {
        let hooks = PathBuf::from(hooks);
        let relative = if hooks.is_absolute() {
            hooks.strip_prefix(workspace).map(Path::to_path_buf).ok()
        } else {
            Some(hooks)
        };
        if let Some(relative) = relative.filter(|r| is_relative_name(r)) {
            extras.push((relative, ProtectedMode::ReadOnly));
        }
    }
    extras
}

/// Reads a small text file below `root` without following symlinks.
fn read_small(root: &OwnedFd, name: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let fd = openat2(root, name, how)?;
    let stat = nix::sys::stat::fstat(&fd)?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(64 * 1024)
        .read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A changed protected name is moved aside, never deleted and never
    /// followed: a parent turned into a symlink to a folder outside has the
    /// symlink moved, and the folder outside is left as it was.
    #[test]
    fn changes_are_moved_aside_without_following_links() {
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(outside.path().join("workflows")).expect("mkdir");
        let ws = tempfile::tempdir().expect("tempdir");
        let workspace = std::fs::canonicalize(ws.path()).expect("canonical");
        std::fs::create_dir(workspace.join(".git")).expect("mkdir");
        let names = vec![
            (PathBuf::from(".git"), ProtectedMode::ReadOnly),
            (PathBuf::from(".envrc"), ProtectedMode::ReadOnly),
            (PathBuf::from(".github/workflows"), ProtectedMode::ReadOnly),
            (PathBuf::from(".env"), ProtectedMode::Hidden),
        ];
        let (present, snapshot) = survey(&workspace, &names);
        assert_eq!(present.len(), 1, "{present:?}");
        // What a call might do: replace .git, create .envrc and .env, and
        // make .github a link to a folder outside.
        std::fs::rename(workspace.join(".git"), workspace.join("old-git")).expect("mv");
        std::fs::create_dir(workspace.join(".git")).expect("mkdir");
        std::fs::write(workspace.join(".envrc"), "id\n").expect("write");
        std::fs::write(workspace.join(".env"), "A=1\n").expect("write");
        std::os::unix::fs::symlink(outside.path(), workspace.join(".github")).expect("link");
        let undone = snapshot.undo_changes(&workspace);
        let names: Vec<String> = undone
            .iter()
            .map(|u| u.name.display().to_string())
            .collect();
        assert_eq!(names, [".git", ".envrc", ".github", ".env"], "{undone:?}");
        for u in &undone {
            let to = u.moved_to.as_ref().expect("moved");
            assert!(workspace.join(to).symlink_metadata().is_ok(), "{to:?}");
            assert!(
                !workspace.join(&u.name).exists(),
                "{:?} still there",
                u.name
            );
        }
        assert!(
            outside.path().join("workflows").is_dir(),
            "followed a link out"
        );
        // Nothing changed since: nothing to undo.
        let (_, again) = survey(
            &workspace,
            &[(PathBuf::from(".git"), ProtectedMode::ReadOnly)],
        );
        assert!(again.undo_changes(&workspace).is_empty());
    }
}
