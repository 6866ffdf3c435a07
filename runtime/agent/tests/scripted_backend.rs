//! The agent loop behind the model-backend seam, driven by a scripted
//! backend: no llama.cpp in this test, only the `ModelBackend` trait, the
//! real gate, policy and file tools. The real model drives the same loop
//! in the top-level `tests/agent.rs`; a script reaches the branches a small
//! model rarely takes (a model that keeps repeating a failing call).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::StreamExt;
use stack_agent::{Event, Runtime, SessionConfig, TurnEnd};
use stack_core::policy::Policy;
use stack_model::toolcall::ParsedTurn;
use stack_model::{
    BackendInfo, BackendSession, Capabilities, CompletionRequest, Counters, Generation,
    ModelBackend, ModelError, StopReason,
};
use stack_seal::StateFile;
use stack_types::message::{Role, ToolCall};

/// Answers each request with the next scripted turn (the last one again
/// once the script runs out), and records what it was asked.
struct Scripted {
    turns: Vec<ParsedTurn>,
    asked: Arc<Mutex<Vec<CompletionRequest>>>,
}

struct ScriptedSession {
    turns: Vec<ParsedTurn>,
    next: usize,
    asked: Arc<Mutex<Vec<CompletionRequest>>>,
    totals: Counters,
}

/// What a scripted session saves as its state: the text of the last
/// request, as a real KV cache holds the conversation.
fn state_of(asked: &[CompletionRequest]) -> String {
    asked
        .last()
        .map(|request| serde_json::to_string(&request.messages).unwrap_or_default())
        .unwrap_or_default()
}

impl ModelBackend for Scripted {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: "scripted".into(),
            detail: "a test script".into(),
            context_length: None,
            parameters: None,
            capabilities: Capabilities::default(),
        }
    }

    fn open_session(
        self: Arc<Self>,
    ) -> BoxFuture<'static, Result<Box<dyn BackendSession>, ModelError>> {
        let session = ScriptedSession {
            turns: self.turns.clone(),
            next: 0,
            asked: Arc::clone(&self.asked),
            totals: Counters::default(),
        };
        Box::pin(async move { Ok(Box::new(session) as Box<dyn BackendSession>) })
    }
}

impl BackendSession for ScriptedSession {
    fn complete(
        &mut self,
        request: CompletionRequest,
        deltas: tokio::sync::mpsc::UnboundedSender<String>,
        _cancel: Arc<AtomicBool>,
    ) -> BoxFuture<'_, Result<Generation, ModelError>> {
        self.asked.lock().expect("lock").push(request);
        let turn = self.turns[self.next.min(self.turns.len() - 1)].clone();
        self.next += 1;
        let text = turn.content.clone().unwrap_or_default();
        let _ = deltas.send(text.clone());
        let counters = Counters {
            prompt_evaluated: 10,
            prompt_reused: 0,
            generated: 5,
        };
        self.totals.add(counters);
        Box::pin(async move {
            Ok(Generation {
                text,
                turn,
                stop: StopReason::EndOfTurn,
                counters,
                routing_prompt_evaluated: 0,
                prompt_ms: 0.0,
                routing_ms: 0.0,
                generation_ms: 0.0,
                sampling_ms: 0.0,
                call_path: None,
                server_ms: None,
            })
        })
    }

    fn totals(&mut self) -> BoxFuture<'_, Counters> {
        let totals = self.totals;
        Box::pin(async move { totals })
    }

    fn clear(&mut self) {}

    fn save_state(&mut self, file: StateFile) -> BoxFuture<'_, Result<(), ModelError>> {
        let state = state_of(&self.asked.lock().expect("lock"));
        let saved = file
            .save_with(|path| std::fs::write(path, state.as_bytes()))
            .map_err(|e| ModelError::Backend(e.to_string()));
        Box::pin(std::future::ready(saved))
    }

    fn load_state(&mut self, file: StateFile) -> BoxFuture<'_, Result<usize, ModelError>> {
        let loaded = file
            .load_with(|path| std::fs::read(path))
            .map(|bytes| bytes.len())
            .map_err(|e| ModelError::Backend(e.to_string()));
        Box::pin(std::future::ready(loaded))
    }
}

fn call(id: &str, name: &str, arguments: &str) -> ParsedTurn {
    ParsedTurn {
        content: None,
        tool_calls: vec![ToolCall::function(id, name, arguments)],
    }
}

fn answer(text: &str) -> ParsedTurn {
    ParsedTurn {
        content: Some(text.into()),
        tool_calls: Vec::new(),
    }
}

fn runtime(
    turns: Vec<ParsedTurn>,
    workspace: &std::path::Path,
) -> (Runtime, Arc<Mutex<Vec<CompletionRequest>>>) {
    runtime_under(turns, workspace, "default")
}

/// [`runtime`] under another policy preset.
fn runtime_under(
    turns: Vec<ParsedTurn>,
    workspace: &std::path::Path,
    preset: &str,
) -> (Runtime, Arc<Mutex<Vec<CompletionRequest>>>) {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let backend = Arc::new(Scripted {
        turns,
        asked: Arc::clone(&asked),
    });
    (runtime_of(backend, workspace, preset), asked)
}

/// A runtime on `backend` in `workspace` under a policy preset, keeping
/// no transcripts.
fn runtime_of(
    backend: Arc<dyn ModelBackend>,
    workspace: &std::path::Path,
    preset: &str,
) -> Runtime {
    Runtime::builder()
        .backend(backend)
        .policy(Policy::preset(preset).expect("policy"))
        .workspace(workspace)
        .transcripts(None)
        .build()
        .expect("runtime")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_runs_and_its_result_goes_back_to_the_backend() {
    let workspace = tempfile::tempdir().expect("tempdir");
    std::fs::write(workspace.path().join("notes.txt"), "buy milk").expect("write");
    let (runtime, asked) = runtime(
        vec![
            call("c1", "read_file", r#"{"path": "notes.txt"}"#),
            answer("It says buy milk."),
        ],
        workspace.path(),
    );
    let session = runtime
        .session(SessionConfig::default())
        .await
        .expect("session");
    let events: Vec<Event> = session.send("What do my notes say?").collect().await;
    let finished = events.iter().find_map(|e| match e {
        Event::ToolFinished { outcome, .. } => Some(outcome.clone()),
        _ => None,
    });
    assert_eq!(
        finished.expect("a call finished").stdout,
        "buy milk",
        "{events:?}"
    );
    assert!(matches!(
        events.last(),
        Some(Event::TurnFinished {
            reason: TurnEnd::Answered,
            steps: 2,
            ..
        })
    ));
    // The second request carried the tool's result back.
    let asked = asked.lock().expect("lock");
    let last = asked.last().expect("asked twice");
    let tool = last
        .messages
        .iter()
        .find(|m| m.role == Role::Tool)
        .expect("a tool message");
    assert!(tool.text().contains("buy milk"), "{tool:?}");
    assert!(!last.tools.is_empty(), "the tools are offered");
}

/// Each step's request grounds the reading tools' path parameters in the
/// workspace as it is at that step: a file written by the first call is
/// offered to the second step, a denied file never is, a session that
/// turns grounding off sends none, and `request` grounding copies paths
/// and search patterns from the turn's request.
#[tokio::test(flavor = "multi_thread")]
async fn each_step_grounds_the_path_parameters_in_the_workspace_as_it_is() {
    let workspace = tempfile::tempdir().expect("tempdir");
    std::fs::write(workspace.path().join("notes.txt"), "buy milk").expect("write");
    std::fs::write(workspace.path().join(".env"), "TOKEN=1").expect("write");
    std::fs::create_dir(workspace.path().join("src")).expect("mkdir");
    // Writes are allowed; `.env` is still denied, as by `default`.
    let (grounded, asked) = runtime_under(
        vec![
            call(
                "c1",
                "write_file",
                r#"{"path": "src/new.txt", "content": "x"}"#,
            ),
            answer("Done."),
        ],
        workspace.path(),
        "trusted",
    );
    let session = grounded
        .session(SessionConfig::default())
        .await
        .expect("session");
    let events: Vec<Event> = session.send("Write src/new.txt").collect().await;
    assert!(
        matches!(
            events.last(),
            Some(Event::TurnFinished {
                reason: TurnEnd::Answered,
                ..
            })
        ),
        "{events:?}"
    );
    let requests = asked.lock().expect("lock").clone();
    let [first, second] = requests.as_slice() else {
        panic!("two steps: {}", requests.len());
    };
    let values = |request: &CompletionRequest, tool: &str| {
        request
            .argument_values
            .get(tool, "path")
            .map(<[String]>::to_vec)
            .unwrap_or_default()
    };
    assert_eq!(values(first, "read_file"), ["notes.txt"]);
    assert_eq!(values(second, "read_file"), ["notes.txt", "src/new.txt"]);
    assert_eq!(values(first, "list_dir"), [".", "src"]);
    assert_eq!(values(first, "search_files"), [".", "src"]);
    // A new file's path is held to the workspace by its shape, not listed.
    assert!(first.argument_values.get("write_file", "path").is_none());
    assert_eq!(
        first.argument_values.pattern("write_file", "path"),
        Some(stack_core::grounding::NEW_PATH_PATTERN)
    );
    // So is code.
    assert_eq!(
        first.argument_values.pattern("execute_code", "code"),
        Some(stack_core::grounding::PROGRAM_PATTERN)
    );

    let (ungrounded, asked) = runtime(vec![answer("Hello.")], workspace.path());
    let session = ungrounded
        .session(SessionConfig {
            grounding: stack_agent::GroundingMode::Off,
            ..SessionConfig::default()
        })
        .await
        .expect("session");
    let _: Vec<Event> = session.send("Hi").collect().await;
    let requests = asked.lock().expect("lock").clone();
    assert!(!requests.is_empty(), "the model was asked");
    assert!(requests.iter().all(|r| r.argument_values.is_empty()));

    // `request` grounding copies from this turn's words.
    let (copying, asked) = runtime(vec![answer("Hello.")], workspace.path());
    let session = copying
        .session(SessionConfig {
            grounding: stack_agent::GroundingMode::Request,
            ..SessionConfig::default()
        })
        .await
        .expect("session");
    let _: Vec<Event> = session
        .send("Search for 'buy milk' and save the lines to found.txt")
        .collect()
        .await;
    let request = asked.lock().expect("lock").last().cloned().expect("asked");
    let paths = request
        .argument_values
        .get("write_file", "path")
        .expect("write_file grounded");
    assert_eq!(paths[0], "found.txt", "{paths:?}");
    assert!(paths.contains(&"notes.txt".to_string()), "{paths:?}");
    let patterns = request
        .argument_values
        .get("search_files", "pattern")
        .expect("pattern grounded");
    assert_eq!(patterns[0], "buy milk", "{patterns:?}");

    // By default (`auto`), a small in-process model's session grounds as
    // `request` does, and a model of unknown size's (served) as
    // `workspace` does.
    for (parameters, copies) in [(Some(135_000_000), true), (None, false)] {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let backend = Arc::new(Sized {
            scripted: Arc::new(Scripted {
                turns: vec![answer("Hello.")],
                asked: Arc::clone(&asked),
            }),
            parameters,
        });
        let session = runtime_of(backend, workspace.path(), "default")
            .session(SessionConfig::default())
            .await
            .expect("session");
        let _: Vec<Event> = session.send("Save hello to found.txt").collect().await;
        let request = asked.lock().expect("lock").last().cloned().expect("asked");
        let paths = request.argument_values.get("write_file", "path");
        assert_eq!(
            paths.is_some_and(|paths| paths[0] == "found.txt"),
            copies,
            "{parameters:?}: {paths:?}"
        );
        assert_eq!(
            request
                .argument_values
                .pattern("write_file", "path")
                .is_some(),
            !copies,
            "{parameters:?}"
        );
    }
}

/// A scripted backend that reports a parameter count, as an in-process
/// model does.
struct Sized {
    scripted: Arc<Scripted>,
    parameters: Option<u64>,
}

impl ModelBackend for Sized {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            parameters: self.parameters,
            ..self.scripted.info()
        }
    }

    fn open_session(
        self: Arc<Self>,
    ) -> BoxFuture<'static, Result<Box<dyn BackendSession>, ModelError>> {
        Arc::clone(&self.scripted).open_session()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_that_repeats_a_failing_call_is_stopped() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let (runtime, _) = runtime(
        vec![call("c", "read_file", r#"{"path": "missing.txt"}"#)],
        workspace.path(),
    );
    let session = runtime
        .session(SessionConfig::default())
        .await
        .expect("session");
    let events: Vec<Event> = session.send("Read missing.txt").collect().await;
    assert!(
        matches!(
            events.last(),
            Some(Event::TurnFinished {
                reason: TurnEnd::RepeatedFailures,
                steps: 3,
                ..
            })
        ),
        "{:?}",
        events.last()
    );
    // The session goes on: the next turn runs (and stops the same way).
    let again: Vec<Event> = session.send("Try again").collect().await;
    assert!(matches!(again.last(), Some(Event::TurnFinished { .. })));
}

/// A call's connections through the egress proxy reach the session's
/// stream as `egress` events, before the call's `tool_finished`, and the
/// refusal reaches the model in the tool result.
#[tokio::test(flavor = "multi_thread")]
async fn egress_decisions_are_events_and_refusals_reach_the_model() {
    use stack_types::EgressDecision;
    let workspace = tempfile::tempdir().expect("tempdir");
    let site = std::net::TcpListener::bind("127.0.0.2:0").expect("bind");
    let port = site.local_addr().expect("addr").port();
    let policy = Policy::from_toml(
        r#"
[defaults]
decision = "allow"
[tools.execute_code]
decision = "allow"
[sandbox]
backend = "process"
network = { allow = ["site.test", "127.0.0.2"], deny = ["denied.test"], hosts = { "site.test" = "127.0.0.2", "denied.test" = "127.0.0.2" } }
"#,
        std::path::Path::new("egress.toml"),
    )
    .expect("policy");
    let code = format!("curl -sS -o /dev/null --max-time 5 http://denied.test:{port}/; echo done");
    let arguments = serde_json::json!({"language": "bash", "code": code}).to_string();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let backend = Arc::new(Scripted {
        turns: vec![call("c1", "execute_code", &arguments), answer("Refused.")],
        asked: Arc::clone(&asked),
    });
    let runtime = Runtime::builder()
        .backend(backend)
        .policy(policy)
        .workspace(workspace.path())
        .transcripts(None)
        .build()
        .expect("runtime");
    let session = runtime
        .session(SessionConfig::default())
        .await
        .expect("session");
    let events: Vec<Event> = session.send("Fetch it.").collect().await;
    let egress_at = events
        .iter()
        .position(|e| matches!(e, Event::Egress { record, .. } if record.decision == EgressDecision::Refused && record.rule == "deny denied.test"))
        .unwrap_or_else(|| panic!("no egress event: {events:?}"));
    let finished_at = events
        .iter()
        .position(|e| matches!(e, Event::ToolFinished { .. }))
        .expect("the call finished");
    assert!(egress_at < finished_at);
    let asked = asked.lock().expect("lock");
    let tool = asked
        .last()
        .and_then(|request| request.messages.iter().find(|m| m.role == Role::Tool))
        .expect("a tool message");
    assert!(
        tool.text().contains("refused denied.test") && tool.text().contains("deny denied.test"),
        "{tool:?}"
    );
}

/// What reaches the disk is redacted like what reaches the model: a secret
/// in the user's prompt and in a file a tool read is in neither the
/// transcript nor the audit log.
#[tokio::test(flavor = "multi_thread")]
async fn secrets_are_redacted_before_anything_is_stored() {
    const SECRET: &str = "AKIAABCDEFGHIJKLMNOP";
    let workspace = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("data");
    std::fs::write(workspace.path().join("notes.txt"), format!("key {SECRET}")).expect("write");
    let asked = Arc::new(Mutex::new(Vec::new()));
    let backend = Arc::new(Scripted {
        turns: vec![
            call("c1", "read_file", r#"{"path": "notes.txt"}"#),
            answer("Done."),
        ],
        asked: Arc::clone(&asked),
    });
    let runtime = Runtime::builder()
        .backend(backend)
        .policy(Policy::preset("default").expect("policy"))
        .workspace(workspace.path())
        .transcripts(Some(data.path().to_path_buf()))
        .build()
        .expect("runtime");
    let session = runtime
        .session(SessionConfig::default())
        .await
        .expect("session");
    let _: Vec<Event> = session
        .send(format!("My key is {SECRET}; read notes.txt"))
        .collect()
        .await;
    let transcript = std::fs::read_to_string(data.path().join(format!("{}.jsonl", session.id())))
        .expect("transcript");
    assert!(!transcript.contains(SECRET), "{transcript}");
    assert!(
        transcript.contains("[REDACTED:aws-access-key-id]"),
        "{transcript}"
    );
    let audit = std::fs::read_to_string(data.path().join("audit/audit.jsonl")).expect("audit");
    assert!(!audit.contains(SECRET), "{audit}");
}

// Encryption at rest, on real files: with `[privacy] encrypt = true` the
// transcript, KV state, REPL history and audit log hold none of a planted
// prompt or secret, and still resume and export; a transcript cut short
// mid-record (what `kill -9` during a write leaves) resumes minus that
// record; a flipped byte is reported and the file left as it was.

const PLANTED: &str = "zebra-violet-4417";

fn encrypted_policy() -> Policy {
    let mut policy = Policy::preset("default").expect("preset");
    policy.privacy.keep_transcripts = Some(true);
    policy.privacy.audit_log = Some(true);
    policy.privacy.encrypt = Some(true);
    policy
}

fn sealed_runtime(
    turns: Vec<ParsedTurn>,
    workspace: &std::path::Path,
    data: &std::path::Path,
    vault: &stack_seal::Vault,
) -> Runtime {
    Runtime::builder()
        .backend(Arc::new(Scripted {
            turns,
            asked: Arc::default(),
        }))
        .policy(encrypted_policy())
        .workspace(workspace)
        .transcripts(Some(data.to_path_buf()))
        .vault(Arc::new(vault.clone()))
        .build()
        .expect("runtime")
}

/// Every file under `dir`, with its bytes.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read");
                found.push((path, bytes));
            }
        }
    }
    found
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_session_stores_no_plaintext_and_resumes_and_exports() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("data");
    std::fs::write(
        workspace.path().join("notes.txt"),
        format!("the code is {PLANTED}"),
    )
    .expect("write");
    let key = stack_seal::Key::generate();
    let vault = stack_seal::Vault::sealing(key.clone(), stack_seal::key::KeySource::Given);
    let turns = vec![
        call("c1", "read_file", r#"{"path": "notes.txt"}"#),
        answer("Noted."),
    ];
    let runtime = sealed_runtime(turns.clone(), workspace.path(), data.path(), &vault);
    let session = runtime
        .session(SessionConfig::default())
        .await
        .expect("session");
    let id = session.id().to_string();
    let _: Vec<Event> = session
        .send(format!("Remember {PLANTED} and read notes.txt"))
        .collect()
        .await;
    session.save_state().await.expect("save state");
    let store = runtime.store().expect("store");
    store
        .open_history(&id)
        .expect("history")
        .append(&format!("Remember {PLANTED}"))
        .expect("append");
    session.set_training_use(true).await.expect("consent");
    drop(session);

    // Every kind of stored file is there, sealed, and none holds the prompt.
    let files = files_under(data.path());
    for suffix in [
        format!("{id}.jsonl"),
        format!("{id}.kv"),
        "audit.jsonl".into(),
        format!("history/{id}"),
    ] {
        let (path, bytes) = files
            .iter()
            .find(|(path, _)| path.ends_with(&suffix))
            .unwrap_or_else(|| panic!("no {suffix} in {files:?}"));
        assert!(
            bytes.starts_with(stack_seal::record::MAGIC_FAMILY),
            "{} is not sealed",
            path.display()
        );
    }
    for (path, bytes) in &files {
        assert!(
            !contains(bytes, PLANTED),
            "{} holds the prompt",
            path.display()
        );
        assert!(
            !contains(bytes, "notes.txt"),
            "{} holds a tool argument",
            path.display()
        );
    }

    // A runtime with the key resumes it (its KV state too) and exports it.
    let again = sealed_runtime(
        vec![answer("Still here.")],
        workspace.path(),
        data.path(),
        &vault,
    );
    let resumed = again
        .session(SessionConfig {
            resume: Some(id.clone()),
            ..SessionConfig::default()
        })
        .await
        .expect("resume");
    let messages = resumed.messages().await;
    assert!(
        messages.iter().any(|m| m.text().contains(PLANTED)),
        "{messages:?}"
    );
    let _: Vec<Event> = resumed.send("And now?").collect().await;
    drop(resumed);
    let store = again.store().expect("store");
    let exported = store.export_chatml(&id).expect("export");
    assert!(exported.contains(PLANTED));
    assert_eq!(
        store.history(&id).expect("history"),
        vec![format!("Remember {PLANTED}")]
    );
    let audit =
        stack_seal::record::read_records(&store.audit_log(), Some("audit"), &vault).expect("audit");
    assert!(audit.items.len() >= 2, "decision and result records");

    // Another key, or none: a clear error, and nothing changed on disk.
    let before = files_under(data.path());
    let stranger = stack_seal::Vault::sealing(
        stack_seal::Key::generate(),
        stack_seal::key::KeySource::Given,
    );
    let refused = Runtime::builder()
        .backend(Arc::new(Scripted {
            turns: vec![answer("?")],
            asked: Arc::default(),
        }))
        .policy(encrypted_policy())
        .transcripts(Some(data.path().to_path_buf()))
        .vault(Arc::new(stranger.clone()))
        .build()
        .err()
        .expect("the sealed audit log is refused");
    assert!(
        refused.to_string().contains("not this runtime's"),
        "{refused}"
    );
    let other = Runtime::builder()
        .backend(Arc::new(Scripted {
            turns: vec![answer("?")],
            asked: Arc::default(),
        }))
        .policy(encrypted_policy())
        .workspace(workspace.path())
        .transcripts(Some(data.path().to_path_buf()))
        .audit_log(None)
        .vault(Arc::new(stranger))
        .build()
        .expect("runtime without the log");
    let refused = other
        .session(SessionConfig {
            resume: Some(id.clone()),
            ..SessionConfig::default()
        })
        .await
        .err()
        .expect("refused");
    let message = refused.to_string();
    assert!(
        message.contains(&key.id().to_string()) && message.contains("not this runtime's"),
        "{message}"
    );
    let plaintext = stack_agent::store::SessionStore::new(data.path());
    let message = plaintext
        .export_chatml(&id)
        .expect_err("no key")
        .to_string();
    assert!(message.contains("has no key"), "{message}");
    drop(other);
    let after = files_under(data.path());
    for (path, bytes) in &before {
        let now = after.iter().find(|(p, _)| p == path).map(|(_, b)| b);
        assert_eq!(now, Some(bytes), "{} changed", path.display());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transcript_cut_mid_record_resumes_minus_that_record_and_a_flipped_byte_is_reported() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("data");
    let vault = stack_seal::Vault::sealing(
        stack_seal::Key::generate(),
        stack_seal::key::KeySource::Given,
    );
    let runtime = sealed_runtime(
        vec![answer("One."), answer("Two.")],
        workspace.path(),
        data.path(),
        &vault,
    );
    let session = runtime
        .session(SessionConfig::default())
        .await
        .expect("session");
    let id = session.id().to_string();
    let _: Vec<Event> = session.send("first").collect().await;
    let _: Vec<Event> = session.send("second").collect().await;
    let messages = session.messages().await;
    drop(session);
    let transcript = data.path().join(format!("{id}.jsonl"));

    // Torn: the last record loses its tail, as when the writer is killed
    // in the middle of its write.
    let whole = std::fs::read(&transcript).expect("read");
    std::fs::write(&transcript, &whole[..whole.len() - 7]).expect("tear");
    let resumed = runtime
        .session(SessionConfig {
            resume: Some(id.clone()),
            ..SessionConfig::default()
        })
        .await
        .expect("resumes");
    assert_eq!(
        resumed.messages().await,
        messages[..messages.len() - 1].to_vec()
    );
    // It goes on: the torn bytes are cut off before the next record.
    let _: Vec<Event> = resumed.send("third").collect().await;
    let after = resumed.messages().await;
    drop(resumed);
    let read = stack_agent::read_transcript(data.path(), &id, &vault).expect("reads whole");
    assert_eq!(read, after);

    // A flipped byte in a record before the last: reported by record and
    // offset, by resume and export alike, and the file left as it was.
    let mut bytes = std::fs::read(&transcript).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&transcript, &bytes).expect("flip");
    let refused = runtime
        .session(SessionConfig {
            resume: Some(id.clone()),
            ..SessionConfig::default()
        })
        .await
        .err()
        .expect("refused");
    assert!(
        refused.to_string().contains("fails authentication"),
        "{refused}"
    );
    let store = runtime.store().expect("store");
    store.set_training_use(&id, true).expect("consent");
    assert!(matches!(
        store.export_chatml(&id),
        Err(stack_agent::TranscriptError::Sealed(
            stack_seal::SealError::Tampered { .. }
        ))
    ));
    assert_eq!(std::fs::read(&transcript).expect("read"), bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_an_encrypted_session_keeps_the_log_sealed_and_on_record() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("data");
    std::fs::write(workspace.path().join("notes.txt"), "x").expect("write");
    let vault = stack_seal::Vault::sealing(
        stack_seal::Key::generate(),
        stack_seal::key::KeySource::Given,
    );
    let turns = vec![
        call("c1", "read_file", r#"{"path": "notes.txt"}"#),
        answer("Done."),
    ];
    let runtime = sealed_runtime(turns, workspace.path(), data.path(), &vault);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let session = runtime
            .session(SessionConfig::default())
            .await
            .expect("session");
        let _: Vec<Event> = session
            .send(format!("{PLANTED} read notes.txt"))
            .collect()
            .await;
        ids.push(session.id().to_string());
    }
    let store = runtime.store().expect("store");
    let removed = store.delete(&ids[0]).expect("delete");
    assert!(
        removed.files >= 1 && removed.audit_records >= 2,
        "{removed:?}"
    );
    let log = store.audit_log();
    assert!(std::fs::read(&log)
        .expect("log")
        .starts_with(stack_seal::record::MAGIC_FAMILY));
    let records: Vec<serde_json::Value> =
        stack_seal::record::read_records(&log, Some("audit"), &vault)
            .expect("audit")
            .items
            .iter()
            .map(|r| serde_json::from_slice(r).expect("json"))
            .collect();
    assert!(records
        .iter()
        .all(|r| r["session"] != ids[0].as_str() || r["event"] == "deleted"));
    assert!(records.iter().any(|r| r["session"] == ids[1].as_str()));
    assert!(records
        .iter()
        .any(|r| r["event"] == "deleted" && r["session"] == ids[0].as_str()));
    assert!(store.read_transcript(&ids[1]).is_ok());
}

/// The writer of [`a_session_killed_with_sigkill_while_it_writes_resumes`]:
/// run by that test as a child process (ignored otherwise). It prints its
/// session id, then runs turns until it is killed.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "the child process of a_session_killed_with_sigkill_while_it_writes_resumes"]
async fn sealed_writer_child() {
    use std::io::Write;
    let (Some(dir), Some(key)) = (
        std::env::var_os("STACK_TEST_CHILD_DIR"),
        std::env::var("STACK_TEST_CHILD_KEY").ok(),
    ) else {
        panic!("run by its parent test only");
    };
    let dir = std::path::PathBuf::from(dir);
    let vault = stack_seal::Vault::sealing(
        stack_seal::Key::from_hex(&key).expect("key"),
        stack_seal::key::KeySource::Given,
    );
    let workspace = tempfile::tempdir().expect("tempdir");
    let turns = vec![call("c1", "list_dir", "{}"), answer(PLANTED)];
    let runtime = sealed_runtime(turns, workspace.path(), &dir, &vault);
    let session = runtime
        .session(SessionConfig::default())
        .await
        .expect("session");
    println!("\nSESSION {}", session.id());
    std::io::stdout().flush().expect("flush");
    for n in 0.. {
        let _: Vec<Event> = session.send(format!("turn {n}: {PLANTED}")).collect().await;
    }
}

/// `kill -9` of a process in the middle of writing a sealed session: the
/// transcript and the audit log still open, the session resumes with what
/// was written, and it goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_killed_with_sigkill_while_it_writes_resumes() {
    use std::io::BufRead;
    let data = tempfile::tempdir().expect("data");
    let key = stack_seal::Key::generate();
    let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "sealed_writer_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("STACK_TEST_CHILD_DIR", data.path())
        .env("STACK_TEST_CHILD_KEY", key.to_hex().as_str())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("child");
    let stdout = child.stdout.take().expect("stdout");
    let id = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            line.split_once("SESSION ")
                .map(|(_, id)| id.trim().to_string())
        })
        .expect("the child's session id");
    let transcript = data.path().join(format!("{id}.jsonl"));
    // Let it write for a while, then kill it mid-stream.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::metadata(&transcript).map_or(0, |m| m.len()) < 20_000 {
        assert!(std::time::Instant::now() < deadline, "the child writes");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let vault = stack_seal::Vault::sealing(key, stack_seal::key::KeySource::Given);
    let written = stack_agent::read_transcript(data.path(), &id, &vault).expect("transcript opens");
    assert!(written.len() > 20, "{} messages", written.len());
    let audit = stack_seal::record::read_records(
        &data.path().join("audit/audit.jsonl"),
        Some("audit"),
        &vault,
    )
    .expect("the audit log opens");
    assert!(!audit.items.is_empty());
    let workspace = tempfile::tempdir().expect("tempdir");
    let runtime = sealed_runtime(vec![answer("back")], workspace.path(), data.path(), &vault);
    let resumed = runtime
        .session(SessionConfig {
            resume: Some(id.clone()),
            ..SessionConfig::default()
        })
        .await
        .expect("resumes");
    assert_eq!(resumed.messages().await, written);
    let _: Vec<Event> = resumed.send("after the kill").collect().await;
    drop(resumed);
    let after = stack_agent::read_transcript(data.path(), &id, &vault).expect("reads");
    assert_eq!(after.len(), written.len() + 2);
}

// Spoken turns through the embedding API, with the real speech model
// (speech synthesized by espeak-ng) and a scripted language model: bad
// audio ends its turn with a named error and the session goes on; what was
// heard becomes the user's message; `[privacy] keep_audio` keeps the audio
// sealed beside the transcript, and deleting the session removes it.
#[cfg(feature = "voice")]
#[tokio::test(flavor = "multi_thread")]
async fn spoken_turns_are_transcribed_kept_sealed_and_deleted() {
    use stack_voice::{Audio, AudioLimits, ModelOptions, SpeechModel};

    let workspace = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("data");
    let model_dir = stack_voice::default_model_dir().expect("assets");
    let speech = Arc::new(
        SpeechModel::load(&model_dir, ModelOptions::default())
            .expect("speech model (scripts/setup)"),
    );
    let mut policy = encrypted_policy();
    policy.privacy.keep_audio = Some(true);
    let key = stack_seal::Key::generate();
    let vault = stack_seal::Vault::sealing(key, stack_seal::key::KeySource::Given);
    let asked: Arc<Mutex<Vec<CompletionRequest>>> = Arc::default();
    let runtime = Runtime::builder()
        .backend(Arc::new(Scripted {
            turns: vec![answer("Here they are.")],
            asked: Arc::clone(&asked),
        }))
        .policy(policy)
        .workspace(workspace.path())
        .transcripts(Some(data.path().to_path_buf()))
        .vault(Arc::new(vault.clone()))
        .speech_model(speech)
        .build()
        .expect("runtime");
    let session = runtime
        .session(SessionConfig::default())
        .await
        .expect("session");
    let id = session.id().to_string();

    // Silence: refused, named, and nothing reaches the model.
    let events: Vec<Event> = session
        .send_audio(vec![0.0; 32_000], 16_000)
        .collect()
        .await;
    assert!(
        matches!(&events[0], Event::Error { message } if message.contains("silent")),
        "{events:?}"
    );
    assert!(matches!(
        events.last(),
        Some(Event::TurnFinished {
            reason: TurnEnd::Error,
            ..
        })
    ));
    assert!(asked.lock().expect("lock").is_empty());

    // A turn cancelled while its audio is transcribed records nothing and
    // says it was cancelled.
    let (long, long_rate) = espeak_samples(&"read the notes and list the files. ".repeat(12));
    let mut turn = session.send_audio(long, long_rate);
    turn.cancellation().cancel();
    let mut cancelled = Vec::new();
    while let Some(event) = turn.next().await {
        cancelled.push(event);
    }
    assert!(
        matches!(
            cancelled.as_slice(),
            [Event::TurnFinished {
                reason: TurnEnd::Cancelled,
                ..
            }]
        ),
        "{cancelled:?}"
    );
    assert!(asked.lock().expect("lock").is_empty());

    // Speech, at espeak-ng's own 22.05 kHz.
    let (samples, rate) = espeak_samples("show me the python files");
    let events: Vec<Event> = session.send_audio(samples.clone(), rate).collect().await;
    let Some(Event::Transcribed { transcription }) = events.first() else {
        panic!("the first event says what was heard: {events:?}");
    };
    let heard = transcription.text.to_lowercase();
    assert!(
        heard.contains("python") && heard.contains("files"),
        "{heard}"
    );
    assert!(matches!(
        events.last(),
        Some(Event::TurnFinished {
            reason: TurnEnd::Answered,
            ..
        })
    ));
    let request = asked.lock().expect("lock").last().cloned().expect("asked");
    let user = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .expect("user message");
    assert_eq!(user.text(), transcription.text);

    // Kept sealed: the transcript and the audio hold no plaintext of what
    // was said, and the audio opens as the 16 kHz clip the model heard.
    let transcript = data.path().join(format!("{id}.jsonl"));
    let raw = std::fs::read(&transcript).expect("transcript");
    assert!(!contains(&raw, "python"), "the transcript is sealed");
    let audio_file = data.path().join(format!("{id}.audio"));
    let records = stack_seal::record::read_records(
        &audio_file,
        Some(&stack_agent::voice::audio_context(&id)),
        &vault,
    )
    .expect("kept audio opens");
    assert_eq!(records.items.len(), 1);
    let (sha256, wav) = stack_agent::voice::kept_clip(&records.items[0]).expect("a kept clip");
    assert_eq!(sha256, transcription.audio_sha256);
    let kept = Audio::from_wav(&wav, &AudioLimits::default()).expect("a WAV");
    let expected = Audio::from_samples(&samples, rate, &AudioLimits::default()).expect("audio");
    assert_eq!(kept.samples().len(), expected.samples().len());
    let messages = stack_agent::read_transcript(data.path(), &id, &vault).expect("transcript");
    assert!(messages
        .iter()
        .any(|m| m.role == Role::User && m.text() == transcription.text));

    // The session goes on after the refused turn, and deleting it takes
    // the audio with it.
    drop(session);
    let removed = runtime.store().expect("store").delete(&id).expect("delete");
    assert!(removed.files >= 2, "{removed:?}");
    assert!(!audio_file.exists() && !transcript.exists());
}

/// `text` spoken by espeak-ng: its samples and rate.
#[cfg(feature = "voice")]
fn espeak_samples(text: &str) -> (Vec<f32>, u32) {
    let wav = std::process::Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "140", "--stdout", text])
        .output()
        .expect("espeak-ng (scripts/setup installs it)")
        .stdout;
    let reader = hound::WavReader::new(std::io::Cursor::new(&wav)).expect("wav");
    let rate = reader.spec().sample_rate;
    let samples = reader
        .into_samples::<i16>()
        .filter_map(Result::ok)
        .map(|s| f32::from(s) / 32768.0)
        .collect();
    (samples, rate)
}

// Kept audio without encryption: a plaintext record file that takes a
// second clip, and that sealing (what `agent keys rotate` does to a
// plaintext file when `encrypt` is turned on) keeps whole.
#[cfg(feature = "voice")]
#[tokio::test(flavor = "multi_thread")]
async fn kept_audio_without_encryption_takes_every_clip_and_seals_later() {
    use stack_voice::{ModelOptions, SpeechModel};

    let workspace = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("data");
    let model_dir = stack_voice::default_model_dir().expect("assets");
    let speech = Arc::new(
        SpeechModel::load(&model_dir, ModelOptions::default())
            .expect("speech model (scripts/setup)"),
    );
    let mut policy = Policy::preset("default").expect("preset");
    policy.privacy.keep_transcripts = Some(true);
    policy.privacy.keep_audio = Some(true);
    let runtime = Runtime::builder()
        .backend(Arc::new(Scripted {
            turns: vec![answer("Done.")],
            asked: Arc::default(),
        }))
        .policy(policy)
        .workspace(workspace.path())
        .transcripts(Some(data.path().to_path_buf()))
        .vault(Arc::new(stack_seal::Vault::plaintext()))
        .speech_model(speech)
        .build()
        .expect("runtime");
    let session = runtime
        .session(SessionConfig::default())
        .await
        .expect("session");
    let id = session.id().to_string();
    let mut heard = Vec::new();
    for text in ["list the files", "read the notes"] {
        let (samples, rate) = espeak_samples(text);
        let events: Vec<Event> = session.send_audio(samples, rate).collect().await;
        let Some(Event::Transcribed { transcription }) = events.first() else {
            panic!("{events:?}");
        };
        heard.push(transcription.audio_sha256.clone());
        assert!(
            matches!(
                events.last(),
                Some(Event::TurnFinished {
                    reason: TurnEnd::Answered,
                    ..
                })
            ),
            "{events:?}"
        );
    }
    drop(session);
    let audio_file = data.path().join(format!("{id}.audio"));
    let context = stack_agent::voice::audio_context(&id);
    let plaintext = stack_seal::Vault::plaintext();
    let records = stack_seal::record::read_records(&audio_file, Some(&context), &plaintext)
        .expect("the kept audio reads");
    let hashes: Vec<String> = records
        .items
        .iter()
        .map(|r| stack_agent::voice::kept_clip(r).expect("a clip").0)
        .collect();
    assert_eq!(hashes, heard);
    // Sealed where it lies, as a key rotation seals a plaintext file.
    let vault = stack_seal::Vault::sealing(
        stack_seal::Key::generate(),
        stack_seal::key::KeySource::Given,
    );
    stack_seal::record::Appender::open(
        &audio_file,
        &context,
        &vault,
        stack_seal::record::Hold::Nothing,
    )
    .expect("seals");
    let sealed = stack_seal::record::read_records(&audio_file, Some(&context), &vault)
        .expect("the sealed audio reads");
    assert_eq!(sealed.items, records.items);
    assert!(!contains(
        &std::fs::read(&audio_file).expect("read"),
        "wav_base64"
    ));
}

/// The builder only records: a missing workspace, a bad tool and a
/// duplicate surface at `build()`, and the order of the calls does not
/// change which tools are offered.
#[test]
fn builder_errors_surface_at_build_and_the_order_of_calls_does_not_matter() {
    #[derive(serde::Deserialize, schemars::JsonSchema)]
    struct Args {
        #[allow(dead_code)]
        sku: String,
    }
    let backend = || {
        Arc::new(Scripted {
            turns: vec![answer("ok")],
            asked: Arc::default(),
        })
    };
    let workspace = tempfile::tempdir().expect("tempdir");
    let base = || {
        Runtime::builder()
            .backend(backend())
            .policy(Policy::preset("default").expect("policy"))
            .transcripts(None)
    };

    // A workspace that does not exist is the builder's error.
    let missing = workspace.path().join("no-such-folder");
    let err = base()
        .workspace(&missing)
        .build()
        .err()
        .expect("a missing workspace fails the build");
    assert!(
        matches!(err, stack_agent::AgentError::Workspace(_)),
        "{err}"
    );

    // Two tools of one name: the chain goes on, `build` says no.
    let tool = |_: Args, _: &stack_core::context::ToolContext| Ok(String::new());
    let err = base()
        .workspace(workspace.path())
        .rust_tool("lookup", "Look a product up.", tool)
        .rust_tool("lookup", "The same name again.", tool)
        .build()
        .err()
        .expect("a duplicate tool fails the build");
    assert!(err.to_string().contains("lookup"), "{err}");

    // Built-ins off, before or after a host tool: the same tools.
    let names = |runtime: &Runtime| {
        let mut names: Vec<String> = runtime
            .registry()
            .tools()
            .map(|spec| spec.name.clone())
            .collect();
        names.sort();
        names
    };
    let before = base()
        .workspace(workspace.path())
        .builtin_tools(false)
        .rust_tool("lookup", "Look a product up.", tool)
        .build()
        .expect("runtime");
    let after = base()
        .workspace(workspace.path())
        .rust_tool("lookup", "Look a product up.", tool)
        .builtin_tools(false)
        .build()
        .expect("runtime");
    assert_eq!(names(&before), vec!["lookup".to_string()]);
    assert_eq!(names(&before), names(&after));
    // By default the built-ins are offered.
    let default = base().workspace(workspace.path()).build().expect("runtime");
    for builtin in [
        "read_file",
        "write_file",
        "list_dir",
        "search_files",
        "execute_code",
    ] {
        assert!(names(&default).iter().any(|n| n == builtin), "{builtin}");
    }
}
