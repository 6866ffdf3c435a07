//! The same multi-turn tool session through the remote backend (against a
//! real llama-server built by `scripts/setup --peers`) and through the
//! in-process backend, on the same GGUF, in the same run:
//!
//! * TTFT (send → first token event) at turn 1 and turn 10;
//! * generation speed (tokens per second of model time);
//! * the runtime's own overhead per remote request: the wall time of a
//!   request through `RemoteSession::complete` minus the time llama-server
//!   reports for it (`timings`), next to the same for a bare streaming HTTP
//!   request of the same body (the same rendered prompt to the same
//!   `/completion` endpoint, the same sampling and token budget), sent by a
//!   plain client; after one untimed request of each, medians and means
//!   of ten (see `overhead` for why the first is left out).
//!
//! `cargo bench -p stack-runtime --bench remote`. Figures are printed, never
//! asserted. Backends run one after the other (two cores).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use stack_runtime::agent::{Event, Runtime, SessionConfig};
use stack_runtime::assets::Asset;
use stack_runtime::model::llama::{Model, ModelOptions};
use stack_runtime::model::remote::{RemoteConfig, RemoteModel};
use stack_runtime::model::{CompletionRequest, ModelBackend, SamplingOptions, ToolChoice};
use stack_runtime::policy::{ApprovalAnswer, ApprovalRequest, Policy};

const TURNS: usize = 10;

fn peer(name: &str) -> std::path::PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
        .expect("HOME");
    cache
        .join("stack-runtime/peers/llama.cpp-0.3.36/bin")
        .join(name)
}

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(port: u16) -> Server {
    let binary = peer("llama-server");
    assert!(
        binary.is_file(),
        "run scripts/setup --peers first ({} is missing)",
        binary.display()
    );
    let model = Asset::DefaultModel.locate().expect("run scripts/setup");
    let child = std::process::Command::new(binary)
        .arg("-m")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-c", "4096", "-t", "2", "-np", "1", "--jinja", "--no-webui"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("llama-server");
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            std::thread::sleep(Duration::from_millis(500));
            return server;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("llama-server did not start");
}

fn yes(_: &ApprovalRequest) -> ApprovalAnswer {
    ApprovalAnswer::Yes
}

fn sampling() -> SamplingOptions {
    SamplingOptions {
        temperature: 0.0,
        // Room for a whole constrained call, so both backends do the same
        // work each turn (a call, its result, an answer).
        max_tokens: 128,
        // Off: llama-server is not sent it (see `SamplingOptions`).
        dry_multiplier: Some(0.0),
        ..SamplingOptions::default()
    }
}

/// TTFT per turn (ms), generated tokens and total turn time; prints what
/// each backend did, so the two can be seen to do the same work.
async fn session_figures(backend: Arc<dyn ModelBackend>) -> (Vec<f64>, u64, f64) {
    let name = backend.info().detail;
    let workspace = tempfile::tempdir().expect("tempdir");
    std::fs::write(workspace.path().join("notes.txt"), "buy milk\n").expect("write");
    let runtime = Runtime::builder()
        .backend(backend)
        .policy(Policy::preset("default").expect("policy"))
        .approval_handler(Arc::new(yes))
        .workspace(workspace.path())
        .transcripts(None)
        .build()
        .expect("runtime");
    let session = runtime
        .session(SessionConfig {
            tool_choice: ToolChoice::Named("list_dir".into()),
            sampling: sampling(),
            max_steps: 2,
            ..SessionConfig::default()
        })
        .await
        .expect("session");
    let (mut ttft, mut generated, mut total) = (Vec::new(), 0, 0.0);
    let (mut steps_all, mut evaluated, mut reused) = (0, 0, 0);
    for turn in 0..TURNS {
        let started = Instant::now();
        let mut first = None;
        let mut events = session.send(format!("Turn {turn}: what files are in this folder?"));
        while let Some(event) = events.next().await {
            match event {
                Event::Token { .. } if first.is_none() => {
                    first = Some(started.elapsed().as_secs_f64() * 1e3)
                }
                Event::TurnFinished {
                    counters, steps, ..
                } => {
                    generated += counters.generated;
                    evaluated += counters.prompt_evaluated;
                    reused += counters.prompt_reused;
                    steps_all += steps;
                }
                Event::Error { message } => panic!("turn {turn}: {message}"),
                _ => {}
            }
        }
        total += started.elapsed().as_secs_f64();
        ttft.push(first.unwrap_or(f64::NAN));
    }
    println!(
        "{name}: {steps_all} model steps, {evaluated} prompt tokens evaluated, {reused} reused, {generated} generated"
    );
    (ttft, generated, total)
}

/// (wall − server-reported) ms for `complete` calls through the runtime,
/// and for the same streaming request sent by a bare client, after one
/// untimed request of each: the first request of a new prompt (the slot
/// still holds the tool session's) got its response headers 75 ms late in
/// one run, time llama-server leaves out of its timings, which would
/// otherwise be charged to whichever side went first. Returns each side's
/// median and mean.
async fn overhead(url: &str, model: Arc<RemoteModel>) -> (Spread, Spread, u64) {
    let request = CompletionRequest {
        messages: vec![stack_runtime::message::Message::user(
            "Tell me a long story about a robot who learns to paint.",
        )],
        tools: Vec::new(),
        tool_choice: ToolChoice::None,
        sampling: sampling(),
        response_format: None,
        argument_values: Default::default(),
    };
    // The bare client below sends what the prompted path sends.
    assert!(
        model.prompted(),
        "SmolLM2's template takes the prompted path"
    );
    let mut session = Arc::clone(&model).open_session().await.expect("session");
    let client = reqwest::Client::new();
    // The body the runtime sends on llama-server's prompted path for a
    // step with no tools: the prompt rendered with the server's template.
    let root = url.trim_end_matches("/v1");
    let props: serde_json::Value = client
        .get(format!("{root}/props"))
        .send()
        .await
        .expect("props")
        .json()
        .await
        .expect("props json");
    let template = props["chat_template"].as_str().expect("chat_template");
    let prompt = stack_runtime::model::PromptRenderer::new(
        template,
        "You are a helpful assistant that can call tools.",
    )
    .expect("template")
    .render(&request.messages, &[])
    .expect("render");
    let body = stack_runtime::model::remote::completion_body(&prompt, &request.sampling);
    let (mut through, mut bare, mut generated) = (Vec::new(), Vec::new(), 0);
    for turn in 0..=TURNS {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let started = Instant::now();
        let generation = session
            .complete(request.clone(), tx, Arc::default())
            .await
            .expect("complete");
        let wall = started.elapsed().as_secs_f64() * 1e3;
        let through_ms = wall - generation.server_ms.unwrap_or(wall);

        let started = Instant::now();
        let response = client
            .post(format!("{root}/completion"))
            .json(&body)
            .send()
            .await
            .expect("bare request");
        let text = response.text().await.expect("bare body");
        let wall = started.elapsed().as_secs_f64() * 1e3;
        let server = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter_map(|v| {
                let t = v.get("timings")?;
                Some(t.get("prompt_ms")?.as_f64()? + t.get("predicted_ms")?.as_f64()?)
            })
            .next_back()
            .unwrap_or(wall);
        if turn > 0 {
            through.push(through_ms);
            bare.push(wall - server);
            generated += generation.counters.generated;
        }
    }
    (
        Spread::of(through),
        Spread::of(bare),
        generated / TURNS as u64,
    )
}

/// The median and mean of some milliseconds.
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    mean: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Spread {
        values.sort_by(f64::total_cmp);
        Spread {
            median: values[values.len() / 2],
            mean: values.iter().sum::<f64>() / values.len() as f64,
        }
    }
}

fn main() {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let port = stack_test_support::free_port();
    let server = start_server(port);
    let url = format!("http://127.0.0.1:{port}/v1");
    let remote = tokio
        .block_on(RemoteModel::connect(RemoteConfig::new(url.clone())))
        .expect("connect");
    let (remote_ttft, remote_tokens, remote_time) = tokio.block_on(session_figures(remote.clone()));
    let (through, bare, generated) = tokio.block_on(overhead(&url, remote));
    drop(server);
    let local = Model::load(ModelOptions {
        threads: Some(2),
        ..ModelOptions::default()
    })
    .expect("model");
    let (local_ttft, local_tokens, local_time) = tokio.block_on(session_figures(local));
    println!("{TURNS}-turn tool session (list_dir, then an answer), SmolLM2-135M Q4_1, greedy, 2 threads");
    println!(
        "{:<28} {:>14} {:>14} {:>10}",
        "", "in process", "llama-server", "ratio"
    );
    let row = |name: &str, a: f64, b: f64| {
        println!("{name:<28} {a:>14.1} {b:>14.1} {:>9.2}x", b / a);
    };
    row("TTFT turn 1 (ms)", local_ttft[0], remote_ttft[0]);
    row(
        "TTFT turn 10 (ms)",
        local_ttft[TURNS - 1],
        remote_ttft[TURNS - 1],
    );
    row(
        "tokens/s over the session",
        local_tokens as f64 / local_time,
        remote_tokens as f64 / remote_time,
    );
    println!(
        "overhead per remote request (wall − server time, ms; median / mean of {TURNS} after one untimed each; no tools, {generated} tokens each): through the runtime {:.2} / {:.2}, bare client {:.2} / {:.2}, runtime's own {:.2} / {:.2}",
        through.median,
        through.mean,
        bare.median,
        bare.mean,
        through.median - bare.median,
        through.mean - bare.mean
    );
}
