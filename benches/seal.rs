//! The cost of encryption at rest on the append path: records the size of
//! a transcript message (about 600 bytes of JSON) appended one by one to a
//! real file, each with its own `write` as the transcript writer does,
//! plaintext and sealed (XChaCha20-Poly1305, a fresh random nonce each), in
//! the same run, interleaved round by round so that drift on a busy
//! machine hits both alike; then the same with an `fdatasync` after every
//! record (what a power-loss-proof append costs), where the disk
//! dominates. Printed as microseconds per record and as the ratio sealed
//! over plaintext (the goal is under 1.2×), with the cost of sealing alone
//! (no I/O) first.
//!
//! ```sh
//! cargo bench --workspace --bench seal   # BENCH_ROUNDS=10 for more
//! ```

use std::time::{Duration, Instant};

use stack_seal::key::KeySource;
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
        if vault.seals() { "sealed" } else { "plain" }
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

fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let dir =
        tempfile::tempdir_in(std::env::var_os("CARGO_TARGET_TMPDIR").unwrap_or_else(|| ".".into()))
            .or_else(|_| tempfile::tempdir())
            .expect("tempdir");
    let plain = Vault::plaintext();
    let sealed = Vault::sealing(Key::generate(), KeySource::Given);
    {
        let key = Key::generate();
        let sealer = key.record_sealer(b"header".to_vec());
        let records: Vec<Vec<u8>> = (0..RECORDS).map(record).collect();
        let started = Instant::now();
        let mut total = 0;
        for r in &records {
            total += sealer.seal_framed(r).len();
        }
        println!(
            "{:28} {:8.2} µs/record, no I/O ({total} bytes sealed)",
            "seal alone",
            started.elapsed().as_secs_f64() * 1e6 / RECORDS as f64
        );
    }
    for (label, count, sync) in [
        ("append + write", RECORDS, false),
        ("append + write + fdatasync", SYNCED_RECORDS, true),
    ] {
        // One warm-up round each, not counted.
        append(dir.path(), &plain, count / 10, sync, 0);
        append(dir.path(), &sealed, count / 10, sync, 0);
        let (mut plain_total, mut sealed_total) = (Duration::ZERO, Duration::ZERO);
        for round in 1..=rounds {
            plain_total += append(dir.path(), &plain, count, sync, round);
            sealed_total += append(dir.path(), &sealed, count, sync, round);
        }
        let plain_each = plain_total / rounds as u32;
        let sealed_each = sealed_total / rounds as u32;
        println!(
            "{label:28} plaintext {:8.2} µs/record   sealed {:8.2} µs/record   sealed/plaintext {:.2}x   ({rounds} rounds of {count} records of {} bytes)",
            plain_each.as_secs_f64() * 1e6,
            sealed_each.as_secs_f64() * 1e6,
            sealed_each.as_secs_f64() / plain_each.as_secs_f64(),
            record(0).len()
        );
    }
}
