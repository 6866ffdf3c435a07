//! The zygote's private filesystem view: a new mount namespace whose root
//! holds only what calls may reach, the way bubblewrap builds one.
//!
//! # Threat model
//!
//! Landlock decides what a call may *open*, but not what it may `stat`,
//! `readlink` or `connect()` to: pathname unix sockets are outside landlock
//! ABI ≤ 7, so a host socket in a world-writable folder (`/tmp`, `/run`),
//! an ssh-agent, the session D-Bus or a Docker socket would be reachable,
//! and every host path's metadata would leak. Landlock also cannot take a
//! subpath (`.git`) out of a tree it grants (the workspace). Both are
//! closed here, once per zygote, before it drops into seccomp:
//!
//! - **Only granted paths exist.** The root is a fresh tmpfs holding bind
//!   mounts of the system paths every call may read (read-only, recursive),
//!   the device files it may use, the workspace (read-write), and nothing
//!   else: no `/proc`, `/run`, `/home`, `/root`, host `/tmp` or `/var`. A
//!   host unix socket that is not inside the workspace cannot be named, and
//!   a host path that is not granted cannot be `stat`ed.
//! - **Protected workspace paths** (`.git`, `.envrc`… read-only; `.env`,
//!   `.ssh`… hidden) are covered, over the workspace's own, by read-only
//!   binds of themselves or empty read-only stand-ins: code can neither
//!   change them nor, for hidden ones, read them. Each is opened beneath
//!   the workspace without following a link, checked to be the object the
//!   runtime saw, and covered on that descriptor ([`cover_protected`]), so
//!   a concurrent call that swaps a component for a link, or moves the path
//!   away, fails the setup instead of leaving it uncovered. Whether they
//!   exist is part of the zygote's key, so a path that appears later gets a
//!   new zygote; one that a call *creates* is removed by the runtime after
//!   the call (see the process sandbox's rule 10).
//! - **Private tmp.** `/tmp` in this view is a tmpfs of the zygote's own,
//!   owned by the sandbox's uid; each call's tmp dir is made in it. Nothing
//!   is ever created in the host's shared `/tmp`, and no host process (nor
//!   the runtime) resolves a path in it: it exists only in this namespace.
//! - **No propagation.** Everything is made private first, so no mount
//!   event reaches the host or comes in from it.
//!
//! Who is trusted: the runtime and the kernel. The sources of every bind
//! are resolved (canonicalized) while the host root is still `/`, by the
//! zygote, which at that point has already dropped to the sandbox's uid:
//! it can only bind what that uid could already reach.

use std::ffi::CString;
use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use nix::libc;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use super::mount_api::{
    beneath, fresh_tmpfs, move_mount, open_tree, set_attr, Mounts, AT_RECURSIVE,
    MOVE_MOUNT_T_EMPTY_PATH, OPEN_TREE_CLONE,
};
use super::share::SharedWorkspace;
use super::spec::{ProtectedMode, ZygoteSpec};

/// Where the scratch root is mounted before the first `pivot_root`; any
/// existing folder works, since the host tree is reached through
/// `OLD_ROOT` afterwards.
const SCRATCH: &str = "/tmp";
/// The host's root, inside the scratch root, while the new one is built.
const OLD_ROOT: &str = "/oldroot";
/// The new root, inside the scratch root.
const NEW_ROOT: &str = "/newroot";

/// `mount_setattr` attribute bits (linux/mount.h).
pub(crate) const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub(crate) const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub(crate) const MOUNT_ATTR_NODEV: u64 = 0x4;

/// `struct mount_attr` (linux/mount.h); only the kernel reads its fields.
#[repr(C)]
pub(crate) struct MountAttr {
    pub attr_set: u64,
    pub attr_clr: u64,
    pub propagation: u64,
    pub userns_fd: u64,
}

/// What one entry of the new root is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// A bind mount of `source` (canonical host path).
    Bind {
        source: PathBuf,
        writable: bool,
        device: bool,
    },
    /// A symlink with this target text (for `/lib -> usr/lib` and the like,
    /// where what it points to is bound too).
    Symlink(PathBuf),
    /// The private tmpfs for the calls' tmp dirs.
    PrivateTmp,
    /// A protected workspace path, bound read-only over itself or hidden
    /// under an empty stand-in. It is found through the workspace as the
    /// new root holds it (the bind, or a root-owned workspace's idmapped
    /// clone, whose host path the sandbox's uid may not walk), and `object`
    /// is the (device, inode) the runtime saw: it is bound from a
    /// descriptor checked to be that object, never by a path a concurrent
    /// call could swap.
    Protected {
        mode: ProtectedMode,
        object: (u64, u64),
        /// The workspace it is in.
        workspace: PathBuf,
    },
    /// The root-owned workspace's idmapped clone (see [`super::share`]).
    Shared,
}

/// One planned entry: where it appears in the new root, and what it is.
#[derive(Debug, Clone)]
struct Planned {
    inside: PathBuf,
    entry: Entry,
}

/// Builds the zygote's root and moves into it. Runs in the zygote after it
/// has entered its user and mount namespaces and before seccomp. Fails
/// closed: any step that fails is an error, and the zygote then exits
/// without making a single call.
pub(crate) fn enter_private_root(
    spec: &ZygoteSpec,
    mut shared: Option<SharedWorkspace>,
) -> Result<(), String> {
    let plan = plan(spec)?;
    let err = |what: &str, e: nix::Error| format!("private root: {what}: {e}");
    // Nothing we mount propagates to the host, and nothing comes in.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| err("making mounts private", e))?;
    mount(
        Some("tmpfs"),
        SCRATCH,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=1m,nr_inodes=4096"),
    )
    .map_err(|e| err("scratch tmpfs", e))?;
    let scratch = Path::new(SCRATCH);
    for dir in [OLD_ROOT, NEW_ROOT] {
        make_dir(&scratch.join(&dir[1..]))?;
    }
    mount(
        Some("tmpfs"),
        &scratch.join(&NEW_ROOT[1..]),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=1m,nr_inodes=4096"),
    )
    .map_err(|e| err("root tmpfs", e))?;
    std::env::set_current_dir(scratch).map_err(|e| format!("private root: chdir: {e}"))?;
    nix::unistd::pivot_root(".", &OLD_ROOT[1..]).map_err(|e| err("pivot_root", e))?;
    std::env::set_current_dir("/").map_err(|e| format!("private root: chdir /: {e}"))?;

    for planned in &plan {
        place(planned, spec.tmp_bytes, &mut shared)?;
    }

    // Into the new root; the scratch root and the host's, stacked under it
    // by pivot_root(".", "."), go away with the detach.
    std::env::set_current_dir(NEW_ROOT).map_err(|e| format!("private root: chdir: {e}"))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| err("pivot_root into the new root", e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| err("detaching the host root", e))?;
    std::env::set_current_dir("/").map_err(|e| format!("private root: chdir /: {e}"))?;
    // The root tmpfs itself holds only mount points: read-only.
    set_attributes(Path::new("/"), MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, false)?;
    Ok(())
}

/// The entries of the new root, parents before children. Sources are
/// resolved now, while the host root is still `/`.
fn plan(spec: &ZygoteSpec) -> Result<Vec<Planned>, String> {
    let mut binds: Vec<(PathBuf, bool, bool)> = Vec::new();
    for path in &spec.read_only {
        binds.push((path.clone(), false, false));
    }
    for path in &spec.read_only_files {
        binds.push((path.clone(), false, true));
    }
    for path in &spec.read_write_files {
        binds.push((path.clone(), true, true));
    }
    let mut planned = Vec::new();
    let insides: Vec<PathBuf> = binds.iter().map(|(p, ..)| p.clone()).collect();
    for (inside, writable, device) in binds {
        if !inside.is_absolute() {
            return Err(format!(
                "private root: {} is not absolute",
                inside.display()
            ));
        }
        let meta = match std::fs::symlink_metadata(&inside) {
            Ok(meta) => meta,
            // A missing system path grants nothing (as for landlock).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("private root: {}: {e}", inside.display())),
        };
        // Already inside another read-only bind of the same host path.
        if insides
            .iter()
            .any(|other| *other != inside && inside.starts_with(other))
        {
            continue;
        }
        let source = std::fs::canonicalize(&inside)
            .map_err(|e| format!("private root: {}: {e}", inside.display()))?;
        let entry = if meta.file_type().is_symlink()
            && insides
                .iter()
                .any(|other| *other != inside && source.starts_with(other))
        {
            // `/lib -> usr/lib`: what it points to is there already.
            let target = std::fs::read_link(&inside)
                .map_err(|e| format!("private root: {}: {e}", inside.display()))?;
            Entry::Symlink(target)
        } else {
            Entry::Bind {
                source,
                writable,
                device,
            }
        };
        planned.push(Planned { inside, entry });
    }
    planned.push(Planned {
        inside: PathBuf::from("/tmp"),
        entry: Entry::PrivateTmp,
    });
    planned.push(Planned {
        inside: spec.workspace.clone(),
        entry: if spec.shares_root_workspace {
            Entry::Shared
        } else {
            Entry::Bind {
                source: spec.workspace.clone(),
                writable: true,
                device: false,
            }
        },
    });
    for protected in &spec.protected {
        if !protected.path.starts_with(&spec.workspace) {
            return Err(format!(
                "private root: protected path {} is outside the workspace",
                protected.path.display()
            ));
        }
        planned.push(Planned {
            inside: protected.path.clone(),
            entry: Entry::Protected {
                mode: protected.mode,
                object: protected.object,
                workspace: spec.workspace.clone(),
            },
        });
    }
    // Parents first: `/tmp` before a workspace under it, the workspace
    // before its protected paths. The sort is stable, so equal depths keep
    // their order.
    planned.sort_by_key(|p| p.inside.components().count());
    Ok(planned)
}

/// `path` as it is under `root` (both absolute).
fn under(root: &str, path: &Path) -> PathBuf {
    let mut out = PathBuf::from(root);
    for component in path.components() {
        if let Component::Normal(name) = component {
            out.push(name);
        }
    }
    out
}

/// Puts one entry into the new root (which is at [`NEW_ROOT`]).
fn place(
    planned: &Planned,
    tmp_bytes: u64,
    shared: &mut Option<SharedWorkspace>,
) -> Result<(), String> {
    let dest = under(NEW_ROOT, &planned.inside);
    let err = |what: &str, e: nix::Error| {
        format!("private root: {what} {}: {e}", planned.inside.display())
    };
    match &planned.entry {
        Entry::Symlink(target) => {
            make_parents(&dest)?;
            symlink(target, &dest)
                .map_err(|e| format!("private root: symlink {}: {e}", dest.display()))
        }
        Entry::PrivateTmp => {
            make_dir_all(&dest)?;
            let options = format!("mode=0700,size={tmp_bytes},nr_inodes=65536");
            mount(
                Some("tmpfs"),
                &dest,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(options.as_str()),
            )
            .map_err(|e| err("tmpfs on", e))
        }
        Entry::Protected {
            mode,
            object,
            workspace,
        } => {
            let relative = planned.inside.strip_prefix(workspace).map_err(|_| {
                format!(
                    "private root: {} is outside the workspace",
                    planned.inside.display()
                )
            })?;
            let root = nix::fcntl::open(
                &under(NEW_ROOT, workspace),
                nix::fcntl::OFlag::O_PATH
                    | nix::fcntl::OFlag::O_DIRECTORY
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| format!("private root: the workspace: {e}"))?;
            cover_protected(root.as_fd(), relative, *mode, *object)
                .map_err(|e| format!("private root: {e}"))?;
            record_cover(relative);
            Ok(())
        }
        Entry::Shared => {
            make_dir_all(&dest)?;
            let covered = shared
                .take()
                .ok_or("private root: the shared workspace was not prepared")?
                .attach(&dest)?;
            for relative in covered {
                record_cover(&relative);
            }
            Ok(())
        }
        Entry::Bind {
            source,
            writable,
            device,
        } => {
            let host = under(OLD_ROOT, source);
            let source_meta = std::fs::metadata(&host)
                .map_err(|e| format!("private root: {}: {e}", source.display()))?;
            // The mount point: made where it is missing.
            if std::fs::symlink_metadata(&dest).is_err() {
                if source_meta.is_dir() {
                    make_dir_all(&dest)?;
                } else {
                    make_parents(&dest)?;
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o000)
                        .open(&dest)
                        .map_err(|e| format!("private root: {}: {e}", dest.display()))?;
                }
            }
            mount(
                Some(&host),
                &dest,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| err("binding", e))?;
            let mut attributes = MOUNT_ATTR_NOSUID;
            if !writable {
                attributes |= MOUNT_ATTR_RDONLY;
            }
            if !device {
                attributes |= MOUNT_ATTR_NODEV;
            }
            set_attributes(&dest, attributes, true)
        }
    }
}

/// Covers the protected path `relative` of the workspace (`workspace`: a
/// descriptor of the workspace as the sandbox will see it) through
/// descriptors only. It is opened beneath the workspace without following
/// any link and checked to be `object`, the (device, inode) the runtime
/// saw; then a read-only bind of itself (`ReadOnly`) or an empty, read-only
/// stand-in (`Hidden`: a fresh tmpfs over a folder, an empty file of one
/// over a file) is attached onto that very descriptor. Nothing is resolved
/// by path twice, so a concurrent call that swaps a component for a link
/// cannot steer the cover elsewhere; a path missing or changed since the
/// runtime looked fails (closed), and a new sandbox is made for the next
/// call.
pub(crate) fn cover_protected(
    workspace: BorrowedFd<'_>,
    relative: &Path,
    mode: ProtectedMode,
    object: (u64, u64),
) -> Result<(), String> {
    use nix::fcntl::OFlag;
    let shown = relative.display();
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("protecting {shown}: {what}: {e}");
    // Crossing mounts: a nested protected path lies inside its parent's
    // cover.
    let target = beneath(workspace, relative, OFlag::O_PATH, Mounts::Cross).map_err(|e| {
        if e == nix::errno::Errno::ENOENT {
            format!("protected path {shown} vanished while the sandbox was being made; try again")
        } else {
            fail("open", &e)
        }
    })?;
    let stat = nix::sys::stat::fstat(&target).map_err(|e| fail("stat", &e))?;
    let kind = stat.st_mode & libc::S_IFMT;
    if (kind != libc::S_IFDIR && kind != libc::S_IFREG) || (stat.st_dev, stat.st_ino) != object {
        return Err(format!(
            "protected path {shown} changed while the sandbox was being made; try again"
        ));
    }
    let read_only = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    let cover = match mode {
        ProtectedMode::ReadOnly => {
            let clone = open_tree(
                target.as_fd(),
                c"",
                OPEN_TREE_CLONE
                    | AT_RECURSIVE
                    | libc::O_CLOEXEC as libc::c_uint
                    | libc::AT_EMPTY_PATH as libc::c_uint,
            )
            .map_err(|e| fail("cloning", &e))?;
            set_attr(clone.as_fd(), read_only, None, true).map_err(|e| fail("read-only", &e))?;
            clone
        }
        ProtectedMode::Hidden if kind == libc::S_IFDIR => fresh_tmpfs(
            &[("mode", "000"), ("size", "4k"), ("nr_inodes", "1")],
            read_only,
        )
        .map_err(|e| fail("an empty tmpfs", &e))?,
        ProtectedMode::Hidden => {
            let holder = fresh_tmpfs(
                &[("mode", "0700"), ("size", "4k"), ("nr_inodes", "2")],
                MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            )
            .map_err(|e| fail("an empty tmpfs", &e))?;
            drop(
                nix::fcntl::openat(
                    &holder,
                    "hidden",
                    OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )
                .map_err(|e| fail("an empty stand-in", &e))?,
            );
            let stand_in = open_tree(
                holder.as_fd(),
                c"hidden",
                OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
            )
            .map_err(|e| fail("an empty stand-in", &e))?;
            set_attr(stand_in.as_fd(), read_only, None, false)
                .map_err(|e| fail("read-only", &e))?;
            stand_in
        }
    };
    move_mount(
        cover.as_fd(),
        target.as_raw_fd(),
        c"",
        MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(|e| fail("attaching its cover", &e))
}

/// The workspace paths (relative) this zygote covered, in the order it
/// covered them: a call's overlay (see [`super::disk`]) shows the
/// workspace's own files, not what is mounted over them, so its init
/// covers them again, with clones of these very covers.
static COVERS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn record_cover(relative: &Path) {
    if let Ok(mut covers) = COVERS.lock() {
        covers.push(relative.to_path_buf());
    }
}

/// The workspace paths this zygote covered (see [`COVERS`]); read by a
/// call's init, a fork of the single-threaded zygote.
pub(crate) fn covered_paths() -> Vec<PathBuf> {
    COVERS.lock().map(|c| c.clone()).unwrap_or_default()
}

/// Sets mount attributes on the mount at `path` (and, with `recursive`,
/// every mount below it); only adds, so the flags the kernel locked on a
/// bind of a host mount stay as they are.
pub(crate) fn set_attributes(path: &Path, attributes: u64, recursive: bool) -> Result<(), String> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("private root: NUL in {}", path.display()))?;
    let attr = MountAttr {
        attr_set: attributes,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive {
        AT_RECURSIVE as libc::c_int
    } else {
        0
    };
    // SAFETY: mount_setattr with a valid C path and a correctly sized,
    // initialised mount_attr that outlives the call.
    let done = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if done != 0 {
        return Err(format!(
            "private root: mount_setattr {} (needs Linux 5.12+): {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn make_dir(path: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(path)
        .map_err(|e| format!("private root: mkdir {}: {e}", path.display()))
}

fn make_dir_all(path: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|e| format!("private root: mkdir {}: {e}", path.display()))
}

fn make_parents(path: &Path) -> Result<(), String> {
    match path.parent() {
        Some(parent) => make_dir_all(parent),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_placed_under_the_new_root_without_escaping_it() {
        for (path, want) in [
            ("/usr", "/newroot/usr"),
            ("/tmp/ws/.git", "/newroot/tmp/ws/.git"),
            ("/", "/newroot"),
            ("/a/../../etc", "/newroot/a/etc"),
        ] {
            assert_eq!(
                under(NEW_ROOT, Path::new(path)),
                PathBuf::from(want),
                "{path}"
            );
        }
    }
}
