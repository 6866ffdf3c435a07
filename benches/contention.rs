//! Generation beside one CPU-bound process: tokens/s alone and with a
//! competing busy loop, as a slowdown ratio measured in the same run, for
//! each thread count and OpenMP wait policy (a user's laptop is never idle,
//! and sandboxed code runs beside generation).
//!
//! ```sh
//! cargo bench -p stack-model --bench contention
//! ```
//!
//! Each configuration runs in a child process of its own, because libgomp
//! reads `OMP_WAIT_POLICY` once, when it is loaded.

use std::process::{Command, Stdio};

use stack_model::llama::{Model, ModelOptions, SamplingOptions};
use stack_types::message::Message;

const TOKENS: u32 = 64;
const ROUNDS: usize = 3;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(position) = args.iter().position(|a| a == "--child") {
        let threads = args
            .get(position + 1)
            .and_then(|t| t.parse().ok())
            .unwrap_or(2);
        child(threads);
        return;
    }
    let exe = std::env::current_exe().expect("the bench's own path");
    println!(
        "{:<40} {:>10} {:>12} {:>9}",
        "generation, tokens/s", "alone", "beside busy", "slowdown"
    );
    // 0 threads: the runtime's automatic choice, made per session.
    let configurations: [(i32, &[(&str, &str)]); 6] = [
        (0, &[]),
        (2, &[]),
        (2, &[("OMP_WAIT_POLICY", "passive")]),
        (2, &[("GOMP_SPINCOUNT", "10000")]),
        (2, &[("GOMP_SPINCOUNT", "1000")]),
        (1, &[]),
    ];
    for (threads, env) in configurations {
        let mut command = Command::new(&exe);
        command.args(["--child", &threads.to_string()]);
        command
            .env_remove("OMP_WAIT_POLICY")
            .env_remove("GOMP_SPINCOUNT");
        for (key, value) in env {
            command.env(key, value);
        }
        let label = format!(
            "{} threads{}",
            if threads == 0 {
                "auto".to_string()
            } else {
                threads.to_string()
            },
            env.iter()
                .map(|(k, v)| format!(", {k}={v}"))
                .collect::<String>()
        );
        let output = command.stderr(Stdio::null()).output().expect("child");
        let text = String::from_utf8_lossy(&output.stdout);
        let Some(line) = text.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
            println!("{label}: no result ({text})");
            continue;
        };
        let numbers: Vec<f64> = line
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        if let [alone, busy] = numbers[..] {
            println!(
                "{label:<40} {alone:>10.1} {busy:>12.1} {:>8.2}x",
                alone / busy
            );
        }
    }
}

fn child(threads: i32) {
    let model = Model::load(ModelOptions {
        path: std::env::var_os("STACK_BENCH_MODEL").map(Into::into),
        threads: (threads > 0).then_some(threads),
        ..ModelOptions::default()
    })
    .expect("model (run scripts/setup first)");
    let prompt = model
        .renderer()
        .render(
            &[Message::user(
                "Write a long story about a lighthouse keeper who finds a message in a bottle.",
            )],
            &[],
        )
        .expect("render");
    let greedy = SamplingOptions {
        temperature: 0.0,
        repeat_penalty: Some(1.0),
        // Off, as in the bare loop it is compared with.
        dry_multiplier: Some(0.0),
        max_tokens: TOKENS,
        ..SamplingOptions::default()
    };
    // A session per round: the automatic thread count is chosen as each
    // session opens.
    let measure = || {
        let mut rates = Vec::new();
        for _ in 0..ROUNDS {
            let mut session = model.session().expect("session");
            let generation = session
                .generate(&prompt, None, &greedy, &mut |_| true)
                .expect("generate");
            rates.push(generation.counters.generated as f64 / (generation.generation_ms / 1000.0));
        }
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let _warm = measure();
    let alone = measure();
    let mut busy = Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .spawn()
        .expect("a busy loop");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let contended = measure();
    let _ = busy.kill();
    let _ = busy.wait();
    println!("RESULT {alone} {contended}");
}
