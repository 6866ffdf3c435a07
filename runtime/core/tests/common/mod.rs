//! Helpers shared by the core crate's tests (included with `mod common;`).

#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root (this crate is `runtime/core`).
pub fn repo_root() -> PathBuf {
    // Where cargo runs the test from, before where it was compiled: a test
    // binary cargo considers fresh may have been built from another
    // checkout of the same sources.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .ancestors()
        .nth(2)
        .expect("runtime/core has two parents")
        .to_path_buf()
}

/// A file under `tests/fixtures`.
pub fn fixture(relative: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(relative)
}
