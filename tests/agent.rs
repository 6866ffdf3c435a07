//! The agent loop end to end with the real SmolLM2 model, real sandboxes and
//! real files: a prompt leads to a validated, executed tool call whose result
//! goes back to the model; transcripts, resume and export.

mod common;

use std::sync::{Arc, OnceLock};

use stack_runtime::agent::{
    export_chatml, read_transcript, Event, GroundingMode, Runtime, SessionConfig, TurnEnd,
};
use stack_runtime::message::Role;
use stack_runtime::model::llama::{Model, ModelOptions, SamplingOptions};
use stack_runtime::model::ToolChoice;
use stack_runtime::policy::{ApprovalAnswer, ApprovalRequest, Policy};

fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            Model::load(ModelOptions {
                threads: Some(2),
                ..ModelOptions::default()
            })
            .expect("model")
        })
        .clone()
}

/// Greedy decoding, at most `max_tokens` a step.
fn greedy(max_tokens: u32) -> SamplingOptions {
    SamplingOptions {
        temperature: 0.0,
        max_tokens,
        ..SamplingOptions::default()
    }
}

/// The calls the model proposed in `events`, in order.
fn proposed_calls(events: &[Event]) -> Vec<stack_runtime::message::ToolCall> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ToolCallProposed { call, .. } => Some(call.clone()),
            _ => None,
        })
        .collect()
}

/// The outcomes of the calls that ran in `events`, in order.
fn outcomes(events: &[Event]) -> Vec<stack_runtime::outcome::ToolOutcome> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ToolFinished { outcome, .. } => Some(outcome.clone()),
            _ => None,
        })
        .collect()
}

/// One step that must call `tool`, greedily, with `grounding`.
fn one_call_to(tool: &str, grounding: GroundingMode) -> SessionConfig {
    SessionConfig {
        tool_choice: ToolChoice::Named(tool.into()),
        sampling: greedy(96),
        max_steps: 1,
        grounding,
        ..SessionConfig::default()
    }
}

/// The `argument` of the first call in `events`, and its outcome.
fn first_argument_and_outcome(
    events: &[Event],
    argument: &str,
) -> (String, stack_runtime::outcome::ToolOutcome) {
    let call = proposed_calls(events).into_iter().next().expect("a call");
    let outcome = outcomes(events).into_iter().next().expect("a result");
    let arguments: serde_json::Value =
        serde_json::from_str(&call.function.arguments).expect("JSON arguments");
    (
        arguments[argument].as_str().unwrap_or_default().to_string(),
        outcome,
    )
}

/// A runtime on the shared model in `workspace` under the policy preset
/// `preset`, keeping no transcripts.
fn runtime_in(workspace: &std::path::Path, preset: &str) -> Runtime {
    Runtime::builder()
        .model(model())
        .policy(Policy::preset(preset).expect("policy"))
        .workspace(workspace)
        .transcripts(None)
        .build()
        .expect("runtime")
}

async fn collect(session: &mut stack_runtime::agent::Session, text: &str) -> Vec<Event> {
    use futures::StreamExt;
    session.send(text).collect().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prompt_leads_to_a_validated_executed_call_whose_result_reaches_the_model() {
    let workspace = tempfile::tempdir().expect("tempdir");
    std::fs::write(workspace.path().join("notes.txt"), "buy milk").expect("write");
    let transcripts = tempfile::tempdir().expect("tempdir");
    let asked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let asked_in = Arc::clone(&asked);
    let approver = move |request: &ApprovalRequest| {
        asked_in.lock().expect("lock").push(request.tool.clone());
        ApprovalAnswer::Yes
    };
    let runtime = Runtime::builder()
        .model(model())
        .policy(Policy::preset("default").expect("policy"))
        .approval_handler(Arc::new(approver))
        .workspace(workspace.path())
        .transcripts(Some(transcripts.path().to_path_buf()))
        .build()
        .expect("runtime");
    let config = SessionConfig {
        tool_choice: ToolChoice::Named("read_file".into()),
        sampling: greedy(128),
        max_steps: 2,
        ..SessionConfig::default()
    };
    let mut session = runtime.session(config).await.expect("session");
    let events = collect(
        &mut session,
        "Read the file notes.txt and tell me what it says.",
    )
    .await;

    let proposed = proposed_calls(&events);
    assert!(
        !proposed.is_empty(),
        "the model proposed a call: {events:?}"
    );
    assert_eq!(proposed[0].function.name, "read_file");
    assert!(
        runtime.registry().validate(&proposed[0]).is_ok(),
        "the proposed call is valid"
    );
    let finished = outcomes(&events);
    assert_eq!(finished.len(), proposed.len(), "every proposed call ran");
    assert!(
        events.iter().any(|e| matches!(e, Event::Token { .. })),
        "tokens streamed"
    );
    let Some(Event::TurnFinished {
        steps,
        counters,
        timings,
        ..
    }) = events.last()
    else {
        panic!("the turn finished last: {events:?}")
    };
    assert!(*steps >= 1 && counters.generated > 0);
    // Where the turn's time went: the prompt, the constrained call (its
    // sampling a part of it) and the tool each took some, and the parts
    // are parts of the whole.
    assert!(
        timings.prompt_ms > 0.0
            && timings.generation_ms > 0.0
            && timings.sampling_ms > 0.0
            && timings.tools_ms > 0.0,
        "{timings:?}"
    );
    assert!(timings.sampling_ms <= timings.generation_ms, "{timings:?}");
    let parts = timings.grounding_ms
        + timings.routing_ms
        + timings.prompt_ms
        + timings.generation_ms
        + timings.tools_ms;
    assert!(parts <= timings.total_ms, "{timings:?}");
    assert!(
        (timings.other_ms() - (timings.total_ms - parts)).abs() < 1e-6,
        "{timings:?}"
    );
    // The result went back to the model as a tool message answering the call.
    let messages = session.messages().await;
    let tool_message = messages
        .iter()
        .find(|m| m.role == Role::Tool)
        .expect("a tool message");
    assert_eq!(
        tool_message.tool_call_id.as_deref(),
        Some(proposed[0].id.as_str())
    );
    if finished[0].status == stack_runtime::outcome::Status::Ok {
        assert!(tool_message.text().contains("buy milk"));
    }
    // read_file is allowed by the default policy: nobody was asked.
    assert!(asked.lock().expect("lock").is_empty());
    // The transcript has every message, in order, and exports as one example.
    let saved =
        read_transcript(transcripts.path(), session.id(), runtime.vault()).expect("transcript");
    assert_eq!(saved, messages);
    // Export waits for the owner's consent to training use.
    assert!(export_chatml(transcripts.path(), session.id(), runtime.vault()).is_err());
    session.set_training_use(true).await.expect("consent");
    let exported: serde_json::Value = serde_json::from_str(
        &export_chatml(transcripts.path(), session.id(), runtime.vault()).expect("export"),
    )
    .expect("json");
    assert_eq!(
        exported["messages"].as_array().map(Vec::len),
        Some(messages.len())
    );
    assert_eq!(exported["messages"][0]["role"], "system");
    assert!(exported["messages"]
        .as_array()
        .expect("array")
        .iter()
        .any(|m| m["tool_calls"][0]["type"] == "function"));

    // Resume: the same messages, and the first turn after resuming reuses
    // the KV cache saved with the transcript.
    let resumed_config = SessionConfig {
        resume: Some(session.id().to_string()),
        tool_choice: ToolChoice::None,
        sampling: greedy(16),
        ..SessionConfig::default()
    };
    session.save_state().await.expect("save the KV cache");
    let mut resumed = runtime
        .session(resumed_config.clone())
        .await
        .expect("resume");
    assert_eq!(resumed.messages().await, session.messages().await);
    collect(&mut resumed, "Thanks.").await;
    let events = collect(&mut resumed, "One more thing.").await;
    let Some(Event::TurnFinished { counters, .. }) = events.last() else {
        panic!("finished")
    };
    assert!(
        counters.prompt_reused > counters.prompt_evaluated,
        "the resumed session reuses its cache: {counters:?}"
    );
    assert!(runtime
        .session(SessionConfig {
            resume: Some("no-such-session".into()),
            ..resumed_config
        })
        .await
        .is_err());
}

/// Grounded arguments on the real model: asked to read a file, the
/// default model names one that exists, of several, and the read
/// succeeds. Without grounding it writes a path of its own making, which
/// the sandbox refuses (measured: `/Users/michael.doe/Desktop/todo-list.md`).
#[tokio::test(flavor = "multi_thread")]
async fn a_grounded_call_names_a_file_that_exists() {
    let workspace = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        workspace.path().join("todo.md"),
        "- buy milk\n- call Anna\n",
    )
    .expect("write");
    std::fs::write(workspace.path().join("notes.txt"), "the meeting moved").expect("write");
    std::fs::create_dir(workspace.path().join("src")).expect("mkdir");
    std::fs::write(workspace.path().join("src/main.py"), "print(1)\n").expect("write");
    let runtime = runtime_in(workspace.path(), "default");
    let prompt = "Read todo.md and tell me the first item.";

    let mut grounded = runtime
        .session(one_call_to("read_file", GroundingMode::Workspace))
        .await
        .expect("session");
    let events = collect(&mut grounded, prompt).await;
    let (path, outcome) = first_argument_and_outcome(&events, "path");
    assert_eq!(path, "todo.md", "{events:?}");
    assert_eq!(
        outcome.status,
        stack_runtime::outcome::Status::Ok,
        "{outcome:?}"
    );
    assert!(outcome.stdout.contains("buy milk"), "{outcome:?}");

    let mut free = runtime
        .session(one_call_to("read_file", GroundingMode::Off))
        .await
        .expect("session");
    let events = collect(&mut free, prompt).await;
    let (path, outcome) = first_argument_and_outcome(&events, "path");
    assert!(!path.is_empty(), "the call names a path: {events:?}");
    assert!(
        !workspace.path().join(&path).is_file(),
        "the model named a file that exists without grounding ({path}): the test no longer shows what grounding adds"
    );
    assert_ne!(
        outcome.status,
        stack_runtime::outcome::Status::Ok,
        "{outcome:?}"
    );
}

/// A new file's path on the real model: asked to save text to
/// `greeting.txt`, the default model names `greeting.txt` under grounding,
/// and the file is written in the workspace. Without it, it names a path
/// of its own making outside the workspace (measured: `/greeting.txt`),
/// which the workspace refuses.
#[tokio::test(flavor = "multi_thread")]
async fn a_grounded_write_names_a_path_inside_the_workspace() {
    let workspace = tempfile::tempdir().expect("tempdir");
    // `trusted` writes without asking (`default` asks, and no one answers).
    let runtime = runtime_in(workspace.path(), "trusted");
    let prompt = "Save the text 'hello world' to greeting.txt";

    let mut free = runtime
        .session(one_call_to("write_file", GroundingMode::Off))
        .await
        .expect("session");
    let events = collect(&mut free, prompt).await;
    let (path, outcome) = first_argument_and_outcome(&events, "path");
    assert!(
        path.starts_with('/'),
        "the model named a path inside the workspace without grounding ({path}): the test no longer shows what grounding adds"
    );
    assert_ne!(
        outcome.status,
        stack_runtime::outcome::Status::Ok,
        "{outcome:?}"
    );
    assert!(
        std::fs::read_dir(workspace.path())
            .expect("list")
            .next()
            .is_none(),
        "nothing was written"
    );

    let mut grounded = runtime
        .session(one_call_to("write_file", GroundingMode::Workspace))
        .await
        .expect("session");
    let events = collect(&mut grounded, prompt).await;
    let (path, outcome) = first_argument_and_outcome(&events, "path");
    assert_eq!(path, "greeting.txt", "{events:?}");
    assert_eq!(
        outcome.status,
        stack_runtime::outcome::Status::Ok,
        "{outcome:?}"
    );
    assert!(workspace.path().join("greeting.txt").is_file());
}

/// Grounded code never ends open: the default model asked to print a
/// word writes its string's opening quote bare, which ends the code, and
/// runs `print(`; with the program shape the quote must be code, and it
/// runs `print('stack')` (the task's check, like `agent eval`'s, reads
/// the output without regard to case).
#[tokio::test(flavor = "multi_thread")]
async fn grounded_code_does_not_end_where_a_bare_quote_would_end_it() {
    let workspace = tempfile::tempdir().expect("tempdir");
    // `trusted` runs code without asking.
    let runtime = runtime_in(workspace.path(), "trusted");
    let prompt = "Run Python code that prints 'stack' in upper case.";

    let mut free = runtime
        .session(one_call_to("execute_code", GroundingMode::Off))
        .await
        .expect("session");
    let events = collect(&mut free, prompt).await;
    let (code, outcome) = first_argument_and_outcome(&events, "code");
    assert!(
        code.ends_with(['(', '[', '{', ',', '=', ':', '+', ' ']),
        "the model's code ended closed without grounding ({code:?}): the test no longer shows what grounding adds"
    );
    assert_ne!(
        outcome.status,
        stack_runtime::outcome::Status::Ok,
        "{outcome:?}"
    );

    let mut grounded = runtime
        .session(one_call_to("execute_code", GroundingMode::Workspace))
        .await
        .expect("session");
    let events = collect(&mut grounded, prompt).await;
    let (code, outcome) = first_argument_and_outcome(&events, "code");
    assert_eq!(
        outcome.status,
        stack_runtime::outcome::Status::Ok,
        "{code:?}: {outcome:?}"
    );
    assert!(
        outcome.stdout.to_lowercase().contains("stack"),
        "{code:?}: {outcome:?}"
    );
}

/// The decision to call on the real model, with the session defaults
/// (`auto` routing and grounding): a request that asks for Python as its
/// means runs Python code in the sandbox, where the model's own evidence
/// (1.2 nats, under the 5-nat gate) called nothing; a statement that
/// names a language after `with` calls nothing, and a search that names
/// one as a modifier searches. (Whether the code is right is the model's:
/// with the built-in tools alone it writes `17 * 23 = 456`.)
#[tokio::test(flavor = "multi_thread")]
async fn a_request_for_python_runs_code_and_other_mentions_do_not() {
    let workspace = tempfile::tempdir().expect("tempdir");
    // `trusted` runs code without asking.
    let runtime = runtime_in(workspace.path(), "trusted");
    let config = || SessionConfig {
        sampling: greedy(96),
        max_steps: 1,
        ..SessionConfig::default()
    };

    let mut asked = runtime.session(config()).await.expect("session");
    let events = collect(&mut asked, "Compute 17 * 23 with Python.").await;
    let calls = proposed_calls(&events);
    assert_eq!(calls.len(), 1, "{events:?}");
    assert_eq!(calls[0].function.name, "execute_code", "{events:?}");
    let (language, outcome) = first_argument_and_outcome(&events, "language");
    let (code, _) = first_argument_and_outcome(&events, "code");
    assert_eq!(language, "python", "{events:?}");
    assert!(code.contains("17 * 23"), "{code:?}");
    // It ran in the sandbox: python3 answered for the code.
    assert!(outcome.exit_code.is_some(), "{outcome:?}");
    // The routing step decided, and its time is its own.
    let Some(Event::TurnFinished { timings, .. }) = events.last() else {
        panic!("the turn finished last: {events:?}")
    };
    assert!(
        timings.routing_ms > 0.0 && timings.tools_ms > 0.0,
        "{timings:?}"
    );

    // A statement that names a language after `with`: no call (a first
    // build, which took any sentence without `?` for a request, ran
    // JavaScript here).
    let mut talk = runtime.session(config()).await.expect("session");
    let events = collect(&mut talk, "I have worked with JavaScript for years.").await;
    assert!(proposed_calls(&events).is_empty(), "{events:?}");
    // A reply, whole or cut at the 96-token budget; not a call, not an error.
    assert!(
        matches!(
            events.last(),
            Some(Event::TurnFinished { reason, .. })
                if matches!(reason, TurnEnd::Answered | TurnEnd::TokenLimit)
        ),
        "{events:?}"
    );

    // A language that only modifies ("in Python files") leaves the choice
    // to the model, which searches (the first build ran code here too).
    let mut search = runtime.session(config()).await.expect("session");
    let events = collect(&mut search, "Search for TODO in Python files.").await;
    let called: Vec<String> = proposed_calls(&events)
        .into_iter()
        .map(|call| call.function.name)
        .collect();
    assert_eq!(called, ["search_files"], "{events:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn denials_and_failures_go_back_to_the_model_and_repeats_stop_the_turn() {
    let workspace = tempfile::tempdir().expect("tempdir");
    // No approver: `ask` means deny. write_file asks under the default policy.
    let runtime = runtime_in(workspace.path(), "default");
    let config = SessionConfig {
        tool_choice: ToolChoice::Named("write_file".into()),
        sampling: greedy(96),
        max_steps: 1,
        ..SessionConfig::default()
    };
    let mut session = runtime.session(config).await.expect("session");
    let events = collect(&mut session, "Write hello to hello.txt").await;
    let outcome = outcomes(&events).into_iter().next().expect("a result");
    assert_eq!(
        outcome.status,
        stack_runtime::outcome::Status::Denied,
        "{outcome:?}"
    );
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::ApprovalNeeded { .. })));
    let tool_message = session
        .messages()
        .await
        .into_iter()
        .rev()
        .find(|m| m.role == Role::Tool)
        .expect("tool message");
    assert!(
        tool_message.text().contains("denied"),
        "the denial reached the model: {}",
        tool_message.text()
    );
    assert!(
        std::fs::read_dir(workspace.path())
            .expect("dir")
            .next()
            .is_none(),
        "nothing was written"
    );
    assert!(
        matches!(events.last(), Some(Event::TurnFinished { reason, .. }) if *reason == TurnEnd::StepLimit)
    );
}

/// The turn is a stream that drives itself: cancelling its token stops it
/// with a `cancelled` end, dropping the stream stops it too, and the
/// session then runs the next turn as usual.
#[tokio::test(flavor = "multi_thread")]
async fn a_turn_stops_when_cancelled_or_dropped_and_the_session_goes_on() {
    use futures::StreamExt;
    let workspace = tempfile::tempdir().expect("tempdir");
    let runtime = runtime_in(workspace.path(), "default");
    let config = SessionConfig {
        tool_choice: ToolChoice::None,
        sampling: greedy(1500),
        max_steps: 1,
        ..SessionConfig::default()
    };
    let session = runtime.session(config).await.expect("session");
    let long = "Count from 1 to 1000, one number per line.";
    // Cancel after the first token: the turn still ends with its own event.
    let mut turn = session.send(long);
    let mut events = Vec::new();
    while let Some(event) = turn.next().await {
        if matches!(event, Event::Token { .. }) && !turn.cancellation().is_cancelled() {
            turn.cancellation().cancel();
        }
        events.push(event);
    }
    let Some(Event::TurnFinished {
        reason, counters, ..
    }) = events.last()
    else {
        panic!("the last event is turn_finished: {events:?}")
    };
    assert_eq!(*reason, TurnEnd::Cancelled, "{events:?}");
    assert!(
        counters.generated < 200,
        "generation stopped early: {counters:?}"
    );
    // Drop the stream after the first token: the session's totals show the
    // generation stopped there too.
    let before = session.totals().await.generated;
    let mut dropped = session.send(long);
    while let Some(event) = dropped.next().await {
        if matches!(event, Event::Token { .. }) {
            break;
        }
    }
    drop(dropped);
    let after = session.totals().await.generated;
    assert!(
        after - before < 200,
        "a dropped turn stops: {before} → {after}"
    );
    // The session goes on.
    let events: Vec<Event> = session.send("Say hi.").collect().await;
    assert!(
        matches!(events.last(), Some(Event::TurnFinished { .. })),
        "{events:?}"
    );
    assert!(
        !session.messages().await.is_empty(),
        "the conversation is kept"
    );
}

/// Encryption at rest with the real model: the saved KV cache (which holds
/// the whole conversation) and the transcript are sealed, hold none of the
/// prompt, and a resumed session still reuses the cache, read back through
/// memory.
#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_session_seals_its_kv_cache_and_still_reuses_it() {
    const PLANTED: &str = "zebra-violet-4417";
    let workspace = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let mut policy = Policy::preset("default").expect("policy");
    policy.privacy.keep_transcripts = Some(true);
    policy.privacy.encrypt = Some(true);
    let vault = Arc::new(stack_runtime::seal::Vault::sealing(
        stack_runtime::seal::Key::generate(),
        stack_runtime::seal::key::KeySource::Given,
    ));
    let runtime = Runtime::builder()
        .model(model())
        .policy(policy)
        .workspace(workspace.path())
        .transcripts(Some(data.path().to_path_buf()))
        .vault(Arc::clone(&vault))
        .build()
        .expect("runtime");
    let config = SessionConfig {
        tool_choice: ToolChoice::None,
        sampling: greedy(8),
        ..SessionConfig::default()
    };
    let mut session = runtime.session(config.clone()).await.expect("session");
    collect(&mut session, &format!("The password is {PLANTED}. Say ok.")).await;
    session.save_state().await.expect("save the KV cache");
    let id = session.id().to_string();
    drop(session);
    let kv = std::fs::read(data.path().join(format!("{id}.kv"))).expect("kv");
    let transcript = std::fs::read(data.path().join(format!("{id}.jsonl"))).expect("transcript");
    for (name, bytes) in [("kv", &kv), ("transcript", &transcript)] {
        assert!(
            bytes.starts_with(stack_runtime::seal::record::MAGIC_FAMILY),
            "{name} sealed"
        );
        assert!(
            !bytes
                .windows(PLANTED.len())
                .any(|w| w == PLANTED.as_bytes()),
            "{name} holds the prompt"
        );
    }
    assert!(kv.len() > 10_000, "a real KV cache: {} bytes", kv.len());
    let mut resumed = runtime
        .session(SessionConfig {
            resume: Some(id),
            ..config
        })
        .await
        .expect("resume");
    let events = collect(&mut resumed, "Again.").await;
    let Some(Event::TurnFinished { counters, .. }) = events.last() else {
        panic!("finished: {events:?}")
    };
    assert!(
        counters.prompt_reused > counters.prompt_evaluated,
        "the resumed session reuses its sealed cache: {counters:?}"
    );
}

/// A reply that runs into the token limit ends the turn as `token_limit`,
/// not `answered`: an answer cut short, and a call cut off before its
/// arguments were whole (not proposed, so nothing runs). The session goes
/// on: a turn with room to finish is answered.
#[tokio::test(flavor = "multi_thread")]
async fn a_reply_cut_at_the_token_limit_says_so() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let runtime = runtime_in(workspace.path(), "trusted");
    let ended = |events: &[Event]| match events.last() {
        Some(Event::TurnFinished { reason, .. }) => Some(*reason),
        _ => None,
    };
    let mut cut = runtime
        .session(SessionConfig {
            sampling: greedy(4),
            tool_choice: ToolChoice::None,
            max_steps: 1,
            ..SessionConfig::default()
        })
        .await
        .expect("session");
    let events = collect(&mut cut, "Tell me a long story about a dragon.").await;
    assert_eq!(ended(&events), Some(TurnEnd::TokenLimit), "{events:?}");

    let mut call = runtime
        .session(SessionConfig {
            sampling: greedy(6),
            tool_choice: ToolChoice::Named("execute_code".into()),
            max_steps: 1,
            ..SessionConfig::default()
        })
        .await
        .expect("session");
    let events = collect(&mut call, "Compute 17 * 23 with Python.").await;
    assert!(proposed_calls(&events).is_empty(), "{events:?}");
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::ToolStarted { .. })),
        "{events:?}"
    );
    assert_eq!(ended(&events), Some(TurnEnd::TokenLimit), "{events:?}");

    let mut roomy = runtime
        .session(SessionConfig {
            sampling: greedy(256),
            tool_choice: ToolChoice::None,
            max_steps: 1,
            ..SessionConfig::default()
        })
        .await
        .expect("session");
    let events = collect(&mut roomy, "Say hello.").await;
    assert_eq!(ended(&events), Some(TurnEnd::Answered), "{events:?}");
}
