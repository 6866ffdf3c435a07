//! The tool-call parsers, fuzzed (bolero): every syntax
//! `parse_tool_calls` understands, from real model output (the prompt and
//! message fixtures) mutated by byte flips, inserts, deletes, splices and
//! truncations. Hostile model output must give text and calls, never a
//! panic, and its calls survive the wire format (they serialize and parse
//! back). Names and arguments are not required to be valid: a call named
//! `""`, or whose arguments are a string that is not JSON, goes on to
//! validation, which names the fault for the model (the fuzzer found both
//! cases; `toolcall::tests` keeps the second).
//!
//! Runs for `STACK_FUZZ_SECONDS` (default 10 s) under `cargo test`.

use bolero::check;

#[path = "../../fuzz_support.rs"]
mod support;
use support::{budget, mutate, repo, seeds, Mutation};

#[test]
fn fuzz_tool_call_parsers() {
    let mut seeds = seeds(
        &[
            repo().join("tests/fixtures/prompts"),
            repo().join("tests/fixtures/messages"),
        ],
        &["txt", "json", "jsonl"],
    );
    // Each syntax at least once, as a model writes it.
    for sample in [
        "<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"a.txt\"}}\n</tool_call>",
        "[TOOL_CALLS][{\"name\": \"list_dir\", \"arguments\": {}}]",
        "<|python_tag|>{\"name\": \"search_files\", \"parameters\": {\"pattern\": \"x\"}}",
        "[{\"name\": \"read_file\", \"arguments\": {\"path\": \"b\"}}, {\"name\": \"list_dir\", \"arguments\": {}}]",
    ] {
        seeds.push(sample.as_bytes().to_vec());
    }
    let tools = [
        "read_file",
        "list_dir",
        "search_files",
        "write_file",
        "execute_code",
    ];
    check!()
        .with_type::<(u8, Vec<Mutation>)>()
        .with_test_time(budget())
        .for_each(|(pick, edits)| {
            let data = mutate(&seeds, *pick, edits);
            let text = String::from_utf8_lossy(&data);
            let mut n = 0;
            let turn = crate::toolcall::parse_tool_calls(
                &text,
                &|name| tools.contains(&name),
                &mut || {
                    n += 1;
                    format!("call_{n}")
                },
            );
            for call in &turn.tool_calls {
                let wire = serde_json::to_string(call).expect("a call serializes");
                let back: stack_types::message::ToolCall =
                    serde_json::from_str(&wire).expect("and parses back");
                assert_eq!(&back, call);
            }
        });
}
