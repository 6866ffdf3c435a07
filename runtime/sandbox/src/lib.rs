//! Sandboxes that run untrusted code.
//!
//! * [`process`]: a subprocess under landlock, seccomp, namespaces, rlimits
//!   and (where writable) a cgroup.
//! * `wasi` (feature `wasi`): CPython and QuickJS in wasmtime.

#![warn(missing_docs)]

pub mod process;
#[cfg(feature = "wasi")]
pub mod wasi;

/// Network allowlists and the egress proxy (the `stack-egress` crate).
pub use stack_egress as egress;
