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

impl ModelBackend for Scripted {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: "scripted".into(),
            detail: "a test script".into(),
            context_length: None,
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
                prompt_ms: 0.0,
                generation_ms: 0.0,
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
    let asked = Arc::new(Mutex::new(Vec::new()));
    let backend = Arc::new(Scripted {
        turns,
        asked: Arc::clone(&asked),
    });
    let runtime = Runtime::builder()
        .backend(backend)
        .policy(Policy::preset("default").expect("policy"))
        .workspace(workspace)
        .transcripts(None)
        .build()
        .expect("runtime");
    (runtime, asked)
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
