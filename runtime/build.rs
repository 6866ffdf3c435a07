//! Link settings for this package's binaries, tests, benches and examples,
//! and the shared libraries they load beside them: llama.cpp's, and
//! oneDNN's (the speech engine's, on x86-64 Linux; see ARCHITECTURE.md, "Build").
//!
//! llama.cpp is linked as shared libraries (`libllama.so.0`,
//! `libllama-common.so.0`, `libggml.so.0`, `libggml-base.so.0`): ggml's CPU
//! variants are shared libraries loaded at run time (see
//! `stack_model::cpu_backends`), and they need ggml itself shared. This
//! script copies those libraries, from the folder the llama.cpp build
//! installed them in (named by llama-cpp-sys-2's build metadata), beside
//! the binaries: the profile's folder (`target/release`, where `agent` is),
//! its `deps/` (tests) and `examples/`. The binaries' run path is `$ORIGIN`
//! alone, so a built `agent` runs outside cargo, and an installed one looks
//! only beside itself, never in a build folder that may be gone (a `cargo
//! install` builds in a temporary folder) and made again by someone else.
//! It is an `RPATH`, not a `RUNPATH`, so that it also serves
//! `libllama.so.0`'s own dependencies on ggml. (llama-cpp-sys-2 places
//! links of its own there too, named `lib*.so`, which the binaries do not
//! ask for.) oneDNN's `libdnnl.so.3` is placed the same way, from the
//! folder onednn-src names (its `DEP_DNNL_LIBRARY_PATH`: the asset folder
//! that `scripts/setup` unpacked it into, see `onednn_library`). The
//! test and bench binaries of the other crates run under cargo, which puts
//! the build's folders on the library path.
//!
//! The profile folder is taken from `OUT_DIR` (`<target>/<profile>/build/
//! <package>/out`), as llama-cpp-sys-2 does; with cargo's separate
//! `build.build-dir` the binaries land elsewhere and find no libraries.

use std::path::{Path, PathBuf};

#[path = "build-support/place_library.rs"]
mod place_library;
use place_library::place_library;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build-support/place_library.rs");
    println!("cargo:rerun-if-env-changed=DEP_LLAMA_BACKENDS_DIR");
    println!("cargo:rerun-if-env-changed=DEP_DNNL_LIBRARY_PATH");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN");
    println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags");
    let mut libraries = llama_libraries();
    libraries.extend(onednn_library());
    if libraries.is_empty() {
        return;
    }
    // OUT_DIR is <target>/<profile>/build/<package>-<hash>/out.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let profile = out_dir
        .ancestors()
        .nth(3)
        .expect("OUT_DIR is <target>/<profile>/build/<package>/out")
        .to_path_buf();
    for library in &libraries {
        println!("cargo:rerun-if-changed={}", library.display());
    }
    for folder in [
        profile.clone(),
        profile.join("deps"),
        profile.join("examples"),
    ] {
        for library in &libraries {
            let placed = place_library(library, &folder);
            // A copy that goes missing is put back at the next build.
            println!("cargo:rerun-if-changed={}", placed.display());
        }
    }
}

/// llama.cpp's shared libraries (by soname), when the `llama` feature
/// builds it: llama-cpp-sys-2 (`links = "llama"`) names its backends
/// folder, and the libraries are in `lib/` (or `lib64/`) beside it.
fn llama_libraries() -> Vec<PathBuf> {
    let Ok(backends) = std::env::var("DEP_LLAMA_BACKENDS_DIR") else {
        return Vec::new();
    };
    let Some(installed) = Path::new(&backends).parent().and_then(|out| {
        ["lib", "lib64"]
            .iter()
            .map(|name| out.join(name))
            .find(|folder| folder.is_dir())
    }) else {
        panic!("llama.cpp's build installed no lib/ folder beside {backends}");
    };
    let libraries: Vec<PathBuf> = std::fs::read_dir(&installed)
        .expect("llama.cpp's lib folder")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| is_soname(&name.to_string_lossy()))
        })
        .collect();
    assert!(
        !libraries.is_empty(),
        "no lib*.so.N in llama.cpp's lib folder {}",
        installed.display()
    );
    libraries
}

/// oneDNN's shared library, when the `voice` feature links it (x86-64
/// Linux): onednn-src (`links = "dnnl"`, its build script overridden by
/// the .cargo/config.toml that `scripts/setup` writes) names the folder of
/// the prebuilt `libdnnl.so.3`. Without the override, onednn-src compiles
/// a static oneDNN, and there is nothing to place.
fn onednn_library() -> Option<PathBuf> {
    let folder = std::env::var("DEP_DNNL_LIBRARY_PATH").ok()?;
    let library = Path::new(&folder).join("libdnnl.so.3");
    library.is_file().then_some(library)
}

/// Whether `name` is the name a binary asks for (`libllama.so.0`): a
/// library's soname, not its full version (`libllama.so.0.6.0`) or the
/// link-time name (`libllama.so`).
fn is_soname(name: &str) -> bool {
    name.starts_with("lib")
        && name.split_once(".so.").is_some_and(|(_, version)| {
            !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit())
        })
}
