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
use sha2::{Digest, Sha256};

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
        let header = parse_header(bytes, limits)?;
        let (format, frames) = (header.format, header.frames);
        let mut reader =
            hound::WavReader::new(Cursor::new(header.bytes.as_ref())).map_err(header_error)?;
        let channels = usize::from(format.channels);
        // Channels are averaged as they are read: one `f32` per frame.
        let mut mono = Vec::with_capacity(frames);
        let mut mix = Mixer::new(channels);
        if format.float {
            for sample in reader
                .samples::<f32>()
                .take(frames.saturating_mul(channels))
            {
                let sample = sample.map_err(data_error)?;
                let clean = if sample.is_finite() {
                    sample.clamp(-1.0, 1.0)
                } else {
                    0.0
                };
                if let Some(frame) = mix.push(clean) {
                    mono.push(frame);
                }
            }
        } else {
            let scale = 1.0 / (1u64 << (format.bits_per_sample - 1)) as f32;
            for sample in reader
                .samples::<i32>()
                .take(frames.saturating_mul(channels))
            {
                if let Some(frame) = mix.push(sample.map_err(data_error)? as f32 * scale) {
                    mono.push(frame);
                }
            }
        }
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
        let mut hasher = Sha256::new();
        for sample in samples {
            hasher.update(sample.to_le_bytes());
        }
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
        audio.sha256 = stack_assets::hex(&hasher.finalize());
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

    /// The samples as a 16 kHz mono 16-bit PCM WAV file (what `[privacy]
    /// keep_audio` keeps).
    pub fn to_wav_pcm16(&self) -> Result<Vec<u8>, VoiceError> {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: SAMPLE_RATE,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let failed = |err: hound::Error| VoiceError::Engine(format!("writing WAV: {err}"));
        let mut bytes = Cursor::new(Vec::with_capacity(44 + self.samples.len() * 2));
        let mut writer = hound::WavWriter::new(&mut bytes, spec).map_err(failed)?;
        for sample in &self.samples {
            let value = (sample.clamp(-1.0, 1.0) * f32::from(i16::MAX)) as i16;
            writer.write_sample(value).map_err(failed)?;
        }
        writer.finalize().map_err(failed)?;
        Ok(bytes.into_inner())
    }

    /// Milliseconds spent decoding and resampling.
    pub fn decode_ms(&self) -> f64 {
        self.decode_ms
    }
}

/// Averages interleaved samples into frames.
struct Mixer {
    channels: usize,
    sum: f32,
    count: usize,
}

impl Mixer {
    fn new(channels: usize) -> Mixer {
        Mixer {
            channels: channels.max(1),
            sum: 0.0,
            count: 0,
        }
    }

    /// Adds a sample; a whole frame gives its mean.
    fn push(&mut self, sample: f32) -> Option<f32> {
        self.sum += sample;
        self.count += 1;
        if self.count < self.channels {
            return None;
        }
        let mean = self.sum / self.channels as f32;
        self.sum = 0.0;
        self.count = 0;
        Some(mean)
    }
}

/// Where a WAV file's format and samples are, from its own chunks (hound
/// reads the samples, but does not say where they start or how big its
/// frames are).
#[derive(Debug, Clone, Copy)]
struct Chunks {
    /// Bytes per frame (`nBlockAlign`).
    block_align: usize,
    /// Bits per sample's container (`wBitsPerSample`).
    container_bits: u16,
    /// Bits that hold the sample (`wValidBitsPerSample`, for
    /// WAVE_FORMAT_EXTENSIBLE).
    valid_bits: Option<u16>,
    /// Frames per second (`nSamplesPerSec`).
    sample_rate: u32,
    /// Where the `data` chunk's size field is.
    data_size_at: usize,
    /// Where the samples start.
    data_start: usize,
    /// The size the `data` chunk announces.
    data_size: u64,
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        bytes.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// Walks the RIFF chunks up to `data` (bounds-checked: a size past the end
/// is a broken file, not a panic).
fn chunks(bytes: &[u8]) -> Result<Chunks, VoiceError> {
    let broken = |reason: &str| VoiceError::NotWav {
        reason: reason.to_string(),
    };
    let mut at = 12usize;
    let mut format: Option<(usize, u16, Option<u16>, u32)> = None;
    while let (Some(id), Some(size)) = (bytes.get(at..at + 4), read_u32(bytes, at + 4)) {
        let body = at + 8;
        if id == b"fmt " {
            let end = body.checked_add(usize::try_from(size).unwrap_or(usize::MAX));
            if size < 16 || end.is_none_or(|end| end > bytes.len()) {
                return Err(broken("its format chunk is cut short"));
            }
            let tag = read_u16(bytes, body).unwrap_or_default();
            let block_align = usize::from(read_u16(bytes, body + 12).unwrap_or_default());
            let bits = read_u16(bytes, body + 14).unwrap_or_default();
            let valid = (tag == 0xfffe && size >= 24)
                .then(|| read_u16(bytes, body + 18))
                .flatten();
            let rate = read_u32(bytes, body + 4).unwrap_or_default();
            format = Some((block_align, bits, valid, rate));
        } else if id == b"data" {
            let (block_align, container_bits, valid_bits, sample_rate) =
                format.ok_or_else(|| broken("its data comes before its format chunk"))?;
            if block_align == 0 {
                return Err(broken("its format chunk gives frames of 0 bytes"));
            }
            return Ok(Chunks {
                block_align,
                container_bits,
                valid_bits,
                sample_rate,
                data_size_at: at + 4,
                data_start: body,
                data_size: u64::from(size),
            });
        }
        // Chunks are padded to an even size.
        let next = (body as u64) + u64::from(size) + u64::from(size & 1);
        at = usize::try_from(next).map_err(|_| broken("a chunk runs past the end"))?;
    }
    Err(broken("it has no data chunk"))
}

/// What [`parse_header`] found.
struct Header<'a> {
    format: SourceFormat,
    /// Frames to decode.
    frames: usize,
    /// The bytes hound reads: the input, or a copy whose unknown data size
    /// was set to what is present.
    bytes: std::borrow::Cow<'a, [u8]>,
}

/// Reads the header and decides how many frames to decode: the format, and
/// the frames present (checked against the announced size and the limits).
fn parse_header<'a>(bytes: &'a [u8], limits: &AudioLimits) -> Result<Header<'a>, VoiceError> {
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err(VoiceError::NotWav {
            reason: if bytes.is_empty() {
                "the input is empty".into()
            } else {
                "it does not start with a RIFF/WAVE header".into()
            },
        });
    }
    let layout = chunks(bytes)?;
    if let Some(valid) = layout.valid_bits {
        if valid != layout.container_bits {
            return Err(VoiceError::Unsupported {
                reason: format!(
                    "{valid}-bit samples in {}-bit containers",
                    layout.container_bits
                ),
            });
        }
    }
    let present_bytes = (bytes.len() - layout.data_start) as u64;
    let present_frames = present_bytes / layout.block_align as u64;
    let announced_frames = layout.data_size / layout.block_align as u64;
    let (frames, bytes) = if layout.data_size <= present_bytes {
        (announced_frames, std::borrow::Cow::Borrowed(bytes))
    } else if layout.data_size >= u64::from(STREAMING_SIZES) {
        // An unknown length: what is present is the audio. hound gets a
        // copy whose sizes say so.
        let mut copy = bytes.to_vec();
        let data_bytes = present_frames * layout.block_align as u64;
        let data_bytes = u32::try_from(data_bytes).unwrap_or(u32::MAX);
        copy[layout.data_size_at..layout.data_size_at + 4]
            .copy_from_slice(&data_bytes.to_le_bytes());
        let riff = u32::try_from(copy.len() - 8).unwrap_or(u32::MAX);
        copy[4..8].copy_from_slice(&riff.to_le_bytes());
        (present_frames, std::borrow::Cow::Owned(copy))
    } else {
        let rate = f64::from(layout.sample_rate.max(1));
        return Err(VoiceError::Truncated {
            declared_s: announced_frames as f64 / rate,
            present_s: present_frames as f64 / rate,
        });
    };
    let reader = hound::WavReader::new(Cursor::new(bytes.as_ref())).map_err(header_error)?;
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
    let seconds = frames as f64 / f64::from(spec.sample_rate);
    if seconds > limits.max_seconds {
        return Err(VoiceError::TooLong {
            seconds,
            max_s: limits.max_seconds,
        });
    }
    Ok(Header {
        format: SourceFormat {
            sample_rate: spec.sample_rate,
            channels: spec.channels,
            bits_per_sample: spec.bits_per_sample,
            float,
        },
        frames: usize::try_from(frames).unwrap_or(usize::MAX),
        bytes,
    })
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
    // Flush with silence until the delayed tail is out. A flush may give
    // nothing at all (when the resampler's FFT is longer than a chunk, at
    // rates such as 22051 Hz), so empty output does not end it; a bound
    // does, generous for any rate accepted.
    let mut flushes = 0;
    while out.len() < expected + delay && flushes < 4096 {
        let chunk = resampler
            .process_partial::<&[f32]>(None, None)
            .map_err(|e| engine(&e))?;
        out.extend_from_slice(&chunk[0]);
        flushes += 1;
    }
    out.drain(..delay.min(out.len()));
    out.truncate(expected);
    // Band-limiting overshoots at sharp edges (the fuzzer found peaks past
    // 1.5 from full-scale noise): the model gets [-1, 1], as promised.
    for sample in &mut out {
        *sample = sample.clamp(-1.0, 1.0);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A WAV file in memory: `seconds` of a 440 Hz tone at half scale.
    fn wav(rate: u32, channels: u16, bits: u16, float: bool, seconds: f64) -> Vec<u8> {
        wav_in(rate, channels, bits, float, bits.div_ceil(8), seconds)
    }

    /// [`wav`] with `container` bytes per sample (an extensible header
    /// when they are more than the bits need).
    pub(crate) fn wav_in(
        rate: u32,
        channels: u16,
        bits: u16,
        float: bool,
        container: u16,
        seconds: f64,
    ) -> Vec<u8> {
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

    /// `bytes` with its data size replaced, as a streaming writer leaves it.
    fn with_data_size(mut bytes: Vec<u8>, size: u32) -> Vec<u8> {
        let data = bytes
            .windows(4)
            .position(|w| w == b"data")
            .expect("data chunk");
        bytes[data + 4..data + 8].copy_from_slice(&size.to_le_bytes());
        bytes
    }

    #[test]
    fn streamed_headers_of_any_layout_are_read_to_their_end() {
        for (channels, bits, size) in [
            (2, 16, u32::MAX),
            (1, 24, 0x7fff_f000),
            (2, 24, u32::MAX),
            (1, 8, 0x7fff_ffff),
        ] {
            let bytes = with_data_size(wav(16_000, channels, bits, false, 0.5), size);
            let audio = Audio::from_wav(&bytes, &AudioLimits::default())
                .unwrap_or_else(|e| panic!("x{channels} {bits}-bit, size {size:#x}: {e}"));
            assert_eq!(audio.samples().len(), 8_000, "x{channels} {bits}-bit");
        }
    }

    #[test]
    fn samples_narrower_than_their_containers_are_refused_by_name() {
        let bytes = wav_in(16_000, 1, 24, false, 4, 0.5);
        match Audio::from_wav(&bytes, &AudioLimits::default()) {
            Err(VoiceError::Unsupported { reason }) => {
                assert!(reason.contains("24-bit samples in 32-bit"), "{reason}")
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    #[test]
    fn odd_rates_keep_the_whole_clip() {
        // At these rates rubato's FFT is longer than a chunk, and a flush
        // can give nothing: the tail must still come out.
        for rate in [22_051, 32_001, 383_999] {
            let audio = Audio::from_wav(&wav(rate, 1, 16, false, 1.0), &AudioLimits::default())
                .unwrap_or_else(|e| panic!("{rate} Hz: {e}"));
            assert_eq!(audio.samples().len(), 16_000, "{rate} Hz");
            let tail = &audio.samples()[15_000..];
            assert!(
                tail.iter().any(|s| s.abs() > 0.3),
                "{rate} Hz: the last 60 ms are there"
            );
        }
    }

    #[test]
    fn a_data_chunk_past_the_end_or_no_format_is_a_broken_file() {
        let limits = AudioLimits::default();
        let mut no_format =
            b"RIFF\x24\x00\x00\x00WAVEdata\x04\x00\x00\x00\x00\x00\x00\x00".to_vec();
        assert!(matches!(
            Audio::from_wav(&no_format, &limits),
            Err(VoiceError::NotWav { .. })
        ));
        // A chunk whose size runs past the end, before any data chunk.
        no_format[12..16].copy_from_slice(b"LIST");
        no_format[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Audio::from_wav(&no_format, &limits),
            Err(VoiceError::NotWav { .. })
        ));
    }

    #[test]
    fn kept_audio_is_a_wav_the_decoder_reads_back() {
        let tone: Vec<f32> = (0..16_000)
            .map(|i| (i as f32 * 300.0 * std::f32::consts::TAU / 16_000.0).sin() * 0.4)
            .collect();
        let audio = Audio::from_samples(&tone, 16_000, &AudioLimits::default()).expect("audio");
        let wav = audio.to_wav_pcm16().expect("a WAV");
        let back = Audio::from_wav(&wav, &AudioLimits::default()).expect("decodes");
        assert_eq!(back.samples().len(), tone.len());
        let worst = back
            .samples()
            .iter()
            .zip(&tone)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-3, "{worst}");
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
