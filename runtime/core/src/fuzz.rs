//! The front door, fuzzed (bolero): the strict JSON parser, the schema-file
//! loader (and registering what it loads), and the policy loader. Each
//! target starts from the real files (the shipped tools and presets, and
//! the test fixtures, good and broken) and mutates them: byte flips,
//! inserts, deletes, splices of one file into another, truncations. The
//! property is the one the runtime promises for hostile input: an error
//! value, never a panic, and a parse that round-trips.
//!
//! Under `cargo test` each target runs for [`budget`] (default 10 s;
//! `STACK_FUZZ_SECONDS` sets it, for example 60 in CI or 3600 by hand). A
//! crash prints bolero's seed; once fixed, the input joins the fixtures as
//! a regression test.

use std::path::Path;

use bolero::check;

#[path = "../../fuzz_support.rs"]
mod support;
use support::{budget, mutate, repo, seeds, Mutation};

#[test]
fn fuzz_strict_json() {
    let seeds = seeds(
        &[repo().join("tools"), repo().join("tests/fixtures")],
        &["json", "jsonl"],
    );
    assert!(seeds.len() >= 5, "the seed files are there");
    check!()
        .with_type::<(u8, Vec<Mutation>)>()
        .with_test_time(budget())
        .for_each(|(pick, edits)| {
            let data = mutate(&seeds, *pick, edits);
            let text = String::from_utf8_lossy(&data);
            if let Ok(value) = crate::tools::strict_json::parse(&text) {
                // What parses, re-serialized, parses to the same value.
                let again = crate::tools::strict_json::parse(&value.to_string())
                    .expect("a serialized value parses");
                assert_eq!(again, value);
            }
        });
}

#[test]
fn fuzz_schema_file_loader() {
    let seeds = seeds(
        &[repo().join("tools"), repo().join("tests/fixtures/tools")],
        &["json", "toml"],
    );
    assert!(seeds.len() >= 5, "the seed files are there");
    check!()
        .with_type::<(u8, bool, Vec<Mutation>)>()
        .with_test_time(budget())
        .for_each(|(pick, toml, edits)| {
            let data = mutate(&seeds, *pick, edits);
            let text = String::from_utf8_lossy(&data);
            // No executor file exists in this folder, so nothing is run.
            let path =
                Path::new("/nonexistent-fuzz-dir").join(if *toml { "t.toml" } else { "t.json" });
            if let Ok((spec, _)) = crate::tools::loader::load_text(&text, &path) {
                let mut registry = crate::tools::Registry::new();
                // Registering compiles the schema; an error is fine.
                let _ = registry.register(spec);
            }
        });
}

#[test]
fn fuzz_policy_loader() {
    let seeds = seeds(
        &[
            repo().join("policies"),
            repo().join("tests/fixtures/policies"),
        ],
        &["toml"],
    );
    assert!(seeds.len() >= 5, "the seed files are there");
    check!()
        .with_type::<(u8, Vec<Mutation>)>()
        .with_test_time(budget())
        .for_each(|(pick, edits)| {
            let data = mutate(&seeds, *pick, edits);
            let text = String::from_utf8_lossy(&data);
            // `extends` of a relative path resolves in a folder with no files.
            let _ =
                crate::policy::Policy::from_toml(&text, Path::new("/nonexistent-fuzz-dir/p.toml"));
        });
}
