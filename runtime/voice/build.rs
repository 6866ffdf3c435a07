//! Links `cpp/cpu_allocator.cc` ahead of the CTranslate2 that ct2rs builds,
//! when the engine is built: CTranslate2's CPU allocator, keeping freed
//! large buffers for reuse as MKL's allocator does in the PyPI wheels (the
//! file says why).
//!
//! The object goes in whole (`+whole-archive`): it then defines
//! `ctranslate2::get_allocator<Device::CPU>` before the linker reaches
//! ct2rs's `libctranslate2.a`, whose `allocator.cc` object (which defines
//! nothing else) is then never pulled in. Were the order ever reversed,
//! the link would fail on a duplicate symbol rather than silently keep the
//! upstream code. That holds for the static archive ct2rs builds by
//! default; with its `system` feature (a shared `libctranslate2`) or on
//! Windows (where ct2rs links with `/FORCE:MULTIPLE`) the replacement
//! could be skipped without an error, so the speech tests also check at
//! run time that it is the one called.
//!
//! CTranslate2's matrix products are oneDNN's on x86-64 Linux (the
//! prebuilt library, see ARCHITECTURE.md, "Build") and ruy's elsewhere;
//! the allocator does not depend on which. Where onednn-src names the
//! prebuilt `libdnnl.so.3` (its `DEP_DNNL_LIBRARY_PATH`, outside the target
//! folder), it is copied into this build's `OUT_DIR/lib`, a native search
//! folder inside the target folder, which cargo therefore puts on the
//! library path of what it runs: this crate's tests and benches, and those
//! of every crate above it, find it there (the runtime's binaries find the
//! copy `runtime/build.rs` places beside them).

use std::path::{Path, PathBuf};

#[path = "../build-support/place_library.rs"]
mod place_library;
use place_library::place_library;

fn main() {
    println!("cargo:rerun-if-changed=cpp/cpu_allocator.cc");
    println!("cargo:rerun-if-changed=../build-support/place_library.rs");
    println!("cargo:rerun-if-env-changed=DEP_DNNL_LIBRARY_PATH");
    if std::env::var_os("CARGO_FEATURE_ENGINE").is_none() {
        return;
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("cpp/cpu_allocator.cc")
        .link_lib_modifier("+whole-archive")
        .compile("stack_voice_ct2_cpu");
    if let Ok(folder) = std::env::var("DEP_DNNL_LIBRARY_PATH") {
        let library = Path::new(&folder).join("libdnnl.so.3");
        // Without scripts/setup's override onednn-src builds a static
        // oneDNN, and there is nothing to copy.
        if library.is_file() {
            println!("cargo:rerun-if-changed={}", library.display());
            let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join("lib");
            place_library(&library, &out);
            println!("cargo:rustc-link-search=native={}", out.display());
        }
    }
}
