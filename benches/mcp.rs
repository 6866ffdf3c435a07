//! What `agent mcp` adds to a tool call, measured in the same run against
//! the same call made in-process through the gate (the baseline):
//!
//! * `read_file` (no sandbox: the protocol's own cost shows);
//! * `execute_code` in the process sandbox (the protocol next to a real
//!   sandboxed call).
//!
//! The MCP side is a real `agent mcp` over stdio, driven by rmcp's client
//! (the official Rust SDK), one session, calls one after another.
//! `cargo bench --workspace --bench mcp`. Figures are printed, never
//! asserted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rmcp::model::CallToolRequestParams;
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::ServiceExt;
use serde_json::Value;
use stack_runtime::dispatch::ToolContext;
use stack_runtime::gate::Gate;
use stack_runtime::message::ToolCall;
use stack_runtime::policy::{ApprovalAnswer, ApprovalRequest, Policy};
use stack_runtime::tools::Registry;
use stack_runtime::workspace::Workspace;

/// (tool, arguments, calls measured)
const CASES: &[(&str, &str, usize)] = &[
    ("read_file", r#"{"path": "notes.txt"}"#, 400),
    (
        "execute_code",
        r#"{"language": "bash", "code": "echo hi"}"#,
        40,
    ),
];

fn mean(samples: &[Duration]) -> Duration {
    samples.iter().sum::<Duration>() / u32::try_from(samples.len()).unwrap_or(1)
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let workspace = tempfile::tempdir().expect("tempdir");
    std::fs::write(workspace.path().join("notes.txt"), "hello notes\n").expect("write");

    // Baseline: the gate, in this process.
    let registry = Arc::new(Registry::with_builtins());
    let policy = Arc::new(Policy::preset("trusted").expect("trusted preset"));
    // `trusted` approves what it asks about; so do both sides here.
    let mut gate = Gate::new(registry, policy, "bench")
        .with_approver(Arc::new(|_: &ApprovalRequest| ApprovalAnswer::Yes));
    let ctx = ToolContext::new(Workspace::open(workspace.path()).expect("workspace"));

    // The same calls through `agent mcp` over stdio.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agent"))
        .args([
            "--no-default-tools",
            "mcp",
            "--policy",
            "trusted",
            "--workspace",
        ])
        .arg(workspace.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start agent mcp");
    let stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let client =
        ().serve(AsyncRwTransport::new_client(stdout, stdin))
            .await
            .expect("MCP handshake");

    println!("tool call through `agent mcp` (stdio, rmcp client) vs the gate in-process, same run");
    println!(
        "{:14} {:>6} {:>14} {:>14} {:>12} {:>8}",
        "tool", "calls", "in-process", "over MCP", "added", "ratio"
    );
    for (tool, arguments, calls) in CASES {
        let arguments: Value = serde_json::from_str(arguments).expect("json");
        let object = arguments.as_object().cloned().unwrap_or_default();
        // Warm both paths (zygotes, interpreters, caches) first.
        for _ in 0..3 {
            let call = ToolCall::function("warm", *tool, arguments.to_string());
            // Each call a turn, as `agent mcp` counts them.
            gate.budget().start_turn();
            assert_eq!(gate.call(&call, &ctx).await.status.as_str(), "ok");
            let params =
                CallToolRequestParams::new(tool.to_string()).with_arguments(object.clone());
            let result = client.call_tool(params).await.expect("MCP call");
            assert_ne!(result.is_error, Some(true), "{result:?}");
        }
        let mut local = Vec::with_capacity(*calls);
        let mut remote = Vec::with_capacity(*calls);
        for n in 0..*calls {
            let call = ToolCall::function(format!("c{n}"), *tool, arguments.to_string());
            gate.budget().start_turn();
            let started = Instant::now();
            let outcome = gate.call(&call, &ctx).await;
            let _ = gate.text_for_model(&outcome);
            local.push(started.elapsed());
            let params =
                CallToolRequestParams::new(tool.to_string()).with_arguments(object.clone());
            let started = Instant::now();
            let result = client.call_tool(params).await.expect("MCP call");
            remote.push(started.elapsed());
            assert_ne!(result.is_error, Some(true), "{result:?}");
        }
        let (local_mean, remote_mean) = (mean(&local), mean(&remote));
        let (local_median, remote_median) = (median(&mut local), median(&mut remote));
        println!(
            "{:14} {:>6} {:>11.0} µs {:>11.0} µs {:>9.0} µs {:>7.2}x   (medians {:.0} / {:.0} µs)",
            tool,
            calls,
            local_mean.as_secs_f64() * 1e6,
            remote_mean.as_secs_f64() * 1e6,
            (remote_mean.as_secs_f64() - local_mean.as_secs_f64()) * 1e6,
            remote_mean.as_secs_f64() / local_mean.as_secs_f64().max(1e-9),
            local_median.as_secs_f64() * 1e6,
            remote_median.as_secs_f64() * 1e6,
        );
    }
    let _ = client.cancel().await;
    let _ = child.kill().await;
}
