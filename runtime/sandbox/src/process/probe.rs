//! What the kernel offers the process sandbox, probed once.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::libc;
use serde::Serialize;

use super::cgroup::CgroupLayout;

/// The kernel features the process sandbox relies on.
#[derive(Debug, Clone, Serialize)]
pub struct KernelProbe {
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// Landlock ABI version, `None` when landlock is off.
    pub landlock_abi: Option<i32>,
    /// Whether new user namespaces may be created (`user.max_user_namespaces`).
    pub user_namespaces: bool,
    /// Whether seccomp filters are available.
    pub seccomp_filter: bool,
    /// Where per-call cgroups can be made, when a writable hierarchy exists.
    pub cgroup: Option<CgroupLayout>,
}

/// One guarantee and whether this kernel gives it.
#[derive(Debug, Clone, Serialize)]
pub struct Guarantee {
    /// What is promised.
    pub name: &'static str,
    /// Whether it holds here.
    pub holds: bool,
    /// What provides it, or what is missing.
    pub detail: String,
}

impl KernelProbe {
    /// Probes the running kernel (cached after the first call).
    pub fn get() -> &'static KernelProbe {
        static PROBE: OnceLock<KernelProbe> = OnceLock::new();
        PROBE.get_or_init(KernelProbe::probe)
    }

    fn probe() -> KernelProbe {
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let user_namespaces = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0);
        let seccomp_filter = Path::new("/proc/sys/kernel/seccomp/actions_avail").exists();
        KernelProbe {
            kernel,
            landlock_abi: landlock_abi(),
            user_namespaces,
            seccomp_filter,
            cgroup: CgroupLayout::detect(),
        }
    }

    /// The guarantees of the default policy, and whether each holds.
    pub fn guarantees(&self) -> Vec<Guarantee> {
        let abi = self.landlock_abi.unwrap_or(0);
        let landlock = |min: i32, what: &str| {
            if abi >= min {
                format!("landlock ABI {abi} (needs {min})")
            } else {
                format!(
                    "missing: {what} needs landlock ABI {min}, kernel has {}",
                    if abi == 0 {
                        "none".into()
                    } else {
                        abi.to_string()
                    }
                )
            }
        };
        vec![
            Guarantee {
                name: "filesystem confined (reads and writes)",
                holds: abi >= 1,
                detail: landlock(1, "filesystem rules"),
            },
            Guarantee {
                name: "TCP bind/connect denied by landlock",
                holds: abi >= 4,
                detail: landlock(4, "TCP rules"),
            },
            Guarantee {
                name: "signals and abstract sockets scoped",
                holds: abi >= 6,
                detail: landlock(6, "scoping"),
            },
            Guarantee {
                name: "no network (network namespace), never root, PID namespace",
                holds: self.user_namespaces,
                detail: if self.user_namespaces {
                    "user namespaces available".into()
                } else {
                    "missing: user namespaces are disabled (user.max_user_namespaces = 0)".into()
                },
            },
            Guarantee {
                name: "syscall denylist (seccomp)",
                holds: self.seccomp_filter,
                detail: if self.seccomp_filter {
                    "seccomp filters available".into()
                } else {
                    "missing: seccomp filter support".into()
                },
            },
            Guarantee {
                name: "memory and process-count cgroup limits",
                holds: self.cgroup.is_some(),
                detail: match &self.cgroup {
                    Some(layout) => layout.describe(),
                    None => "no writable cgroup; rlimits still apply".into(),
                },
            },
        ]
    }

    /// Why the default guarantees cannot be given here, if they cannot.
    /// The cgroup is optional; everything else is required.
    pub fn missing_requirements(&self, min_landlock_abi: i32) -> Option<String> {
        let mut missing = Vec::new();
        match self.landlock_abi {
            None => missing.push("landlock (Linux 5.13+, enabled in the LSM list)".to_string()),
            Some(abi) if abi < min_landlock_abi => missing.push(format!(
                "landlock ABI {min_landlock_abi} (kernel has {abi})"
            )),
            Some(_) => {}
        }
        if !self.user_namespaces {
            missing.push("unprivileged user namespaces (user.max_user_namespaces > 0)".to_string());
        }
        if !self.seccomp_filter {
            missing.push("seccomp filters".to_string());
        }
        (!missing.is_empty()).then(|| format!("the process sandbox needs {}", missing.join(", ")))
    }

    /// Why a network allowlist (egress by name through the runtime's
    /// proxy) cannot be enforced here, if it cannot: it needs landlock's
    /// TCP port rules (ABI 4, Linux 6.7) to keep sandboxed code off every
    /// port but the proxy's, and a network namespace of its own (which the
    /// user namespace gives).
    pub fn egress_filtering_missing(&self) -> Option<String> {
        let mut missing = Vec::new();
        match self.landlock_abi {
            Some(abi) if abi >= 4 => {}
            Some(abi) => missing.push(format!(
                "landlock ABI 4 for TCP port rules (kernel has {abi}; Linux 6.7+)"
            )),
            None => missing.push("landlock ABI 4 for TCP port rules (no landlock)".to_string()),
        }
        if !self.user_namespaces {
            missing.push("unprivileged user and network namespaces".to_string());
        }
        (!missing.is_empty()).then(|| {
            format!(
                "a network allowlist needs {}; without them the egress proxy could be bypassed, so the call is refused",
                missing.join(", ")
            )
        })
    }
}

/// The landlock ABI version of the running kernel.
pub(crate) fn landlock_abi() -> Option<i32> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: the documented version query: null attr, size 0, version flag.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    (version > 0).then_some(version as i32)
}

/// Directories a program needs to run, for `program` at an absolute path.
pub(crate) fn prefix_of(program: &Path) -> Option<PathBuf> {
    let real = std::fs::canonicalize(program).ok()?;
    let bin = real.parent()?;
    Some(if bin.file_name().is_some_and(|n| n == "bin") {
        bin.parent()?.to_path_buf()
    } else {
        bin.to_path_buf()
    })
}
