//! `agent serve`, end to end: the real binary on the real model, driven by
//! the official `openai` Python package (model API) and httpx2 (session
//! API) in `tests/clients/serve_client.py`, plus raw HTTP for the auth,
//! limit and bad-input cases, a load test (8 sessions × 5 turns), a crash
//! test (`kill -9` mid-turn, restart, resume) and a graceful shutdown.
//!
//! Tests that generate hold `GENERATING`, so no two run llama.cpp at once.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

static GENERATING: Mutex<()> = Mutex::new(());

const TOKEN: &str = "serve-test-token-0123456789";

fn generating() -> std::sync::MutexGuard<'static, ()> {
    GENERATING.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running `agent serve` with its own HOME (transcripts, audit log).
struct Served {
    child: Child,
    base: String,
    home: PathBuf,
}

impl Served {
    fn start(home: &Path, root: &Path, extra: &[&str]) -> Served {
        let assets = stack_runtime::assets::asset_dir().expect("asset folder");
        let mut child = Command::new(common::agent_binary())
            .args(["serve", "--port", "0", "--workspace-root"])
            .arg(root)
            .args(extra)
            .env("HOME", home)
            .env("STACK_RUNTIME_ASSETS", assets)
            .env("STACK_RUNTIME_TOKEN", TOKEN)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agent serve");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let base = loop {
            let line = lines
                .next()
                .expect("agent serve exited before it listened")
                .expect("read stderr");
            if let Some(rest) = line.strip_prefix("agent serve: listening on ") {
                break rest.split(' ').next().expect("an address").to_string();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Served {
            child,
            base,
            home: home.to_path_buf(),
        }
    }

    fn transcripts(&self) -> PathBuf {
        self.home.join(".local/share/stack-runtime/sessions/serve")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client(scenario: &str, served: &Served, args: &[&str]) -> Value {
    let output = Command::new(common::client_python())
        .arg(common::repo_root().join("tests/clients/serve_client.py"))
        .args([scenario, &served.base, TOKEN])
        .args(args)
        .output()
        .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the client failed:\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|err| panic!("no JSON ({err}): {stdout}"))
}

fn tokio() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio")
}

/// A request with the token; returns the status and the JSON body.
async fn call(method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    let http = reqwest::Client::new();
    let mut request = http
        .request(method.parse().expect("method"), url)
        .bearer_auth(TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The events of one turn over SSE (token events counted, not kept).
async fn turn(base: &str, id: &str, message: &str) -> Vec<Value> {
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/sessions/{id}/turns"))
        .bearer_auth(TOKEN)
        .json(&json!({"message": message}))
        .send()
        .await
        .expect("turn");
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.expect("stream");
    text.lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .filter_map(|data| serde_json::from_str::<Value>(data.trim()).ok())
        .filter(|event| event["event"] != "token")
        .collect()
}

/// Starts a turn and reads its event stream until `needle` has appeared;
/// returns the still open response and what was read.
async fn turn_until(
    base: &str,
    id: &str,
    message: &str,
    needle: &str,
) -> (reqwest::Response, String) {
    let mut response = reqwest::Client::new()
        .post(format!("{base}/v1/sessions/{id}/turns"))
        .bearer_auth(TOKEN)
        .json(&json!({"message": message}))
        .send()
        .await
        .expect("turn");
    let mut seen = String::new();
    read_until(&mut response, &mut seen, needle).await;
    (response, seen)
}

/// Opens a session whose turn must call `write_file` (which the default
/// policy asks about) and starts "Write hello to a.txt"; returns the
/// session's id and the turn's stream, read up to `approval_needed`.
async fn waiting_for_approval(base: &str) -> (String, reqwest::Response, String) {
    let (status, created) = call(
        "POST",
        &format!("{base}/v1/sessions"),
        Some(json!({"tool_choice": "write_file", "max_steps": 1, "temperature": 0, "max_tokens": 64})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id").to_string();
    let (response, seen) =
        turn_until(base, &id, "Write hello to a.txt", "event: approval_needed").await;
    (id, response, seen)
}

/// Reads an event stream into `seen` until it holds `needle`.
async fn read_until(response: &mut reqwest::Response, seen: &mut String, needle: &str) {
    while !seen.contains(needle) {
        let chunk = response.chunk().await.expect("chunk").expect("more");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}

/// Reads the rest of an event stream into `seen`, which must end within
/// `limit` (`what` names it in the failure).
async fn read_to_end(
    response: &mut reqwest::Response,
    seen: &mut String,
    limit: Duration,
    what: &str,
) {
    while let Some(chunk) = tokio::time::timeout(limit, response.chunk())
        .await
        .unwrap_or_else(|_| panic!("{what}"))
        .expect("chunk")
    {
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}

/// Whether a short completion at `url` gets a place within about 10 s
/// (each try refused with 429 while none is free).
async fn place_comes_back(url: &str) -> bool {
    for _ in 0..100 {
        let (status, _) = call(
            "POST",
            url,
            Some(json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})),
        )
        .await;
        if status == 200 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn message(body: &Value) -> String {
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn the_openai_client_gets_schema_valid_tool_calls_streaming_and_not() {
    let _generating = generating();
    let (home, root) = (tempdir(), tempdir());
    let served = Served::start(home.path(), root.path(), &[]);
    let seen = client("openai", &served, &[]);
    assert_eq!(seen["models"].as_array().map(Vec::len), Some(1), "{seen}");
    for key in ["plain", "streamed"] {
        let answer = &seen[key];
        assert!(
            !answer["content"].as_str().unwrap_or_default().is_empty(),
            "{key}: {answer}"
        );
        assert!(
            answer["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0,
            "{key}: {answer}"
        );
    }
    assert!(
        seen["streamed"]["pieces"].as_u64().unwrap_or(0) > 1,
        "streamed in pieces: {seen}"
    );
    assert_eq!(
        seen["plain"]["content"], seen["streamed"]["content"],
        "same seed, same text"
    );
    let mut calls = Vec::new();
    for case in seen["tool_calls"].as_array().expect("tool call cases") {
        assert_eq!(case["finish_reason"], "tool_calls", "{case}");
        calls.extend(case["calls"].as_array().cloned().unwrap_or_default());
    }
    assert_eq!(
        seen["tool_calls"][1]["calls"][0]["name"], "get_time",
        "the named tool"
    );
    // Under `auto` the default model calls too (on its own it never
    // decides to): the routing step runs in a batched slot, its prompts in
    // the engine's sequence aside.
    assert_eq!(
        seen["tool_calls"][2]["calls"][0]["name"], "get_weather",
        "auto: {seen}"
    );
    // The same messages and tools are the same prompt, whichever the
    // choice: `usage` counts the request's prompt, never the routing
    // step's own prompts that `auto` ran.
    let prompt_tokens: Vec<&Value> = (0..3)
        .map(|i| &seen["tool_calls"][i]["usage"]["prompt_tokens"])
        .collect();
    assert!(prompt_tokens[0].as_u64().is_some_and(|n| n > 0), "{seen}");
    assert!(
        prompt_tokens.iter().all(|n| *n == prompt_tokens[0]),
        "prompt tokens per choice: {prompt_tokens:?}"
    );
    assert_eq!(seen["streamed_tool_calls"]["finish_reason"], "tool_calls");
    calls.extend(
        seen["streamed_tool_calls"]["calls"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    );
    assert!(calls.len() >= 3, "{seen}");
    for call in &calls {
        assert_eq!(call["valid"], true, "every call passes its schema: {call}");
    }
    assert_eq!(seen["followed"]["tool_calls"], Value::Null, "{seen}");
    assert_eq!(seen["json_schema_valid"], true, "{seen}");
    let errors = &seen["errors"];
    for (case, status, needle) in [
        ("unknown_field", 400, "unknown field `temprature`"),
        ("bad_tool_choice", 400, "not among the `tools`"),
        ("empty_messages", 400, "`messages` is empty"),
        ("two_choices", 400, "`n` must be 1"),
        ("wrong_token", 401, "wrong bearer token"),
    ] {
        assert_eq!(errors[case]["status"], status, "{case}: {errors}");
        assert!(
            errors[case]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(needle),
            "{case}: {errors}"
        );
    }
    // A conversation's next turn, sent after another conversation's,
    // reuses its own prefix: it takes the context that ran its last turn
    // (the one most alike), not the one used last.
    let url = format!("{}/v1/chat/completions", served.base);
    tokio().block_on(async {
        let ask = |messages: Value| {
            let url = url.clone();
            async move {
                let (status, body) = call(
                    "POST",
                    &url,
                    Some(json!({"messages": messages, "max_tokens": 8, "temperature": 0})),
                )
                .await;
                assert_eq!(status, 200, "{body}");
                body
            }
        };
        let sea = json!([{"role": "user", "content": "Name three colours the sea can be at dawn, and why."}]);
        let first = ask(sea.clone()).await;
        let sea_prompt = first["usage"]["prompt_tokens"].as_u64().expect("usage");
        ask(json!([{"role": "user", "content": "Which mountains are the oldest in Europe?"}])).await;
        let mut next = sea.as_array().cloned().expect("messages");
        next.push(json!({"role": "assistant", "content": first["choices"][0]["message"]["content"]}));
        next.push(json!({"role": "user", "content": "And at dusk?"}));
        let again = ask(Value::Array(next)).await;
        let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached tokens");
        assert!(
            cached >= sea_prompt - 1,
            "{cached} cached of the {sea_prompt} the first turn's prompt had: {again}"
        );
    });
}

#[test]
fn sessions_stream_turns_answer_approvals_resume_export_and_delete() {
    let _generating = generating();
    let (home, root) = (tempdir(), tempdir());
    let served = Served::start(home.path(), root.path(), &[]);
    let workspace = root.path().canonicalize().expect("root");
    let seen = client("sessions", &served, &[workspace.to_str().expect("utf-8")]);
    assert_eq!(seen["created"]["status"], 201, "{seen}");
    let id = seen["created"]["body"]["id"]
        .as_str()
        .expect("an id")
        .to_string();
    let events = seen["turn"].as_array().expect("events");
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    let order = [
        "assistant_message",
        "tool_call_proposed",
        "approval_needed",
        "answered",
        "tool_started",
        "tool_finished",
        "turn_finished",
    ];
    let mut at = 0;
    for name in &names {
        if order.get(at) == Some(name) {
            at += 1;
        }
    }
    assert_eq!(at, order.len(), "events in order: {names:?}");
    let answered = events
        .iter()
        .find(|e| e["event"] == "answered")
        .expect("answered");
    assert_eq!(answered["status"], 200);
    let finished = events
        .iter()
        .find(|e| e["event"] == "tool_finished")
        .expect("finished");
    assert_ne!(
        finished["outcome"]["status"], "denied",
        "approved calls run: {finished}"
    );
    // The declined call is refused, not run.
    let declined = seen["declined_turn"].as_array().expect("events");
    let refused = declined
        .iter()
        .find(|e| e["event"] == "tool_finished")
        .expect("a result for the declined call");
    assert_eq!(refused["outcome"]["status"], "denied", "{refused}");
    assert!(
        !declined.iter().any(|e| e["event"] == "tool_started"),
        "{declined:?}"
    );
    // Show, export, delete, resume.
    let shown = &seen["shown"]["body"];
    assert_eq!(shown["busy"], false);
    assert_eq!(
        shown["messages"].as_array().map(Vec::len),
        Some(4),
        "{shown}"
    );
    // Export is refused until the session's owner allows training use.
    assert_eq!(seen["export_without_consent"]["status"], 403, "{seen}");
    assert!(seen["export_without_consent"]["body"]["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("has not allowed its use as training data")));
    assert_eq!(seen["training"]["status"], 200, "{seen}");
    assert_eq!(seen["export"]["status"], 200);
    assert_eq!(
        seen["export"]["lines"].as_array().map(Vec::len),
        Some(1),
        "{seen}"
    );
    assert_eq!(seen["deleted"]["status"], 200);
    assert_eq!(seen["after_delete"]["status"], 404);
    // `DELETE …?erase=true` leaves nothing of that session on disk.
    assert_eq!(seen["erased"]["status"], 200, "{seen}");
    assert_eq!(seen["erased"]["body"]["erased"], true, "{seen}");
    let erased_id = seen["erased"]["id"].as_str().expect("id");
    assert!(!served
        .transcripts()
        .join(format!("{erased_id}.jsonl"))
        .exists());
    let audit =
        std::fs::read_to_string(served.transcripts().join("audit/audit.jsonl")).expect("audit log");
    assert!(
        !audit.contains(&format!("\"session\":\"{erased_id}\",\"call_id")),
        "{audit}"
    );
    assert_eq!(seen["resumed"]["status"], 201, "{seen}");
    assert_eq!(seen["resumed"]["body"]["id"], id.as_str());
    assert_eq!(seen["resumed"]["body"]["resumed_messages"], 4);
    let resumed_turn = seen["resumed_turn"].as_array().expect("events");
    assert_eq!(
        resumed_turn.iter().rev().nth(1).map(|e| e["event"].clone()),
        Some(json!("turn_finished")),
        "{resumed_turn:?}"
    );
    let transcript = std::fs::read_to_string(served.transcripts().join(format!("{id}.jsonl")))
        .expect("the transcript");
    assert_eq!(transcript.lines().count(), 6, "{transcript}");
    let metrics = seen["metrics"]["text"].as_str().unwrap_or_default();
    for needle in [
        "stack_sessions_active",
        "stack_queue_depth 0",
        "stack_sandbox_calls_total{status=\"denied\"} 1",
        "stack_tokens_per_second",
        "stack_approvals_pending 0",
    ] {
        assert!(metrics.contains(needle), "{needle} in\n{metrics}");
    }
    // The turns that ran to a reply, whole or cut at their token limit.
    assert!(
        ["answered", "token_limit"]
            .iter()
            .any(|end| metrics.contains(&format!("stack_turns_total{{end=\"{end}\"}}"))),
        "{metrics}"
    );
    // The audit log has the decisions, as in the REPL.
    let audit = std::fs::read_to_string(served.transcripts().join("audit/audit.jsonl"))
        .expect("the audit log");
    assert!(audit.contains("\"write_file\""), "{audit}");
}

#[test]
fn bad_requests_and_limits_get_clear_errors_and_sessions_stay_usable() {
    let (home, root) = (tempdir(), tempdir());
    let outside = tempdir();
    std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).expect("symlink");
    std::fs::create_dir(root.path().join("inner")).expect("inner");
    std::fs::create_dir(root.path().join("beside")).expect("beside");
    let state = home.path().join(".cache/stack-runtime/wasm");
    std::fs::create_dir_all(&state).expect("a state folder");
    let home_root = home.path().to_str().expect("utf-8").to_string();
    let served = Served::start(
        home.path(),
        root.path(),
        &[
            "--max-sessions",
            "2",
            "--max-body-bytes",
            "65536",
            "--workspace-root",
            &home_root,
        ],
    );
    let base = served.base.clone();
    tokio().block_on(async move {
        let http = reqwest::Client::new();
        // Health needs no token; everything else does.
        let health = http
            .get(format!("{base}/health"))
            .send()
            .await
            .expect("health");
        assert_eq!(health.status().as_u16(), 200);
        for (route, method) in [
            ("/v1/models", "GET"),
            ("/v1/sessions", "POST"),
            ("/metrics", "GET"),
        ] {
            let bare = http
                .request(method.parse().expect("method"), format!("{base}{route}"))
                .send()
                .await
                .expect("request");
            assert_eq!(bare.status().as_u16(), 401, "{route}");
            assert!(bare.headers().contains_key("www-authenticate"));
            let wrong = http
                .request(method.parse().expect("method"), format!("{base}{route}"))
                .bearer_auth("serve-test-token-0123456780")
                .send()
                .await
                .expect("request");
            assert_eq!(wrong.status().as_u16(), 401, "{route}");
        }
        // No CORS: a preflight gets no allow-origin.
        let preflight = http
            .request(reqwest::Method::OPTIONS, format!("{base}/v1/models"))
            .header("Origin", "http://evil.example")
            .header("Access-Control-Request-Method", "GET")
            .send()
            .await
            .expect("preflight");
        assert!(!preflight
            .headers()
            .contains_key("access-control-allow-origin"));
        // The scheme's name is matched in any case, as HTTP's are.
        let lower = http
            .get(format!("{base}/v1/models"))
            .header("authorization", format!("bearer {TOKEN}"))
            .send()
            .await
            .expect("request");
        assert_eq!(lower.status().as_u16(), 200);
        // Bad bodies.
        let sessions = format!("{base}/v1/sessions");
        let malformed = http
            .post(&sessions)
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body("{\"workspace\": ")
            .send()
            .await
            .expect("malformed");
        assert_eq!(malformed.status().as_u16(), 400);
        let body: Value = malformed.json().await.expect("a JSON error");
        assert!(message(&body).contains("EOF"), "{body}");
        let huge = "x".repeat(100_000);
        let (status, body) = call("POST", &sessions, Some(json!({"system_prompt": huge}))).await;
        assert_eq!(status, 413, "{body}");
        let (status, body) = call("POST", &sessions, Some(json!({"workspace": "/etc"}))).await;
        assert_eq!(status, 403, "{body}");
        assert!(message(&body).contains("outside the folders"), "{body}");
        // Even inside an allowed root, the runtime's own state is no
        // workspace (compiled modules, config, transcripts).
        let (status, body) = call("POST", &sessions, Some(json!({"workspace": state}))).await;
        assert_eq!(status, 403, "{body}");
        assert!(message(&body).contains("runtime's own state"), "{body}");
        let escape = root.path().join("escape");
        let (status, body) = call("POST", &sessions, Some(json!({"workspace": escape}))).await;
        assert_eq!(status, 403, "a link out of the root is outside: {body}");
        let (status, body) = call("POST", &sessions, Some(json!({"workspace": "inner"}))).await;
        assert_eq!(status, 400, "{body}");
        assert!(message(&body).contains("absolute"), "{body}");
        let (status, body) = call(
            "POST",
            &sessions,
            Some(json!({"policy_toml": "extends = \"/etc/passwd\""})),
        )
        .await;
        assert_eq!(status, 403, "{body}");
        let (status, body) = call(
            "POST",
            &sessions,
            Some(json!({"policy_toml": "[mcp_servers.x]\ncommand = [\"sh\"]"})),
        )
        .await;
        assert_eq!(status, 403, "{body}");
        let (status, body) = call("POST", &sessions, Some(json!({"policy": "lenient"}))).await;
        assert_eq!(status, 400, "{body}");
        // A tool named for every step must be one the server has.
        let (status, body) = call("POST", &sessions, Some(json!({"tool_choice": "rm_rf"}))).await;
        assert_eq!(status, 400, "{body}");
        assert!(
            message(&body).contains("`rm_rf`") && message(&body).contains("read_file"),
            "{body}"
        );
        let (status, body) = call(
            "POST",
            &sessions,
            Some(json!({"resume": "../../etc/passwd"})),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        let (status, body) =
            call("POST", &sessions, Some(json!({"resume": "nosuchsession"}))).await;
        assert_eq!(status, 404, "{body}");
        // Unknown sessions and routes.
        for (method, route) in [
            ("GET", "/v1/sessions/nosuch"),
            ("DELETE", "/v1/sessions/nosuch"),
            ("GET", "/v1/nothing"),
        ] {
            let (status, body) = call(method, &format!("{base}{route}"), None).await;
            assert_eq!(status, 404, "{route}: {body}");
        }
        // A path that is not UTF-8, a malformed or unknown query parameter
        // and a method a route does not take: each a JSON error too.
        for (method, route, want) in [
            ("GET", "/v1/sessions/%FF", 400),
            ("DELETE", "/v1/sessions/nosuch?erase=maybe", 400),
            ("DELETE", "/v1/sessions/nosuch?what=1", 400),
            ("PUT", "/v1/sessions", 405),
            ("POST", "/health", 405),
        ] {
            let (status, body) = call(method, &format!("{base}{route}"), None).await;
            assert_eq!(status, want, "{method} {route}: {body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{method} {route}: not a JSON error: {body}"
            );
        }
        // Sessions up to the limit, then 429; deleting one frees a place.
        let inner = root.path().join("inner").canonicalize().expect("inner");
        let (status, first) = call("POST", &sessions, Some(json!({"workspace": inner}))).await;
        assert_eq!(status, 201, "{first}");
        assert_eq!(first["workspace"], json!(inner));
        let beside = root.path().join("beside").canonicalize().expect("beside");
        let (status, second) = call("POST", &sessions, Some(json!({"workspace": beside}))).await;
        assert_eq!(status, 201, "{second}");
        let (status, body) = call("POST", &sessions, Some(json!({}))).await;
        assert_eq!(status, 429, "{body}");
        let id = first["id"].as_str().expect("id");
        let (status, body) = call(
            "POST",
            &format!("{base}/v1/sessions/{id}/approvals/call_nope"),
            Some(json!({"answer": "yes"})),
        )
        .await;
        assert_eq!(status, 404, "{body}");
        let (status, body) = call(
            "POST",
            &format!("{base}/v1/sessions/{id}/approvals/call_nope"),
            Some(json!({"answer": "perhaps"})),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        let (status, body) = call(
            "POST",
            &format!("{base}/v1/sessions/{id}/turns"),
            Some(json!({"message": " "})),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        let (status, _) = call("DELETE", &format!("{base}/v1/sessions/{id}"), None).await;
        assert_eq!(status, 200);
        // The default workspace (the root) holds the open session's
        // folder: code run in it could swap that folder for a link to
        // anywhere, so the two are not open at once.
        let (status, body) = call("POST", &sessions, Some(json!({}))).await;
        assert_eq!(status, 409, "{body}");
        assert!(message(&body).contains("one inside the other"), "{body}");
        let (status, body) = call("POST", &sessions, Some(json!({"workspace": inner}))).await;
        assert_eq!(status, 201, "{body}");
        // The server is still healthy.
        let (status, body) = call("GET", &format!("{base}/v1/sessions"), None).await;
        assert_eq!(status, 200);
        assert_eq!(body["data"].as_array().map(Vec::len), Some(2), "{body}");
    });
}

#[test]
fn a_full_queue_gets_429_and_the_server_refuses_a_public_address_without_a_token() {
    let _generating = generating();
    let (home, root) = (tempdir(), tempdir());
    let served = Served::start(
        home.path(),
        root.path(),
        &["--max-running", "1", "--max-queue", "0"],
    );
    let base = served.base.clone();
    tokio().block_on(async move {
        let url = format!("{base}/v1/chat/completions");
        let long = json!({
            // A reply held by its schema to 11,400 characters or more
            // runs to its 3,000 tokens (no end of turn before that), which
            // take this model well over the 10 s the place is waited for
            // below: only the cancel of a dropped stream frees it in time.
            // (llama.cpp takes repetitions up to 2,000: six of 1,900.)
            "messages": [{"role": "user", "content": "Tell a long story about a lighthouse."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "long", "schema": {
                "type": "array", "minItems": 6,
                "items": {"type": "string", "minLength": 1900},
            }}},
            "max_tokens": 3000, "temperature": 0, "stream": true,
        });
        let mut first = reqwest::Client::new()
            .post(&url)
            .bearer_auth(TOKEN)
            .json(&long)
            .send()
            .await
            .expect("first");
        assert_eq!(first.status().as_u16(), 200);
        // The model is writing: text arrives, and no error.
        let mut seen = String::new();
        let written = |seen: &str| {
            seen.matches("\"content\":\"").count() > seen.matches("\"content\":\"\"").count()
        };
        while !written(&seen) {
            let chunk = first.chunk().await.expect("a chunk").expect("more");
            seen.push_str(&String::from_utf8_lossy(&chunk));
            assert!(!seen.contains("\"error\""), "{seen}");
        }
        let (status, body) = call("POST", &url, Some(long.clone())).await;
        assert_eq!(status, 429, "{body}");
        assert!(message(&body).contains("busy"), "{body}");
        drop(first);
        // Dropping the stream stops that generation and frees the place.
        assert!(place_comes_back(&url).await, "the place came back");

        // The same with tools offered: nothing is sent while the model
        // writes a call (it may yet be text), so only the closed stream
        // tells that the client went away. Six arguments of 1,900
        // characters or more run to the 3,000 tokens as above.
        let long_call = json!({
            "messages": [{"role": "user", "content": "Write three long stories about a lighthouse."}],
            "tools": [{"type": "function", "function": {"name": "write_stories", "parameters": {
                "type": "object", "required": ["stories"], "properties": {"stories": {
                    "type": "array", "minItems": 6,
                    "items": {"type": "string", "minLength": 1900},
                }},
            }}}],
            "tool_choice": "required",
            "max_tokens": 3000, "temperature": 0, "stream": true,
        });
        let mut calling = reqwest::Client::new()
            .post(&url)
            .bearer_auth(TOKEN)
            .json(&long_call)
            .send()
            .await
            .expect("a call");
        assert_eq!(calling.status().as_u16(), 200);
        // The role chunk comes first; then nothing while the model writes
        // (a failure would come as an error event at once).
        let first_chunk = calling.chunk().await.expect("a chunk");
        assert!(first_chunk.is_some());
        let quiet = tokio::time::timeout(Duration::from_secs(2), calling.chunk()).await;
        assert!(quiet.is_err(), "the model is still writing: {quiet:?}");
        let (status, body) = call("POST", &url, Some(long.clone())).await;
        assert_eq!(status, 429, "{body}");
        drop(calling);
        assert!(
            place_comes_back(&url).await,
            "a call being written stops when its client goes away"
        );
    });
    let output = Command::new(common::agent_binary())
        .args(["serve", "--host", "0.0.0.0", "--port", "0"])
        .env_remove("STACK_RUNTIME_TOKEN")
        .env(
            "STACK_RUNTIME_ASSETS",
            stack_runtime::assets::asset_dir().expect("assets"),
        )
        .output()
        .expect("agent serve");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not a loopback address"), "{stderr}");
}

/// 8 sessions × 5 turns at once, each in its own workspace with its own
/// marker file: every turn finishes, every transcript is complete, and no
/// session sees another's files.
#[test]
fn eight_sessions_of_five_turns_run_at_once_and_stay_apart() {
    let _generating = generating();
    let (home, root) = (tempdir(), tempdir());
    let mut workspaces = Vec::new();
    for n in 0..8 {
        let dir = root.path().join(format!("ws{n}"));
        std::fs::create_dir(&dir).expect("workspace");
        std::fs::write(dir.join(format!("marker-{n}.txt")), format!("session {n}"))
            .expect("marker");
        workspaces.push(dir.canonicalize().expect("workspace"));
    }
    let tools = common::fixture("tools/serve");
    let served = Served::start(
        home.path(),
        root.path(),
        &[
            "--max-running",
            "8",
            "--max-sessions",
            "8",
            "--tools",
            tools.to_str().expect("utf-8"),
        ],
    );
    let list = serde_json::to_string(&workspaces).expect("json");
    let seen = client("load", &served, &[&list, "5"]);
    let sessions = seen["sessions"].as_object().expect("sessions");
    assert_eq!(sessions.len(), 8);
    let mut listings = 0;
    for (n, workspace) in workspaces.iter().enumerate() {
        let record = &sessions[workspace.to_str().expect("utf-8")];
        assert_eq!(record["status"], 201, "{record}");
        let turns = record["turns"].as_array().expect("turns");
        assert_eq!(turns.len(), 5, "{record}");
        for events in turns {
            let events = events.as_array().expect("events");
            let finished = events
                .iter()
                .find(|e| e["event"] == "turn_finished")
                .unwrap_or_else(|| panic!("every turn finishes: {events:?}"));
            assert_ne!(finished["reason"], "error", "{events:?}");
            for event in events.iter().filter(|e| e["event"] == "tool_finished") {
                let stdout = event["outcome"]["stdout"].as_str().unwrap_or_default();
                for other in (0..8).filter(|&o| o != n) {
                    assert!(
                        !stdout.contains(&format!("marker-{other}.txt")),
                        "session {n} saw session {other}'s files: {stdout}"
                    );
                }
                if stdout.contains(&format!("marker-{n}.txt")) {
                    listings += 1;
                }
            }
        }
        // The transcript holds every turn: 1 system message, then per turn
        // the user's message and what followed.
        let messages = record["messages"].as_array().expect("messages");
        let users = messages.iter().filter(|m| m["role"] == "user").count();
        assert_eq!(users, 5, "{messages:?}");
        assert_eq!(record["export_lines"], 1);
        let id = record["created"]["id"].as_str().expect("id");
        let on_disk = std::fs::read_to_string(served.transcripts().join(format!("{id}.jsonl")))
            .expect("transcript");
        assert_eq!(on_disk.lines().count(), messages.len(), "{id}");
    }
    assert_eq!(listings, 40, "every turn listed its own workspace");
}

/// `kill -9` mid-turn, restart on the same state, resume: the session's
/// transcript brings back what was said, and the session goes on.
#[test]
fn a_killed_server_resumes_its_sessions_from_their_transcripts() {
    let _generating = generating();
    let (home, root) = (tempdir(), tempdir());
    let mut served = Served::start(home.path(), root.path(), &[]);
    let base = served.base.clone();
    let id = tokio().block_on(async {
        let (status, created) = call(
            "POST",
            &format!("{base}/v1/sessions"),
            Some(json!({"tool_choice": "none", "temperature": 0, "max_tokens": 400})),
        )
        .await;
        assert_eq!(status, 201, "{created}");
        let id = created["id"].as_str().expect("id").to_string();
        let events = turn(&base, &id, "Say hello.").await;
        assert_eq!(
            events.last().map(|e| e["event"].clone()),
            Some(json!("turn_finished"))
        );
        // The second turn is killed while it generates.
        let (_open_turn, _) = turn_until(
            &base,
            &id,
            "Tell a long story about a lighthouse keeper.",
            "event: token",
        )
        .await;
        // One turn at a time per session.
        let (status, body) = call(
            "POST",
            &format!("{base}/v1/sessions/{id}/turns"),
            Some(json!({"message": "And another."})),
        )
        .await;
        assert_eq!(status, 409, "{body}");
        id
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(served.child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    let _ = served.child.wait();
    let transcript = served.transcripts().join(format!("{id}.jsonl"));
    let before = std::fs::read_to_string(&transcript).expect("transcript");
    assert!(
        before.contains("lighthouse keeper"),
        "the killed turn's message is on record"
    );
    drop(served);
    let served = Served::start(home.path(), root.path(), &[]);
    let base = served.base.clone();
    tokio().block_on(async {
        let (status, resumed) = call(
            "POST",
            &format!("{base}/v1/sessions"),
            Some(json!({"resume": id, "tool_choice": "none", "max_tokens": 24})),
        )
        .await;
        assert_eq!(status, 201, "{resumed}");
        assert_eq!(
            resumed["resumed_messages"], 4,
            "system, hello, answer, the killed message"
        );
        let events = turn(&base, &id, "Go on.").await;
        let last = events.last().expect("events");
        assert_eq!(last["event"], "turn_finished", "{events:?}");
        // Answered, whole or cut at its 24 tokens: not an error.
        assert!(
            last["reason"] == "answered" || last["reason"] == "token_limit",
            "{events:?}"
        );
    });
}

/// A turn waiting for an approval nobody gives ends when its session is
/// deleted: the approval is refused, the stream ends with `turn_finished`,
/// nothing is left pending, and the server stays healthy.
#[test]
fn deleting_a_session_ends_a_turn_waiting_for_approval() {
    let _generating = generating();
    let (home, root) = (tempdir(), tempdir());
    let served = Served::start(home.path(), root.path(), &[]);
    let base = served.base.clone();
    tokio().block_on(async move {
        let (id, mut response, mut seen) = waiting_for_approval(&base).await;
        let (status, shown) = call("GET", &format!("{base}/v1/sessions/{id}"), None).await;
        assert_eq!(status, 200);
        assert_eq!(
            shown["pending_approvals"].as_array().map(Vec::len),
            Some(1),
            "{shown}"
        );
        let deleting = tokio::spawn({
            let base = base.clone();
            let id = id.clone();
            async move { call("DELETE", &format!("{base}/v1/sessions/{id}"), None).await }
        });
        read_to_end(
            &mut response,
            &mut seen,
            Duration::from_secs(60),
            "the stream ends within a minute",
        )
        .await;
        assert!(seen.contains("event: turn_finished"), "{seen}");
        let (status, body) = deleting.await.expect("joined");
        assert_eq!(status, 200, "{body}");
        let (status, metrics) = call("GET", &format!("{base}/metrics"), None).await;
        assert_eq!(status, 200);
        let text = metrics.as_str().unwrap_or_default();
        assert!(text.contains("stack_approvals_pending 0"), "{text}");
        assert!(
            !text.contains("stack_sandbox_calls_total{status=\"ok\"}"),
            "nothing ran: {text}"
        );
    });
}

/// #18: a turn waiting for a person's approval gives its running place up.
/// With one place and no waiting line, another session's turn runs to its
/// end meanwhile (before, it got 429: the waiting turn held the place), and
/// the approved turn then takes a place again, runs its tool and finishes.
#[test]
fn a_turn_waiting_for_approval_gives_its_place_to_another_session() {
    let _generating = generating();
    let (home, root) = (tempdir(), tempdir());
    let served = Served::start(
        home.path(),
        root.path(),
        &["--max-running", "1", "--max-queue", "0"],
    );
    let base = served.base.clone();
    tokio().block_on(async move {
        let sessions = format!("{base}/v1/sessions");
        let (status, waiting) = call(
            "POST",
            &sessions,
            Some(json!({"tool_choice": "write_file", "max_steps": 1, "temperature": 0, "max_tokens": 200})),
        )
        .await;
        assert_eq!(status, 201, "{waiting}");
        let waiting = waiting["id"].as_str().expect("id").to_string();
        let (status, other) = call(
            "POST",
            &sessions,
            Some(json!({"tool_choice": "none", "max_steps": 1, "temperature": 0, "max_tokens": 8})),
        )
        .await;
        assert_eq!(status, 201, "{other}");
        let other = other["id"].as_str().expect("id").to_string();

        let (mut response, mut seen) =
            turn_until(&base, &waiting, "Write hello to a.txt", "event: approval_needed").await;
        // While a person decides, the other session's turn runs (a 429
        // would fail `turn`'s status check).
        let events = tokio::time::timeout(Duration::from_secs(120), turn(&base, &other, "Say hi."))
            .await
            .expect("the other turn ends while the first waits");
        assert!(
            events.iter().any(|e| e["event"] == "turn_finished"),
            "{events:?}"
        );
        // Now the approval: the first turn takes a place again and goes on.
        read_until(&mut response, &mut seen, "call_id").await;
        read_until(&mut response, &mut seen, "\n\n").await;
        let request: Value = seen
            .lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .filter_map(|data| serde_json::from_str::<Value>(data.trim()).ok())
            .find(|event| event["event"] == "approval_needed")
            .unwrap_or_else(|| panic!("{seen}"));
        let call_id = request["request"]["call_id"].as_str().expect("call_id").to_string();
        let (status, answered) = call(
            "POST",
            &format!("{base}/v1/sessions/{waiting}/approvals/{call_id}"),
            Some(json!({"answer": "yes"})),
        )
        .await;
        assert_eq!(status, 200, "{answered}");
        read_to_end(
            &mut response,
            &mut seen,
            Duration::from_secs(120),
            "the approved turn ends",
        )
        .await;
        assert!(seen.contains("event: tool_finished"), "{seen}");
        assert!(seen.contains("event: turn_finished"), "{seen}");
        let (status, metrics) = call("GET", &format!("{base}/metrics"), None).await;
        assert_eq!(status, 200);
        let text = metrics.as_str().unwrap_or_default();
        assert!(text.contains("stack_approvals_pending 0"), "{text}");
    });
}

/// SIGTERM mid-turn: the turn is finished (or cancelled) and streamed to
/// its end, the transcript holds it, and the process exits cleanly.
/// SIGTERM with a turn still running past the grace period (it waits for
/// an approval no one gives), and a client that opened a connection and
/// stalled in its request's head: the turn is cancelled (its stream says
/// so), the stalled connection does not hold the server up, and the server
/// exits having saved the session (its transcript and its KV state).
#[test]
fn a_stopped_server_ends_running_turns_and_exits_cleanly() {
    let _generating = generating();
    let (home, root) = (tempdir(), tempdir());
    let mut served = Served::start(home.path(), root.path(), &["--shutdown-grace", "1"]);
    let base = served.base.clone();
    let pid = nix::unistd::Pid::from_raw(served.child.id() as i32);
    let address = base.trim_start_matches("http://").to_string();
    let (id, events, stalled) = tokio().block_on(async {
        let (id, mut response, mut seen) = waiting_for_approval(&base).await;
        let mut stalled = std::net::TcpStream::connect(&address).expect("connect");
        std::io::Write::write_all(&mut stalled, b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .expect("a partial head");
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        read_to_end(
            &mut response,
            &mut seen,
            Duration::from_secs(30),
            "the stream ends within 30 s",
        )
        .await;
        (id, seen, stalled)
    });
    assert!(events.contains("event: turn_finished"), "{events}");
    assert!(
        events.contains("shutting down"),
        "the turn was not cancelled: {events}"
    );
    let stopped = std::time::Instant::now();
    loop {
        if let Some(status) = served.child.try_wait().expect("wait") {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "the server did not exit with a stalled connection open"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(stalled);
    let transcript = std::fs::read_to_string(served.transcripts().join(format!("{id}.jsonl")))
        .expect("transcript");
    assert!(
        transcript.lines().any(|l| l.contains("\"user\"")),
        "the turn is on record: {transcript}"
    );
    assert!(
        served.transcripts().join(format!("{id}.kv")).is_file(),
        "the session's KV state was not saved at shutdown"
    );
}

/// A client that drops its turn's stream while the turn waits for an
/// approval cancels the turn then (within the SSE keep-alive's 15 s, whose
/// write finds the connection gone), not at the next event: the session
/// takes a new turn (it answered 409 until the approval's time limit).
#[test]
fn a_client_that_goes_away_cancels_a_turn_waiting_for_approval() {
    let _generating = generating();
    let (home, root) = (tempdir(), tempdir());
    let served = Served::start(home.path(), root.path(), &[]);
    let base = served.base.clone();
    tokio().block_on(async move {
        let (id, response, _) = waiting_for_approval(&base).await;
        drop(response);
        let dropped = std::time::Instant::now();
        let next = loop {
            let response = reqwest::Client::new()
                .post(format!("{base}/v1/sessions/{id}/turns"))
                .bearer_auth(TOKEN)
                .json(&json!({"message": "Hi"}))
                .send()
                .await
                .expect("turn");
            if response.status().as_u16() != 409 {
                break response;
            }
            assert!(
                dropped.elapsed() < Duration::from_secs(40),
                "the abandoned turn still runs 40 s after its client went away"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(next.status().as_u16(), 200);
        // This turn asks for approval too; the session is deleted under it.
        drop(next);
        let (status, body) = call("DELETE", &format!("{base}/v1/sessions/{id}"), None).await;
        assert_eq!(status, 200, "{body}");
        let (status, metrics) = call("GET", &format!("{base}/metrics"), None).await;
        assert_eq!(status, 200);
        let text = metrics.as_str().unwrap_or_default();
        assert!(text.contains("stack_approvals_pending 0"), "{text}");
    });
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Spoken input over HTTP: OpenAI's transcription API through the official
/// client, and a session turn whose `audio` is a WAV clip: its transcript
/// is the message, and the turn's tool call runs. Bad audio gets a 400 (or
/// an error event in a turn) that names the problem, and the session goes
/// on; a server without a speech model says how to get one.
#[cfg(feature = "voice")]
#[test]
fn spoken_input_is_transcribed_by_the_openai_client_and_in_session_turns() {
    let _one = generating();
    let (home, root) = (tempdir(), tempdir());
    std::fs::write(root.path().join("notes.txt"), "buy milk\n").expect("notes");
    let clip = home.path().join("command.wav");
    std::fs::write(&clip, common::spoken("List the files in this folder.")).expect("clip");
    let served = Served::start(home.path(), root.path(), &["--voice"]);
    let seen = client(
        "speech",
        &served,
        &[
            clip.to_str().expect("utf-8"),
            root.path().to_str().expect("utf-8"),
        ],
    );
    let words = |text: &str| -> Vec<String> {
        text.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    for format in ["json", "text"] {
        let heard = words(seen[format].as_str().unwrap_or_default());
        // tiny.en hears espeak's "files" as "file" or "files".
        for word in ["list", "file", "folder"] {
            assert!(
                heard.iter().any(|w| w.starts_with(word)),
                "{format}: {seen}"
            );
        }
    }
    assert_eq!(seen["verbose"]["language"], "en", "{seen}");
    let duration = seen["verbose"]["duration"].as_f64().unwrap_or_default();
    assert!((1.0..6.0).contains(&duration), "{seen}");
    assert_eq!(seen["not_wav"]["status"], 400, "{seen}");
    assert!(
        seen["not_wav"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("WAV")),
        "{seen}"
    );
    assert_eq!(seen["prompt"]["status"], 400, "{seen}");
    // A language is a code (any case); a Whisper control token's name is not.
    assert_eq!(seen["language"]["status"], 400, "{seen}");
    assert!(
        seen["language"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("language code")),
        "{seen}"
    );
    assert_eq!(seen["language_en"], seen["json"], "{seen}");
    assert!(
        seen["prompt"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("prompt")),
        "{seen}"
    );

    // The spoken turn: heard first, then the call runs and the turn ends.
    assert_eq!(seen["created"], 201, "{seen}");
    let turn = seen["turn"].as_array().expect("turn events");
    assert_eq!(turn[0]["event"], "transcribed", "{seen}");
    let heard = words(turn[0]["text"].as_str().unwrap_or_default());
    assert!(heard.iter().any(|w| w.starts_with("file")), "{seen}");
    // The transcript drove a turn: a call was made and ran (what path the
    // 135M model picks is its own matter), its result went back, and the
    // turn was answered (whole, or cut at the token limit).
    let finished = |events: &[Value]| {
        events.iter().any(|e| e["event"] == "tool_finished")
            && events.iter().any(|e| {
                e["event"] == "turn_finished"
                    && (e["reason"] == "answered" || e["reason"] == "token_limit")
            })
    };
    assert!(finished(turn), "{seen}");
    // A truncated clip ends its turn with an error naming it; the next turn
    // of the same session works.
    let bad = seen["bad_turn"].as_array().expect("bad turn events");
    assert!(
        bad.iter()
            .any(|e| e["event"] == "error" && e["message"].to_string().contains("WAV")),
        "{seen}"
    );
    assert!(finished(seen["after"].as_array().expect("after")), "{seen}");

    // The transcript keeps what was heard and the clip's hash, not the clip.
    let kept: String = walk(&served.transcripts())
        .iter()
        .map(|path| String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned())
        .collect();
    assert!(kept.contains("audio_sha256"), "{kept}");
    // Kept audio would be an `ID.audio` file, base64 in `wav_base64`.
    assert!(
        !walk(&served.transcripts())
            .iter()
            .any(|path| path.extension().is_some_and(|e| e == "audio")),
        "the clip itself was kept"
    );
    assert!(
        !kept.contains("wav_base64") && !kept.contains("UklGR"),
        "the clip itself was kept"
    );
    drop(served);

    // Without --voice: a clear refusal, before any session is touched.
    let plain = Served::start(home.path(), root.path(), &[]);
    let base = plain.base.clone();
    tokio().block_on(async move {
        let (status, body) = call(
            "POST",
            &format!("{base}/v1/sessions/nope/turns"),
            Some(json!({"audio": {"data": "UklGRg==", "format": "wav"}})),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert!(body.to_string().contains("--voice"), "{body}");
        let (status, body) = call(
            "POST",
            &format!("{base}/v1/sessions/nope/turns"),
            Some(json!({"message": "hi", "audio": {"data": "UklGRg==", "format": "wav"}})),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert!(body.to_string().contains("not both"), "{body}");
    });
}

/// Every file under `dir`.
#[cfg(feature = "voice")]
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
