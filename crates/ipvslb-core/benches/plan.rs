//! Planning a large cluster: 10,000 Services x 2 ports over a NodeSet of 10 nodes in one pass,
//! against the baseline of running the per-Service path (what one Service's reconcile does) for
//! every Service, so the numbers read as a ratio.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, criterion_group, criterion_main};
use ipvslb_core::plan::{Topology, plan};
use ipvslb_core::{
    Forwarding, NodeAddressType, NodeInfo, NodeSetSpec, PlannedService, PoolSpec, Selector,
    ServiceName, ServicePort, TrafficPolicy,
};
use ipvslb_ipvs::{Protocol, Scheduler, ServiceFlags};

const SERVICES: u32 = 10_000;
const NODES: u32 = 10;

fn inputs() -> (
    Vec<PlannedService>,
    Vec<PoolSpec>,
    Vec<NodeSetSpec>,
    Vec<NodeInfo>,
) {
    let nodes = (0..NODES)
        .map(|i| NodeInfo {
            name: format!("node{i}"),
            labels: BTreeMap::new(),
            ready: true,
            unschedulable: false,
            addresses: vec![(
                NodeAddressType::InternalIp,
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, i as u8 + 1)),
            )],
        })
        .collect();
    let pool = PoolSpec {
        name: "pool".into(),
        created: 0,
        role: ipvslb_core::PoolRole::Serving,
        ranges: vec!["10.240.0.0/16".parse().expect("a valid CIDR")],
        auto_assign: true,
        avoid_buggy_ips: false,
        node_set: "default".into(),
        service_allocation: None,
    };
    let set = NodeSetSpec {
        name: "default".into(),
        selector: Selector::default(),
        address_type: NodeAddressType::InternalIp,
        forwarding: Forwarding::DirectRouting,
        scheduler: Scheduler::Rr,
        flags: ServiceFlags::empty(),
        persistence: None,
        health: None,
    };
    let services = (0..SERVICES)
        .map(|i| PlannedService {
            name: ServiceName::new("bench", format!("svc-{i:05}")),
            created: 0,
            addresses: vec![IpAddr::V4(Ipv4Addr::from(
                u32::from(Ipv4Addr::new(10, 240, 0, 0)) + i,
            ))],
            pool: "pool".into(),
            ports: [80, 443]
                .map(|port| ServicePort {
                    protocol: Protocol::Tcp,
                    port,
                    node_port: None,
                })
                .to_vec(),
            traffic_policy: TrafficPolicy::Cluster,
            scheduler: None,
            ready_endpoints: BTreeMap::new(),
            health_check_node_port: None,
        })
        .collect();
    (services, vec![pool], vec![set], nodes)
}

fn bench(c: &mut Criterion) {
    let (services, pools, sets, nodes) = inputs();
    let whole = plan(&services, &pools, &sets, &nodes);
    println!(
        "plan: {} services x 2 ports x {NODES} nodes -> {} virtual services, {} destinations",
        services.len(),
        whole.table.service_count(),
        whole.table.destination_count()
    );
    let mut group = c.benchmark_group("plan");
    group.sample_size(10);
    group.bench_function("10k services x 2 ports x 10 nodes, one pass", |b| {
        b.iter(|| plan(black_box(&services), &pools, &sets, &nodes))
    });
    group.bench_function(
        "10k services x 2 ports x 10 nodes, one pass per service (baseline)",
        |b| {
            // A director makes the topology once per change of its inputs, not per reconcile.
            let topology = Topology::new(pools.clone(), sets.clone(), nodes.clone());
            let down = Default::default();
            b.iter(|| {
                for s in &services {
                    let _ = black_box(topology.plan(std::slice::from_ref(s), &down));
                }
            })
        },
    );
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
