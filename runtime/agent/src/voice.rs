//! Spoken turns: audio in, the transcript as the user's message.
//!
//! A turn starts from text, from a transcript the host made already
//! ([`Session::send_spoken`](crate::Session::send_spoken)), or (with the
//! `voice` feature) from audio the runtime transcribes itself
//! ([`Session::send_audio`](crate::Session::send_audio),
//! [`Session::send_wav`](crate::Session::send_wav)). Decoding and
//! transcription are CPU-bound and blocking: they run on the blocking
//! pool, never on a runtime thread. The turn's first event is then
//! [`Event::Transcribed`](crate::Event::Transcribed).
//!
//! What is kept: the transcript records the user's message with a `voice`
//! note (what was heard, whether the user edited it, the language, the
//! duration and the audio's sha256). The audio itself is kept only under
//! `[privacy] keep_audio = true`, as the 16 kHz mono 16-bit PCM the model
//! heard, one record per clip in `ID.audio` beside the transcript: a JSON
//! line (`audio_sha256`, `sample_rate`, `wav_base64`), so that the file is
//! a record file both plaintext and sealed (sealed under `[privacy]
//! encrypt`, re-sealed by `agent keys rotate`, removed with the session).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use stack_seal::record::{Appender, Hold};
use stack_seal::Vault;
use stack_voice::{Audio, AudioLimits, TranscribeOptions, Transcription};

use crate::AgentError;

/// The runtime's speech settings, shared by its sessions.
#[derive(Default)]
pub(crate) struct Speech {
    #[cfg(feature = "voice")]
    pub(crate) model: Option<Arc<stack_voice::SpeechModel>>,
    pub(crate) options: TranscribeOptions,
    pub(crate) limits: AudioLimits,
}

/// What a turn starts from.
pub(crate) enum TurnInput {
    /// Typed text.
    Text(String),
    /// A transcript made before the turn.
    Spoken(Spoken),
    /// Audio still to transcribe.
    #[cfg(feature = "voice")]
    Audio(AudioInput),
}

/// Audio still to transcribe.
#[cfg_attr(not(feature = "voice"), allow(dead_code))]
pub(crate) enum AudioInput {
    /// A WAV file's bytes.
    Wav(Vec<u8>),
    /// A host's samples.
    Samples { samples: Vec<f32>, sample_rate: u32 },
    /// Audio already decoded and checked.
    Decoded(Audio),
}

/// A spoken turn's message: what was heard, and what is sent.
pub(crate) struct Spoken {
    pub(crate) transcription: Transcription,
    pub(crate) text: String,
    pub(crate) audio: Option<Audio>,
}

impl Spoken {
    /// The `voice` note the transcript keeps beside the user's message.
    pub(crate) fn transcript_note(&self, kept_audio: Option<PathBuf>) -> serde_json::Value {
        let heard = &self.transcription;
        let mut voice = serde_json::json!({
            "transcript": heard.text,
            "edited": heard.text.trim() != self.text.trim(),
            "language": heard.language,
            "duration_s": heard.duration_s,
            "audio_sha256": heard.audio_sha256,
        });
        // The file's name, not its path: where the transcripts live is the
        // reader's business.
        let kept =
            kept_audio.and_then(|path| Some(path.file_name()?.to_string_lossy().into_owned()));
        if let (Some(name), Some(fields)) = (kept, voice.as_object_mut()) {
            fields.insert("audio_kept".into(), serde_json::Value::String(name));
        }
        serde_json::json!({ "voice": voice })
    }
}

/// The text a turn runs with, and what was spoken, if it was.
pub(crate) async fn resolve(
    input: TurnInput,
    speech: Arc<Speech>,
) -> Result<(String, Option<Spoken>), AgentError> {
    match input {
        TurnInput::Text(text) => Ok((text, None)),
        TurnInput::Spoken(spoken) => Ok((spoken.text.clone(), Some(spoken))),
        #[cfg(feature = "voice")]
        TurnInput::Audio(audio) => {
            let (transcription, audio) = transcribe(speech, audio).await?;
            let text = transcription.text.clone();
            Ok((
                text.clone(),
                Some(Spoken {
                    transcription,
                    text,
                    audio: Some(audio),
                }),
            ))
        }
        #[cfg(not(feature = "voice"))]
        #[allow(unreachable_patterns)]
        _ => {
            let _ = speech;
            Err(AgentError::NoSpeechModel)
        }
    }
}

/// Decodes (if need be) and transcribes `input` on the blocking pool.
#[cfg(feature = "voice")]
pub(crate) async fn transcribe(
    speech: Arc<Speech>,
    input: AudioInput,
) -> Result<(Transcription, Audio), AgentError> {
    let model = speech.model.clone().ok_or(AgentError::NoSpeechModel)?;
    tokio::task::spawn_blocking(move || {
        let audio = match input {
            AudioInput::Wav(bytes) => Audio::from_wav(&bytes, &speech.limits)?,
            AudioInput::Samples {
                samples,
                sample_rate,
            } => Audio::from_samples(&samples, sample_rate, &speech.limits)?,
            AudioInput::Decoded(audio) => audio,
        };
        let transcription = model.transcribe(&audio, &speech.options)?;
        Ok::<_, AgentError>((transcription, audio))
    })
    .await
    .map_err(|e| AgentError::Internal(format!("transcribing: {e}")))?
}

/// `ID.audio`: the kept audio of a session's spoken turns.
pub(crate) struct AudioFile {
    path: PathBuf,
    context: String,
    vault: Arc<Vault>,
}

impl AudioFile {
    pub(crate) fn new(dir: &Path, id: &str, vault: Arc<Vault>) -> AudioFile {
        AudioFile {
            path: dir.join(format!("{id}.audio")),
            context: audio_context(id),
            vault,
        }
    }

    /// Appends `audio` as a record (on the blocking pool): a JSON line
    /// holding the 16 kHz mono 16-bit WAV in base64; returns the file.
    pub(crate) async fn keep(&self, audio: &Audio) -> Result<PathBuf, AgentError> {
        use base64::Engine as _;
        let (path, context, vault) = (
            self.path.clone(),
            self.context.clone(),
            Arc::clone(&self.vault),
        );
        let record = serde_json::json!({
            "audio_sha256": audio.sha256(),
            "sample_rate": stack_voice::wav::SAMPLE_RATE,
            "wav_base64": base64::engine::general_purpose::STANDARD.encode(audio.to_wav_pcm16()?),
        });
        let wav = serde_json::to_vec(&record)
            .map_err(|e| AgentError::Internal(format!("keeping the audio: {e}")))?;
        tokio::task::spawn_blocking(move || {
            let mut file = Appender::open(&path, &context, &vault, Hold::Nothing)?;
            file.append(&wav)?;
            Ok::<_, stack_seal::SealError>(path)
        })
        .await
        .map_err(|e| AgentError::Internal(format!("keeping the audio: {e}")))?
        .map_err(|err| AgentError::Internal(format!("keeping the audio: {err}")))
    }
}

/// The sealing context of session `id`'s audio file.
pub fn audio_context(id: &str) -> String {
    format!("audio:{id}")
}

/// The WAV files of one record of a session's `ID.audio` (as
/// [`stack_seal::record::read_records`] returns it), and the sha256 of the
/// audio each came from.
pub fn kept_clip(record: &[u8]) -> Option<(String, Vec<u8>)> {
    use base64::Engine as _;
    let value: serde_json::Value = serde_json::from_slice(record).ok()?;
    let wav = base64::engine::general_purpose::STANDARD
        .decode(value["wav_base64"].as_str()?)
        .ok()?;
    Some((value["audio_sha256"].as_str()?.to_string(), wav))
}
