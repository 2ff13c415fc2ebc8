//! Allocating for a large cluster: 100,000 Services from an IPv6 /64 and from an IPv4 /16
//! (which holds fewer addresses than that, so the tail measures refusals from a full pool), and
//! releasing and reassigning 10,000 Services scattered over a pool holding 100,000.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ipvslb_core::alloc::Allocator;
use ipvslb_core::{
    FamilyPolicy, IpFamily, PoolSpec, PortKey, Requested, ServiceClaim, ServiceName,
};
use ipvslb_ipvs::Protocol;

const SERVICES: usize = 100_000;
const CHURN: usize = 10_000;

fn pool(range: &str, avoid_buggy_ips: bool) -> PoolSpec {
    PoolSpec {
        name: "bench".into(),
        created: 0,
        role: ipvslb_core::PoolRole::Serving,
        ranges: vec![range.parse().expect("bench range")],
        auto_assign: true,
        avoid_buggy_ips,
        node_set: "default".into(),
        service_allocation: None,
    }
}

fn claims(family: IpFamily) -> Vec<ServiceClaim> {
    (0..SERVICES)
        .map(|i| ServiceClaim {
            name: ServiceName::new(format!("ns{}", i % 100), format!("svc{i}")),
            created: i as i64,
            families: FamilyPolicy::SingleStack { primary: family },
            requested: Requested::Any,
            pool: None,
            sharing_key: None,
            ports: vec![PortKey {
                protocol: Protocol::Tcp,
                port: 443,
            }],
            current: Vec::new(),
            labels: BTreeMap::new(),
            namespace_labels: Default::default(),
        })
        .collect()
}

fn assign_all(allocator: &mut Allocator, claims: &[ServiceClaim]) -> usize {
    claims
        .iter()
        .filter(|c| allocator.assign(c).is_ok())
        .count()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("alloc");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));

    let v6 = claims(IpFamily::V6);
    let (empty_v6, _) = Allocator::new(vec![pool("2001:db8::/64", false)]);
    group.bench_function("assign 100,000 Services from an IPv6 /64", |b| {
        b.iter_batched(
            || empty_v6.clone(),
            |mut a| {
                let assigned = assign_all(&mut a, &v6);
                assert_eq!(assigned, SERVICES);
                black_box(a)
            },
            BatchSize::LargeInput,
        )
    });

    let v4 = claims(IpFamily::V4);
    let (empty_v4, _) = Allocator::new(vec![pool("10.20.0.0/16", true)]);
    group.bench_function(
        "assign 100,000 Services from an IPv4 /16 with avoidBuggyIPs (65,024 fit)",
        |b| {
            b.iter_batched(
                || empty_v4.clone(),
                |mut a| {
                    let assigned = assign_all(&mut a, &v4);
                    assert_eq!(assigned, 65_536 - 512);
                    black_box(a)
                },
                BatchSize::LargeInput,
            )
        },
    );

    let mut full = empty_v6.clone();
    assign_all(&mut full, &v6);
    let churn: Vec<&ServiceClaim> = v6.iter().step_by(SERVICES / CHURN).collect();
    group.bench_function(
        "release and reassign 10,000 of 100,000 Services in an IPv6 /64",
        |b| {
            b.iter_batched(
                || full.clone(),
                |mut a| {
                    for claim in &churn {
                        a.release(&claim.name);
                    }
                    for claim in &churn {
                        assert!(a.assign(claim).is_ok());
                    }
                    black_box(a)
                },
                BatchSize::LargeInput,
            )
        },
    );
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
