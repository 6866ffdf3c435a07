//! Run model-style tool calls through the gate: validation against each
//! tool's schema, a policy with an argument rule, an approval callback,
//! redaction, and execution in a throwaway workspace.
//!
//! ```sh
//! cargo run --release --example validate_and_run
//! ```

use std::path::Path;
use std::sync::Arc;

use stack_runtime::dispatch::ToolContext;
use stack_runtime::gate::Gate;
use stack_runtime::message::ToolCall;
use stack_runtime::policy::{ApprovalAnswer, ApprovalRequest, Policy};
use stack_runtime::tools::Registry;
use stack_runtime::workspace::Workspace;

/// A host tool: its schema comes from this struct.
#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ShoutArgs {
    /// Text to shout.
    text: String,
}

const POLICY: &str = r#"
extends = "default"

[tools.shout]
decision = "allow"

[[rules]]
tool = "write_file"
pointer = "/path"
path = true
glob = "secrets/**"
decision = "deny"
reason = "the secrets folder is off limits"
"#;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut registry = Registry::with_builtins();
    registry.register_host_tool("shout", "Upper-case some text.", |args: ShoutArgs, _ctx| {
        Ok(args.text.to_uppercase())
    })?;
    let policy = Policy::from_toml(POLICY, Path::new("example-policy.toml"))?;
    // The host's approval callback: approve writes, decline code.
    let approver = |request: &ApprovalRequest| {
        println!("  ? approval asked for {} ({})", request.tool, request.rule);
        if request.tool == "write_file" {
            ApprovalAnswer::Yes
        } else {
            ApprovalAnswer::No
        }
    };
    let mut gate = Gate::new(Arc::new(registry), Arc::new(policy), "example")
        .with_approver(Arc::new(approver));

    let root = std::env::temp_dir().join(format!("stack-runtime-example-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let ctx = ToolContext::new(Workspace::open(&root)?);

    let calls = [
        ToolCall::function(
            "call_1",
            "write_file",
            r#"{"path": "hello.txt", "content": "key AKIAABCDEFGHIJKLMNOP\n"}"#,
        ),
        ToolCall::function("call_2", "read_file", r#"{"path": "hello.txt"}"#),
        ToolCall::function("call_3", "shout", r#"{"text": "hi there"}"#),
        ToolCall::function(
            "call_4",
            "write_file",
            r#"{"path": "./secrets//token", "content": "x"}"#,
        ),
        ToolCall::function(
            "call_5",
            "execute_code",
            r#"{"code": "print(1)", "language": "python"}"#,
        ),
        ToolCall::function("call_6", "write_file", r#"{"path": "x.txt"}"#),
        ToolCall::function("call_7", "reed_file", r#"{"path": "hello.txt"}"#),
    ];
    for call in &calls {
        println!("> {}({})", call.function.name, call.function.arguments);
        let outcome = gate.call(call, &ctx).await;
        println!(
            "  [{}] {}",
            outcome.status.as_str(),
            gate.text_for_model(&outcome).trim_end()
        );
    }
    std::fs::remove_dir_all(&root)?;
    Ok(())
}
