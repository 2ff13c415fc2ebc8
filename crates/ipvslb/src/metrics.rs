//! Prometheus metrics and the probes server (`/healthz`, `/readyz`, `/metrics`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, warn};

type Labels = Vec<(&'static str, String)>;

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    /// Addresses per pool, family and state (`assigned`, `available`).
    pub pool_addresses: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Services holding addresses, per pool.
    pub assignments: Family<Labels, Gauge>,
    /// Reconcile durations per controller.
    pub reconcile_duration: Family<Labels, Histogram>,
    /// Reconcile errors per controller and error kind.
    pub reconcile_errors: Family<Labels, Counter>,
    /// IPVS and address operations per kind and result.
    pub dataplane_ops: Family<Labels, Counter>,
    /// 1 while this process holds the allocator lease.
    pub leader: Gauge,
    /// IPPool status writes (each one an API request).
    pub pool_status_writes: Counter,
    ready: AtomicBool,
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ipvslb");
        let pool_addresses = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "pool_addresses",
            "Addresses per pool, family and state",
            pool_addresses.clone(),
        );
        let assignments = Family::<Labels, Gauge>::default();
        registry.register(
            "assignments",
            "Services with addresses, per pool",
            assignments.clone(),
        );
        let reconcile_duration = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 14))
        });
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile durations",
            reconcile_duration.clone(),
        );
        let reconcile_errors = Family::<Labels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconcile errors",
            reconcile_errors.clone(),
        );
        let dataplane_ops = Family::<Labels, Counter>::default();
        registry.register(
            "dataplane_ops",
            "IPVS and VIP address operations",
            dataplane_ops.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this process holds the allocator lease",
            leader.clone(),
        );
        let pool_status_writes = Counter::default();
        registry.register(
            "pool_status_writes",
            "IPPool status writes sent to the API server",
            pool_status_writes.clone(),
        );
        Self {
            registry,
            pool_status_writes,
            pool_addresses,
            assignments,
            reconcile_duration,
            reconcile_errors,
            dataplane_ops,
            leader,
            ready: AtomicBool::new(false),
        }
    }

    /// Starts timing a reconcile of `controller`; the time is recorded when the guard drops.
    pub fn reconcile_timer(&self, controller: &'static str) -> ReconcileTimer<'_> {
        ReconcileTimer {
            histogram: self
                .reconcile_duration
                .get_or_create_owned(&vec![("controller", controller.to_owned())]),
            start: Instant::now(),
            _metrics: self,
        }
    }

    /// Counts a reconcile error of `kind`.
    pub fn reconcile_error(&self, controller: &'static str, kind: &str) {
        self.reconcile_errors
            .get_or_create(&vec![
                ("controller", controller.to_owned()),
                ("error", kind.to_owned()),
            ])
            .inc();
    }

    /// Marks the process ready (or not) for `/readyz`.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Records a reconcile's duration when dropped, whatever path the reconcile took.
pub struct ReconcileTimer<'a> {
    histogram: Histogram,
    start: Instant,
    _metrics: &'a Metrics,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `addr` until the process ends. HTTP/1.0
/// without keep-alive is all probes and scrapers need.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (mut stream, peer) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match stream.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    debug!(%peer, error = %e, "probe connection failed");
                    return;
                }
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/healthz" => ("200 OK", "ok\n".to_owned()),
                "/readyz" if metrics.ready.load(Ordering::Relaxed) => {
                    ("200 OK", "ready\n".to_owned())
                }
                "/readyz" => ("503 Service Unavailable", "not ready\n".to_owned()),
                "/metrics" => ("200 OK", metrics.render()),
                _ => ("404 Not Found", "not found\n".to_owned()),
            };
            let response = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(e) = stream.write_all(response.as_bytes()).await {
                warn!(%peer, error = %e, "writing a probe answer failed");
            }
        });
    }
}
