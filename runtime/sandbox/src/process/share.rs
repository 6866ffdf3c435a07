//! Sharing a root-owned workspace with the sandbox's uid through an
//! idmapped mount: nothing on disk changes, and nothing outlives the
//! sandbox.
//!
//! A root runtime never runs sandboxed code as root (rule 5 of the threat
//! model in [`super`]), so code in a workspace that belongs to root runs as
//! the dedicated sandbox uid ([`super::sandbox_id`]), which by itself may
//! not write there. Handing the workspace over with a recursive `chown`
//! would change the owner of every file in the user's project (git then
//! refuses the repository as of "dubious ownership"). POSIX ACLs, which
//! this runtime used before, are written to the files: they outlive the
//! session, and an ACL on a hard-linked inode reaches its other names
//! outside the workspace too (red-team finding M1).
//!
//! Instead the sandbox sees the workspace through an *idmapped mount*
//! (Linux 5.12+, on ext4, xfs, btrfs, tmpfs, overlayfs and others): a
//! detached clone of the workspace's mount whose idmapping maps on-disk
//! uid 0 and gid 0 to the sandbox's uid and gid. Through it root's files are
//! the sandbox's own, and what sandboxed code creates is written to disk as
//! root's, like everything else in the workspace. The clone is attached
//! only in the sandbox's own mount namespace (the zygote's, or a WASI guest
//! thread's) and goes with it.
//!
//! # Threat model
//!
//! Trusted: the runtime (root) and the kernel. Not trusted: sandboxed code,
//! which may have written anywhere in the workspace before (an earlier
//! call, or a concurrent session in the same workspace), and so the
//! workspace's contents and shape.
//!
//! 1. **Nothing is granted on disk.** No ACL, owner or mode is written for
//!    the sandbox; the grant is a mount in a namespace that dies with the
//!    sandbox, so a `kill -9` of the runtime leaves nothing behind either.
//!    Test: `as_root_a_root_owned_workspace_is_shared_not_given_away` in
//!    `tests/process_escape.rs`, and its WASI twin in `tests/wasi_sandbox.rs`.
//! 2. **The sandbox acts as the workspace's owner, in the workspace only**,
//!    as it does in a user's workspace: what it makes is root's on disk.
//!    So nothing it makes may carry power of its own: a setuid or setgid
//!    mode is refused by the sandbox's seccomp filter (any `chmod`, `open`
//!    or `mknod` mode with either bit; `openat2` is unavailable), and WASI
//!    has no way to set a mode. Test:
//!    `no_call_can_make_a_setuid_or_setgid_file`. Folders where root's own
//!    services read files they then trust (`/etc`, `/var/spool`, …) are
//!    refused as workspaces (rule 6).
//! 3. **Only root's ids, only the workspace's own mount.** The idmapping
//!    holds two entries (uid 0, gid 0), so files of other owners keep
//!    theirs, unmapped, and only their "other" permission bits apply. The
//!    clone is not recursive: under a filesystem mounted inside the
//!    workspace, the sandbox sees what that mount hides (which the survey
//!    walks too).
//! 4. **Nothing of root's that may also be outside, or that has power of
//!    its own.** Root's regular files with more than one link (a pnpm
//!    store, `cp -al`, a local git clone), or a linked file with an ACL
//!    (its entries are mapped too); root's setuid, setgid and
//!    file-capability files (through the mapping the sandbox would own
//!    them, and a shared `mmap` write keeps the bit); and root's sockets,
//!    FIFOs and device nodes (a daemon's socket in the workspace) are each
//!    covered, in the sandbox's namespace, by a read-only bind of
//!    itself taken *without* the mapping: the sandbox sees root's object,
//!    with only its "other" permission bits, and cannot unlink, rename,
//!    `chmod` or replace it (it is a mount point there). More than
//!    [`MAX_COVERED`] is refused, not mounted. Test:
//!    `as_root_hard_links_out_of_a_root_workspace_are_not_granted`.
//! 5. **The survey walks what the sandbox will see, and fails closed.** It
//!    walks the clone itself (before it is mapped), holding one folder's
//!    descriptor at a time at any depth (down by name without following a
//!    link, up by `..`, each checked to be the folder expected), at most
//!    [`MAX_ENTRIES`] entries; anything but an entry that vanished fails
//!    the setup. Each cover is checked to be the inode
//!    surveyed when it is cloned and when it is attached (on a descriptor
//!    resolved beneath the workspace with no link and no mount crossing),
//!    so a moved file fails the setup, never lands a cover elsewhere.
//!    Residual: a concurrent session of the same workspace that renames a
//!    folder from a part of the tree not yet walked into a part already
//!    walked, during the walk, hides it from this survey.
//! 6. **No system folder** (`/`, `/etc`, `/usr`, `/var/spool`, …) and no
//!    home of root is accepted as a root-owned workspace
//!    ([`refuse_unsafe_root`]).
//! 7. **Earlier grants are taken back into the owner's hands.** What the
//!    sandbox's uid owns on disk (made under the ACLs this runtime used
//!    before) is given to root by the survey, as what it makes now is (its
//!    group too, only where its owner is root's); a setuid or setgid one,
//!    or one with other names (which the change would reach), is refused. ACL entries an earlier version
//!    wrote name an id the mapping leaves unmapped, so they grant nothing;
//!    `setfacl -R -x u:2000000000,g:2000000000 WORKSPACE` removes them.
//!
//! Fails closed: a filesystem that cannot be idmapped refuses the call, with
//! a message that says what to do instead.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use nix::fcntl::OFlag;
use nix::libc;
use nix::sys::stat::{fstat, fstatat, FileStat};

use super::mount_api::{
    beneath, move_mount, open_tree, set_attr, Mounts, MOUNT_ATTR_IDMAP, MOVE_MOUNT_T_EMPTY_PATH,
    OPEN_TREE_CLONE,
};
use super::mounts::{MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};

/// The most covers (see rule 4) a shared workspace may need: each is a
/// mount in the sandbox's namespace (and a descriptor while it is set up).
pub(crate) const MAX_COVERED: usize = 512;

/// A root-owned workspace, cloned and idmapped for the sandbox's uid and
/// not attached anywhere yet, with the covers for what must stay root's.
#[derive(Debug)]
pub(crate) struct SharedWorkspace {
    workspace: PathBuf,
    tree: OwnedFd,
    covers: Vec<Covered>,
}

/// An entry that must stay root's (see rule 4): where it is, which inode
/// it is, and a detached read-only bind of it without the idmapping.
#[derive(Debug)]
struct Covered {
    relative: PathBuf,
    object: (u64, u64),
    cover: OwnedFd,
}

impl SharedWorkspace {
    /// Clones `workspace` (canonical, owned by root) with root's ids mapped
    /// to `uid`/`gid`, and covers what must stay root's. Needs root (in the
    /// host's namespaces); blocking: walks the workspace.
    pub(crate) fn prepare(workspace: &Path, uid: u32, gid: u32) -> Result<Self, String> {
        refuse_unsafe_root(workspace).map_err(|e| e.to_string())?;
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            format!(
                "sharing the root-owned workspace {} with the sandbox: {what}: {e}",
                workspace.display()
            )
        };
        let root = nix::fcntl::open(
            workspace,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| fail("open", &e))?;
        let tree = open_tree(
            root.as_fd(),
            c"",
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint,
        )
        .map_err(|e| fail("cloning its mount", &e))?;
        let covers = survey(tree.as_fd(), uid, gid).map_err(|e| fail("survey", &e))?;
        let mapping = mapping_namespace(uid, gid).map_err(|e| fail("idmapping", &e))?;
        set_attr(
            tree.as_fd(),
            MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            Some(mapping.as_fd()),
            false,
        )
        .map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) {
                format!(
                    "the workspace {} is owned by root and its filesystem cannot be idmapped (that needs Linux 5.12+ and a filesystem such as ext4, xfs, btrfs or tmpfs), so sandboxed code, which never runs as root, cannot be given it; give the workspace to an unprivileged user (chown) or run the agent as one",
                    workspace.display()
                )
            } else {
                fail("idmapping its mount", &e)
            }
        })?;
        Ok(SharedWorkspace {
            workspace: workspace.to_path_buf(),
            tree,
            covers,
        })
    }

    /// How many entries are covered.
    #[cfg(test)]
    pub(crate) fn covered(&self) -> usize {
        self.covers.len()
    }

    /// Attaches the workspace at `dest` (an existing folder in the current
    /// mount namespace, which must be the sandbox's own), then each cover
    /// over its file there. Returns the covered paths (relative).
    pub(crate) fn attach(self, dest: &Path) -> Result<Vec<PathBuf>, String> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            format!(
                "sharing the root-owned workspace {} with the sandbox: {what}: {e}",
                self.workspace.display()
            )
        };
        let target =
            CString::new(dest.as_os_str().as_bytes()).map_err(|e| fail("mount point", &e))?;
        move_mount(self.tree.as_fd(), libc::AT_FDCWD, &target, 0)
            .map_err(|e| fail("attaching", &e))?;
        let top = nix::fcntl::open(
            dest,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| fail("opening it attached", &e))?;
        for covered in &self.covers {
            let at = beneath(top.as_fd(), &covered.relative, OFlag::O_PATH, Mounts::Stay)
                .map_err(|e| fail(&format!("covering {}", covered.relative.display()), &e))?;
            let stat = fstat(&at).map_err(|e| fail("stat", &e))?;
            if (stat.st_dev, stat.st_ino) != covered.object {
                return Err(format!(
                    "sharing the root-owned workspace {}: {} changed while the sandbox was being made; try again",
                    self.workspace.display(),
                    covered.relative.display()
                ));
            }
            move_mount(
                covered.cover.as_fd(),
                at.as_raw_fd(),
                c"",
                MOVE_MOUNT_T_EMPTY_PATH,
            )
            .map_err(|e| fail(&format!("covering {}", covered.relative.display()), &e))?;
        }
        Ok(self.covers.iter().map(|c| c.relative.clone()).collect())
    }
}

/// The most entries the survey looks at; a larger tree is refused.
const MAX_ENTRIES: usize = 2_000_000;

/// What the survey found and did.
struct Survey {
    sandbox_uid: u32,
    sandbox_gid: u32,
    covers: Vec<Covered>,
    entries: usize,
}

/// A folder the survey is in: its names, how far through them it is, and
/// which object it is (to come back to it through `..`).
struct Frame {
    names: std::vec::IntoIter<std::ffi::OsString>,
    object: (u64, u64),
    path: PathBuf,
}

/// Walks the workspace's clone (not yet idmapped: it shows what the
/// sandbox will see, what lies under a mount point in the workspace
/// included) and covers every entry the mapping would open to the sandbox
/// while it may be something outside too (see [`exposed`]). Anything the
/// sandbox's uid owns on disk (what it made before this module, under
/// ACLs) becomes root's, as what it makes now is.
///
/// It holds one folder's descriptor at a time, whatever the depth: down
/// by `openat` of a name without following, up by `..`, each checked to be
/// the folder expected (the way `fts` walks), so a tree of any shape is
/// walked and a folder moved during the walk fails it. Fails closed on
/// anything but an entry that vanished.
fn survey(tree: BorrowedFd<'_>, uid: u32, gid: u32) -> Result<Vec<Covered>, String> {
    let mut survey = Survey {
        sandbox_uid: uid,
        sandbox_gid: gid,
        covers: Vec::new(),
        entries: 0,
    };
    let directory = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut current = nix::fcntl::openat(tree, ".", directory, nix::sys::stat::Mode::empty())
        .map_err(|e| format!("opening the clone: {e}"))?;
    let object = |fd: &OwnedFd| fstat(fd).map(|st| (st.st_dev, st.st_ino));
    let mut stack = vec![Frame {
        names: list(current.as_fd())
            .map_err(|e| format!("listing the workspace: {e}"))?
            .into_iter(),
        object: object(&current).map_err(|e| e.to_string())?,
        path: PathBuf::new(),
    }];
    let moved = |path: &Path| format!("{} moved while it was surveyed; try again", path.display());
    while let Some(frame) = stack.last_mut() {
        let Some(name) = frame.names.next() else {
            let done = stack.pop().map(|f| f.path).unwrap_or_default();
            if let Some(parent) = stack.last() {
                current =
                    nix::fcntl::openat(&current, "..", directory, nix::sys::stat::Mode::empty())
                        .map_err(|e| format!("{}: {e}", parent.path.display()))?;
                if object(&current).map_err(|e| e.to_string())? != parent.object {
                    return Err(moved(&done));
                }
            }
            continue;
        };
        let path = frame.path.join(&name);
        if let Some(child) = survey.entry(current.as_fd(), &name, &path)? {
            let names = list(child.as_fd()).map_err(|e| format!("{}: {e}", path.display()))?;
            let child_object = object(&child).map_err(|e| e.to_string())?;
            current = child;
            stack.push(Frame {
                names: names.into_iter(),
                object: child_object,
                path,
            });
        }
    }
    Ok(survey.covers)
}

impl Survey {
    /// Looks at one entry of the folder `dir`: a folder is opened and
    /// returned to be walked; anything else may be reclaimed or covered.
    fn entry(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
    ) -> Result<Option<OwnedFd>, String> {
        self.entries += 1;
        if self.entries > MAX_ENTRIES {
            return Err(format!("it holds more than {MAX_ENTRIES} entries"));
        }
        let vanished = |e: &nix::Error| *e == nix::errno::Errno::ENOENT;
        let mut stat = match fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(e) if vanished(&e) => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        if stat.st_uid == self.sandbox_uid || stat.st_gid == self.sandbox_gid {
            stat = self.reclaim(dir, name, &stat, path)?;
        }
        match stat.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                let child = match nix::fcntl::openat(
                    dir,
                    name,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                ) {
                    Ok(child) => child,
                    Err(e) if vanished(&e) => return Ok(None),
                    Err(e) => {
                        return Err(format!(
                            "{}: {e} (changed while it was surveyed?)",
                            path.display()
                        ))
                    }
                };
                let again = fstat(&child).map_err(|e| e.to_string())?;
                if (again.st_dev, again.st_ino) != (stat.st_dev, stat.st_ino) {
                    return Err(format!("{} changed while it was surveyed", path.display()));
                }
                Ok(Some(child))
            }
            libc::S_IFLNK => Ok(None),
            _ if exposed(dir, name, &stat) => {
                self.cover(dir, name, &stat, path.to_path_buf())?;
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// Gives an entry the sandbox's uid owns on disk to root, as what it
    /// makes through the mapping is; a setuid or setgid one is refused.
    fn reclaim(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        stat: &FileStat,
        path: &Path,
    ) -> Result<FileStat, String> {
        let folder = stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if !folder && stat.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
            return Err(format!(
                "{} is a setuid or setgid file that sandboxed code made; remove it",
                path.display()
            ));
        }
        if !folder && stat.st_nlink > 1 {
            // Its other names may be outside: changing its owner would
            // change theirs too.
            return Err(format!(
                "{} was made by sandboxed code and has other names (hard links); remove it or its links",
                path.display()
            ));
        }
        let uid = (stat.st_uid == self.sandbox_uid).then_some(nix::unistd::Uid::from_raw(0));
        // The group only where the owner is (or becomes) root's: another
        // user's file in group S would otherwise join group 0, which the
        // mapping gives the sandbox.
        let owner_is_root = stat.st_uid == self.sandbox_uid || stat.st_uid == 0;
        let gid = (stat.st_gid == self.sandbox_gid && owner_is_root)
            .then_some(nix::unistd::Gid::from_raw(0));
        if uid.is_none() && gid.is_none() {
            return Ok(*stat);
        }
        nix::unistd::fchownat(
            dir,
            name,
            uid,
            gid,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| format!("{}: giving it to root: {e}", path.display()))?;
        fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Takes a read-only clone of the entry, without the mapping, to be
    /// attached over it.
    fn cover(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        stat: &FileStat,
        relative: PathBuf,
    ) -> Result<(), String> {
        if self.covers.len() == MAX_COVERED {
            return Err(format!(
                "it holds more than {MAX_COVERED} files of root's that must stay root's in the sandbox (hard links, such as a pnpm store or a `cp -al` copy, whose other names may be outside; setuid or setgid files; sockets and FIFOs), and each would need a mount; break the links (copy the files), move the others out, or give the workspace to an unprivileged user"
            ));
        }
        let c_name = CString::new(name.as_bytes()).map_err(|e| e.to_string())?;
        let cover = open_tree(
            dir,
            &c_name,
            OPEN_TREE_CLONE
                | libc::O_CLOEXEC as libc::c_uint
                | libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
        )
        .map_err(|e| format!("{}: {e}", relative.display()))?;
        let again = fstat(&cover).map_err(|e| e.to_string())?;
        if (again.st_dev, again.st_ino) != (stat.st_dev, stat.st_ino) {
            return Err(format!(
                "{} changed while it was surveyed; try again",
                relative.display()
            ));
        }
        set_attr(
            cover.as_fd(),
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            None,
            false,
        )
        .map_err(|e| format!("{}: {e}", relative.display()))?;
        self.covers.push(Covered {
            relative,
            object: (stat.st_dev, stat.st_ino),
            cover,
        });
        Ok(())
    }
}

/// The names in a folder (not `.` and `..`), read through a duplicate of
/// its descriptor.
fn list(dir: BorrowedFd<'_>) -> nix::Result<Vec<std::ffi::OsString>> {
    let listing = nix::dir::Dir::from_fd(nix::unistd::dup(dir)?)?;
    let mut names = Vec::new();
    for entry in listing.into_iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(std::ffi::OsString::from_vec(name));
        }
    }
    Ok(names)
}

/// Whether the mapping would open an entry (not a folder or symlink) to
/// the sandbox while it may also be something outside the workspace, or
/// carries power of its own:
/// - a regular file of root's (by owner, group, or an ACL, which is mapped
///   too) that has other names;
/// - a setuid or setgid file of root's, or one with file capabilities:
///   as its owner through the mapping, the sandbox could rewrite it (a
///   shared `mmap` write keeps the bit) and a host user then run it;
/// - a socket, FIFO or device node of root's (a root daemon's socket in
///   the workspace must not become the sandbox's to connect to or `chmod`).
fn exposed(dir: BorrowedFd<'_>, name: &OsStr, stat: &FileStat) -> bool {
    let roots = stat.st_uid == 0 || stat.st_gid == 0;
    match stat.st_mode & libc::S_IFMT {
        libc::S_IFREG => {
            (stat.st_nlink > 1 && (roots || has_xattr(dir, name, c"system.posix_acl_access")))
                || (roots && stat.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0)
                || (roots && has_xattr(dir, name, c"security.capability"))
        }
        _ => roots,
    }
}

/// Whether the entry `name` of `dir` has the extended attribute `which`,
/// asked without opening it or following a link (through the folder's
/// descriptor in `/proc`). Unknown counts as yes: it is covered then.
fn has_xattr(dir: BorrowedFd<'_>, name: &OsStr, which: &std::ffi::CStr) -> bool {
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name.as_bytes());
    let Ok(path) = CString::new(path) else {
        return true;
    };
    // SAFETY: lgetxattr with a null buffer only asks for the size.
    let size = unsafe { libc::lgetxattr(path.as_ptr(), which.as_ptr(), std::ptr::null_mut(), 0) };
    if size >= 0 {
        return true;
    }
    !matches!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENODATA | libc::EOPNOTSUPP)
    )
}

/// A user namespace whose maps send on-disk uid 0 and gid 0 to `uid` and
/// `gid`: the idmapping. Made once per process and pair of ids, by a child
/// that does nothing but unshare and wait (only async-signal-safe calls, as
/// the runtime is multi-threaded), and is killed once its namespace is held.
fn mapping_namespace(uid: u32, gid: u32) -> std::io::Result<OwnedFd> {
    /// The namespaces made so far, by (uid, gid).
    type Made = Vec<((u32, u32), OwnedFd)>;
    static MADE: OnceLock<Mutex<Made>> = OnceLock::new();
    let made = MADE.get_or_init(|| Mutex::new(Vec::new()));
    let mut made = made.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, fd)) = made.iter().find(|(ids, _)| *ids == (uid, gid)) {
        return fd.try_clone();
    }
    let mut ready = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both ends were just made and are owned here only.
    let (read_end, write_end) = unsafe {
        (
            OwnedFd::from_raw_fd(ready[0]),
            OwnedFd::from_raw_fd(ready[1]),
        )
    };
    // SAFETY: the child only makes async-signal-safe system calls (close,
    // unshare, write, pause, _exit) before it is killed or exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above; the child never returns.
        unsafe {
            libc::close(read_end.as_raw_fd());
            if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                let byte = 1u8;
                libc::write(write_end.as_raw_fd(), std::ptr::from_ref(&byte).cast(), 1);
                loop {
                    libc::pause();
                }
            }
            libc::_exit(1);
        }
    }
    drop(write_end);
    let result = (|| {
        let mut byte = [0u8; 1];
        let mut reader = std::fs::File::from(read_end);
        let got = std::io::Read::read(&mut reader, &mut byte)?;
        if got != 1 {
            return Err(std::io::Error::other(
                "could not make a user namespace for the idmapping",
            ));
        }
        std::fs::write(format!("/proc/{pid}/uid_map"), format!("0 {uid} 1"))?;
        std::fs::write(format!("/proc/{pid}/setgroups"), "deny")?;
        std::fs::write(format!("/proc/{pid}/gid_map"), format!("0 {gid} 1"))?;
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/user"))?;
        Ok(OwnedFd::from(ns))
    })();
    // SAFETY: `pid` is our own unreaped child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
    let ns = result?;
    made.push(((uid, gid), ns.try_clone()?));
    Ok(ns)
}

/// Refuses a root-owned workspace that is a system folder or root's home
/// (rule 6): sharing it would share the system.
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
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/lib",
        "/lib32",
        "/lib64",
        "/proc",
        "/run",
        "/sbin",
        "/sys",
        "/usr",
        "/var/backups",
        "/var/cache",
        "/var/lib",
        "/var/log",
        "/var/mail",
        "/var/spool",
    ];
    let same = |p: &Path| std::fs::canonicalize(p).is_ok_and(|p| p == workspace) || p == workspace;
    let inside = |p: &Path| {
        workspace.starts_with(p) || std::fs::canonicalize(p).is_ok_and(|p| workspace.starts_with(p))
    };
    let mut homes: Vec<std::path::PathBuf> = Vec::new();
    if let Some(home) = std::env::var_os("HOME") {
        homes.push(home.into());
    }
    if let Some(root) = root_home() {
        homes.push(root.clone());
    }
    SYSTEM.iter().map(Path::new).any(same)
        || SYSTEM_TREES.iter().map(Path::new).any(inside)
        || homes.iter().any(|h| same(h))
}

/// Root's home folder, from the user database (read once).
fn root_home() -> Option<&'static std::path::PathBuf> {
    static HOME: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    HOME.get_or_init(|| {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(0))
            .ok()
            .flatten()
            .map(|root| root.dir)
    })
    .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert!(is_unsafe_root(Path::new(refused)), "{refused}");
        }
        for allowed in [
            "/tmp/project",
            "/srv/app",
            "/opt/stack/ws",
            "/var/tmp/build",
        ] {
            assert!(!is_unsafe_root(Path::new(allowed)), "{allowed}");
        }
    }

    /// The survey covers root's files that have other names (in folders
    /// at any depth), root's sockets and setuid files, and nothing else: not a file with
    /// one name, not a symlink to a linked file, not another owner's linked
    /// file; it gives what the sandbox's uid made before to root; past
    /// [`MAX_COVERED`] it refuses. (Cloning a mount needs root.)
    #[test]
    fn as_root_the_survey_covers_roots_files_with_other_names_only() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "an `as_root_` test: run it as root, or skip it with `--skip as_root_`"
        );
        let outside = tempfile::tempdir().expect("tempdir");
        let workspace = tempfile::tempdir().expect("tempdir");
        let ws = workspace.path();
        std::fs::create_dir_all(ws.join("deep/er")).expect("mkdir");
        std::fs::write(ws.join("single"), "1").expect("write");
        for (i, inside) in ["linked", "deep/er/linked"].iter().enumerate() {
            let original = outside.path().join(format!("o{i}"));
            std::fs::write(&original, "x").expect("write");
            std::fs::hard_link(&original, ws.join(inside)).expect("link");
        }
        std::os::unix::fs::symlink(outside.path().join("o0"), ws.join("symlink")).expect("ln");
        let theirs = outside.path().join("theirs");
        std::fs::write(&theirs, "t").expect("write");
        nix::unistd::chown(&theirs, Some(1234.into()), Some(1234.into())).expect("chown");
        std::fs::hard_link(&theirs, ws.join("theirs")).expect("link");
        let _daemon =
            std::os::unix::net::UnixListener::bind(ws.join("deep/daemon.sock")).expect("bind");
        std::fs::write(ws.join("made-before"), "m").expect("write");
        nix::unistd::chown(
            &ws.join("made-before"),
            Some(2_000_000_000.into()),
            Some(2_000_000_000.into()),
        )
        .expect("chown");
        std::fs::write(ws.join("deep/setuid-tool"), "x").expect("write");
        std::fs::set_permissions(
            ws.join("deep/setuid-tool"),
            std::os::unix::fs::PermissionsExt::from_mode(0o4755),
        )
        .expect("chmod");
        let ws = std::fs::canonicalize(ws).expect("canonical");
        let shared = SharedWorkspace::prepare(&ws, 2_000_000_000, 2_000_000_000).expect("shared");
        // The two linked files of root's, root's socket and root's setuid
        // file.
        assert_eq!(shared.covered(), 4, "{shared:?}");
        // What the sandbox's uid made before is root's now.
        let before = std::fs::metadata(ws.join("made-before")).expect("stat");
        assert_eq!(
            (
                std::os::unix::fs::MetadataExt::uid(&before),
                std::os::unix::fs::MetadataExt::gid(&before)
            ),
            (0, 0)
        );
        drop(shared);
        std::fs::remove_file(ws.join("deep/daemon.sock")).expect("rm");
        for i in 0..MAX_COVERED {
            std::fs::hard_link(ws.join("single"), ws.join(format!("many{i}"))).expect("link");
        }
        let refused = SharedWorkspace::prepare(&ws, 2_000_000_000, 2_000_000_000)
            .expect_err("too many covered files");
        assert!(
            refused.contains(&format!("more than {MAX_COVERED}")),
            "{refused}"
        );
    }
}
