//! What the runtime and the sandbox helper say to each other.
//!
//! The runtime (multi-threaded, possibly root) never restricts itself. It
//! starts the small `stack-sandbox-exec` helper as a *zygote* with a
//! [`ZygoteSpec`] in its environment and one end of a `SOCK_SEQPACKET`
//! socket pair on fd [`CONTROL_FD`]. Over that socket it asks for spares
//! ([`ToZygote`]) and receives them ([`FromZygote`]): each spare is a socket
//! to a process that waits for one call, plus a pidfd for the call's init.
//! A call is one [`CallSpec`] packet to the spare (carrying stdin, stdout
//! and stderr as `SCM_RIGHTS`) and one [`CallReport`] back; the zygote is
//! not on a call's path at all.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Name of the environment variable that carries the zygote's JSON spec.
pub(crate) const ZYGOTE_ENV: &str = "STACK_SANDBOX_ZYGOTE";

/// The helper's end of the control socket.
pub(crate) const CONTROL_FD: i32 = 3;

/// Largest packet either side sends (a call's spec is a few KiB).
pub(crate) const MAX_PACKET: usize = 256 * 1024;

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
    /// A private network namespace with only a loopback interface, where
    /// each call binds a listening socket for its egress proxy and may
    /// connect to that one port (a policy's network allowlist; see
    /// [`Network::Allowlist`](super::Network::Allowlist)).
    Proxied,
}

/// Resource limits for one sandboxed call. Every one is bounded by
/// default: 10 s wall and 10 s CPU, 512 MiB memory (2 GiB address space),
/// 64 processes, 64 MiB per file, 256 open files, 1 MiB of stdout and of
/// stderr, and [`DiskBudget::default`].
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
    /// What one call may add to the workspace and its private tmp, in
    /// bytes and in names (see [`DiskBudget`]); `None`: unbounded (the
    /// call writes to the workspace directly).
    #[serde(default)]
    pub disk: Option<DiskBudget>,
}

/// What one call may add to the workspace and its private tmp together:
/// its writes land in a tmpfs of this size (an overlay's upper layer over
/// the workspace, and the tmp dir), written back to the workspace when the
/// call ends (see `disk`). Past either bound, writes fail with `ENOSPC`
/// and the call reports [`Limit::Disk`](stack_types::Limit::Disk).
/// Default: 256 MiB and 20,000 names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DiskBudget {
    /// Bytes of file data (tmpfs pages: each file rounds up to a page).
    pub bytes: u64,
    /// Names: files, folders, links (every hard link counts), and the
    /// marks that record a deleted name until it is written back.
    pub files: u64,
}

impl Default for DiskBudget {
    fn default() -> Self {
        DiskBudget {
            bytes: 256 << 20,
            files: 20_000,
        }
    }
}

/// What a call with a [`DiskBudget`] used of it, and how writing it back
/// went (its init's report).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUse {
    /// Bytes of the budget in use when the call ended.
    pub bytes: u64,
    /// Names of the budget in use when the call ended.
    pub files: u64,
    /// The byte budget ran out (less than a page was left).
    pub bytes_full: bool,
    /// The name budget ran out.
    pub files_full: bool,
    /// Changes that could not be written back, one line each (a path
    /// and why); at most a few dozen are kept.
    pub not_written_back: Vec<String>,
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
            disk: Some(DiskBudget::default()),
        }
    }
}

/// What a zygote is set up with once: identity, namespaces, cgroup.
/// Serialized as JSON into [`ZYGOTE_ENV`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ZygoteSpec {
    /// Uid and gid to run as, outside the user namespace (never 0).
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// Network reach; fixed for the zygote's namespace.
    pub network: NetworkMode,
    /// The workspace (canonical): read-write for every call of the zygote.
    pub workspace: PathBuf,
    /// The workspace is root's: the zygote, while still root, clones it
    /// with root's ids mapped to `uid`/`gid` and attaches the clone in its
    /// own mount namespace (see `share`), instead of binding it.
    pub shares_root_workspace: bool,
    /// Paths inside the workspace (canonical, existing when the zygote was
    /// started) that calls may not change: bound read-only, or hidden, over
    /// the workspace's own in the zygote's mount namespace.
    pub protected: Vec<ProtectedPath>,
    /// Size of the zygote's private `/tmp` (a tmpfs in its own mount
    /// namespace, where each call's tmp dir is made); its pages are charged
    /// to the memory cgroup of whoever writes them.
    pub tmp_bytes: u64,
    /// Each call's disk budget: its init mounts a tmpfs of this size as
    /// the upper layer of an overlay over the workspace, and as its tmp
    /// dir, and writes it back when the call ends (see `disk`). `None`:
    /// calls write to the workspace directly.
    #[serde(default)]
    pub disk: Option<DiskBudget>,
    /// The landlock ABI the calls use at most (the runtime's choice: the
    /// kernel's, or lower to give a lower tier).
    pub landlock_abi: i32,
    /// `cgroup.procs` files the zygote joins before dropping privileges;
    /// every call it forks inherits them.
    pub cgroup_procs: Vec<PathBuf>,
    /// Read-only paths every call gets (system dirs and files).
    pub read_only: Vec<PathBuf>,
    /// Read-only device files (`/dev/urandom`).
    pub read_only_files: Vec<PathBuf>,
    /// Read-write device files (`/dev/null`).
    pub read_write_files: Vec<PathBuf>,
}

/// How a protected workspace path looks to sandboxed code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProtectedMode {
    /// Readable, not writable (`.git`: tools may read history, code may
    /// not plant hooks or config).
    ReadOnly,
    /// Neither readable nor writable (`.env`, `.ssh`: secrets).
    Hidden,
}

/// One protected path of a zygote.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct ProtectedPath {
    /// Absolute and canonical, inside the workspace.
    pub path: PathBuf,
    /// Read-only or hidden.
    pub mode: ProtectedMode,
    /// Its device and inode when the runtime looked: the zygote binds it
    /// only if it is still that object, and a replaced one gets a new
    /// zygote (the pair is part of the zygote's key).
    pub object: (u64, u64),
}

/// Everything one call needs; sent to the spare with the call's stdio (and
/// its code, as a sealed memfd). The target builds its environment itself
/// (see `sandbox_environment`): nothing of it comes from outside.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CallSpec {
    /// Program (absolute path) and its arguments.
    pub argv: Vec<String>,
    /// The name of the file (in the call's private tmp dir) the target
    /// writes the code it was sent to, and appends to `argv`; the code
    /// comes as a fourth descriptor. A plain file name, never a path.
    pub code_file: Option<String>,
    /// Read-only paths of this call, on top of the zygote's (the
    /// interpreter's prefix, policy extras).
    pub read_only: Vec<PathBuf>,
    /// Limits.
    pub limits: ResourceLimits,
    /// Landlock ABI the policy needs at least (fail closed below it).
    pub min_landlock_abi: i32,
    /// Variables added to the fixed environment (a service's allow-listed
    /// ones; the runtime checked that none replaces a fixed one).
    #[serde(default)]
    pub env: Vec<(String, String)>,
}

/// Runtime → spare, before its [`CallSpec`]: a call is coming; wait for it
/// awake (see `zygote::run_target`).
pub(crate) const WAKE_UP: &[u8] = b"wake";

/// Runtime → zygote.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToZygote {
    /// Make one more spare and hand it over.
    Spawn,
}

/// Zygote → runtime.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FromZygote {
    /// The zygote is confined and waiting for requests.
    Ready,
    /// The zygote could not confine itself; it exits after this.
    SetupFailed {
        /// What failed.
        message: String,
    },
    /// A spare, ready for one call: the packet carries the socket its target
    /// waits on and a pidfd for its init. Nothing else: the runtime acts on
    /// no path or claim of the zygote's (which runs as the sandbox's uid),
    /// and checks that the pidfd names a child of its own zygote.
    Spare,
    /// A spare could not be made.
    SpawnFailed {
        /// What failed.
        message: String,
    },
}

/// A call's init or target → runtime, on the spare's socket.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum CallReport {
    /// A [`NetworkMode::Proxied`] call's target, before it confines itself:
    /// the packet carries a TCP socket listening on `127.0.0.1:port` in the
    /// call's network namespace, for the runtime's egress proxy to serve.
    /// The target closed its own copy; `HTTP_PROXY` and the rest name it.
    EgressListening {
        /// The port (landlock's one allowed TCP connect port).
        port: u16,
    },
    /// The target exited; its raw wait status.
    Exited {
        /// As `waitpid` gave it.
        status: i32,
        /// CPU time (user + system) the target used, in milliseconds.
        cpu_ms: u64,
        /// Other processes of the call were still alive; they die when the
        /// init exits, right after this report, and the runtime waits for
        /// that before it reports the call over.
        others_left: bool,
        /// With a disk budget: what the call used of it, and how writing
        /// its changes back went (done before this report).
        #[serde(default)]
        disk: Option<DiskUse>,
    },
    /// The target could not confine itself and did not run.
    SetupFailed {
        /// What failed.
        message: String,
    },
}
