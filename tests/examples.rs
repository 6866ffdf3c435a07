//! Every example runs and does what its doc says (`cargo test` builds them).

use std::path::PathBuf;
use std::process::Command;

fn example(name: &str) -> (bool, String) {
    // Test binaries live in target/<profile>/deps; examples in target/<profile>/examples.
    let exe = std::env::current_exe().expect("test binary");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let path: PathBuf = profile_dir.join("examples").join(name);
    if !path.exists() {
        // `cargo test --workspace` builds examples; a single `--test examples` does not.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let built = Command::new(cargo)
            .args(["build", "--release", "--example", name, "--manifest-path"])
            .arg(
                std::env::var_os("CARGO_MANIFEST_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
                    .join("Cargo.toml"),
            )
            .status()
            .expect("cargo build --example");
        assert!(built.success(), "building example {name}");
    }
    let output = Command::new(&path)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", path.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn embed_uses_its_own_tool_policy_and_approver() {
    let (ok, out) = example("embed");
    assert!(ok, "{out}");
    assert!(out.contains("[tool call] lookup_stock("), "{out}");
    assert!(out.contains("[tool result] lookup_stock:"), "{out}");
    assert!(out.contains("[turn finished]"), "{out}");
}

#[test]
fn custom_tool_runs_a_schema_file_and_script_in_wasi() {
    let (ok, out) = example("custom_tool");
    assert!(ok, "{out}");
    assert!(
        out.contains(r#"[ok] {"words": 10, "lines": 2, "longest": "extraordinarily"}"#),
        "{out}"
    );
    assert!(
        out.contains("[invalid]") && out.contains("minLength"),
        "an empty text fails validation: {out}"
    );
}

#[test]
fn scripted_session_prints_the_event_stream() {
    let (ok, out) = example("scripted_session");
    assert!(ok, "{out}");
    let events: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert!(
        kinds.contains(&"tool_call_proposed") && kinds.contains(&"tool_finished"),
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "turn_finished").count(),
        3,
        "{kinds:?}"
    );
    assert!(
        out.contains("water the plants") || kinds.contains(&"tool_finished"),
        "{out}"
    );
}

#[test]
fn validate_and_run_shows_validation_policy_and_redaction() {
    let (ok, out) = example("validate_and_run");
    assert!(ok, "{out}");
    assert!(out.contains("[REDACTED:aws-access-key-id]"), "{out}");
    assert!(out.contains("the secrets folder is off limits"), "{out}");
    assert!(out.contains("Did you mean `read_file`?"), "{out}");
}

/// The async API on the real model: the turn is consumed as a `Stream`, the
/// approval is answered from another task, and the approved call ran.
#[test]
fn stream_and_approve_answers_from_another_task() {
    let (ok, out) = example("stream_and_approve");
    assert!(ok, "{out}");
    assert!(out.contains("[approval needed] write_file"), "{out}");
    assert!(out.contains("[approval asked] write_file("), "{out}");
    assert!(out.contains("[tool result] write_file: ok"), "{out}");
    assert!(out.contains("[approvals answered] 1"), "{out}");
    assert!(out.contains("[turn finished]"), "{out}");
    assert!(!out.contains("[workspace] \n"), "a file was written: {out}");
}
