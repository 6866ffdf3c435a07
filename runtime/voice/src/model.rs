//! The speech model: a CTranslate2 Whisper folder, loaded once and used for
//! every clip.
//!
//! [`SpeechModel::load`] checks the folder (`model.bin`, `config.json`,
//! `tokenizer.json` and a `vocabulary.*`; faster-whisper's folders, and
//! `ct2-transformers-converter` output, both fit), loads the weights
//! with CTranslate2 on the CPU and the tokenizer with Hugging Face's
//! `tokenizers`. [`SpeechModel::transcribe`] computes the log-mel features,
//! batches the 30 s windows into one CTranslate2 `generate` call, prompts
//! the model as it was trained (`<|startoftranscript|><|notimestamps|>` for
//! English-only models; with the language and `<|transcribe|>` for
//! multilingual ones, the language detected when not given), drops windows
//! Whisper marks as no speech (faster-whisper's rule: no-speech probability
//! over 0.6 and mean log-probability under -1), and decodes the rest.
//!
//! Transcribing blocks for as long as the model computes (about a tenth of
//! the audio's duration with tiny.en on two cores): async code runs it on a
//! blocking thread.

#[cfg(feature = "engine")]
pub use engine::{reused_buffers, SpeechModel};
use serde::{Deserialize, Serialize};

/// How the weights are computed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compute {
    /// 8-bit integer matrix products (quantized at load): the fastest on
    /// a CPU, and what faster-whisper recommends there.
    #[default]
    Int8,
    /// 32-bit floats throughout.
    Float32,
    /// As the model was converted, where the CPU supports it.
    Default,
}

impl Compute {
    /// Its name, as `--speech-compute` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Compute::Int8 => "int8",
            Compute::Float32 => "float32",
            Compute::Default => "default",
        }
    }
}

/// How a model is loaded (by default: a thread per core, int8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModelOptions {
    /// Threads for one transcription (0: one per available core).
    pub threads: usize,
    /// The compute type.
    pub compute: Compute,
}

/// How one clip is transcribed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranscribeOptions {
    /// The spoken language (`en`, `de`, …); `None` detects it (multilingual
    /// models only; English-only models are always `en`).
    pub language: Option<String>,
    /// Beam width (1: greedy).
    pub beam_size: usize,
}

impl Default for TranscribeOptions {
    /// faster-whisper's defaults: beam 5, language detected.
    fn default() -> Self {
        TranscribeOptions {
            language: None,
            beam_size: 5,
        }
    }
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Timings {
    /// Decoding and resampling the input.
    pub decode_ms: f64,
    /// The log-mel features.
    pub features_ms: f64,
    /// The model: encoder and beam search.
    pub model_ms: f64,
    /// All of it.
    pub total_ms: f64,
}

/// What was said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transcription {
    /// The text, windows joined by a space.
    pub text: String,
    /// The language, as a code (`en`).
    pub language: String,
    /// The audio's duration, in seconds.
    pub duration_s: f64,
    /// The sha256 of the input.
    pub audio_sha256: String,
    /// 30 s windows transcribed.
    pub windows: usize,
    /// Where the time went.
    pub timings: Timings,
}

impl Transcription {
    /// Processing time over audio duration (under 1: faster than real time).
    pub fn real_time_factor(&self) -> f64 {
        if self.duration_s > 0.0 {
            self.timings.total_ms / 1000.0 / self.duration_s
        } else {
            0.0
        }
    }
}

#[cfg(feature = "engine")]
mod engine {
    extern "C" {
        /// The buffers `cpp/cpu_allocator.cc` has handed out again so far.
        fn stack_voice_reused_buffers() -> u64;
        /// Frees every buffer `cpp/cpu_allocator.cc` keeps for reuse.
        fn stack_voice_release_kept_buffers();
    }

    /// How many tensor buffers CTranslate2 has been handed again from this
    /// crate's allocator (`cpp/cpu_allocator.cc`) instead of the system's,
    /// in this process.
    ///
    /// Non-zero after a transcription exactly when the build linked it in
    /// place of CTranslate2's own (buffers come back within one: each
    /// decoding step reuses the last one's): the speech tests assert that.
    pub fn reused_buffers() -> u64 {
        // SAFETY: the function takes nothing and only loads an atomic
        // counter; build.rs compiles and links it with this crate.
        unsafe { stack_voice_reused_buffers() }
    }

    /// Hands the buffers the allocator keeps back to the system: those
    /// freed while a model loads (CTranslate2 converts the weights), and
    /// those left when a transcription ends (the reuse that matters is
    /// between one decoding step and the next). Only buffers nobody holds
    /// are freed, so a transcription running on another thread meanwhile
    /// loses nothing but their reuse.
    fn release_kept_buffers() {
        // SAFETY: takes nothing; takes the buffers nobody holds off the
        // allocator's lists under its lock, then frees them.
        unsafe { stack_voice_release_kept_buffers() }
    }

    /// Calls [`release_kept_buffers`] when it drops: at the end of each
    /// transcription, and after a model's engine (as the struct's last
    /// field, and made before the engine in `load`, so the weights freed
    /// by a load that fails are handed back too).
    struct ReleaseKeptBuffers;

    impl Drop for ReleaseKeptBuffers {
        fn drop(&mut self) {
            release_kept_buffers();
        }
    }

    use std::path::{Path, PathBuf};
    use std::time::Instant;

    use ct2rs::sys::{ComputeType, Config, Device, StorageView, Whisper, WhisperOptions};

    use super::{Compute, ModelOptions, Timings, TranscribeOptions, Transcription};
    use crate::features::{LogMel, WINDOW_FRAMES};
    use crate::wav::Audio;
    use crate::VoiceError;

    /// Whisper's no-speech rule (faster-whisper's defaults).
    const NO_SPEECH_THRESHOLD: f32 = 0.6;
    const LOG_PROB_THRESHOLD: f32 = -1.0;

    /// The most tokens one window may produce (Whisper's text context).
    const MAX_LENGTH: usize = 448;

    fn compute_type(compute: Compute) -> ComputeType {
        match compute {
            Compute::Int8 => ComputeType::INT8,
            Compute::Float32 => ComputeType::FLOAT32,
            Compute::Default => ComputeType::DEFAULT,
        }
    }

    /// A loaded CTranslate2 Whisper model.
    pub struct SpeechModel {
        dir: PathBuf,
        engine: Whisper,
        tokenizer: tokenizers::Tokenizer,
        front_end: LogMel,
        multilingual: bool,
        options: ModelOptions,
        /// Last, so it drops after `engine` has freed its weights.
        _release: ReleaseKeptBuffers,
    }

    impl std::fmt::Debug for SpeechModel {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("SpeechModel")
                .field("dir", &self.dir)
                .field("multilingual", &self.multilingual)
                .field("options", &self.options)
                .finish()
        }
    }

    impl SpeechModel {
        /// Loads the model in `dir`.
        pub fn load(dir: &Path, options: ModelOptions) -> Result<SpeechModel, VoiceError> {
            let default_dir = crate::default_model_dir().ok();
            let hint = if default_dir.as_deref() == Some(dir) {
                "; run `scripts/setup` to fetch the default speech model"
            } else {
                " (a CTranslate2 Whisper folder has model.bin, config.json, tokenizer.json and vocabulary.txt or .json)"
            };
            for file in ["model.bin", "config.json", "tokenizer.json"] {
                if !dir.join(file).is_file() {
                    return Err(VoiceError::MissingModelFile {
                        dir: dir.to_path_buf(),
                        file,
                        hint,
                    });
                }
            }
            if !["vocabulary.txt", "vocabulary.json"]
                .iter()
                .any(|name| dir.join(name).is_file())
            {
                return Err(VoiceError::MissingModelFile {
                    dir: dir.to_path_buf(),
                    file: "vocabulary.txt",
                    hint,
                });
            }
            let load = |reason: String| VoiceError::Load {
                dir: dir.to_path_buf(),
                reason,
            };
            let threads = if options.threads == 0 {
                std::thread::available_parallelism().map_or(1, usize::from)
            } else {
                options.threads
            };
            let config = Config {
                device: Device::CPU,
                compute_type: compute_type(options.compute),
                num_threads_per_replica: threads,
                ..Config::default()
            };
            let release = ReleaseKeptBuffers;
            let engine = Whisper::new(dir, config).map_err(|e| load(format!("{e:#}")))?;
            release_kept_buffers();
            let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
                .map_err(|e| load(format!("tokenizer.json: {e}")))?;
            let front_end = LogMel::new(engine.n_mels());
            let multilingual = engine.is_multilingual();
            Ok(SpeechModel {
                dir: dir.to_path_buf(),
                engine,
                tokenizer,
                front_end,
                multilingual,
                options: ModelOptions { threads, ..options },
                _release: release,
            })
        }

        /// The folder it was loaded from.
        pub fn dir(&self) -> &Path {
            &self.dir
        }

        /// Whether it knows languages other than English.
        pub fn is_multilingual(&self) -> bool {
            self.multilingual
        }

        /// The options it was loaded with (threads resolved).
        pub fn options(&self) -> ModelOptions {
            self.options
        }

        /// Transcribes `audio` (blocking; see the module docs).
        pub fn transcribe(
            &self,
            audio: &Audio,
            options: &TranscribeOptions,
        ) -> Result<Transcription, VoiceError> {
            let started = Instant::now();
            let _release = ReleaseKeptBuffers;
            let features = self.front_end.compute(audio.samples());
            let (mut batch, windows) = features.windows();
            let features_ms = started.elapsed().as_secs_f64() * 1000.0;
            let model_started = Instant::now();
            let engine = |e: anyhow::Error| VoiceError::Engine(format!("{e:#}"));
            let shape = [
                windows,
                batch.len() / (windows * WINDOW_FRAMES),
                WINDOW_FRAMES,
            ];
            let language = self.language(&batch, shape[1], options)?;
            let view = StorageView::new(&shape, &mut batch, Device::CPU).map_err(engine)?;
            let mut prompt = vec!["<|startoftranscript|>".to_string()];
            if self.multilingual {
                prompt.push(format!("<|{language}|>"));
                prompt.push("<|transcribe|>".to_string());
            }
            prompt.push("<|notimestamps|>".to_string());
            let whisper_options = WhisperOptions {
                beam_size: options.beam_size.max(1),
                max_length: MAX_LENGTH,
                return_scores: true,
                return_no_speech_prob: true,
                ..WhisperOptions::default()
            };
            let results = self
                .engine
                .generate(&view, &vec![prompt; windows], &whisper_options)
                .map_err(engine)?;
            let model_ms = model_started.elapsed().as_secs_f64() * 1000.0;
            let mut texts = Vec::new();
            for result in results {
                let (Some(ids), Some(score)) =
                    (result.sequences_ids.first(), result.scores.first())
                else {
                    continue;
                };
                // faster-whisper's mean log-probability of a window.
                let length = ids.len() as f32;
                let avg_logprob = score * length / (length + 1.0);
                // Skipped unless the text is confident enough (faster-whisper
                // keeps it when `avg_logprob > log_prob_threshold`).
                if result.no_speech_prob > NO_SPEECH_THRESHOLD && avg_logprob <= LOG_PROB_THRESHOLD
                {
                    continue;
                }
                let ids: Vec<u32> = ids
                    .iter()
                    .filter_map(|&id| u32::try_from(id).ok())
                    .collect();
                let text = self
                    .tokenizer
                    .decode(&ids, true)
                    .map_err(|e| VoiceError::Engine(format!("decoding tokens: {e}")))?;
                let text = text.trim();
                if !text.is_empty() {
                    texts.push(text.to_string());
                }
            }
            if texts.is_empty() {
                return Err(VoiceError::NoSpeech {
                    seconds: audio.seconds(),
                });
            }
            let total_ms = started.elapsed().as_secs_f64() * 1000.0 + audio.decode_ms();
            Ok(Transcription {
                text: texts.join(" "),
                language,
                duration_s: audio.seconds(),
                audio_sha256: audio.sha256().to_string(),
                windows,
                timings: Timings {
                    decode_ms: audio.decode_ms(),
                    features_ms,
                    model_ms,
                    total_ms,
                },
            })
        }

        /// The language to prompt with: English for English-only models, the
        /// one asked for, or the one the model detects in the first window.
        fn language(
            &self,
            batch: &[f32],
            n_mels: usize,
            options: &TranscribeOptions,
        ) -> Result<String, VoiceError> {
            if !self.multilingual {
                return match options.language.as_deref() {
                    None | Some("en") => Ok("en".to_string()),
                    Some(other) => Err(VoiceError::Language {
                        dir: self.dir.clone(),
                        language: other.to_string(),
                    }),
                };
            }
            if let Some(language) = &options.language {
                if self
                    .tokenizer
                    .token_to_id(&format!("<|{language}|>"))
                    .is_none()
                {
                    return Err(VoiceError::UnknownLanguage {
                        language: language.clone(),
                    });
                }
                return Ok(language.clone());
            }
            // The first window only (the encoder runs on what it is given).
            let mut first = batch[..n_mels * WINDOW_FRAMES].to_vec();
            let view = StorageView::new(&[1, n_mels, WINDOW_FRAMES], &mut first, Device::CPU)
                .map_err(|e| VoiceError::Engine(format!("{e:#}")))?;
            let detected = self
                .engine
                .detect_language(&view)
                .map_err(|e| VoiceError::Engine(format!("detecting the language: {e:#}")))?;
            let token = detected
                .first()
                .and_then(|window| window.first())
                .map(|best| best.language.clone())
                .ok_or_else(|| VoiceError::Engine("no language was detected".into()))?;
            Ok(token
                .trim_start_matches("<|")
                .trim_end_matches("|>")
                .to_string())
        }
    }
}
