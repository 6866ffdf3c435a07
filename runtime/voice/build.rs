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
//! prebuilt library, see ARCHITECTURE.md, "Build") and ruy's elsewhere; nothing here
//! depends on which.

fn main() {
    println!("cargo:rerun-if-changed=cpp/cpu_allocator.cc");
    if std::env::var_os("CARGO_FEATURE_ENGINE").is_none() {
        return;
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("cpp/cpu_allocator.cc")
        .link_lib_modifier("+whole-archive")
        .compile("stack_voice_ct2_cpu");
}
