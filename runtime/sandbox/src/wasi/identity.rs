//! Who a WASI guest acts as, and what of the workspace it may change.
//!
//! # Threat model
//!
//! wasmtime runs in the runtime's own process. When that is root, every
//! `openat` the guest causes would be checked as root's: a guest could read
//! a root-only file in a user's workspace and create root-owned files there
//! (red-team finding L3). And the guest's preopen is the whole workspace,
//! `.git` included, so it could plant a hook that the user's next
//! `git status` runs outside any sandbox (H3). The guest must act as the
//! process sandbox's code would: as the workspace owner (or the dedicated
//! sandbox uid for a root-owned workspace), with the same protected paths.
//!
//! Linux keeps credentials, the filesystem context and the mount namespace
//! per thread. A guest runs on a thread of its own, and its filesystem
//! calls run on that same thread (`allow_blocking_current_thread`), so for a
//! root runtime [`GuestThread::enter`], on that thread and before the
//! workspace is preopened:
//!
//! 1. unshares the thread's filesystem context and mount namespace (no
//!    propagation back to the host); for a root-owned workspace, attaches
//!    its idmapped clone over it (see `process::share`: root's files are
//!    the sandbox uid's there, and nothing on disk changes); covers the
//!    workspace's existing protected paths with read-only binds of
//!    themselves, or hides them under empty read-only stand-ins, through
//!    descriptors only (see `process::mounts::cover_protected`);
//! 2. takes the sandbox's identity with the raw per-thread `setgroups`,
//!    `setfsgid` and `setfsuid` system calls (glibc's wrappers would change
//!    every thread); moving the filesystem uid off 0 also drops the
//!    filesystem capabilities (`CAP_DAC_OVERRIDE`, `CAP_FOWNER`, …).
//!
//! The thread is never reused: its namespace goes with it, and the
//! identity is restored on drop all the same. A protected path that a call
//! creates or replaces is moved aside after it in every case (see the
//! process sandbox's `protect`).
//!
//! A runtime that is not root cannot make a mount namespace for one thread
//! (that needs `CAP_SYS_ADMIN`; a user namespace cannot be entered by one
//! thread of a multi-threaded process). Its guests already act as its own
//! user; where the workspace holds protected paths they run in the WASI
//! helper (see [`super::helper`]), a process that made a user namespace of
//! its own while single-threaded, and whose guest threads then bind the
//! protected paths exactly as above (step 1), and, instead of step 2, drop
//! every capability of the thread (the namespace's, which binding needed).

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::libc;
use nix::mount::{mount, MsFlags};

use crate::process::mounts::cover_protected;
use crate::process::protect::survey;
use crate::process::share::SharedWorkspace;
use crate::process::ProtectedMode;

/// While alive, the calling thread is a confined guest thread.
#[derive(Debug)]
pub(crate) struct GuestThread {
    restore: Option<Vec<libc::gid_t>>,
}

impl GuestThread {
    /// Confines the calling thread for a guest in `workspace` (see the
    /// module docs). Call it on a thread of the guest's own, before the
    /// workspace is preopened. Blocking.
    pub(crate) fn enter(
        workspace: &Path,
        protected: &[(PathBuf, ProtectedMode)],
    ) -> Result<GuestThread, String> {
        let root = nix::unistd::geteuid().is_root();
        if !root && !super::helper::in_helper() {
            // Protected paths present: `helper::needed` sent the guest to
            // the helper. None: there is nothing to bind.
            return Ok(GuestThread { restore: None });
        }
        let canonical = std::fs::canonicalize(workspace)
            .map_err(|e| format!("workspace {}: {e}", workspace.display()))?;
        if !root {
            // The WASI helper: it already acts as the runtime's user, and
            // holds the capabilities of a user namespace of its own, which
            // binding needs and the guest must not keep.
            protect(&canonical, protected, false)?;
            drop_thread_capabilities()?;
            return Ok(GuestThread { restore: None });
        }
        let identity = crate::process::sandbox_identity(&canonical)
            .map_err(|e| format!("the WASI sandbox's identity: {e}"))?;
        if identity.shares_root_workspace {
            // Cloned and idmapped as root, then attached over the
            // workspace in this thread's own namespace (see
            // `process::share`): nothing on disk changes.
            let shared = SharedWorkspace::prepare(&canonical, identity.uid, identity.gid)?;
            private_namespace()?;
            shared.attach(&canonical)?;
        }
        protect(&canonical, protected, identity.shares_root_workspace)?;
        act_as(identity.uid, identity.gid)
    }
}

/// Gives the calling thread a filesystem context and mount namespace of
/// its own, into which no mount propagates back to the host.
fn private_namespace() -> Result<(), String> {
    let err = |what: &str, e: nix::Error| format!("a private namespace for WASI: {what}: {e}");
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS | nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| err("unshare", e))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| err("no propagation", e))
}

/// Binds the existing protected paths of `workspace` read-only (or hides
/// them) in a mount namespace of this thread's own (`in_private_namespace`:
/// the thread has one already).
fn protect(
    workspace: &Path,
    protected: &[(PathBuf, ProtectedMode)],
    in_private_namespace: bool,
) -> Result<(), String> {
    let (mut present, _) = survey(workspace, protected);
    if present.is_empty() {
        return Ok(());
    }
    if !in_private_namespace {
        private_namespace()?;
    }
    // Parents first (`.git` before `.git/hooks`), each covered through
    // descriptors only (see `cover_protected`).
    present.sort_by_key(|entry| entry.path.components().count());
    let root = nix::fcntl::open(
        workspace,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("protecting the workspace for WASI: {e}"))?;
    for entry in present {
        let relative = entry.path.strip_prefix(workspace).map_err(|_| {
            format!(
                "protecting the workspace for WASI: {} is outside it",
                entry.path.display()
            )
        })?;
        cover_protected(root.as_fd(), relative, entry.mode, entry.object)
            .map_err(|e| format!("protecting the workspace for WASI: {e}"))?;
    }
    Ok(())
}

/// Drops every capability of the calling thread, and only of it (`capset`
/// acts on its caller). In the WASI helper the user namespace's
/// capabilities bound the protected paths; the guest's file calls must then
/// be checked as the plain user's, without `CAP_DAC_OVERRIDE` over what
/// the namespace owns (such as a hidden file's mode-000 stand-in).
fn drop_thread_capabilities() -> Result<(), String> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let none = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset with a version-3 header for the calling thread and the
    // two data words version 3 requires; the kernel only reads them.
    let rc = unsafe { libc::syscall(libc::SYS_capset, std::ptr::from_ref(&header), none.as_ptr()) };
    if rc != 0 {
        return Err(format!(
            "dropping the guest thread's capabilities: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Takes `uid`/`gid` (and only `gid` as a group) for this thread's file
/// access.
fn act_as(uid: u32, gid: u32) -> Result<GuestThread, String> {
    let groups = nix::unistd::getgroups()
        .map_err(|e| format!("getgroups: {e}"))?
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    let acting = GuestThread {
        restore: Some(groups),
    };
    let one = [gid];
    // SAFETY: raw per-thread setgroups with a valid one-element array,
    // which the kernel copies before returning.
    if unsafe { libc::syscall(libc::SYS_setgroups, 1usize, one.as_ptr()) } != 0 {
        return Err(format!("setgroups: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: per-thread setfsgid/setfsuid with plain integers.
    unsafe {
        libc::syscall(libc::SYS_setfsgid, gid);
        libc::syscall(libc::SYS_setfsuid, uid);
    }
    // setfsuid reports the previous value, never an error: read back.
    // SAFETY: setfsuid(-1) changes nothing and returns the current one.
    let now = unsafe { libc::syscall(libc::SYS_setfsuid, u32::MAX) };
    if now != i64::from(uid) {
        return Err(format!(
            "could not take uid {uid} for the guest's file access"
        ));
    }
    Ok(acting)
}

impl Drop for GuestThread {
    fn drop(&mut self) {
        let Some(groups) = self.restore.take() else {
            return;
        };
        // SAFETY: as in `act_as`; back to root's own credentials.
        unsafe {
            libc::syscall(libc::SYS_setfsuid, 0u32);
            libc::syscall(libc::SYS_setfsgid, 0u32);
            libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr());
        }
    }
}
