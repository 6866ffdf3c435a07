//! Helpers shared by the sandbox crate's tests (included with `mod common;`).

#![allow(dead_code, unused_imports)]

use std::path::PathBuf;

pub use stack_test_support::{attacker, fixture, repo_root};

/// The sandbox helper: the one cargo built, or a copy named by
/// `STACK_RUNTIME_SANDBOX_HELPER` (`scripts/test-as-user` runs the suites
/// as an unprivileged user from copies, since root's build folder is
/// closed to other users).
pub fn helper_binary() -> PathBuf {
    std::env::var_os("STACK_RUNTIME_SANDBOX_HELPER").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_stack-sandbox-exec")),
        PathBuf::from,
    )
}

/// A process sandbox that runs code through [`helper_binary`].
pub fn process_sandbox() -> stack_sandbox::process::ProcessSandbox {
    stack_sandbox::process::ProcessSandbox::with_helper(helper_binary())
}

/// The shared WASI sandbox, its interpreters compiled (or an error that
/// says to fetch them).
#[cfg(feature = "wasi")]
pub fn wasi_sandbox() -> stack_sandbox::wasi::WasiSandbox {
    let sandbox = stack_sandbox::wasi::WasiSandbox::shared().expect("engine");
    sandbox
        .warm_up()
        .expect("run scripts/setup first: the interpreters are missing");
    sandbox
}

/// The runtime's own folders inside a workspace, as a home-folder
/// workspace holds them: a compiled module in the cache (read-only to
/// sandboxed code) and a transcript in the data folder (hidden). The data
/// folder is named through a symlink to the workspace, as a home folder
/// reached through a symlinked `/home` is, so that only the path the kernel
/// resolves places it inside.
pub struct RuntimeState {
    pub cache: PathBuf,
    pub data: PathBuf,
    /// The configuration folder, with the key that encrypts stored data.
    pub config: PathBuf,
    /// The entries to add to a policy's protected list.
    pub protected: Vec<(PathBuf, stack_sandbox::process::ProtectedMode)>,
    _alias: tempfile::TempDir,
}

impl RuntimeState {
    /// Makes the folders in the canonical workspace `ws`.
    pub fn in_workspace(ws: &std::path::Path) -> RuntimeState {
        use stack_sandbox::process::ProtectedMode;
        let cache = ws.join(".cache/stack-runtime");
        let data = ws.join(".local/share/stack-runtime");
        let config = ws.join(".config/stack-runtime");
        std::fs::create_dir_all(config.join("keys")).expect("mkdir");
        std::fs::write(config.join("keys/current"), "SECRET-KEY\n").expect("write");
        std::fs::create_dir_all(cache.join("wasm")).expect("mkdir");
        std::fs::create_dir_all(data.join("sessions")).expect("mkdir");
        std::fs::write(cache.join("wasm/module.cwasm"), "COMPILED").expect("write");
        std::fs::write(data.join("sessions/s1.jsonl"), "SECRET-TRANSCRIPT\n").expect("write");
        let alias = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(ws, alias.path().join("home")).expect("symlink");
        let protected = vec![
            (cache.clone(), ProtectedMode::ReadOnly),
            (
                alias.path().join("home/.local/share/stack-runtime"),
                ProtectedMode::Hidden,
            ),
            (config.clone(), ProtectedMode::Hidden),
        ];
        RuntimeState {
            cache,
            data,
            config,
            protected,
            _alias: alias,
        }
    }

    /// Workspaces inside them that a sandbox must refuse: the cache, and
    /// a folder in it.
    pub fn workspaces_inside(&self) -> [PathBuf; 2] {
        [self.cache.clone(), self.cache.join("wasm")]
    }

    /// Sandboxed code changed nothing of them.
    pub fn assert_untouched(&self) {
        assert_eq!(
            std::fs::read_to_string(self.cache.join("wasm/module.cwasm")).expect("read"),
            "COMPILED"
        );
        assert!(!self.cache.join("wasm/evil.cwasm").exists());
        assert_eq!(
            std::fs::read_to_string(self.data.join("sessions/s1.jsonl")).expect("read"),
            "SECRET-TRANSCRIPT\n"
        );
        assert_eq!(
            std::fs::read_to_string(self.config.join("keys/current")).expect("read"),
            "SECRET-KEY\n"
        );
    }
}

/// Python that plants a native module in its working folder.
pub const PLANT_MODULE: &str = "open('evil.cwasm', 'w').write('NATIVE'); print('planted')";

/// `outcome` refused a workspace `inside` the runtime's own folders by
/// name, and nothing was planted there.
pub fn assert_refused_inside(outcome: &stack_sandbox::Execution, inside: &std::path::Path) {
    assert_ne!(outcome.status, stack_sandbox::ExecStatus::Ok, "{outcome:?}");
    assert!(
        outcome
            .error
            .as_deref()
            .is_some_and(|e| e.contains("one of the runtime's own folders")),
        "{outcome:?}"
    );
    assert!(!inside.join("evil.cwasm").exists(), "{}", inside.display());
}

/// The POSIX ACLs (`access`, `default`) that `path` holds: what a grant
/// written to disk would leave behind.
pub fn acls_held(path: &std::path::Path) -> Vec<&'static str> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    [
        (c"system.posix_acl_access", "access"),
        (c"system.posix_acl_default", "default"),
    ]
    .into_iter()
    .filter(|(attribute, _)| {
        // SAFETY: getxattr with a null buffer only asks for the size.
        let size = unsafe {
            nix::libc::getxattr(c_path.as_ptr(), attribute.as_ptr(), std::ptr::null_mut(), 0)
        };
        size >= 0
    })
    .map(|(_, name)| name)
    .collect()
}
