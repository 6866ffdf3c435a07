//! Voice input: `agent run --audio FILE|-` and the REPL's `/voice FILE` and
//! `/listen`. The speech model is loaded on first use (not at start: a
//! session that never speaks never pays for it), the audio is checked and
//! transcribed in this process, and the transcript becomes the user's
//! message through `Session::send_spoken`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use stack_runtime::voice::{Audio, AudioLimits, Compute, TranscribeOptions, Transcription};

/// Flags for spoken input, shared by `agent run --audio` and the REPL.
#[derive(Debug, Clone, Args)]
pub struct VoiceArgs {
    /// A CTranslate2 Whisper model folder (default: Whisper tiny.en from
    /// the asset cache, fetched by scripts/setup).
    #[arg(long, value_name = "DIR", global = true)]
    pub speech_model: Option<PathBuf>,
    /// The spoken language, as a code (`en`, `de`); default: detected
    /// (multilingual models only).
    #[arg(long, value_name = "CODE", global = true)]
    pub speech_language: Option<String>,
    /// The longest audio accepted, in seconds (more than 0, at most a day).
    #[arg(long, value_name = "SECONDS", default_value_t = 120.0, global = true, value_parser = seconds)]
    pub max_audio_seconds: f64,
    /// Beam width for transcription (1: greedy).
    #[arg(long, value_name = "N", default_value_t = 5, global = true)]
    pub speech_beam: usize,
    /// Threads for transcription (0: one per core).
    #[arg(long, value_name = "N", default_value_t = 0, global = true)]
    pub speech_threads: usize,
    /// Compute type for the speech model.
    #[arg(long, value_enum, default_value_t = ComputeArg::Int8, global = true)]
    pub speech_compute: ComputeArg,
}

/// `--speech-compute`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ComputeArg {
    /// 8-bit integer products (fastest on a CPU).
    Int8,
    /// 32-bit floats.
    Float32,
    /// As the model was converted.
    Default,
}

impl From<ComputeArg> for Compute {
    fn from(arg: ComputeArg) -> Self {
        match arg {
            ComputeArg::Int8 => Compute::Int8,
            ComputeArg::Float32 => Compute::Float32,
            ComputeArg::Default => Compute::Default,
        }
    }
}

/// `--max-audio-seconds`: a finite length above zero, at most a day.
fn seconds(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if value.is_finite() && value > 0.0 && value <= 86_400.0 {
        Ok(value)
    } else {
        Err(format!(
            "`{text}`: give more than 0 and at most 86400 seconds"
        ))
    }
}

impl VoiceArgs {
    /// How much audio is accepted.
    pub fn limits(&self) -> AudioLimits {
        AudioLimits {
            max_seconds: self.max_audio_seconds,
        }
    }

    /// How clips are transcribed.
    pub fn options(&self) -> TranscribeOptions {
        TranscribeOptions {
            language: self.speech_language.clone(),
            beam_size: self.speech_beam,
        }
    }

    /// The model folder asked for.
    pub fn model_dir(&self) -> anyhow::Result<PathBuf> {
        match &self.speech_model {
            Some(dir) => Ok(dir.clone()),
            None => Ok(stack_runtime::voice::default_model_dir()?),
        }
    }
}

/// Reads and checks a WAV file (`-`: stdin, read to its end but no further
/// than the limits allow).
pub fn read_audio(path: &Path, limits: &AudioLimits) -> anyhow::Result<Audio> {
    let max = limits.max_bytes();
    let describe =
        |err: stack_runtime::voice::VoiceError| anyhow::anyhow!("audio {}: {err}", path.display());
    let io = |source| {
        describe(stack_runtime::voice::VoiceError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let mut bytes = Vec::new();
    if path == Path::new("-") {
        std::io::stdin()
            .lock()
            .take(max.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io)?;
    } else {
        let file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(describe(stack_runtime::voice::VoiceError::NotWav {
                reason: "not a regular file".into(),
            }));
        }
        file.take(max.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io)?;
    }
    Audio::from_wav(&bytes, limits).map_err(describe)
}

/// Loads the speech model `args` name into a runtime being built, with
/// their options and limits (`agent serve --voice`).
#[cfg(feature = "voice")]
pub fn with_speech_model(
    builder: stack_runtime::agent::RuntimeBuilder,
    args: &VoiceArgs,
) -> anyhow::Result<stack_runtime::agent::RuntimeBuilder> {
    let dir = args.model_dir()?;
    let model = stack_runtime::voice::SpeechModel::load(
        &dir,
        stack_runtime::voice::ModelOptions {
            threads: args.speech_threads,
            compute: args.speech_compute.into(),
        },
    )
    .map_err(|err| anyhow::anyhow!("speech model {}: {err}", dir.display()))?;
    Ok(builder
        .speech_model(Arc::new(model))
        .transcribe_options(args.options())
        .audio_limits(args.limits()))
}

/// Without the `voice` feature: says how to get it.
#[cfg(not(feature = "voice"))]
pub fn with_speech_model(
    _: stack_runtime::agent::RuntimeBuilder,
    _: &VoiceArgs,
) -> anyhow::Result<stack_runtime::agent::RuntimeBuilder> {
    anyhow::bail!("this agent was built without voice input; rebuild with `--features voice`")
}

/// The speech model, loaded on first use and kept.
#[derive(Default)]
pub struct Ears {
    #[cfg(feature = "voice")]
    model: Option<Arc<stack_runtime::voice::SpeechModel>>,
}

impl Ears {
    /// Transcribes `audio` (loading the model first, if need be).
    #[cfg(feature = "voice")]
    pub fn transcribe(&mut self, args: &VoiceArgs, audio: &Audio) -> anyhow::Result<Transcription> {
        let model = match &self.model {
            Some(model) => Arc::clone(model),
            None => {
                let dir = args.model_dir()?;
                let model = Arc::new(stack_runtime::voice::SpeechModel::load(
                    &dir,
                    stack_runtime::voice::ModelOptions {
                        threads: args.speech_threads,
                        compute: args.speech_compute.into(),
                    },
                )?);
                self.model = Some(Arc::clone(&model));
                model
            }
        };
        Ok(model.transcribe(audio, &args.options())?)
    }

    /// Without the `voice` feature: says how to get it.
    #[cfg(not(feature = "voice"))]
    pub fn transcribe(&mut self, _: &VoiceArgs, _: &Audio) -> anyhow::Result<Transcription> {
        anyhow::bail!("this agent was built without voice input; rebuild with `--features voice`")
    }
}

/// What a person sees of a transcription.
pub fn describe(heard: &Transcription) -> String {
    format!(
        "🎤 heard ({:.1} s, {}, transcribed in {:.2} s): {}",
        heard.duration_s,
        heard.language,
        heard.timings.total_ms / 1000.0,
        stack_runtime::text::one_line(&heard.text)
    )
}

/// `/listen`: push-to-talk from the default audio input device, until
/// Enter (or the length limit); see `stack_voice::listen`.
#[cfg(feature = "listen")]
pub fn listen(limits: &AudioLimits) -> anyhow::Result<Audio> {
    Ok(stack_runtime::voice::listen::record(limits, |recording| {
        eprint!(
            "🎙 recording from {} ({} Hz); press Enter to stop ",
            recording.device, recording.sample_rate
        );
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    })?)
}

/// `/listen` in a build without the `listen` feature.
#[cfg(not(feature = "listen"))]
pub fn listen(_: &AudioLimits) -> anyhow::Result<Audio> {
    anyhow::bail!(
        "no microphone input in this build (rebuild with `--features listen`); record a WAV file (e.g. `arecord -f S16_LE -r 16000 cmd.wav`) and use /voice FILE"
    )
}
