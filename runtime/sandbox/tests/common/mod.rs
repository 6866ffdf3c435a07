//! Helpers shared by the sandbox crate's tests (included with `mod common;`).

#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root (this crate is `runtime/sandbox`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("runtime/sandbox has two parents")
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
