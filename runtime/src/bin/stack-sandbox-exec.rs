//! `stack-sandbox-exec`: the process sandbox's helper. The runtime starts it
//! with a sandbox spec; it restricts itself and executes the target. See
//! `stack_runtime::sandbox::process` for the order of steps and the threat
//! model. It is not meant to be run by hand.

fn main() {
    stack_runtime::sandbox::process::helper_main()
}
