//! Transcription speed: the real-time factor (processing time ÷ audio
//! duration) of the default speech model (Whisper tiny.en, CTranslate2)
//! on a 5 s and a 30 s spoken clip, against faster-whisper running the same
//! model folder in the same run, with the same threads, beam size (5),
//! compute type (int8; `BENCH_COMPUTE=float32` for both), language and options (no timestamps, no VAD,
//! temperature 0, no conditioning on previous text).
//!
//! The clips are synthesized with `espeak-ng` and cut or padded to length
//! with `sox`. Each side is warmed up once, then timed over `BENCH_ROUNDS`
//! rounds (default 5), interleaved round by round (which goes first
//! alternates) so that drift on a busy machine hits both alike; medians
//! are printed, with the ratio of ours over faster-whisper's (the goal: at
//! most 1.1×) and the range of the rounds' ratios, and our RTF (the goal:
//! under 0.3 on two cores). Both time the same thing: WAV file in, text
//! out. A second pass times both again with one core kept busy by a
//! spinning thread, to show how each degrades under load.
//!
//! Both run CTranslate2; on x86-64 Linux both do its matrix products and
//! convolutions in oneDNN (ours links the prebuilt oneDNN 3.2 from PyPI,
//! see ARCHITECTURE.md, "Build"; faster-whisper's wheel has oneDNN built in and
//! uses it on CPUs other than Intel's, MKL on Intel's).
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
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
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
    let options = ModelOptions { threads, compute };
    let model = SpeechModel::load(&model_dir, options)
        .expect("the default speech model (run scripts/setup)");
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
        let (_, peer_text) = peer.transcribe(wav);
        compare(&model, &mut peer, *seconds, wav, rounds);
        println!("    ours:           {our_text}");
        println!("    faster-whisper: {peer_text}");
    }
    // The same again with one core taken by a busy loop, as when the model
    // or a build runs beside a transcription: an engine whose idle threads
    // spin loses most here.
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
        compare(&model, &mut peer, *seconds, wav, rounds);
    }
    stop.store(true, Ordering::Relaxed);
    busy.join().expect("busy thread");
}

/// Times ours and faster-whisper on `wav`, interleaved round by round
/// (each goes first every other round), and prints the medians, the ratio
/// of ours to faster-whisper's, and the range of the rounds' ratios.
fn compare(model: &SpeechModel, peer: &mut Peer, seconds: u32, wav: &Path, rounds: usize) {
    let (mut our_times, mut peer_times, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (our, theirs) = if round % 2 == 0 {
            let our = ours(model, wav).0;
            (our, peer.transcribe(wav).0)
        } else {
            let theirs = peer.transcribe(wav).0;
            (ours(model, wav).0, theirs)
        };
        our_times.push(our);
        peer_times.push(theirs);
        ratios.push(our / theirs);
    }
    let (lowest, highest) = ratios
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(low, high), &ratio| {
            (low.min(ratio), high.max(ratio))
        });
    let (our, theirs) = (median(our_times), median(peer_times));
    println!(
        "{seconds:>2} s clip: ours {:.3} s (RTF {:.3}), faster-whisper {:.3} s (RTF {:.3}): {:.2}x ({lowest:.2}-{highest:.2})",
        our,
        our / f64::from(seconds),
        theirs,
        theirs / f64::from(seconds),
        our / theirs,
    );
}
