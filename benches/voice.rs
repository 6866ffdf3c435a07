//! Transcription speed: the real-time factor (processing time ÷ audio
//! duration) of the default speech model (Whisper tiny.en, CTranslate2)
//! on a 5 s and a 30 s spoken clip, against faster-whisper running the same
//! model folder in the same run, with the same threads, beam size (5),
//! compute type (int8; `BENCH_COMPUTE=float32` for both), language and options (no timestamps, no VAD,
//! temperature 0, no conditioning on previous text).
//!
//! The clips are synthesized with `espeak-ng` and cut or padded to length
//! with `sox`. Each side is warmed up once, then timed over `BENCH_ROUNDS`
//! rounds (default 5), interleaved round by round so that drift on a busy
//! machine hits both alike; medians are printed, with the ratio of ours
//! over faster-whisper's (the goal: at most 1.1×) and our RTF (the goal:
//! under 0.3 on two cores). A third side, timed in the same rounds, is the
//! same model loaded with `pack_weights_once: false` (ruy packs every
//! weight matrix at every product, as CTranslate2 has it do), to show what
//! packing once gains; its transcript must match ours. All three time the same
//! thing: WAV file in, text out. A second pass times all three again with
//! one core kept busy by a spinning thread, to show how each degrades
//! under load.
//!
//! ```sh
//! scripts/setup --peers                    # faster-whisper, pinned
//! cargo bench --workspace --bench voice    # BENCH_THREADS=2 BENCH_ROUNDS=5
//! ```

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use stack_voice::{Audio, AudioLimits, Compute, ModelOptions, SpeechModel, TranscribeOptions};

const SPEECH: &str = "List the Python files in this folder, then read the file named notes, \
    and tell me which of them mention the budget for next year. After that, run the tests in \
    the workspace and show me what failed, with the names of the failing tests and the first \
    line of each error. Finally, write a short summary of the changes into a new file called \
    report, and keep it under one hundred words.";

/// faster-whisper, driven over stdin/stdout: one WAV path in, the seconds
/// it took and the text out, the model loaded once.
const PEER: &str = r#"
import sys, time, json
from faster_whisper import WhisperModel
model = WhisperModel(sys.argv[1], device="cpu", compute_type=sys.argv[3],
                     cpu_threads=int(sys.argv[2]), num_workers=1)
print("ready", flush=True)
for line in sys.stdin:
    path = line.strip()
    started = time.perf_counter()
    segments, info = model.transcribe(path, beam_size=5, language="en",
        without_timestamps=True, condition_on_previous_text=False,
        vad_filter=False, temperature=0.0)
    text = " ".join(s.text.strip() for s in segments)
    print(json.dumps({"seconds": time.perf_counter() - started, "text": text}), flush=True)
"#;

struct Peer {
    child: std::process::Child,
    input: std::process::ChildStdin,
    output: BufReader<std::process::ChildStdout>,
}

impl Peer {
    fn start(model: &Path, threads: usize, compute: Compute) -> Peer {
        let clients = std::env::var_os("STACK_RUNTIME_CLIENTS")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .map(|home| PathBuf::from(home).join(".cache/stack-runtime/clients"))
            })
            .expect("HOME");
        let python = clients.join("whisper-venv/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run `scripts/setup --peers`",
            python.display()
        );
        let mut child = Command::new(python)
            .args(["-c", PEER])
            .arg(model)
            .arg(threads.to_string())
            .arg(compute.as_str())
            .env("OMP_NUM_THREADS", threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("faster-whisper");
        let input = child.stdin.take().expect("stdin");
        let mut output = BufReader::new(child.stdout.take().expect("stdout"));
        let mut ready = String::new();
        output.read_line(&mut ready).expect("ready");
        assert_eq!(ready.trim(), "ready", "faster-whisper did not start");
        Peer {
            child,
            input,
            output,
        }
    }

    fn transcribe(&mut self, wav: &Path) -> (f64, String) {
        writeln!(self.input, "{}", wav.display()).expect("send");
        let mut line = String::new();
        self.output.read_line(&mut line).expect("answer");
        let answer: serde_json::Value = serde_json::from_str(&line).expect("json");
        (
            answer["seconds"].as_f64().expect("seconds"),
            answer["text"].as_str().unwrap_or_default().to_string(),
        )
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 16 kHz mono clip of exactly `seconds`, of speech.
fn clip(dir: &Path, seconds: u32) -> PathBuf {
    let raw = dir.join("speech.espeak.wav");
    if !raw.exists() {
        let status = Command::new("espeak-ng")
            .args(["-v", "en-us", "-s", "150", "-w"])
            .arg(&raw)
            .arg(SPEECH)
            .status()
            .expect("espeak-ng (scripts/setup installs it)");
        assert!(status.success());
    }
    let out = dir.join(format!("speech-{seconds}s.wav"));
    let status = Command::new("sox")
        .arg(&raw)
        .args(["-r", "16000", "-c", "1", "-b", "16"])
        .arg(&out)
        .args([
            "pad",
            "0",
            &seconds.to_string(),
            "trim",
            "0",
            &seconds.to_string(),
        ])
        .status()
        .expect("sox (scripts/setup installs it)");
    assert!(status.success());
    out
}

fn ours(model: &SpeechModel, wav: &Path) -> (f64, String) {
    let started = Instant::now();
    let bytes = std::fs::read(wav).expect("wav");
    let audio = Audio::from_wav(&bytes, &AudioLimits::default()).expect("audio");
    let heard = model
        .transcribe(&audio, &TranscribeOptions::default())
        .expect("transcribes");
    (started.elapsed().as_secs_f64(), heard.text)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let threads: usize = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let compute = match std::env::var("BENCH_COMPUTE").as_deref() {
        Ok("float32") => Compute::Float32,
        Ok("default") => Compute::Default,
        _ => Compute::Int8,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = stack_voice::default_model_dir().expect("assets");
    let options = ModelOptions {
        threads,
        compute,
        ..ModelOptions::default()
    };
    let model = SpeechModel::load(&model_dir, options)
        .expect("the default speech model (run scripts/setup)");
    // The same model with ruy packing its weights at every product, as
    // CTranslate2 has it do (before `cpp/ruy_prepacked_weights.cc`).
    let repacking = SpeechModel::load(
        &model_dir,
        ModelOptions {
            pack_weights_once: false,
            ..options
        },
    )
    .expect("the default speech model");
    let mut peer = Peer::start(&model_dir, threads, compute);
    println!(
        "voice: Whisper tiny.en ({}), beam 5, {threads} threads, {rounds} rounds",
        compute.as_str()
    );
    let clips: Vec<(u32, PathBuf)> = [5, 30]
        .into_iter()
        .map(|seconds| (seconds, clip(dir.path(), seconds)))
        .collect();
    for (seconds, wav) in &clips {
        let (_, our_text) = ours(&model, wav);
        let (_, repacking_text) = ours(&repacking, wav);
        assert_eq!(
            our_text, repacking_text,
            "packing once changed the transcript"
        );
        let (_, peer_text) = peer.transcribe(wav);
        compare(&model, &repacking, &mut peer, *seconds, wav, rounds);
        println!("    ours:           {our_text}");
        println!("    faster-whisper: {peer_text}");
    }
    // The same again with one core taken by a busy loop, as when the model
    // or a build runs beside a transcription: an engine whose idle threads
    // spin (ruy's did, for 2 ms after every product) loses most here.
    println!("with one core busy (a spinning thread in this process):");
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    };
    for (seconds, wav) in &clips {
        compare(&model, &repacking, &mut peer, *seconds, wav, rounds);
    }
    stop.store(true, Ordering::Relaxed);
    busy.join().expect("busy thread");
}

/// Times ours, ours packing weights at every product, and faster-whisper
/// on `wav`, interleaved round by round, and prints the medians and the
/// ratios to faster-whisper's.
fn compare(
    model: &SpeechModel,
    repacking: &SpeechModel,
    peer: &mut Peer,
    seconds: u32,
    wav: &Path,
    rounds: usize,
) {
    let (mut our_times, mut repacking_times, mut peer_times) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        our_times.push(ours(model, wav).0);
        repacking_times.push(ours(repacking, wav).0);
        peer_times.push(peer.transcribe(wav).0);
    }
    let (our, repacked, theirs) = (
        median(our_times),
        median(repacking_times),
        median(peer_times),
    );
    println!(
        "{seconds:>2} s clip: ours {:.3} s (RTF {:.3}), faster-whisper {:.3} s (RTF {:.3}): {:.2}x   (packing weights at every product: {:.3} s, {:.2}x)",
        our,
        our / f64::from(seconds),
        theirs,
        theirs / f64::from(seconds),
        our / theirs,
        repacked,
        repacked / theirs
    );
}
