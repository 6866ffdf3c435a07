//! The accept loop: each connection served by hyper's HTTP/1 server with
//! the router, under bounds that `axum::serve` leaves out, since the
//! service's port is open to any local process (sandboxed code with
//! `network = "full"` included) before any token is checked:
//!
//! * at most [`MAX_CONNECTIONS`] at once: past it, new connections wait in
//!   the kernel's backlog rather than take the process's file descriptors
//!   (which transcripts, sandbox pipes and state files need);
//! * a request's head must arrive within [`HEADER_READ_TIMEOUT`] (hyper's
//!   timer runs for each request, so a connection that stalls mid-head,
//!   or idles between requests, is closed);
//! * at shutdown, connections are asked to close once their response is
//!   done, and any still open [`CLOSE_MARGIN`] later are left behind, so a
//!   stalled client never keeps the server from saving its sessions.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;

/// How long a request's head may take to arrive (also: how long an open
/// connection may sit idle between requests).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long connections get to close once the server has stopped.
pub const CLOSE_MARGIN: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `stopping` resolves, then lets the
/// open connections finish their responses for at most [`CLOSE_MARGIN`].
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    max_connections: usize,
    stopping: impl Future<Output = ()>,
) {
    let places = Arc::new(Semaphore::new(max_connections.max(1)));
    let closing = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(stopping);
    loop {
        let place = tokio::select! {
            place = Arc::clone(&places).acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => break,
            },
            () = &mut stopping => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of descriptors, or a connection reset before it
                    // was accepted: wait a little rather than spin.
                    tracing::warn!(%err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stopping => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let closing = closing.clone();
        // Finished connections' tasks are collected as new ones come.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            let _place = place;
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let router = router.clone();
                async move {
                    Ok::<_, Infallible>(match router.oneshot(request.map(Body::new)).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    })
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                () = closing.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = served {
                tracing::debug!(%err, "a connection ended with an error");
            }
        });
    }
    drop(listener);
    closing.cancel();
    let closed = tokio::time::timeout(CLOSE_MARGIN, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if closed.is_err() {
        tracing::warn!(
            open = tasks.len(),
            "connections still open {} s after shutdown are closed",
            CLOSE_MARGIN.as_secs()
        );
        tasks.abort_all();
    }
}
