//! Network egress by name against the real process sandbox: real network
//! namespaces, landlock TCP rules and seccomp, real `curl` and `python3`,
//! and the runtime's egress proxy on real sockets.
//!
//! The test's "internet" is HTTP servers it starts on loopback addresses
//! (127.0.0.2, 127.0.0.3, …); the policy's `hosts` table pins names to
//! them, and names those addresses exactly in `allow`, which is what lets
//! the proxy connect to a loopback address at all. Every refusal must be
//! in the call's egress records with its rule, and no refused request may
//! reach its server.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stack_sandbox::process::{EgressRules, Network, ProcessPolicy, ProcessSandbox, ResourceLimits};
use stack_sandbox::{ExecStatus, Execution};
use stack_types::{EgressDecision, EgressProtocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

use common::helper_binary;

/// One of the test's "internet" hosts: answers every request with its
/// name, `/redirect` with a redirect to `redirect_to`, and remembers each
/// request's first line and `Host` header.
struct Site {
    address: IpAddr,
    port: u16,
    hits: Arc<Mutex<Vec<String>>>,
}

impl Site {
    async fn start(address: &str, name: &'static str, redirect_to: Option<String>) -> Site {
        let address: IpAddr = address.parse().expect("address");
        let listener = tokio::net::TcpListener::bind((address, 0))
            .await
            .expect("bind a test site");
        let port = listener.local_addr().expect("addr").port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let seen = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = seen.clone();
                let redirect_to = redirect_to.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                        match stream.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    let first = head.lines().next().unwrap_or("").to_string();
                    let host = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Host: ").or(l.strip_prefix("host: ")))
                        .unwrap_or("")
                        .to_string();
                    seen.lock().expect("hits").push(format!("{first} | {host}"));
                    let response = match (&redirect_to, first.contains("/redirect")) {
                        (Some(location), true) => format!(
                            "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        ),
                        _ => {
                            let body = format!("hello from {name}\n");
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            )
                        }
                    };
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Site {
            address,
            port,
            hits,
        }
    }

    fn hits(&self) -> Vec<String> {
        self.hits.lock().expect("hits").clone()
    }
}

/// The sites and the policy that names them.
struct World {
    allowed: Site,
    forge: Site,
    gist: Site,
    unlisted: Site,
    internal: Site,
    sandbox: ProcessSandbox,
    workspace: tempfile::TempDir,
    policy: ProcessPolicy,
}

impl World {
    async fn new() -> World {
        let gist = Site::start("127.0.0.4", "gist", None).await;
        let redirect = format!("http://gist.forge.test:{}/", gist.port);
        let allowed = Site::start("127.0.0.2", "allowed", Some(redirect)).await;
        let forge = Site::start("127.0.0.3", "forge", None).await;
        let unlisted = Site::start("127.0.0.5", "unlisted", None).await;
        let internal = Site::start("127.0.0.6", "internal", None).await;
        let mut hosts = BTreeMap::new();
        hosts.insert("allowed.test", &allowed);
        hosts.insert("api.forge.test", &forge);
        hosts.insert("gist.forge.test", &gist);
        hosts.insert("unlisted.test", &unlisted);
        hosts.insert("internal.test", &internal);
        // The stand-ins for public hosts are named exactly (so the proxy may
        // connect to them); 127.0.0.6 is not: `internal.test` resolves to
        // a private address.
        let mut rules = EgressRules::new(
            &[
                "allowed.test",
                "*.forge.test",
                "internal.test",
                "127.0.0.2",
                "127.0.0.3",
                "127.0.0.4",
                "127.0.0.5",
            ],
            &["gist.forge.test"],
        )
        .expect("rules");
        for (name, site) in hosts {
            rules = rules.pin(name, site.address).expect("pin");
        }
        let policy = ProcessPolicy {
            network: Network::Allowlist(rules.into()),
            limits: ResourceLimits {
                wall_ms: 30_000,
                cpu_seconds: 20,
                ..ResourceLimits::default()
            },
            ..ProcessPolicy::default()
        };
        World {
            allowed,
            forge,
            gist,
            unlisted,
            internal,
            sandbox: ProcessSandbox::with_helper(helper_binary()),
            workspace: tempfile::tempdir().expect("workspace"),
            policy,
        }
    }

    async fn bash(&self, script: &str) -> Execution {
        let argv = ["bash".to_string(), "-c".to_string(), script.to_string()];
        self.sandbox
            .run(&argv, None, self.workspace.path(), &self.policy)
            .await
    }

    async fn python(&self, code: &str) -> Execution {
        let argv = ["python3".to_string(), "-c".to_string(), code.to_string()];
        self.sandbox
            .run(&argv, None, self.workspace.path(), &self.policy)
            .await
    }

    fn untouched(&self) -> [(&'static str, Vec<String>); 3] {
        [
            ("gist", self.gist.hits()),
            ("unlisted", self.unlisted.hits()),
            ("internal", self.internal.hits()),
        ]
    }
}

fn refused_with<'a>(outcome: &'a Execution, host: &str) -> Option<&'a str> {
    outcome
        .egress
        .iter()
        .find(|r| r.host == host && r.decision == EgressDecision::Refused)
        .map(|r| r.rule.as_str())
}

#[tokio::test(flavor = "multi_thread")]
async fn allowed_hosts_are_reached_through_the_proxy_by_curl_and_python() {
    let _serial = SERIAL.lock().await;
    let world = World::new().await;
    let a = world.allowed.port;
    let f = world.forge.port;

    // curl, plain HTTP through HTTP_PROXY.
    let outcome = world
        .bash(&format!("curl -sSf http://allowed.test:{a}/"))
        .await;
    assert_eq!(outcome.status, ExecStatus::Ok, "{outcome:?}");
    assert_eq!(outcome.stdout, "hello from allowed\n");
    let record = &outcome.egress[0];
    assert_eq!(
        (record.protocol, record.decision, record.rule.as_str()),
        (
            EgressProtocol::Http,
            EgressDecision::Allowed,
            "allow allowed.test"
        )
    );
    assert_eq!(record.address, Some(world.allowed.address));
    assert!(record.bytes_out > 0 && record.bytes_in > 0, "{record:?}");

    // curl through a CONNECT tunnel, and through SOCKS5 with remote DNS.
    let outcome = world
        .bash(&format!(
            "curl -sSf --proxytunnel http://api.forge.test:{f}/ && curl -sSf --proxy \"$ALL_PROXY\" http://api.forge.test:{f}/"
        ))
        .await;
    assert_eq!(outcome.status, ExecStatus::Ok, "{outcome:?}");
    assert_eq!(outcome.stdout, "hello from forge\nhello from forge\n");
    let protocols: Vec<_> = outcome.egress.iter().map(|r| r.protocol).collect();
    assert_eq!(
        protocols,
        [EgressProtocol::HttpConnect, EgressProtocol::Socks5]
    );
    assert!(outcome
        .egress
        .iter()
        .all(|r| r.rule == "allow *.forge.test" && r.decision == EgressDecision::Allowed));

    // Python's urllib, which reads the proxy variables itself.
    let outcome = world
        .python(&format!(
            "import urllib.request\nprint(urllib.request.urlopen('http://allowed.test:{a}/', timeout=10).read().decode(), end='')"
        ))
        .await;
    assert_eq!(outcome.status, ExecStatus::Ok, "{outcome:?}");
    assert_eq!(outcome.stdout, "hello from allowed\n");
    assert_eq!(world.allowed.hits().len(), 2);
    assert_eq!(world.forge.hits().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn denied_unlisted_and_private_hosts_are_refused_with_their_rule() {
    let _serial = SERIAL.lock().await;
    let world = World::new().await;
    let cases = [
        ("gist.forge.test", world.gist.port, "deny gist.forge.test"),
        (
            "unlisted.test",
            world.unlisted.port,
            "not on the allow list",
        ),
        (
            "internal.test",
            world.internal.port,
            "private or special address 127.0.0.6",
        ),
    ];
    for (host, port, rule) in cases {
        for (how, script) in [
            ("http", format!("curl -sSf http://{host}:{port}/")),
            (
                "connect",
                format!("curl -sSf --proxytunnel http://{host}:{port}/"),
            ),
            (
                "socks5",
                format!("curl -sSf --proxy \"$ALL_PROXY\" http://{host}:{port}/"),
            ),
        ] {
            let outcome = world.bash(&script).await;
            assert_eq!(
                outcome.status,
                ExecStatus::Failed,
                "{host} by {how}: {outcome:?}"
            );
            let got = refused_with(&outcome, host)
                .unwrap_or_else(|| panic!("{host} by {how}: no refusal recorded: {outcome:?}"));
            assert!(got.contains(rule), "{host} by {how}: rule {got:?}");
            // The model is told.
            let text = stack_types::ToolOutcome::from(outcome.clone()).to_model_text();
            assert!(text.contains(&format!("refused {host}:{port}")), "{text}");
        }
    }
    for (name, hits) in world.untouched() {
        assert!(hits.is_empty(), "{name} was reached: {hits:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ways_around_the_proxy_get_nowhere() {
    let _serial = SERIAL.lock().await;
    let world = World::new().await;
    let a = world.allowed.port;
    let g = world.gist.port;
    let cases: Vec<(&str, String, &str)> = vec![
        // The proxy variables ignored: a direct connect to the address.
        (
            "curl without the proxy",
            format!("curl -sS --noproxy '*' --max-time 5 http://127.0.0.2:{a}/"),
            "Couldn't connect",
        ),
        (
            "python socket to the address",
            format!("python3 -c \"import socket; socket.create_connection(('127.0.0.2', {a}), timeout=5)\""),
            "Error",
        ),
        // Raw UDP, and DNS to an outside resolver.
        (
            "udp to a resolver",
            "python3 -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'x', ('8.8.8.8', 53)); s.settimeout(3); s.recv(10)\"".into(),
            "Network is unreachable",
        ),
        (
            "dns lookup in the sandbox",
            "getent hosts example.com || { echo \"lookup failed: $?\" >&2; exit 1; }".into(),
            "lookup failed: 2",
        ),
        // IPv6.
        (
            "ipv6 direct",
            "curl -sS --noproxy '*' -6 --max-time 5 'http://[2001:4860:4860::8888]/'".into(),
            "Couldn't connect",
        ),
        (
            "ipv6 python",
            format!("python3 -c \"import socket; s = socket.socket(socket.AF_INET6); s.settimeout(5); s.connect(('::1', {a}))\""),
            "Permission denied",
        ),
        // An allowed name in CONNECT, a denied one in the Host header: the
        // tunnel goes to the allowed host, never the denied one.
        (
            "plain request with another Host",
            format!("curl -sSf -H 'Host: gist.forge.test:{g}' http://allowed.test:{a}/"),
            "403",
        ),
        // Two Host headers, the second another host (a CDN edge may route
        // by the last one).
        (
            "two Host headers",
            format!("python3 -c \"import os, socket; p = int(os.environ['HTTP_PROXY'].rsplit(':', 1)[1]); s = socket.create_connection(('127.0.0.1', p)); s.sendall(b'GET http://allowed.test:{a}/ HTTP/1.1\\r\\nHost: allowed.test:{a}\\r\\nHost: gist.forge.test:{g}\\r\\nConnection: close\\r\\n\\r\\n'); r = s.recv(100).decode(); print(r, file=__import__('sys').stderr); exit(0 if ' 200 ' in r else 1)\""),
            "403 Forbidden",
        ),
        // A redirect to a denied host is refused when followed.
        (
            "redirect to a denied host",
            format!("curl -sSfL http://allowed.test:{a}/redirect"),
            "403",
        ),
        // MPTCP (and SMC) sockets, which landlock's TCP rules do not
        // cover: refused outright, so no other port of the namespace is
        // reachable.
        (
            "mptcp socket",
            format!("python3 -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262); s.settimeout(5); s.connect(('127.0.0.1', {a}))\""),
            "Operation not permitted",
        ),
        (
            "smc socket",
            "python3 -c \"import socket; socket.socket(socket.AF_INET, socket.SOCK_STREAM, 256)\"".into(),
            "Operation not permitted",
        ),
        // Netlink and packet sockets are not there to build a route with.
        (
            "netlink socket",
            "python3 -c \"import socket; socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\"".into(),
            "Operation not permitted",
        ),
    ];
    for (name, script, expected) in &cases {
        let started = Instant::now();
        let outcome = world.bash(script).await;
        assert_ne!(outcome.status, ExecStatus::Ok, "{name}: {outcome:?}");
        assert!(outcome.stderr.contains(expected), "{name}: {outcome:?}");
        // Fails fast, not at the wall-clock limit.
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{name} took {:?}",
            started.elapsed()
        );
    }
    // Of all that, only the redirect's first hop reached a site: the
    // request with another Host header was refused before it left.
    assert_eq!(
        world.allowed.hits(),
        [format!("GET /redirect HTTP/1.1 | allowed.test:{a}")]
    );
    // A CONNECT tunnel to an allowed name with a denied Host inside goes
    // to the allowed host, never the denied one.
    let outcome = world
        .bash(&format!(
            "curl -sSf --proxytunnel -H 'Host: gist.forge.test:{g}' http://allowed.test:{a}/"
        ))
        .await;
    assert_eq!(outcome.stdout, "hello from allowed\n", "{outcome:?}");
    assert_eq!(
        world.allowed.hits().last().map(String::as_str),
        Some(format!("GET / HTTP/1.1 | gist.forge.test:{g}").as_str())
    );
    for (name, hits) in world.untouched() {
        assert!(hits.is_empty(), "{name} was reached: {hits:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_of_tricks_are_recorded_with_their_rule() {
    let _serial = SERIAL.lock().await;
    let world = World::new().await;
    let a = world.allowed.port;
    let g = world.gist.port;
    // A CONNECT to a numeric spelling of 127.0.0.1 (curl would rewrite it
    // into dotted form itself; a raw client need not).
    let connect = "import os, socket\nport = int(os.environ['HTTP_PROXY'].rsplit(':', 1)[1])\ns = socket.create_connection(('127.0.0.1', port))\ns.sendall(b'CONNECT 2130706433:80 HTTP/1.1\\r\\nHost: 2130706433:80\\r\\n\\r\\n')\nprint(s.recv(200).decode().split('\\r\\n')[0])";
    let outcome = world
        .bash(&format!(
            "CONNECT=\"{connect}\"; curl -sSf -H 'Host: gist.forge.test:{g}' http://allowed.test:{a}/; curl -sSfL http://allowed.test:{a}/redirect; python3 -c \"$CONNECT\"; exit 0"
        ))
        .await;
    assert!(
        outcome.stdout.contains("HTTP/1.1 400 Bad Request"),
        "{outcome:?}"
    );
    let rules: Vec<(&str, EgressDecision, &str)> = outcome
        .egress
        .iter()
        .map(|r| (r.host.as_str(), r.decision, r.rule.as_str()))
        .collect();
    assert!(
        rules
            .iter()
            .any(|(host, decision, rule)| *host == "allowed.test"
                && *decision == EgressDecision::Refused
                && rule.contains("the Host header names")),
        "{rules:?}"
    );
    assert!(
        rules.contains(&(
            "allowed.test",
            EgressDecision::Allowed,
            "allow allowed.test"
        )),
        "{rules:?}"
    );
    assert!(
        rules.contains(&(
            "gist.forge.test",
            EgressDecision::Refused,
            "deny gist.forge.test"
        )),
        "{rules:?}"
    );
    assert!(
        rules
            .iter()
            .any(|(host, decision, rule)| *host == "2130706433"
                && *decision == EgressDecision::Refused
                && rule.contains("numeric spelling")),
        "{rules:?}"
    );
    assert!(world.gist.hits().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_allowlist_no_proxy_runs_and_calls_still_work() {
    let _serial = SERIAL.lock().await;
    let world = World::new().await;
    let policy = ProcessPolicy::default();
    let argv = [
        "bash".to_string(),
        "-c".to_string(),
        format!(
            "echo ${{HTTP_PROXY:-unset}}; curl -sS --max-time 5 http://127.0.0.2:{}/",
            world.allowed.port
        ),
    ];
    let outcome = world
        .sandbox
        .run(&argv, None, world.workspace.path(), &policy)
        .await;
    assert_eq!(outcome.stdout, "unset\n", "{outcome:?}");
    assert_ne!(outcome.status, ExecStatus::Ok);
    assert!(outcome.egress.is_empty());
    assert!(world.allowed.hits().is_empty());
}
