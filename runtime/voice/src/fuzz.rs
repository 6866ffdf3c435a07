//! The WAV decoder, fuzzed (bolero): WAV files of every layout the decoder
//! takes (8 to 32-bit integer, 32-bit float, mono to 6 channels, several
//! rates, extensible headers, a streamed one of unknown length), mutated
//! by byte flips, inserts, deletes, splices and truncations. Hostile audio
//! must give audio or a `VoiceError`, never a panic; audio that decodes is
//! 16 kHz mono in [-1, 1] within the length limit.
//!
//! Runs for `STACK_FUZZ_SECONDS` (default 10 s) under `cargo test`.

use std::io::Cursor;

use bolero::check;

use crate::{Audio, AudioLimits};

#[path = "../../fuzz_support.rs"]
#[allow(dead_code)]
mod support;
use support::{budget, mutate, Mutation};

/// A short WAV file of a tone.
fn seed(rate: u32, channels: u16, bits: u16, float: bool, container: u16) -> Vec<u8> {
    let spec = hound::WavSpecEx {
        spec: hound::WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: bits,
            sample_format: if float {
                hound::SampleFormat::Float
            } else {
                hound::SampleFormat::Int
            },
        },
        bytes_per_sample: container,
    };
    let mut bytes = Cursor::new(Vec::new());
    let mut writer = hound::WavWriter::new_with_spec_ex(&mut bytes, spec).expect("writer");
    let frames = rate as usize / 8;
    for i in 0..frames {
        let value = (i as f64 * 0.1).sin() * 0.5;
        for _ in 0..channels {
            if float {
                writer.write_sample(value as f32).expect("sample");
            } else {
                let max = ((1i64 << (bits - 1)) - 1) as f64;
                writer.write_sample((value * max) as i32).expect("sample");
            }
        }
    }
    writer.finalize().expect("finalize");
    bytes.into_inner()
}

#[test]
fn fuzz_wav_decoder() {
    let mut seeds = vec![
        seed(16_000, 1, 16, false, 2),
        seed(8_000, 2, 8, false, 1),
        seed(11_025, 1, 24, false, 3),
        seed(8_000, 1, 32, true, 4),
        seed(12_000, 6, 16, false, 2),
        seed(8_000, 1, 24, false, 4),
    ];
    let mut streamed = seed(16_000, 1, 16, false, 2);
    if let Some(data) = streamed.windows(4).position(|w| w == b"data") {
        streamed[data + 4..data + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    }
    seeds.push(streamed);
    let limits = AudioLimits { max_seconds: 2.0 };
    check!()
        .with_type::<(u8, Vec<Mutation>)>()
        .with_test_time(budget())
        .for_each(|(pick, edits)| {
            let data = mutate(&seeds, *pick, edits);
            if let Ok(audio) = Audio::from_wav(&data, &limits) {
                assert!(audio.seconds() <= limits.max_seconds + 0.01);
                assert!(audio
                    .samples()
                    .iter()
                    .all(|s| s.is_finite() && s.abs() <= 1.0));
            }
        });
}
