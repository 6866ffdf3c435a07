//! What the kernel offers the process sandbox, probed once.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::libc;
use serde::Serialize;

use super::cgroup::CgroupLayout;

/// Forces the landlock ABI the process sandbox uses down to this number
/// (`0`: as if the kernel had no landlock): to see what an older kernel
/// gives (`agent doctor`), and to test each tier on a new one. It can only
/// lower the ABI, never raise it.
pub const FORCE_LANDLOCK_ABI_ENV: &str = "STACK_RUNTIME_LANDLOCK_ABI";

/// What the process sandbox gives at a landlock ABI: every guarantee holds
/// at every tier it runs at, from landlock itself or from a compensating
/// control (see [`KernelProbe::guarantees`]); below [`Tier::Minimal`] it
/// does not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// ABI 6+ (Linux 6.12+): landlock confines the filesystem, TCP,
    /// signals and abstract sockets.
    Full,
    /// ABI 4–5 (Linux 6.7–6.11; Ubuntu 24.04 has 4): no landlock scoping;
    /// the call's own PID namespace keeps signals in, its own network
    /// namespace keeps abstract sockets in, so `network = "full"` is
    /// refused.
    NoScoping,
    /// ABI 1–3 (Linux 5.13–6.6; Debian 12 has 2): no landlock TCP rules
    /// either; the empty network namespace (or its own loopback) and the
    /// seccomp socket filter keep code off the network, so a network
    /// allowlist (which needs port rules) is refused too. Below ABI 3,
    /// `truncate` is not a landlock right: read-only mounts hold it.
    Minimal,
    /// No landlock: the process sandbox refuses to run.
    Unsupported,
}

impl Tier {
    /// The tier of landlock ABI `abi` (`None`: no landlock).
    pub fn of(abi: Option<i32>) -> Tier {
        match abi {
            Some(abi) if abi >= 6 => Tier::Full,
            Some(abi) if abi >= 4 => Tier::NoScoping,
            Some(abi) if abi >= 1 => Tier::Minimal,
            _ => Tier::Unsupported,
        }
    }

    /// Its name, as `agent doctor` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Full => "full",
            Tier::NoScoping => "no-scoping",
            Tier::Minimal => "minimal",
            Tier::Unsupported => "unsupported",
        }
    }
}

/// The kernel features the process sandbox relies on.
#[derive(Debug, Clone, Serialize)]
pub struct KernelProbe {
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// Landlock ABI version the sandbox uses, `None` when landlock is off
    /// (or forced off, see [`FORCE_LANDLOCK_ABI_ENV`]).
    pub landlock_abi: Option<i32>,
    /// The kernel's own landlock ABI, when it was forced lower.
    pub landlock_abi_kernel: Option<i32>,
    /// What the sandbox gives at that ABI.
    pub tier: Tier,
    /// Why user namespaces cannot be used here, found by trying (an
    /// AppArmor restriction, a container's seccomp profile), with what to
    /// do; `None` when they work (or were not tried).
    pub user_namespaces_blocked: Option<String>,
    /// The container this runs in, if one was detected.
    pub container: Option<String>,
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
        let kernel_abi = landlock_abi();
        let forced = std::env::var(FORCE_LANDLOCK_ABI_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<i32>().ok());
        let used = match (kernel_abi, forced) {
            (Some(kernel), Some(forced)) => Some(kernel.min(forced)).filter(|abi| *abi > 0),
            (kernel, _) => kernel,
        };
        KernelProbe {
            kernel,
            landlock_abi: used,
            landlock_abi_kernel: kernel_abi.filter(|_| used != kernel_abi),
            tier: Tier::of(used),
            user_namespaces_blocked: None,
            container: detect_container(),
            user_namespaces,
            seccomp_filter,
            cgroup: CgroupLayout::detect(),
        }
    }

    /// This probe, with the landlock ABI the sandbox uses lowered to
    /// `limit` (a policy's or a test's; see [`FORCE_LANDLOCK_ABI_ENV`]).
    pub fn limited_to(&self, limit: Option<i32>) -> KernelProbe {
        let mut probe = self.clone();
        if let Some(limit) = limit {
            let used = probe
                .landlock_abi
                .map(|abi| abi.min(limit))
                .filter(|abi| *abi > 0);
            if used != probe.landlock_abi {
                probe.landlock_abi_kernel = probe.landlock_abi_kernel.or(probe.landlock_abi);
                probe.landlock_abi = used;
                probe.tier = Tier::of(used);
            }
        }
        probe
    }

    /// Tries what the sandbox needs of user namespaces (a user, mount and
    /// network namespace, a tmpfs in it) with `helper`, the way the zygote
    /// will, and records why it failed, with what to do about it. AppArmor
    /// (Ubuntu 23.10+ `apparmor_restrict_unprivileged_userns`) and Docker's
    /// default seccomp profile both let `unshare` fail or leave the
    /// namespace without the capabilities to use it.
    pub fn with_user_namespaces_tried(mut self, helper: &Path) -> KernelProbe {
        let tried = std::process::Command::new(helper)
            .arg(super::helper::PROBE_ARG)
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output();
        let failure = match tried {
            Ok(output) if output.status.success() => None,
            Ok(output) => Some(String::from_utf8_lossy(&output.stdout).trim().to_string()),
            Err(err) => Some(format!("could not run {}: {err}", helper.display())),
        };
        self.user_namespaces_blocked = failure.map(|why| self.advice(&why));
        self
    }

    /// What failed, with what to do about it on this machine.
    pub(crate) fn advice(&self, why: &str) -> String {
        let apparmor =
            std::fs::read_to_string("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
                .is_ok_and(|v| v.trim() == "1");
        let what_to_do = if why.contains("ENOSPC") || why.contains("No space left") {
            "a namespace limit is reached (user.max_user_namespaces, user.max_mnt_namespaces or user.max_net_namespaces, in this user namespace or one above it): raise it".to_string()
        } else if apparmor {
            "AppArmor restricts unprivileged user namespaces here (kernel.apparmor_restrict_unprivileged_userns = 1, Ubuntu 23.10+): give stack-sandbox-exec a profile that allows them (`abi <abi/4.0>, include <tunables/global> profile stack-sandbox-exec /path/to/stack-sandbox-exec flags=(unconfined) { userns, }` in /etc/apparmor.d/, then `apparmor_parser -r` it), or set the sysctl to 0".to_string()
        } else if let Some(container) = &self.container {
            format!("this runs in a container ({container}), whose default seccomp profile refuses user namespaces: start it with `--security-opt seccomp=unconfined` (or a profile that allows unshare and clone with CLONE_NEWUSER) and, for landlock and mounts, `--security-opt apparmor=unconfined`")
        } else if !self.user_namespaces {
            "unprivileged user namespaces are off: set user.max_user_namespaces above 0".to_string()
        } else {
            "check that unprivileged user namespaces are allowed (kernel.unprivileged_userns_clone = 1 on Debian kernels)".to_string()
        };
        format!("{why}; {what_to_do}")
    }

    /// The guarantees of the default policy at this probe's tier, whether
    /// each holds, and what gives it: landlock, or the compensating control
    /// that stands in where this ABI lacks the landlock feature.
    pub fn guarantees(&self) -> Vec<Guarantee> {
        let abi = self.landlock_abi.unwrap_or(0);
        let shown = if abi == 0 {
            "none".to_string()
        } else {
            abi.to_string()
        };
        let netns = self.user_namespaces && self.user_namespaces_blocked.is_none();
        let landlock_or = |min: i32, compensated: &str| -> (bool, String) {
            if abi >= min {
                (true, format!("landlock ABI {abi}"))
            } else if abi >= 1 && netns {
                (
                    true,
                    format!(
                        "compensated (landlock ABI {shown} lacks it, needs {min}): {compensated}"
                    ),
                )
            } else if abi == 0 {
                (
                    false,
                    "missing: no landlock, so the process sandbox refuses to run".to_string(),
                )
            } else {
                (
                    false,
                    format!(
                        "missing: needs landlock ABI {min}, or user namespaces for: {compensated}"
                    ),
                )
            }
        };
        let (tcp, tcp_detail) = landlock_or(
            4,
            "the call's empty network namespace (its own loopback only) and the seccomp socket filter; network allowlists are refused",
        );
        let (scope, scope_detail) = landlock_or(
            6,
            "signals cannot reach outside the call's PID namespace, abstract sockets outside the sandbox's network namespace (which the calls of one workspace and policy share, as they share the workspace); `network = \"full\"` is refused",
        );
        let (truncate, truncate_detail) = landlock_or(
            3,
            "everything but the workspace and tmp is mounted read-only in the call's mount namespace (calls of one workspace and policy without a disk budget can truncate each other's tmp files, as they can the workspace's)",
        );
        vec![
            Guarantee {
                name: "filesystem confined (reads and writes)",
                holds: abi >= 1,
                detail: if abi >= 1 {
                    format!("landlock ABI {abi}, and a private mount namespace")
                } else {
                    "missing: landlock (Linux 5.13+, in the LSM list)".into()
                },
            },
            Guarantee {
                name: "truncating files outside the workspace denied",
                holds: truncate,
                detail: truncate_detail,
            },
            Guarantee {
                name: "TCP bind/connect denied",
                holds: tcp,
                detail: tcp_detail,
            },
            Guarantee {
                name: "signals and abstract sockets scoped",
                holds: scope,
                detail: scope_detail,
            },
            Guarantee {
                name: "no network (network namespace), never root, PID namespace",
                holds: self.user_namespaces && self.user_namespaces_blocked.is_none(),
                detail: match (&self.user_namespaces_blocked, self.user_namespaces) {
                    (Some(why), _) => format!("missing: {why}"),
                    (None, true) => "user namespaces available".into(),
                    (None, false) => {
                        "missing: user namespaces are disabled (user.max_user_namespaces = 0)"
                            .into()
                    }
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

    /// Why a call with `network` cannot get every guarantee at this tier,
    /// if it cannot: the compensating controls of a tier below
    /// [`Tier::Full`] need the call's own network namespace.
    pub fn network_refused(&self, network: super::NetworkMode) -> Option<String> {
        if network == super::NetworkMode::Full && self.tier != Tier::Full {
            return Some(format!(
                "`network = \"full\"` needs landlock ABI 6 (Linux 6.12+) to keep code off the host's abstract unix sockets and processes; this kernel gives ABI {} (tier {}), so the call is refused: use \"loopback\", \"none\" or an allowlist",
                self.landlock_abi.map_or("none".to_string(), |abi| abi.to_string()),
                self.tier.as_str()
            ));
        }
        None
    }

    /// Why the default guarantees cannot be given here, if they cannot.
    /// The cgroup is optional; everything else is required.
    pub fn missing_requirements(&self, min_landlock_abi: i32) -> Option<String> {
        let mut missing = Vec::new();
        match self.landlock_abi {
            None if self.landlock_abi_kernel.is_some() => missing.push(format!(
                "landlock, which {FORCE_LANDLOCK_ABI_ENV} or the policy turned off"
            )),
            None => missing.push("landlock (Linux 5.13+, enabled in the LSM list)".to_string()),
            Some(abi) if abi < min_landlock_abi => missing.push(format!(
                "landlock ABI {min_landlock_abi} (kernel has {abi})"
            )),
            Some(_) => {}
        }
        if !self.user_namespaces {
            missing.push("unprivileged user namespaces (user.max_user_namespaces > 0)".to_string());
        } else if let Some(why) = &self.user_namespaces_blocked {
            missing.push(format!("user namespaces that work ({why})"));
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

/// The container this process runs in, if one is detected: Docker
/// (`/.dockerenv`), Podman (`/run/.containerenv`), or what `container=`
/// PID 1's environment names, or a cgroup path naming one.
fn detect_container() -> Option<String> {
    if Path::new("/.dockerenv").exists() {
        return Some("docker".into());
    }
    if Path::new("/run/.containerenv").exists() {
        return Some("podman".into());
    }
    if let Ok(environ) = std::fs::read("/proc/1/environ") {
        for entry in environ.split(|b| *b == 0) {
            if let Some(name) = entry.strip_prefix(b"container=") {
                return Some(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    let cgroups = std::fs::read_to_string("/proc/1/cgroup").unwrap_or_default();
    ["docker", "kubepods", "containerd", "lxc"]
        .into_iter()
        .find(|name| cgroups.contains(name))
        .map(String::from)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_abi_has_its_tier_and_a_lower_limit_only_lowers_it() {
        for (abi, tier) in [
            (None, Tier::Unsupported),
            (Some(1), Tier::Minimal),
            (Some(3), Tier::Minimal),
            (Some(4), Tier::NoScoping),
            (Some(5), Tier::NoScoping),
            (Some(6), Tier::Full),
            (Some(7), Tier::Full),
        ] {
            assert_eq!(Tier::of(abi), tier, "{abi:?}");
        }
        let probe = KernelProbe {
            kernel: String::new(),
            landlock_abi: Some(5),
            landlock_abi_kernel: None,
            tier: Tier::NoScoping,
            user_namespaces_blocked: None,
            container: None,
            user_namespaces: true,
            seccomp_filter: true,
            cgroup: None,
        };
        assert_eq!(probe.limited_to(Some(7)).landlock_abi, Some(5));
        let lowered = probe.limited_to(Some(2));
        assert_eq!(
            (
                lowered.landlock_abi,
                lowered.landlock_abi_kernel,
                lowered.tier
            ),
            (Some(2), Some(5), Tier::Minimal)
        );
        assert_eq!(probe.limited_to(Some(0)).tier, Tier::Unsupported);
        assert!(probe
            .network_refused(super::super::NetworkMode::Full)
            .is_some());
        assert!(probe
            .network_refused(super::super::NetworkMode::Loopback)
            .is_none());
        assert!(probe
            .advice("unshare failed (ENOSPC: No space left on device)")
            .contains("namespace limit"));
    }
}
