//! The proxy: the one way out of a sandbox with a network allowlist.
//!
//! It serves one listening socket that lives in the sandbox's network
//! namespace (bound there by the sandbox, handed to the runtime), and
//! speaks, on each connection, whichever of these the client opened with:
//! - **HTTP `CONNECT`** (`HTTPS_PROXY`): a tunnel to the checked address;
//! - **plain HTTP** in absolute form (`HTTP_PROXY`): the request is
//!   forwarded over a fresh connection to the checked address, whose `Host`
//!   must name the URL's host;
//! - **SOCKS5 `CONNECT`** (`ALL_PROXY=socks5h://…`), with the name resolved
//!   here (remote DNS).
//!
//! hyper parses HTTP on both sides. Each request is decided on its own
//! (a kept-alive proxy connection may name another host next), and every
//! decision, allowed or not, becomes an [`EgressRecord`].

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use stack_types::{EgressDecision, EgressProtocol, EgressRecord};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::resolve::resolve;
use crate::rules::{Allowlist, Host, Refusal, RefusalKind};

/// How long connecting to one address may take.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// How long a client may take to say what it wants (its first bytes, a
/// SOCKS handshake).
const OPENING_DEADLINE: Duration = Duration::from_secs(10);

/// How long [`EgressProxy::finish`] lets open connections drain once the
/// sandboxed processes are gone.
const DRAIN_GRACE: Duration = Duration::from_millis(200);

/// Refusals kept per proxy; past it, refusals are still decided (and
/// logged through `tracing`) but only counted, so that a flood of them
/// costs bounded memory. Allowed connections are kept up to
/// [`MAX_ALLOWED_RECORDS`], so that junk refusals cannot push a real
/// connection out of the record.
const MAX_REFUSED_RECORDS: usize = 512;

/// Allowed connections kept per proxy (each one held a connection slot).
const MAX_ALLOWED_RECORDS: usize = 8192;

/// Connections one proxy serves at once; more wait to be accepted. Each
/// holds a runtime descriptor (and an outbound one once allowed).
const MAX_CONNECTIONS: usize = 64;

/// Name lookups one proxy runs at once (each holds a thread of the
/// blocking pool for as long as `getaddrinfo` takes).
const MAX_LOOKUPS: usize = 8;

/// How long deciding and opening one connection may take in all (lookup
/// and every address tried).
const OPEN_DEADLINE: Duration = Duration::from_secs(15);

/// Largest request head hyper buffers per connection.
const MAX_HEAD_BYTES: usize = 64 << 10;

/// Hop-by-hop headers a proxy must not forward (RFC 9110 §7.6.1), and the
/// proxy's own.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Bytes through one allowed connection.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
}

/// What the proxy decided, in order.
#[derive(Default)]
struct Log {
    records: Mutex<Vec<(EgressRecord, Arc<Counters>)>>,
    refused: AtomicU64,
    allowed: AtomicU64,
    dropped: AtomicU64,
}

impl Log {
    fn push(&self, record: EgressRecord) -> Arc<Counters> {
        tracing::info!(
            host = %record.host,
            port = record.port,
            address = ?record.address,
            protocol = record.protocol.as_str(),
            decision = ?record.decision,
            rule = %record.rule,
            "egress"
        );
        let counters = Arc::new(Counters::default());
        let (count, cap) = match record.decision {
            EgressDecision::Allowed => (&self.allowed, MAX_ALLOWED_RECORDS),
            EgressDecision::Refused | EgressDecision::Unreachable => {
                (&self.refused, MAX_REFUSED_RECORDS)
            }
        };
        if count.fetch_add(1, Ordering::Relaxed) < cap as u64 {
            let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            records.push((record, counters.clone()));
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        counters
    }

    fn snapshot(&self) -> Vec<EgressRecord> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records
            .iter()
            .map(|(record, counters)| EgressRecord {
                bytes_out: counters.sent.load(Ordering::Relaxed),
                bytes_in: counters.received.load(Ordering::Relaxed),
                ..record.clone()
            })
            .collect()
    }
}

/// What every connection of one proxy shares.
struct Shared {
    rules: Allowlist,
    log: Log,
    /// Name lookups in flight (see [`MAX_LOOKUPS`]).
    lookups: tokio::sync::Semaphore,
    tasks: TaskTracker,
    /// Ends every connection at once.
    abort: CancellationToken,
}

impl Shared {
    /// Spawns `work`, tracked, ended by [`Shared::abort`].
    fn spawn(self: &Arc<Self>, work: impl std::future::Future<Output = ()> + Send + 'static) {
        let abort = self.abort.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = abort.cancelled() => {}
                _ = work => {}
            }
        });
    }
}

/// A running egress proxy: serves its listener until [`EgressProxy::finish`].
pub struct EgressProxy {
    shared: Arc<Shared>,
    stop: CancellationToken,
    port: u16,
}

/// What [`EgressProxy::finish`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressReport {
    /// Every connection asked for, in order (at most 512).
    pub records: Vec<EgressRecord>,
    /// Connections decided past that and not kept.
    pub dropped: u64,
}

impl EgressProxy {
    /// Serves `listener` (a listening TCP socket, usually in a sandbox's
    /// network namespace) under `rules`, on the current tokio runtime.
    pub fn start(
        listener: std::net::TcpListener,
        rules: Allowlist,
    ) -> std::io::Result<EgressProxy> {
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let listener = TcpListener::from_std(listener)?;
        let shared = Arc::new(Shared {
            rules,
            log: Log::default(),
            lookups: tokio::sync::Semaphore::new(MAX_LOOKUPS),
            tasks: TaskTracker::new(),
            abort: CancellationToken::new(),
        });
        let stop = CancellationToken::new();
        let accepting = shared.clone();
        let stopped = stop.clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        shared.spawn(async move {
            loop {
                // A slot first: past MAX_CONNECTIONS, clients wait in the
                // listener's backlog, not in the runtime.
                let slot = tokio::select! {
                    _ = stopped.cancelled() => return,
                    slot = Arc::clone(&slots).acquire_owned() => slot,
                };
                let Ok(slot) = slot else { return };
                let accepted = tokio::select! {
                    _ = stopped.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                match accepted {
                    Ok((stream, _)) => {
                        let shared = accepting.clone();
                        accepting.spawn(async move {
                            serve_connection(stream, shared).await;
                            drop(slot);
                        });
                    }
                    Err(err) => {
                        // Out of descriptors, say: wait rather than spin.
                        tracing::warn!(%err, "egress proxy: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(EgressProxy { shared, stop, port })
    }

    /// The port it listens on (in its listener's network namespace).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The records so far.
    pub fn records(&self) -> Vec<EgressRecord> {
        self.shared.log.snapshot()
    }

    /// Stops accepting, lets open connections drain briefly, ends the rest,
    /// and returns what was decided.
    pub async fn finish(self) -> EgressReport {
        self.stop.cancel();
        self.shared.tasks.close();
        if tokio::time::timeout(DRAIN_GRACE, self.shared.tasks.wait())
            .await
            .is_err()
        {
            self.shared.abort.cancel();
            self.shared.tasks.wait().await;
        }
        EgressReport {
            records: self.shared.log.snapshot(),
            dropped: self.shared.log.dropped.load(Ordering::Relaxed),
        }
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.shared.abort.cancel();
    }
}

/// A stream that counts what goes through it.
struct Counted {
    inner: TcpStream,
    counters: Arc<Counters>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before) as u64;
        self.counters.received.fetch_add(read, Ordering::Relaxed);
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = &polled {
            self.counters
                .sent
                .fetch_add(*written as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A record of a decision about `host_text:port`, with no bytes yet. Its
/// host is the host as the proxy understood it (lower-cased, no trailing
/// dot), or, for what is not a host, the text escaped: a record never
/// carries control characters into a log.
fn new_record(
    host_text: &str,
    port: u16,
    protocol: EgressProtocol,
    decision: EgressDecision,
    address: Option<IpAddr>,
    rule: String,
) -> EgressRecord {
    EgressRecord {
        host: Host::parse(host_text)
            .map_or_else(|_| host_text.escape_debug().to_string(), |h| h.to_string()),
        port,
        address,
        protocol,
        decision,
        rule,
        bytes_out: 0,
        bytes_in: 0,
    }
}

/// Decides `host:port` and, if allowed, connects to an address that passed
/// the checks. Records the decision either way.
async fn open(
    shared: &Shared,
    host_text: &str,
    port: u16,
    protocol: EgressProtocol,
) -> Result<Counted, Refusal> {
    let record = |decision, address, rule: String| {
        new_record(host_text, port, protocol, decision, address, rule)
    };
    let opened = tokio::time::timeout(OPEN_DEADLINE, connect_checked(shared, host_text, port))
        .await
        .unwrap_or_else(|_| {
            Err(Refused {
                refusal: Refusal::new(
                    RefusalKind::Unreachable,
                    format!("no connection within {} s", OPEN_DEADLINE.as_secs()),
                ),
                decision: EgressDecision::Unreachable,
                address: None,
                resolved: Vec::new(),
            })
        });
    match opened {
        Ok((stream, address, rule)) => {
            let counters = shared
                .log
                .push(record(EgressDecision::Allowed, Some(address), rule));
            Ok(Counted {
                inner: stream,
                counters,
            })
        }
        Err(refused) => {
            shared.log.push(record(
                refused.decision,
                refused.address,
                refused.refusal.rule.clone(),
            ));
            Err(refused.refusal)
        }
    }
}

/// A host that passed: the rule that allows it, every address it
/// resolved to, and those the proxy may connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vetted {
    /// The rule that allows the name (or the address literal).
    pub rule: String,
    /// Every address it resolved to (or the literal), in order.
    pub resolved: Vec<IpAddr>,
    /// Those of them that passed the address checks.
    pub usable: Vec<IpAddr>,
}

/// A host that did not pass: the refusal, and the address it was about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Why, and the rule.
    pub refusal: Refusal,
    /// Refused, or allowed but unreachable.
    pub decision: EgressDecision,
    /// The address it was about, if one.
    pub address: Option<IpAddr>,
    /// Every address the name resolved to, when it got that far.
    pub resolved: Vec<IpAddr>,
}

/// Decides `host:port` as the proxy would, up to the connect: the name
/// against the rules, then each address it resolves to (`agent policy
/// explain --host` shows this).
pub async fn vet(rules: &Allowlist, host_text: &str, port: u16) -> Result<Vetted, Refused> {
    let refused = |refusal: Refusal, address: Option<IpAddr>, resolved: Vec<IpAddr>| Refused {
        decision: match refusal.kind {
            RefusalKind::Unresolvable | RefusalKind::Unreachable => EgressDecision::Unreachable,
            _ => EgressDecision::Refused,
        },
        refusal,
        address,
        resolved,
    };
    let host = Host::parse(host_text)
        .map_err(|why| refused(Refusal::new(RefusalKind::BadRequest, why), None, Vec::new()))?;
    let rule = rules
        .decide(&host, port)
        .map_err(|refusal| refused(refusal, None, Vec::new()))?;
    let resolved = match &host {
        Host::Address(address) => vec![*address],
        Host::Name(name) => resolve(rules, name, port)
            .await
            .map_err(|refusal| refused(refusal, None, Vec::new()))?,
    };
    let usable: Vec<IpAddr> = resolved
        .iter()
        .copied()
        .filter(|address| rules.address_allowed(*address, port))
        .collect();
    if usable.is_empty() {
        let first = resolved.first().copied();
        let shown = first.map_or_else(String::new, |a| format!(" {a}"));
        return Err(refused(
            Refusal::new(
                RefusalKind::PrivateAddress,
                format!(
                    "resolves to the private or special address{shown}, which no allow entry names"
                ),
            ),
            first,
            resolved,
        ));
    }
    Ok(Vetted {
        rule,
        resolved,
        usable,
    })
}

async fn connect_checked(
    shared: &Shared,
    host_text: &str,
    port: u16,
) -> Result<(TcpStream, IpAddr, String), Refused> {
    let vetted = {
        let _lookup = shared.lookups.acquire().await;
        vet(&shared.rules, host_text, port).await
    };
    let Vetted {
        rule,
        usable: checked,
        resolved,
    } = vetted?;
    let mut last_error = String::new();
    for address in &checked {
        let target = SocketAddr::new(*address, port);
        match tokio::time::timeout(CONNECT_DEADLINE, TcpStream::connect(target)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok((stream, *address, rule));
            }
            Ok(Err(err)) => last_error = format!("{target}: {err}"),
            Err(_) => {
                last_error = format!("{target}: no answer in {} s", CONNECT_DEADLINE.as_secs())
            }
        }
    }
    Err(Refused {
        refusal: Refusal::new(
            RefusalKind::Unreachable,
            format!("{rule}, but could not connect ({last_error})"),
        ),
        decision: EgressDecision::Unreachable,
        address: checked.first().copied(),
        resolved,
    })
}

/// One accepted connection: SOCKS5 if it opens with version byte 5, HTTP
/// otherwise.
async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let mut first = [0u8; 1];
    match tokio::time::timeout(OPENING_DEADLINE, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return,
    }
    if first[0] == 5 {
        serve_socks5(stream, shared).await;
    } else {
        let service_shared = shared.clone();
        let service = hyper::service::service_fn(move |request| {
            let shared = service_shared.clone();
            async move { Ok::<_, Infallible>(handle_http(request, shared).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .title_case_headers(true)
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(OPENING_DEADLINE)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades()
            .await;
    }
}

fn text_response(status: StatusCode, text: String) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn refusal_response(host: &str, port: u16, refusal: &Refusal) -> Response<ProxyBody> {
    let status = match refusal.kind {
        RefusalKind::BadRequest => StatusCode::BAD_REQUEST,
        RefusalKind::Unresolvable | RefusalKind::Unreachable => StatusCode::BAD_GATEWAY,
        _ => StatusCode::FORBIDDEN,
    };
    let mut response = text_response(
        status,
        format!(
            "stack-runtime egress proxy: {host}:{port} refused by the sandbox policy: {}\n",
            refusal.rule
        ),
    );
    response
        .headers_mut()
        .insert("x-stack-egress", HeaderValue::from_static("refused"));
    response
}

async fn handle_http(request: Request<Incoming>, shared: Arc<Shared>) -> Response<ProxyBody> {
    if request.method() == Method::CONNECT {
        tunnel(request, shared).await
    } else {
        forward(request, shared).await
    }
}

/// `CONNECT host:port`: the tunnel, once hyper hands the connection over.
async fn tunnel(request: Request<Incoming>, shared: Arc<Shared>) -> Response<ProxyBody> {
    let Some((host, port)) = request
        .uri()
        .authority()
        .and_then(|a| a.port_u16().map(|port| (a.host().to_string(), port)))
    else {
        return text_response(
            StatusCode::BAD_REQUEST,
            "stack-runtime egress proxy: CONNECT needs host:port\n".into(),
        );
    };
    let mut upstream = match open(&shared, &host, port, EgressProtocol::HttpConnect).await {
        Ok(upstream) => upstream,
        Err(refusal) => return refusal_response(&host, port, &refusal),
    };
    shared.spawn(async move {
        if let Ok(upgraded) = hyper::upgrade::on(request).await {
            let mut client = TokioIo::new(upgraded);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
    });
    Response::new(Empty::new().map_err(|never| match never {}).boxed())
}

/// `host[:port]` of a `Host` header.
fn host_header(value: &HeaderValue) -> Option<(String, Option<u16>)> {
    let text = value.to_str().ok()?;
    let authority: hyper::http::uri::Authority = text.parse().ok()?;
    Some((authority.host().to_string(), authority.port_u16()))
}

/// A plain HTTP request in absolute form, forwarded to the checked address.
async fn forward(mut request: Request<Incoming>, shared: Arc<Shared>) -> Response<ProxyBody> {
    let uri = request.uri().clone();
    let Some(authority) = uri.authority() else {
        return text_response(
            StatusCode::BAD_REQUEST,
            "stack-runtime egress proxy: this is the sandbox's egress proxy; it takes CONNECT and absolute-form http:// requests (HTTP_PROXY, HTTPS_PROXY)\n".into(),
        );
    };
    if uri.scheme_str() != Some("http") {
        return text_response(
            StatusCode::BAD_REQUEST,
            format!(
                "stack-runtime egress proxy: `{}` requests go through CONNECT, not as plain requests\n",
                uri.scheme_str().unwrap_or("?")
            ),
        );
    }
    let host = authority.host().to_string();
    let port = authority.port_u16().unwrap_or(80);
    let hosts: Vec<&HeaderValue> = request.headers().get_all(HOST).iter().collect();
    let same = match hosts.as_slice() {
        [] => true,
        [value] => host_header(value).is_some_and(|(named, named_port)| {
            named_port.unwrap_or(80) == port
                && matches!((Host::parse(&named), Host::parse(&host)), (Ok(a), Ok(b)) if a == b)
        }),
        _ => false,
    };
    if !same {
        let named: Vec<String> = hosts
            .iter()
            .map(|v| {
                v.to_str()
                    .unwrap_or("(not text)")
                    .escape_debug()
                    .to_string()
            })
            .collect();
        let refusal = Refusal::new(
            RefusalKind::HostMismatch,
            format!(
                "the Host header names `{}`, not the URL's host {host}:{port}",
                named.join("`, `")
            ),
        );
        shared.log.push(new_record(
            &host,
            port,
            EgressProtocol::Http,
            EgressDecision::Refused,
            None,
            refusal.rule.clone(),
        ));
        return refusal_response(&host, port, &refusal);
    }
    let upstream = match open(&shared, &host, port, EgressProtocol::Http).await {
        Ok(upstream) => upstream,
        Err(refusal) => return refusal_response(&host, port, &refusal),
    };
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
            Ok(pair) => pair,
            Err(err) => {
                return text_response(
                    StatusCode::BAD_GATEWAY,
                    format!("stack-runtime egress proxy: {host}:{port}: {err}\n"),
                )
            }
        };
    shared.spawn(async move {
        let _ = connection.await;
    });
    // Origin form on the way out; the Host the client sent (checked
    // above), or the URL's.
    let origin = uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .unwrap_or_else(|_| hyper::Uri::from_static("/"));
    *request.uri_mut() = origin;
    let headers = request.headers_mut();
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
    // The one Host the upstream sees: the URL's host and port, never a
    // user-info part or a second header.
    let named = if authority.port_u16().is_some() {
        format!("{}:{port}", authority.host())
    } else {
        authority.host().to_string()
    };
    match HeaderValue::from_str(&named) {
        Ok(value) => {
            headers.insert(HOST, value);
        }
        Err(_) => {
            headers.remove(HOST);
        }
    }
    match sender.send_request(request).await {
        Ok(response) => response.map(|body| body.boxed()),
        Err(err) => text_response(
            StatusCode::BAD_GATEWAY,
            format!("stack-runtime egress proxy: {host}:{port}: {err}\n"),
        ),
    }
}

/// SOCKS5 reply codes (RFC 1928 §6).
mod socks_reply {
    pub const SUCCEEDED: u8 = 0x00;
    pub const NOT_ALLOWED: u8 = 0x02;
    pub const HOST_UNREACHABLE: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
    pub const ADDRESS_NOT_SUPPORTED: u8 = 0x08;
}

/// SOCKS5 `CONNECT` without authentication (RFC 1928): the three fixed
/// messages, each read whole under [`OPENING_DEADLINE`]. `BIND` and `UDP
/// ASSOCIATE` are refused: UDP has no way out.
async fn serve_socks5(mut stream: TcpStream, shared: Arc<Shared>) {
    let opened = tokio::time::timeout(OPENING_DEADLINE, socks5_request(&mut stream)).await;
    let (host, port) = match opened {
        Ok(Ok(Ok((host, port, 1)))) => (host, port),
        Ok(Ok(Ok((host, port, command)))) => {
            // BIND or UDP ASSOCIATE: UDP has no way out of the sandbox.
            shared.log.push(new_record(
                &host,
                port,
                EgressProtocol::Socks5,
                EgressDecision::Refused,
                None,
                format!(
                    "SOCKS5 command {command} (BIND, UDP ASSOCIATE) is not supported; only CONNECT"
                ),
            ));
            let _ = stream
                .write_all(&socks5_reply(socks_reply::COMMAND_NOT_SUPPORTED))
                .await;
            return;
        }
        Ok(Ok(Err(code))) => {
            let _ = stream.write_all(&socks5_reply(code)).await;
            return;
        }
        Ok(Err(_)) | Err(_) => return,
    };
    match open(&shared, &host, port, EgressProtocol::Socks5).await {
        Ok(mut upstream) => {
            if stream
                .write_all(&socks5_reply(socks_reply::SUCCEEDED))
                .await
                .is_ok()
            {
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
            }
        }
        Err(refusal) => {
            let code = match refusal.kind {
                RefusalKind::Unresolvable | RefusalKind::Unreachable => {
                    socks_reply::HOST_UNREACHABLE
                }
                _ => socks_reply::NOT_ALLOWED,
            };
            let _ = stream.write_all(&socks5_reply(code)).await;
        }
    }
}

fn socks5_reply(code: u8) -> [u8; 10] {
    [5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// Reads the greeting and the request: the target and the command, or the
/// reply code that refuses it.
async fn socks5_request(stream: &mut TcpStream) -> std::io::Result<Result<(String, u16, u8), u8>> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await?;
    let mut methods = vec![0u8; usize::from(head[1])];
    stream.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        // No acceptable method: only "no authentication" is offered here.
        stream.write_all(&[5, 0xff]).await?;
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    stream.write_all(&[5, 0]).await?;
    let mut request = [0u8; 4];
    stream.read_exact(&mut request).await?;
    let [version, command, _, kind] = request;
    if version != 5 {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    let host = match kind {
        1 => {
            let mut octets = [0u8; 4];
            stream.read_exact(&mut octets).await?;
            std::net::Ipv4Addr::from(octets).to_string()
        }
        3 => {
            let mut length = [0u8; 1];
            stream.read_exact(&mut length).await?;
            let mut name = vec![0u8; usize::from(length[0])];
            stream.read_exact(&mut name).await?;
            match String::from_utf8(name) {
                Ok(name) => name,
                Err(_) => return Ok(Err(socks_reply::ADDRESS_NOT_SUPPORTED)),
            }
        }
        4 => {
            let mut octets = [0u8; 16];
            stream.read_exact(&mut octets).await?;
            std::net::Ipv6Addr::from(octets).to_string()
        }
        _ => return Ok(Err(socks_reply::ADDRESS_NOT_SUPPORTED)),
    };
    let mut port = [0u8; 2];
    stream.read_exact(&mut port).await?;
    Ok(Ok((host, u16::from_be_bytes(port), command)))
}
