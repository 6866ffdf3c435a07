//! The remote backend against scripted OpenAI-compatible servers on
//! loopback: real sockets, real HTTP, with each server answering as a
//! misbehaving one would. These are the faults a real llama-server cannot
//! be made to show on demand (a 503 or a 429 before the stream, a stall
//! before the first token or in the middle, garbage in the stream, a
//! server that echoes the key), and what vLLM's model listing looks like.
//! Each fault must give its own specific error, retries must happen only
//! before anything has streamed, cancellation must close the connection,
//! and the same session must answer the next request.
//!
//! The real-server tests are in the repository's `tests/remote.rs`.

#![cfg(feature = "remote")]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use stack_model::remote::{
    ApiKey, CallConstraint, Phase, RemoteConfig, RemoteError, RemoteModel, Timeouts,
};
use stack_model::{
    ArgumentValues, BackendSession, CallPath, CompletionRequest, Generation, ModelBackend,
    ModelError, SamplingOptions, StopReason, ToolChoice,
};
use stack_types::message::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// How a scripted server answers one POST.
#[derive(Debug, Clone)]
enum Reply {
    /// A whole response with this status, extra headers and JSON body.
    Status {
        code: u16,
        headers: Vec<(&'static str, &'static str)>,
        body: String,
    },
    /// A `text/event-stream`: each event's data after `pause`, then `end`.
    Stream {
        events: Vec<String>,
        pause: Duration,
        end: End,
    },
}

/// How a scripted stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The server closes the connection.
    Close,
    /// The server sends nothing more and waits for the client to go.
    Stall,
}

/// What the server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Value,
}

/// A scripted server: its `/v1/models` listing, and the replies to POSTs
/// in order.
struct Script {
    models: Value,
    replies: Mutex<VecDeque<Reply>>,
    seen: Mutex<Vec<Seen>>,
    /// Set when a client closed a stream the server was stalling on.
    client_closed: AtomicBool,
    /// Fixed answers by path (GET or POST), such as Ollama's `/api/show`.
    routes: Mutex<Vec<(&'static str, Value)>>,
}

impl Script {
    /// A script that lists `models` and answers POSTs with `replies`.
    fn new(models: Value, replies: Vec<Reply>) -> Arc<Script> {
        Arc::new(Script {
            models,
            replies: Mutex::new(replies.into()),
            seen: Mutex::new(Vec::new()),
            client_closed: AtomicBool::new(false),
            routes: Mutex::new(Vec::new()),
        })
    }

    fn posts(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .expect("seen")
            .iter()
            .filter(|s| s.method == "POST")
            .cloned()
            .collect()
    }
}

/// A server on a free loopback port; the URL of its API base.
async fn scripted(models: Value, replies: Vec<Reply>) -> (Arc<Script>, String) {
    let script = Script::new(models, replies);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/v1", listener.local_addr().expect("addr"));
    let serving = Arc::clone(&script);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(answer(socket, Arc::clone(&serving)));
        }
    });
    (script, url)
}

/// The scripted server behind TLS, with the certificate in `tests/tls/`:
/// `server.pem` (for 127.0.0.1 and localhost, valid 2020 to 2120) signed
/// by `ca.pem`, a CA made for these tests alone with `openssl ca` (its key
/// was thrown away). The URL of its API base.
async fn scripted_tls(models: Value, replies: Vec<Reply>) -> (Arc<Script>, String) {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = tls_dir();
    let chain = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .expect("server.pem")
        .collect::<Result<Vec<_>, _>>()
        .expect("a certificate");
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).expect("server.key");
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("the server's certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let script = Script::new(models, replies);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("https://{}/v1", listener.local_addr().expect("addr"));
    let serving = Arc::clone(&script);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let serving = Arc::clone(&serving);
            tokio::spawn(async move {
                // A client that does not trust the certificate hangs up
                // during the handshake.
                if let Ok(mut tls) = acceptor.accept(socket).await {
                    answer(&mut tls, serving).await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    (script, url)
}

fn tls_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls")
}

fn generic_listing() -> Value {
    json!({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "someone"}]})
}

/// Reads one request off `socket`: its head and its `Content-Length` body.
async fn read_request(socket: &mut (impl AsyncRead + Unpin), buffer: &mut Vec<u8>) -> Option<Seen> {
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        let read = socket.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let header = |name: &str| {
        head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let read = socket.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
    let body = serde_json::from_slice(&buffer[head_end..head_end + length]).unwrap_or(Value::Null);
    buffer.drain(..head_end + length);
    Some(Seen {
        method,
        path,
        authorization: header("authorization"),
        body,
    })
}

async fn answer(mut socket: impl AsyncRead + AsyncWrite + Unpin, script: Arc<Script>) {
    let mut buffer = Vec::new();
    while let Some(seen) = read_request(&mut socket, &mut buffer).await {
        script.seen.lock().expect("seen").push(seen.clone());
        let route = script
            .routes
            .lock()
            .expect("routes")
            .iter()
            .find(|(path, _)| seen.path == *path)
            .map(|(_, body)| body.clone());
        let reply = if let Some(body) = route {
            Reply::Status {
                code: 200,
                headers: Vec::new(),
                body: body.to_string(),
            }
        } else if seen.method == "GET" && seen.path.ends_with("/models") {
            Reply::Status {
                code: 200,
                headers: Vec::new(),
                body: script.models.to_string(),
            }
        } else if seen.method == "GET" || seen.path.starts_with("/api/") {
            // Unscripted endpoints (Ollama's own `/api/...` included).
            Reply::Status {
                code: 404,
                headers: Vec::new(),
                body: json!({"error": "no such endpoint"}).to_string(),
            }
        } else {
            let next = script.replies.lock().expect("replies").pop_front();
            next.unwrap_or_else(|| Reply::Status {
                code: 500,
                headers: Vec::new(),
                body: json!({"error": {"message": "the script ran out of replies"}}).to_string(),
            })
        };
        match reply {
            Reply::Status {
                code,
                headers,
                body,
            } => {
                let mut response = format!(
                    "HTTP/1.1 {code} Scripted\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                    body.len()
                );
                for (name, value) in headers {
                    response.push_str(&format!("{name}: {value}\r\n"));
                }
                response.push_str("\r\n");
                response.push_str(&body);
                if socket.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
            }
            Reply::Stream { events, pause, end } => {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for event in events {
                    tokio::time::sleep(pause).await;
                    let frame = format!("data: {event}\n\n");
                    if socket.write_all(frame.as_bytes()).await.is_err() {
                        // The client closed the connection mid-stream.
                        script.client_closed.store(true, Ordering::SeqCst);
                        return;
                    }
                }
                if end == End::Stall {
                    // Nothing more is sent; a read of 0 bytes (or an
                    // error) is the client closing the connection.
                    let mut chunk = [0u8; 64];
                    let closed = tokio::time::timeout(Duration::from_secs(20), async {
                        loop {
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            }
                        }
                    })
                    .await;
                    if closed.is_ok() {
                        script.client_closed.store(true, Ordering::SeqCst);
                    }
                }
                return;
            }
        }
    }
}

/// A chat-completions chunk carrying `content`.
fn content(text: &str) -> String {
    json!({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
        .to_string()
}

/// The closing chunks of a chat-completions stream.
fn finished() -> Vec<String> {
    vec![
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 12, "completion_tokens": 2}})
        .to_string(),
        "[DONE]".to_string(),
    ]
}

/// A whole answer that says `text`.
fn answer_saying(text: &str) -> Reply {
    let mut events = vec![content(text)];
    events.extend(finished());
    Reply::Stream {
        events,
        pause: Duration::ZERO,
        end: End::Close,
    }
}

fn status(code: u16, body: Value) -> Reply {
    Reply::Status {
        code,
        headers: Vec::new(),
        body: body.to_string(),
    }
}

fn quick(url: &str) -> RemoteConfig {
    RemoteConfig {
        timeouts: Timeouts {
            connect: Duration::from_secs(2),
            first_token: Duration::from_millis(600),
            idle: Duration::from_millis(600),
        },
        ..RemoteConfig::new(url)
    }
}

async fn open(config: RemoteConfig) -> (Arc<RemoteModel>, Box<dyn BackendSession>) {
    let model = RemoteModel::connect(config).await.expect("connect");
    let session = Arc::clone(&model).open_session().await.expect("session");
    (model, session)
}

fn request(tools: Vec<Value>) -> CompletionRequest {
    CompletionRequest {
        messages: vec![Message::user("Say hello.")],
        tools,
        tool_choice: ToolChoice::Auto,
        sampling: SamplingOptions::default(),
        response_format: None,
        argument_values: ArgumentValues::default(),
    }
}

async fn complete(
    session: &mut dyn BackendSession,
    request: CompletionRequest,
    cancel: Arc<AtomicBool>,
) -> (Result<Generation, ModelError>, Vec<String>) {
    let (deltas, mut received) = tokio::sync::mpsc::unbounded_channel();
    let result = session.complete(request, deltas, cancel).await;
    let mut texts = Vec::new();
    while let Ok(text) = received.try_recv() {
        texts.push(text);
    }
    (result, texts)
}

/// `request`'s answer, which must come.
async fn answered(session: &mut dyn BackendSession, request: CompletionRequest) -> Generation {
    complete(session, request, Arc::default())
        .await
        .0
        .expect("answers")
}

fn remote_error(result: Result<Generation, ModelError>) -> RemoteError {
    match result {
        Err(ModelError::Remote(err)) => err,
        other => panic!("expected a remote error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_503_and_a_429_are_retried_before_anything_streams() {
    let (script, url) = scripted(
        generic_listing(),
        vec![
            status(503, json!({"error": {"message": "loading the model"}})),
            Reply::Status {
                code: 429,
                headers: vec![("Retry-After", "0")],
                body: json!({"error": {"message": "slow down"}}).to_string(),
            },
            answer_saying("hello"),
        ],
    )
    .await;
    let (_model, mut session) = open(quick(&url)).await;
    let (result, _) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
    let generation = result.expect("the third attempt answers");
    assert_eq!(generation.text, "hello");
    assert_eq!(generation.stop, StopReason::EndOfTurn);
    assert_eq!(script.posts().len(), 3, "two retries");
}

#[tokio::test]
async fn retries_stop_at_the_limit_and_a_4xx_is_never_retried() {
    let (script, url) = scripted(
        generic_listing(),
        vec![
            status(502, json!({"error": {"message": "bad gateway one"}})),
            status(502, json!({"error": {"message": "bad gateway two"}})),
            status(
                400,
                json!({"error": {"message": "temperature must be positive"}}),
            ),
            answer_saying("still here"),
        ],
    )
    .await;
    let config = RemoteConfig {
        retries: 1,
        ..quick(&url)
    };
    let (_model, mut session) = open(config).await;
    let (result, _) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
    match remote_error(result) {
        RemoteError::Http { status, message } => {
            assert_eq!(status, 502);
            assert!(message.contains("bad gateway two"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(script.posts().len(), 2, "one retry, as configured");
    let (result, _) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
    match remote_error(result) {
        RemoteError::Http { status, message } => {
            assert_eq!(status, 400);
            assert!(message.contains("temperature"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(script.posts().len(), 3, "a 400 is not retried");
    // The session goes on.
    let (result, _) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
    assert_eq!(result.expect("answers").text, "still here");
}

#[tokio::test]
async fn a_stream_cut_after_it_started_is_not_retried_and_the_session_goes_on() {
    let (script, url) = scripted(
        generic_listing(),
        vec![
            Reply::Stream {
                events: vec![content("hel")],
                pause: Duration::ZERO,
                end: End::Close,
            },
            answer_saying("hello again"),
        ],
    )
    .await;
    let (_model, mut session) = open(quick(&url)).await;
    let (result, texts) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
    assert_eq!(texts, vec!["hel".to_string()], "the token streamed");
    match remote_error(result) {
        RemoteError::Disconnected { reason } => {
            assert!(reason.contains("without a finish reason"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        script.posts().len(),
        1,
        "nothing is retried once tokens streamed"
    );
    let (result, _) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
    assert_eq!(
        result.expect("the next request answers").text,
        "hello again"
    );
}

#[tokio::test]
async fn a_server_silent_before_the_first_token_times_out_as_such() {
    let (script, url) = scripted(
        generic_listing(),
        vec![Reply::Stream {
            events: Vec::new(),
            pause: Duration::ZERO,
            end: End::Stall,
        }],
    )
    .await;
    let (_model, mut session) = open(quick(&url)).await;
    let (result, _) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
    match remote_error(result) {
        RemoteError::Timeout { phase, after } => {
            assert_eq!(phase, Phase::FirstToken);
            assert_eq!(after, Duration::from_millis(600));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        wait_for(|| script.client_closed.load(Ordering::SeqCst)).await,
        "the runtime closed the connection it gave up on"
    );
}

#[tokio::test]
async fn a_stall_in_the_middle_times_out_as_idle() {
    let (script, url) = scripted(
        generic_listing(),
        vec![Reply::Stream {
            events: vec![content("hel")],
            pause: Duration::ZERO,
            end: End::Stall,
        }],
    )
    .await;
    let (_model, mut session) = open(quick(&url)).await;
    let (result, _) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
    match remote_error(result) {
        RemoteError::Timeout { phase, .. } => assert_eq!(phase, Phase::Idle),
        other => panic!("{other:?}"),
    }
    assert!(wait_for(|| script.client_closed.load(Ordering::SeqCst)).await);
    assert_eq!(script.posts().len(), 1, "not retried");
}

#[tokio::test]
async fn garbage_in_the_stream_is_a_malformed_stream_error() {
    let (_script, url) = scripted(
        generic_listing(),
        vec![
            Reply::Stream {
                events: vec![content("ok "), "{\"choices\": [ not json".to_string()],
                pause: Duration::ZERO,
                end: End::Close,
            },
            status(
                200,
                json!({"error": {"message": "quota exhausted for this project"}}),
            ),
            Reply::Stream {
                events: vec![json!({"error": {"message": "the slot crashed"}}).to_string()],
                pause: Duration::ZERO,
                end: End::Close,
            },
            answer_saying("recovered"),
        ],
    )
    .await;
    let (_model, mut session) = open(quick(&url)).await;
    let (result, _) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
    match remote_error(result) {
        RemoteError::MalformedStream(detail) => assert!(detail.contains("not json"), "{detail}"),
        other => panic!("{other:?}"),
    }
    // A JSON error body with status 200 where a stream was due.
    let (result, _) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
    match remote_error(result) {
        RemoteError::Http { status, message } => {
            assert_eq!(status, 200);
            assert_eq!(message, "quota exhausted for this project");
        }
        other => panic!("{other:?}"),
    }
    // An error event inside the stream names what the server said.
    let (result, _) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
    let err = remote_error(result);
    assert!(err.to_string().contains("the slot crashed"), "{err}");
    let (result, _) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
    assert_eq!(result.expect("answers").text, "recovered");
}

#[tokio::test]
async fn cancelling_closes_the_connection() {
    let events: Vec<String> = (0..50).map(|i| content(&format!("w{i} "))).collect();
    let (script, url) = scripted(
        generic_listing(),
        vec![Reply::Stream {
            events,
            pause: Duration::from_millis(100),
            end: End::Stall,
        }],
    )
    .await;
    let (_model, mut session) = open(quick(&url)).await;
    let cancel = Arc::new(AtomicBool::new(false));
    let (deltas, mut received) = tokio::sync::mpsc::unbounded_channel();
    let stopper = {
        let cancel = Arc::clone(&cancel);
        tokio::spawn(async move {
            // Cancel once two tokens have arrived.
            let mut seen = 0;
            while received.recv().await.is_some() {
                seen += 1;
                if seen == 2 {
                    cancel.store(true, Ordering::SeqCst);
                }
            }
            seen
        })
    };
    let generation = session
        .complete(request(Vec::new()), deltas, cancel)
        .await
        .expect("a cancelled turn is not an error");
    assert_eq!(generation.stop, StopReason::Cancelled);
    let seen = stopper.await.expect("stopper");
    assert!(
        seen < 10,
        "the stream stopped soon after the cancel: {seen}"
    );
    assert!(
        wait_for(|| script.client_closed.load(Ordering::SeqCst)).await,
        "cancellation closed the HTTP connection"
    );
}

#[tokio::test]
async fn a_call_left_in_the_text_is_recovered_by_the_runtimes_parsers() {
    let call = "<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"notes.txt\"}}\n</tool_call>";
    let mut events = vec![content(&call[..20]), content(&call[20..])];
    events.extend(finished());
    let (script, url) = scripted(
        generic_listing(),
        vec![Reply::Stream {
            events,
            pause: Duration::ZERO,
            end: End::Close,
        }],
    )
    .await;
    let (_model, mut session) = open(quick(&url)).await;
    let (result, _) = complete(
        session.as_mut(),
        request(vec![read_file_tool()]),
        Arc::default(),
    )
    .await;
    let generation = result.expect("answers");
    assert_eq!(generation.turn.tool_calls.len(), 1, "{generation:?}");
    let recovered = &generation.turn.tool_calls[0];
    assert_eq!(recovered.function.name, "read_file");
    let arguments: Value = serde_json::from_str(&recovered.function.arguments).expect("json");
    assert_eq!(arguments, json!({"path": "notes.txt"}));
    assert_eq!(generation.call_path, Some(CallPath::Parsed));
    // The tools went over the wire natively.
    let body = &script.posts()[0].body;
    assert_eq!(body["tools"][0]["function"]["name"], "read_file", "{body}");
    assert_eq!(body["tool_choice"], "auto", "{body}");
    assert_eq!(body["stream"], true, "{body}");
}

#[tokio::test]
async fn a_key_the_server_echoes_never_reaches_an_error() {
    let key = "sk-scripted-55817";
    let (script, url) = scripted(
        generic_listing(),
        vec![
            status(
                401,
                json!({"error": {"message": format!("invalid token: Bearer {key}"), "type": "authentication_error"}}),
            ),
            Reply::Stream {
                events: vec![json!({"error": {"message": format!("{key} is over quota")}}).to_string()],
                pause: Duration::ZERO,
                end: End::Close,
            },
            Reply::Stream {
                events: vec![format!("{{\"echo\": \"{key}\", broken")],
                pause: Duration::ZERO,
                end: End::Close,
            },
            answer_saying("fine now"),
        ],
    )
    .await;
    let config = RemoteConfig {
        api_key: Some(ApiKey::new(key)),
        ..quick(&url)
    };
    let (_model, mut session) = open(config).await;
    let (result, _) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
    let err = remote_error(result);
    assert!(
        matches!(err, RemoteError::Unauthorized { status: 401, .. }),
        "{err:?}"
    );
    for shown in [err.to_string(), format!("{err:?}")] {
        assert!(!shown.contains(key), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
    for _ in 0..2 {
        let (result, _) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
        let err = remote_error(result);
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains(key), "{shown}");
        }
    }
    // The key was sent, as a bearer token, on every request.
    let posts = script.posts();
    assert!(posts
        .iter()
        .all(|p| p.authorization.as_deref() == Some(&format!("Bearer {key}") as &str)));
    let (result, _) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
    assert_eq!(result.expect("answers").text, "fine now");
}

#[tokio::test]
async fn a_vllm_listing_names_the_server_its_model_and_context() {
    let listing = json!({"object": "list", "data": [
        {"id": "Qwen/Qwen2.5-Coder-32B-Instruct", "object": "model", "owned_by": "vllm",
         "root": "Qwen/Qwen2.5-Coder-32B-Instruct", "max_model_len": 32768},
        {"id": "other", "object": "model", "owned_by": "vllm", "max_model_len": 4096}
    ]});
    let (script, url) = scripted(listing.clone(), vec![answer_saying("hi")]).await;
    let (model, mut session) = open(quick(&url)).await;
    let info = model.info();
    assert_eq!(info.name, "Qwen/Qwen2.5-Coder-32B-Instruct");
    assert!(info.detail.contains("vLLM"), "{info:?}");
    assert_eq!(info.context_length, Some(32768));
    assert!(info.capabilities.native_tool_calls);
    assert!(info.capabilities.kv_prefix_reuse);
    let (result, _) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
    assert_eq!(result.expect("answers").text, "hi");
    let posts = script.posts();
    assert_eq!(posts[0].path, "/v1/chat/completions");
    assert_eq!(posts[0].body["model"], "Qwen/Qwen2.5-Coder-32B-Instruct");
    // Asking for a model it does not serve names the ones it does.
    let (_script, url) = scripted(listing, Vec::new()).await;
    let config = RemoteConfig {
        model: Some("Qwen/Qwen2.5-Coder-7B".into()),
        ..quick(&url)
    };
    match RemoteModel::connect(config).await.map(|_| ()) {
        Err(ModelError::Remote(RemoteError::UnknownModel { model, available })) => {
            assert_eq!(model, "Qwen/Qwen2.5-Coder-7B");
            assert_eq!(available, vec!["Qwen/Qwen2.5-Coder-32B-Instruct", "other"]);
        }
        other => panic!("{other:?}"),
    }
}

fn read_file_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "read_file",
        "description": "Reads a file.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}
    }})
}

fn list_dir_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "list_dir",
        "description": "Lists a folder.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}
    }})
}

fn vllm_listing() -> Value {
    json!({"object": "list", "data": [{"id": "stack-2.9", "object": "model", "owned_by": "vllm", "max_model_len": 32768}]})
}

/// A stream of one native call, in deltas as vLLM sends them.
fn native_call() -> Reply {
    Reply::Stream {
        events: vec![
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
                {"index": 0, "id": "chatcmpl-tool-1", "type": "function",
                 "function": {"name": "read_file", "arguments": ""}}]}}]})
            .to_string(),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": "{\"path\": \"notes.txt\"}"}}]}}]})
            .to_string(),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
                .to_string(),
            "[DONE]".to_string(),
        ],
        pause: Duration::ZERO,
        end: End::Close,
    }
}

/// vLLM and SGLang get a structural tag that holds each Hermes call to its
/// tool's schema once `<tool_call>` opens (the runtime's lazy grammar, run
/// by the server), and the calls that come back say so. A server that
/// refuses the tag gets the same request without it, and no tag after.
#[tokio::test]
async fn vllm_gets_a_structural_tag_for_calls_and_a_refusal_falls_back() {
    let (script, url) = scripted(
        vllm_listing(),
        vec![
            native_call(),
            status(
                400,
                json!({"object": "error", "message": "Unknown response_format type: structural_tag",
                       "type": "BadRequestError", "code": 400}),
            ),
            answer_saying("untagged"),
            answer_saying("still untagged"),
        ],
    )
    .await;
    let (model, mut session) = open(quick(&url)).await;
    assert!(model.info().capabilities.constrained_decoding);
    let (result, _) = complete(
        session.as_mut(),
        request(vec![read_file_tool()]),
        Arc::default(),
    )
    .await;
    let generation = result.expect("answers");
    assert_eq!(generation.turn.tool_calls.len(), 1, "{generation:?}");
    assert_eq!(generation.call_path, Some(CallPath::StructuralTag));
    let posts = script.posts();
    let tag = &posts[0].body["response_format"];
    assert_eq!(
        tag,
        &json!({
            "type": "structural_tag",
            "structures": [{
                "begin": "<tool_call>\n{\"name\": \"read_file\", \"arguments\": ",
                "schema": read_file_tool()["function"]["parameters"],
                "end": "}\n</tool_call>",
            }],
            "triggers": ["<tool_call>\n{\"name\": "],
        }),
        "{tag}"
    );
    assert_eq!(posts[0].body["tool_choice"], "auto");

    // Refused: the same request again without the tag, and no tag after.
    let (result, _) = complete(
        session.as_mut(),
        request(vec![read_file_tool()]),
        Arc::default(),
    )
    .await;
    assert_eq!(result.expect("answers").text, "untagged");
    let (result, _) = complete(
        session.as_mut(),
        request(vec![read_file_tool()]),
        Arc::default(),
    )
    .await;
    assert_eq!(result.expect("answers").text, "still untagged");
    let posts = script.posts();
    assert_eq!(posts.len(), 4, "one retry without the tag");
    assert!(posts[1].body.get("response_format").is_some());
    for later in &posts[2..] {
        assert!(
            later.body.get("response_format").is_none(),
            "{}",
            later.body
        );
        assert_eq!(later.body["tools"][0]["function"]["name"], "read_file");
    }
    assert!(!model.info().capabilities.constrained_decoding);
}

/// No tag where the server constrains calls itself (`required`, a named
/// tool), where a response format is asked for, where configuration turns
/// it off, or where the server is not vLLM or SGLang.
#[tokio::test]
async fn the_structural_tag_goes_only_where_it_is_needed() {
    let (script, url) = scripted(
        vllm_listing(),
        vec![answer_saying("a"), answer_saying("b"), answer_saying("c")],
    )
    .await;
    let (_model, mut session) = open(quick(&url)).await;
    let mut required = request(vec![read_file_tool()]);
    required.tool_choice = ToolChoice::Required;
    answered(session.as_mut(), required).await;
    let mut answer_format = request(vec![read_file_tool()]);
    answer_format.response_format = Some(json!({"type": "object"}));
    answered(session.as_mut(), answer_format).await;
    let posts = script.posts();
    assert!(
        posts[0].body.get("response_format").is_none(),
        "{}",
        posts[0].body
    );
    assert_eq!(posts[1].body["response_format"]["type"], "json_schema");
    let config = RemoteConfig {
        call_constraint: CallConstraint::Off,
        ..quick(&url)
    };
    let (_model, mut session) = open(config).await;
    answered(session.as_mut(), request(vec![read_file_tool()])).await;
    assert!(script.posts()[2].body.get("response_format").is_none());

    let (script, url) = scripted(
        generic_listing(),
        vec![answer_saying("d"), answer_saying("e")],
    )
    .await;
    let (_model, mut session) = open(quick(&url)).await;
    answered(session.as_mut(), request(vec![read_file_tool()])).await;
    assert!(script.posts()[0].body.get("response_format").is_none());
    // Asked for by configuration, a generic server gets it too.
    let config = RemoteConfig {
        call_constraint: CallConstraint::StructuralTag,
        ..quick(&url)
    };
    let (_model, mut session) = open(config).await;
    answered(session.as_mut(), request(vec![read_file_tool()])).await;
    assert_eq!(
        script.posts()[1].body["response_format"]["type"],
        "structural_tag"
    );
}

/// Polls `done` for up to 5 s.
async fn wait_for(done: impl Fn() -> bool) -> bool {
    for _ in 0..250 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

/// vLLM and SGLang refuse a request whose prompt fits the context but
/// leaves less room than `max_tokens` (llama-server would cut the answer
/// short instead): the request is made again for the room there is, so
/// the session is not stuck once a conversation nears the context. A
/// prompt over the context itself is a context error, and a stream that
/// the server ends with `finish_reason: abort` (SGLang) is a cut answer,
/// not a finished one; after each the session answers the next request.
#[tokio::test]
async fn vllm_context_refusals_and_aborted_answers_are_told_apart() {
    let too_large = "'max_tokens' or 'max_completion_tokens' is too large: 512. This model's maximum context length is 4096 tokens and your request has 3700 input tokens (512 > 4096 - 3700).";
    let over = "This model's maximum context length is 4096 tokens. However, your request has 5000 input tokens. Please reduce the length of the input messages.";
    let ended_by = |text: &str, reason: &str| Reply::Stream {
        events: vec![
            content(text),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}).to_string(),
            "[DONE]".to_string(),
        ],
        pause: Duration::ZERO,
        end: End::Close,
    };
    let (cut, aborted) = (
        ended_by("A short", "length"),
        ended_by("Half an ans", "abort"),
    );
    let vllm_error = |message: &str| {
        status(
            400,
            json!({"object": "error", "message": message, "type": "BadRequestError", "code": 400}),
        )
    };
    let (script, url) = scripted(
        vllm_listing(),
        vec![
            vllm_error(too_large),
            cut,
            vllm_error(over),
            aborted,
            answer_saying("whole"),
        ],
    )
    .await;
    let (_model, mut session) = open(quick(&url)).await;
    let generation = answered(session.as_mut(), request(Vec::new())).await;
    assert_eq!(generation.text, "A short");
    assert_eq!(generation.stop, StopReason::MaxTokens);
    let posts = script.posts();
    assert_eq!(posts.len(), 2, "asked once more");
    assert_eq!(posts[0].body["max_tokens"], 512);
    assert_eq!(
        posts[1].body["max_tokens"], 395,
        "the room the server named"
    );

    let (result, _) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
    match remote_error(result) {
        RemoteError::ContextExceeded { message } => assert!(message.contains("5000"), "{message}"),
        other => panic!("a prompt over the context: {other:?}"),
    }
    assert_eq!(
        script.posts().len(),
        3,
        "a prompt over the context is not asked again"
    );

    let (result, _) = complete(session.as_mut(), request(Vec::new()), Arc::default()).await;
    match remote_error(result) {
        RemoteError::Disconnected { reason } => assert!(reason.contains("abort"), "{reason}"),
        other => panic!("an aborted answer: {other:?}"),
    }
    let generation = answered(session.as_mut(), request(Vec::new())).await;
    assert_eq!(generation.text, "whole");
    assert_eq!(generation.stop, StopReason::EndOfTurn);
}

#[tokio::test]
async fn a_server_behind_an_internal_ca_is_trusted_only_with_its_ca_file() {
    let (script, url) = scripted_tls(generic_listing(), vec![answer_saying("over TLS")]).await;
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    // The public roots alone do not vouch for it: refused, saying how to
    // trust it, and nothing was asked of it.
    let refused = RemoteModel::connect(quick(&url))
        .await
        .expect_err("an issuer no public root knows");
    let text = refused.to_string();
    assert!(
        text.contains("certificate") && text.contains("--model-ca-file"),
        "{text}"
    );
    assert!(script.seen.lock().expect("seen").is_empty());
    // With its CA: the listing and an answer, over TLS.
    let (model, mut session) = open(RemoteConfig {
        ca_file: Some(tls_dir().join("ca.pem")),
        ..quick(&url)
    })
    .await;
    assert_eq!(model.model_name(), "m");
    let generation = answered(session.as_mut(), request(Vec::new())).await;
    assert_eq!(generation.turn.content.as_deref(), Some("over TLS"));
    assert_eq!(script.posts().len(), 1);
    // A CA file that is not one, or is not there: refused, naming it.
    for (file, says) in [
        ("server.key", "holds no PEM certificate"),
        ("missing.pem", "reading the CA file"),
    ] {
        let err = RemoteModel::connect(RemoteConfig {
            ca_file: Some(tls_dir().join(file)),
            ..quick(&url)
        })
        .await
        .expect_err("no CA");
        let text = err.to_string();
        assert!(text.contains(says) && text.contains(file), "{text}");
    }
}

/// A Hermes call written as text, as Qwen2.5 writes one where the server
/// has no tool parser.
fn text_call() -> Reply {
    answer_saying("<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"notes.txt\"}}\n</tool_call>")
}

/// vLLM started without `--enable-auto-tool-choice` refuses `tool_choice:
/// auto` with a 400 before generating: the tools go in the system message
/// (as Qwen2.5's template writes them), the call comes back as text under
/// the structural tag and is parsed, and later turns go that way at once.
/// A forced call (`required`) then goes in the prompt too, held to its
/// schema by a JSON-schema `response_format`.
#[tokio::test]
async fn a_vllm_without_a_tool_parser_gets_the_tools_in_the_prompt() {
    let refusal = status(
        400,
        json!({"object": "error", "type": "BadRequestError", "code": 400,
               "message": "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set"}),
    );
    let (script, url) = scripted(
        vllm_listing(),
        vec![refusal, text_call(), text_call(), json_call()],
    )
    .await;
    let (model, mut session) = open(quick(&url)).await;
    assert!(model.info().detail.contains("native tool_calls"));
    let mut asked = request(vec![read_file_tool()]);
    asked
        .messages
        .insert(0, Message::system("You are a coding agent."));
    for turn in 0..2 {
        let generation = answered(session.as_mut(), asked.clone()).await;
        assert_eq!(
            generation.turn.tool_calls.len(),
            1,
            "turn {turn}: {generation:?}"
        );
        let call = &generation.turn.tool_calls[0];
        assert_eq!(call.function.name, "read_file");
        assert_eq!(
            serde_json::from_str::<Value>(&call.function.arguments).expect("JSON"),
            json!({"path": "notes.txt"})
        );
        assert_eq!(generation.call_path, Some(CallPath::StructuralTag));
    }
    let posts = script.posts();
    assert_eq!(posts.len(), 3, "one refusal, then the tools in the prompt");
    assert_eq!(posts[0].body["tool_choice"], "auto");
    for later in &posts[1..] {
        let body = &later.body;
        assert!(
            body.get("tools").is_none() && body.get("tool_choice").is_none(),
            "{body}"
        );
        let system = body["messages"][0]["content"]
            .as_str()
            .expect("system text");
        assert!(
            system.starts_with("You are a coding agent.\n\n# Tools"),
            "{system}"
        );
        assert!(
            system.contains("<tools>\n{") && system.contains("\"read_file\""),
            "{system}"
        );
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["messages"].as_array().map(Vec::len), Some(2));
        assert_eq!(body["response_format"]["type"], "structural_tag");
    }
    assert_eq!(posts[1].body, posts[2].body, "the same prefix every turn");
    assert!(
        model.info().detail.contains("no tool parser"),
        "{}",
        model.info().detail
    );
    // A forced call: in the prompt as well (vLLM 0.32 refuses `required`
    // without a parser too), under the call's JSON schema.
    let mut required = asked.clone();
    required.tool_choice = ToolChoice::Required;
    let generation = answered(session.as_mut(), required).await;
    assert_eq!(generation.call_path, Some(CallPath::JsonSchema));
    assert_eq!(generation.turn.tool_calls.len(), 1, "{generation:?}");
    let posts = script.posts();
    assert_eq!(posts.len(), 4, "learnt: no refusal this time");
    let body = &posts[3].body;
    assert!(body.get("tools").is_none() && body.get("tool_choice").is_none());
    assert_eq!(
        body["messages"][0], posts[1].body["messages"][0],
        "the same system message as the auto steps"
    );
    assert_eq!(body["response_format"]["type"], "json_schema");
}

/// A call object written as the whole reply, as a forced call's JSON
/// schema has it.
fn json_call() -> Reply {
    answer_saying("{\"name\": \"read_file\", \"arguments\": {\"path\": \"notes.txt\"}}")
}

/// vLLM 0.32 without a tool parser refuses a forced call as well
/// (`tool_choice="required" requires --tool-call-parser to be set`, its
/// exact words): the tools go in the prompt and a `response_format` holds
/// the whole reply to one call object of the forced tool's schema, which
/// the runtime reads back as the call. With a parser, vLLM gets the
/// forced call natively, its functions `strict` (vLLM 0.32 does not hold a
/// forced call to its schema otherwise).
#[tokio::test]
async fn a_vllm_without_a_tool_parser_holds_a_forced_call_to_its_schema() {
    let refusal = status(
        400,
        json!({"object": "error", "type": "BadRequestError", "code": 400,
               "message": "tool_choice=function \"read_file\" requires --tool-call-parser to be set"}),
    );
    // Later, a schema the server cannot compile.
    let uncompiled = status(
        400,
        json!({"object": "error", "type": "BadRequestError", "code": 400,
               "message": "xgrammar could not compile the JSON schema"}),
    );
    let (script, url) = scripted(
        vllm_listing(),
        vec![refusal, json_call(), uncompiled, json_call()],
    )
    .await;
    let (model, mut session) = open(quick(&url)).await;
    let mut named = request(vec![read_file_tool(), list_dir_tool()]);
    named.tool_choice = ToolChoice::Named("read_file".into());
    let generation = answered(session.as_mut(), named.clone()).await;
    assert_eq!(generation.turn.tool_calls.len(), 1, "{generation:?}");
    let call = &generation.turn.tool_calls[0];
    assert_eq!(call.function.name, "read_file");
    assert_eq!(
        serde_json::from_str::<Value>(&call.function.arguments).expect("JSON"),
        json!({"path": "notes.txt"})
    );
    assert_eq!(generation.call_path, Some(CallPath::JsonSchema));
    let posts = script.posts();
    assert_eq!(posts.len(), 2, "one refusal, then the mended request");
    // Asked natively first, `strict` so that vLLM holds the call.
    assert_eq!(
        posts[0].body["tool_choice"]["function"]["name"],
        "read_file"
    );
    assert_eq!(posts[0].body["tools"][0]["function"]["strict"], true);
    let body = &posts[1].body;
    assert!(body.get("tools").is_none() && body.get("tool_choice").is_none());
    let system = body["messages"][0]["content"].as_str().expect("system");
    assert!(
        system.contains("\"read_file\"") && !system.contains("strict"),
        "the tools as the model's template shows them: {system}"
    );
    // Only the named tool, its arguments to its own schema.
    let schema = &body["response_format"]["json_schema"]["schema"];
    assert_eq!(body["response_format"]["type"], "json_schema");
    assert_eq!(schema["properties"]["name"]["enum"], json!(["read_file"]));
    assert_eq!(
        schema["properties"]["arguments"]["required"],
        json!(["path"]),
        "{schema}"
    );
    assert_eq!(schema["required"], json!(["name", "arguments"]));
    assert!(model.info().detail.contains("no tool parser"));

    // A schema refused (400) is dropped for that request: the call, asked
    // for in the prompt alone, is read from the text and validated.
    let generation = answered(session.as_mut(), named).await;
    assert_eq!(generation.turn.tool_calls.len(), 1, "{generation:?}");
    assert_eq!(generation.call_path, Some(CallPath::Parsed));
    let posts = script.posts();
    assert_eq!(posts.len(), 4, "{posts:?}");
    assert_eq!(posts[2].body["response_format"]["type"], "json_schema");
    assert!(posts[3].body.get("response_format").is_none());
    assert_eq!(posts[3].body["messages"], posts[2].body["messages"]);
}

/// A named tool that is not among the tools, on a vLLM without a tool
/// parser: no tools are offered, so none go in the prompt (as in process),
/// and nothing is parsed as a call.
#[tokio::test]
async fn a_named_tool_missing_from_the_tools_puts_none_in_the_prompt() {
    let refusal = status(
        400,
        json!({"object": "error", "type": "BadRequestError", "code": 400,
               "message": "tool_choice=function \"missing\" requires --tool-call-parser to be set"}),
    );
    let (script, url) = scripted(vllm_listing(), vec![refusal, json_call()]).await;
    let (_model, mut session) = open(quick(&url)).await;
    let mut named = request(vec![read_file_tool()]);
    named.tool_choice = ToolChoice::Named("missing".into());
    let generation = answered(session.as_mut(), named).await;
    assert!(generation.turn.tool_calls.is_empty(), "{generation:?}");
    let posts = script.posts();
    assert_eq!(posts.len(), 2, "{posts:?}");
    let body = &posts[1].body;
    assert!(
        body.get("tools").is_none()
            && body.get("tool_choice").is_none()
            && body.get("response_format").is_none(),
        "{body}"
    );
    assert!(
        !body["messages"].to_string().contains("read_file"),
        "{body}"
    );
}

/// An answer saying `text` whose usage reports `prompt_tokens`.
fn answer_after_prompt_of(text: &str, prompt_tokens: u64) -> Reply {
    Reply::Stream {
        events: vec![
            content(text),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1}})
            .to_string(),
            "[DONE]".to_string(),
        ],
        pause: Duration::ZERO,
        end: End::Close,
    }
}

/// Ollama cuts a prompt over its `num_ctx` instead of refusing it: the
/// start of the conversation (system prompt, tools) is gone without a
/// word. A conversation that grew past the context and was reported as
/// fewer prompt tokens is that cut, and an error that says so; a drop
/// while far from the context (a server counting only what it had not
/// cached) is not, nor is a new, shorter conversation.
#[tokio::test]
async fn a_prompt_the_server_cut_silently_is_a_context_error() {
    let listing = json!({"object": "list", "data": [
        {"id": "qwen2.5-coder:32b", "object": "model", "owned_by": "library"}]});
    let (script, url) = scripted(
        listing,
        vec![
            answer_after_prompt_of("first", 1900),
            answer_after_prompt_of("second", 120),
            answer_after_prompt_of("third", 4000),
            answer_after_prompt_of("cut", 2100),
            answer_after_prompt_of("fresh", 40),
        ],
    )
    .await;
    script
        .routes
        .lock()
        .expect("routes")
        .push(("/api/show", json!({"parameters": "num_ctx 4096"})));
    let (model, mut session) = open(quick(&url)).await;
    assert_eq!(model.info().context_length, Some(4096));
    let mut conversation = request(Vec::new());
    let turn = |conversation: &mut CompletionRequest, said: &str, next: String| {
        conversation.messages.push(Message::assistant(said));
        conversation.messages.push(Message::user(next));
    };
    assert_eq!(
        answered(session.as_mut(), conversation.clone()).await.text,
        "first"
    );
    turn(&mut conversation, "first", "More.".into());
    assert_eq!(
        answered(session.as_mut(), conversation.clone()).await.text,
        "second"
    );
    turn(&mut conversation, "second", "word ".repeat(3000));
    assert_eq!(
        answered(session.as_mut(), conversation.clone()).await.text,
        "third"
    );
    turn(&mut conversation, "third", "word ".repeat(600));
    let (result, _) = complete(session.as_mut(), conversation.clone(), Arc::default()).await;
    match remote_error(result) {
        RemoteError::ContextExceeded { message } => {
            assert!(
                message.contains("2100") && message.contains("4000") && message.contains("4096"),
                "{message}"
            );
            assert!(message.contains("OLLAMA_CONTEXT_LENGTH"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // A new conversation (after /reset) is shorter, and that is no cut.
    assert_eq!(
        answered(session.as_mut(), request(Vec::new())).await.text,
        "fresh"
    );
}

/// Ollama's context is not in its `/v1/models`: the loaded model's comes
/// from `/api/ps`, else the `num_ctx` its Modelfile sets from `/api/show`,
/// else it is unknown (the server's default).
#[tokio::test]
async fn ollamas_context_is_read_from_its_own_api() {
    let listing = json!({"object": "list", "data": [
        {"id": "qwen2.5-coder:32b", "object": "model", "owned_by": "library"}]});
    let show = json!({
        "parameters": "stop                           \"<|im_end|>\"\nnum_ctx                        8192",
        "model_info": {"general.architecture": "qwen2", "qwen2.context_length": 32768},
    });
    let running = json!({"models": [
        {"name": "other:1b", "model": "other:1b", "context_length": 2048},
        {"name": "qwen2.5-coder:32b", "model": "qwen2.5-coder:32b", "context_length": 16384}]});
    for (routes, context) in [
        (
            vec![("/api/show", show.clone()), ("/api/ps", running)],
            Some(16384),
        ),
        (
            vec![("/api/show", show), ("/api/ps", json!({"models": []}))],
            Some(8192),
        ),
        (
            vec![(
                "/api/show",
                json!({"parameters": "stop \"<|im_end|>\"", "model_info": {"qwen2.context_length": 32768}}),
            )],
            None,
        ),
        (Vec::new(), None),
    ] {
        let (script, url) = scripted(listing.clone(), Vec::new()).await;
        script.routes.lock().expect("routes").extend(routes);
        let model = RemoteModel::connect(quick(&url)).await.expect("connect");
        assert_eq!(model.info().context_length, context);
        // Only the model asked about was asked for.
        for seen in script.seen.lock().expect("seen").iter() {
            if seen.path == "/api/show" {
                assert_eq!(seen.body, json!({"model": "qwen2.5-coder:32b"}));
            }
        }
    }
}

/// Refusals come in whatever order a server checks them (an older vLLM
/// refuses the structural tag before it looks at `tool_choice`): each is
/// mended once, and what was learnt holds for later turns.
#[tokio::test]
async fn refusals_are_mended_in_whatever_order_they_come() {
    let (script, url) = scripted(
        vllm_listing(),
        vec![
            status(
                400,
                json!({"object": "error", "message": "Unknown response_format type: structural_tag", "code": 400}),
            ),
            status(
                400,
                json!({"object": "error", "code": 400,
                       "message": "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set"}),
            ),
            text_call(),
            text_call(),
        ],
    )
    .await;
    let (model, mut session) = open(quick(&url)).await;
    for _ in 0..2 {
        let generation = answered(session.as_mut(), request(vec![read_file_tool()])).await;
        assert_eq!(generation.turn.tool_calls.len(), 1, "{generation:?}");
        assert_eq!(generation.call_path, Some(CallPath::Parsed));
    }
    let posts = script.posts();
    assert_eq!(posts.len(), 4, "two refusals mended, then straight through");
    assert!(posts[0].body.get("response_format").is_some());
    assert!(posts[1].body.get("response_format").is_none() && posts[1].body.get("tools").is_some());
    for later in &posts[2..] {
        assert!(
            later.body.get("response_format").is_none() && later.body.get("tools").is_none(),
            "{}",
            later.body
        );
    }
    assert!(!model.info().capabilities.constrained_decoding);
}
