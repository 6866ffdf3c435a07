//! Sharing a root-owned workspace with the sandbox's uid without giving it
//! away.
//!
//! A root runtime never runs sandboxed code as root (rule 5 of the threat
//! model in [`super`]), so code in a workspace that belongs to root runs as
//! the dedicated sandbox uid, which by itself may not write there. Handing the workspace over
//! with a recursive `chown` would silently change the owner of every file in
//! the user's project (git, for one, then refuses the repository as of
//! "dubious ownership"). Instead every directory and regular file gets a
//! POSIX ACL entry for the sandbox's uid, and every directory a default entry
//! too, so that what is created in it later inherits the access; owners,
//! modes and the ACL entries already there are kept. What sandboxed code
//! creates belongs to the sandbox uid.
//!
//! # Threat model
//!
//! The walk runs as root over a tree that sandboxed code may have written to
//! (a world-writable folder in it, or an earlier grant). It must not be
//! steered into granting anything outside the workspace:
//!
//! 1. **No symlink is followed.** Every step is an `openat` with
//!    `O_NOFOLLOW` from the descriptor of the folder above, and ACLs are set
//!    through the opened descriptor, so a link planted (or swapped in during
//!    the walk) grants nothing where it points. Test:
//!    `root_owned_workspace_is_shared_not_given_away` in
//!    `tests/process_escape.rs` (a link to a root-only file outside).
//! 2. **Only directories and regular files** are touched; devices, FIFOs and
//!    sockets are left alone (opening them could block or have effects).
//! 3. **No hard-linked file** (`st_nlink > 1`) is granted: its inode may
//!    also be a file outside the workspace (a pnpm store, `cp -al`, a local
//!    clone), and an ACL on the inode would grant that file too. Test:
//!    `as_root_hard_links_out_of_a_root_workspace_are_not_granted`.
//! 4. **No system folder** (`/`, `/etc`, `/usr`, …) and no home of root is
//!    accepted as a root-owned workspace ([`refuse_unsafe_root`]): one
//!    `execute_code` from an `agent` started there would share the tree.
//! 5. **The grantee is a dedicated uid** ([`super::sandbox_id`]) that no
//!    host process runs as, never `nobody`: entries a runtime leaves behind
//!    (a `kill -9`, or simply the session's end) grant nothing to anything
//!    but sandboxed code, which landlock and the mount namespace confine to
//!    its own workspace.
//!
//! Fails closed: a filesystem without POSIX ACLs refuses the call, with a
//! message that says what to do instead.

use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{AtFlags, OFlag};
use nix::libc;
use nix::sys::stat::{FileStat, Mode};

const ACCESS: &CStr = c"system.posix_acl_access";
const DEFAULT: &CStr = c"system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const UNDEFINED_ID: u32 = u32::MAX;

/// One ACL entry, ordered as the kernel wants them: by tag, then id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    tag: u16,
    id: u32,
    perm: u16,
}

/// Whether `uid` already has full access to `root` through its ACL (the
/// sign that the tree was granted before).
pub(crate) fn is_granted(root: &Path, uid: u32) -> bool {
    let Ok(dir) = open_dir_at(None, root) else {
        return false;
    };
    read_acl(dir.as_fd(), ACCESS)
        .ok()
        .flatten()
        .is_some_and(|acl| {
            acl.iter()
                .any(|e| e.tag == USER && e.id == uid && e.perm == 7)
        })
}

/// Gives `uid` read-write access to every directory and regular file under
/// `root` (and, through default ACLs, to what is created there later).
pub(crate) fn grant_tree(root: &Path, uid: u32) -> std::io::Result<()> {
    let explain = |err: std::io::Error| {
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            std::io::Error::other(format!(
                "the workspace {} is owned by root and its filesystem has no POSIX ACLs, so sandboxed code (which never runs as root) cannot be given access to it; give the workspace to an unprivileged user (chown) or run the agent as one",
                root.display()
            ))
        } else {
            std::io::Error::other(format!(
                "sharing the root-owned workspace {} with the sandbox: {err}",
                root.display()
            ))
        }
    };
    let mut pending = vec![open_dir_at(None, root).map_err(explain)?];
    while let Some(dir) = pending.pop() {
        grant_dir(dir.as_fd(), uid).map_err(explain)?;
        let mut listing =
            nix::dir::Dir::from_fd(nix::unistd::dup(dir.as_fd()).map_err(|e| explain(e.into()))?)
                .map_err(|e| explain(e.into()))?;
        for entry in listing.iter() {
            let entry = entry.map_err(|e| explain(e.into()))?;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            match entry_kind(dir.as_fd(), &entry) {
                Kind::Directory => {
                    if let Ok(child) = open_dir_at(Some(dir.as_fd()), name) {
                        pending.push(child);
                    }
                }
                Kind::File => {
                    if let Ok(file) = open_file_at(dir.as_fd(), name) {
                        let stat =
                            nix::sys::stat::fstat(file.as_fd()).map_err(|e| explain(e.into()))?;
                        if kind(&stat) == Kind::File && stat.st_nlink == 1 {
                            let execute = stat.st_mode & 0o100 != 0;
                            let perm = if execute { 7 } else { 6 };
                            add_user(file.as_fd(), ACCESS, stat.st_mode, uid, perm)
                                .map_err(explain)?;
                        }
                    }
                }
                Kind::Other => {}
            }
        }
    }
    Ok(())
}

/// Refuses a root-owned workspace that is a system folder or root's home
/// (rule 4): sharing it would share the system.
pub(crate) fn refuse_unsafe_root(workspace: &Path) -> std::io::Result<()> {
    if is_unsafe_root(workspace) {
        return Err(std::io::Error::other(format!(
            "refusing to share {} with sandboxed code: a system folder (or one inside /etc, /usr, /boot, …) or root's home cannot be a root-owned workspace; run in a project folder",
            workspace.display()
        )));
    }
    Ok(())
}

/// Whether `workspace` (canonical) is a folder no root-owned workspace may
/// be: one of the top-level system folders, root's home or `$HOME`, or any
/// folder inside the system's own trees (`/etc/ssh`, `/usr/local`, …).
fn is_unsafe_root(workspace: &Path) -> bool {
    /// Refused themselves (their subfolders may hold projects).
    const SYSTEM: &[&str] = &[
        "/", "/home", "/media", "/mnt", "/opt", "/root", "/srv", "/tmp", "/var", "/var/tmp",
    ];
    /// Refused with everything inside them.
    const SYSTEM_TREES: &[&str] = &[
        "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/run", "/sbin",
        "/sys", "/usr", "/var/lib", "/var/log",
    ];
    let same = |p: &Path| std::fs::canonicalize(p).is_ok_and(|p| p == workspace) || p == workspace;
    let inside = |p: &Path| {
        workspace.starts_with(p) || std::fs::canonicalize(p).is_ok_and(|p| workspace.starts_with(p))
    };
    let mut homes: Vec<std::path::PathBuf> = Vec::new();
    if let Some(home) = std::env::var_os("HOME") {
        homes.push(home.into());
    }
    if let Ok(Some(root)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(0)) {
        homes.push(root.dir);
    }
    SYSTEM.iter().map(Path::new).any(same)
        || SYSTEM_TREES.iter().map(Path::new).any(inside)
        || homes.iter().any(|h| same(h))
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Directory,
    File,
    Other,
}

/// What a directory entry is: from the listing when the filesystem says,
/// else from an `fstatat` that does not follow links. Either way it only
/// decides how to open it: the descriptor opened is checked again.
fn entry_kind(dir: BorrowedFd<'_>, entry: &nix::dir::Entry) -> Kind {
    use nix::dir::Type;
    match entry.file_type() {
        Some(Type::Directory) => Kind::Directory,
        Some(Type::File) => Kind::File,
        Some(_) => Kind::Other,
        None => nix::sys::stat::fstatat(dir, entry.file_name(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_or(Kind::Other, |stat| kind(&stat)),
    }
}

fn kind(stat: &FileStat) -> Kind {
    match stat.st_mode & libc::S_IFMT {
        libc::S_IFDIR => Kind::Directory,
        libc::S_IFREG => Kind::File,
        _ => Kind::Other,
    }
}

fn grant_dir(dir: BorrowedFd<'_>, uid: u32) -> std::io::Result<()> {
    let mode = nix::sys::stat::fstat(dir)?.st_mode;
    add_user(dir, ACCESS, mode, uid, 7)?;
    add_user(dir, DEFAULT, mode, uid, 7)
}

fn open_dir_at<P: ?Sized + nix::NixPath>(
    dir: Option<BorrowedFd<'_>>,
    path: &P,
) -> std::io::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    open_at(dir, path, flags)
}

fn open_file_at<P: ?Sized + nix::NixPath>(
    dir: BorrowedFd<'_>,
    path: &P,
) -> std::io::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY
        | OFlag::O_NOFOLLOW
        | OFlag::O_NONBLOCK
        | OFlag::O_NOCTTY
        | OFlag::O_CLOEXEC;
    open_at(Some(dir), path, flags)
}

fn open_at<P: ?Sized + nix::NixPath>(
    dir: Option<BorrowedFd<'_>>,
    path: &P,
    flags: OFlag,
) -> std::io::Result<OwnedFd> {
    Ok(match dir {
        Some(dir) => nix::fcntl::openat(dir, path, flags, Mode::empty()),
        None => nix::fcntl::open(path, flags, Mode::empty()),
    }?)
}

/// Adds (or widens) `uid`'s entry in the ACL `which` of `fd`; an object
/// without that ACL starts from its `mode`.
fn add_user(
    fd: BorrowedFd<'_>,
    which: &CStr,
    mode: u32,
    uid: u32,
    perm: u16,
) -> std::io::Result<()> {
    let current = read_acl(fd, which)?.unwrap_or_else(|| from_mode(mode));
    if current
        .iter()
        .any(|e| e.tag == USER && e.id == uid && e.perm & perm == perm)
    {
        return Ok(());
    }
    write_acl(fd, which, &with_user(current, uid, perm))
}

fn read_acl(fd: BorrowedFd<'_>, which: &CStr) -> std::io::Result<Option<Vec<Entry>>> {
    let mut buffer = vec![0u8; 4 + 8 * 64];
    loop {
        // SAFETY: fgetxattr into a buffer of the given length.
        let len = unsafe {
            libc::fgetxattr(
                fd.as_raw_fd(),
                which.as_ptr(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
            )
        };
        if len >= 0 {
            let bytes = &buffer[..len as usize];
            return parse(bytes)
                .map(Some)
                .ok_or_else(|| std::io::Error::other("unreadable POSIX ACL"));
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENODATA) => return Ok(None),
            Some(libc::ERANGE) if buffer.len() < 1 << 20 => buffer.resize(buffer.len() * 4, 0),
            _ => return Err(err),
        }
    }
}

fn write_acl(fd: BorrowedFd<'_>, which: &CStr, entries: &[Entry]) -> std::io::Result<()> {
    let bytes = encode(entries);
    // SAFETY: fsetxattr from a buffer of the given length.
    let done = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            which.as_ptr(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
        )
    };
    if done < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn parse(bytes: &[u8]) -> Option<Vec<Entry>> {
    let (header, rest) = bytes.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*header) != VERSION || rest.len() % 8 != 0 {
        return None;
    }
    Some(
        rest.chunks_exact(8)
            .map(|chunk| Entry {
                tag: u16::from_le_bytes([chunk[0], chunk[1]]),
                perm: u16::from_le_bytes([chunk[2], chunk[3]]),
                id: u32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]),
            })
            .collect(),
    )
}

fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut bytes = VERSION.to_le_bytes().to_vec();
    for entry in entries {
        bytes.extend_from_slice(&entry.tag.to_le_bytes());
        bytes.extend_from_slice(&entry.perm.to_le_bytes());
        bytes.extend_from_slice(&entry.id.to_le_bytes());
    }
    bytes
}

/// The minimal ACL that `mode` stands for.
fn from_mode(mode: u32) -> Vec<Entry> {
    let bits = |shift: u32| ((mode >> shift) & 7) as u16;
    vec![
        Entry {
            tag: USER_OBJ,
            id: UNDEFINED_ID,
            perm: bits(6),
        },
        Entry {
            tag: GROUP_OBJ,
            id: UNDEFINED_ID,
            perm: bits(3),
        },
        Entry {
            tag: OTHER,
            id: UNDEFINED_ID,
            perm: bits(0),
        },
    ]
}

/// `entries` with `uid` granted `perm` (added to what it had), and a mask
/// that lets every named entry and the owning group keep what they had.
fn with_user(entries: Vec<Entry>, uid: u32, perm: u16) -> Vec<Entry> {
    let had = entries
        .iter()
        .find(|e| e.tag == USER && e.id == uid)
        .map_or(0, |e| e.perm);
    let mut entries: Vec<Entry> = entries
        .into_iter()
        .filter(|e| !(e.tag == USER && e.id == uid) && e.tag != MASK)
        .collect();
    entries.push(Entry {
        tag: USER,
        id: uid,
        perm: had | perm,
    });
    let mask = entries
        .iter()
        .filter(|e| matches!(e.tag, USER | GROUP_OBJ | GROUP))
        .fold(0, |mask, e| mask | e.perm);
    entries.push(Entry {
        tag: MASK,
        id: UNDEFINED_ID,
        perm: mask,
    });
    entries.sort();
    entries
}

#[cfg(test)]
mod tests {
    use super::is_unsafe_root;

    /// System folders, anything inside the system's own trees and root's
    /// home are refused as root-owned workspaces; project folders are not.
    #[test]
    fn system_folders_and_homes_are_not_workspaces() {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        for refused in [
            "/",
            "/etc",
            "/etc/ssh",
            "/usr/local/lib",
            "/var/lib/docker",
            "/tmp",
            "/root",
            &home,
        ] {
            assert!(is_unsafe_root(std::path::Path::new(refused)), "{refused}");
        }
        for allowed in [
            "/tmp/project",
            "/srv/app",
            "/opt/stack/ws",
            "/var/tmp/build",
        ] {
            assert!(!is_unsafe_root(std::path::Path::new(allowed)), "{allowed}");
        }
    }

    use super::*;

    /// An entry as (tag, id, perm).
    type Plain = (u16, u32, u16);

    /// A case: a mode, the named users already there as (uid, perm), and the
    /// entries expected after the grant.
    type Case<'a> = (u32, &'a [(u32, u16)], &'a [Plain]);

    /// (mode, existing named users as (uid, perm)) → the entries after
    /// granting 65534 rwx.
    #[test]
    fn grants_keep_what_was_there() {
        let cases: &[Case] = &[
            (
                0o644,
                &[],
                &[
                    (USER_OBJ, UNDEFINED_ID, 6),
                    (USER, 65534, 7),
                    (GROUP_OBJ, UNDEFINED_ID, 4),
                    (MASK, UNDEFINED_ID, 7),
                    (OTHER, UNDEFINED_ID, 4),
                ],
            ),
            (
                0o750,
                &[(1000, 5)],
                &[
                    (USER_OBJ, UNDEFINED_ID, 7),
                    (USER, 1000, 5),
                    (USER, 65534, 7),
                    (GROUP_OBJ, UNDEFINED_ID, 5),
                    (MASK, UNDEFINED_ID, 7),
                    (OTHER, UNDEFINED_ID, 0),
                ],
            ),
            (
                0o600,
                &[(65534, 4)],
                &[
                    (USER_OBJ, UNDEFINED_ID, 6),
                    (USER, 65534, 7),
                    (GROUP_OBJ, UNDEFINED_ID, 0),
                    (MASK, UNDEFINED_ID, 7),
                    (OTHER, UNDEFINED_ID, 0),
                ],
            ),
        ];
        for (mode, named, expected) in cases {
            let mut start = from_mode(*mode);
            start.extend(named.iter().map(|(id, perm)| Entry {
                tag: USER,
                id: *id,
                perm: *perm,
            }));
            let granted = with_user(start, 65534, 7);
            let got: Vec<Plain> = granted.iter().map(|e| (e.tag, e.id, e.perm)).collect();
            assert_eq!(&got, expected, "mode {mode:o}");
            assert_eq!(parse(&encode(&granted)), Some(granted), "round trip");
        }
        assert_eq!(parse(&[1, 0, 0, 0]), None, "wrong version");
        assert_eq!(parse(&[2, 0, 0, 0, 1]), None, "torn entry");
    }
}
