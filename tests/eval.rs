//! `agent eval` end to end, on the real default model: BFCL-format data (a
//! subset of the development set, in `tests/fixtures/bfcl/`) and the
//! executable task set (`tests/fixtures/eval/tasks.jsonl`), whose tools
//! run in the real sandbox. The scorer's rules have their own data-driven
//! tests in `runtime/eval/src/bfcl.rs`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// Held by the tests that generate: two llama.cpp computations at once on
/// a small machine run many times slower.
static GENERATING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn eval(args: &[&str], workspace: &Path) -> Output {
    Command::new(common::agent_binary())
        .arg("eval")
        .args(args)
        .current_dir(workspace)
        .output()
        .expect("run agent eval")
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("the per-case log")
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect()
}

/// BFCL cases run and are scored per category; with constrained routing
/// the model calls, and every call it makes is schema-valid; the per-case
/// log has one record per case.
#[test]
fn bfcl_cases_are_scored_per_category_with_a_per_case_log() {
    let _one_at_a_time = GENERATING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("cases.jsonl");
    let bfcl = common::fixture("bfcl");
    let output = eval(
        &[
            "--bfcl",
            bfcl.to_str().expect("utf8"),
            "--routing",
            "constrained",
            "--max-tokens",
            "160",
            "--json",
            "--jsonl",
            log.to_str().expect("utf8"),
        ],
        dir.path(),
    );
    assert!(output.status.success(), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
    let bfcl_report = &report["reports"][0];
    assert_eq!(bfcl_report["suite"], "bfcl");
    let categories: Vec<&str> = bfcl_report["categories"]
        .as_array()
        .expect("categories")
        .iter()
        .filter_map(|c| c["category"].as_str())
        .collect();
    assert_eq!(
        categories,
        ["simple", "multiple", "parallel", "irrelevance"]
    );
    let overall = &bfcl_report["overall"];
    assert_eq!(overall["cases"], 12, "{overall}");
    let failures: u64 = overall["failures"]
        .as_object()
        .expect("failures")
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(
        overall["passed"].as_u64().expect("passed") + failures,
        12,
        "every failure has a kind: {overall}"
    );
    let calls = overall["calls"].as_u64().expect("calls");
    assert!(
        calls > 0,
        "constrained routing makes the model call: {overall}"
    );
    assert_eq!(overall["schema_valid_calls"], calls, "{overall}");
    let records = records(&log);
    assert_eq!(records.len(), 12);
    for record in &records {
        assert_eq!(record["passed"], record["failure"].is_null(), "{record}");
        assert!(record["seconds"].as_f64().is_some(), "{record}");
    }
    // Irrelevance never has a right tool; the others always say.
    for record in &records {
        let irrelevance = record["category"] == "irrelevance";
        assert_eq!(record["right_tool"].is_null(), irrelevance, "{record}");
    }
    // No reply repeats a call of its own: the default model wrote
    // `multiple_0`'s `triangle_properties_get` call twice, word for word,
    // before repeats were dropped (on both the AVX2 and the AVX-512
    // kernels).
    for record in &records {
        let calls: Vec<(&Value, Value)> = record["calls"]
            .as_array()
            .expect("calls")
            .iter()
            .map(|call| {
                let arguments = call["function"]["arguments"].as_str().expect("arguments");
                let arguments = serde_json::from_str(arguments)
                    .unwrap_or_else(|_| Value::String(arguments.to_string()));
                (&call["function"]["name"], arguments)
            })
            .collect();
        for (at, call) in calls.iter().enumerate() {
            assert!(!calls[..at].contains(call), "a repeated call: {record}");
        }
    }
    let multiple_0 = records
        .iter()
        .find(|record| record["id"] == "multiple_0")
        .expect("multiple_0 ran");
    assert_eq!(
        multiple_0["calls"].as_array().map(Vec::len),
        Some(1),
        "{multiple_0}"
    );
}

/// Executable tasks run through the agent loop, tools in the sandbox, and
/// are checked against the workspace, the answer and the tools' output.
#[test]
fn executable_tasks_run_their_tools_and_are_checked() {
    let _one_at_a_time = GENERATING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("tasks.jsonl");
    let tasks = common::fixture("eval/tasks.jsonl");
    let output = eval(
        &[
            "--tasks",
            tasks.to_str().expect("utf8"),
            "--limit",
            "1",
            "--routing",
            "constrained",
            "--max-steps",
            "2",
            "--max-tokens",
            "160",
            "--json",
            "--jsonl",
            log.to_str().expect("utf8"),
        ],
        dir.path(),
    );
    assert!(output.status.success(), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
    let tasks_report = &report["reports"][0];
    assert_eq!(tasks_report["suite"], "tasks");
    // One task from each of the seven categories.
    assert_eq!(tasks_report["overall"]["cases"], 7, "{tasks_report}");
    let records = records(&log);
    assert_eq!(records.len(), 7);
    let called: usize = records
        .iter()
        .map(|r| r["calls"].as_array().map_or(0, Vec::len))
        .sum();
    assert!(called > 0, "the tools ran: {records:?}");
    for record in &records {
        if let Some(failure) = record["failure"].as_object() {
            assert!(
                ["no_call", "wrong_function", "check_failed", "turn_error"]
                    .contains(&failure["kind"].as_str().unwrap_or_default()),
                "{record}"
            );
            assert_ne!(failure["kind"], "turn_error", "{record}");
        }
    }
}

/// Bad input fails clearly: no data given, a folder without BFCL files, a
/// task file with a malformed line, an unknown category.
#[test]
fn bad_eval_input_fails_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad_tasks = dir.path().join("bad.jsonl");
    std::fs::write(&bad_tasks, "{\"id\": \"x\", \"prompt\": 3}\n").expect("write");
    let cases: &[(&[&str], &str)] = &[
        (&[], "nothing to evaluate"),
        (&["--bfcl", "."], "holds no BFCL"),
        (&["--tasks", "bad.jsonl"], "bad.jsonl:1:"),
        (
            &["--bfcl", ".", "--category", "live"],
            "unknown category `live`",
        ),
    ];
    for (args, expected) in cases {
        let output = eval(args, dir.path());
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
