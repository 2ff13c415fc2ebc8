//! Properties of the diff over random tables drawn from a small space of addresses, ports and
//! marks, so that the two tables share many services and destinations by chance.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipvslb_ipvs::{
    Destination, Family, ForwardingMethod, Op, OwnsAll, Removal, Scheduler, ServiceFlags,
    ServiceKey, Table, VirtualService, diff,
};
use proptest::prelude::*;

/// 10.0.0.0-7 and 2001:db8::0-7.
fn address() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u8..8).prop_map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i))),
        (0u16..8).prop_map(|i| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i))),
    ]
}

fn service_key() -> impl Strategy<Value = ServiceKey> {
    prop_oneof![
        4 => (
            address(),
            prop_oneof![
                Just(ipvslb_ipvs::Protocol::Tcp),
                Just(ipvslb_ipvs::Protocol::Udp),
                Just(ipvslb_ipvs::Protocol::Sctp)
            ],
            1u16..4
        )
            .prop_map(|(a, p, port)| ServiceKey::addr(a, p, port)),
        1 => (prop_oneof![Just(Family::Inet), Just(Family::Inet6)], 1u32..5)
            .prop_map(|(family, mark)| ServiceKey::FwMark { family, mark }),
    ]
}

/// A service; `hashed` adds the flag the kernel reports on every service it holds.
fn service(key: ServiceKey, hashed: bool) -> impl Strategy<Value = VirtualService> {
    (
        prop_oneof![
            Just(Scheduler::Rr),
            Just(Scheduler::Wrr),
            Just(Scheduler::Mh)
        ],
        0u32..32,
        prop_oneof![Just(0u32), Just(300)],
        prop_oneof![Just(None), Just(Some(24u8))],
        any::<bool>(),
    )
        .prop_map(move |(scheduler, bits, timeout, netmask, set_hashed)| {
            let mut s = VirtualService::new(key, scheduler);
            // Any settable flag bit, never HASHED unless asked for.
            let flags = ServiceFlags(bits & 0b1_1101);
            s.flags = if hashed && set_hashed {
                flags.union(ServiceFlags::HASHED)
            } else {
                flags
            };
            s.timeout = timeout;
            if let Some(n) = netmask {
                s.netmask = n;
            }
            s
        })
}

fn destination() -> impl Strategy<Value = Destination> {
    (
        address(),
        1u16..4,
        prop_oneof![
            Just(ForwardingMethod::Route),
            Just(ForwardingMethod::Masquerade),
            Just(ForwardingMethod::Tunnel)
        ],
        0u32..4,
        0u32..3,
    )
        .prop_flat_map(|(address, port, forwarding, weight, upper)| {
            (0..=upper).prop_map(move |lower| Destination {
                upper_threshold: upper,
                lower_threshold: lower,
                ..Destination::new(address, port, forwarding, weight)
            })
        })
}

fn table(hashed: bool) -> impl Strategy<Value = Table> {
    prop::collection::vec(
        service_key().prop_flat_map(move |key| {
            (
                service(key, hashed),
                prop::collection::vec(destination(), 0..5),
            )
        }),
        0..14,
    )
    .prop_map(|entries| {
        let mut t = Table::new();
        for (service, destinations) in entries {
            t.insert(service, destinations);
        }
        t
    })
}

/// Owns services on 10.0.0.0/30 and 2001:db8::0-3, and odd firewall marks.
fn owned(key: &ServiceKey) -> bool {
    match key {
        ServiceKey::Addr {
            address: IpAddr::V4(a),
            ..
        } => a.octets()[3] < 4,
        ServiceKey::Addr {
            address: IpAddr::V6(a),
            ..
        } => a.segments()[7] < 4,
        ServiceKey::FwMark { mark, .. } => mark % 2 == 1,
    }
}

/// The part of `t` for which `keep` holds, compared without the kernel's HASHED bit.
fn part(t: &Table, keep: impl Fn(&ServiceKey) -> bool) -> Table {
    let mut out = t.clone();
    out.services.retain(|k, _| keep(k));
    for entry in out.services.values_mut() {
        entry.service.flags = entry.service.flags.without(ServiceFlags::HASHED);
    }
    out
}

fn apply(t: &Table, ops: &[Op]) -> Result<Table, TestCaseError> {
    let mut out = t.clone();
    for op in ops {
        out.apply(op)
            .map_err(|e| TestCaseError::fail(format!("{op} refused: {e}")))?;
    }
    Ok(out)
}

fn removal() -> impl Strategy<Value = Removal> {
    prop_oneof![Just(Removal::Delete), Just(Removal::Drain)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_table_diffed_against_itself_is_empty(t in table(true), removal in removal()) {
        prop_assert_eq!(diff(&t, &t, &owned, removal), vec![]);
        prop_assert_eq!(diff(&t, &t, &|_: &ServiceKey| true, removal), vec![]);
    }

    #[test]
    fn applying_the_diff_reaches_the_desired_owned_part_and_keeps_the_rest(
        actual in table(true),
        desired in table(false),
    ) {
        let ops = diff(&actual, &desired, &owned, Removal::Delete);
        let after = apply(&actual, &ops)?;
        prop_assert_eq!(part(&after, owned), part(&desired, owned));
        prop_assert_eq!(part(&after, |k| !owned(k)), part(&actual, |k| !owned(k)));
        prop_assert_eq!(diff(&after, &desired, &owned, Removal::Delete), vec![]);
    }

    #[test]
    fn no_op_ever_names_a_service_that_is_not_owned(
        actual in table(true),
        desired in table(false),
        removal in removal(),
    ) {
        for op in diff(&actual, &desired, &owned, removal) {
            prop_assert!(owned(op.service_key()), "{} names a service not owned", op);
        }
    }

    #[test]
    fn no_service_or_destination_is_changed_twice_in_one_diff(
        actual in table(true),
        desired in table(false),
        removal in removal(),
    ) {
        let mut seen = BTreeSet::new();
        for op in diff(&actual, &desired, &owned, removal) {
            let target = match &op {
                Op::AddService(s) | Op::EditService(s) => (s.key, None),
                Op::DelService(k) => (*k, None),
                Op::AddDest(k, d) | Op::EditDest(k, d) | Op::DelDest(k, d) => (*k, Some(d.key())),
            };
            let kind = op.kind();
            // Adding a service and then its destinations is one change each; only a repeated
            // kind of change on the same target would be waste.
            prop_assert!(seen.insert((target, kind)), "{} twice", op);
            if matches!(kind, ipvslb_ipvs::OpKind::EditDest | ipvslb_ipvs::OpKind::DelDest | ipvslb_ipvs::OpKind::AddDest) {
                prop_assert!(
                    !seen.contains(&((target.0, None), ipvslb_ipvs::OpKind::DelService)),
                    "{} on a deleted service", op
                );
            }
        }
    }

    #[test]
    fn draining_then_diffing_and_applying_twice_converges_to_the_desired_table(
        actual in table(true),
        desired in table(false),
    ) {
        let first = apply(&actual, &diff(&actual, &desired, &owned, Removal::Drain))?;
        // Everything that goes from a service that stays is still there, at weight 0.
        for (key, entry) in &actual.services {
            let (true, Some(still)) = (owned(key), first.services.get(key)) else { continue };
            for (dest_key, was) in &entry.destinations {
                let wanted = desired.services.get(key).is_some_and(|e| e.destinations.contains_key(dest_key));
                if !wanted {
                    // One already at weight 0 had nothing left to drain and is gone.
                    let expected = (was.weight != 0).then_some(0);
                    prop_assert_eq!(still.destinations.get(dest_key).map(|d| d.weight), expected);
                }
            }
        }
        let second = apply(&first, &diff(&first, &desired, &owned, Removal::Drain))?;
        prop_assert_eq!(part(&second, owned), part(&desired, owned));
        prop_assert_eq!(part(&second, |k| !owned(k)), part(&actual, |k| !owned(k)));
        prop_assert_eq!(diff(&second, &desired, &owned, Removal::Drain), vec![]);
    }
}

/// The one Maglev service the order properties follow.
fn maglev() -> VirtualService {
    VirtualService::new(
        ServiceKey::addr(
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            ipvslb_ipvs::Protocol::Tcp,
            80,
        ),
        Scheduler::Mh,
    )
}

/// The service with the destinations `dests` (bits of a mask over 10.0.0.0-7:80), all weight 1.
fn maglev_with(dests: u8) -> Table {
    let mut t = Table::new();
    t.insert(
        maglev(),
        (0..8u8).filter(|i| dests & (1 << i) != 0).map(|i| {
            Destination::new(
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)),
                80,
                ForwardingMethod::Route,
                1,
            )
        }),
    );
    t
}

/// Converges `from` through each of `steps` in turn, as a director sees one change at a time.
fn through(from: Table, steps: &[u8], removal: Removal) -> Result<Table, TestCaseError> {
    let mut table = from;
    for step in steps {
        let desired = maglev_with(*step);
        table = apply(&table, &diff(&table, &desired, &OwnsAll, removal))?;
        if removal == Removal::Drain {
            // The grace period over: the deleting pass.
            table = apply(&table, &diff(&table, &desired, &OwnsAll, Removal::Delete))?;
        }
    }
    Ok(table)
}

fn order_of(t: &Table) -> Vec<ipvslb_ipvs::DestKey> {
    t.services
        .get(&maglev().key)
        .map(|e| e.list_order())
        .unwrap_or_default()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_two_histories_leave_a_maglev_list_in_the_same_canonical_order(
        first in prop::collection::vec(any::<u8>(), 0..8),
        second in prop::collection::vec(any::<u8>(), 0..8),
        last in any::<u8>(),
        removal in removal(),
    ) {
        let steps = |history: &[u8]| history.iter().copied().chain([last]).collect::<Vec<_>>();
        let a = through(Table::new(), &steps(&first), removal)?;
        let b = through(Table::new(), &steps(&second), removal)?;
        prop_assert_eq!(&a, &maglev_with(last));
        prop_assert_eq!(order_of(&a), order_of(&b));
        prop_assert!(a.services.values().all(|e| e.in_canonical_order()), "{:?}", order_of(&a));
        prop_assert_eq!(diff(&a, &maglev_with(last), &OwnsAll, Removal::Delete), vec![]);
    }

    #[test]
    fn a_maglev_list_built_in_any_order_by_someone_else_is_put_in_canonical_order(
        added in Just((0..8u8).collect::<Vec<_>>()).prop_shuffle(),
        keep in any::<u8>(),
        last in any::<u8>(),
    ) {
        // As after a restart over a kernel table another program, or an older ipvslb, filled.
        let mut foreign = Table::new();
        foreign.apply(&Op::AddService(maglev())).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for i in added.iter().filter(|i| keep & (1 << **i) != 0) {
            let dest = Destination::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, *i)), 80, ForwardingMethod::Route, 1);
            foreign.apply(&Op::AddDest(maglev().key, dest)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let ops = diff(&foreign, &maglev_with(last), &OwnsAll, Removal::Delete);
        let after = apply(&foreign, &ops)?;
        prop_assert_eq!(order_of(&after), order_of(&maglev_with(last)));
        // Over the same destinations, a list already in order costs nothing and one out of
        // order costs something: the order is what is diffed.
        let same = diff(&foreign, &maglev_with(keep), &OwnsAll, Removal::Delete);
        let in_order = foreign.services.values().all(|e| e.in_canonical_order());
        prop_assert_eq!(same.is_empty(), in_order, "{:?}", order_of(&foreign));
    }

    #[test]
    fn a_round_robin_list_is_never_reordered(
        added in Just((0..8u8).collect::<Vec<_>>()).prop_shuffle(),
    ) {
        let service = VirtualService { scheduler: Scheduler::Rr, ..maglev() };
        let mut t = Table::new();
        t.apply(&Op::AddService(service.clone())).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for i in &added {
            let dest = Destination::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, *i)), 80, ForwardingMethod::Route, 1);
            t.apply(&Op::AddDest(service.key, dest)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let mut desired = maglev_with(0xff);
        desired.services.values_mut().for_each(|e| e.service.scheduler = Scheduler::Rr);
        prop_assert_eq!(diff(&t, &desired, &OwnsAll, Removal::Delete), vec![]);
    }
}
