//! Link settings for this package's binaries, tests, benches and examples.
//!
//! llama.cpp is linked as shared libraries (`libllama.so.0`,
//! `libggml.so.0`, `libggml-base.so.0`, `libllama-common.so.0`): ggml's
//! CPU variants are shared libraries loaded at run time (see
//! `stack_model::cpu_backends`), and they need ggml itself shared. The run
//! path finds those libraries first beside the binary (`$ORIGIN`, where an
//! installed `agent` keeps them), then in the folder the llama.cpp build
//! installed them in (from llama-cpp-sys-2's build metadata), so a built
//! binary runs as it is, outside cargo too. It is an `RPATH`, not a
//! `RUNPATH`, so that it also serves `libllama.so.0`'s own dependencies on
//! ggml, which carry no run path of their own.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_LLAMA_BACKENDS_DIR");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let mut run_path = String::from("$ORIGIN");
    // llama-cpp-sys-2 (`links = "llama"`) names its backends folder; its
    // shared libraries are in `lib/` beside it.
    if let Ok(backends) = std::env::var("DEP_LLAMA_BACKENDS_DIR") {
        if let Some(out) = Path::new(&backends).parent() {
            run_path.push(':');
            run_path.push_str(&out.join("lib").display().to_string());
        }
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{run_path}");
    println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags");
}
