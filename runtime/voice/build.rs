//! Links two replacements ahead of the CTranslate2 that ct2rs builds, when
//! the engine is built (each file says why):
//!
//! - `cpp/ruy_wait.cc`: ruy's `Wait` without its 2 ms busy-wait, so ruy's
//!   workers sleep instead of taking a core from OpenMP's;
//! - `cpp/cpu_allocator.cc`: CTranslate2's CPU allocator, keeping freed
//!   large buffers for reuse as MKL's allocator does in the PyPI wheels.
//!
//! The objects go in whole (`+whole-archive`): they then define
//! `ruy::Wait` and `ctranslate2::get_allocator<Device::CPU>` before the
//! linker reaches ct2rs's `libruy_wait.a` and `libctranslate2.a`, whose
//! objects for them (which define nothing else) are then never pulled in.
//! Were the order ever reversed, the link would fail on a duplicate symbol
//! rather than silently keep the upstream code. That holds for the static
//! archives ct2rs builds by default; with its `system` feature (a shared
//! `libctranslate2`) or on Windows (where ct2rs links with
//! `/FORCE:MULTIPLE`) a replacement could be skipped without an error, so
//! the speech tests also check at run time that both are the ones called.

fn main() {
    println!("cargo:rerun-if-changed=cpp/ruy_wait.cc");
    println!("cargo:rerun-if-changed=cpp/cpu_allocator.cc");
    if std::env::var_os("CARGO_FEATURE_ENGINE").is_none() {
        return;
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("cpp/ruy_wait.cc")
        .file("cpp/cpu_allocator.cc")
        .link_lib_modifier("+whole-archive")
        .compile("stack_voice_ct2_cpu");
}
