//! The repository layout: every integration test file in `tests/` is a
//! declared test target, so none is silently skipped.

mod common;

#[test]
fn every_test_file_is_a_declared_target() {
    let manifest =
        std::fs::read_to_string(common::repo_root().join("runtime/Cargo.toml")).expect("manifest");
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(common::repo_root().join("tests")).expect("tests dir") {
        let path = entry.expect("entry").path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let is_test = path.extension().is_some_and(|e| e == "rs") && name != "common.rs";
        if is_test && !manifest.contains(&format!("path = \"../tests/{name}\"")) {
            missing.push(name.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "add [[test]] entries to runtime/Cargo.toml for {missing:?}"
    );
}

#[test]
fn the_top_level_layout_is_intact() {
    for path in [
        "Cargo.toml",
        "runtime",
        "tools",
        "policies",
        "examples",
        "tests",
        "README.md",
        "ARCHITECTURE.md",
        ".ci/run",
        "scripts/setup",
    ] {
        assert!(common::repo_root().join(path).exists(), "{path} is missing");
    }
}
