//! Links the prebuilt oneDNN that `scripts/setup` unpacked, and tells the
//! crates that build against it where it is.
//!
//! Where: `STACK_ONEDNN_DIR` if set, else `onednn-3.2` in the asset folder
//! (`stack_assets::asset_dir`: `$STACK_RUNTIME_ASSETS`, else
//! `$XDG_CACHE_HOME/stack-runtime/assets`, else
//! `~/.cache/stack-runtime/assets`). The
//! folder holds `lib/libdnnl.so.3` and `include/` (`dnnl.h`, `dnnl.hpp`,
//! `oneapi/dnnl/`). A missing folder or file fails the build with what to
//! run; nothing is fetched here.
//!
//! What it emits:
//! - the library, copied into this build's `OUT_DIR/lib` with the
//!   `libdnnl.so` link the linker looks for: cargo puts that folder on the
//!   library path of everything it runs (tests, benches, `cargo run`), as
//!   it does for any native library built inside the target folder, and
//!   `runtime/build.rs` copies the file beside the binaries, whose run path
//!   is `$ORIGIN`;
//! - `rustc-link-lib=dylib=dnnl`;
//! - `DEP_DNNL_ROOT`, `DEP_DNNL_INCLUDE_PATH` and `DEP_DNNL_LIBRARY_PATH`
//!   (the keys `onednn-src` gives), which ct2rs hands to CTranslate2's
//!   cmake, and `runtime/build.rs` reads.

use std::path::PathBuf;

const SONAME: &str = "libdnnl.so.3";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for variable in [
        "STACK_ONEDNN_DIR",
        "STACK_RUNTIME_ASSETS",
        "XDG_CACHE_HOME",
        "HOME",
    ] {
        println!("cargo:rerun-if-env-changed={variable}");
    }
    let root = onednn_dir();
    let library = root.join("lib").join(SONAME);
    let include = root.join("include");
    for needed in [
        library.clone(),
        include.join("dnnl.h"),
        include.join("dnnl.hpp"),
    ] {
        if !needed.is_file() {
            panic!(
                "{} is missing: the speech engine links oneDNN 3.2, which `scripts/setup` fetches \
                 (pinned, from PyPI) into {}; run scripts/setup, or set STACK_ONEDNN_DIR to a \
                 folder with lib/{SONAME} and include/",
                needed.display(),
                root.display()
            );
        }
    }
    println!("cargo:rerun-if-changed={}", library.display());
    println!("cargo:rerun-if-changed={}", include.display());

    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join("lib");
    std::fs::create_dir_all(&out).unwrap_or_else(|error| {
        panic!("create {}: {error}", out.display());
    });
    let copy = out.join(SONAME);
    // A fresh copy each time this runs (only when the library or this
    // script changed): a hard link would share the asset's inode with
    // files other users may be handed.
    let _ = std::fs::remove_file(&copy);
    std::fs::copy(&library, &copy).unwrap_or_else(|error| {
        panic!("copy {} to {}: {error}", library.display(), copy.display());
    });
    let link = out.join("libdnnl.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(SONAME, &link).unwrap_or_else(|error| {
        panic!("link {} to {SONAME}: {error}", link.display());
    });

    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=dylib=dnnl");
    println!("cargo:root={}", root.display());
    println!("cargo:include_path={}", include.display());
    println!("cargo:library_path={}", out.display());
}

/// The folder `scripts/setup` unpacks oneDNN into, or `STACK_ONEDNN_DIR`.
fn onednn_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STACK_ONEDNN_DIR").filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir);
    }
    match stack_assets::asset_dir() {
        Ok(assets) => assets.join("onednn-3.2"),
        Err(error) => panic!("{error} (or STACK_ONEDNN_DIR)"),
    }
}
