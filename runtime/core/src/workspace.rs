//! The session workspace: a directory the file tools may touch, and nothing else.
//!
//! # Threat model
//!
//! The file tools (`read_file`, `write_file`, `list_dir`, `search_files`) run
//! *inside the runtime process*, not in a sandbox, with the runtime's full
//! privileges (often root). Their paths come from the model, so they are
//! hostile: absolute paths, `..` chains, symlinks planted in the workspace
//! that point at `/etc/shadow`, symlinks swapped in between a check and a use.
//!
//! Rules, each with a test in this module (or, for rule 8, in
//! `runtime/core/tests/policy.rs`, `off_limits_paths_stay_off_limits_through_links_and_searches`):
//!
//! 1. **Every path is resolved by the kernel beneath the workspace fd.** All
//!    opens go through `openat2(2)` with `RESOLVE_BENEATH` on a directory fd
//!    opened once, so `..`, absolute symlinks and symlinks pointing outside
//!    fail with `EXDEV` inside the kernel. There is no check-then-use window.
//! 2. **Magic links are never followed** (`RESOLVE_NO_MAGICLINKS`), so
//!    `/proc/self/root`-style links planted in the workspace grant nothing.
//! 3. **Writes never follow symlinks at all** (`RESOLVE_NO_SYMLINKS`), not even
//!    ones that stay inside: a write cannot be redirected.
//! 4. **Absolute paths are refused** unless they name a place inside the
//!    workspace root, in which case they are made relative first.
//! 5. **Walks do not descend through symlinks** (`search_files`, `list_dir`
//!    report them as links and never follow them).
//! 6. **Fail closed:** a kernel without `openat2` (before 5.6) gets an error,
//!    never a weaker fallback.
//! 7. **Only regular files with one name are written or read** (the
//!    `_checked` reads): a hard link may be a file outside the workspace or
//!    an off-limits one under another name, and a FIFO would block for good
//!    (every open is `O_NONBLOCK`); a write chowns only a file it created.
//! 8. **The policy's path rules hold for what is opened** (`_checked`
//!    variants): the kernel-resolved path of the opened descriptor is
//!    checked, and walks skip denied paths, so a link to `.env` is `.env`.
//!
//! Out of scope: a hostile process *also* writing into the workspace at the
//! same time can change which file inside the workspace is read, but it can
//! never make the runtime read or write outside it.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, Mode, SFlag};

/// Errors from workspace file operations, worded for the model.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// The workspace root itself could not be opened.
    #[error("cannot open workspace root {root}: {source}")]
    Root {
        /// The root that failed.
        root: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An absolute path outside the workspace.
    #[error("path `{0}` is absolute and outside the workspace; use a path relative to the workspace root")]
    AbsolutePath(String),
    /// The path resolves outside the workspace (`..`, or a symlink pointing out).
    #[error("path `{0}` leads outside the workspace (through `..` or a symlink); only files inside the workspace can be used")]
    EscapesWorkspace(String),
    /// A symlink where none may be followed (writes, walks).
    #[error("path `{0}` goes through a symbolic link, which this operation does not follow")]
    Symlink(String),
    /// Nothing at that path.
    #[error("no such file or directory: `{0}`")]
    NotFound(String),
    /// A directory where a file was expected.
    #[error("`{0}` is a directory, not a file")]
    IsDirectory(String),
    /// A file where a directory was expected.
    #[error("`{0}` is not a directory")]
    NotDirectory(String),
    /// The path is empty.
    #[error(
        "path is empty; give a path relative to the workspace root, or `.` for the root itself"
    )]
    EmptyPath,
    /// The file has other names (hard links), perhaps outside the workspace:
    /// writing it would write them too.
    #[error(
        "`{0}` has other hard links (perhaps outside the workspace); refusing to write through it"
    )]
    HardLinked(String),
    /// A FIFO, socket or device where a regular file was expected.
    #[error("`{0}` is not a regular file (a FIFO, socket or device); refusing to use it")]
    NotRegular(String),
    /// The path, as resolved, is one the policy keeps off limits.
    #[error("`{path}` is `{resolved}` once links are resolved: {reason}")]
    Denied {
        /// The path as given.
        path: String,
        /// Where it leads, relative to the workspace root.
        resolved: String,
        /// The policy's words.
        reason: String,
    },
    /// The kernel lacks `openat2(2)`; refusing rather than resolving paths unsafely.
    #[error("this kernel lacks openat2(2) (Linux 5.6+), which the workspace needs to confine paths safely")]
    Openat2Unsupported,
    /// Any other I/O error.
    #[error("`{path}`: {source}")]
    Io {
        /// The path as given.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// A directory that file tools are confined to.
#[derive(Debug)]
pub struct Workspace {
    root: PathBuf,
    root_fd: OwnedFd,
    /// When the runtime is root and the workspace belongs to someone else,
    /// files the runtime creates are given to that owner, so sandboxed code
    /// (which never runs as root) can still change them.
    owner: Option<(u32, u32)>,
}

/// How to resolve a path beneath the workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Follow {
    /// Follow symlinks that stay inside the workspace (reads).
    InsideOnly,
    /// Follow no symlinks at all (writes, walks).
    Never,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DirEntry {
    /// File name.
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: &'static str,
    /// Size in bytes for regular files.
    pub size: Option<u64>,
}

impl Workspace {
    /// Opens `root` (which must exist and be a directory) as a workspace.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, WorkspaceError> {
        let root_err = |source| WorkspaceError::Root {
            root: root.as_ref().to_path_buf(),
            source,
        };
        let root = std::fs::canonicalize(root.as_ref()).map_err(root_err)?;
        let dir = File::open(&root).map_err(root_err)?;
        let meta = dir.metadata().map_err(root_err)?;
        if !meta.is_dir() {
            return Err(WorkspaceError::Root {
                root,
                source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        use std::os::unix::fs::MetadataExt;
        let owner =
            (nix::unistd::geteuid().is_root() && meta.uid() != 0).then(|| (meta.uid(), meta.gid()));
        Ok(Workspace {
            root,
            root_fd: dir.into(),
            owner,
        })
    }

    /// The canonical root path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Turns a model-supplied path into one relative to the root, refusing
    /// absolute paths outside the workspace.
    fn relative(&self, path: &str) -> Result<PathBuf, WorkspaceError> {
        if path.is_empty() {
            return Err(WorkspaceError::EmptyPath);
        }
        let given = Path::new(path);
        let relative = if given.is_absolute() {
            match given.strip_prefix(&self.root) {
                Ok(rest) => rest.to_path_buf(),
                Err(_) => return Err(WorkspaceError::AbsolutePath(path.to_string())),
            }
        } else {
            given.to_path_buf()
        };
        if relative.as_os_str().is_empty() {
            Ok(PathBuf::from("."))
        } else {
            Ok(relative)
        }
    }

    fn open_beneath(
        &self,
        path: &str,
        flags: OFlag,
        mode: Mode,
        follow: Follow,
    ) -> Result<OwnedFd, WorkspaceError> {
        let relative = self.relative(path)?;
        open_beneath_fd(&self.root_fd, &relative, flags, mode, follow)
            .map_err(|errno| map_errno(errno, path))
    }

    /// Reads a file as UTF-8 text (lossy), at most `max_bytes` bytes.
    ///
    /// Returns the text and whether it was cut short.
    pub fn read_text(&self, path: &str, max_bytes: u64) -> Result<(String, bool), WorkspaceError> {
        self.read_text_checked(path, max_bytes, &|_| None)
    }

    /// Where the opened `fd` is, relative to the root, as the kernel
    /// resolved it (symlinks followed); refused when `denied` says so.
    /// Checked on the descriptor that is then used, so a link swapped in
    /// meanwhile changes nothing.
    fn check_resolved(
        &self,
        fd: &OwnedFd,
        path: &str,
        denied: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), WorkspaceError> {
        use std::os::fd::AsRawFd;
        let real =
            std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|source| {
                WorkspaceError::Io {
                    path: path.to_string(),
                    source,
                }
            })?;
        let relative = match real.strip_prefix(&self.root) {
            Ok(rest) if rest.as_os_str().is_empty() => ".".to_string(),
            Ok(rest) => rest.display().to_string(),
            Err(_) => return Err(WorkspaceError::EscapesWorkspace(path.to_string())),
        };
        match denied(&relative) {
            Some(reason) => Err(WorkspaceError::Denied {
                path: path.to_string(),
                resolved: relative,
                reason,
            }),
            None => Ok(()),
        }
    }

    /// [`Workspace::read_text`], refused when the file the path resolves to
    /// is one `denied` names. FIFOs, sockets and devices are refused too: a
    /// FIFO would block the read for good.
    pub fn read_text_checked(
        &self,
        path: &str,
        max_bytes: u64,
        denied: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(String, bool), WorkspaceError> {
        let fd = self.open_beneath(
            path,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK,
            Mode::empty(),
            Follow::InsideOnly,
        )?;
        self.check_resolved(&fd, path, denied)?;
        let stat = fstat(&fd).map_err(|errno| map_errno(errno, path))?;
        match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFDIR => return Err(WorkspaceError::IsDirectory(path.to_string())),
            SFlag::S_IFREG => {}
            _ => return Err(WorkspaceError::NotRegular(path.to_string())),
        }
        // Another name of the same file may be one the policy denies (a
        // hard link to `.env`), or lie outside: such files are not read
        // through this name.
        if stat.st_nlink > 1 {
            return Err(WorkspaceError::HardLinked(path.to_string()));
        }
        let mut bytes = Vec::new();
        File::from(fd)
            .take(max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|source| WorkspaceError::Io {
                path: path.to_string(),
                source,
            })?;
        let truncated = bytes.len() as u64 > max_bytes;
        if truncated {
            bytes.truncate(usize::try_from(max_bytes).unwrap_or(usize::MAX));
        }
        Ok((String::from_utf8_lossy(&bytes).into_owned(), truncated))
    }

    /// Writes (or appends) `content` to a file, creating missing parent
    /// directories inside the workspace. Never follows symlinks.
    pub fn write(&self, path: &str, content: &[u8], append: bool) -> Result<u64, WorkspaceError> {
        let relative = self.relative(path)?;
        if let Some(parent) = relative.parent() {
            self.create_dirs(parent, path)?;
        }
        // Never truncate before the checks below; never block on a FIFO.
        let mut flags = OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK;
        if append {
            flags |= OFlag::O_APPEND;
        }
        let open = |flags: OFlag| {
            // openat2 takes a mode only together with O_CREAT.
            let mode = if flags.contains(OFlag::O_CREAT) {
                Mode::from_bits_truncate(0o644)
            } else {
                Mode::empty()
            };
            open_beneath_fd(&self.root_fd, &relative, flags, mode, Follow::Never)
        };
        // Only a file this call creates is handed to the workspace owner:
        // chowning an existing one could give away a file that is also
        // linked from elsewhere.
        let (fd, created) = match open(flags | OFlag::O_CREAT | OFlag::O_EXCL) {
            Ok(fd) => (fd, true),
            // ENXIO: a FIFO with no reader refuses a non-blocking writer;
            // it is no regular file either way.
            Err(Errno::EEXIST) => match open(flags) {
                Ok(fd) => (fd, false),
                Err(Errno::ENXIO) => return Err(WorkspaceError::NotRegular(path.to_string())),
                Err(errno) => return Err(map_errno(errno, path)),
            },
            Err(errno) => return Err(map_errno(errno, path)),
        };
        let stat = nix::sys::stat::fstat(&fd).map_err(|errno| map_errno(errno, path))?;
        if stat.st_mode & nix::libc::S_IFMT != nix::libc::S_IFREG {
            return Err(WorkspaceError::NotRegular(path.to_string()));
        }
        if stat.st_nlink > 1 {
            return Err(WorkspaceError::HardLinked(path.to_string()));
        }
        if created {
            if let Some((uid, gid)) = self.owner {
                nix::unistd::fchown(&fd, Some(uid.into()), Some(gid.into()))
                    .map_err(|errno| map_errno(errno, path))?;
            }
        }
        if !append {
            nix::unistd::ftruncate(&fd, 0).map_err(|errno| map_errno(errno, path))?;
        }
        // Writes block again (the file is regular).
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(if append {
                OFlag::O_APPEND
            } else {
                OFlag::empty()
            }),
        )
        .map_err(|errno| map_errno(errno, path))?;
        let mut file = File::from(fd);
        std::io::Write::write_all(&mut file, content).map_err(|source| WorkspaceError::Io {
            path: path.to_string(),
            source,
        })?;
        Ok(content.len() as u64)
    }

    fn create_dirs(&self, parent: &Path, original: &str) -> Result<(), WorkspaceError> {
        let mut so_far = PathBuf::new();
        for component in parent.components() {
            match component {
                Component::Normal(part) => so_far.push(part),
                Component::CurDir => continue,
                _ => return Err(WorkspaceError::EscapesWorkspace(original.to_string())),
            }
            let (dir_fd, name) = self.parent_fd_and_name(&so_far, original)?;
            match nix::sys::stat::mkdirat(&dir_fd, name, Mode::from_bits_truncate(0o755)) {
                Ok(()) => {
                    if let Some((uid, gid)) = self.owner {
                        nix::unistd::fchownat(
                            &dir_fd,
                            name,
                            Some(uid.into()),
                            Some(gid.into()),
                            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                        )
                        .map_err(|errno| map_errno(errno, original))?;
                    }
                }
                Err(Errno::EEXIST) => {}
                Err(errno) => return Err(map_errno(errno, original)),
            }
        }
        Ok(())
    }

    fn parent_fd_and_name<'a>(
        &self,
        relative: &'a Path,
        original: &str,
    ) -> Result<(OwnedFd, &'a OsStr), WorkspaceError> {
        let name = relative
            .file_name()
            .ok_or_else(|| WorkspaceError::EscapesWorkspace(original.to_string()))?;
        let parent = match relative.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let fd = open_beneath_fd(
            &self.root_fd,
            parent,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
            Follow::Never,
        )
        .map_err(|errno| map_errno(errno, original))?;
        Ok((fd, name))
    }

    /// Lists a directory, sorted by name. Symlinks are reported, not followed.
    pub fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>, WorkspaceError> {
        self.list_dir_checked(path, &|_| None)
    }

    /// [`Workspace::list_dir`], refused when the folder the path resolves
    /// to is one `denied` names.
    pub fn list_dir_checked(
        &self,
        path: &str,
        denied: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<DirEntry>, WorkspaceError> {
        let fd = self.open_beneath(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
            Follow::InsideOnly,
        )?;
        self.check_resolved(&fd, path, denied)?;
        read_entries(fd, path)
    }

    /// Walks the tree under `path` without following symlinks, calling
    /// `visit(relative_path, file)` for every regular file until it returns
    /// `false`.
    pub fn walk_files(
        &self,
        path: &str,
        visit: &mut dyn FnMut(&Path, File) -> bool,
    ) -> Result<(), WorkspaceError> {
        self.walk_files_checked(path, &|_| None, visit)
    }

    /// [`Workspace::walk_files`], skipping every file and folder (with all
    /// below it) whose path `denied` names. The walk follows no link, so
    /// the path it checks is the path it opens.
    pub fn walk_files_checked(
        &self,
        path: &str,
        denied: &dyn Fn(&str) -> Option<String>,
        visit: &mut dyn FnMut(&Path, File) -> bool,
    ) -> Result<(), WorkspaceError> {
        self.walk_files_until(path, denied, &|| false, visit)
    }

    /// [`Workspace::walk_files_checked`] that also ends as soon as `stop()`
    /// says so, checked at every entry (folders, links and skipped files
    /// included), so a tree of empty folders or hard links costs a bounded
    /// walk too.
    pub fn walk_files_until(
        &self,
        path: &str,
        denied: &dyn Fn(&str) -> Option<String>,
        stop: &dyn Fn() -> bool,
        visit: &mut dyn FnMut(&Path, File) -> bool,
    ) -> Result<(), WorkspaceError> {
        let start = self.relative(path)?;
        let fd = open_beneath_fd(
            &self.root_fd,
            &start,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
            Follow::Never,
        )
        .map_err(|errno| map_errno(errno, path))?;
        self.check_resolved(&fd, path, denied)?;
        // Folders wait on the stack by name and are opened when their turn
        // comes, so a walk holds two descriptors however wide the tree is.
        let mut stack = vec![(start, Some(fd))];
        while let Some((dir_path, opened)) = stack.pop() {
            let dir_fd = match opened {
                Some(fd) => fd,
                None => match open_beneath_fd(
                    &self.root_fd,
                    &dir_path,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                    Follow::Never,
                ) {
                    Ok(fd) => fd,
                    Err(_) => continue,
                },
            };
            let display = dir_path.display().to_string();
            for entry in read_entries(
                dir_fd.try_clone().map_err(|source| WorkspaceError::Io {
                    path: display.clone(),
                    source,
                })?,
                &display,
            )?
            .into_iter()
            .rev()
            {
                if stop() {
                    return Ok(());
                }
                let child = dir_path.join(&entry.name);
                if denied(&normalize(&child).display().to_string()).is_some() {
                    continue;
                }
                match entry.kind {
                    "dir" => {
                        stack.push((child, None));
                        continue;
                    }
                    "file" => {}
                    _ => continue,
                }
                let Ok(child_fd) = open_beneath_fd(
                    &dir_fd,
                    Path::new(&entry.name),
                    OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
                    Mode::empty(),
                    Follow::Never,
                ) else {
                    continue;
                };
                // As in `read_text_checked`: a file with other names may be
                // a denied one under another name (and a thousand names of
                // one big file would cost a thousand reads): skipped.
                if fstat(&child_fd).map_or(true, |st| st.st_nlink > 1) {
                    continue;
                }
                if !visit(normalize(&child), File::from(child_fd)) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// Drops leading `./` so reported paths read naturally.
fn normalize(path: &Path) -> &Path {
    path.strip_prefix(".").unwrap_or(path)
}

fn open_beneath_fd(
    dir: &impl AsFd,
    relative: &Path,
    flags: OFlag,
    mode: Mode,
    follow: Follow,
) -> Result<OwnedFd, Errno> {
    let resolve = match follow {
        Follow::InsideOnly => ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        Follow::Never => ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS,
    };
    let how = OpenHow::new().flags(flags).mode(mode).resolve(resolve);
    openat2(dir, relative, how)
}

fn read_entries(fd: OwnedFd, path: &str) -> Result<Vec<DirEntry>, WorkspaceError> {
    let dir = nix::dir::Dir::from_fd(fd).map_err(|errno| map_errno(errno, path))?;
    let dir_fd = dir
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| WorkspaceError::Io {
            path: path.to_string(),
            source,
        })?;
    let mut entries = Vec::new();
    for entry in dir {
        let entry = entry.map_err(|errno| map_errno(errno, path))?;
        let name_bytes = entry.file_name().to_bytes();
        if name_bytes == b"." || name_bytes == b".." {
            continue;
        }
        let name = OsStr::from_bytes(name_bytes);
        let stat = nix::sys::stat::fstatat(&dir_fd, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW);
        let (kind, size) = match stat {
            Ok(st) => match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
                SFlag::S_IFREG => ("file", Some(st.st_size as u64)),
                SFlag::S_IFDIR => ("dir", None),
                SFlag::S_IFLNK => ("symlink", None),
                _ => ("other", None),
            },
            Err(_) => ("other", None),
        };
        entries.push(DirEntry {
            name: name.to_string_lossy().into_owned(),
            kind,
            size,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

fn map_errno(errno: Errno, path: &str) -> WorkspaceError {
    let path = path.to_string();
    match errno {
        Errno::EXDEV => WorkspaceError::EscapesWorkspace(path),
        Errno::ELOOP => WorkspaceError::Symlink(path),
        Errno::ENOENT => WorkspaceError::NotFound(path),
        Errno::EISDIR => WorkspaceError::IsDirectory(path),
        Errno::ENOTDIR => WorkspaceError::NotDirectory(path),
        Errno::ENOSYS => WorkspaceError::Openat2Unsupported,
        other => WorkspaceError::Io {
            path,
            source: std::io::Error::from_raw_os_error(other as i32),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn fixture() -> (tempfile::TempDir, tempfile::TempDir, Workspace) {
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("secret.txt"), "TOP SECRET").expect("write");
        let inside = tempfile::tempdir().expect("tempdir");
        std::fs::write(inside.path().join("hello.txt"), "hello").expect("write");
        let ws = Workspace::open(inside.path()).expect("open");
        (outside, inside, ws)
    }

    #[test]
    fn reads_inside_the_workspace() {
        let (_o, _i, ws) = fixture();
        assert_eq!(ws.read_text("hello.txt", 100).expect("read").0, "hello");
        let absolute = ws.root().join("hello.txt");
        let absolute = absolute.to_str().expect("utf8");
        assert_eq!(ws.read_text(absolute, 100).expect("read").0, "hello");
    }

    #[test]
    fn attack_paths_are_refused() {
        let (outside, inside, ws) = fixture();
        let secret = outside.path().join("secret.txt");
        symlink(&secret, inside.path().join("link_abs")).expect("symlink");
        symlink(
            "../../../../../../../etc/passwd",
            inside.path().join("link_rel"),
        )
        .expect("symlink");
        symlink("/proc/self/root/etc/passwd", inside.path().join("magic")).expect("symlink");
        let secret_str = secret.to_str().expect("utf8").to_string();
        let dotdot = format!(
            "../{}/secret.txt",
            outside
                .path()
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("x")
        );
        for (path, what) in [
            (secret_str.as_str(), "absolute path outside"),
            ("/etc/passwd", "absolute system path"),
            (dotdot.as_str(), "dot-dot to a sibling"),
            ("../../../../../../etc/passwd", "deep dot-dot"),
            ("link_abs", "absolute symlink out"),
            ("link_rel", "relative symlink out"),
            ("magic", "proc magic link"),
            ("", "empty"),
        ] {
            let result = ws.read_text(path, 1000);
            match result {
                Ok((text, _)) => panic!("{what}: read succeeded with {text:?}"),
                Err(err) => assert!(!err.to_string().contains("TOP SECRET"), "{what}"),
            }
        }
    }

    #[test]
    fn writes_never_go_through_hard_links_or_fifos() {
        let (outside, inside, ws) = fixture();
        let secret = outside.path().join("secret.txt");
        std::fs::hard_link(&secret, inside.path().join("linked")).expect("link");
        assert!(matches!(
            ws.write("linked", b"pwned", false),
            Err(WorkspaceError::HardLinked(_))
        ));
        assert!(matches!(
            ws.write("linked", b"pwned", true),
            Err(WorkspaceError::HardLinked(_))
        ));
        assert_eq!(
            std::fs::read_to_string(&secret).expect("read"),
            "TOP SECRET"
        );
        nix::unistd::mkfifo(&inside.path().join("fifo"), Mode::from_bits_truncate(0o666))
            .expect("mkfifo");
        // No reader: a blocking open would hang for good.
        // It is refused for what it is, with or without a reader waiting.
        assert!(matches!(
            ws.write("fifo", b"x", false),
            Err(WorkspaceError::NotRegular(_))
        ));
        let fifo = inside.path().join("fifo");
        let reader = std::thread::spawn(move || {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(fifo)
                .expect("reader")
        });
        let held = reader.join().expect("reader thread");
        assert!(matches!(
            ws.write("fifo", b"x", true),
            Err(WorkspaceError::NotRegular(_))
        ));
        drop(held);
        // Health: ordinary writes and appends still work.
        ws.write("fresh.txt", b"a", false).expect("write");
        ws.write("fresh.txt", b"b", true).expect("append");
        ws.write("hello.txt", b"new", false).expect("overwrite");
        assert_eq!(
            std::fs::read_to_string(inside.path().join("fresh.txt")).expect("read"),
            "ab"
        );
        assert_eq!(
            std::fs::read_to_string(inside.path().join("hello.txt")).expect("read"),
            "new"
        );
    }

    #[test]
    fn writes_never_follow_symlinks_even_inside() {
        let (outside, inside, ws) = fixture();
        symlink(outside.path().join("secret.txt"), inside.path().join("out")).expect("symlink");
        symlink("hello.txt", inside.path().join("in")).expect("symlink");
        assert!(matches!(
            ws.write("out", b"pwned", false),
            Err(WorkspaceError::Symlink(_))
        ));
        assert!(matches!(
            ws.write("in", b"pwned", false),
            Err(WorkspaceError::Symlink(_))
        ));
        assert!(ws.write("../escape.txt", b"x", false).is_err());
        assert_eq!(
            std::fs::read_to_string(outside.path().join("secret.txt")).expect("read"),
            "TOP SECRET"
        );
        assert_eq!(
            std::fs::read_to_string(inside.path().join("hello.txt")).expect("read"),
            "hello"
        );
        assert!(!outside
            .path()
            .parent()
            .map(|p| p.join("escape.txt").exists())
            .unwrap_or(false));
    }

    #[test]
    fn write_creates_parents_and_appends() {
        let (_o, inside, ws) = fixture();
        ws.write("a/b/c.txt", b"one", false).expect("write");
        ws.write("a/b/c.txt", b"two", true).expect("append");
        assert_eq!(
            std::fs::read_to_string(inside.path().join("a/b/c.txt")).expect("read"),
            "onetwo"
        );
    }

    #[test]
    fn a_root_runtime_gives_new_files_to_the_workspace_owner() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            return; // Only a root runtime changes ownership; CI runs as root.
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::chown(dir.path(), Some(4242), Some(4243)).expect("chown");
        let ws = Workspace::open(dir.path()).expect("open");
        ws.write("sub/file.txt", b"x", false).expect("write");
        for path in ["sub", "sub/file.txt"] {
            let meta = std::fs::metadata(dir.path().join(path)).expect("metadata");
            assert_eq!((meta.uid(), meta.gid()), (4242, 4243), "{path}");
        }
    }

    #[test]
    fn walks_do_not_descend_through_symlinked_dirs() {
        let (outside, inside, ws) = fixture();
        symlink(outside.path(), inside.path().join("outdir")).expect("symlink");
        std::fs::create_dir(inside.path().join("sub")).expect("mkdir");
        std::fs::write(inside.path().join("sub/x.txt"), "x").expect("write");
        let mut seen = Vec::new();
        ws.walk_files(".", &mut |path, _| {
            seen.push(path.display().to_string());
            true
        })
        .expect("walk");
        assert_eq!(seen, vec!["hello.txt", "sub/x.txt"]);
        let listing = ws.list_dir(".").expect("list");
        let kinds: Vec<_> = listing.iter().map(|e| (e.name.as_str(), e.kind)).collect();
        assert_eq!(
            kinds,
            vec![("hello.txt", "file"), ("outdir", "symlink"), ("sub", "dir")]
        );
    }
}
