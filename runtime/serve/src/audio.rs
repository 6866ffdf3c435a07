//! Spoken input over HTTP, transcribed locally by the server's speech model
//! (`agent serve --voice`; the runtime's `RuntimeBuilder::speech_model`).
//!
//! * `POST /v1/audio/transcriptions`: OpenAI's transcription API, as the
//!   official clients' `audio.transcriptions.create` sends it: a
//!   `multipart/form-data` body with `file` (a WAV clip) and `model`, and
//!   optionally `language`, `response_format` (`json`, `text` or
//!   `verbose_json`) and `temperature` (0 only: decoding is beam search,
//!   deterministic). Any other field is refused by name.
//! * A session turn may carry `audio` instead of `message`
//!   ([`InputAudio`], the shape of OpenAI's `input_audio` content part:
//!   base64 WAV). Its transcript is the user's message; the turn's events
//!   start with `transcribed`.
//!
//! Bad audio (not WAV, truncated, empty, silent, over the server's length
//! limit) gets a 400 that names the problem from the transcription API; in
//! a turn it ends the turn with an `error` event that names it, and the
//! session goes on. A failure of the engine itself is a 500. A
//! transcription holds a place of the server's admission
//! (`--max-running`), as a generation does, until its CPU work is over,
//! also when the client has gone: so transcribing beside generating never
//! runs more at once than the operator allowed. Nothing here writes audio to disk; a session's
//! transcript keeps the clip's sha256, and the clip itself only under the
//! policy's `[privacy] keep_audio`.

use std::sync::Arc;

use axum::extract::multipart::{Multipart, MultipartError, MultipartRejection};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::AppState;

/// A clip sent with a turn, as OpenAI's `input_audio` content part.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputAudio {
    /// The clip, base64 (standard alphabet, padded).
    pub data: String,
    /// Its format.
    pub format: AudioFormat,
}

/// The audio formats a turn takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum AudioFormat {
    /// RIFF WAVE: PCM or float, any common rate and channel count.
    Wav,
}

impl InputAudio {
    /// The clip's bytes.
    pub(crate) fn decode(&self) -> Result<Vec<u8>, ApiError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(self.data.trim())
            .map_err(|err| ApiError::BadRequest(format!("`audio.data` is not base64: {err}")))?;
        if bytes.is_empty() {
            return Err(ApiError::BadRequest("`audio.data` is empty".into()));
        }
        Ok(bytes)
    }
}

/// Refuses spoken input on a server without a speech model.
pub(crate) fn require_speech(state: &AppState) -> Result<(), ApiError> {
    if has_speech_model(state) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(if cfg!(feature = "voice") {
            "this server has no speech model: start it with `agent serve --voice` (and `--speech-model DIR` for another model than the default)".into()
        } else {
            "this server was built without voice input (feature `voice`)".into()
        }))
    }
}

#[cfg(feature = "voice")]
fn has_speech_model(state: &AppState) -> bool {
    state.runtime.speech_model().is_some()
}

#[cfg(not(feature = "voice"))]
fn has_speech_model(_: &AppState) -> bool {
    false
}

/// `response_format` of a transcription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseFormat {
    Json,
    Text,
    VerboseJson,
}

/// What a transcription request asked for.
#[derive(Debug, Default)]
struct Form {
    file: Option<Vec<u8>>,
    model: Option<String>,
    language: Option<String>,
    format: Option<ResponseFormat>,
}

fn form_error(err: MultipartError) -> ApiError {
    if err.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(format!(
            "the audio is larger than this server takes ({})",
            err.body_text()
        ))
    } else {
        ApiError::BadRequest(format!("a malformed multipart form: {}", err.body_text()))
    }
}

/// A language code as a request may give it (`en`, `EN`, `haw`): two or
/// three letters, lowercased; anything else (a Whisper control token's
/// name, say) is refused.
fn language_code(value: &str) -> Result<Option<String>, ApiError> {
    let code = value.trim().to_ascii_lowercase();
    if code.is_empty() {
        return Ok(None);
    }
    if (2..=3).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_lowercase()) {
        Ok(Some(code))
    } else {
        Err(ApiError::BadRequest(format!(
            "`language` {value:?} is not a language code (ISO 639-1, such as `en`)"
        )))
    }
}

async fn read_form(mut multipart: Multipart) -> Result<Form, ApiError> {
    let mut form = Form::default();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(field) = multipart.next_field().await.map_err(form_error)? {
        let name = field.name().unwrap_or_default().to_string();
        if !seen.insert(name.clone()) {
            return Err(ApiError::BadRequest(format!(
                "the form has `{name}` more than once"
            )));
        }
        if name == "file" {
            form.file = Some(Vec::from(field.bytes().await.map_err(form_error)?));
            continue;
        }
        let value = field.text().await.map_err(form_error)?;
        match name.as_str() {
            "model" => form.model = Some(value),
            "language" => form.language = language_code(&value)?,
            "response_format" => {
                form.format = Some(match value.as_str() {
                    "json" => ResponseFormat::Json,
                    "text" => ResponseFormat::Text,
                    "verbose_json" => ResponseFormat::VerboseJson,
                    other => {
                        return Err(ApiError::BadRequest(format!(
                            "`response_format` {other:?} is not offered: use json, text or verbose_json"
                        )))
                    }
                });
            }
            "temperature" => match value.trim().parse::<f32>() {
                Ok(0.0) => {}
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "`temperature` {value:?} is not offered: this server decodes with beam search, which is deterministic (send 0 or leave it out)"
                    )))
                }
            },
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown field `{other}`: this endpoint takes file, model, language, response_format and temperature"
                )))
            }
        }
    }
    Ok(form)
}

/// `POST /v1/audio/transcriptions`.
pub(crate) async fn transcriptions(
    State(state): State<Arc<AppState>>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let multipart = multipart.map_err(|rejection| {
        ApiError::UnsupportedMediaType(format!(
            "send the audio as multipart/form-data with a `file` field ({})",
            rejection.body_text()
        ))
    })?;
    if state.draining.is_cancelled() {
        return Err(ApiError::ShuttingDown);
    }
    require_speech(&state)?;
    let form = read_form(multipart).await?;
    let file = form
        .file
        .ok_or_else(|| ApiError::BadRequest("the form has no `file` field".into()))?;
    if form.model.as_deref().is_none_or(|m| m.trim().is_empty()) {
        return Err(ApiError::BadRequest(
            "the form has no `model` field (any name: this server has one speech model)".into(),
        ));
    }
    if file.is_empty() {
        return Err(ApiError::BadRequest("the `file` field is empty".into()));
    }
    // A place of the admission, as a generation takes one. The work runs
    // in a task of its own that holds the place, so a client that goes
    // away does not free the place while the CPU work goes on.
    let place = state.admission.enter().await?;
    let worker = Arc::clone(&state);
    let transcription = tokio::spawn(async move {
        let transcription = transcribe(&worker, file, form.language).await;
        drop(place);
        transcription
    })
    .await
    .map_err(|err| ApiError::Internal(format!("transcribing: {err}")))??;
    state.metrics.count_transcription(transcription.duration_s);
    Ok(match form.format.unwrap_or(ResponseFormat::Json) {
        ResponseFormat::Json => axum::Json(json!({ "text": transcription.text })).into_response(),
        ResponseFormat::Text => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            transcription.text,
        )
            .into_response(),
        ResponseFormat::VerboseJson => axum::Json(json!({
            "task": "transcribe",
            "language": transcription.language,
            "duration": transcription.duration_s,
            "text": transcription.text,
            "audio_sha256": transcription.audio_sha256,
            "processing_ms": transcription.timings.total_ms,
        }))
        .into_response(),
    })
}

#[cfg(feature = "voice")]
async fn transcribe(
    state: &AppState,
    wav: Vec<u8>,
    language: Option<String>,
) -> Result<stack_voice::Transcription, ApiError> {
    let limits = state.runtime.audio_limits();
    // Decoding and resampling are CPU work: the blocking pool.
    let audio = tokio::task::spawn_blocking(move || stack_voice::Audio::from_wav(&wav, &limits))
        .await
        .map_err(|err| ApiError::Internal(format!("decoding the audio: {err}")))?
        .map_err(|err| ApiError::BadRequest(format!("the audio: {err}")))?;
    let mut options = state.runtime.transcribe_options().clone();
    if language.is_some() {
        options.language = language;
    }
    state
        .runtime
        .transcribe_with(audio, options)
        .await
        .map_err(|err| match err {
            stack_agent::AgentError::Voice(err) if err.is_bad_audio() => {
                ApiError::BadRequest(format!("the audio: {err}"))
            }
            stack_agent::AgentError::Voice(
                stack_voice::VoiceError::Language { .. }
                | stack_voice::VoiceError::UnknownLanguage { .. },
            ) => ApiError::BadRequest(
                "`language` is not one this server's speech model knows".into(),
            ),
            other => {
                tracing::error!(error = %other, "transcription failed");
                ApiError::Internal(
                    "the speech model failed on this clip (see the server's log)".into(),
                )
            }
        })
}

#[cfg(not(feature = "voice"))]
async fn transcribe(
    _: &AppState,
    _: Vec<u8>,
    _: Option<String>,
) -> Result<stack_voice::Transcription, ApiError> {
    Err(ApiError::BadRequest(
        "this server was built without voice input (feature `voice`)".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_language_is_a_short_code_in_any_case_and_nothing_else() {
        for (given, code) in [("en", "en"), ("EN", "en"), (" de ", "de"), ("haw", "haw")] {
            assert_eq!(
                language_code(given).ok().flatten().as_deref(),
                Some(code),
                "{given}"
            );
        }
        assert!(matches!(language_code(""), Ok(None)));
        for bad in ["transcribe", "english", "e1", "<|en|>", "e"] {
            assert!(language_code(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn turn_audio_must_be_base64_of_something() {
        let audio = |data: &str| InputAudio {
            data: data.into(),
            format: AudioFormat::Wav,
        };
        assert_eq!(audio("UklGRg==").decode().ok(), Some(b"RIFF".to_vec()));
        assert!(audio("not base64!").decode().is_err());
        assert!(audio("").decode().is_err());
    }
}
