//! A new tool defined only by a schema file plus a script that runs in the
//! WASI sandbox: no Rust code for the tool itself.
//!
//! ```sh
//! cargo run --release --example custom_tool
//! ```

use std::sync::Arc;

use stack_runtime::dispatch::ToolContext;
use stack_runtime::gate::Gate;
use stack_runtime::message::ToolCall;
use stack_runtime::policy::Policy;
use stack_runtime::tools::Registry;
use stack_runtime::workspace::Workspace;

const SCHEMA: &str = r#"{
  "name": "word_stats",
  "description": "Count the words and lines of a text and find the longest word.",
  "parameters": {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 1}},
    "required": ["text"],
    "additionalProperties": false
  },
  "executor": {"type": "wasi", "runtime": "python", "script": "word_stats.py"}
}"#;

const SCRIPT: &str = r#"import json, sys
text = json.load(sys.stdin)["text"]
words = text.split()
print(json.dumps({"words": len(words), "lines": len(text.splitlines()), "longest": max(words, key=len)}))
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The user's tool folder: a schema file and its script.
    let tools = tempfile::tempdir()?;
    std::fs::write(tools.path().join("word_stats.json"), SCHEMA)?;
    std::fs::write(tools.path().join("word_stats.py"), SCRIPT)?;

    let mut registry = Registry::with_builtins();
    for problem in registry.load_dir(tools.path()) {
        eprintln!("warning: {problem}");
    }
    let tool = registry
        .get("word_stats")
        .ok_or_else(|| anyhow::anyhow!("word_stats did not load"))?;
    println!("the model sees: {}", tool.spec().to_openai());

    let policy = Policy::from_toml("extends = \"trusted\"", std::path::Path::new("inline.toml"))?;
    let mut gate = Gate::new(Arc::new(registry), Arc::new(policy), "custom-tool-example");
    let workspace = tempfile::tempdir()?;
    let ctx = ToolContext::new(Workspace::open(workspace.path())?);
    for arguments in [
        r#"{"text": "the quick brown fox\njumps over the extraordinarily lazy dog"}"#,
        r#"{"text": ""}"#,
    ] {
        let outcome = gate
            .call(&ToolCall::function("call_1", "word_stats", arguments), &ctx)
            .await;
        println!(
            "word_stats({arguments}) -> [{}] {}",
            outcome.status.as_str(),
            outcome.to_model_text().trim()
        );
    }
    Ok(())
}
