//! Links three replacements ahead of the CTranslate2 that ct2rs builds,
//! when the engine is built (each file says why):
//!
//! - `cpp/ruy_wait.cc`: ruy's `Wait` without its 2 ms busy-wait, so ruy's
//!   workers sleep instead of taking a core from OpenMP's;
//! - `cpp/cpu_allocator.cc`: CTranslate2's CPU allocator, keeping freed
//!   large buffers for reuse as MKL's allocator does in the PyPI wheels,
//!   and registering the buffers a model's weights are loaded into;
//! - `cpp/ruy_prepacked_weights.cc`: ruy's `PreparePackedMatrices`, which
//!   packs those weights once instead of at every product. It uses ruy's
//!   internal types, so it is compiled against the headers of the very
//!   ruy that ct2rs vendors and builds (found with `cargo metadata`, which
//!   names ct2rs's source folder), and again whenever those headers or
//!   Cargo.lock change: the linker would not notice a struct whose layout
//!   differs.
//!
//! The objects go in whole (`+whole-archive`): they then define
//! `ruy::Wait`, `ruy::PreparePackedMatrices` and
//! `ctranslate2::get_allocator<Device::CPU>` before the linker reaches
//! ct2rs's `libruy_wait.a`, `libruy_prepare_packed_matrices.a` and
//! `libctranslate2.a`, whose objects for them (which define nothing else)
//! are then never pulled in. Were the order ever reversed, the link would
//! fail on a duplicate symbol rather than silently keep the upstream code.
//! That holds for the static archives ct2rs builds by default; with its
//! `system` feature (a shared `libctranslate2`) or on Windows (where ct2rs
//! links with `/FORCE:MULTIPLE`) a replacement could be skipped without an
//! error, so the speech tests also check at run time that all three are
//! the ones called.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=cpp/ruy_wait.cc");
    println!("cargo:rerun-if-changed=cpp/cpu_allocator.cc");
    println!("cargo:rerun-if-changed=cpp/ruy_prepacked_weights.cc");
    if std::env::var_os("CARGO_FEATURE_ENGINE").is_none() {
        return;
    }
    let ruy = ruy_headers();
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .include(&ruy)
        .file("cpp/ruy_wait.cc")
        .file("cpp/cpu_allocator.cc")
        .file("cpp/ruy_prepacked_weights.cc")
        .link_lib_modifier("+whole-archive")
        .compile("stack_voice_ct2_cpu");
}

/// The folder that holds `ruy/ctx.h` in ct2rs's vendored CTranslate2:
/// `STACK_VOICE_RUY_INCLUDE` where set, else found with `cargo metadata`
/// (offline first, then as the build itself may fetch; with the target
/// platform's packages only, then, for a custom target, all).
fn ruy_headers() -> PathBuf {
    println!("cargo:rerun-if-env-changed=STACK_VOICE_RUY_INCLUDE");
    let ruy = match std::env::var_os("STACK_VOICE_RUY_INCLUDE") {
        Some(given) => PathBuf::from(given),
        None => ct2rs_dir().join("CTranslate2/third_party/ruy"),
    };
    let header = ruy.join("ruy/prepare_packed_matrices.h");
    assert!(
        header.is_file(),
        "{} is missing: this ct2rs does not vendor ruy where stack-voice expects it (STACK_VOICE_RUY_INCLUDE names another folder)",
        header.display()
    );
    // Recompiled whenever ruy's headers change (a ct2rs upgrade also
    // changes Cargo.lock, see `ct2rs_dir`): the replacement must be built
    // against the layouts of the ruy it links with, which the linker does
    // not check.
    println!("cargo:rerun-if-changed={}", ruy.join("ruy").display());
    ruy
}

/// ct2rs's source folder, from `cargo metadata`.
fn ct2rs_dir() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("Cargo.toml");
    let target = std::env::var("TARGET").expect("set by cargo");
    let platform = ["--filter-platform", target.as_str()];
    let attempts: [&[&str]; 3] = [
        &["--frozen", platform[0], platform[1]],
        &["--locked", platform[0], platform[1]],
        &["--locked"],
    ];
    let mut failures = Vec::new();
    for flags in attempts {
        let output = Command::new(&cargo)
            .args(["metadata", "--format-version", "1"])
            .args(flags)
            .arg("--manifest-path")
            .arg(&manifest)
            .output()
            .expect("run `cargo metadata` to find ct2rs's sources");
        if !output.status.success() {
            failures.push(format!(
                "cargo metadata {}: {}",
                flags.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
            continue;
        }
        let metadata: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("`cargo metadata` prints JSON");
        if let Some(root) = metadata["workspace_root"].as_str() {
            println!(
                "cargo:rerun-if-changed={}",
                PathBuf::from(root).join("Cargo.lock").display()
            );
        }
        return metadata["packages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|package| package["name"] == "ct2rs")
            .and_then(|package| package["manifest_path"].as_str())
            .and_then(|manifest| PathBuf::from(manifest).parent().map(PathBuf::from))
            .expect("ct2rs is a dependency of stack-voice's engine");
    }
    panic!(
        "`cargo metadata` failed, so ct2rs's ruy headers cannot be found (set STACK_VOICE_RUY_INCLUDE to CTranslate2/third_party/ruy in ct2rs's sources):\n{}",
        failures.join("\n")
    );
}
