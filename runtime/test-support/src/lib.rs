//! Helpers shared by the tests of every crate: where the repository and
//! its fixtures are, the local account the multi-user attack tests run as,
//! and a free loopback port. A dev-dependency only; nothing ships with it.

use std::path::{Path, PathBuf};

/// The repository root: the nearest folder, from the crate under test up,
/// that holds `tests/fixtures` (a copy of the tree that carries only what
/// a suite needs, as `scripts/test-as-user` makes, is found too).
///
/// The crate under test is the one cargo names in `CARGO_MANIFEST_DIR` when
/// it runs the test, before the one this was compiled in: a test binary
/// cargo considers fresh may have been built from another checkout of the
/// same sources.
pub fn repo_root() -> PathBuf {
    let start = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    start
        .ancestors()
        .find(|dir| is_repo_root(dir))
        .unwrap_or_else(|| panic!("no folder above {} holds tests/fixtures", start.display()))
        .to_path_buf()
}

fn is_repo_root(dir: &Path) -> bool {
    dir.join("tests/fixtures").is_dir()
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

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_root_holds_the_fixtures() {
        let root = repo_root();
        assert!(root.join("Cargo.toml").is_file(), "{}", root.display());
        assert!(fixture("").is_dir());
    }
}
