//! What `agent mcp` adds to a tool call, measured in the same run against
//! the same call made in-process through the gate (the baseline):
//!
//! * `read_file` (no sandbox: the protocol's own cost shows);
//! * `execute_code` in the process sandbox (the protocol next to a real
//!   sandboxed call).
//!
//! The MCP side is a real `agent mcp` over each transport, stdio and
//! Streamable HTTP (loopback, with a bearer token), driven by rmcp's client
//! (the official Rust SDK), one session each, calls one after another and
//! interleaved with the baseline's.
//! `cargo bench --workspace --bench mcp`. Figures are printed, never
//! asserted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::RoleClient;
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

type Client = RunningService<RoleClient, ()>;

/// `agent mcp` with these extra arguments, on the bench's workspace.
fn agent_mcp(workspace: &std::path::Path, extra: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_agent"));
    command
        .args(["mcp", "--policy", "trusted", "--workspace"])
        .arg(workspace)
        .args(extra)
        .kill_on_drop(true);
    command
}

/// `agent mcp` over stdio, and a client session on it.
async fn over_stdio(workspace: &std::path::Path) -> (tokio::process::Child, Client) {
    let mut child = agent_mcp(workspace, &[])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start agent mcp");
    let stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let client =
        ().serve(AsyncRwTransport::new_client(stdout, stdin))
            .await
            .expect("MCP handshake over stdio");
    (child, client)
}

/// `agent mcp --http` on a free loopback port with a token, and a client
/// session on it.
async fn over_http(workspace: &std::path::Path) -> (tokio::process::Child, Client) {
    use tokio::io::AsyncBufReadExt;
    const TOKEN: &str = "bench-token-0123456789abcdef";
    let mut child = agent_mcp(
        workspace,
        &[
            "--http",
            "127.0.0.1:0",
            "--token-env",
            "STACK_BENCH_MCP_TOKEN",
        ],
    )
    .env("STACK_BENCH_MCP_TOKEN", TOKEN)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("start agent mcp --http");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let url = loop {
        let line = lines
            .next_line()
            .await
            .expect("read stderr")
            .expect("agent mcp --http exited before it listened");
        if let Some(url) = line.strip_prefix("agent mcp: serving MCP at ") {
            break url.trim().to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = StreamableHttpClientTransportConfig::with_uri(url).auth_header(TOKEN.to_string());
    let client =
        ().serve(StreamableHttpClientTransport::from_config(config))
            .await
            .expect("MCP handshake over HTTP");
    (child, client)
}

async fn call(client: &Client, tool: &str, arguments: &serde_json::Map<String, Value>) -> Duration {
    let params = CallToolRequestParams::new(tool.to_string()).with_arguments(arguments.clone());
    let started = Instant::now();
    let result = client.call_tool(params).await.expect("MCP call");
    let took = started.elapsed();
    assert_ne!(result.is_error, Some(true), "{result:?}");
    took
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

    let (mut stdio_child, stdio) = over_stdio(workspace.path()).await;
    let (mut http_child, http) = over_http(workspace.path()).await;

    println!("tool call through `agent mcp` (rmcp client) vs the gate in-process, same run; means (medians)");
    println!(
        "{:14} {:>6} {:>18} {:>26} {:>26}",
        "tool", "calls", "in-process", "stdio (ratio)", "HTTP (ratio)"
    );
    for (tool, arguments, calls) in CASES {
        let arguments: Value = serde_json::from_str(arguments).expect("json");
        let object = arguments.as_object().cloned().unwrap_or_default();
        // Warm every path (zygotes, interpreters, caches, connections) first.
        for _ in 0..3 {
            let call_ = ToolCall::function("warm", *tool, arguments.to_string());
            // Each call a turn, as `agent mcp` counts them.
            gate.budget().start_turn();
            assert_eq!(gate.call(&call_, &ctx).await.status.as_str(), "ok");
            call(&stdio, tool, &object).await;
            call(&http, tool, &object).await;
        }
        let mut local = Vec::with_capacity(*calls);
        let mut over_stdio = Vec::with_capacity(*calls);
        let mut over_http = Vec::with_capacity(*calls);
        for n in 0..*calls {
            let call_ = ToolCall::function(format!("c{n}"), *tool, arguments.to_string());
            gate.budget().start_turn();
            let started = Instant::now();
            let outcome = gate.call(&call_, &ctx).await;
            let _ = gate.text_for_model(&outcome);
            local.push(started.elapsed());
            over_stdio.push(call(&stdio, tool, &object).await);
            over_http.push(call(&http, tool, &object).await);
        }
        let base = mean(&local).as_secs_f64();
        let cell = |samples: &mut Vec<Duration>| {
            let m = mean(samples).as_secs_f64();
            format!(
                "{:.0} µs ({:.0}) {:.2}x",
                m * 1e6,
                median(samples).as_secs_f64() * 1e6,
                m / base.max(1e-9)
            )
        };
        println!(
            "{:14} {:>6} {:>18} {:>26} {:>26}",
            tool,
            calls,
            format!(
                "{:.0} µs ({:.0})",
                base * 1e6,
                median(&mut local).as_secs_f64() * 1e6
            ),
            cell(&mut over_stdio),
            cell(&mut over_http),
        );
    }
    let _ = stdio.cancel().await;
    let _ = http.cancel().await;
    let _ = stdio_child.kill().await;
    let _ = http_child.kill().await;
}
