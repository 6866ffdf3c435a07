//! The descriptor-based mount API (Linux 5.2+: `open_tree`, `move_mount`,
//! `mount_setattr`, `fsopen`/`fsconfig`/`fsmount`), for building a
//! sandbox's mounts without resolving a path twice: what is checked is what
//! is mounted on, and what is cloned is what is attached.
//!
//! Also [`beneath`], the one way the sandbox opens a path inside a tree
//! an untrusted uid can change. Only thin, checked wrappers; the callers ([`super::share`],
//! [`super::mounts`], the WASI guest thread) state what they rely on.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::libc;

use super::mounts::MountAttr;

/// `open_tree`: clone the mount (or subtree) rather than open it.
pub(crate) const OPEN_TREE_CLONE: libc::c_uint = 1;
/// `move_mount`: the source is the descriptor itself.
pub(crate) const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
/// `move_mount`: the target is the descriptor itself.
pub(crate) const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
/// `mount_setattr`: set an idmapping.
pub(crate) const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
/// `AT_RECURSIVE` (linux/fcntl.h).
pub(crate) const AT_RECURSIVE: libc::c_uint = 0x8000;

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSCONFIG_CMD_RECONFIGURE: libc::c_uint = 7;
const FSPICK_CLOEXEC: libc::c_uint = 1;
const FSPICK_EMPTY_PATH: libc::c_uint = 8;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;

fn owned(fd: libc::c_long) -> std::io::Result<OwnedFd> {
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `open_tree(dir, name, flags)`.
pub(crate) fn open_tree(
    dir: BorrowedFd<'_>,
    name: &std::ffi::CStr,
    flags: libc::c_uint,
) -> std::io::Result<OwnedFd> {
    // SAFETY: open_tree with a valid descriptor and C string; it returns a
    // new descriptor or -1.
    owned(unsafe { libc::syscall(libc::SYS_open_tree, dir.as_raw_fd(), name.as_ptr(), flags) })
}

/// Attaches the detached mount `from` at `to` (relative to `to_dir`; with
/// [`MOVE_MOUNT_T_EMPTY_PATH`] and an empty `to`, onto `to_dir` itself).
pub(crate) fn move_mount(
    from: BorrowedFd<'_>,
    to_dir: libc::c_int,
    to: &std::ffi::CStr,
    to_flags: libc::c_uint,
) -> std::io::Result<()> {
    // SAFETY: move_mount with valid descriptors and C strings.
    let done = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            from.as_raw_fd(),
            c"".as_ptr(),
            to_dir,
            to.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | to_flags,
        )
    };
    if done != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets attributes (and, with `userns`, the idmapping) on the mount
/// `mount` refers to, and with `recursive` on every mount below it.
pub(crate) fn set_attr(
    mount: BorrowedFd<'_>,
    attributes: u64,
    userns: Option<BorrowedFd<'_>>,
    recursive: bool,
) -> std::io::Result<()> {
    let attr = MountAttr {
        attr_set: attributes,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.map_or(0, |fd| fd.as_raw_fd() as u64),
    };
    let mut flags = libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: mount_setattr on a descriptor with an empty path and a
    // correctly sized mount_attr that outlives the call.
    let done = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const super::mounts::MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if done != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A new, detached tmpfs with `options` (`key=value` pairs), mounted with
/// the `MOUNT_ATTR_*` bits in `attributes`.
pub(crate) fn fresh_tmpfs(options: &[(&str, &str)], attributes: u64) -> std::io::Result<OwnedFd> {
    let options: Vec<(&str, Option<&str>)> = options.iter().map(|(k, v)| (*k, Some(*v))).collect();
    fresh_mount(c"tmpfs", &options, attributes)
}

/// A new, detached mount of a new `filesystem` (`tmpfs`, `overlay`) with
/// `options`: `key=value` pairs, or flags (`userxattr`) where the value is
/// `None`; mounted with the `MOUNT_ATTR_*` bits in `attributes`.
pub(crate) fn fresh_mount(
    filesystem: &std::ffi::CStr,
    options: &[(&str, Option<&str>)],
    attributes: u64,
) -> std::io::Result<OwnedFd> {
    // SAFETY: fsopen with a C string; returns a new descriptor or -1.
    let context =
        owned(unsafe { libc::syscall(libc::SYS_fsopen, filesystem.as_ptr(), FSOPEN_CLOEXEC) })?;
    set_options(&context, options)?;
    // SAFETY: fsconfig's create command takes no key or value.
    let created = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            context.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if created != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fsmount with a created context; returns a descriptor or -1.
    owned(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            context.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            attributes as libc::c_uint,
        )
    })
}

/// Sets `options` on a filesystem context: strings, or flags where the
/// value is `None`.
fn set_options(context: &OwnedFd, options: &[(&str, Option<&str>)]) -> std::io::Result<()> {
    for (key, value) in options {
        let key = std::ffi::CString::new(*key).map_err(std::io::Error::other)?;
        let value = value
            .map(|value| std::ffi::CString::new(value).map_err(std::io::Error::other))
            .transpose()?;
        let (command, value_ptr) = match &value {
            Some(value) => (FSCONFIG_SET_STRING, value.as_ptr()),
            None => (FSCONFIG_SET_FLAG, std::ptr::null()),
        };
        // SAFETY: fsconfig with a valid context and C strings (or a null
        // value for a flag).
        let done = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                context.as_raw_fd(),
                command,
                key.as_ptr(),
                value_ptr,
                0,
            )
        };
        if done != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Changes `options` (`key=value` pairs) of the mounted filesystem whose
/// root is `root` (`fspick`, then a reconfigure).
pub(crate) fn reconfigure(root: BorrowedFd<'_>, options: &[(&str, &str)]) -> std::io::Result<()> {
    let options: Vec<(&str, Option<&str>)> = options.iter().map(|(k, v)| (*k, Some(*v))).collect();
    reconfigure_options(root, &options)
}

/// Sets the flag option `flag` (`ro`) of the mounted filesystem whose root
/// is `root`.
pub(crate) fn reconfigure_with_flag(root: BorrowedFd<'_>, flag: &str) -> std::io::Result<()> {
    reconfigure_options(root, &[(flag, None)])
}

fn reconfigure_options(
    root: BorrowedFd<'_>,
    options: &[(&str, Option<&str>)],
) -> std::io::Result<()> {
    // SAFETY: fspick on our descriptor with an empty path; returns a new
    // descriptor or -1.
    let context = owned(unsafe {
        libc::syscall(
            libc::SYS_fspick,
            root.as_raw_fd(),
            c"".as_ptr(),
            FSPICK_CLOEXEC | FSPICK_EMPTY_PATH,
        )
    })?;
    set_options(&context, options)?;
    // SAFETY: fsconfig's reconfigure command takes no key or value.
    let done = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            context.as_raw_fd(),
            FSCONFIG_CMD_RECONFIGURE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if done != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether [`beneath`] may cross into mounts below its starting folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mounts {
    /// It may: a path that leads into a cover mount reaches the cover.
    Cross,
    /// It may not (`RESOLVE_NO_XDEV`): the path must stay on the folder's
    /// own mount.
    Stay,
}

/// Opens `relative` (empty: the folder itself) beneath `dir`: never above
/// it, following no symlink (magic links included) at any step, the last
/// one too; close-on-exec. The one way the sandbox opens a path inside a
/// tree that an untrusted uid can change.
pub(crate) fn beneath(
    dir: BorrowedFd<'_>,
    relative: &std::path::Path,
    flags: nix::fcntl::OFlag,
    mounts: Mounts,
) -> nix::Result<OwnedFd> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    let path: &std::path::Path = if relative.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        relative
    };
    let mut resolve = ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS;
    if mounts == Mounts::Stay {
        resolve |= ResolveFlag::RESOLVE_NO_XDEV;
    }
    openat2(
        dir,
        path,
        OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .resolve(resolve),
    )
}
