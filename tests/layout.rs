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

/// The crate graph in `ARCHITECTURE.md` is the one the manifests declare:
/// every `stack-*` dependency of a crate is one its row allows, and every
/// crate of the workspace has a row.
#[test]
fn the_crate_graph_is_the_documented_one() {
    let doc = std::fs::read_to_string(common::repo_root().join("ARCHITECTURE.md"))
        .expect("ARCHITECTURE.md");
    let section = doc
        .split("## Crates")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a Crates section");
    let mut rows = 0;
    for row in section.lines().filter(|l| l.starts_with("| `stack-")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (name, folder, allowed) = (
            cells[1].trim_matches('`'),
            cells[2].trim_matches('`'),
            cells[4],
        );
        rows += 1;
        if allowed == "all of the above" {
            continue;
        }
        let allowed: Vec<String> = allowed
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty() && *a != "—")
            .map(|a| format!("stack-{a}"))
            .collect();
        let manifest = std::fs::read_to_string(common::repo_root().join(folder).join("Cargo.toml"))
            .unwrap_or_else(|e| panic!("{folder}/Cargo.toml: {e}"));
        let dependencies = manifest
            .split("[dependencies]")
            .nth(1)
            .and_then(|rest| rest.split("\n[").next())
            .unwrap_or("");
        for line in dependencies.lines() {
            let Some(dep) = line.split(['=', '.', ' ']).next() else {
                continue;
            };
            if dep.starts_with("stack-") {
                assert!(
                    allowed.iter().any(|a| a == dep),
                    "{name} depends on {dep}, which ARCHITECTURE.md does not allow it"
                );
            }
        }
    }
    let workspace =
        std::fs::read_to_string(common::repo_root().join("Cargo.toml")).expect("Cargo.toml");
    let members = workspace
        .split("members = [")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .expect("a members list")
        .matches("\"runtime")
        .count();
    assert_eq!(
        rows, members,
        "every workspace member has a row in ARCHITECTURE.md"
    );
}

/// `scripts/setup` fetches what the runtime checks: each asset's line in
/// its manifest names the file, the package and the sha256 that
/// `stack_runtime::assets` pins, and it checks oneDNN's library against
/// the same hash as the speech tests. A pin changed in one place only
/// fails here, not at a user's first run.
#[test]
fn the_setup_script_pins_what_the_runtime_checks() {
    use stack_runtime::assets::{Asset, ONEDNN_LIBRARY_SHA256};
    let setup = std::fs::read_to_string(common::repo_root().join("scripts/setup")).expect("setup");
    let manifest: Vec<Vec<&str>> = setup
        .lines()
        .map(str::trim)
        .filter(|line| {
            line.starts_with('"') && line.ends_with('"') && line.matches('|').count() == 3
        })
        .map(|line| line.trim_matches('"').split('|').collect())
        .collect();
    assert_eq!(
        manifest.len(),
        Asset::ALL.len(),
        "setup's manifest: {manifest:?}"
    );
    for asset in Asset::ALL {
        let entry = manifest
            .iter()
            .find(|entry| entry[0] == asset.file_name())
            .unwrap_or_else(|| panic!("setup's manifest has no line for {}", asset.file_name()));
        assert_eq!(entry[2], asset.package(), "{}", asset.file_name());
        assert_eq!(entry[3], asset.sha256(), "{}", asset.file_name());
    }
    assert!(
        setup.contains(&format!("onednn_library_sha={ONEDNN_LIBRARY_SHA256}\n")),
        "setup pins another libdnnl.so.3 than stack_assets::ONEDNN_LIBRARY_SHA256"
    );
}
