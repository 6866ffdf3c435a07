//! The remote backend against a real llama-server (built by `scripts/setup
//! --peers` from the llama.cpp tree of the pinned llama-cpp-python sdist)
//! serving the default SmolLM2 GGUF: a prompt leads to a tool call that runs
//! in the sandbox, its result goes back to the served model, tokens stream
//! as events; and each fault (server killed mid-stream, wrong key, unknown
//! model, a prompt over the context) gives a clear error after which the
//! same session still works.
//!
//! Generation on two cores must not overlap, so the tests take turns.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use stack_runtime::agent::{Event, Runtime, Session, SessionConfig, TurnEnd};
use stack_runtime::model::remote::{ApiKey, RemoteConfig, RemoteError, RemoteModel, ToolPath};
use stack_runtime::model::{CallPath, ModelBackend, ModelError, SamplingOptions, ToolChoice};
use stack_runtime::outcome::Status;
use stack_runtime::policy::{ApprovalAnswer, ApprovalRequest, Policy};

/// One test at a time: each runs a server that generates.
async fn turn() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

fn yes(_: &ApprovalRequest) -> ApprovalAnswer {
    ApprovalAnswer::Yes
}

async fn connect(config: RemoteConfig) -> Arc<RemoteModel> {
    RemoteModel::connect(config).await.expect("connect")
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

/// `agent ARGS` run in `cwd` with `home` as its home folder (its config
/// folder inside it) and `key` in `STACK_TEST_MODEL_KEY`, off the async
/// runtime's threads.
async fn agent_in(home: &Path, cwd: &Path, key: &str, args: &[&str]) -> std::process::Output {
    let (home, cwd) = (home.to_path_buf(), cwd.to_path_buf());
    let (key, args) = (
        key.to_string(),
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
    );
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(args)
            .env("STACK_TEST_MODEL_KEY", key)
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join("config"))
            .current_dir(&cwd)
            .output()
            .expect("run agent")
    })
    .await
    .expect("agent ran")
}

/// What a run of `agent` wrote, stdout then stderr.
fn shown(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

async fn collect(session: &Session, text: &str) -> Vec<Event> {
    session.send(text).collect().await
}

fn finished(events: &[Event]) -> Option<TurnEnd> {
    events.iter().rev().find_map(|e| match e {
        Event::TurnFinished { reason, .. } => Some(*reason),
        _ => None,
    })
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

/// The whole loop on the path llama-server takes for SmolLM2 (whose own
/// template cannot show tools, so the runtime renders the prompt and
/// constrains the call): a prompt leads to a call, the call runs in the
/// sandbox, its result goes back to the served model, the turn finishes,
/// and tokens stream as events.
#[tokio::test(flavor = "multi_thread")]
async fn a_served_model_drives_the_sandboxed_loop() {
    let _turn = turn().await;
    let server = common::LlamaServer::start(common::free_port(), &[]);
    let model = connect(RemoteConfig::new(server.url())).await;
    assert!(model.prompted(), "{model:?}");
    let info = model.info();
    assert_eq!(info.context_length, Some(2048), "{info:?}");
    assert!(info.capabilities.constrained_decoding, "{info:?}");
    let workspace = tempfile::tempdir().expect("tempdir");
    let runtime = runtime_over(model, workspace.path());
    let config = SessionConfig {
        tool_choice: ToolChoice::Named("execute_code".into()),
        sampling: greedy(96),
        max_steps: 2,
        ..SessionConfig::default()
    };
    let session = runtime.session(config).await.expect("session");
    let events = collect(&session, "Use Python to print the sum of 2 and 3.").await;
    let via: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::ToolCallProposed { call, via } if call.function.name == "execute_code" => {
                Some(*via)
            }
            _ => None,
        })
        .collect();
    assert!(!via.is_empty(), "a call was proposed: {events:?}");
    assert!(
        via.iter().all(|v| *v == Some(CallPath::Grammar)),
        "the events say the calls came under the grammar: {via:?}"
    );
    let ran = events.iter().find_map(|e| match e {
        Event::ToolFinished { outcome, .. } => Some(outcome.clone()),
        _ => None,
    });
    let ran = ran.unwrap_or_else(|| panic!("the call ran: {events:?}"));
    assert!(
        ran.exit_code.is_some() || ran.status == Status::Timeout,
        "the code ran in the sandbox: {ran:?}"
    );
    let tokens = events
        .iter()
        .filter(|e| matches!(e, Event::Token { .. }))
        .count();
    assert!(tokens > 1, "tokens streamed as events: {events:?}");
    // The result went back: the second step is a model step after the
    // tool message, and the turn ends.
    let steps = events.iter().rev().find_map(|e| match e {
        Event::TurnFinished {
            steps, counters, ..
        } => Some((*steps, *counters)),
        _ => None,
    });
    let (steps, counters) = steps.unwrap_or_else(|| panic!("the turn finished: {events:?}"));
    assert_eq!(steps, 2, "{events:?}");
    // The second request extends the first byte for byte: llama-server
    // reused the cached prefix rather than evaluating it again.
    assert!(counters.prompt_reused > 0, "{counters:?}");
    assert!(finished(&events).is_some());
    assert!(errors(&events).is_empty(), "{events:?}");
    let history = session.messages().await;
    assert!(
        history.iter().any(|m| m.tool_call_id.is_some()),
        "the tool result is in the conversation"
    );
}

/// The prompted path with a template that shows tools in a syntax other
/// than Hermes: the runtime renders the prompt with that template, and
/// llama-server gets the call grammar and its lazy trigger in the
/// template's own syntax, as the in-process backend builds them. For three
/// syntaxes, a named call streams back written in that syntax, came under
/// the grammar, is read back, and runs in the sandbox.
#[tokio::test(flavor = "multi_thread")]
async fn the_prompted_path_constrains_calls_in_the_templates_own_syntax() {
    let _turn = turn().await;
    for (format, opening) in [
        ("qwen3_coder_xml", "<function=read_file>"),
        ("pythonic", "[read_file(path="),
        ("function_gemma", "<start_function_call>call:read_file{"),
    ] {
        let template = common::fixture(&format!("templates/formats/{format}.jinja"));
        let template = template.to_str().expect("utf8").to_string();
        let server =
            common::LlamaServer::start(common::free_port(), &["--chat-template-file", &template]);
        let model = connect(RemoteConfig {
            tool_path: ToolPath::Prompted,
            ..RemoteConfig::new(server.url())
        })
        .await;
        assert!(model.prompted(), "{format}: {model:?}");
        let workspace = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            workspace.path().join("notes.txt"),
            "The launch code is 7341.\n",
        )
        .expect("write notes");
        let runtime = runtime_over(model, workspace.path());
        let session = runtime
            .session(SessionConfig {
                tool_choice: ToolChoice::Named("read_file".into()),
                sampling: greedy(64),
                max_steps: 1,
                ..SessionConfig::default()
            })
            .await
            .expect("session");
        let events = collect(&session, "What is in notes.txt? Read it.").await;
        // One step (the call) is all this test asks for.
        assert!(
            errors(&events)
                .iter()
                .all(|e| e.contains("limit of 1 model steps")),
            "{format}: {events:?}"
        );
        let streamed: String = events
            .iter()
            .filter_map(|e| match e {
                Event::Token { text } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert!(
            streamed.contains(opening) && !streamed.contains("{\"name\""),
            "{format}: the call is written in the template's syntax, not Hermes: {streamed:?}"
        );
        let proposed: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::ToolCallProposed { call, via } => Some((call.clone(), *via)),
                _ => None,
            })
            .collect();
        assert_eq!(proposed.len(), 1, "{format}: {events:?}");
        let (call, via) = &proposed[0];
        assert_eq!(via, &Some(CallPath::Grammar), "{format}");
        let arguments: serde_json::Value =
            serde_json::from_str(&call.function.arguments).expect("arguments are JSON");
        assert_eq!(
            arguments["path"], "notes.txt",
            "{format}: grounded to the one file: {arguments}"
        );
        let read = events.iter().find_map(|e| match e {
            Event::ToolFinished { outcome, .. } => Some(outcome.clone()),
            _ => None,
        });
        let read = read.unwrap_or_else(|| panic!("{format}: the call ran: {events:?}"));
        assert!(read.stdout.contains("7341"), "{format}: {read:?}");
    }
}

/// The README's multi-host recipe on one machine: a ggml RPC worker holds
/// the model's layers (`-ngl 99` onto the RPC device, over TCP on
/// loopback), llama-server schedules, and the runtime drives the same
/// sandboxed loop through it.
#[tokio::test(flavor = "multi_thread")]
async fn llama_server_with_an_rpc_worker_drives_the_same_loop() {
    let _turn = turn().await;
    let worker_port = common::free_port();
    // Line-buffered, so what it printed survives its kill.
    let mut worker = Command::new("stdbuf")
        .arg("-oL")
        .arg(common::peer_binary("ggml-rpc-server"))
        .args(["-H", "127.0.0.1", "-p", &worker_port.to_string(), "-t", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ggml-rpc-server");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", worker_port)).is_err() {
        assert!(Instant::now() < deadline, "the RPC worker never listened");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rpc = format!("127.0.0.1:{worker_port}");
    let server = common::LlamaServer::start(common::free_port(), &["--rpc", &rpc, "-ngl", "99"]);
    let model = connect(RemoteConfig::new(server.url())).await;
    let workspace = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        workspace.path().join("notes.txt"),
        "The launch code is 7341.\n",
    )
    .expect("write notes");
    let runtime = runtime_over(model, workspace.path());
    let session = runtime
        .session(SessionConfig {
            tool_choice: ToolChoice::Named("read_file".into()),
            sampling: greedy(48),
            max_steps: 1,
            ..SessionConfig::default()
        })
        .await
        .expect("session");
    let events = collect(&session, "What is in notes.txt? Read it.").await;
    let read = events.iter().find_map(|e| match e {
        Event::ToolFinished { outcome, .. } => Some(outcome.clone()),
        _ => None,
    });
    let read = read.unwrap_or_else(|| panic!("the call ran: {events:?}"));
    assert!(read.stdout.contains("7341"), "{read:?}");
    // The layers were on the worker: llama-server loaded them through it.
    drop(server);
    let _ = worker.kill();
    let output = worker.wait_with_output().expect("worker output");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        said.contains("Accepted client connection"),
        "llama-server never used the RPC worker: {said}"
    );
}

/// The native path against the same server given a Qwen2.5 template
/// (Hermes `<tool_call>`, which llama-server parses into `tool_calls`):
/// `tools` and `tool_choice` go over the wire, the answer streams and the
/// turn ends cleanly. (SmolLM2-135M writes prose here rather than a call:
/// llama-server's parser lets text come before a call even under
/// `required`. The assembly of `tool_calls` deltas is covered by
/// `remote::wire`'s tests on chunks shaped like llama-server's.)
#[tokio::test(flavor = "multi_thread")]
async fn the_native_path_streams_a_turn_with_tools_offered() {
    let _turn = turn().await;
    let template = common::fixture("templates/qwen2.5.jinja");
    let template = template.to_str().expect("utf8").to_string();
    let server =
        common::LlamaServer::start(common::free_port(), &["--chat-template-file", &template]);
    let model = connect(RemoteConfig::new(server.url())).await;
    assert!(!model.prompted(), "a template that shows tools: {model:?}");
    assert!(model.info().capabilities.native_tool_calls);
    // `agent doctor` and `agent model` describe the served model.
    let url = server.url();
    let shown = tokio::task::spawn_blocking(move || {
        ["doctor", "model"].map(|command| {
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_agent"))
                .args([command, "--model-url", &url])
                .env("XDG_CONFIG_HOME", "/nonexistent-config")
                .output()
                .expect("run agent");
            String::from_utf8_lossy(&output.stdout).into_owned()
        })
    })
    .await
    .expect("agent ran");
    for text in shown {
        assert!(
            text.contains("2048 tokens") && text.contains("native calls      yes"),
            "{text}"
        );
    }
    let workspace = tempfile::tempdir().expect("tempdir");
    let runtime = runtime_over(model, workspace.path());
    let session = runtime
        .session(SessionConfig {
            tool_choice: ToolChoice::Auto,
            sampling: greedy(48),
            max_steps: 2,
            ..SessionConfig::default()
        })
        .await
        .expect("session");
    let events = collect(&session, "List the files in this folder.").await;
    assert!(errors(&events).is_empty(), "{events:?}");
    assert!(finished(&events).is_some(), "{events:?}");
    assert!(
        events.iter().any(|e| matches!(e, Event::Token { .. })),
        "{events:?}"
    );
    for event in &events {
        if let Event::ToolCallProposed { via, .. } = event {
            assert!(
                matches!(via, Some(CallPath::Native | CallPath::Parsed)),
                "{via:?}"
            );
        }
    }
}

/// The server dies in the middle of an answer: the turn ends with a clear
/// error, and once a server is back the same session answers again.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_killed_mid_stream_is_a_clear_error_and_the_session_goes_on() {
    let _turn = turn().await;
    let port = common::free_port();
    let mut server = common::LlamaServer::start(port, &[]);
    let mut config = RemoteConfig::new(server.url());
    config.retries = 0;
    let model = connect(config).await;
    let workspace = tempfile::tempdir().expect("tempdir");
    let runtime = runtime_over(model, workspace.path());
    let session = runtime
        .session(SessionConfig {
            tool_choice: ToolChoice::None,
            sampling: SamplingOptions {
                temperature: 1.0,
                max_tokens: 2000,
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
    let errors = errors(&events);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("closed the stream") || e.contains("could not reach")),
        "a clear error: {events:?}"
    );
    drop(server);
    let _server = common::LlamaServer::start(port, &[]);
    let again = collect(&session, "Say hello.").await;
    assert!(self::errors(&again).is_empty(), "{again:?}");
    assert!(
        again.iter().any(|e| matches!(e, Event::Token { .. })),
        "{again:?}"
    );
}

/// Wrong key, unknown model, and a prompt over the context: each a
/// specific error; the session that hit the context limit goes on.
#[tokio::test(flavor = "multi_thread")]
async fn keys_models_and_context_faults_are_specific_errors() {
    let _turn = turn().await;
    let server = common::LlamaServer::start(common::free_port(), &["--api-key", "right-key"]);
    let mut wrong = RemoteConfig::new(server.url());
    wrong.api_key = Some(ApiKey::new("wrong-key"));
    match RemoteModel::connect(wrong).await {
        Err(ModelError::Remote(RemoteError::Unauthorized { status: 401, .. })) => {}
        other => panic!("a wrong key: {other:?}"),
    }
    let mut unknown = RemoteConfig::new(server.url());
    unknown.api_key = Some(ApiKey::new("right-key"));
    unknown.model = Some("no-such-model".into());
    match RemoteModel::connect(unknown).await {
        Err(err @ ModelError::Remote(RemoteError::UnknownModel { .. })) => {
            assert!(
                err.to_string().contains("SmolLM2") || err.to_string().contains("gguf"),
                "{err}"
            );
        }
        other => panic!("an unknown model: {other:?}"),
    }
    let mut right = RemoteConfig::new(server.url());
    right.api_key = Some(ApiKey::new("right-key"));
    let model = connect(right).await;
    let name = model.model_name().to_string();
    let workspace = tempfile::tempdir().expect("tempdir");
    let runtime = runtime_over(model, workspace.path());
    let session = runtime
        .session(SessionConfig {
            tool_choice: ToolChoice::None,
            sampling: greedy(16),
            max_steps: 1,
            ..SessionConfig::default()
        })
        .await
        .expect("session");
    let huge = "lighthouse ".repeat(3000);
    let events = collect(&session, &huge).await;
    let errors = errors(&events);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("longer than the served model's context")),
        "{events:?}"
    );
    // The over-long message was not kept, so the same session goes on.
    assert!(errors.iter().any(|e| e.contains("not added")), "{events:?}");
    let again = collect(&session, "Say hello.").await;
    assert!(self::errors(&again).is_empty(), "{again:?}");

    // The same from the command line: `--model-url`, `--model-name` and
    // `--api-key-env` drive a turn; a wrong key is a clear error that
    // never shows the key.
    let url = server.url();
    let home = tempfile::tempdir().expect("tempdir");
    let (home_dir, cwd) = (home.path(), workspace.path());
    let one_turn = [
        "--model-url",
        url.as_str(),
        "--model-name",
        name.as_str(),
        "--api-key-env",
        "STACK_TEST_MODEL_KEY",
        "--no-default-tools",
        "--max-tokens",
        "16",
        "run",
        "-p",
        "Say hello.",
        "--json",
    ];
    let right = agent_in(home_dir, cwd, "right-key", &one_turn).await;
    let wrong = agent_in(home_dir, cwd, "wrong-key-31337", &one_turn).await;
    assert!(right.status.success(), "{}", shown(&right));
    assert!(shown(&right).contains("turn_finished"), "{}", shown(&right));
    assert!(!wrong.status.success(), "{}", shown(&wrong));
    assert!(
        shown(&wrong).contains("wrong or missing API key"),
        "{}",
        shown(&wrong)
    );
    assert!(!shown(&wrong).contains("31337"), "{}", shown(&wrong));

    // And from a profile in a config file (`--config`, `--profile`).
    let config = home.path().join("models.toml");
    std::fs::write(
        &config,
        format!(
            "[profiles.served]\nurl = \"{}\"\napi_key_env = \"STACK_TEST_MODEL_KEY\"\ntool_path = \"prompted\"\n",
            server.url()
        ),
    )
    .expect("config");
    let config = config.to_str().expect("a UTF-8 path");
    let profiled = agent_in(
        home_dir,
        cwd,
        "right-key",
        &["model", "--config", config, "--profile", "served"],
    )
    .await;
    assert!(profiled.status.success(), "{}", shown(&profiled));
    assert!(
        shown(&profiled).contains("prompted tool calls"),
        "{}",
        shown(&profiled)
    );

    // A key file (`--api-key-file`, `~` being the home folder) that others
    // may write is refused; one they may read is read, with a warning.
    let key_file = home.path().join("model.key");
    std::fs::write(&key_file, "right-key\n").expect("key file");
    let mut runs = Vec::new();
    for mode in [0o666, 0o644, 0o600] {
        use std::os::unix::fs::PermissionsExt;
        tokio::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(mode))
            .await
            .expect("chmod");
        let args = [
            "--model-url",
            &url,
            "--api-key-file",
            "~/model.key",
            "model",
        ];
        runs.push(agent_in(home_dir, cwd, "", &args).await);
    }
    let [writable, readable, private] = <[_; 3]>::try_from(runs).expect("three runs");
    assert!(!writable.status.success(), "{}", shown(&writable));
    assert!(
        shown(&writable).contains("chmod 600"),
        "{}",
        shown(&writable)
    );
    assert!(
        !shown(&writable).contains("right-key"),
        "{}",
        shown(&writable)
    );
    assert!(readable.status.success(), "{}", shown(&readable));
    assert!(
        shown(&readable).contains("chmod 600"),
        "{}",
        shown(&readable)
    );
    assert!(private.status.success(), "{}", shown(&private));
    assert!(
        !shown(&private).contains("chmod 600"),
        "{}",
        shown(&private)
    );
    // Flags before the subcommand count as after it: the served model, not
    // the local GGUF (this home has none).
    assert!(
        shown(&private).contains("served by llama-server"),
        "{}",
        shown(&private)
    );

    // A CA file (`ca_file` in a profile, `--model-ca-file`) is read before
    // anything is sent: one that holds no certificate is refused by name
    // (`~` being the home folder); a real one is taken on top of the
    // public roots (here over http://, where it goes unused).
    std::fs::write(home.path().join("not-a-ca.pem"), "hello\n").expect("file");
    let config = home.path().join("internal.toml");
    std::fs::write(
        &config,
        format!(
            "[profiles.internal]\nurl = \"{}\"\nca_file = \"~/not-a-ca.pem\"\n",
            server.url()
        ),
    )
    .expect("config");
    let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join("model/tests/tls/ca.pem");
    let (config, ca) = (
        config.to_str().expect("a UTF-8 path"),
        ca.to_str().expect("a UTF-8 path"),
    );
    let refused = agent_in(
        home_dir,
        cwd,
        "right-key",
        &["--config", config, "--profile", "internal", "model"],
    )
    .await;
    let trusted = agent_in(
        home_dir,
        cwd,
        "right-key",
        &[
            "--model-url",
            &url,
            "--model-ca-file",
            ca,
            "--api-key-env",
            "STACK_TEST_MODEL_KEY",
            "model",
        ],
    )
    .await;
    assert!(!refused.status.success(), "{}", shown(&refused));
    assert!(
        shown(&refused).contains("holds no PEM certificate")
            && shown(&refused).contains(&format!("{}/not-a-ca.pem", home.path().display())),
        "{}",
        shown(&refused)
    );
    assert!(trusted.status.success(), "{}", shown(&trusted));
}
