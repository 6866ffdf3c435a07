//! Validate model-style tool calls against their schemas and run the valid
//! ones in a throwaway workspace.
//!
//! ```sh
//! cargo run --release --example validate_and_run
//! ```

use stack_runtime::dispatch::{self, ToolContext};
use stack_runtime::message::ToolCall;
use stack_runtime::tools::Registry;
use stack_runtime::workspace::Workspace;

/// A host tool: its schema comes from this struct.
#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ShoutArgs {
    /// Text to shout.
    text: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut registry = Registry::with_builtins();
    registry.register_host_tool("shout", "Upper-case some text.", |args: ShoutArgs, _ctx| {
        Ok(args.text.to_uppercase())
    })?;

    let root = std::env::temp_dir().join(format!("stack-runtime-example-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let ctx = ToolContext::new(Workspace::open(&root)?);

    let calls = [
        ToolCall::function(
            "call_1",
            "write_file",
            r#"{"path": "hello.txt", "content": "hi there\n"}"#,
        ),
        ToolCall::function("call_2", "read_file", r#"{"path": "hello.txt"}"#),
        ToolCall::function("call_3", "shout", r#"{"text": "hi there"}"#),
        ToolCall::function("call_4", "read_file", r#"{"path": "../../etc/passwd"}"#),
        ToolCall::function("call_5", "write_file", r#"{"path": "x.txt"}"#),
        ToolCall::function("call_6", "reed_file", r#"{"path": "hello.txt"}"#),
    ];
    for call in &calls {
        println!("> {}({})", call.function.name, call.function.arguments);
        match registry.validate(call) {
            Ok(valid) => {
                let outcome = dispatch::execute(&valid, &ctx).await;
                println!(
                    "  {}: {}",
                    outcome.status.as_str(),
                    outcome.to_model_text().trim_end()
                );
            }
            Err(rejected) => println!("  invalid: {rejected}"),
        }
    }
    std::fs::remove_dir_all(&root)?;
    Ok(())
}
