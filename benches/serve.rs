//! Sessions batched on one model, against serving them one after another
//! and against llama-server's own continuous batching, in the same run on
//! the same GGUF:
//!
//! * **batched**: one `Model` with `parallel = N` (one context, N slots,
//!   each a KV stream of its own; `model/src/batch.rs`), N sessions
//!   generating at once;
//! * **serial**: one `Model` with `parallel = 1` (a context per session),
//!   the same N sessions, which take turns (the runtime's behaviour before
//!   batching);
//! * **llama-server -np N** (built by `scripts/setup --peers` from the
//!   llama.cpp tree in the `llama-cpp-python` sdist), N concurrent
//!   streaming chat completions.
//!
//! At 1, 4 and 8 concurrent sessions: aggregate generation tokens per
//! second (all tokens generated over the wall time from the first request
//! to the last token) and p50/p95 time to first token. Each session asks
//! for a different story, greedy, up to [`MAX_TOKENS`] tokens.
//!
//! `cargo bench --workspace --bench serve` (`BENCH_ROUNDS=5` for more
//! rounds; default 3). Figures are printed, never asserted. The
//! configurations run one after the other (two cores), in rounds, each
//! round in another order so that drift on a shared machine hits all
//! alike; each figure is the median over the rounds, each ratio the
//! median of the rounds' own ratios (their range printed beside it).
//! Every session of every round opens with a system message of its own,
//! so no prompt is served from a cache (the runtime's reused prompt
//! tokens are printed: the few of the template's opening at most).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use stack_runtime::assets::Asset;
use stack_runtime::message::Message;
use stack_runtime::model::llama::{Model, ModelOptions};
use stack_runtime::model::{CompletionRequest, ModelBackend, SamplingOptions, ToolChoice};

const MAX_TOKENS: u32 = 96;
const SLOT: u32 = 1024;
const TOPICS: [&str; 8] = [
    "a lighthouse keeper",
    "a lost cat",
    "a desert caravan",
    "a clockmaker",
    "a mountain village",
    "a river pilot",
    "a night market",
    "an old library",
];

/// The system message of session `n` in round `round`: its first words
/// differ from session to session and round to round, so no KV prefix of
/// another session or an earlier round serves it (without one, the
/// model's template opens every prompt with the same default).
fn system(n: usize, round: usize) -> String {
    format!("Round {round}, writer {n}. You are a storyteller.")
}

/// The prompt of session `n`.
fn prompt(n: usize) -> String {
    format!(
        "Write a long story about {}. Make it at least ten sentences.",
        TOPICS[n % TOPICS.len()]
    )
}

/// What one configuration did at one concurrency.
struct Figures {
    tokens: u64,
    /// Prompt tokens served from a KV cache (the runtime's only).
    reused: u64,
    wall: f64,
    ttft_ms: Vec<f64>,
}

impl Figures {
    /// The figures of sessions that each reported (tokens generated, time
    /// to first token, time to their end) from the same start.
    fn of(done: &[(u64, Duration, Duration)], reused: u64) -> Figures {
        Figures {
            tokens: done.iter().map(|(t, _, _)| t).sum(),
            reused,
            wall: done
                .iter()
                .map(|(_, _, end)| end.as_secs_f64())
                .fold(0.0, f64::max),
            ttft_ms: done
                .iter()
                .map(|(_, ttft, _)| ttft.as_secs_f64() * 1e3)
                .collect(),
        }
    }

    fn throughput(&self) -> f64 {
        self.tokens as f64 / self.wall
    }

    fn ttft(&self, quantile: f64) -> f64 {
        let mut sorted = self.ttft_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let index = ((sorted.len() as f64 - 1.0) * quantile).round() as usize;
        sorted.get(index).copied().unwrap_or(f64::NAN)
    }
}

/// N sessions of `backend` generating at once.
async fn in_process(backend: Arc<dyn ModelBackend>, sessions: usize, round: usize) -> Figures {
    let mut opened = Vec::new();
    for _ in 0..sessions {
        opened.push(
            Arc::clone(&backend)
                .open_session()
                .await
                .expect("open a session"),
        );
    }
    let started = Instant::now();
    let runs = opened
        .into_iter()
        .enumerate()
        .map(|(n, mut session)| async move {
            let request = CompletionRequest {
                messages: vec![Message::system(system(n, round)), Message::user(prompt(n))],
                tools: Vec::new(),
                tool_choice: ToolChoice::None,
                sampling: SamplingOptions {
                    temperature: 0.0,
                    max_tokens: MAX_TOKENS,
                    // Off: llama-server, compared with, samples without.
                    dry_multiplier: Some(0.0),
                    ..SamplingOptions::default()
                },
                response_format: None,
                argument_values: Default::default(),
            };
            let (deltas, mut pieces) = tokio::sync::mpsc::unbounded_channel();
            let first = tokio::spawn(async move {
                let got = pieces.recv().await.map(|_| started.elapsed());
                while pieces.recv().await.is_some() {}
                got
            });
            let generation = session
                .complete(request, deltas, Arc::new(AtomicBool::new(false)))
                .await
                .expect("generate");
            let ttft = first.await.expect("joined").unwrap_or_default();
            (
                (generation.counters.generated, ttft, started.elapsed()),
                generation.counters.prompt_reused,
            )
        });
    let done: Vec<_> = futures::future::join_all(runs).await;
    let reused = done.iter().map(|(_, reused)| reused).sum();
    let done: Vec<_> = done.into_iter().map(|(figures, _)| figures).collect();
    Figures::of(&done, reused)
}

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn llama_server(slots: usize, port: u16) -> Server {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
        .expect("HOME");
    let binary = cache.join("stack-runtime/peers/llama.cpp-0.3.36/bin/llama-server");
    assert!(binary.is_file(), "run scripts/setup --peers first");
    let model = Asset::DefaultModel.locate().expect("run scripts/setup");
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let child = std::process::Command::new(binary)
        .arg("-m")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-c", &(SLOT as usize * slots).to_string()])
        .args(["-np", &slots.to_string(), "-t", &threads.to_string()])
        .args(["--jinja", "--no-webui", "--cont-batching"])
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

/// N concurrent streaming chat completions against llama-server.
async fn against_llama_server(port: u16, sessions: usize, round: usize) -> Figures {
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let started = Instant::now();
    let runs = (0..sessions).map(|n| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let body = serde_json::json!({
                "messages": [
                    {"role": "system", "content": system(n, round)},
                    {"role": "user", "content": prompt(n)},
                ],
                "max_tokens": MAX_TOKENS, "temperature": 0, "stream": true,
                "stream_options": {"include_usage": true}, "cache_prompt": false,
            });
            let response = http.post(&url).json(&body).send().await.expect("request");
            let mut stream = response.bytes_stream();
            let (mut first, mut tokens, mut buffer) = (None, 0u64, String::new());
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.expect("chunk");
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let event: String = buffer.drain(..end + 2).collect();
                    let Some(data) = event.trim().strip_prefix("data: ") else {
                        continue;
                    };
                    let Ok(value) = serde_json::from_str::<serde_json::Value>(data) else {
                        continue;
                    };
                    if value.pointer("/choices/0/delta/content").is_some() && first.is_none() {
                        first = Some(started.elapsed());
                    }
                    if let Some(n) = value
                        .pointer("/usage/completion_tokens")
                        .and_then(|v| v.as_u64())
                    {
                        tokens = n;
                    }
                }
            }
            (tokens, first.unwrap_or_default(), started.elapsed())
        }
    });
    Figures::of(&futures::future::join_all(runs).await, 0)
}

/// The median (of an even count, the mean of the two middle values).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[middle],
        _ => (values[middle - 1] + values[middle]) / 2.0,
    }
}

/// The medians over the rounds of one configuration's figures.
fn line(name: &str, sessions: usize, rounds: &[Figures]) {
    let of = |figure: &dyn Fn(&Figures) -> f64| median(rounds.iter().map(figure).collect());
    println!(
        "  {name:<22} {sessions} sessions: {:>7.1} tok/s aggregate ({:.0} tokens in {:.2} s), TTFT p50 {:>7.1} ms, p95 {:>7.1} ms",
        of(&Figures::throughput),
        of(&|f| f.tokens as f64),
        of(&|f| f.wall),
        of(&|f| f.ttft(0.5)),
        of(&|f| f.ttft(0.95))
    );
}

/// The median over the rounds of `a`'s throughput over `b`'s, and the
/// range of the rounds' ratios: `1.02x (0.97-1.08)`.
fn ratio(a: &[Figures], b: &[Figures]) -> String {
    let ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(a, b)| a.throughput() / b.throughput())
        .collect();
    let low = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let high = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.2}x ({low:.2}-{high:.2})", median(ratios))
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
        .max(1);
    println!(
        "sessions batched on one model (SmolLM2-135M Q4_1, greedy, up to {MAX_TOKENS} tokens each; \
         medians of {rounds} rounds)"
    );
    for sessions in [1usize, 4, 8] {
        let batched = Model::load(ModelOptions {
            context_size: SLOT,
            parallel: sessions.max(2) as u32,
            ..ModelOptions::default()
        })
        .expect("load");
        let serial: Arc<dyn ModelBackend> = Model::load(ModelOptions {
            context_size: SLOT,
            ..ModelOptions::default()
        })
        .expect("load");
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
            listener.local_addr().expect("addr").port()
        };
        let server = llama_server(sessions, port);
        // [batched, serial, llama-server], each round in another order.
        let mut figures: [Vec<Figures>; 3] = Default::default();
        for round in 0..rounds {
            for turn in 0..3 {
                let config = (turn + round) % 3;
                let done = match config {
                    0 => runtime.block_on(in_process(
                        Arc::clone(&batched) as Arc<dyn ModelBackend>,
                        sessions,
                        round,
                    )),
                    1 => runtime.block_on(in_process(Arc::clone(&serial), sessions, round)),
                    _ => runtime.block_on(against_llama_server(port, sessions, round)),
                };
                figures[config].push(done);
            }
        }
        drop(server);
        let [batched_figures, serial_figures, peer_figures] = figures;
        let (steps, carried) = batched.engine().map_or((0, 0), |e| e.steps());
        let decode_seconds = batched.engine().map_or(0.0, |e| e.decode_seconds());
        line("batched (runtime)", sessions, &batched_figures);
        println!(
            "  {:<22} {steps} decode steps carried {carried} tokens ({:.2} per step), {:.2} s of it in llama.cpp's decode, {} prompt tokens reused (all rounds)",
            "",
            carried as f64 / steps.max(1) as f64,
            decode_seconds,
            batched_figures.iter().map(|f| f.reused).sum::<u64>()
        );
        line("serial (one by one)", sessions, &serial_figures);
        line("llama-server -np N", sessions, &peer_figures);
        println!(
            "  → batched/serial {}, batched/llama-server {}",
            ratio(&batched_figures, &serial_figures),
            ratio(&batched_figures, &peer_figures)
        );
    }
}
