//! Prometheus metrics, and the health every loop reports to (served by [`crate::server`]).

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::server::Health;
use crate::server::health::InFlight;

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
    /// Services of ours the allocator refused for now (no address fits), waiting for one.
    pub services_pending: Gauge,
    /// Kernel writes the director's full pass made (drift repaired, stale entries collected).
    pub full_pass_repairs: Counter,
    /// Per health-check target (node address and port): 1 up, 0 down. One series per target
    /// this director checks: nodes times the distinct ports their checks probe.
    pub backend_up: Family<Labels, Gauge>,
    /// Health transitions per target and new state.
    pub backend_transitions: Family<Labels, Counter>,
    /// When each target last changed state (Unix seconds).
    pub backend_last_transition: Family<Labels, Gauge<f64, AtomicU64>>,
    /// The kernel's counters of ipvslb's own destinations, by counter (`connections`,
    /// `in_packets`, `out_packets`, `in_bytes`, `out_bytes`), virtual service and destination.
    pub destination_counters: Family<Labels, Counter>,
    /// Destinations left out of `destination_counters` by `--max-destination-metrics`.
    pub destination_counters_left_out: Gauge,
    /// How long probes took (failed ones included, up to their timeout).
    pub probe_duration: Histogram,
    /// 1 while `/readyz` would answer 200; set as `/metrics` is rendered.
    ready: Gauge,
    /// Liveness and readiness. Here because every loop already holds the metrics.
    pub health: Health,
    /// The director's own account of what it wants, for `/status`.
    pub status: crate::status::Board,
}

/// The kernel's counters of one destination, by the name each has in `ipvslb_destination`.
fn named(stats: &ipvslb_ipvs::Stats) -> [(&'static str, u64); 5] {
    [
        ("connections", stats.connections),
        ("in_packets", stats.in_packets),
        ("out_packets", stats.out_packets),
        ("in_bytes", stats.in_bytes),
        ("out_bytes", stats.out_bytes),
    ]
}

impl Metrics {
    /// Mirrors the kernel's counters of the first `max` destinations (in key order) into
    /// `destination_counters`, and removes the series of those no longer there. `exported`
    /// holds the label sets of the last call.
    pub fn export_counters(
        &self,
        counters: &std::collections::BTreeMap<
            (ipvslb_ipvs::ServiceKey, ipvslb_ipvs::DestKey),
            ipvslb_ipvs::Stats,
        >,
        max: usize,
        exported: &mut std::collections::BTreeSet<Labels>,
    ) {
        let mut now = std::collections::BTreeSet::new();
        for ((key, dest), stats) in counters.iter().take(max) {
            let destination = ipvslb_ipvs::SocketDisplay(dest.address, dest.port).to_string();
            for (counter, value) in named(stats) {
                let labels: Labels = vec![
                    ("counter", counter.to_owned()),
                    ("service", key.to_string()),
                    ("destination", destination.clone()),
                ];
                let series = self.destination_counters.get_or_create(&labels);
                let seen = series.get();
                if value >= seen {
                    series.inc_by(value - seen);
                } else {
                    // The kernel's entry was made anew: so is the series.
                    drop(series);
                    self.destination_counters.remove(&labels);
                    self.destination_counters
                        .get_or_create(&labels)
                        .inc_by(value);
                }
                now.insert(labels);
            }
        }
        for gone in exported.difference(&now) {
            self.destination_counters.remove(gone);
        }
        *exported = now;
        self.destination_counters_left_out
            .set(counters.len().saturating_sub(max) as i64);
    }

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
        let services_pending = Gauge::default();
        registry.register(
            "services_pending",
            "Services the allocator could not give addresses yet",
            services_pending.clone(),
        );
        let full_pass_repairs = Counter::default();
        registry.register(
            "full_pass_repairs",
            "Kernel writes the director's full pass made: drift repaired, stale entries collected",
            full_pass_repairs.clone(),
        );
        let backend_up = Family::<Labels, Gauge>::default();
        registry.register(
            "backend_up",
            "1 while a health-check target (node address, port) passes its checks, 0 while down",
            backend_up.clone(),
        );
        let backend_transitions = Family::<Labels, Counter>::default();
        registry.register(
            "backend_transitions",
            "Health transitions of check targets, by new state",
            backend_transitions.clone(),
        );
        let backend_last_transition = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "backend_last_transition_timestamp_seconds",
            "When a health-check target last changed state, in Unix seconds",
            backend_last_transition.clone(),
        );
        let destination_counters = Family::<Labels, Counter>::default();
        registry.register(
            "destination",
            "The kernel's IPVS counters of ipvslb's own destinations (refreshed by each full pass)",
            destination_counters.clone(),
        );
        let destination_counters_left_out = Gauge::default();
        registry.register(
            "destination_metrics_left_out",
            "Destinations whose kernel counters are not exported, past --max-destination-metrics",
            destination_counters_left_out.clone(),
        );
        let probe_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "probe_duration_seconds",
            "Health probe durations",
            probe_duration.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 while /readyz answers 200 (every watch cache filled and streaming)",
            ready.clone(),
        );
        Self {
            registry,
            pool_status_writes,
            services_pending,
            full_pass_repairs,
            ready,
            backend_up,
            backend_transitions,
            backend_last_transition,
            destination_counters,
            destination_counters_left_out,
            probe_duration,
            pool_addresses,
            assignments,
            reconcile_duration,
            reconcile_errors,
            dataplane_ops,
            leader,
            health: Health::default(),
            status: crate::status::Board::default(),
        }
    }

    /// Starts timing a reconcile of `controller`; the time is recorded when the guard drops.
    pub fn reconcile_timer(&self, controller: &'static str) -> ReconcileTimer<'_> {
        ReconcileTimer {
            histogram: self
                .reconcile_duration
                .get_or_create_owned(&vec![("controller", controller.to_owned())]),
            start: Instant::now(),
            _in_flight: self.health.reconcile(controller),
            _metrics: std::marker::PhantomData,
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

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        self.ready.set(i64::from(self.health.ready().is_ok()));
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
    _in_flight: InFlight,
    _metrics: std::marker::PhantomData<&'a Metrics>,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use ipvslb_ipvs::{DestKey, Protocol, ServiceKey, Stats};

    use super::Metrics;

    fn dest(last: u8) -> DestKey {
        DestKey {
            address: std::net::IpAddr::from([10, 240, 0, last]),
            port: 80,
        }
    }

    #[test]
    fn kernel_counters_follow_the_kernel_within_the_bound_and_leave_with_their_destination() {
        let metrics = Metrics::new();
        let key = ServiceKey::addr("10.240.0.210".parse().unwrap(), Protocol::Tcp, 80);
        let stats = |connections| Stats {
            connections,
            ..Stats::default()
        };
        let mut exported = BTreeSet::new();
        let two: BTreeMap<_, _> =
            [((key, dest(101)), stats(5)), ((key, dest(102)), stats(7))].into();
        metrics.export_counters(&two, 1, &mut exported);
        let text = metrics.render();
        let series = r#"ipvslb_destination_total{counter="connections",service="TCP 10.240.0.210:80",destination="10.240.0.101:80"}"#;
        assert!(text.contains(&format!("{series} 5")), "{text}");
        assert!(!text.contains("10.240.0.102:80"), "past the bound: {text}");
        assert!(
            text.contains("ipvslb_destination_metrics_left_out 1"),
            "{text}"
        );
        // The kernel counts on, then the entry is made anew (its counters start again).
        let more: BTreeMap<_, _> = [((key, dest(101)), stats(9))].into();
        metrics.export_counters(&more, 1, &mut exported);
        assert!(metrics.render().contains(&format!("{series} 9")));
        let anew: BTreeMap<_, _> = [((key, dest(101)), stats(2))].into();
        metrics.export_counters(&anew, 1, &mut exported);
        assert!(metrics.render().contains(&format!("{series} 2")));
        metrics.export_counters(&BTreeMap::new(), 1, &mut exported);
        assert!(
            !metrics.render().contains("10.240.0.101:80"),
            "gone with its destination"
        );
    }
}
