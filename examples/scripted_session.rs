//! Drives a session non-interactively and prints the event stream as JSON
//! lines (the same events `agent run --json` prints).
//!
//! ```sh
//! cargo run --release --example scripted_session
//! ```

use futures::StreamExt;
use stack_runtime::agent::{Runtime, SessionConfig};
use stack_runtime::model::llama::{Model, ModelOptions, SamplingOptions};
use stack_runtime::model::ToolChoice;
use stack_runtime::policy::Policy;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let workspace = tempfile::tempdir()?;
    std::fs::write(
        workspace.path().join("todo.txt"),
        "1. water the plants\n2. call mum\n",
    )?;
    let runtime = Runtime::builder()
        .model(Model::load(ModelOptions::default())?)
        .policy(Policy::preset("trusted")?)
        .workspace(workspace.path())
        .transcripts(None)
        .build()?;
    let script = [
        (
            "List the files in the workspace.",
            ToolChoice::Named("list_dir".into()),
        ),
        ("Read todo.txt.", ToolChoice::Named("read_file".into())),
        ("Thanks, that is all.", ToolChoice::None),
    ];
    for (prompt, choice) in script {
        let config = SessionConfig {
            tool_choice: choice,
            sampling: SamplingOptions {
                temperature: 0.0,
                max_tokens: 96,
                ..SamplingOptions::default()
            },
            max_steps: 2,
            ..SessionConfig::default()
        };
        let session = runtime.session(config).await?;
        let mut turn = session.send(prompt);
        while let Some(event) = turn.next().await {
            if !matches!(event, stack_runtime::agent::Event::Token { .. }) {
                println!("{}", serde_json::to_string(&event).unwrap_or_default());
            }
        }
    }
    Ok(())
}
