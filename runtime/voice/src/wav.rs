//! WAV in, 16 kHz mono samples out, with every bad input named.
//!
//! [`Audio::from_wav`] takes the whole file as bytes (a file, or stdin read
//! to its end under [`AudioLimits::max_bytes`]). `hound` parses the RIFF
//! header; this module then checks what hound leaves to its caller:
//!
//! * the data chunk's announced size against the bytes present (a
//!   truncated file is refused, except the "unknown length" sizes that
//!   streaming writers such as `espeak-ng --stdout` and `sox -` put there);
//! * the duration against [`AudioLimits::max_seconds`], before a sample is
//!   decoded;
//! * empty, too short and silent audio.
//!
//! Samples of any integer width (8 to 32 bits) or 32-bit float are scaled
//! to [-1, 1], channels are averaged, and rubato's FFT resampler converts
//! the rate to the 16 kHz Whisper expects.

use std::io::Cursor;
use std::time::Instant;

use rubato::{FftFixedIn, Resampler};

use crate::VoiceError;

/// The sample rate Whisper takes.
pub const SAMPLE_RATE: u32 = 16_000;

/// The shortest audio accepted: a tenth of a second.
pub const MIN_SECONDS: f64 = 0.1;

/// Below this peak (-60 dBFS) a clip counts as silent.
const SILENCE_PEAK: f32 = 0.001;

/// The lowest and highest sample rates accepted.
const RATES: std::ops::RangeInclusive<u32> = 4_000..=384_000;

/// The most channels accepted.
const MAX_CHANNELS: u16 = 32;

/// Data-chunk sizes that mean "unknown length" (a writer that could not seek
/// back to fill it in): what is present is the audio.
const STREAMING_SIZES: u32 = 0x7fff_0000;

/// How much audio is accepted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AudioLimits {
    /// The longest clip, in seconds.
    pub max_seconds: f64,
}

impl Default for AudioLimits {
    /// Two minutes: a spoken command, with room to spare.
    fn default() -> Self {
        AudioLimits { max_seconds: 120.0 }
    }
}

impl AudioLimits {
    /// The most bytes a clip within the limit can take (32 channels of
    /// 32-bit samples at 384 kHz would be far more; this bounds what is read
    /// from a pipe before the header can be checked, generously: 64-bit
    /// stereo at 192 kHz, plus 1 MiB of header chunks).
    pub fn max_bytes(&self) -> u64 {
        let per_second = 192_000u64 * 2 * 8;
        (self.max_seconds.max(0.0).ceil() as u64)
            .saturating_mul(per_second)
            .saturating_add(1 << 20)
    }
}

/// What the input was, before conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceFormat {
    /// Its sample rate, in Hz.
    pub sample_rate: u32,
    /// Its channels.
    pub channels: u16,
    /// Bits per sample.
    pub bits_per_sample: u16,
    /// Whether samples are floating point.
    pub float: bool,
}

/// Audio ready for the speech model: 16 kHz mono samples in [-1, 1].
#[derive(Debug, Clone)]
pub struct Audio {
    samples: Vec<f32>,
    sha256: String,
    source: Option<SourceFormat>,
    decode_ms: f64,
}

impl Audio {
    /// Decodes and checks a WAV file held in memory.
    pub fn from_wav(bytes: &[u8], limits: &AudioLimits) -> Result<Audio, VoiceError> {
        let started = Instant::now();
        if bytes.len() as u64 > limits.max_bytes() {
            return Err(VoiceError::TooLarge {
                max_bytes: limits.max_bytes(),
            });
        }
        let (format, frames) = parse_header(bytes, limits)?;
        let mut reader = hound::WavReader::new(Cursor::new(bytes)).map_err(header_error)?;
        let channels = usize::from(format.channels);
        let wanted = frames.saturating_mul(channels);
        let mut interleaved = Vec::with_capacity(wanted);
        if format.float {
            for sample in reader.samples::<f32>().take(wanted) {
                let sample = sample.map_err(data_error)?;
                interleaved.push(if sample.is_finite() {
                    sample.clamp(-1.0, 1.0)
                } else {
                    0.0
                });
            }
        } else {
            let scale = 1.0 / (1u64 << (format.bits_per_sample - 1)) as f32;
            for sample in reader.samples::<i32>().take(wanted) {
                interleaved.push(sample.map_err(data_error)? as f32 * scale);
            }
        }
        let mono = if channels == 1 {
            interleaved
        } else {
            interleaved
                .chunks_exact(channels)
                .map(|frame| frame.iter().sum::<f32>() / channels as f32)
                .collect()
        };
        let samples = resample(mono, format.sample_rate)?;
        let mut audio = Audio::checked(samples, Some(format))?;
        audio.sha256 = stack_assets::sha256_hex(bytes);
        audio.decode_ms = started.elapsed().as_secs_f64() * 1000.0;
        Ok(audio)
    }

    /// Audio a host already holds: mono samples in [-1, 1] at `sample_rate`
    /// Hz (resampled to 16 kHz here). Its sha256 is that of the samples as
    /// little-endian `f32`s.
    pub fn from_samples(
        samples: &[f32],
        sample_rate: u32,
        limits: &AudioLimits,
    ) -> Result<Audio, VoiceError> {
        let started = Instant::now();
        if !RATES.contains(&sample_rate) {
            return Err(VoiceError::Unsupported {
                reason: format!(
                    "a sample rate of {sample_rate} Hz (accepted: {} to {} Hz)",
                    RATES.start(),
                    RATES.end()
                ),
            });
        }
        let seconds = samples.len() as f64 / f64::from(sample_rate);
        if seconds > limits.max_seconds {
            return Err(VoiceError::TooLong {
                seconds,
                max_s: limits.max_seconds,
            });
        }
        let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        let clean: Vec<f32> = samples
            .iter()
            .map(|s| {
                if s.is_finite() {
                    s.clamp(-1.0, 1.0)
                } else {
                    0.0
                }
            })
            .collect();
        let mut audio = Audio::checked(resample(clean, sample_rate)?, None)?;
        audio.sha256 = stack_assets::sha256_hex(&bytes);
        audio.decode_ms = started.elapsed().as_secs_f64() * 1000.0;
        Ok(audio)
    }

    fn checked(samples: Vec<f32>, source: Option<SourceFormat>) -> Result<Audio, VoiceError> {
        let seconds = samples.len() as f64 / f64::from(SAMPLE_RATE);
        if seconds < MIN_SECONDS {
            return Err(VoiceError::Empty {
                seconds,
                min_s: MIN_SECONDS,
            });
        }
        let peak = samples.iter().fold(0.0f32, |peak, s| peak.max(s.abs()));
        if peak < SILENCE_PEAK {
            return Err(VoiceError::Silent {
                peak_dbfs: if peak > 0.0 {
                    20.0 * f64::from(peak).log10()
                } else {
                    f64::NEG_INFINITY
                },
            });
        }
        Ok(Audio {
            samples,
            sha256: String::new(),
            source,
            decode_ms: 0.0,
        })
    }

    /// The 16 kHz mono samples.
    pub fn samples(&self) -> &[f32] {
        &self.samples
    }

    /// Its duration, in seconds.
    pub fn seconds(&self) -> f64 {
        self.samples.len() as f64 / f64::from(SAMPLE_RATE)
    }

    /// The sha256 of the input (the WAV bytes, or the host's samples).
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The input's format, for WAV input.
    pub fn source(&self) -> Option<SourceFormat> {
        self.source
    }

    /// Milliseconds spent decoding and resampling.
    pub fn decode_ms(&self) -> f64 {
        self.decode_ms
    }
}

/// Reads the header and decides how many frames to decode: the format, and
/// the frames present (checked against the announced size and the limits).
fn parse_header(bytes: &[u8], limits: &AudioLimits) -> Result<(SourceFormat, usize), VoiceError> {
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err(VoiceError::NotWav {
            reason: if bytes.is_empty() {
                "the input is empty".into()
            } else {
                "it does not start with a RIFF/WAVE header".into()
            },
        });
    }
    let reader = hound::WavReader::new(Cursor::new(bytes)).map_err(header_error)?;
    let spec = reader.spec();
    let float = match spec.sample_format {
        hound::SampleFormat::Float => {
            if spec.bits_per_sample != 32 {
                return Err(VoiceError::Unsupported {
                    reason: format!(
                        "{}-bit float samples (32-bit float is)",
                        spec.bits_per_sample
                    ),
                });
            }
            true
        }
        hound::SampleFormat::Int => false,
    };
    if !(8..=32).contains(&spec.bits_per_sample) {
        return Err(VoiceError::Unsupported {
            reason: format!("{}-bit samples", spec.bits_per_sample),
        });
    }
    if spec.channels == 0 || spec.channels > MAX_CHANNELS {
        return Err(VoiceError::Unsupported {
            reason: format!("{} channels (1 to {MAX_CHANNELS} are)", spec.channels),
        });
    }
    if !RATES.contains(&spec.sample_rate) {
        return Err(VoiceError::Unsupported {
            reason: format!(
                "a sample rate of {} Hz (accepted: {} to {} Hz)",
                spec.sample_rate,
                RATES.start(),
                RATES.end()
            ),
        });
    }
    let format = SourceFormat {
        sample_rate: spec.sample_rate,
        channels: spec.channels,
        bits_per_sample: spec.bits_per_sample,
        float,
    };
    let bytes_per_sample = usize::from(spec.bits_per_sample).div_ceil(8);
    let frame_bytes = bytes_per_sample * usize::from(spec.channels);
    let data_start = usize::try_from(reader.into_inner().position()).unwrap_or(usize::MAX);
    let present_frames = bytes.len().saturating_sub(data_start) / frame_bytes;
    // hound reports the announced size in samples (all channels).
    let announced_samples = hound::WavReader::new(Cursor::new(bytes))
        .map_err(header_error)?
        .len() as usize;
    let announced_bytes = announced_samples.saturating_mul(bytes_per_sample);
    let announced_frames = announced_samples / usize::from(spec.channels);
    let rate = f64::from(spec.sample_rate);
    let frames = if announced_frames <= present_frames {
        announced_frames
    } else if announced_bytes >= STREAMING_SIZES as usize {
        present_frames
    } else {
        return Err(VoiceError::Truncated {
            declared_s: announced_frames as f64 / rate,
            present_s: present_frames as f64 / rate,
        });
    };
    let seconds = frames as f64 / rate;
    if seconds > limits.max_seconds {
        return Err(VoiceError::TooLong {
            seconds,
            max_s: limits.max_seconds,
        });
    }
    Ok((format, frames))
}

fn header_error(err: hound::Error) -> VoiceError {
    match err {
        hound::Error::Unsupported => VoiceError::Unsupported {
            reason: "a WAV encoding other than PCM or IEEE float".into(),
        },
        hound::Error::IoError(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
            VoiceError::NotWav {
                reason: "the header ends before the audio data starts".into(),
            }
        }
        other => VoiceError::NotWav {
            reason: other.to_string(),
        },
    }
}

fn data_error(err: hound::Error) -> VoiceError {
    VoiceError::NotWav {
        reason: format!("bad sample data: {err}"),
    }
}

/// Converts mono samples to 16 kHz with rubato's synchronous FFT resampler
/// (band-limited; its delay is trimmed, so sample 0 stays sample 0).
fn resample(mono: Vec<f32>, from: u32) -> Result<Vec<f32>, VoiceError> {
    if from == SAMPLE_RATE || mono.is_empty() {
        return Ok(mono);
    }
    let engine = |err: &dyn std::fmt::Display| VoiceError::Engine(format!("resampling: {err}"));
    let mut resampler = FftFixedIn::<f32>::new(from as usize, SAMPLE_RATE as usize, 1024, 2, 1)
        .map_err(|e| engine(&e))?;
    let expected = (mono.len() as u64 * u64::from(SAMPLE_RATE)).div_ceil(u64::from(from)) as usize;
    let delay = resampler.output_delay();
    let mut out = Vec::with_capacity(expected + delay + 2048);
    let mut position = 0;
    while mono.len() - position >= resampler.input_frames_next() {
        let take = resampler.input_frames_next();
        let chunk = resampler
            .process(&[&mono[position..position + take]], None)
            .map_err(|e| engine(&e))?;
        out.extend_from_slice(&chunk[0]);
        position += take;
    }
    if position < mono.len() {
        let chunk = resampler
            .process_partial(Some(&[&mono[position..]]), None)
            .map_err(|e| engine(&e))?;
        out.extend_from_slice(&chunk[0]);
    }
    while out.len() < expected + delay {
        let chunk = resampler
            .process_partial::<&[f32]>(None, None)
            .map_err(|e| engine(&e))?;
        if chunk[0].is_empty() {
            break;
        }
        out.extend_from_slice(&chunk[0]);
    }
    out.drain(..delay.min(out.len()));
    out.truncate(expected);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WAV file in memory: `frames` frames of a 440 Hz tone.
    fn wav(rate: u32, channels: u16, bits: u16, float: bool, seconds: f64) -> Vec<u8> {
        let spec = hound::WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: bits,
            sample_format: if float {
                hound::SampleFormat::Float
            } else {
                hound::SampleFormat::Int
            },
        };
        let mut bytes = Cursor::new(Vec::new());
        let mut writer = hound::WavWriter::new(&mut bytes, spec).expect("writer");
        let frames = (seconds * f64::from(rate)) as usize;
        for i in 0..frames {
            let value = (i as f64 * 440.0 * std::f64::consts::TAU / f64::from(rate)).sin() * 0.5;
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
    fn every_common_layout_becomes_16_khz_mono_of_the_same_length() {
        for (rate, channels, bits, float) in [
            (16_000, 1, 16, false),
            (44_100, 2, 16, false),
            (48_000, 2, 24, false),
            (8_000, 1, 8, false),
            (22_050, 1, 32, true),
            (96_000, 6, 32, false),
        ] {
            let audio = Audio::from_wav(
                &wav(rate, channels, bits, float, 1.5),
                &AudioLimits::default(),
            )
            .unwrap_or_else(|e| panic!("{rate} Hz x{channels} {bits}-bit: {e}"));
            assert_eq!(audio.samples().len(), 24_000, "{rate} Hz x{channels}");
            // The tone survives at its level (0.5), give or take filtering.
            let peak = audio.samples().iter().fold(0f32, |p, s| p.max(s.abs()));
            assert!(
                (0.4..0.6).contains(&peak),
                "{rate} Hz x{channels}: peak {peak}"
            );
            assert_eq!(audio.source().map(|s| s.sample_rate), Some(rate));
            assert_eq!(audio.sha256().len(), 64);
        }
    }

    #[test]
    fn the_resampled_tone_keeps_its_pitch() {
        let audio = Audio::from_wav(&wav(44_100, 2, 16, false, 1.0), &AudioLimits::default())
            .expect("audio");
        // Zero crossings of a 440 Hz tone over one second: 880.
        let crossings = audio
            .samples()
            .windows(2)
            .filter(|w| (w[0] < 0.0) != (w[1] < 0.0))
            .count();
        assert!((870..=890).contains(&crossings), "{crossings} crossings");
    }

    #[test]
    fn bad_input_gets_a_specific_error() {
        let limits = AudioLimits::default();
        let not_wav = Audio::from_wav(b"ID3\x04\x00 this is an mp3, not a wav", &limits);
        assert!(
            matches!(not_wav, Err(VoiceError::NotWav { .. })),
            "{not_wav:?}"
        );
        assert!(matches!(
            Audio::from_wav(b"", &limits),
            Err(VoiceError::NotWav { .. })
        ));

        let whole = wav(16_000, 1, 16, false, 2.0);
        let truncated = Audio::from_wav(&whole[..whole.len() / 2], &limits);
        match truncated {
            Err(VoiceError::Truncated {
                declared_s,
                present_s,
            }) => {
                assert!((declared_s - 2.0).abs() < 0.01, "{declared_s}");
                assert!((present_s - 1.0).abs() < 0.01, "{present_s}");
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
        // A header cut short.
        let cut = Audio::from_wav(&whole[..30], &limits);
        assert!(matches!(cut, Err(VoiceError::NotWav { .. })), "{cut:?}");

        let long = Audio::from_wav(
            &wav(8_000, 1, 16, false, 3.0),
            &AudioLimits { max_seconds: 2.0 },
        );
        assert!(matches!(long, Err(VoiceError::TooLong { .. })), "{long:?}");

        let empty = Audio::from_wav(&wav(16_000, 1, 16, false, 0.0), &limits);
        assert!(matches!(empty, Err(VoiceError::Empty { .. })), "{empty:?}");

        let silence = {
            let spec = hound::WavSpec {
                channels: 1,
                sample_rate: 16_000,
                bits_per_sample: 16,
                sample_format: hound::SampleFormat::Int,
            };
            let mut bytes = Cursor::new(Vec::new());
            let mut writer = hound::WavWriter::new(&mut bytes, spec).expect("writer");
            for _ in 0..16_000 {
                writer.write_sample(0i16).expect("sample");
            }
            writer.finalize().expect("finalize");
            bytes.into_inner()
        };
        let silent = Audio::from_wav(&silence, &limits);
        assert!(
            matches!(silent, Err(VoiceError::Silent { .. })),
            "{silent:?}"
        );
    }

    #[test]
    fn a_streamed_wav_with_an_unknown_length_is_read_to_its_end() {
        let mut bytes = wav(16_000, 1, 16, false, 1.0);
        // What `espeak-ng --stdout` writes: sizes it could not fill in.
        let data = bytes
            .windows(4)
            .position(|w| w == b"data")
            .expect("data chunk");
        bytes[data + 4..data + 8].copy_from_slice(&0x7fff_f000u32.to_le_bytes());
        bytes[4..8].copy_from_slice(&0x7fff_f024u32.to_le_bytes());
        let audio = Audio::from_wav(&bytes, &AudioLimits::default()).expect("audio");
        assert_eq!(audio.samples().len(), 16_000);
    }

    #[test]
    fn host_samples_are_checked_and_resampled() {
        let tone: Vec<f32> = (0..48_000)
            .map(|i| (i as f32 * 440.0 * std::f32::consts::TAU / 48_000.0).sin() * 0.3)
            .collect();
        let audio = Audio::from_samples(&tone, 48_000, &AudioLimits::default()).expect("audio");
        assert_eq!(audio.samples().len(), 16_000);
        assert!(matches!(
            Audio::from_samples(&[0.0; 48_000], 48_000, &AudioLimits::default()),
            Err(VoiceError::Silent { .. })
        ));
        assert!(matches!(
            Audio::from_samples(&tone, 1, &AudioLimits::default()),
            Err(VoiceError::Unsupported { .. })
        ));
    }
}
