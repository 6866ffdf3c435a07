//! Sandboxes that run untrusted code.
//!
//! * [`process`]: a subprocess under landlock, seccomp, namespaces, rlimits
//!   and (where writable) a cgroup.

pub mod process;
