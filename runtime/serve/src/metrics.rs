//! `GET /metrics`: the service's counters in the Prometheus text format.
//!
//! Generation speed (tokens and the seconds spent making them, and their
//! ratio), the queue in front of the model, open sessions, running
//! generations, sandboxed tool calls by status, turns by how they ended,
//! approvals waiting for an answer, and responses by status code.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use stack_model::Counters;

use crate::AppState;

/// The counters.
#[derive(Debug, Default)]
pub struct Metrics {
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    /// Microseconds spent generating (prompt and tokens).
    generation_micros: AtomicU64,
    tool_calls: Mutex<BTreeMap<String, u64>>,
    turns: Mutex<BTreeMap<String, u64>>,
    responses: Mutex<BTreeMap<u16, u64>>,
    completions: AtomicU64,
    transcriptions: AtomicU64,
    /// Milliseconds of audio transcribed.
    audio_millis: AtomicU64,
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    *map.lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key)
        .or_default() += 1;
}

impl Metrics {
    /// Counts one generation's tokens and time.
    pub fn count_generation(&self, counters: Counters, seconds: f64) {
        self.prompt_tokens.fetch_add(
            counters.prompt_evaluated + counters.prompt_reused,
            Ordering::Relaxed,
        );
        self.generated_tokens
            .fetch_add(counters.generated, Ordering::Relaxed);
        self.generation_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// Counts one transcription (`/v1/audio/transcriptions`) of
    /// `seconds` of audio.
    pub fn count_transcription(&self, seconds: f64) {
        self.transcriptions.fetch_add(1, Ordering::Relaxed);
        self.audio_millis
            .fetch_add((seconds * 1e3) as u64, Ordering::Relaxed);
    }

    /// Counts one finished chat completion.
    pub fn count_completion(&self) {
        self.completions.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one sandboxed call by its status.
    pub fn count_tool_call(&self, status: &str) {
        bump(&self.tool_calls, status.to_string());
    }

    /// Counts one turn by how it ended.
    pub fn count_turn(&self, end: &str) {
        bump(&self.turns, end.to_string());
    }

    /// Counts one response by status code.
    pub fn count_response(&self, status: u16) {
        bump(&self.responses, status);
    }
}

/// The text for `/metrics`.
pub(crate) async fn render(State(state): State<Arc<AppState>>) -> Response {
    let metrics = &state.metrics;
    let mut text = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, value: String| {
        let _ = writeln!(
            text,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    let generated = metrics.generated_tokens.load(Ordering::Relaxed);
    let seconds = metrics.generation_micros.load(Ordering::Relaxed) as f64 / 1e6;
    gauge(
        "stack_generated_tokens_total",
        "Tokens generated.",
        "counter",
        generated.to_string(),
    );
    gauge(
        "stack_prompt_tokens_total",
        "Prompt tokens, evaluated or reused from a cache.",
        "counter",
        metrics.prompt_tokens.load(Ordering::Relaxed).to_string(),
    );
    gauge(
        "stack_generation_seconds_total",
        "Seconds spent in generation (prompt and tokens).",
        "counter",
        format!("{seconds:.3}"),
    );
    gauge(
        "stack_tokens_per_second",
        "Tokens generated per second of generation, over the server's life.",
        "gauge",
        format!(
            "{:.2}",
            if seconds > 0.0 {
                generated as f64 / seconds
            } else {
                0.0
            }
        ),
    );
    gauge(
        "stack_transcriptions_total",
        "Clips transcribed by /v1/audio/transcriptions.",
        "counter",
        metrics.transcriptions.load(Ordering::Relaxed).to_string(),
    );
    gauge(
        "stack_audio_seconds_total",
        "Seconds of audio transcribed by /v1/audio/transcriptions.",
        "counter",
        format!(
            "{:.3}",
            metrics.audio_millis.load(Ordering::Relaxed) as f64 / 1e3
        ),
    );
    gauge(
        "stack_queue_depth",
        "Requests waiting for a place to generate.",
        "gauge",
        state.admission.waiting().to_string(),
    );
    gauge(
        "stack_running_generations",
        "Completions and turns generating now.",
        "gauge",
        state.admission.running().to_string(),
    );
    gauge(
        "stack_sessions_active",
        "Open agent sessions.",
        "gauge",
        state.sessions.len().to_string(),
    );
    gauge(
        "stack_approvals_pending",
        "Approval requests waiting for an answer.",
        "gauge",
        state.sessions.pending_approvals().to_string(),
    );
    gauge(
        "stack_chat_completions_total",
        "Chat completions answered.",
        "counter",
        metrics.completions.load(Ordering::Relaxed).to_string(),
    );
    let mut labelled = |name: &str, help: &str, label: &str, values: Vec<(String, u64)>| {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} counter");
        for (key, count) in values {
            let _ = writeln!(text, "{name}{{{label}=\"{key}\"}} {count}");
        }
    };
    let snapshot = |map: &Mutex<BTreeMap<String, u64>>| -> Vec<(String, u64)> {
        map.lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    };
    labelled(
        "stack_sandbox_calls_total",
        "Tool calls by status.",
        "status",
        snapshot(&metrics.tool_calls),
    );
    labelled(
        "stack_turns_total",
        "Session turns by how they ended.",
        "end",
        snapshot(&metrics.turns),
    );
    let responses = metrics
        .responses
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    labelled(
        "stack_http_responses_total",
        "HTTP responses by status code.",
        "code",
        responses,
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
