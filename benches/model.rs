//! Model throughput through the runtime, as ratios over `llama-bench` and
//! over a bare `llama-cpp-2` decode loop, on the same model in the same
//! run, and time to first token at turn 10 of a growing conversation with
//! and without KV-cache reuse; and the call grammar's sampling cost per
//! token, checking the picked token first against filtering every token.
//!
//! `llama-bench` is the one `scripts/setup --peers` builds natively (`-march=native`)
//! from the llama.cpp tree in the `llama-cpp-python==0.3.36` sdist; the
//! runtime runs the CPU variant ggml picks for this CPU (see
//! `stack_model::cpu_backends`). Each round runs the three in turn, after a
//! warm-up round of each: the runtime's turn (prompt, then greedy
//! generation), the bare loop over the same tokens, and `llama-bench` on
//! the same shapes (`-p N` from an empty cache for the prompt, `-n G -d N`
//! for generation after the same prompt), with the same threads, batch
//! size and flash-attention setting (llama.cpp's automatic one).
//!
//! ```sh
//! cargo bench --workspace --bench model     # the default SmolLM2 model
//! STACK_BENCH_MODEL=path.gguf cargo bench --workspace --bench model
//! ```

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::sampling::LlamaSampler;
use stack_model::llama::{backend, GrammarCheck, Model, ModelOptions, SamplingOptions};
use stack_model::ToolChoice;
use stack_types::message::Message;

const CONTEXT: u32 = 4096;
const BATCH: u32 = 512;

/// The `llama-bench` that `scripts/setup --peers` built (or
/// `STACK_RUNTIME_LLAMA_BENCH`).
fn llama_bench_binary() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("STACK_RUNTIME_LLAMA_BENCH") {
        return path.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
        .expect("HOME");
    let path = std::env::var_os("STACK_RUNTIME_PEERS")
        .map_or_else(
            || cache.join("stack-runtime/peers"),
            std::path::PathBuf::from,
        )
        .join("llama.cpp-0.3.36/bin/llama-bench");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/setup --peers first",
        path.display()
    );
    path
}

/// One `llama-bench` test (one repetition after its own warm-up): its
/// tokens per second.
fn llama_bench(
    model: &std::path::Path,
    threads: i32,
    prompt: usize,
    generate: usize,
    depth: usize,
) -> f64 {
    let output = std::process::Command::new(llama_bench_binary())
        .arg("-m")
        .arg(model)
        .args(["-t", &threads.to_string()])
        .args(["-b", &BATCH.to_string(), "-ub", &BATCH.to_string()])
        .args(["-p", &prompt.to_string(), "-n", &generate.to_string()])
        .args(["-d", &depth.to_string(), "-r", "1", "-o", "json"])
        .stderr(std::process::Stdio::null())
        .output()
        .expect("llama-bench");
    assert!(output.status.success(), "llama-bench failed: {output:?}");
    let tests: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("llama-bench json");
    tests
        .as_array()
        .and_then(|tests| tests.first())
        .and_then(|test| test["avg_ts"].as_f64())
        .unwrap_or_else(|| panic!("no avg_ts in llama-bench's output: {tests}"))
}

fn main() {
    let threads: i32 = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let model = Model::load(ModelOptions {
        path: std::env::var_os("STACK_BENCH_MODEL").map(Into::into),
        context_size: CONTEXT,
        batch_size: BATCH,
        threads: Some(threads),
        ..ModelOptions::default()
    })
    .expect("model (run scripts/setup first)");
    println!(
        "model: {} ({} parameters, {} GPU layers), {threads} threads",
        model.info().name,
        model.info().parameters,
        model.info().gpu_layers
    );

    let background = "The lighthouse stood on a rock at the edge of the grey northern sea, and its keeper had tended the lamp for thirty winters. ".repeat(24);
    let conversation = vec![
        Message::system(format!("You are a helpful assistant. Background: {background}")),
        Message::user("Write a long story about a lighthouse keeper who finds a message in a bottle. Use at least five paragraphs."),
    ];
    let prompt = model.renderer().render(&conversation, &[]).expect("render");
    let greedy = SamplingOptions {
        temperature: 0.0,
        repeat_penalty: Some(1.0),
        // Off, as in llama-bench and the bare loop.
        dry_multiplier: Some(0.0),
        max_tokens: 128,
        ..SamplingOptions::default()
    };

    let mut session = model.session().expect("session");
    let raw = model.raw();
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(CONTEXT))
        .with_n_batch(BATCH)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = raw
        .new_context(backend().expect("backend"), params)
        .expect("context");
    let rounds: usize = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let (mut runtime_pp, mut runtime_tg, mut bare_pp, mut bare_tg) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut peer_pp, mut peer_tg) = (Vec::new(), Vec::new());
    let model_path = model.info().path.clone();
    let mut generated = 0;
    let mut tokens = Vec::new();
    // Alternate the two, after one warm-up round of each (round 0 is not kept).
    for round in 0..=rounds {
        // Through the runtime (fresh cache each run, so the prompt is evaluated).
        session.clear_cache();
        let generation = session
            .generate(&prompt, None, &greedy, &mut |_| true)
            .expect("generate");
        if round > 0 {
            runtime_pp.push(
                generation.counters.prompt_evaluated as f64 / (generation.prompt_ms / 1000.0),
            );
            runtime_tg
                .push(generation.counters.generated as f64 / (generation.generation_ms / 1000.0));
        }
        generated = generation.counters.generated;

        // A bare llama-cpp-2 loop over the same text (tokenizing included, as
        // the runtime's prompt time includes it).
        ctx.clear_kv_cache();
        let started = Instant::now();
        tokens = raw
            .vocab()
            .tokenize(prompt.as_bytes(), raw.vocab().should_add_bos(), true);
        let mut batch = LlamaBatch::new(BATCH as usize, 1);
        for (chunk_index, chunk) in tokens.chunks(BATCH as usize).enumerate() {
            batch.clear();
            let last = (chunk_index + 1) * BATCH as usize >= tokens.len();
            for (i, token) in chunk.iter().enumerate() {
                let position = (chunk_index * BATCH as usize + i) as i32;
                batch
                    .add(*token, position, &[0], last && i + 1 == chunk.len())
                    .expect("batch");
            }
            ctx.decode(&mut batch).expect("decode");
        }
        let prompt_time = started.elapsed();
        let started = Instant::now();
        let mut sampler = LlamaSampler::greedy();
        let mut single = LlamaBatch::new(1, 1);
        for position in (tokens.len() as i32..).take(generated as usize) {
            let token = sampler.sample(&ctx, -1);
            let _piece = raw.vocab().token_to_piece(token, true, None);
            single.clear();
            single.add(token, position, &[0], true).expect("batch");
            ctx.decode(&mut single).expect("decode");
        }
        if round > 0 {
            bare_pp.push(tokens.len() as f64 / prompt_time.as_secs_f64());
            bare_tg.push(generated as f64 / started.elapsed().as_secs_f64());
        }

        // llama-bench on the same shapes.
        let pp = llama_bench(&model_path, threads, tokens.len(), 0, 0);
        let tg = llama_bench(&model_path, threads, 0, generated as usize, tokens.len());
        if round > 0 {
            peer_pp.push(pp);
            peer_tg.push(tg);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (rpp, rtg, bpp, btg, ppp, ptg) = (
        median(runtime_pp),
        median(runtime_tg),
        median(bare_pp),
        median(bare_tg),
        median(peer_pp),
        median(peer_tg),
    );
    if let Ok(cpu) = stack_model::llama::cpu_backend() {
        println!("runtime's CPU backend: {}", cpu.summary());
    }
    println!(
        "{:<34} {:>10} {:>12} {:>10} {:>14} {:>12}",
        "throughput (tokens/s, medians)",
        "runtime",
        "llama-bench",
        "bare loop",
        "/llama-bench",
        "/bare loop"
    );
    for (label, runtime, peer, bare) in [
        (
            format!("prompt processing ({} tokens)", tokens.len()),
            rpp,
            ppp,
            bpp,
        ),
        (format!("generation ({generated} tokens)"), rtg, ptg, btg),
    ] {
        println!(
            "{label:<34} {runtime:>10.1} {peer:>12.1} {bare:>10.1} {:>13.3}x {:>11.3}x",
            runtime / peer,
            runtime / bare
        );
    }

    // Time to first token at turn 10, with and without KV reuse.
    let mut growing = vec![Message::system(
        "You are a helpful assistant. Answer in one sentence.",
    )];
    let short = SamplingOptions {
        temperature: 0.0,
        max_tokens: 24,
        ..SamplingOptions::default()
    };
    let mut reuse = model.session().expect("session");
    let ttft =
        |session: &mut stack_model::llama::ModelSession, messages: &[Message], clear: bool| {
            if clear {
                session.clear_cache();
            }
            let started = Instant::now();
            let mut first = None;
            let mut ids = || "id".to_string();
            let generation = session
                .complete(
                    messages,
                    &[],
                    &ToolChoice::None,
                    &short,
                    None,
                    &mut |_| {
                        first.get_or_insert_with(|| started.elapsed());
                        true
                    },
                    &mut ids,
                )
                .expect("turn");
            (first.unwrap_or_else(|| started.elapsed()), generation)
        };
    for turn in 1..=9 {
        growing.push(Message::user(format!(
            "Tell me fact number {turn} about the sea."
        )));
        let (_, generation) = ttft(&mut reuse, &growing, false);
        growing.push(Message::assistant(generation.text.trim().to_string()));
    }
    growing.push(Message::user("Tell me fact number 10 about the sea."));
    let mut cold = model.session().expect("session");
    let (with_reuse, turn10) = ttft(&mut reuse, &growing, false);
    let (without_reuse, _) = ttft(&mut cold, &growing, true);
    println!(
        "time to first token, turn 10 ({} prompt tokens): {:.1} ms with KV reuse ({} evaluated, {} reused), {:.1} ms without ({:.2}x faster)",
        turn10.counters.prompt_evaluated + turn10.counters.prompt_reused,
        with_reuse.as_secs_f64() * 1000.0,
        turn10.counters.prompt_evaluated,
        turn10.counters.prompt_reused,
        without_reuse.as_secs_f64() * 1000.0,
        without_reuse.as_secs_f64() / with_reuse.as_secs_f64(),
    );

    grammar_cost(&model, rounds);
}

/// The call grammar's cost per generated token: one call to a
/// `write_file` tool (a long text asked for), greedy, its grammar asked
/// about the chain's pick first (the default) and about every token of the
/// vocabulary, against the same prompt answered without a grammar, in
/// alternating rounds after a warm-up of each. Sampling time is the
/// backend's own count ([`stack_model::Generation::sampling_ms`]).
fn grammar_cost(model: &std::sync::Arc<Model>, rounds: usize) {
    let tools = vec![serde_json::json!({
        "type": "function",
        "function": {
            "name": "write_file",
            "description": "Write text to a file in the workspace.",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "content": {"type": "string"}
                },
                "required": ["path", "content"]
            }
        }
    })];
    let conversation = vec![Message::user(
        "Write a long story about a lighthouse keeper to story.txt.",
    )];
    let mut session = model.session().expect("session");
    let mut step = |choice: &ToolChoice, grammar_check: GrammarCheck| {
        let sampling = SamplingOptions {
            temperature: 0.0,
            max_tokens: 128,
            grammar_check,
            ..SamplingOptions::default()
        };
        let mut ids = || "call".to_string();
        // From an empty cache each time, so that every arm's logits are
        // the same numbers (a reused prefix evaluates the last prompt token
        // alone, a batch's rounding away).
        session.clear_cache();
        session
            .complete(
                &conversation,
                &tools,
                choice,
                &sampling,
                None,
                &mut |_| true,
                &mut ids,
            )
            .expect("step")
    };
    let named = ToolChoice::Named("write_file".into());
    let arms = [
        (
            "no grammar, no tools",
            ToolChoice::None,
            GrammarCheck::PickedFirst,
        ),
        (
            "grammar, every token",
            named.clone(),
            GrammarCheck::EveryToken,
        ),
        ("grammar, picked first", named, GrammarCheck::PickedFirst),
    ];
    let mut per_token = vec![Vec::new(); arms.len()];
    let mut speed = vec![Vec::new(); arms.len()];
    let mut texts = vec![String::new(); arms.len()];
    for round in 0..=rounds {
        for (arm, (_, choice, check)) in arms.iter().enumerate() {
            let generation = step(choice, *check);
            let tokens = generation.counters.generated.max(1) as f64;
            if round > 0 {
                per_token[arm].push(generation.sampling_ms / tokens);
                speed[arm].push(tokens / (generation.generation_ms / 1000.0));
            }
            texts[arm] = generation.text;
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let per_token: Vec<f64> = per_token.into_iter().map(median).collect();
    let speed: Vec<f64> = speed.into_iter().map(median).collect();
    println!(
        "{:<34} {:>18} {:>14} {:>16}",
        "one call, 128 tokens (medians)", "sampling ms/token", "tokens/s", "/every token"
    );
    for (arm, (label, _, _)) in arms.iter().enumerate() {
        println!(
            "{label:<34} {:>18.3} {:>14.1} {:>15.3}x",
            per_token[arm],
            speed[arm],
            speed[arm] / speed[1]
        );
    }
    println!(
        "grammar cost per token: {:.3} ms filtering every token, {:.3} ms checking the pick first ({:.1}x less); the same call written: {}",
        per_token[1] - per_token[0],
        per_token[2] - per_token[0],
        (per_token[1] - per_token[0]) / (per_token[2] - per_token[0]).max(1e-6),
        if texts[1] == texts[2] { "yes" } else { "NO" }
    );
}
