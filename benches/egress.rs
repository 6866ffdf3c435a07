//! The cost of the egress proxy hop: 100 small HTTP requests, each on a
//! fresh connection, sent straight to a loopback server and through the
//! proxy (plain HTTP in absolute form, and a `CONNECT` tunnel), in the
//! same run, interleaved round by round so that drift on a busy machine
//! hits every way alike. Printed as totals and as ratios over direct.
//!
//! ```sh
//! cargo bench --workspace --bench egress   # BENCH_ROUNDS=10 for more
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stack_egress::{EgressProxy, EgressRules};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const REQUESTS: usize = 100;

/// A loopback HTTP server answering every request with a small body.
async fn serve(listener: TcpListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let mut buf = [0u8; 512];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let body = "hello from the bench site\n";
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Sends `prefix` (a CONNECT, or nothing) and then one request, reads the
/// answer to the end; returns its length.
async fn fetch(to: SocketAddr, connect: Option<&str>, request: &str) -> usize {
    let mut stream = TcpStream::connect(to).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    if let Some(connect) = connect {
        stream.write_all(connect.as_bytes()).await.expect("CONNECT");
        // The proxy's 200 (headers only) before the tunnel carries bytes.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.expect("CONNECT reply");
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
    }
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("answer");
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    answer.len()
}

fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let site = TcpListener::bind("127.0.0.2:0").await.expect("bind the site");
        let site_addr = site.local_addr().expect("addr");
        tokio::spawn(serve(site));
        let rules = EgressRules::new(&["site.test", "127.0.0.2"], &[])
            .expect("rules")
            .pin("site.test", site_addr.ip())
            .expect("pin");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let proxy_addr = listener.local_addr().expect("addr");
        let proxy = EgressProxy::start(listener, rules.into()).expect("proxy");
        let port = site_addr.port();
        let direct = format!("GET / HTTP/1.1\r\nHost: site.test:{port}\r\nConnection: close\r\n\r\n");
        let absolute = format!(
            "GET http://site.test:{port}/ HTTP/1.1\r\nHost: site.test:{port}\r\nConnection: close\r\n\r\n"
        );
        let connect = format!("CONNECT site.test:{port} HTTP/1.1\r\nHost: site.test:{port}\r\n\r\n");
        let ways: [(&str, SocketAddr, Option<&str>, &str); 3] = [
            ("direct to loopback", site_addr, None, &direct),
            ("proxy, plain HTTP", proxy_addr, None, &absolute),
            ("proxy, CONNECT tunnel", proxy_addr, Some(&connect), &direct),
        ];
        // Warm up each way once.
        for (_, to, prefix, request) in &ways {
            fetch(*to, *prefix, request).await;
        }
        let mut totals = [Duration::ZERO; 3];
        for round in 0..rounds {
            for offset in 0..ways.len() {
                let index = (round + offset) % ways.len();
                let (_, to, prefix, request) = ways[index];
                let started = Instant::now();
                for _ in 0..REQUESTS {
                    fetch(to, prefix, request).await;
                }
                totals[index] += started.elapsed();
            }
        }
        let report = proxy.finish().await;
        println!(
            "egress proxy hop: {REQUESTS} small HTTP requests, one connection each, {rounds} rounds interleaved ({} connections recorded)",
            report.records.len() + report.dropped as usize
        );
        println!("{:<24} {:>14} {:>12} {:>10}", "way", "per 100 (ms)", "per req (µs)", "ratio");
        let base = totals[0].as_secs_f64() / rounds as f64;
        for ((name, ..), total) in ways.iter().zip(totals) {
            let per_hundred = total.as_secs_f64() / rounds as f64;
            println!(
                "{:<24} {:>14.1} {:>12.0} {:>9.2}x",
                name,
                per_hundred * 1e3,
                per_hundred * 1e6 / REQUESTS as f64,
                per_hundred / base
            );
        }
    });
}
