//! Helpers shared by the core crate's tests (included with `mod common;`).

#![allow(unused_imports)]

pub use stack_test_support::{fixture, repo_root};
