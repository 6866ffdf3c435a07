//! Helpers shared by the integration tests (included with `mod common;`).

#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root.
pub fn repo_root() -> PathBuf {
    // Where cargo runs the test from, before where it was compiled: a test
    // binary cargo considers fresh may have been built from another
    // checkout of the same sources.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .parent()
        .expect("runtime/ has a parent")
        .to_path_buf()
}

/// A file under `tests/fixtures`.
pub fn fixture(relative: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(relative)
}

/// The local account the multi-user attack tests run as (made with
/// `useradd` the first time; needs root): its uid and gid.
pub fn attacker() -> (u32, u32) {
    const NAME: &str = "stackrt-attacker";
    if nix::unistd::User::from_name(NAME).ok().flatten().is_none() {
        let made = std::process::Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/bin/sh", NAME])
            .status()
            .expect("useradd");
        assert!(made.success(), "useradd {NAME} failed");
    }
    let user = nix::unistd::User::from_name(NAME)
        .expect("getpwnam")
        .expect("the attacker account exists");
    (user.uid.as_raw(), user.gid.as_raw())
}

/// The `agent` binary (or a copy named by `STACK_RUNTIME_AGENT_BIN`, as
/// `scripts/test-as-user` passes one an ordinary user can run).
pub fn agent_binary() -> PathBuf {
    std::env::var_os("STACK_RUNTIME_AGENT_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_agent")), PathBuf::from)
}

/// A peer binary (`llama-server`, `llama-bench`) that `scripts/setup
/// --peers` built, or one named by `STACK_RUNTIME_<NAME>` (upper case,
/// dashes as underscores). Panics, naming the fix, when it is missing: a
/// test that needs a peer never passes without one.
pub fn peer_binary(name: &str) -> PathBuf {
    let var = format!("STACK_RUNTIME_{}", name.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&var) {
        return PathBuf::from(path);
    }
    let cache = cache_home();
    let path = std::env::var_os("STACK_RUNTIME_PEERS")
        .map_or_else(|| cache.join("stack-runtime/peers"), PathBuf::from)
        .join("llama.cpp-0.3.36/bin")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `scripts/setup --peers` (or set {var})",
        path.display()
    );
    path
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The Python of the virtual environment that `scripts/setup --peers` fills
/// with the official clients (`tests/clients/requirements.txt`), or under
/// `STACK_RUNTIME_CLIENTS`. Panics, naming the fix, when it is missing.
pub fn client_python() -> PathBuf {
    let cache = cache_home();
    let python = std::env::var_os("STACK_RUNTIME_CLIENTS")
        .map_or_else(|| cache.join("stack-runtime/clients"), PathBuf::from)
        .join("venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run `scripts/setup --peers` (or set STACK_RUNTIME_CLIENTS)",
        python.display()
    );
    python
}

/// `$XDG_CACHE_HOME`, else `~/.cache`: where `scripts/setup` caches.
fn cache_home() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("HOME is set")
}
