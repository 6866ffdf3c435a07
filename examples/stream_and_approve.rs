//! The async embedding API: a turn is a `futures::Stream` of events that
//! drives itself, and approvals are answered from another task through a
//! `ChannelApprover`, the way an HTTP handler or a UI task would answer.
//! The model (the default SmolLM2) is asked to write a file; the default
//! policy asks before `write_file`, the approving task says yes, and the
//! file is written in a temporary workspace.
//!
//! ```sh
//! cargo run --release --example stream_and_approve
//! ```

use std::sync::Arc;

use futures::StreamExt;
use stack_runtime::agent::{Event, Runtime, SessionConfig, TurnEnd};
use stack_runtime::model::llama::{Model, ModelOptions, SamplingOptions};
use stack_runtime::model::ToolChoice;
use stack_runtime::policy::{ApprovalAnswer, ChannelApprover, Policy};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let workspace = tempfile::tempdir()?;
    let (approver, mut requests) = ChannelApprover::new();
    // The approving side: a task of its own. It sees each request as it
    // comes, answers it, and could as well wait for a person.
    let approvals = tokio::spawn(async move {
        let mut answered = 0;
        while let Some(pending) = requests.recv().await {
            println!(
                "[approval asked] {}({}) by {}",
                pending.request.tool, pending.request.arguments, pending.request.rule
            );
            pending.answer(ApprovalAnswer::Yes);
            answered += 1;
        }
        answered
    });
    let runtime = Runtime::builder()
        .model(Model::load(ModelOptions::default())?)
        .policy(Policy::preset("default")?)
        .approval_handler(Arc::new(approver))
        .workspace(workspace.path())
        .transcripts(None)
        .build()?;
    let config = SessionConfig {
        tool_choice: ToolChoice::Named("write_file".into()),
        sampling: SamplingOptions {
            temperature: 0.0,
            seed: 7,
            max_tokens: 96,
            ..SamplingOptions::default()
        },
        max_steps: 1,
        ..SessionConfig::default()
    };
    let session = runtime.session(config).await?;
    // The turn runs in its own task; this loop only reads its events.
    let mut turn = session.send("Call write_file with path \"hello.txt\" and content \"hello\".");
    let mut ended = None;
    while let Some(event) = turn.next().await {
        match event {
            Event::ToolCallProposed { call, .. } => println!(
                "[tool call] {}({})",
                call.function.name, call.function.arguments
            ),
            Event::ApprovalNeeded { request } => {
                println!("[approval needed] {}", request.tool)
            }
            Event::ToolFinished { name, outcome, .. } => {
                println!("[tool result] {name}: {}", outcome.status.as_str())
            }
            Event::TurnFinished { reason, steps, .. } => {
                println!("[turn finished] {reason} after {steps} step(s)");
                ended = Some(reason);
            }
            Event::Error { message } => println!("[error] {message}"),
            _ => {}
        }
    }
    drop(runtime);
    drop(session);
    let answered = approvals.await?;
    let written: Vec<String> = std::fs::read_dir(workspace.path())?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    println!("[approvals answered] {answered}");
    println!("[workspace] {}", written.join(", "));
    anyhow::ensure!(ended.is_some(), "the stream ended without TurnFinished");
    anyhow::ensure!(ended != Some(TurnEnd::Error), "the turn failed");
    Ok(())
}
