//! Local speech-to-text: a spoken command becomes the user's message.
//!
//! Whisper runs in this process through CTranslate2 (the `ct2rs` crate,
//! which vendors it); no audio leaves the machine. The pieces, along the
//! data flow:
//!
//! 1. [`wav`]: a WAV file (any common sample rate, channel count and sample
//!    format) is checked and decoded into [`Audio`]: 16 kHz mono `f32`, with
//!    the input's sha256 and duration. Bad input (not WAV, truncated, empty,
//!    silent, over the length limit) is refused here with a
//!    [`VoiceError`] that says which.
//! 2. [`features`]: the log-mel front end, as faster-whisper and OpenAI's
//!    reference compute it (centred STFT, Slaney mel filters, one clamp per
//!    clip), in 30 s windows.
//! 3. [`model`]: the [`SpeechModel`] loads a CTranslate2 Whisper folder and
//!    [`SpeechModel::transcribe`]s: it prompts English-only and multilingual
//!    models each the way they were trained, drops windows Whisper marks as
//!    no speech, and times each stage.
//!
//! # Threat model
//!
//! The audio is untrusted input (a file or stdin the user points at, or
//! bytes a host passes through the embedding API). Parsing it must not
//! crash, hang or exhaust memory: the decoder works on bytes already in
//! memory, reads at most the samples the header's size and the input's
//! length both allow, refuses a duration over the configured limit before
//! decoding a sample, and every arithmetic step on header fields is
//! checked. The speech model folder is trusted as much as the GGUF model is
//! (the user chose it); its files are checked to exist, not audited.
//! Transcription is CPU-heavy and blocking: async callers run it on a
//! blocking thread (see `stack-agent`'s `Session::send_audio`).
//!
//! # Privacy
//!
//! Nothing here writes anything to disk or the network. What the agent keeps
//! (the transcript text and the audio's sha256 in the session transcript,
//! never the audio unless the policy's `[privacy] keep_audio` says so) is
//! decided by the agent crate.

#![warn(missing_docs)]

pub mod features;
#[cfg(feature = "listen")]
pub mod listen;
pub mod model;
pub mod wav;

#[cfg(test)]
mod fuzz;

#[cfg(feature = "engine")]
pub use model::{reused_buffers, SpeechModel};
pub use model::{Compute, ModelOptions, Timings, TranscribeOptions, Transcription};
pub use wav::{Audio, AudioLimits};

use std::path::PathBuf;

/// Why audio could not be turned into text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VoiceError {
    /// The input is not a RIFF/WAVE file.
    #[error("not a WAV file: {reason}")]
    NotWav {
        /// What the decoder found.
        reason: String,
    },
    /// A WAV layout this decoder does not take.
    #[error("unsupported WAV audio: {reason}")]
    Unsupported {
        /// What is unsupported.
        reason: String,
    },
    /// The file ends before the data its header announces.
    #[error("the WAV file is truncated: its header announces {declared_s:.2} s of audio, the file holds {present_s:.2} s")]
    Truncated {
        /// Seconds the header announces.
        declared_s: f64,
        /// Seconds actually present.
        present_s: f64,
    },
    /// No samples, or too few to hold a word.
    #[error("the audio is empty ({seconds:.3} s; at least {min_s} s is needed)")]
    Empty {
        /// Its duration.
        seconds: f64,
        /// The shortest accepted.
        min_s: f64,
    },
    /// Longer than the configured limit.
    #[error("the audio is {seconds:.1} s long; the limit is {max_s} s (raise it with --max-audio-seconds)")]
    TooLong {
        /// Its duration.
        seconds: f64,
        /// The limit.
        max_s: f64,
    },
    /// More bytes than any accepted clip could need.
    #[error("the audio input is over {max_bytes} bytes")]
    TooLarge {
        /// The byte limit.
        max_bytes: u64,
    },
    /// Silence: nothing louder than the threshold.
    #[error(
        "the audio is silent (its loudest sample is {peak_dbfs:.0} dBFS): nothing to transcribe"
    )]
    Silent {
        /// The loudest sample, in dB relative to full scale.
        peak_dbfs: f64,
    },
    /// The model heard no speech in any window.
    #[error("no speech was recognised in {seconds:.1} s of audio")]
    NoSpeech {
        /// The audio's duration.
        seconds: f64,
    },
    /// The speech model folder lacks a file.
    #[error("the speech model at {dir} has no {file}{hint}")]
    MissingModelFile {
        /// The folder.
        dir: PathBuf,
        /// The missing file.
        file: &'static str,
        /// How to get it (for the default model: run the setup script).
        hint: &'static str,
    },
    /// The model or its tokenizer failed to load.
    #[error("loading the speech model at {dir}: {reason}")]
    Load {
        /// The folder.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A language the model cannot transcribe.
    #[error("the speech model at {dir} is English-only; it cannot transcribe `{language}` (use a multilingual model, or leave the language unset)")]
    Language {
        /// The model folder.
        dir: PathBuf,
        /// The language asked for.
        language: String,
    },
    /// A language code the model has no token for.
    #[error("`{language}` is not a language this speech model knows (codes such as en, de, fr)")]
    UnknownLanguage {
        /// The code asked for.
        language: String,
    },
    /// CTranslate2 failed while transcribing.
    #[error("transcription failed: {0}")]
    Engine(String),
    /// Reading the audio failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file (`-` for stdin).
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl VoiceError {
    /// Whether the audio (rather than the model or the machine) was at
    /// fault: the caller may ask for another recording.
    pub fn is_bad_audio(&self) -> bool {
        matches!(
            self,
            VoiceError::NotWav { .. }
                | VoiceError::Unsupported { .. }
                | VoiceError::Truncated { .. }
                | VoiceError::Empty { .. }
                | VoiceError::TooLong { .. }
                | VoiceError::TooLarge { .. }
                | VoiceError::Silent { .. }
                | VoiceError::NoSpeech { .. }
        )
    }
}

/// The folder of the default speech model (Whisper tiny.en, CTranslate2),
/// fetched by `scripts/setup` into the asset cache.
pub fn default_model_dir() -> Result<PathBuf, stack_assets::AssetError> {
    stack_assets::speech_model_dir()
}
