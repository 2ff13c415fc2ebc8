//! The director's health checks: which targets its plans need ([`Checks`], filled by every
//! plan), the probes ([`run`], driving the core's sans-IO [`Monitor`]), and what is down, which
//! the next plans leave out. A transition requeues the Services whose destinations it concerns;
//! their converge drains the failed destination at weight 0.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use ipvslb_core::ServiceName;
use ipvslb_core::health::{Health, Monitor, Probe, Target};
use kube::runtime::reflector::ObjectRef;
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, info, warn};

use crate::cached::CachedService;
use crate::metrics::Metrics;

/// The targets each Service's plan needs, and the ones that are down.
#[derive(Debug, Default)]
pub struct Checks {
    state: Mutex<Registry>,
    /// Wakes the prober when the targets change.
    changed: Notify,
}

#[derive(Debug, Default)]
struct Registry {
    by_service: BTreeMap<ServiceName, BTreeSet<Target>>,
    down: BTreeSet<Target>,
}

impl Checks {
    /// The targets that are down now, for a plan.
    pub fn down(&self) -> BTreeSet<Target> {
        self.state
            .lock()
            .map(|s| s.down.clone())
            .unwrap_or_default()
    }

    /// Records what `service`'s latest plan checks (nothing: it is not checked, or gone).
    pub fn register(&self, service: &ServiceName, targets: BTreeSet<Target>) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let before = if targets.is_empty() {
            state.by_service.remove(service)
        } else {
            state.by_service.insert(service.clone(), targets.clone())
        };
        if before.unwrap_or_default() != targets {
            drop(state);
            self.changed.notify_one();
        }
    }

    /// Records what a full plan checks, for every Service at once.
    pub fn register_all(&self, all: BTreeMap<ServiceName, BTreeSet<Target>>) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if state.by_service != all {
            state.by_service = all;
            drop(state);
            self.changed.notify_one();
        }
    }

    /// Every target some Service needs; forgets the state of those none needs any more.
    fn wanted(&self) -> BTreeSet<Target> {
        let Ok(mut state) = self.state.lock() else {
            return BTreeSet::new();
        };
        let wanted: BTreeSet<Target> = state.by_service.values().flatten().cloned().collect();
        state.down.retain(|t| wanted.contains(t));
        wanted
    }

    /// Records `target`'s new state; returns the Services that check it.
    fn set(&self, target: &Target, health: Health) -> Vec<ServiceName> {
        let Ok(mut state) = self.state.lock() else {
            return Vec::new();
        };
        match health {
            Health::Down => state.down.insert(target.clone()),
            Health::Up => state.down.remove(target),
        };
        state
            .by_service
            .iter()
            .filter(|(_, targets)| targets.contains(target))
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// Settings of the prober.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// At most this many probes at once.
    pub max_in_flight: usize,
}

/// Probes what `checks` asks for until `shutdown`, recording transitions in `checks` and
/// requeueing the Services they concern.
pub async fn run(
    checks: Arc<Checks>,
    config: Config,
    requeue: futures::channel::mpsc::UnboundedSender<ObjectRef<CachedService>>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let seed = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let mut monitor = Monitor::new(config.max_in_flight, seed);
    let (done_tx, mut done) = mpsc::unbounded_channel::<(Target, bool, Duration)>();
    let mut known: BTreeSet<Target> = BTreeSet::new();
    loop {
        let wanted = checks.wanted();
        if wanted != known {
            for gone in known.difference(&wanted) {
                metrics.backend_up.remove(&labels(gone));
                metrics.backend_last_transition.remove(&labels(gone));
            }
            for new in wanted.difference(&known) {
                metrics.backend_up.get_or_create(&labels(new)).set(1);
            }
            monitor.set_targets(wanted.clone(), Instant::now());
            known = wanted;
        }
        for target in monitor.due(Instant::now()) {
            let done = done_tx.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let healthy = probe(&target).await;
                let _ = done.send((target, healthy, started.elapsed()));
            });
        }
        let wake = monitor
            .next_due()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            Some((target, healthy, took)) = done.recv() => {
                metrics.probe_duration.observe(took.as_secs_f64());
                if let Some(transition) = monitor.finished(&target, healthy, Instant::now()) {
                    let health = transition.health;
                    let state = if health == Health::Up { "up" } else { "down" };
                    let (address, port) = (target.address, target.port);
                    match health {
                        Health::Down => warn!(%address, port, "health check failed: draining"),
                        Health::Up => info!(%address, port, "health check passes again"),
                    }
                    metrics.backend_up.get_or_create(&labels(&target)).set(i64::from(health == Health::Up));
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or_default();
                    metrics.backend_last_transition.get_or_create(&labels(&target)).set(now);
                    let mut by_state = labels(&target);
                    by_state.push(("state", state.to_owned()));
                    metrics.backend_transitions.get_or_create(&by_state).inc();
                    for name in checks.set(&target, health) {
                        let _ = requeue.unbounded_send(CachedService::reference(&name));
                    }
                }
            }
            _ = checks.changed.notified() => {}
            _ = tokio::time::sleep_until(wake) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

fn labels(target: &Target) -> Vec<(&'static str, String)> {
    vec![
        ("address", target.address.to_string()),
        ("port", target.port.to_string()),
    ]
}

/// One probe: a TCP connect, and for HTTP a `GET` answered 2xx or 3xx, within the timeout.
async fn probe(target: &Target) -> bool {
    let addr = SocketAddr::new(target.address, target.port);
    let attempt = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        match &target.check.probe {
            Probe::Tcp => Ok(()),
            Probe::Http { path, host } => http_get(stream, addr, path, host.as_deref()).await,
        }
    };
    match tokio::time::timeout(target.check.timeout, attempt).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            debug!(%addr, error = %e, "probe failed");
            false
        }
        Err(_) => {
            debug!(%addr, timeout = ?target.check.timeout, "probe timed out");
            false
        }
    }
}

async fn http_get(
    stream: TcpStream,
    addr: SocketAddr,
    path: &str,
    host: Option<&str>,
) -> Result<(), String> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let connection = crate::AbortOnDrop(tokio::spawn(connection));
    let host = host.map_or_else(|| addr.to_string(), str::to_owned);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "ipvslb-health-check")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    drop(connection);
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}
