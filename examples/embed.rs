//! A host app that embeds the runtime: its own Rust tool (typed arguments,
//! schema from the struct), its own policy, and an approval callback.
//!
//! ```sh
//! cargo run --release --example embed
//! ```

use futures::StreamExt;
use std::path::Path;
use std::sync::Arc;

use stack_runtime::agent::{Event, Runtime, SessionConfig};
use stack_runtime::model::llama::{Model, ModelOptions, SamplingOptions};
use stack_runtime::model::ToolChoice;
use stack_runtime::policy::{ApprovalAnswer, ApprovalRequest, Policy};

/// Arguments of the host's tool.
#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct StockArgs {
    /// The product code, like "SKU-1".
    sku: String,
}

const POLICY: &str = r#"
extends = "default"
description = "inventory assistant: stock lookups allowed, no code"

[tools.lookup_stock]
decision = "allow"

[tools.execute_code]
decision = "deny"
reason = "this assistant does not run code"

[privacy]
keep_transcripts = false
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let model = Model::load(ModelOptions::default())?;
    let approver = |request: &ApprovalRequest| {
        println!(
            "[host] approval asked for {} by {}: declining",
            request.tool, request.rule
        );
        ApprovalAnswer::No
    };
    let workspace = tempfile::tempdir()?;
    let runtime = Runtime::builder()
        .model(model)
        .rust_tool(
            "lookup_stock",
            "Look up how many units of a product are in stock.",
            |args: StockArgs, _ctx| match args.sku.as_str() {
                "SKU-1" => Ok("SKU-1: 12 units in stock".to_string()),
                other => Err(format!("unknown product {other}; known: SKU-1")),
            },
        )
        .policy(Policy::from_toml(POLICY, Path::new("embed-policy.toml"))?)
        .approval_handler(Arc::new(approver))
        .workspace(workspace.path())
        .build()?;
    let config = SessionConfig {
        tool_choice: ToolChoice::Named("lookup_stock".into()),
        sampling: SamplingOptions {
            temperature: 0.0,
            max_tokens: 96,
            ..SamplingOptions::default()
        },
        max_steps: 2,
        ..SessionConfig::default()
    };
    let session = runtime.session(config).await?;
    let mut turn = session.send("How many units of SKU-1 do we have?");
    while let Some(event) = turn.next().await {
        match event {
            Event::ToolCallProposed { call, .. } => println!(
                "[tool call] {}({})",
                call.function.name, call.function.arguments
            ),
            Event::ToolFinished { name, outcome, .. } => println!(
                "[tool result] {name}: {} {}",
                outcome.status.as_str(),
                outcome.to_model_text().trim()
            ),
            Event::TurnFinished { reason, steps, .. } => {
                println!("[turn finished] {reason} after {steps} step(s)")
            }
            Event::Error { message } => println!("[error] {message}"),
            _ => {}
        }
    }
    Ok(())
}
