//! The identity a WASI guest's filesystem calls are made with.
//!
//! # Threat model
//!
//! wasmtime runs in the runtime's own process. When that is root, every
//! `openat` the guest causes would be checked as root's: a guest could read
//! a root-only file in a user's workspace and create root-owned files there
//! (red-team finding L3). The guest must act as the process sandbox's code
//! would: as the workspace owner, or the dedicated sandbox uid for a
//! root-owned workspace (see `sandbox_identity` in the process sandbox).
//!
//! Linux keeps credentials per thread, and the raw `setfsuid`, `setfsgid`
//! and `setgroups` system calls (unlike glibc's wrappers, which change
//! every thread) change only the calling one. Moving the filesystem uid
//! away from 0 also drops the filesystem capabilities (`CAP_DAC_OVERRIDE`,
//! `CAP_FOWNER`, …) from that thread's effective set. The guest runs on one
//! thread, and its filesystem calls run on that same thread
//! (`allow_blocking_current_thread`), so [`ActAs`] puts that thread under
//! the sandbox's identity for as long as the guest runs, and restores it
//! after, on drop, panics included. A runtime that is not root needs
//! nothing: its guests already act as its own user.

use std::path::Path;

use nix::libc;

/// While alive, this thread's filesystem identity is the sandbox's.
#[derive(Debug)]
pub(crate) struct ActAs {
    restore: Option<Saved>,
}

#[derive(Debug)]
struct Saved {
    groups: Vec<libc::gid_t>,
}

impl ActAs {
    /// Takes the identity sandboxed code has in `workspace` (blocking: the
    /// first call for a root-owned workspace shares it through ACLs).
    pub(crate) fn sandbox_of(workspace: &Path) -> Result<ActAs, String> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(ActAs { restore: None });
        }
        let canonical = std::fs::canonicalize(workspace)
            .map_err(|e| format!("workspace {}: {e}", workspace.display()))?;
        let (uid, gid) = crate::sandbox::process::sandbox_identity(&canonical)
            .map_err(|e| format!("the WASI sandbox's identity: {e}"))?;
        Self::become_(uid, gid)
    }

    fn become_(uid: u32, gid: u32) -> Result<ActAs, String> {
        let groups = nix::unistd::getgroups()
            .map_err(|e| format!("getgroups: {e}"))?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        let acting = ActAs {
            restore: Some(Saved { groups }),
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
}

impl Drop for ActAs {
    fn drop(&mut self) {
        let Some(saved) = self.restore.take() else {
            return;
        };
        // SAFETY: as in `become_`; back to root's own credentials.
        unsafe {
            libc::syscall(libc::SYS_setfsuid, 0u32);
            libc::syscall(libc::SYS_setfsgid, 0u32);
            libc::syscall(
                libc::SYS_setgroups,
                saved.groups.len(),
                saved.groups.as_ptr(),
            );
        }
    }
}
