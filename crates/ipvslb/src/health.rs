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
    /// Bumped whenever `by_service` changes, so the prober recomputes the union only then.
    generation: u64,
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
            state.generation += 1;
            drop(state);
            self.changed.notify_one();
        }
    }

    /// What a full plan (from a view that may be older than the latest per-Service plans)
    /// checks: it fills in the Services not registered yet and forgets those not in
    /// `existing` any more, and leaves every other registration as its own plan made it.
    pub fn register_missing(
        &self,
        all: BTreeMap<ServiceName, BTreeSet<Target>>,
        existing: &BTreeSet<ServiceName>,
    ) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let before = state.by_service.len();
        state.by_service.retain(|name, _| existing.contains(name));
        let mut changed = state.by_service.len() != before;
        for (name, targets) in all {
            if !targets.is_empty() && !state.by_service.contains_key(&name) {
                state.by_service.insert(name, targets);
                changed = true;
            }
        }
        if changed {
            state.generation += 1;
            drop(state);
            self.changed.notify_one();
        }
    }

    /// Every target some Service needs, if the registrations changed since `generation`.
    fn wanted_since(&self, generation: u64) -> Option<(u64, BTreeSet<Target>)> {
        let state = self.state.lock().ok()?;
        (state.generation != generation).then(|| {
            (
                state.generation,
                state.by_service.values().flatten().cloned().collect(),
            )
        })
    }

    /// Makes `down` what is down; returns the Services checking a target whose state changed.
    fn set_down(&self, down: BTreeSet<Target>) -> BTreeSet<ServiceName> {
        let Ok(mut state) = self.state.lock() else {
            return BTreeSet::new();
        };
        let changed: BTreeSet<Target> = state.down.symmetric_difference(&down).cloned().collect();
        state.down = down;
        state
            .by_service
            .iter()
            .filter(|(_, targets)| targets.iter().any(|t| changed.contains(t)))
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
    // Directors must not all probe a node at the same instant: each spreads its own way.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id());
    let mut monitor = Monitor::new(config.max_in_flight, seed);
    let (done_tx, mut done) = mpsc::unbounded_channel::<(Target, bool, Duration)>();
    let mut known: BTreeSet<Target> = BTreeSet::new();
    let mut generation = 0;
    loop {
        if let Some((seen, wanted)) = checks.wanted_since(generation) {
            generation = seen;
            monitor.set_targets(wanted.clone(), Instant::now());
            for gone in known.difference(&wanted) {
                forget_series(&metrics, gone);
            }
            for target in &wanted {
                let up = monitor.health(target) != Some(Health::Down);
                metrics
                    .backend_up
                    .get_or_create(&labels(target))
                    .set(i64::from(up));
            }
            known = wanted;
            // A target that came back remembered as down is down for the plans too.
            for name in checks.set_down(monitor.down()) {
                let _ = requeue.unbounded_send(CachedService::reference(&name));
            }
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
                    for name in checks.set_down(monitor.down()) {
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

/// Removes every series of a target no plan needs any more.
fn forget_series(metrics: &Metrics, target: &Target) {
    let base = labels(target);
    metrics.backend_up.remove(&base);
    metrics.backend_last_transition.remove(&base);
    for state in ["up", "down"] {
        let mut by_state = base.clone();
        by_state.push(("state", state.to_owned()));
        metrics.backend_transitions.remove(&by_state);
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
