//! How many runtime instances can share one inference server: K
//! independent runtimes (each its own `Runtime`, remote model connection,
//! workspace and session) run the same multi-turn tool session at once
//! against one llama-server started with `-np K_max` (continuous batching),
//! for each K in the list, in one run. The first K listed (1 by default)
//! is the baseline that every other row is a ratio against.
//!
//! Reported per K: turns finished, aggregate generated tokens per second,
//! the aggregate ratio against K = 1, and p50/p95 of the time to first token
//! and of a whole turn (a constrained `list_dir` call, its result, an
//! answer). A turn that ends in an error (the server gone, say) is counted
//! and its first message printed. Figures are printed, never asserted.
//!
//! ```text
//! cargo bench -p stack-runtime --bench remote_scale
//! ```
//!
//! Settings (environment):
//! * `STACK_BENCH_LLAMA_SERVER`: the llama-server binary (default: the peer
//!   that `scripts/setup --peers` builds);
//! * `STACK_BENCH_MODEL`: the GGUF (default: the default model);
//! * `STACK_BENCH_GPU_LAYERS`: `-ngl` for the server (default 0, CPU);
//! * `STACK_BENCH_SERVER_THREADS`: `-t` for the server (default 2);
//! * `STACK_BENCH_SESSIONS`: the K list (default `1,2,4`);
//! * `STACK_BENCH_TURNS`: turns per session (default 3).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use stack_runtime::agent::{Event, Runtime, SessionConfig};
use stack_runtime::assets::Asset;
use stack_runtime::model::remote::{RemoteConfig, RemoteModel};
use stack_runtime::model::{SamplingOptions, ToolChoice};
use stack_runtime::policy::{ApprovalAnswer, ApprovalRequest, Policy};

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not valid")),
        Err(_) => default,
    }
}

fn server_binary() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("STACK_BENCH_LLAMA_SERVER") {
        return path.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
        .expect("HOME");
    cache.join("stack-runtime/peers/llama.cpp-0.3.36/bin/llama-server")
}

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(port: u16, slots: usize) -> Server {
    let binary = server_binary();
    assert!(
        binary.is_file(),
        "run scripts/setup --peers first, or set STACK_BENCH_LLAMA_SERVER ({} is missing)",
        binary.display()
    );
    let model = std::env::var_os("STACK_BENCH_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Asset::DefaultModel.locate().expect("run scripts/setup"));
    let gpu_layers: u32 = setting("STACK_BENCH_GPU_LAYERS", 0);
    let threads: u32 = setting("STACK_BENCH_SERVER_THREADS", 2);
    let context = 4096 * slots;
    let child = std::process::Command::new(binary)
        .arg("-m")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-c", &context.to_string(), "-np", &slots.to_string()])
        .args(["-t", &threads.to_string(), "-ngl", &gpu_layers.to_string()])
        .args(["--jinja", "--no-webui"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("llama-server");
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if healthy(port) {
            return server;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("llama-server did not become ready");
}

/// Whether llama-server answers `GET /health` with 200 (it answers 503
/// while the model loads).
fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

fn yes(_: &ApprovalRequest) -> ApprovalAnswer {
    ApprovalAnswer::Yes
}

/// One instance's figures: per-turn TTFT and wall time (ms), tokens made.
#[derive(Default)]
struct Figures {
    ttft_ms: Vec<f64>,
    turn_ms: Vec<f64>,
    generated: u64,
    turns: usize,
    /// Turns that ended in an error event (the server gone, say), with the
    /// first message.
    failed: usize,
    first_error: Option<String>,
}

/// One runtime instance: its own connection, workspace, policy and session.
async fn instance(url: String, id: usize, turns: usize) -> Figures {
    let backend = RemoteModel::connect(RemoteConfig::new(url))
        .await
        .expect("connect");
    let workspace = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        workspace.path().join(format!("notes-{id}.txt")),
        "buy milk\n",
    )
    .expect("write");
    let runtime = Runtime::builder()
        .backend(backend)
        .policy(Policy::preset("default").expect("policy"))
        .approval_handler(Arc::new(yes))
        .workspace(workspace.path())
        .transcripts(None)
        .audit_log(None)
        .build()
        .expect("runtime");
    let session = runtime
        .session(SessionConfig {
            tool_choice: ToolChoice::Named("list_dir".into()),
            sampling: SamplingOptions {
                temperature: 0.0,
                max_tokens: 128,
                ..SamplingOptions::default()
            },
            max_steps: 2,
            ..SessionConfig::default()
        })
        .await
        .expect("session");
    let mut figures = Figures::default();
    for turn in 0..turns {
        let started = Instant::now();
        let mut first = None;
        let mut finished = false;
        let mut events = session.send(format!(
            "Instance {id}, turn {turn}: what files are in this folder?"
        ));
        while let Some(event) = events.next().await {
            match event {
                Event::Token { .. } if first.is_none() => {
                    first = Some(started.elapsed().as_secs_f64() * 1e3);
                }
                Event::TurnFinished { counters, .. } => {
                    figures.generated += counters.generated;
                    finished = true;
                }
                Event::Error { message } => {
                    figures.failed += 1;
                    figures
                        .first_error
                        .get_or_insert(format!("instance {id} turn {turn}: {message}"));
                }
                _ => {}
            }
        }
        figures.turn_ms.push(started.elapsed().as_secs_f64() * 1e3);
        figures.ttft_ms.push(first.unwrap_or(f64::NAN));
        figures.turns += usize::from(finished);
    }
    figures
}

/// The `p`th percentile of the values that are numbers (a turn that
/// streamed no token has no TTFT).
fn percentile(values: &mut Vec<f64>, p: f64) -> f64 {
    values.retain(|v| !v.is_nan());
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}

fn main() {
    let sessions: Vec<usize> = std::env::var("STACK_BENCH_SESSIONS")
        .unwrap_or_else(|_| "1,2,4".into())
        .split(',')
        .map(|k| {
            k.trim()
                .parse()
                .expect("STACK_BENCH_SESSIONS: a list like 1,4,8")
        })
        .collect();
    let turns: usize = setting("STACK_BENCH_TURNS", 3);
    let slots = sessions.iter().copied().max().unwrap_or(1);
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let port = stack_test_support::free_port();
    let server = start_server(port, slots);
    let url = format!("http://127.0.0.1:{port}/v1");
    // One warm-up turn, so model load and first-request costs are not in K = 1.
    tokio.block_on(instance(url.clone(), usize::MAX, 1));
    println!(
        "K runtime instances sharing one llama-server (-np {slots}, -ngl {}), {turns} tool turns each",
        setting::<u32>("STACK_BENCH_GPU_LAYERS", 0)
    );
    println!(
        "{:>4} {:>7} {:>12} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "K", "turns", "agg tok/s", "vs first", "TTFT p50", "TTFT p95", "turn p50", "turn p95"
    );
    let mut baseline = None;
    for &k in &sessions {
        let started = Instant::now();
        let all: Vec<Figures> = tokio.block_on(async {
            let handles: Vec<_> = (0..k)
                .map(|id| tokio::spawn(instance(url.clone(), id, turns)))
                .collect();
            let mut all = Vec::new();
            for handle in handles {
                all.push(handle.await.expect("instance task"));
            }
            all
        });
        let wall = started.elapsed().as_secs_f64();
        let generated: u64 = all.iter().map(|f| f.generated).sum();
        let finished: usize = all.iter().map(|f| f.turns).sum();
        let failed: usize = all.iter().map(|f| f.failed).sum();
        let mut ttft: Vec<f64> = all.iter().flat_map(|f| f.ttft_ms.clone()).collect();
        let mut turn: Vec<f64> = all.iter().flat_map(|f| f.turn_ms.clone()).collect();
        let rate = generated as f64 / wall;
        let base = *baseline.get_or_insert(rate);
        println!(
            "{k:>4} {:>7} {rate:>12.1} {:>8.2}x {:>8.0}ms {:>8.0}ms {:>8.0}ms {:>8.0}ms",
            format!("{finished}/{}", k * turns),
            rate / base,
            percentile(&mut ttft, 50.0),
            percentile(&mut ttft, 95.0),
            percentile(&mut turn, 50.0),
            percentile(&mut turn, 95.0),
        );
        if failed > 0 {
            let first = all.iter().find_map(|f| f.first_error.clone());
            println!(
                "     {failed} turns failed; the first: {}",
                first.unwrap_or_default()
            );
        }
    }
    drop(server);
}
