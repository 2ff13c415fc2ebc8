//! The diff of a large table: 20,000 services x 10 destinations, against itself and against a
//! copy with 1% of its destinations changed.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use ipvslb_ipvs::{
    Destination, ForwardingMethod, OwnsAll, Protocol, Removal, Scheduler, ServiceKey, Table,
    VirtualService, diff,
};

const SERVICES: u32 = 20_000;
const DESTINATIONS: u32 = 10;

fn v4(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(n))
}

fn service_key(i: u32) -> ServiceKey {
    ServiceKey::addr(v4(0x0af0_0000 + i), Protocol::Tcp, 80)
}

fn destination(j: u32, weight: u32) -> Destination {
    Destination::new(v4(0xc0a8_0000 + j), 80, ForwardingMethod::Route, weight)
}

/// Every service has the same ten nodes as destinations, as a NodeSet of ten nodes gives.
fn large() -> Table {
    let mut t = Table::new();
    for i in 0..SERVICES {
        t.insert(
            VirtualService::new(service_key(i), Scheduler::Rr),
            (0..DESTINATIONS).map(|j| destination(j, 1)),
        );
    }
    t
}

/// `t` with 1% of its destinations changed: a third get a new weight, a third go, and as many
/// new ones come.
fn one_percent_changed(t: &Table) -> Table {
    let mut out = t.clone();
    for i in 0..SERVICES {
        let Some(entry) = out.services.get_mut(&service_key(i)) else {
            continue;
        };
        for j in 0..DESTINATIONS {
            let n = i * DESTINATIONS + j;
            match n % 300 {
                0 => {
                    if let Some(d) = entry.destinations.get_mut(&destination(j, 1).key()) {
                        d.weight = 5;
                    }
                }
                100 => {
                    entry.destinations.remove(&destination(j, 1).key());
                }
                200 => {
                    let added = destination(DESTINATIONS + j, 1);
                    entry.destinations.insert(added.key(), added);
                }
                _ => {}
            }
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let t = large();
    let changed = one_percent_changed(&t);
    let ops = diff(&t, &changed, &OwnsAll, Removal::Delete);
    println!(
        "table: {} services, {} destinations; 1% case: {} ops",
        t.service_count(),
        t.destination_count(),
        ops.len()
    );

    c.bench_function("diff 200k destinations against itself", |b| {
        b.iter(|| diff(black_box(&t), black_box(&t), &OwnsAll, Removal::Delete))
    });
    c.bench_function("diff 200k destinations, 1% changed", |b| {
        b.iter(|| {
            diff(
                black_box(&t),
                black_box(&changed),
                &OwnsAll,
                Removal::Delete,
            )
        })
    });
    c.bench_function("diff 200k destinations, 1% changed, draining", |b| {
        b.iter(|| diff(black_box(&t), black_box(&changed), &OwnsAll, Removal::Drain))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
