//! Properties of the allocator over random pools and Services: what must hold whatever the input.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipvslb_core::alloc::{AllocError, Allocation, Allocator, Assignment, allocate_all};
use ipvslb_core::range::to_u128;
use ipvslb_core::{
    FamilyPolicy, IpFamily, IpRange, PoolSpec, PortKey, Requested, ServiceAllocation, ServiceClaim,
    ServiceName,
};
use ipvslb_ipvs::Protocol;
use proptest::prelude::*;

/// IPv4 addresses live in 10.0.0.250 + 0..16, so ranges cross a .255/.0 boundary and overlap.
fn v4(offset: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(10, 0, 0, 250)) + offset,
    ))
}

fn v6(offset: u32) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(
        u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0)) + u128::from(offset),
    ))
}

fn any_pool(index: usize) -> impl Strategy<Value = PoolSpec> {
    (
        (0u32..14, 1u32..6),
        proptest::option::weighted(0.7, (0u32..6, 1u32..4)),
        proptest::bool::weighted(0.85),
        any::<bool>(),
        proptest::option::weighted(0.3, (0i32..3, proptest::option::of(prop_oneof!["a", "b"]))),
        0i64..3,
    )
        .prop_map(move |((s4, n4), six, auto_assign, avoid, sa, created)| {
            let mut ranges = vec![IpRange::new(v4(s4), v4(s4 + n4 - 1)).expect("ordered")];
            if let Some((s6, n6)) = six {
                ranges.push(IpRange::new(v6(s6), v6(s6 + n6 - 1)).expect("ordered"));
            }
            PoolSpec {
                name: format!("p{index}"),
                created,
                role: ipvslb_core::PoolRole::Serving,
                ranges,
                auto_assign,
                avoid_buggy_ips: avoid,
                node_set: "default".into(),
                service_allocation: sa.map(|(priority, ns)| ServiceAllocation {
                    priority,
                    namespaces: ns.into_iter().collect(),
                    ..ServiceAllocation::default()
                }),
            }
        })
}

fn any_pools() -> impl Strategy<Value = Vec<PoolSpec>> {
    (any_pool(0), any_pool(1), any_pool(2), 1usize..=3).prop_map(|(a, b, c, n)| {
        let mut pools = vec![a, b, c];
        pools.truncate(n);
        pools
    })
}

fn any_addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![3 => (0u32..16).prop_map(v4), 1 => (0u32..8).prop_map(v6)]
}

fn any_family() -> impl Strategy<Value = IpFamily> {
    prop_oneof![3 => Just(IpFamily::V4), 1 => Just(IpFamily::V6)]
}

fn any_claim(index: usize) -> impl Strategy<Value = ServiceClaim> {
    (
        (prop_oneof!["a", "b"], 0i64..4),
        (any_family(), 0u8..3),
        prop_oneof![
            6 => Just(Requested::Any),
            3 => proptest::collection::vec(any_addr(), 1..3).prop_map(Requested::Addresses),
            1 => Just(Requested::Malformed("not an address".into())),
        ],
        proptest::option::weighted(0.2, prop_oneof!["p0", "p1", "p2", "nope"]),
        proptest::option::weighted(0.5, prop_oneof!["k1", "k2"]),
        proptest::collection::btree_set(prop_oneof![Just(80u16), Just(443), Just(53)], 0..3),
        proptest::collection::vec(any_addr(), 0..3),
    )
        .prop_map(
            move |((ns, created), (primary, policy), requested, pool, key, ports, current)| {
                ServiceClaim {
                    name: ServiceName::new(ns, format!("s{index}")),
                    created,
                    families: match policy {
                        0 => FamilyPolicy::SingleStack { primary },
                        1 => FamilyPolicy::PreferDualStack { primary },
                        _ => FamilyPolicy::RequireDualStack { primary },
                    },
                    requested,
                    pool,
                    sharing_key: key,
                    ports: ports
                        .into_iter()
                        .map(|port| PortKey {
                            protocol: Protocol::Tcp,
                            port,
                        })
                        .collect(),
                    current,
                    labels: BTreeMap::new(),
                    namespace_labels: Default::default(),
                }
            },
        )
}

fn any_claims() -> impl Strategy<Value = Vec<ServiceClaim>> {
    (0usize..14).prop_flat_map(|n| (0..n).map(any_claim).collect::<Vec<_>>())
}

/// Every sharing, placement and family rule, checked against the allocator's own records.
fn check_invariants(allocator: &Allocator, claims: &[ServiceClaim]) -> Result<(), TestCaseError> {
    let by_name: BTreeMap<&ServiceName, &ServiceClaim> =
        claims.iter().map(|c| (&c.name, c)).collect();
    let mut users: BTreeMap<IpAddr, Vec<&ServiceClaim>> = BTreeMap::new();
    for (name, assignment) in allocator.assignments() {
        let claim = by_name.get(name).copied();
        let Some(claim) = claim else {
            return Err(TestCaseError::fail(format!(
                "{name} holds addresses without a claim"
            )));
        };
        let families: BTreeSet<IpFamily> = assignment.addresses.iter().map(IpFamily::of).collect();
        prop_assert_eq!(
            families.len(),
            assignment.addresses.len(),
            "one address per family"
        );
        prop_assert!(!assignment.addresses.is_empty());
        match claim.families {
            FamilyPolicy::SingleStack { primary } => {
                prop_assert_eq!(families, BTreeSet::from([primary]))
            }
            FamilyPolicy::RequireDualStack { .. } => prop_assert_eq!(families.len(), 2),
            FamilyPolicy::PreferDualStack { primary } => {
                if assignment.addresses.len() == 2 {
                    prop_assert_eq!(IpFamily::of(&assignment.addresses[0]), primary);
                }
            }
        }
        for addr in &assignment.addresses {
            prop_assert_eq!(
                allocator.pool_of(*addr),
                Some(assignment.pool.as_str()),
                "{} lies in its pool",
                addr
            );
            users.entry(*addr).or_default().push(claim);
            prop_assert!(allocator.holders(*addr).any(|h| h == name));
        }
    }
    for (addr, holders) in &users {
        if holders.len() < 2 {
            continue;
        }
        let keys: BTreeSet<_> = holders.iter().map(|c| c.sharing_key.clone()).collect();
        prop_assert_eq!(keys.len(), 1, "{} is shared across sharing keys", addr);
        prop_assert!(
            holders[0].sharing_key.is_some(),
            "{} is shared without a key",
            addr
        );
        let mut ports = BTreeSet::new();
        for claim in holders {
            for port in &claim.ports {
                prop_assert!(ports.insert(*port), "port {:?} collides on {}", port, addr);
            }
        }
    }
    Ok(())
}

/// The addresses each pool may hand out, computed by listing them (the pools here are tiny).
/// The oracle of pool ownership, address by address: each address belongs to the first pool,
/// oldest first (then by name), that lists it.
fn usable_addresses(pools: &[PoolSpec]) -> BTreeMap<String, BTreeSet<IpAddr>> {
    let mut sorted: Vec<&PoolSpec> = pools.iter().collect();
    sorted.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    let mut taken: BTreeSet<IpAddr> = BTreeSet::new();
    let mut out = BTreeMap::new();
    for pool in sorted {
        let mut addrs = BTreeSet::new();
        for range in &pool.ranges {
            let (first, last) = (to_u128(range.first()), to_u128(range.last()));
            for n in first..=last {
                let addr = ipvslb_core::range::from_u128(range.family(), n);
                if !taken.insert(addr) && !addrs.contains(&addr) {
                    continue;
                }
                let buggy = addr.is_ipv4() && matches!(n & 0xff, 0 | 0xff);
                if !(pool.avoid_buggy_ips && buggy) {
                    addrs.insert(addr);
                }
            }
        }
        out.insert(pool.name.clone(), addrs);
    }
    out
}

/// The status write that follows an assignment, as the controller makes it.
fn written(
    allocator: &mut Allocator,
    claim: &ServiceClaim,
    result: &Result<Assignment, AllocError>,
) {
    let addresses = result
        .as_ref()
        .map(|a| a.addresses.clone())
        .unwrap_or_default();
    allocator.settle(&claim.name, &addresses);
}

fn check_usage(allocator: &Allocator, pools: &[PoolSpec]) -> Result<(), TestCaseError> {
    let mut held: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    for (_, a) in allocator.assignments() {
        held.entry(a.pool.clone())
            .or_default()
            .extend(a.addresses.iter().copied());
    }
    let recorded: BTreeSet<IpAddr> = allocator.recorded().map(|(a, _)| *a).collect();
    for (pool, usable) in usable_addresses(pools) {
        let usage = allocator.usage(&pool).expect("every pool has usage");
        let mine = held.remove(&pool).unwrap_or_default();
        // Addresses a status still records are not available either.
        let taken: BTreeSet<IpAddr> = &(&mine | &recorded) & &usable;
        let count = |f: IpFamily, set: &BTreeSet<IpAddr>| {
            set.iter().filter(|a| IpFamily::of(a) == f).count()
        };
        prop_assert_eq!(
            usage.assigned_v4 as usize,
            count(IpFamily::V4, &mine),
            "assigned v4 in {}",
            pool
        );
        prop_assert_eq!(
            usage.assigned_v6 as usize,
            count(IpFamily::V6, &mine),
            "assigned v6 in {}",
            pool
        );
        prop_assert_eq!(
            usage.available_v4 as usize,
            // A held avoided address (kept from before the pool avoided it) takes nothing.
            count(IpFamily::V4, &usable) - count(IpFamily::V4, &taken),
            "available v4 in {}",
            pool
        );
        prop_assert_eq!(
            usage.available_v6 as usize,
            count(IpFamily::V6, &usable) - count(IpFamily::V6, &taken),
            "available v6 in {}",
            pool
        );
        let (listed, truncated) = usage.allocations(usize::MAX);
        prop_assert!(!truncated);
        prop_assert_eq!(
            listed.iter().map(|(a, _)| *a).collect::<BTreeSet<_>>(),
            mine
        );
    }
    Ok(())
}

fn outcome(all: &Allocation) -> BTreeMap<ServiceName, Result<(Vec<IpAddr>, String), String>> {
    all.results
        .iter()
        .map(|(n, r)| {
            let r = match r {
                Ok(a) => Ok((a.addresses.clone(), a.pool.clone())),
                Err(e) => Err(e.to_string()),
            };
            (n.clone(), r)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_address_is_ever_held_against_the_sharing_rules(pools in any_pools(), claims in any_claims()) {
        let all = allocate_all(pools.clone(), &claims);
        check_invariants(&all.allocator, &claims)?;
        for (name, result) in &all.results {
            if let Ok(a) = result {
                prop_assert_eq!(all.allocator.assignment(name), Some(a));
            }
        }
    }

    #[test]
    fn usage_counts_match_what_is_held(pools in any_pools(), claims in any_claims()) {
        let all = allocate_all(pools.clone(), &claims);
        check_usage(&all.allocator, &pools)?;
    }

    #[test]
    fn allocate_all_does_not_depend_on_input_order(
        (pools, shuffled_pools) in any_pools().prop_flat_map(|p| (Just(p.clone()), Just(p).prop_shuffle())),
        (claims, shuffled) in any_claims().prop_flat_map(|c| (Just(c.clone()), Just(c).prop_shuffle())),
    ) {
        let first = allocate_all(pools, &claims);
        let second = allocate_all(shuffled_pools, &shuffled);
        prop_assert_eq!(outcome(&first), outcome(&second));
        prop_assert_eq!(first.problems, second.problems);
    }

    #[test]
    fn a_restart_with_the_written_status_moves_nothing(pools in any_pools(), claims in any_claims()) {
        let first = allocate_all(pools.clone(), &claims);
        let recorded: Vec<ServiceClaim> = claims
            .iter()
            .map(|c| {
                let mut c = c.clone();
                c.current = match first.results.get(&c.name) {
                    Some(Ok(a)) => a.addresses.clone(),
                    _ => Vec::new(),
                };
                c
            })
            .collect();
        let second = allocate_all(pools, &recorded);
        // Why a Service still fails may read differently (the pools are fuller when it is tried
        // after a restart), but who holds what must not change.
        let held = |all: &Allocation| {
            outcome(all).into_iter().map(|(n, r)| (n, r.ok())).collect::<BTreeMap<_, _>>()
        };
        prop_assert_eq!(held(&first), held(&second));
    }

    #[test]
    fn release_then_assign_gets_an_address_again(pools in any_pools(), claims in any_claims()) {
        let mut all = allocate_all(pools.clone(), &claims);
        for claim in &claims {
            if !matches!(all.results.get(&claim.name), Some(Ok(_))) {
                continue;
            }
            let before = all.allocator.assign(claim);
            prop_assert_eq!(before.as_ref().ok(), all.allocator.assignment(&claim.name), "assign is idempotent");
            written(&mut all.allocator, claim, &before);
            prop_assert!(all.allocator.release(&claim.name).is_some());
            let again = all.allocator.assign(claim);
            prop_assert!(again.is_ok(), "{} got {:?}", claim.name, again);
            written(&mut all.allocator, claim, &again);
            check_invariants(&all.allocator, &claims)?;
            check_usage(&all.allocator, &pools)?;
        }
    }

    #[test]
    fn any_sequence_of_assigns_and_releases_keeps_every_rule(
        pools in any_pools(),
        claims in any_claims(),
        steps in proptest::collection::vec((0usize..14, 0u8..4), 0..40),
    ) {
        let (mut allocator, _) = Allocator::new(pools.clone());
        for (index, action) in steps {
            let Some(claim) = claims.get(index) else { continue };
            match action {
                0 => { allocator.release(&claim.name); }
                1 => { let _ = allocator.restore(claim); }
                _ => {
                    let first = allocator.assign(claim);
                    if let Ok(a) = &first {
                        let again = allocator.assign(claim);
                        prop_assert_eq!(again.as_ref(), Ok(a), "assign is idempotent");
                    }
                }
            }
            check_invariants(&allocator, &claims)?;
            check_usage(&allocator, &pools)?;
        }
    }
}
