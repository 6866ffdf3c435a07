//! Disk budgets: what one call may add to the workspace and its private
//! tmp, in bytes and in names, enforced by the kernel without privilege.
//!
//! # How
//!
//! Before its target starts, a call's init (PID 1 of the call, see
//! [`super::zygote`]) enters a mount namespace of its own and mounts there:
//!
//! - a fresh tmpfs of the budget's size (`size=`) and name count
//!   (`nr_inodes=`), at a folder beside the call's tmp dir that the
//!   target's landlock rules do not grant;
//! - the call's tmp dir, a folder of that tmpfs bound over the one the
//!   zygote made;
//! - an overlay over the workspace: the workspace as the zygote sees it is
//!   the lower layer, a folder of the tmpfs the upper one (`userxattr`, as
//!   an unprivileged overlay must be), and the protected paths are covered
//!   again on top of it (see [`super::mounts::cover_protected`]).
//!
//! Everything the call writes, in the workspace or in tmp, lands in that
//! tmpfs. A write past the budget fails with `ENOSPC`, whatever made it: one
//! big file, many small ones, empty files, folders, hard links (tmpfs
//! counts every link as a name), symlinks, or a shared mapping. When the
//! target has exited, the init kills whatever is left of the call, so that
//! nothing writes any more, measures what the tmpfs holds, and writes the
//! upper layer back into the workspace ([`CallOverlay::write_back`]) before
//! it reports the call over. A call stopped at its wall-clock limit is
//! stopped the same way (the runtime sends the init `SIGUSR1`, see
//! [`STOP_SIGNAL`]), so what it wrote is kept.
//!
//! # What it guarantees
//!
//! - One call adds at most the budget's bytes (each file rounded up to a
//!   page, and to a block of the workspace's filesystem once written back)
//!   and the budget's names to the workspace and its tmp together.
//! - The budget's bytes are memory while the call runs (tmpfs pages,
//!   charged to the memory cgroup of the process that writes them): the
//!   memory limit holds what the call's processes use and what it has
//!   written, together. A call cannot add more than its memory limit
//!   leaves, whatever its budget says; past that, the writer is killed
//!   with `limit = "memory"`.
//!
//! What it costs, and what changes for the call:
//!
//! - Changing an existing file copies it into the budget first (overlay's
//!   copy-up): appending a byte to a 1 GiB log needs a 1 GiB budget.
//! - Deleting an existing name costs a name of the budget (a whiteout)
//!   until the call ends.
//! - A folder that existed before the call cannot be renamed (`EXDEV`, as
//!   across file systems; `mv` falls back to copying); one the call made
//!   can. A file or folder whose owner or group the sandbox's user
//!   namespace does not map cannot be changed (`EOVERFLOW`).
//! - Mounts inside the workspace are not visible to the call, except the
//!   sandbox's own covers, which its init mounts again on the overlay.
//! - Extended attributes and ownership are not written back: what the
//!   call made belongs to the sandbox's uid, as a direct write would.
//! - Concurrent calls of one workspace each see the workspace as it was
//!   when their overlay was made, plus their own changes; the last write
//!   back of a name wins.
//! - A call killed outright (its runtime gone, a cancelled turn) loses
//!   what it wrote: nothing is written back.
//!
//! # Threat model
//!
//! The upper layer is the call's own work and is treated as hostile: any
//! name, any kind of file, any link count, folders nested deep. The write
//! back runs in the init after every process of the call is gone, with the
//! budget's tmpfs made read-only (so nothing, not even a process outside
//! the call that was handed a descriptor, can change the upper layer under
//! it), with no capability but reading what the call made unreadable to
//! itself (the sandbox uid's own rights, nothing more), writing no more
//! file data than the budget counted (a sparse file's holes stay holes),
//! and reaches the workspace only
//! through descriptors opened beneath it without following any link
//! (`O_NOFOLLOW` at every step): a symlink the call left, or one a
//! concurrent call swapped in, is replaced, never followed. It never sets
//! a setuid or setgid bit, never makes a device, and skips sockets. A
//! protected path is still covered in the workspace it writes to, so the
//! write back can no more change one than the call could. A change that
//! cannot be written back is reported, path and reason, and the call fails
//! saying so: nothing is dropped silently.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::libc;

use super::mount_api::{
    beneath, fresh_mount, fresh_tmpfs, move_mount, open_tree, reconfigure, Mounts, AT_RECURSIVE,
    MOVE_MOUNT_T_EMPTY_PATH, OPEN_TREE_CLONE,
};
use super::mounts::{MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID};
use super::spec::{DiskBudget, DiskUse, ZygoteSpec};

/// The signal the runtime sends a call's init to stop the call and keep
/// what it wrote (at its wall-clock limit): the init kills every other
/// process of the call (in the handler itself, so no wait can miss it),
/// writes the upper layer back (stopping early if it was already doing
/// so) and reports. With landlock's signal scope (ABI 6) the target cannot
/// send it; on an older kernel it could, and would only end its own call
/// early.
pub(crate) const STOP_SIGNAL: libc::c_int = libc::SIGUSR1;

/// Names the tmpfs holds before the call writes anything, at most: its
/// root, the upper, work and tmp folders, and what overlay makes in its
/// work folder (the count is set exactly once they are made).
const OWN_NAMES: u64 = 8;

/// Folders deeper than this in the upper layer are not written back (and
/// are reported): each level holds two descriptors while it is walked.
const MAX_DEPTH: usize = 200;

/// Reports of changes not written back kept at most.
const MAX_REPORTED: usize = 32;

/// A call's overlay and budget, mounted by its init (see the module docs).
pub(crate) struct CallOverlay {
    /// The workspace as the zygote sees it (under the overlay).
    lower: OwnedFd,
    /// The tmpfs's root.
    budget_root: OwnedFd,
    /// Bytes and names in use before the call ran.
    baseline: (u64, u64),
}

/// The folder beside the call's tmp dir where its init mounts the budget's
/// tmpfs (in the init's own mount namespace; the zygote makes the empty
/// folder and removes it).
pub(crate) fn budget_folder(tmp: &Path) -> PathBuf {
    let mut name = tmp.as_os_str().to_owned();
    name.push(".disk");
    PathBuf::from(name)
}

fn io(what: &str, err: impl std::fmt::Display) -> String {
    format!("disk budget: {what}: {err}")
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io("path", "holds a NUL byte"))
}

/// Escapes a path for overlay's `lowerdir`, where `:` separates layers and
/// `\` escapes.
fn overlay_path(path: &Path) -> Result<String, String> {
    let text = path
        .to_str()
        .ok_or_else(|| io("workspace path", "is not UTF-8"))?;
    Ok(text
        .replace('\\', "\\\\")
        .replace(':', "\\:")
        .replace(',', "\\,"))
}

/// Mounts the call's budget, tmp dir and overlay in a new mount namespace
/// of the calling process (a call's init, before it forks the target).
pub(crate) fn mount_call_overlay(
    spec: &ZygoteSpec,
    budget: DiskBudget,
    tmp: &Path,
) -> Result<CallOverlay, String> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| io("a mount namespace for the call", e))?;
    let workspace = &spec.workspace;
    let lower = open(
        workspace,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io("opening the workspace", e))?;
    let lower_mode = nix::sys::stat::fstat(&lower)
        .map_err(|e| io("the workspace", e))?
        .st_mode;
    // The zygote's covers (protected paths, and what must stay root's in
    // a shared workspace) are mounts over the workspace's own files, which
    // the overlay does not show: clone each outermost one (with what is
    // mounted inside it) now, to cover the same path on the overlay.
    let covers = clone_covers(lower.as_fd())?;
    let size = budget.bytes.max(4096).to_string();
    let names = budget.files.saturating_add(OWN_NAMES).to_string();
    let tmpfs = fresh_tmpfs(
        &[("mode", "0700"), ("size", &size), ("nr_inodes", &names)],
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
    )
    .map_err(|e| io("a tmpfs of the budget's size", e))?;
    let folder = budget_folder(tmp);
    move_mount(tmpfs.as_fd(), libc::AT_FDCWD, &c_path(&folder)?, 0)
        .map_err(|e| io("mounting the budget", e))?;
    let budget_root = open(
        &folder,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io("the budget", e))?;
    for (name, mode) in [
        ("upper", lower_mode & 0o7777),
        ("work", 0o700),
        ("tmp", 0o700),
    ] {
        nix::sys::stat::mkdirat(&budget_root, name, Mode::from_bits_truncate(mode))
            .map_err(|e| io(name, e))?;
    }
    // mkdir applied the umask: the upper folder is the workspace root's
    // face in the overlay, so it gets the root's own mode.
    let upper = nix::fcntl::openat(
        &budget_root,
        "upper",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io("upper", e))?;
    nix::sys::stat::fchmod(
        &upper,
        Mode::from_bits_truncate((lower_mode & 0o1777) as libc::mode_t),
    )
    .map_err(|e| io("upper", e))?;
    // The call's tmp dir is a folder of the budget.
    let tmp_clone = open_tree(
        budget_root.as_fd(),
        c"tmp",
        OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
    )
    .map_err(|e| io("the tmp folder", e))?;
    move_mount(tmp_clone.as_fd(), libc::AT_FDCWD, &c_path(tmp)?, 0)
        .map_err(|e| io("binding the tmp folder", e))?;
    let upper_path = folder.join("upper");
    let work_path = folder.join("work");
    let overlay = fresh_mount(
        c"overlay",
        &[
            ("lowerdir", Some(&overlay_path(workspace)?)),
            ("upperdir", Some(&overlay_path(&upper_path)?)),
            ("workdir", Some(&overlay_path(&work_path)?)),
            ("userxattr", None),
        ],
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
    )
    .map_err(|e| {
        io(
            "an overlay over the workspace (needs Linux 5.11+ for overlays in a user namespace)",
            e,
        )
    })?;
    move_mount(overlay.as_fd(), libc::AT_FDCWD, &c_path(workspace)?, 0)
        .map_err(|e| io("mounting the overlay", e))?;
    // The overlay shows the lower layer's own files, not the covers
    // mounted on it: cover the protected paths again, on the overlay.
    let merged = open(
        workspace,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io("the overlay", e))?;
    for (relative, cover) in &covers {
        let at = beneath(merged.as_fd(), relative, OFlag::O_PATH, Mounts::Cross)
            .map_err(|e| io(&format!("covering {}", relative.display()), e))?;
        move_mount(cover.as_fd(), at.as_raw_fd(), c"", MOVE_MOUNT_T_EMPTY_PATH)
            .map_err(|e| io(&format!("covering {}", relative.display()), e))?;
    }
    // The names the budget's own folders (and overlay's in its work
    // folder) take are not the call's: the name count is set to exactly
    // what is in use now plus the budget.
    let (_, in_use, _, _) = usage(budget_root.as_fd())?;
    let names = in_use.saturating_add(budget.files).to_string();
    reconfigure(budget_root.as_fd(), &[("nr_inodes", &names)])
        .map_err(|e| io("setting the budget's name count", e))?;
    let baseline = usage(budget_root.as_fd())?;
    Ok(CallOverlay {
        lower,
        budget_root,
        baseline: (baseline.0, baseline.1),
    })
}

/// Clones of the zygote's outermost covers in the workspace (`lower`),
/// each with the covers inside it, parents first.
fn clone_covers(lower: BorrowedFd<'_>) -> Result<Vec<(PathBuf, OwnedFd)>, String> {
    let mut paths = super::mounts::covered_paths();
    paths.sort_by_key(|p| p.components().count());
    let mut outermost: Vec<PathBuf> = Vec::new();
    for path in paths {
        if !outermost.iter().any(|outer| path.starts_with(outer)) {
            outermost.push(path);
        }
    }
    let mut clones = Vec::new();
    for relative in outermost {
        let fail = |e: &dyn std::fmt::Display| {
            io(&format!("cloning the cover of {}", relative.display()), e)
        };
        // Crossing mounts on purpose: the path leads into its cover.
        let at = beneath(lower, &relative, nix::fcntl::OFlag::O_PATH, Mounts::Cross)
            .map_err(|e| fail(&e))?;
        // It must be the cover itself: a path whose cover is gone (the host
        // replaced it) would give a writable bind of the workspace's own
        // file, past the budget. That fails the call's setup instead.
        if !is_mount_root(at.as_fd()) {
            return Err(fail(&"it is no longer covered; try again"));
        }
        let clone = open_tree(
            at.as_fd(),
            c"",
            OPEN_TREE_CLONE
                | AT_RECURSIVE
                | libc::O_CLOEXEC as libc::c_uint
                | libc::AT_EMPTY_PATH as libc::c_uint,
        )
        .map_err(|e| fail(&e))?;
        clones.push((relative, clone));
    }
    Ok(clones)
}

/// Whether `fd` is the root of a mount (`statx`'s `STATX_ATTR_MOUNT_ROOT`).
fn is_mount_root(fd: BorrowedFd<'_>) -> bool {
    const STATX_ATTR_MOUNT_ROOT: u64 = 0x2000;
    // SAFETY: all-zero is a valid statx buffer.
    let mut buffer: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx on our descriptor with an empty path into our buffer.
    let done = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            0,
            &mut buffer,
        )
    };
    done == 0
        && buffer.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT != 0
        && buffer.stx_attributes & STATX_ATTR_MOUNT_ROOT != 0
}

/// Bytes and names in use in the tmpfs at `root`, and whether the bytes
/// and the names have run out.
fn usage(root: BorrowedFd<'_>) -> Result<(u64, u64, bool, bool), String> {
    let stat = nix::sys::statfs::fstatfs(root).map_err(|e| io("statfs", e))?;
    let block = stat.block_size() as u64;
    let bytes = stat.blocks().saturating_sub(stat.blocks_free()) * block;
    let names = stat.files().saturating_sub(stat.files_free());
    Ok((
        bytes,
        names,
        stat.blocks_free() == 0,
        stat.files_free() == 0,
    ))
}

impl CallOverlay {
    /// Measures what the call used and writes the upper layer back into
    /// the workspace. Every process of the call must be gone. Drops the
    /// calling process's capabilities first. `stop` is polled between
    /// entries: once it is set (the runtime stops the call), the rest is
    /// not written back, and the report says so.
    pub(crate) fn write_back(self, stop: &dyn Fn() -> bool) -> DiskUse {
        let mut report = DiskUse::default();
        match usage(self.budget_root.as_fd()) {
            Ok((bytes, names, bytes_full, files_full)) => {
                report.bytes = bytes.saturating_sub(self.baseline.0);
                report.files = names.saturating_sub(self.baseline.1);
                report.bytes_full = bytes_full;
                report.files_full = files_full;
            }
            Err(err) => report.not_written_back.push(err),
        }
        // Read-only from here on: a process outside the call that holds a
        // descriptor of the budget open for writing (one passed to it over
        // a socket) makes this fail, and nothing is written back rather
        // than something that changes under the walk.
        if let Err(err) = reconfigure_flag(self.budget_root.as_fd(), "ro") {
            report.not_written_back.push(io(
                "the call's files are still held open for writing outside the call; nothing was written back",
                err,
            ));
            return report;
        }
        if let Err(err) = drop_capabilities() {
            report.not_written_back.push(err);
            return report;
        }
        raise_open_files();
        let upper = match nix::fcntl::openat(
            &self.budget_root,
            "upper",
            flags_dir(),
            nix::sys::stat::Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(err) => {
                report.not_written_back.push(io("the upper layer", err));
                return report;
            }
        };
        let mut merge = Merge {
            root: self.lower.as_fd(),
            errors: Vec::new(),
            more_errors: 0,
            links: HashMap::new(),
            // What tmpfs counted, each file rounded up to a page: the
            // write back writes no more than that, whatever the files
            // claim (a sparse file's holes stay holes).
            bytes_left: report.bytes.saturating_add(PAGE),
            stop,
            stopped: false,
        };
        merge.folder(upper.as_fd(), self.lower.as_fd(), Path::new(""), 0);
        if merge.stopped {
            merge.errors.insert(
                0,
                "the call was stopped while its changes were written back; the rest were not"
                    .to_string(),
            );
        }
        report.not_written_back.extend(merge.errors);
        if merge.more_errors > 0 {
            report
                .not_written_back
                .push(format!("… and {} more", merge.more_errors));
        }
        report
    }
}

/// A tmpfs page: what each file's size rounds up to in the budget.
const PAGE: u64 = 4096;

/// Sets a flag option (`ro`) of the mounted filesystem whose root is
/// `root`.
fn reconfigure_flag(root: BorrowedFd<'_>, flag: &str) -> std::io::Result<()> {
    super::mount_api::reconfigure_with_flag(root, flag)
}

/// Drops every capability the process holds (in the zygote's user
/// namespace) but `CAP_DAC_READ_SEARCH`: the write back has the sandbox
/// uid's own rights, plus reading what the call made unreadable to itself
/// (a mode-000 file, a mode-0300 folder). That grants nothing the call
/// could not take: the capability covers only files whose owner the
/// namespace maps, the sandbox uid's own, whose modes it could change.
fn drop_capabilities() -> Result<(), String> {
    const CAP_DAC_READ_SEARCH: u32 = 1 << 2;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [
        Data {
            effective: CAP_DAC_READ_SEARCH,
            permitted: CAP_DAC_READ_SEARCH,
            inheritable: 0,
        },
        Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
    ];
    // SAFETY: capset with a v3 header and two data structs, as the kernel
    // expects; both outlive the call.
    let done = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if done != 0 {
        return Err(io("dropping capabilities", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Raises the soft descriptor limit to the hard one: the walk holds two
/// descriptors per level.
fn raise_open_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// What kind of entry the upper layer holds.
enum Kind {
    Whiteout,
    Folder,
    File,
    Symlink,
    Fifo,
    Other,
}

fn kind_of(stat: &libc::stat) -> Kind {
    match stat.st_mode & libc::S_IFMT {
        libc::S_IFCHR if stat.st_rdev == 0 => Kind::Whiteout,
        libc::S_IFDIR => Kind::Folder,
        libc::S_IFREG => Kind::File,
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFIFO => Kind::Fifo,
        _ => Kind::Other,
    }
}

/// One write back's state.
struct Merge<'a> {
    /// The workspace's root (under the overlay).
    root: BorrowedFd<'a>,
    errors: Vec<String>,
    more_errors: usize,
    /// Files of the upper layer with more than one link, by inode: where
    /// (relative to the root) the first was written back.
    links: HashMap<u64, PathBuf>,
    /// Bytes of file data the write back may still write.
    bytes_left: u64,
    /// Whether the runtime stops the call.
    stop: &'a dyn Fn() -> bool,
    /// The walk stopped because of it.
    stopped: bool,
}

fn flags_dir() -> nix::fcntl::OFlag {
    use nix::fcntl::OFlag;
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<libc::stat> {
    nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
}

/// A temporary name no other write back (of any call, in any PID
/// namespace) picks: 128 random bits.
fn temporary_name() -> OsString {
    let mut bits = [0u8; 16];
    let mut filled = 0;
    while filled < bits.len() {
        // SAFETY: getrandom into the unfilled part of our buffer.
        let got =
            unsafe { libc::getrandom(bits[filled..].as_mut_ptr().cast(), bits.len() - filled, 0) };
        if got <= 0 {
            break;
        }
        filled += got as usize;
    }
    let hex: String = bits.iter().map(|b| format!("{b:02x}")).collect();
    OsString::from(format!(".stack-write-back.{hex}"))
}

impl Merge<'_> {
    fn fail(&mut self, path: &Path, why: impl std::fmt::Display) {
        if self.errors.len() < MAX_REPORTED {
            self.errors.push(format!("{}: {why}", path.display()));
        } else {
            self.more_errors += 1;
        }
    }

    /// Writes the upper folder `upper` back into the workspace folder
    /// `lower` (`path`: where, for reports).
    fn folder(&mut self, upper: BorrowedFd<'_>, lower: BorrowedFd<'_>, path: &Path, depth: usize) {
        let names = match list(upper) {
            Ok(names) => names,
            Err(err) => return self.fail(path, format!("reading the call's changes: {err}")),
        };
        for name in names {
            if self.stopped || (self.stop)() {
                self.stopped = true;
                return;
            }
            let here = path.join(&name);
            let stat = match stat_at(upper, &name) {
                Ok(stat) => stat,
                Err(err) => {
                    self.fail(&here, err);
                    continue;
                }
            };
            match kind_of(&stat) {
                Kind::Whiteout => {
                    if let Err(err) = remove(lower, &name, depth) {
                        self.fail(&here, format!("could not delete it: {err}"));
                    }
                }
                Kind::Folder => self.one_folder(upper, lower, &name, &here, &stat, depth),
                Kind::File => self.file(upper, lower, &name, &here, &stat),
                Kind::Symlink => self.symlink(upper, lower, &name, &here),
                Kind::Fifo => self.fifo(lower, &name, &here, &stat),
                Kind::Other => self.fail(&here, "a socket or device; not written back"),
            }
        }
    }

    fn one_folder(
        &mut self,
        upper: BorrowedFd<'_>,
        lower: BorrowedFd<'_>,
        name: &OsStr,
        here: &Path,
        stat: &libc::stat,
        depth: usize,
    ) {
        use nix::sys::stat::Mode;
        if depth >= MAX_DEPTH {
            return self.fail(here, format!("nested deeper than {MAX_DEPTH} folders"));
        }
        let upper_dir = match nix::fcntl::openat(upper, name, flags_dir(), Mode::empty()) {
            Ok(fd) => fd,
            Err(err) => return self.fail(here, err),
        };
        let opaque = is_opaque(upper_dir.as_fd());
        let existing = stat_at(lower, name).ok();
        let is_folder = existing
            .as_ref()
            .is_some_and(|s| s.st_mode & libc::S_IFMT == libc::S_IFDIR);
        if existing.is_some() && (opaque || !is_folder) {
            // Replaced: by a fresh folder (opaque), or a folder over a file.
            if let Err(err) = remove(lower, name, depth) {
                return self.fail(here, format!("could not replace it: {err}"));
            }
        }
        if existing.is_none() || opaque || !is_folder {
            if let Err(err) = nix::sys::stat::mkdirat(lower, name, Mode::from_bits_truncate(0o700))
            {
                return self.fail(here, format!("could not make it: {err}"));
            }
        }
        let lower_dir = match nix::fcntl::openat(lower, name, flags_dir(), Mode::empty()) {
            Ok(fd) => fd,
            Err(err) => return self.fail(here, err),
        };
        // Writable while it is written to (the call could write in it, in
        // its overlay); its own mode is set last. Only a folder this uid
        // owns can be changed, as the call itself could have.
        let _ = nix::sys::stat::fchmod(
            &lower_dir,
            Mode::from_bits_truncate((stat.st_mode & 0o777 | 0o700) as libc::mode_t),
        );
        self.folder(upper_dir.as_fd(), lower_dir.as_fd(), here, depth + 1);
        // Never setgid.
        let mode = (stat.st_mode & 0o1777) as libc::mode_t;
        if let Err(err) = nix::sys::stat::fchmod(&lower_dir, Mode::from_bits_truncate(mode)) {
            self.fail(here, format!("mode: {err}"));
        }
        set_times(lower_dir.as_fd(), stat);
    }

    /// Links `name` in `lower` to the file first written back at
    /// `first` (relative to the root), reached without following links.
    fn link_to(&self, first: &Path, lower: BorrowedFd<'_>, name: &OsStr) -> nix::Result<()> {
        let (parent, file) = match (first.parent(), first.file_name()) {
            (Some(parent), Some(file)) => (parent, file),
            _ => return Err(nix::errno::Errno::EINVAL),
        };
        let parent = beneath(
            self.root,
            parent,
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
            Mounts::Cross,
        )?;
        make_room(lower, name)?;
        nix::unistd::linkat(&parent, file, lower, name, nix::fcntl::AtFlags::empty())
    }

    fn file(
        &mut self,
        upper: BorrowedFd<'_>,
        lower: BorrowedFd<'_>,
        name: &OsStr,
        here: &Path,
        stat: &libc::stat,
    ) {
        if stat.st_nlink > 1 {
            if let Some(first) = self.links.get(&stat.st_ino).cloned() {
                if let Err(err) = self.link_to(&first, lower, name) {
                    self.fail(here, format!("could not link it: {err}"));
                }
                return;
            }
        }
        let temporary = temporary_name();
        let mut created = false;
        let mut budget = self.bytes_left;
        let written = (|| -> Result<(), String> {
            use nix::fcntl::OFlag;
            use nix::sys::stat::Mode;
            let source = nix::fcntl::openat(
                upper,
                name,
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| e.to_string())?;
            let opened = nix::sys::stat::fstat(&source).map_err(|e| e.to_string())?;
            if opened.st_ino != stat.st_ino || opened.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Err("it changed while it was written back".into());
            }
            let target = nix::fcntl::openat(
                lower,
                temporary.as_os_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(|e| e.to_string())?;
            created = true;
            copy_data(&source, &target, opened.st_size as u64, &mut budget)?;
            let mode = (stat.st_mode & 0o777) as libc::mode_t;
            nix::sys::stat::fchmod(&target, Mode::from_bits_truncate(mode))
                .map_err(|e| e.to_string())?;
            set_times(target.as_fd(), stat);
            make_room(lower, name).map_err(|e| e.to_string())?;
            nix::fcntl::renameat(lower, temporary.as_os_str(), lower, name)
                .map_err(|e| e.to_string())
        })();
        self.bytes_left = budget;
        match written {
            Ok(()) => {
                if stat.st_nlink > 1 {
                    self.links.insert(stat.st_ino, here.to_path_buf());
                }
            }
            Err(err) => {
                if created {
                    let _ = nix::unistd::unlinkat(
                        lower,
                        temporary.as_os_str(),
                        nix::unistd::UnlinkatFlags::NoRemoveDir,
                    );
                }
                self.fail(here, format!("could not write it back: {err}"));
            }
        }
    }

    fn symlink(&mut self, upper: BorrowedFd<'_>, lower: BorrowedFd<'_>, name: &OsStr, here: &Path) {
        let temporary = temporary_name();
        let mut created = false;
        let made = (|| -> nix::Result<()> {
            let target = nix::fcntl::readlinkat(upper, name)?;
            nix::unistd::symlinkat(target.as_os_str(), lower, temporary.as_os_str())?;
            created = true;
            make_room(lower, name)?;
            nix::fcntl::renameat(lower, temporary.as_os_str(), lower, name)
        })();
        if let Err(err) = made {
            if created {
                let _ = nix::unistd::unlinkat(
                    lower,
                    temporary.as_os_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                );
            }
            self.fail(here, format!("could not write the link back: {err}"));
        }
    }

    fn fifo(&mut self, lower: BorrowedFd<'_>, name: &OsStr, here: &Path, stat: &libc::stat) {
        let temporary = temporary_name();
        let mut created = false;
        let made = (|| -> nix::Result<()> {
            let mode = nix::sys::stat::Mode::from_bits_truncate((stat.st_mode & 0o777) as _);
            nix::sys::stat::mknodat(
                lower,
                temporary.as_os_str(),
                nix::sys::stat::SFlag::S_IFIFO,
                mode,
                0,
            )?;
            created = true;
            make_room(lower, name)?;
            nix::fcntl::renameat(lower, temporary.as_os_str(), lower, name)
        })();
        if let Err(err) = made {
            if created {
                let _ = nix::unistd::unlinkat(
                    lower,
                    temporary.as_os_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                );
            }
            self.fail(here, format!("could not write the FIFO back: {err}"));
        }
    }
}

/// Copies the data of `source` (`size` bytes long) into the empty
/// `target`: only its data, so that holes stay holes, and no more than
/// `budget` bytes of it (what tmpfs counted), which it lowers.
fn copy_data(
    source: &OwnedFd,
    target: &OwnedFd,
    size: u64,
    budget: &mut u64,
) -> Result<(), String> {
    use nix::unistd::{lseek, Whence};
    let mut buffer = vec![0u8; 1 << 16];
    let mut offset: i64 = 0;
    let end = i64::try_from(size).map_err(|_| "too large".to_string())?;
    while offset < end {
        let data = match lseek(source, offset, Whence::SeekData) {
            Ok(data) => data,
            // No data past `offset`: the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(err) => return Err(err.to_string()),
        };
        let hole = lseek(source, data, Whence::SeekHole)
            .map_err(|e| e.to_string())?
            .min(end);
        let mut at = data;
        while at < hole {
            let want = ((hole - at) as usize).min(buffer.len());
            let read =
                nix::sys::uio::pread(source, &mut buffer[..want], at).map_err(|e| e.to_string())?;
            if read == 0 {
                break;
            }
            if read as u64 > *budget {
                return Err("it holds more data than the call's budget counted".into());
            }
            let mut done = 0;
            while done < read {
                done += nix::sys::uio::pwrite(target, &buffer[done..read], at + done as i64)
                    .map_err(|e| e.to_string())?;
            }
            *budget -= read as u64;
            at += read as i64;
        }
        offset = hole.max(at);
    }
    nix::unistd::ftruncate(target, end).map_err(|e| e.to_string())
}

/// Makes `name` in `dir` free for a rename of a non-folder onto it: a
/// folder there is removed (a rename cannot replace one with a file).
fn make_room(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<()> {
    match stat_at(dir, name) {
        Ok(stat) if stat.st_mode & libc::S_IFMT == libc::S_IFDIR => remove(dir, name, 0),
        _ => Ok(()),
    }
}

/// Removes `name` from `dir`, a whole tree if it is a folder, never
/// following a link.
fn remove(dir: BorrowedFd<'_>, name: &OsStr, depth: usize) -> nix::Result<()> {
    use nix::unistd::{unlinkat, UnlinkatFlags};
    let stat = match stat_at(dir, name) {
        Ok(stat) => stat,
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(err) => return Err(err),
    };
    if stat.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return unlinkat(dir, name, UnlinkatFlags::NoRemoveDir);
    }
    if depth >= MAX_DEPTH {
        return Err(nix::errno::Errno::ELOOP);
    }
    let inner = nix::fcntl::openat(dir, name, flags_dir(), nix::sys::stat::Mode::empty())?;
    for child in list(inner.as_fd())? {
        remove(inner.as_fd(), &child, depth + 1)?;
    }
    drop(inner);
    unlinkat(dir, name, UnlinkatFlags::RemoveDir)
}

/// The names in folder `dir` (without `.` and `..`).
fn list(dir: BorrowedFd<'_>) -> nix::Result<Vec<OsString>> {
    let own = nix::fcntl::openat(dir, ".", flags_dir(), nix::sys::stat::Mode::empty())?;
    let mut listing = nix::dir::Dir::from_fd(own)?;
    let mut names = Vec::new();
    for entry in listing.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_owned());
        }
    }
    Ok(names)
}

/// Whether overlay marked the upper folder opaque (it replaced a folder of
/// the lower layer, whose contents are gone).
fn is_opaque(dir: BorrowedFd<'_>) -> bool {
    let mut value = [0u8; 4];
    let name: &CStr = c"user.overlay.opaque";
    // SAFETY: fgetxattr on our descriptor into a buffer of the given size.
    let read = unsafe {
        libc::fgetxattr(
            dir.as_raw_fd(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    read >= 1 && value[0] == b'y'
}

/// Gives the file at `fd` the access and modification times of `stat`.
fn set_times(fd: BorrowedFd<'_>, stat: &libc::stat) {
    let times = [
        libc::timespec {
            tv_sec: stat.st_atime,
            tv_nsec: stat.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: stat.st_mtime,
            tv_nsec: stat.st_mtime_nsec,
        },
    ];
    // SAFETY: futimens on our descriptor with two valid timespecs.
    unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_paths_are_escaped_for_overlay() {
        assert_eq!(
            overlay_path(Path::new("/w/a:b\\c,d")).expect("utf-8"),
            "/w/a\\:b\\\\c\\,d"
        );
        assert_eq!(
            budget_folder(Path::new("/tmp/call-3")),
            PathBuf::from("/tmp/call-3.disk")
        );
    }
}
