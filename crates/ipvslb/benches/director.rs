//! The director at cluster scale, on the in-memory data plane and with no API server: the
//! reflectors' stores are filled directly and the director's own planning and converging code
//! runs over them, as its reconciles and full passes run it. Clusters of 1,000 and 10,000
//! Services over 100 and 500 nodes, each with an EndpointSlice, in ten zones (a NodeSet and a
//! pool each, so a Service's VIP goes to the nodes of its zone); measured:
//!
//! - (a) one Service change (its port), reconciled: the median CPU time of 2,000;
//! - (b) one node flap, NotReady and back: the reconciles of the Services the two Node
//!   changes requeue, as the director runs them;
//! - (c) a full pass (the same table: nothing to repair).
//!
//! Each as CPU time of this thread and as requests to the data plane. Printed last, the ratios:
//! `one change 10k/1k` (target near 1: a change costs its Service, whatever the cluster's
//! size), `flap/full pass` (target at most 1) and `flap writes/changed destinations` (target 1).
//!
//! `cargo bench -p ipvslb --bench director` (`-- --quick`: the 1,000-Service clusters only).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cpu_time::ThreadTime;
use ipvslb::cached::CachedService;
use ipvslb::converge::{Converger, Owned};
use ipvslb::dataplane::{self, Dataplane, Memory};
use ipvslb::director::keys_by_service;
use ipvslb::translate::{ClassPolicy, Unclassed, trim_node};
use ipvslb::view::{Cluster, Stores};
use ipvslb_api::{IPPool, LABEL_SERVICE_NAME, NodeSet};
use ipvslb_ipvs::{Op, ServiceEntry, ServiceKey, Table};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, store::Writer};
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;
use serde_json::json;

/// Zones of the main clusters; the worst case has one NodeSet for every node.
const ZONES: usize = 10;
/// Services changed per cluster (each twice: to another port and back), one after another.
const CHANGES: usize = 1000;

/// The in-memory data plane, counting what is asked of it: a kernel answers each lookup and
/// each dump with netlink requests of its own.
#[derive(Default)]
struct Counting {
    inner: Memory,
    lookups: AtomicU64,
    dumps: AtomicU64,
}

impl Dataplane for Counting {
    fn dump(&self, owned: &Owned) -> Result<Table, dataplane::Error> {
        self.dumps.fetch_add(1, Ordering::Relaxed);
        self.inner.dump(owned)
    }
    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceEntry>, dataplane::Error> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        self.inner.service(key)
    }
    fn apply(&self, ops: &[Op]) -> Result<(), dataplane::Error> {
        self.inner.apply(ops)
    }
    fn addresses(&self) -> Result<BTreeSet<IpAddr>, dataplane::Error> {
        self.inner.addresses()
    }
    fn add_address(&self, address: IpAddr) -> Result<(), dataplane::Error> {
        self.inner.add_address(address)
    }
    fn del_address(&self, address: IpAddr) -> Result<(), dataplane::Error> {
        self.inner.del_address(address)
    }
    fn announces(&self) -> ipvslb_api::Announce {
        self.inner.announces()
    }
    fn announced(&self) -> Result<Option<BTreeSet<IpAddr>>, dataplane::Error> {
        self.inner.announced()
    }
    fn announce(&self, address: IpAddr) -> Result<(), dataplane::Error> {
        self.inner.announce(address)
    }
    fn withdraw(&self, address: IpAddr) -> Result<(), dataplane::Error> {
        self.inner.withdraw(address)
    }
    fn writes(&self) -> u64 {
        self.inner.writes()
    }
}

/// What was asked of the data plane between two readings.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Requests {
    lookups: u64,
    dumps: u64,
    writes: u64,
}

impl Counting {
    fn requests(&self) -> Requests {
        Requests {
            lookups: self.lookups.load(Ordering::Relaxed),
            dumps: self.dumps.load(Ordering::Relaxed),
            writes: self.writes(),
        }
    }
}

impl std::ops::Sub for Requests {
    type Output = Requests;
    fn sub(self, before: Requests) -> Requests {
        Requests {
            lookups: self.lookups - before.lookups,
            dumps: self.dumps - before.dumps,
            writes: self.writes - before.writes,
        }
    }
}

impl std::fmt::Display for Requests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} lookups, {} dumps, {} writes",
            self.lookups, self.dumps, self.writes
        )
    }
}

fn object<K: DeserializeOwned>(value: serde_json::Value) -> K {
    serde_json::from_value(value).expect("a valid object")
}

fn apply<K>(writer: &mut Writer<K>, object: K)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    writer.apply_watcher_event(&watcher::Event::Apply(object));
}

/// Service `s{i}` is in zone `i % zones`, whose pool is 10.(200 + zone).0.0/16.
fn vip(service: usize, zones: usize) -> Ipv4Addr {
    let (zone, k) = (service % zones, service / zones);
    Ipv4Addr::new(10, 200 + zone as u8, (k / 250) as u8, (k % 250 + 1) as u8)
}

fn service(i: usize, zones: usize, port: u16) -> CachedService {
    let mut cached: CachedService = object(json!({
        "metadata": {"name": format!("s{i}"), "namespace": "bench", "uid": format!("uid-{i}"),
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"type": "LoadBalancer", "ports": [{"port": port, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": vip(i, zones).to_string()}]}}
    }));
    cached.trim();
    cached
}

fn pool(zone: usize) -> IPPool {
    object(json!({
        "apiVersion": "ipvslb.io/v1alpha1", "kind": "IPPool",
        "metadata": {"name": format!("z{zone}")},
        "spec": {"addresses": [format!("10.{}.0.0/16", 200 + zone)], "nodeSet": format!("z{zone}")}
    }))
}

fn node_set(zone: usize) -> NodeSet {
    object(json!({
        "apiVersion": "ipvslb.io/v1alpha1", "kind": "NodeSet",
        "metadata": {"name": format!("z{zone}")},
        "spec": {"nodeSelector": {"matchLabels": {"zone": format!("z{zone}")}},
                 "forwarding": "DirectRouting"}
    }))
}

fn node(i: usize, zones: usize, ready: bool) -> Node {
    let mut node: Node = object(json!({
        "metadata": {"name": format!("n{i}"),
                     "labels": {"zone": format!("z{}", i % zones), "kubernetes.io/hostname": format!("n{i}")}},
        "status": {
            "addresses": [{"type": "InternalIP",
                           "address": Ipv4Addr::from(0xc0a8_0000 + i as u32).to_string()}],
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
        }
    }));
    trim_node(&mut node);
    node
}

/// Three pods of Service `i` on nodes of its zone.
fn slice(i: usize, zones: usize, nodes: usize) -> EndpointSlice {
    let zone_nodes = nodes / zones;
    let endpoints: Vec<_> = (0..3)
        .map(|k| {
            let node = ((i / zones + k) % zone_nodes) * zones + i % zones;
            json!({"addresses": [format!("10.32.{}.{}", k, i % 250)], "nodeName": format!("n{node}")})
        })
        .collect();
    object(json!({
        "metadata": {"name": format!("s{i}-abcde"), "namespace": "bench",
                     "labels": {LABEL_SERVICE_NAME: format!("s{i}")}},
        "addressType": "IPv4",
        "endpoints": endpoints
    }))
}

struct Bench {
    zones: usize,
    cluster: Cluster,
    converger: Converger<Counting>,
    services: Writer<CachedService>,
    nodes: Writer<Node>,
}

fn build(services: usize, nodes: usize, zones: usize) -> Bench {
    let (service_store, mut service_writer) = reflector::store();
    let (pools, mut pools_writer) = reflector::store();
    let (node_sets, mut node_sets_writer) = reflector::store();
    let (node_store, mut nodes_writer) = reflector::store();
    let (slices, mut slices_writer) = reflector::store();
    for zone in 0..zones {
        apply(&mut pools_writer, pool(zone));
        apply(&mut node_sets_writer, node_set(zone));
    }
    for i in 0..nodes {
        apply(&mut nodes_writer, node(i, zones, true));
    }
    for i in 0..services {
        apply(&mut service_writer, service(i, zones, 80));
        apply(&mut slices_writer, slice(i, zones, nodes));
    }
    let classes = ClassPolicy {
        class: "ipvslb.io/ipvs".into(),
        unclassed: Unclassed::Serve,
    };
    let cluster = Cluster::new(
        classes,
        Stores {
            services: service_store,
            pools,
            node_sets,
            nodes: node_store,
            slices,
        },
    );
    // The ends of the first lists, as the watches report them.
    cluster.node_event(&Event::InitDone);
    cluster.slice_event(&Event::InitDone);
    Bench {
        zones,
        cluster,
        converger: Converger::new(Counting::default(), Duration::from_secs(30)),
        services: service_writer,
        nodes: nodes_writer,
    }
}

impl Bench {
    /// A full pass, as the director runs it.
    fn full_pass(&self) -> Requests {
        let before = self.converger.dataplane().requests();
        let since = self.converger.generation().expect("a generation");
        let (view, plan) = self.cluster.plan_all(&BTreeSet::new());
        let by_service = keys_by_service(&plan);
        let report = self
            .converger
            .converge_all(&plan.table, by_service, &view.owned, since, Instant::now())
            .expect("the full pass converges");
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        self.converger.dataplane().requests() - before
    }

    /// The reconcile of Service `s{i}`, as the director runs it.
    fn reconcile(&self, i: usize) {
        let reference = ObjectRef::new(&format!("s{i}")).within("bench");
        let cached = self.cluster.services().get(&reference).expect("a Service");
        let seen = self.converger.generation().expect("a generation");
        let plan = self
            .cluster
            .plan_service(&cached.to_service(), &BTreeSet::new());
        let report = self
            .converger
            .converge_service(
                &cached.service_name(),
                &plan.part.table,
                &plan.view.owned,
                seen,
                Instant::now(),
            )
            .expect("the Service converges");
        assert!(report.failures.is_empty(), "{:?}", report.failures);
    }

    /// Node `n{i}` written with `ready`, and the reconciles its change requeues.
    fn node_change(&mut self, i: usize, ready: bool) -> usize {
        let event = Event::Apply(node(i, self.zones, ready));
        self.nodes.apply_watcher_event(&event);
        let requeued = self.cluster.node_event(&event);
        for reference in &requeued {
            let index = reference.name[1..].parse().expect("a bench Service");
            self.reconcile(index);
        }
        requeued.len()
    }
}

fn timed<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let started = ThreadTime::now();
    let out = f();
    (started.elapsed(), out)
}

/// The figures of one cluster.
struct Figures {
    change: Duration,
    change_requests: Requests,
    flap: Duration,
    flap_requests: Requests,
    flap_requeued: usize,
    changed_destinations: u64,
    full_pass: Duration,
    full_requests: Requests,
}

fn measure(services: usize, nodes: usize, zones: usize) -> Figures {
    let mut bench = build(services, nodes, zones);
    // The first pass programs the table; the one timed finds nothing to do.
    let first = bench.full_pass();
    let destinations = bench.converger.dataplane().inner.dump(&Owned::default());
    let table = destinations.expect("the table");
    assert_eq!(
        table.service_count(),
        services,
        "one virtual service per Service"
    );
    assert_eq!(
        table.destination_count(),
        services * (nodes / zones),
        "every node of a Service's zone is a destination"
    );
    eprintln!("  programmed: {first}");
    let (full_pass, full_requests) = timed(|| bench.full_pass());
    assert_eq!(
        full_requests.writes, 0,
        "a full pass at rest writes nothing"
    );

    // (a) a Service's port changes, and back: 2 x CHANGES reconciles.
    let before = bench.converger.dataplane().requests();
    let mut changes = Vec::with_capacity(2 * CHANGES);
    for round in 0..CHANGES {
        let i = (round * 7919) % services;
        for port in [8080, 80] {
            apply(&mut bench.services, service(i, zones, port));
            changes.push(timed(|| bench.reconcile(i)).0);
        }
    }
    let change_requests = bench.converger.dataplane().requests() - before;
    // The median: a machine shared with other work makes some changes slow, not all.
    changes.sort();
    let change = changes[changes.len() / 2];

    // (b) one node goes NotReady and comes back: its Services' destinations drain to weight
    // 0 and return.
    let flapping = nodes / 2;
    let zone_services = (flapping % zones..services).step_by(zones).count() as u64;
    let before = bench.converger.dataplane().requests();
    let (flap, flap_requeued) =
        timed(|| bench.node_change(flapping, false) + bench.node_change(flapping, true));
    let flap_requests = bench.converger.dataplane().requests() - before;
    Figures {
        change,
        change_requests: Requests {
            lookups: change_requests.lookups / (2 * CHANGES) as u64,
            dumps: change_requests.dumps,
            writes: change_requests.writes / (2 * CHANGES) as u64,
        },
        flap,
        flap_requests,
        flap_requeued,
        changed_destinations: 2 * zone_services,
        full_pass,
        full_requests,
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut clusters = vec![(1_000, 100, ZONES), (1_000, 500, ZONES)];
    if !quick {
        clusters.extend([(10_000, 100, ZONES), (10_000, 500, ZONES), (10_000, 100, 1)]);
    }
    let mut results: BTreeMap<(usize, usize, usize), Figures> = BTreeMap::new();
    for (services, nodes, zones) in clusters {
        eprintln!("{services} Services x {nodes} nodes in {zones} zone(s):");
        let f = measure(services, nodes, zones);
        println!(
            "{services} Services x {nodes} nodes, {zones} zone(s): (a) one change {:.1} us ({}); (b) flap {:.2} ms, {} reconciles ({}; {} destinations changed); (c) full pass {:.2} ms ({})",
            f.change.as_secs_f64() * 1e6,
            f.change_requests,
            f.flap.as_secs_f64() * 1e3,
            f.flap_requeued,
            f.flap_requests,
            f.changed_destinations,
            f.full_pass.as_secs_f64() * 1e3,
            f.full_requests,
        );
        assert_eq!(
            f.flap_requests.writes, f.changed_destinations,
            "a flap writes exactly the destinations it changed"
        );
        results.insert((services, nodes, zones), f);
    }
    for nodes in [100, 500] {
        if let (Some(small), Some(large)) = (
            results.get(&(1_000, nodes, ZONES)),
            results.get(&(10_000, nodes, ZONES)),
        ) {
            println!(
                "one change 10k/1k at {nodes} nodes = {:.2}",
                large.change.as_secs_f64() / small.change.as_secs_f64()
            );
        }
    }
    for ((services, nodes, zones), f) in &results {
        println!(
            "flap/full pass at {services} x {nodes}, {zones} zone(s) = {:.2}",
            f.flap.as_secs_f64() / f.full_pass.as_secs_f64()
        );
        println!(
            "flap writes/changed destinations at {services} x {nodes}, {zones} zone(s) = {:.2}",
            f.flap_requests.writes as f64 / f.changed_destinations as f64
        );
    }
}
