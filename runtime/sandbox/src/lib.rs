//! Sandboxes that run untrusted code.
//!
//! * [`process`]: a subprocess under landlock, seccomp, namespaces, rlimits
//!   and (where writable) a cgroup.
//! * `wasi` (feature `wasi`): CPython and QuickJS in wasmtime.
//!
//! Both return an [`Execution`], the sandbox's own result type; the
//! tool-call result ([`stack_types::ToolOutcome`]) is made from it by
//! `From` (see [`execution`]).

#![warn(missing_docs)]

mod cell;
pub mod execution;
pub mod process;
#[cfg(feature = "wasi")]
pub mod wasi;

/// Network allowlists and the egress proxy (the `stack-egress` crate).
pub use stack_egress as egress;

pub use execution::{ExecStatus, Execution};
