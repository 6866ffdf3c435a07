//! `stack-sandbox-exec`: the sandboxes' helper. The runtime starts it with
//! a sandbox spec as the process sandbox's zygote, which restricts itself
//! and executes the targets (see `stack_sandbox::process` for the
//! order of steps and the threat model), or, with `--wasi-guest`, as the
//! WASI helper of a runtime that is not root (see
//! `stack_sandbox::wasi`), or, with `--probe-namespaces`, to try what the
//! sandbox needs of user namespaces (`agent doctor`). It is not meant to
//! be run by hand.

fn main() {
    #[cfg(feature = "wasi")]
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(stack_sandbox::wasi::GUEST_HELPER_ARG))
    {
        stack_sandbox::wasi::guest_helper_main()
    }
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(stack_sandbox::process::PROBE_ARG))
    {
        stack_sandbox::process::probe_main()
    }
    stack_sandbox::process::helper_main()
}
