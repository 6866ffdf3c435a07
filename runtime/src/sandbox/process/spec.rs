//! The instructions the runtime hands to the sandbox helper.
//!
//! The runtime (multi-threaded, possibly root) never restricts itself. It
//! spawns the small `stack-sandbox-exec` helper with a [`HelperSpec`] in its
//! environment; the fresh, single-threaded helper applies every restriction
//! to itself in a fixed order and then `execve`s the target.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Name of the environment variable that carries the JSON spec.
pub(crate) const SPEC_ENV: &str = "STACK_SANDBOX_SPEC";

/// File descriptor on which the helper reports a setup failure before exec.
pub(crate) const STATUS_FD: i32 = 3;

/// Network reach of the sandboxed process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// No network at all: an empty network namespace, landlock TCP rules,
    /// and a seccomp filter allowing only `AF_UNIX` sockets.
    #[default]
    None,
    /// A private network namespace with only a loopback interface.
    Loopback,
    /// The host's network.
    Full,
}

/// Resource limits for one sandboxed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimits {
    /// Wall-clock timeout in milliseconds; the whole process tree dies at it.
    pub wall_ms: u64,
    /// CPU seconds (`RLIMIT_CPU`).
    pub cpu_seconds: u64,
    /// Address space in bytes (`RLIMIT_AS`).
    pub address_space_bytes: u64,
    /// Memory in bytes for the cgroup, where a writable one exists.
    pub memory_bytes: u64,
    /// Processes (`RLIMIT_NPROC` inside the user namespace; cgroup `pids.max`).
    pub processes: u64,
    /// Largest file the process may write (`RLIMIT_FSIZE`).
    pub file_size_bytes: u64,
    /// Open file descriptors (`RLIMIT_NOFILE`).
    pub open_files: u64,
    /// Cap on captured stdout and on captured stderr, each.
    pub output_bytes: usize,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        ResourceLimits {
            wall_ms: 10_000,
            cpu_seconds: 10,
            address_space_bytes: 2 << 30,
            memory_bytes: 512 << 20,
            processes: 64,
            file_size_bytes: 64 << 20,
            open_files: 256,
            output_bytes: 1 << 20,
        }
    }
}

/// Everything the helper needs; serialized as JSON into [`SPEC_ENV`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HelperSpec {
    /// Program (absolute path) and its arguments.
    pub argv: Vec<String>,
    /// The complete environment of the target.
    pub env: Vec<(String, String)>,
    /// Working directory (the workspace).
    pub cwd: PathBuf,
    /// Read-write paths (workspace, private tmp).
    pub read_write: Vec<PathBuf>,
    /// Read-only paths (system dirs, interpreter prefix, policy extras).
    pub read_only: Vec<PathBuf>,
    /// Read-only device files (`/dev/urandom`).
    pub read_only_files: Vec<PathBuf>,
    /// Read-write device files (`/dev/null`).
    pub read_write_files: Vec<PathBuf>,
    /// Network reach.
    pub network: NetworkMode,
    /// Limits.
    pub limits: ResourceLimits,
    /// Uid and gid to run as, outside the user namespace (never 0).
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// `cgroup.procs` files the helper joins before dropping privileges.
    pub cgroup_procs: Vec<PathBuf>,
    /// Landlock ABI the policy needs at least (fail closed below it).
    pub min_landlock_abi: i32,
}
