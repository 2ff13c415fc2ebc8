//! The probes and metrics server: `/healthz`, `/readyz` and `/metrics` over HTTP/1.
//!
//! Probes and scrapers are trusted but the port may not be: a client that connects and sends
//! nothing, or a byte a second, or garbage, must cost a bounded time and one of a bounded number
//! of connections, and never stop the answers to the kubelet.

pub mod health;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info_span, warn};

use crate::metrics::Metrics;

pub use health::{Health, Heartbeat};

/// Limits of the server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A client must have sent its request head within this.
    pub header_read: Duration,
    /// A whole connection (one request: no keep-alive) ends after this.
    pub connection: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(5),
            connection: Duration::from_secs(10),
            connections: 64,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[error("binding the probes server to {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Binds `addr`; the returned future serves until dropped.
pub async fn bind(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    limits: Limits,
) -> Result<impl Future<Output = ()> + Send, BindError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })?;
    Ok(serve(listener, metrics, limits))
}

async fn serve(listener: TcpListener, metrics: Arc<Metrics>, limits: Limits) {
    let permits = Arc::new(Semaphore::new(limits.connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .keep_alive(false);
    let mut failing = false;
    loop {
        // Waiting for a permit before accepting leaves the excess in the kernel's backlog.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                failing = false;
                accepted
            }
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was accepted:
                // neither is a reason to stop answering probes. The pause lets idle
                // connections time out and give descriptors back; one line per run of
                // failures keeps the log readable.
                if !failing {
                    warn!(error = %e, "accepting a probe connection failed; retrying");
                }
                failing = true;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let connection = http.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |request| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&request, &metrics)) }
            }),
        );
        let span = info_span!("probe", %peer);
        tokio::spawn(
            async move {
                match tokio::time::timeout(limits.connection, connection).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(error = %e, "probe connection failed"),
                    Err(_) => debug!("probe connection timed out"),
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
}

fn answer(request: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, body) = match request.uri().path() {
        "/healthz" => verdict(metrics.health.live(), "ok"),
        "/readyz" => verdict(metrics.health.ready(), "ready"),
        "/metrics" => (StatusCode::OK, metrics.render()),
        "/status" => match metrics.status.render() {
            Some(json) => (StatusCode::OK, json),
            None => (
                StatusCode::NOT_FOUND,
                "no director runs in this process\n".to_owned(),
            ),
        },
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

fn verdict(result: Result<(), String>, good: &str) -> (StatusCode, String) {
    match result {
        Ok(()) => (StatusCode::OK, format!("{good}\n")),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}
