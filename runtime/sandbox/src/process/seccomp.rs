//! The seccomp filters every sandboxed call runs under.
//!
//! Three filters, all defaulting to *allow* (a denylist: the sandbox must
//! run arbitrary interpreters), compiled once in the zygote:
//!
//! * the main denylist (`EPERM`), installed by the zygote on itself, so that
//!   every call inherits it, with (on x86-64) a filter before it that
//!   refuses every x32 system call, whose numbers the denylist's x86-64
//!   numbers would not match;
//! * the namespace and mount denylist (`EPERM`: `unshare`, `setns`,
//!   `clone` with any `CLONE_NEW*` flag, the `mount` family and the new
//!   mount API), installed by each call's target, because the zygote itself
//!   must create a PID namespace for every call, and each call's init a
//!   mount namespace with the call's overlay (see `disk`);
//! * `clone3` fails with `ENOSYS`, so libc falls back to `clone`, whose flags
//!   a filter can inspect (`clone3` passes them in memory), and so does
//!   `openat2` (its mode is in memory too; callers fall back to `openat`);
//!   installed by each call's target too.
//!
//! Denied: debugging and cross-process memory access (`ptrace`,
//! `process_vm_readv/writev`), kernel attack surface (`io_uring_*`, `bpf`,
//! `perf_event_open`, `userfaultfd`, keyrings), system administration
//! (`mount` family and the new mount API, `pivot_root`, `chroot`, `swapon`,
//! `reboot`, `kexec_*`, module loading, `acct`, `quotactl`, clock setting,
//! `syslog`, `iopl`/`ioperm`), setuid and setgid files (any mode with
//! `S_ISUID` or `S_ISGID` given to `chmod`, `fchmod`, `fchmodat(2)`,
//! `open`, `openat`, `creat` or `mknod(at)`: a file the call makes may be
//! run by another host user, and in a root-owned workspace it is root's on
//! disk), namespace escapes (`unshare`, `setns`, and
//! `clone` with any `CLONE_NEW*` flag), file-handle tricks
//! (`open_by_handle_at`), terminal injection (`ioctl(TIOCSTI)`) and, when
//! the network is `none`, `socket` for any family but `AF_UNIX` (with a
//! network allowlist, any but `AF_UNIX`, `AF_INET` and `AF_INET6`, and those
//! two only with TCP, UDP or their default protocol: no MPTCP or SMC, which
//! landlock's TCP rules do not cover).

use std::collections::BTreeMap;

use nix::libc;
use seccompiler::{
    apply_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::spec::NetworkMode;

/// Syscalls denied outright.
pub(crate) const DENIED_SYSCALLS: &[(&str, i64)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("reboot", libc::SYS_reboot),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("syslog", libc::SYS_syslog),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("fanotify_init", libc::SYS_fanotify_init),
    ("vhangup", libc::SYS_vhangup),
];

const NAMESPACE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
];

fn arch() -> Result<TargetArch, String> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| format!("unsupported architecture: {e}"))
}

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).map_err(|e| e.to_string())
}

/// A condition on the low 32 bits of an argument (an `int`).
fn dword(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(|e| e.to_string())
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, String> {
    SeccompRule::new(conditions).map_err(|e| e.to_string())
}

/// Syscalls that enter or create namespaces, denied outright (besides
/// `clone` with a `CLONE_NEW*` flag).
pub(crate) const NAMESPACE_SYSCALLS: &[(&str, i64)] =
    &[("unshare", libc::SYS_unshare), ("setns", libc::SYS_setns)];

/// The mount family, old API and new: denied to every call's target, by
/// the per-call filter, because each call's init mounts that call's
/// overlay and disk budget (see `disk`) before the target starts.
pub(crate) const MOUNT_SYSCALLS: &[(&str, i64)] = &[
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
];

fn errno_filter(rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch()?,
    )
    .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

/// Builds the filter that denies creating or entering namespaces and
/// mounting. The zygote needs `clone(CLONE_NEWPID)` for every spare, and
/// each spare's init mounts its call's overlay, so this one is installed
/// by each call's target.
pub(crate) fn namespace_denylist() -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, number) in NAMESPACE_SYSCALLS.iter().chain(MOUNT_SYSCALLS) {
        rules.insert(*number, Vec::new());
    }
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|flag| rule(vec![condition(0, SeccompCmpOp::MaskedEq(*flag), *flag)?]))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    errno_filter(rules, libc::EPERM)
}

/// Builds the `EPERM` denylist filter (everything but namespaces). The
/// zygote installs it on itself once; every call inherits it.
pub(crate) fn denylist(network: NetworkMode) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, number) in DENIED_SYSCALLS {
        rules.insert(*number, Vec::new());
    }
    rules.insert(
        libc::SYS_ioctl,
        vec![rule(vec![condition(
            1,
            SeccompCmpOp::MaskedEq(0xffff_ffff),
            libc::TIOCSTI,
        )?])?],
    );
    // Any family but unix refused outright without a network; with an
    // allowlist, IPv4 and IPv6 sockets, to reach the egress proxy on
    // loopback (landlock allows its one port), and unix ones; no netlink,
    // packet or other family. No socket pairs but unix ones in either.
    // No setuid or setgid file: whatever the call makes may be run by
    // another host user (a root-owned workspace's files are root's on disk,
    // see `share`), so a mode with either bit is refused wherever a mode is
    // given (open/openat/creat take one with O_CREAT or O_TMPFILE, and
    // `openat2`, whose mode is in memory, fails with ENOSYS instead).
    for (number, mode_arg, flags_arg) in MODE_SETTING_SYSCALLS {
        let mut with_bits = Vec::new();
        for bit in [libc::S_ISUID, libc::S_ISGID] {
            let mode = dword(
                *mode_arg,
                SeccompCmpOp::MaskedEq(u64::from(bit)),
                u64::from(bit),
            )?;
            match flags_arg {
                // The mode counts only when the call creates a file.
                Some(flags) => {
                    for creating in [libc::O_CREAT as u64, O_TMPFILE_BIT] {
                        with_bits.push(rule(vec![
                            dword(*flags, SeccompCmpOp::MaskedEq(creating), creating)?,
                            mode.clone(),
                        ])?);
                    }
                }
                None => with_bits.push(rule(vec![mode])?),
            }
        }
        rules.insert(*number, with_bits);
    }
    let not_unix = || rule(vec![condition(0, SeccompCmpOp::Ne, libc::AF_UNIX as u64)?]);
    if network == NetworkMode::None {
        rules.insert(libc::SYS_socket, vec![not_unix()?]);
    }
    if network == NetworkMode::Proxied {
        let other_family = rule(vec![
            condition(0, SeccompCmpOp::Ne, libc::AF_UNIX as u64)?,
            condition(0, SeccompCmpOp::Ne, libc::AF_INET as u64)?,
            condition(0, SeccompCmpOp::Ne, libc::AF_INET6 as u64)?,
        ])?;
        // IPv4 and IPv6 with their default protocol, TCP or UDP only:
        // landlock's TCP rules do not cover MPTCP or SMC sockets (landlock
        // erratum 1), which would connect to any loopback port. Compared
        // on the low 32 bits, as the kernel reads these `int` arguments,
        // so that high bits cannot make an `Eq` miss.
        let other_protocol = |family: i32| -> Result<SeccompRule, String> {
            rule(vec![
                dword(0, SeccompCmpOp::Eq, family as u64)?,
                dword(2, SeccompCmpOp::Ne, 0)?,
                dword(2, SeccompCmpOp::Ne, libc::IPPROTO_TCP as u64)?,
                dword(2, SeccompCmpOp::Ne, libc::IPPROTO_UDP as u64)?,
            ])
        };
        rules.insert(
            libc::SYS_socket,
            vec![
                other_family,
                other_protocol(libc::AF_INET)?,
                other_protocol(libc::AF_INET6)?,
            ],
        );
    }
    if matches!(network, NetworkMode::None | NetworkMode::Proxied) {
        rules.insert(libc::SYS_socketpair, vec![not_unix()?]);
    }
    errno_filter(rules, libc::EPERM)
}

/// Builds the filter that makes `clone3` look unimplemented.
/// System calls that set a file's mode: the argument that holds it, and
/// for the `open` family the argument with the flags (the mode counts only
/// with `O_CREAT` or `O_TMPFILE`). `fchmodat2` is 452 on every
/// architecture, as every system call added since 5.1.
const MODE_SETTING_SYSCALLS: &[(i64, u8, Option<u8>)] = &[
    (libc::SYS_fchmod, 1, None),
    (libc::SYS_fchmodat, 2, None),
    (452, 2, None),
    (libc::SYS_openat, 3, Some(2)),
    (libc::SYS_mknodat, 2, None),
    // The older calls, where the architecture still has them.
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_chmod, 1, None),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_open, 2, Some(1)),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_creat, 1, None),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_mknod, 1, None),
];

/// `__O_TMPFILE`, the bit of `O_TMPFILE` that is not `O_DIRECTORY`.
const O_TMPFILE_BIT: u64 = 0o20_000_000;

/// On x86-64, a filter that refuses every x32 system call (numbers with
/// bit 30 set), which the filters above, matching x86-64 numbers, would
/// otherwise let through on a kernel built with the x32 ABI. For any other
/// architecture value it allows (the main filter refuses a foreign
/// architecture).
#[cfg(target_arch = "x86_64")]
pub(crate) fn x32_refused() -> BpfProgram {
    use seccompiler::sock_filter;
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const JGE_K: u16 = 0x35;
    const RET_K: u16 = 0x06;
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        op(LD_W_ABS, 0, 0, 4),
        op(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        op(RET_K, 0, 0, RET_ALLOW),
        op(LD_W_ABS, 0, 0, 0),
        op(JGE_K, 0, 1, X32_SYSCALL_BIT),
        op(RET_K, 0, 0, RET_ERRNO | libc::EPERM as u32),
        op(RET_K, 0, 0, RET_ALLOW),
    ]
}

pub(crate) fn clone3_enosys() -> Result<BpfProgram, String> {
    let rules = BTreeMap::from([
        (libc::SYS_clone3, Vec::new()),
        (libc::SYS_openat2, Vec::new()),
    ]);
    errno_filter(rules, libc::ENOSYS)
}

/// The filters, compiled once in the zygote. The large denylist is
/// installed by the zygote on itself (every call inherits it); the two small
/// ones, which the zygote could not live with, by each call's target.
#[derive(Debug, Clone)]
pub(crate) struct Filters {
    /// x32 system calls refused (x86-64 only; empty elsewhere).
    x32: BpfProgram,
    deny: BpfProgram,
    clone3: BpfProgram,
    namespaces: BpfProgram,
}

impl Filters {
    /// Compiles the filters for `network`.
    pub(crate) fn build(network: NetworkMode) -> Result<Filters, String> {
        #[cfg(target_arch = "x86_64")]
        let x32 = x32_refused();
        #[cfg(not(target_arch = "x86_64"))]
        let x32 = BpfProgram::new();
        Ok(Filters {
            x32,
            deny: denylist(network)?,
            clone3: clone3_enosys()?,
            namespaces: namespace_denylist()?,
        })
    }

    /// Installs the shared denylist on the calling (zygote) thread.
    /// `no_new_privs` must be set.
    pub(crate) fn install_shared(&self) -> Result<(), String> {
        if !self.x32.is_empty() {
            apply_filter(&self.x32).map_err(|e| e.to_string())?;
        }
        apply_filter(&self.deny).map_err(|e| e.to_string())
    }

    /// Installs the per-call filters on the calling (target) thread.
    pub(crate) fn install_per_call(&self) -> Result<(), String> {
        apply_filter(&self.clone3).map_err(|e| e.to_string())?;
        apply_filter(&self.namespaces).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_for_every_network_mode() {
        for mode in [
            NetworkMode::None,
            NetworkMode::Loopback,
            NetworkMode::Full,
            NetworkMode::Proxied,
        ] {
            assert!(!denylist(mode).expect("denylist").is_empty());
        }
        assert!(!clone3_enosys().expect("clone3").is_empty());
        assert!(!namespace_denylist().expect("namespaces").is_empty());
    }
}
