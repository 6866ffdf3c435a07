//! cgroups for memory and process-count limits, where a writable hierarchy
//! exists (v1 `memory` and `pids` controllers, or v2). Each zygote gets one,
//! joined once; every call it forks is born inside it, so the limits bound
//! the calls of one workspace and policy together (moving a process between
//! v1 cgroups costs milliseconds, more than a whole `bash -c true`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Where sandbox cgroups are created.
#[derive(Debug, Clone, Serialize)]
pub enum CgroupLayout {
    /// cgroup v1: separate `memory` and `pids` hierarchies.
    V1 {
        /// Parent folder in the memory hierarchy.
        memory: PathBuf,
        /// Parent folder in the pids hierarchy.
        pids: PathBuf,
    },
    /// cgroup v2: one unified folder with both controllers.
    V2 {
        /// Parent folder.
        parent: PathBuf,
    },
}

impl CgroupLayout {
    /// Finds a writable place for sandbox cgroups, from `/proc/self/cgroup`.
    pub fn detect() -> Option<CgroupLayout> {
        let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let mut memory = None;
        let mut pids = None;
        let mut unified = None;
        for line in membership.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let path = path.trim_start_matches('/');
            for controller in controllers.split(',') {
                match controller {
                    "memory" => memory = Some(Path::new("/sys/fs/cgroup/memory").join(path)),
                    "pids" => pids = Some(Path::new("/sys/fs/cgroup/pids").join(path)),
                    "" => unified = Some(Path::new("/sys/fs/cgroup").join(path)),
                    _ => {}
                }
            }
        }
        if let (Some(memory), Some(pids)) = (memory, pids) {
            if writable(&memory) && writable(&pids) {
                return Some(CgroupLayout::V1 { memory, pids });
            }
        }
        let parent = unified?;
        let controllers = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").ok()?;
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        (has("memory") && has("pids") && writable(&parent)).then_some(CgroupLayout::V2 { parent })
    }

    /// One line for `agent doctor`.
    pub fn describe(&self) -> String {
        match self {
            CgroupLayout::V1 { memory, pids } => format!(
                "cgroup v1 under {} and {}",
                memory.display(),
                pids.display()
            ),
            CgroupLayout::V2 { parent } => format!("cgroup v2 under {}", parent.display()),
        }
    }
}

fn writable(dir: &Path) -> bool {
    dir.is_dir() && nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// The cgroup(s) of one zygote and its calls. Killed and removed on drop.
#[derive(Debug)]
pub(crate) struct SandboxCgroup {
    dirs: Vec<PathBuf>,
    memory_events: PathBuf,
}

impl SandboxCgroup {
    /// Creates a cgroup with memory and pids limits.
    pub(crate) fn create(
        layout: &CgroupLayout,
        memory_bytes: u64,
        processes: u64,
    ) -> std::io::Result<SandboxCgroup> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        sweep_abandoned(layout);
        let name = format!(
            "stack-runtime-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        match layout {
            CgroupLayout::V1 { memory, pids } => {
                let (memory, pids) = (memory.join(&name), pids.join(&name));
                let group = SandboxCgroup {
                    dirs: vec![memory.clone(), pids.clone()],
                    memory_events: memory.join("memory.oom_control"),
                };
                std::fs::create_dir(&memory)?;
                std::fs::create_dir(&pids)?;
                std::fs::write(
                    memory.join("memory.limit_in_bytes"),
                    memory_bytes.to_string(),
                )?;
                // Without swap accounting this file is absent; that is fine.
                let _ = std::fs::write(
                    memory.join("memory.memsw.limit_in_bytes"),
                    memory_bytes.to_string(),
                );
                std::fs::write(pids.join("pids.max"), processes.to_string())?;
                Ok(group)
            }
            CgroupLayout::V2 { parent } => {
                let dir = parent.join(&name);
                let group = SandboxCgroup {
                    dirs: vec![dir.clone()],
                    memory_events: dir.join("memory.events"),
                };
                std::fs::create_dir(&dir)?;
                std::fs::write(dir.join("memory.max"), memory_bytes.to_string())?;
                std::fs::write(dir.join("memory.swap.max"), "0").ok();
                std::fs::write(dir.join("pids.max"), processes.to_string())?;
                Ok(group)
            }
        }
    }

    /// The `cgroup.procs` files the zygote writes itself into.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// How many processes the memory controller has killed here so far.
    pub(crate) fn oom_kills(&self) -> u64 {
        let text = std::fs::read_to_string(&self.memory_events).unwrap_or_default();
        // v1 `memory.oom_control` and v2 `memory.events` both count "oom_kill N".
        text.lines()
            .filter_map(|l| l.strip_prefix("oom_kill "))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum()
    }

    /// Sends SIGKILL to every process still in the cgroup.
    pub(crate) fn kill_all(&self) {
        for dir in &self.dirs {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Removes the cgroups that runtimes which are gone left behind (a CLI run
/// exits before its zygote's clean-up thread has removed them; a runtime
/// may be killed): `stack-runtime-<pid>-<n>` whose pid no longer runs and
/// which hold no process. A cgroup whose pid now belongs to another process
/// is left alone: never anything of a live runtime. cgroup v1 memory
/// cgroups are a limited resource (65,535 ids), so this runs each time a
/// zygote's cgroup is made (rarely: once per workspace and policy).
fn sweep_abandoned(layout: &CgroupLayout) {
    let parents: Vec<&Path> = match layout {
        CgroupLayout::V1 { memory, pids } => vec![memory.as_path(), pids.as_path()],
        CgroupLayout::V2 { parent } => vec![parent.as_path()],
    };
    for parent in parents {
        let Ok(entries) = std::fs::read_dir(parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let owner = name
                .to_str()
                .and_then(|n| n.strip_prefix("stack-runtime-"))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            let Some(pid) = owner else { continue };
            if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
                continue;
            }
            let empty = std::fs::read_to_string(entry.path().join("cgroup.procs"))
                .is_ok_and(|procs| procs.trim().is_empty());
            if empty {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}

impl Drop for SandboxCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            self.kill_all();
            let mut all_gone = true;
            for dir in &self.dirs {
                if dir.exists() && std::fs::remove_dir(dir).is_err() {
                    all_gone = false;
                }
            }
            if all_gone {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        tracing::warn!(dirs = ?self.dirs, "could not remove a sandbox cgroup");
    }
}
