//! The WAV decoder, fuzzed (bolero): WAV files of every layout the decoder
//! takes (8 to 32-bit integer, 32-bit float, mono to 6 channels, several
//! rates, extensible headers, a streamed one of unknown length), mutated
//! by byte flips, inserts, deletes, splices and truncations. Hostile audio
//! must give audio or a `VoiceError`, never a panic; audio that decodes is
//! 16 kHz mono in [-1, 1] within the length limit.
//!
//! Runs for `STACK_FUZZ_SECONDS` (default 10 s) under `cargo test`.

use bolero::check;

use crate::{Audio, AudioLimits};

#[path = "../../fuzz_support.rs"]
#[allow(dead_code)]
mod support;
use support::{budget, mutate, Mutation};

/// A short WAV file of a tone (an eighth of a second).
fn seed(rate: u32, channels: u16, bits: u16, float: bool, container: u16) -> Vec<u8> {
    crate::wav::tests::wav_in(rate, channels, bits, float, container, 0.125)
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
