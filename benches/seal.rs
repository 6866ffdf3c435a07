//! The cost of encryption at rest on the append path: records the size of
//! a transcript message (about 600 bytes of JSON) appended one by one to a
//! real file, each with its own `write` as the transcript writer does,
//! plaintext and sealed in each record format (AES-256-GCM in format 3,
//! which new files use where the CPU has AES instructions; in format 2,
//! the previous release's; and XChaCha20-Poly1305, used elsewhere and by
//! older files), in the same run, interleaved round by round so that drift
//! on a busy machine hits all alike; then the
//! same with an `fdatasync` after every record (what a power-loss-proof
//! append costs), where the disk dominates. Printed as microseconds per
//! record and as the ratio sealed over plaintext (the goal is under 1.2×
//! for the cipher this CPU gets, named in the output), with the cost of
//! sealing alone (no I/O) first. Each round appends one fresh file per
//! variant, in each of eight orders in turn; times are medians over the
//! rounds and ratios the median of each round's own ratio, which neither a
//! stray slow round on a shared machine nor slow drift moves.
//!
//! ```sh
//! cargo bench --workspace --bench seal   # BENCH_ROUNDS=48 for more (default 24)
//! ```

use std::time::{Duration, Instant};

use stack_seal::key::{KeySource, RecordCipher};
use stack_seal::record::{Appender, Hold};
use stack_seal::{Key, Vault};

const RECORDS: usize = 5_000;
const SYNCED_RECORDS: usize = 200;

fn record(index: usize) -> Vec<u8> {
    let content = "The file notes.txt says: buy milk, eggs and bread; call the plumber about the kitchen tap. ".repeat(6);
    format!(r#"{{"role":"tool","tool_call_id":"call_{index}","name":"read_file","content":"{content}"}}"#)
        .into_bytes()
}

/// Appends `count` records to a fresh file; returns the time per record.
fn append(
    dir: &std::path::Path,
    vault: &Vault,
    count: usize,
    sync: bool,
    round: usize,
) -> Duration {
    let path = dir.join(format!(
        "{}-{round}.jsonl",
        if vault.seals() {
            vault.record_cipher().name()
        } else {
            "plain"
        }
    ));
    let records: Vec<Vec<u8>> = (0..count).map(record).collect();
    let mut appender =
        Appender::open(&path, "transcript:bench", vault, Hold::Shared).expect("open");
    let started = Instant::now();
    for record in &records {
        appender.append(record).expect("append");
        if sync {
            appender.file().sync_data().expect("sync");
        }
    }
    let took = started.elapsed() / count as u32;
    drop(appender);
    let _ = std::fs::remove_file(&path);
    took
}

/// The variants: plaintext, then each record cipher.
const VARIANTS: usize = 4;

/// The order of the variants in round `round`: each rotation, forwards
/// and backwards in turn, so that no variant always runs first or after
/// the same other one.
fn order(round: usize) -> [usize; VARIANTS] {
    let rotation = (round / 2) % VARIANTS;
    let mut order: [usize; VARIANTS] = std::array::from_fn(|at| (at + rotation) % VARIANTS);
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The median of `samples`, in microseconds.
fn median_micros(samples: &[Duration]) -> f64 {
    median(samples.iter().map(|d| d.as_secs_f64() * 1e6).collect())
}

fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(24)
        .max(1);
    let dir =
        tempfile::tempdir_in(std::env::var_os("CARGO_TARGET_TMPDIR").unwrap_or_else(|| ".".into()))
            .or_else(|_| tempfile::tempdir())
            .expect("tempdir");
    let plain = Vault::plaintext();
    let this_cpu = RecordCipher::for_this_cpu();
    let ciphers = [
        RecordCipher::Aes256Gcm,
        RecordCipher::Aes256GcmV2,
        RecordCipher::XChaCha20Poly1305,
    ];
    let key = Key::generate();
    let sealed = ciphers
        .map(|cipher| Vault::sealing(key.clone(), KeySource::Given).with_record_cipher(cipher));
    println!(
        "new record files on this CPU: {} ({})",
        this_cpu.name(),
        this_cpu.describe()
    );
    let records: Vec<Vec<u8>> = (0..RECORDS).map(record).collect();
    // Encoding alone, no I/O: a plaintext line, then a sealed record in
    // each cipher (the cipher's own cost is the difference).
    let encoders = [
        ("plaintext", &plain),
        (ciphers[0].name(), &sealed[0]),
        (ciphers[1].name(), &sealed[1]),
        (ciphers[2].name(), &sealed[2]),
    ];
    let appenders: Vec<(&str, Appender)> = encoders
        .iter()
        .enumerate()
        .map(|(index, (label, vault))| {
            let path = dir.path().join(format!("encode-{index}"));
            let appender =
                Appender::open(&path, "transcript:bench", vault, Hold::Shared).expect("open");
            (*label, appender)
        })
        .collect();
    let mut encoded: Vec<Vec<Duration>> = vec![Vec::new(); appenders.len()];
    for round in 0..=rounds {
        for variant in order(round) {
            let started = Instant::now();
            let mut total = 0;
            for r in &records {
                total += appenders[variant].1.encode(r).expect("encode").len();
            }
            std::hint::black_box(total);
            encoded[variant].push(started.elapsed() / RECORDS as u32);
        }
    }
    for ((label, _), mut samples) in appenders.iter().zip(encoded) {
        // The first round warms up, not counted.
        samples.remove(0);
        println!(
            "{:28} {label:22} {:8.2} µs/record, no I/O",
            "encode alone",
            median_micros(&samples)
        );
    }
    for (label, count, sync) in [
        ("append + write", RECORDS, false),
        ("append + write + fdatasync", SYNCED_RECORDS, true),
    ] {
        // One warm-up round each, not counted.
        append(dir.path(), &plain, count / 10, sync, 0);
        for vault in &sealed {
            append(dir.path(), vault, count / 10, sync, 0);
        }
        // Plaintext and each cipher, in every order in turn, so that no
        // variant always runs first or after the same other one.
        let variants = [&plain, &sealed[0], &sealed[1], &sealed[2]];
        let mut samples: [Vec<Duration>; VARIANTS] = Default::default();
        for round in 1..=rounds {
            for variant in order(round) {
                samples[variant].push(append(dir.path(), variants[variant], count, sync, round));
            }
        }
        let [plain_samples, sealed_samples @ ..] = samples;
        println!(
            "{label:28} {:22} {:8.2} µs/record   ({rounds} rounds of {count} records of {} bytes; medians, and the median of each round's ratio)",
            "plaintext",
            median_micros(&plain_samples),
            record(0).len()
        );
        for (samples, cipher) in sealed_samples.into_iter().zip(ciphers) {
            let ratios: Vec<f64> = samples
                .iter()
                .zip(&plain_samples)
                .map(|(sealed, plain)| sealed.as_secs_f64() / plain.as_secs_f64())
                .collect();
            println!(
                "{:28} {:22} {:8.2} µs/record   sealed/plaintext {:.2}x{}",
                "",
                cipher.name(),
                median_micros(&samples),
                median(ratios),
                if cipher == this_cpu {
                    "   (new files on this CPU)"
                } else {
                    ""
                }
            );
        }
    }
}
