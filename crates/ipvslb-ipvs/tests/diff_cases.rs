//! The diff, case by case: each table row is a situation, the ops it must produce, and a check
//! that the kernel (the in-memory table) accepts those ops in that order and reaches the goal.

mod common;

use common::{applied, dest, ip, rr, table, tcp, udp};
use ipvslb_ipvs::{
    DestKey, ForwardingMethod, Op, OwnsAll, Removal, Scheduler, ServiceFlags, ServiceKey, Stats,
    Table, VirtualService, diff,
};

/// One situation and the exact ops expected.
struct Case {
    what: &'static str,
    actual: Table,
    desired: Table,
    owner: fn(&ServiceKey) -> bool,
    removal: Removal,
    expected: Vec<Op>,
}

fn owns_all(_: &ServiceKey) -> bool {
    true
}

/// Owns the services on 10.0.0.0/24, as a director owns those inside its pools.
fn owns_pool(key: &ServiceKey) -> bool {
    matches!(key.address(), Some(std::net::IpAddr::V4(a)) if a.octets()[..3] == [10, 0, 0])
}

fn run(cases: Vec<Case>) {
    for case in cases {
        let ops = diff(&case.actual, &case.desired, &case.owner, case.removal);
        assert_eq!(ops, case.expected, "{}", case.what);
        // The order must be one the kernel accepts; the result must be the goal, save drained
        // destinations still waiting at weight 0.
        let after = applied(&case.actual, &ops);
        let again = diff(&after, &case.desired, &case.owner, Removal::Delete);
        assert!(
            again
                .iter()
                .all(|op| matches!(op, Op::DelDest(_, d) if d.weight == 0)),
            "{}: after applying, still {again:?}",
            case.what
        );
    }
}

#[test]
fn ops_come_in_the_order_the_kernel_needs() {
    let a = tcp("10.0.0.1", 80);
    let b = tcp("10.0.0.2", 80);
    let c = tcp("10.0.0.3", 80);
    run(vec![
        Case {
            what: "an empty table diffed against itself is empty",
            actual: Table::new(),
            desired: Table::new(),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![],
        },
        Case {
            what: "a new service is added before its destinations, which come in key order",
            actual: Table::new(),
            desired: table([(
                rr(a),
                vec![dest("192.168.0.2", 80, 1), dest("192.168.0.1", 80, 1)],
            )]),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![
                Op::AddService(rr(a)),
                Op::AddDest(a, dest("192.168.0.1", 80, 1)),
                Op::AddDest(a, dest("192.168.0.2", 80, 1)),
            ],
        },
        Case {
            what: "services that go are deleted first, and alone: their destinations go with them",
            actual: table([
                (rr(a), vec![dest("192.168.0.1", 80, 1)]),
                (
                    rr(c),
                    vec![dest("192.168.0.1", 80, 1), dest("192.168.0.2", 80, 1)],
                ),
            ]),
            desired: table([(rr(b), vec![dest("192.168.0.1", 80, 1)])]),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![
                Op::DelService(a),
                Op::DelService(c),
                Op::AddService(rr(b)),
                Op::AddDest(b, dest("192.168.0.1", 80, 1)),
            ],
        },
        Case {
            what: "after the deletions, services are visited in key order, each one complete",
            actual: table([(rr(b), vec![dest("192.168.0.1", 80, 1)])]),
            desired: table([
                (rr(c), vec![dest("192.168.0.1", 80, 1)]),
                (rr(b), vec![dest("192.168.0.1", 80, 2)]),
                (rr(a), vec![dest("192.168.0.1", 80, 1)]),
            ]),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![
                Op::AddService(rr(a)),
                Op::AddDest(a, dest("192.168.0.1", 80, 1)),
                Op::EditDest(b, dest("192.168.0.1", 80, 2)),
                Op::AddService(rr(c)),
                Op::AddDest(c, dest("192.168.0.1", 80, 1)),
            ],
        },
        Case {
            what: "within a service, removals come after additions so it is never left empty",
            actual: table([(rr(a), vec![dest("192.168.0.9", 80, 1)])]),
            desired: table([(
                VirtualService::new(a, Scheduler::Wrr),
                vec![dest("192.168.0.1", 80, 1)],
            )]),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![
                Op::EditService(VirtualService::new(a, Scheduler::Wrr)),
                Op::AddDest(a, dest("192.168.0.1", 80, 1)),
                Op::DelDest(a, dest("192.168.0.9", 80, 1)),
            ],
        },
        Case {
            what: "the same address on another protocol is another service",
            actual: table([(rr(tcp("10.0.0.1", 53)), vec![])]),
            desired: table([(rr(udp("10.0.0.1", 53)), vec![])]),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![
                Op::DelService(tcp("10.0.0.1", 53)),
                Op::AddService(rr(udp("10.0.0.1", 53))),
            ],
        },
    ]);
}

#[test]
fn settings_that_change_are_edited_in_place() {
    let a = tcp("10.0.0.1", 80);
    let base = rr(a);
    let persistent = VirtualService {
        flags: ServiceFlags::PERSISTENT,
        timeout: 300,
        ..base.clone()
    };
    let masked = VirtualService {
        netmask: 24,
        ..persistent.clone()
    };
    let hashed = VirtualService {
        flags: ServiceFlags::HASHED,
        ..base.clone()
    };
    let d1 = dest("192.168.0.1", 80, 1);
    let one = |s: &VirtualService, d: ipvslb_ipvs::Destination| table([(s.clone(), vec![d])]);
    run(vec![
        Case {
            what: "a new scheduler is one EditService, not a delete and re-add",
            actual: one(&base, d1.clone()),
            desired: one(&VirtualService::new(a, Scheduler::Mh), d1.clone()),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![Op::EditService(VirtualService::new(a, Scheduler::Mh))],
        },
        Case {
            what: "persistence (flags and timeout) is one EditService",
            actual: one(&base, d1.clone()),
            desired: one(&persistent, d1.clone()),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![Op::EditService(persistent.clone())],
        },
        Case {
            what: "a new netmask is one EditService",
            actual: one(&persistent, d1.clone()),
            desired: one(&masked, d1.clone()),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![Op::EditService(masked.clone())],
        },
        Case {
            what: "the HASHED flag the kernel sets is no difference",
            actual: one(&hashed, d1.clone()),
            desired: one(&base, d1.clone()),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![],
        },
        Case {
            what: "a new weight is one EditDest",
            actual: one(&base, d1.clone()),
            desired: one(&base, dest("192.168.0.1", 80, 7)),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![Op::EditDest(a, dest("192.168.0.1", 80, 7))],
        },
        Case {
            what: "a new forwarding method is one EditDest",
            actual: one(&base, d1.clone()),
            desired: one(
                &base,
                ipvslb_ipvs::Destination {
                    forwarding: ForwardingMethod::Tunnel,
                    ..d1.clone()
                },
            ),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![Op::EditDest(
                a,
                ipvslb_ipvs::Destination {
                    forwarding: ForwardingMethod::Tunnel,
                    ..d1.clone()
                },
            )],
        },
        Case {
            what: "new thresholds are one EditDest",
            actual: one(&base, d1.clone()),
            desired: one(
                &base,
                ipvslb_ipvs::Destination {
                    upper_threshold: 100,
                    lower_threshold: 10,
                    ..d1.clone()
                },
            ),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![Op::EditDest(
                a,
                ipvslb_ipvs::Destination {
                    upper_threshold: 100,
                    lower_threshold: 10,
                    ..d1.clone()
                },
            )],
        },
        Case {
            what: "a destination on another port of the same address is another destination",
            actual: one(&base, d1.clone()),
            desired: one(&base, dest("192.168.0.1", 8080, 1)),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![
                Op::AddDest(a, dest("192.168.0.1", 8080, 1)),
                Op::DelDest(a, d1.clone()),
            ],
        },
    ]);
}

#[test]
fn counters_never_make_a_difference() {
    let a = tcp("10.0.0.1", 80);
    let desired = table([(rr(a), vec![dest("192.168.0.1", 80, 1)])]);
    let mut actual = desired.clone();
    let busy = Stats {
        connections: 10,
        active_connections: 3,
        inactive_connections: 4,
        ..Stats::default()
    };
    if let Some(entry) = actual.services.get_mut(&a) {
        entry.stats = Some(busy);
        entry.destination_stats.insert(
            DestKey {
                address: ip("192.168.0.1"),
                port: 80,
            },
            busy,
        );
    }
    assert_eq!(diff(&actual, &desired, &OwnsAll, Removal::Delete), vec![]);
}

#[test]
fn destinations_that_go_are_drained_first_when_asked() {
    let a = tcp("10.0.0.1", 80);
    let b = tcp("10.0.0.2", 80);
    let two = table([(
        rr(a),
        vec![dest("192.168.0.1", 80, 1), dest("192.168.0.2", 80, 3)],
    )]);
    let one = table([(rr(a), vec![dest("192.168.0.1", 80, 1)])]);
    run(vec![
        Case {
            what: "with Drain, a destination that goes is set to weight 0, nothing else changed",
            actual: two.clone(),
            desired: one.clone(),
            owner: owns_all,
            removal: Removal::Drain,
            expected: vec![Op::EditDest(a, dest("192.168.0.2", 80, 0))],
        },
        Case {
            what: "with Drain, a destination already at weight 0 is deleted",
            actual: table([(
                rr(a),
                vec![dest("192.168.0.1", 80, 1), dest("192.168.0.2", 80, 0)],
            )]),
            desired: one.clone(),
            owner: owns_all,
            removal: Removal::Drain,
            expected: vec![Op::DelDest(a, dest("192.168.0.2", 80, 0))],
        },
        Case {
            what: "with Delete, a destination that goes is deleted at once",
            actual: two.clone(),
            desired: one.clone(),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![Op::DelDest(a, dest("192.168.0.2", 80, 3))],
        },
        Case {
            what: "with Drain, a service that goes is still deleted outright",
            actual: table([(rr(b), vec![dest("192.168.0.1", 80, 5)])]),
            desired: Table::new(),
            owner: owns_all,
            removal: Removal::Drain,
            expected: vec![Op::DelService(b)],
        },
        Case {
            what: "a drained destination that is wanted again gets its weight back",
            actual: table([(
                rr(a),
                vec![dest("192.168.0.1", 80, 1), dest("192.168.0.2", 80, 0)],
            )]),
            desired: two.clone(),
            owner: owns_all,
            removal: Removal::Drain,
            expected: vec![Op::EditDest(a, dest("192.168.0.2", 80, 3))],
        },
    ]);
}

#[test]
fn draining_keeps_the_forwarding_method_and_thresholds_of_the_destination() {
    let a = tcp("10.0.0.1", 80);
    let masq = ipvslb_ipvs::Destination {
        upper_threshold: 50,
        lower_threshold: 5,
        ..ipvslb_ipvs::Destination::new(ip("192.168.0.2"), 8080, ForwardingMethod::Masquerade, 4)
    };
    let actual = table([(rr(a), vec![masq.clone()])]);
    let desired = table([(rr(a), vec![])]);
    let ops = diff(&actual, &desired, &OwnsAll, Removal::Drain);
    assert_eq!(
        ops,
        vec![Op::EditDest(
            a,
            ipvslb_ipvs::Destination { weight: 0, ..masq }
        )]
    );
}

#[test]
fn a_drain_then_a_deleting_pass_reaches_the_desired_table() {
    let a = tcp("10.0.0.1", 80);
    let actual = table([(
        rr(a),
        vec![dest("192.168.0.1", 80, 1), dest("192.168.0.2", 80, 3)],
    )]);
    let desired = table([(rr(a), vec![dest("192.168.0.1", 80, 1)])]);
    let drained = applied(&actual, &diff(&actual, &desired, &OwnsAll, Removal::Drain));
    assert_eq!(
        drained.destination_count(),
        2,
        "the drained one stays at weight 0"
    );
    let done = applied(
        &drained,
        &diff(&drained, &desired, &OwnsAll, Removal::Drain),
    );
    assert_eq!(done, desired);
    assert_eq!(diff(&done, &desired, &OwnsAll, Removal::Drain), vec![]);
}

#[test]
fn only_owned_services_are_ever_touched() {
    let mine = tcp("10.0.0.1", 80);
    let theirs = tcp("10.96.0.10", 53);
    let d1 = dest("192.168.0.1", 80, 1);
    run(vec![
        Case {
            what: "a service not owned stays even though the desired table lacks it",
            actual: table([(rr(theirs), vec![d1.clone()]), (rr(mine), vec![d1.clone()])]),
            desired: table([(rr(mine), vec![d1.clone()])]),
            owner: owns_pool,
            removal: Removal::Delete,
            expected: vec![],
        },
        Case {
            what: "a desired service that is not owned is not added",
            actual: Table::new(),
            desired: table([(rr(theirs), vec![d1.clone()]), (rr(mine), vec![d1.clone()])]),
            owner: owns_pool,
            removal: Removal::Delete,
            expected: vec![Op::AddService(rr(mine)), Op::AddDest(mine, d1.clone())],
        },
        Case {
            what: "a service not owned is not edited even when it differs",
            actual: table([(rr(theirs), vec![d1.clone()])]),
            desired: table([(
                VirtualService::new(theirs, Scheduler::Wlc),
                vec![dest("192.168.0.1", 80, 9)],
            )]),
            owner: owns_pool,
            removal: Removal::Drain,
            expected: vec![],
        },
        Case {
            what: "owning nothing means no ops at all",
            actual: table([(rr(mine), vec![d1.clone()])]),
            desired: table([(rr(tcp("10.0.0.2", 80)), vec![])]),
            owner: |_| false,
            removal: Removal::Delete,
            expected: vec![],
        },
        Case {
            what: "owned services still converge next to ones that are not",
            actual: table([(rr(theirs), vec![d1.clone()]), (rr(mine), vec![])]),
            desired: table([(rr(mine), vec![d1.clone()])]),
            owner: owns_pool,
            removal: Removal::Delete,
            expected: vec![Op::AddDest(mine, d1.clone())],
        },
    ]);
}

#[test]
fn firewall_mark_services_are_diffed_like_the_others() {
    let mark = ServiceKey::FwMark {
        family: ipvslb_ipvs::Family::Inet6,
        mark: 7,
    };
    let actual = table([(rr(mark), vec![dest("2001:db8::1", 0, 1)])]);
    let desired = table([(rr(mark), vec![dest("2001:db8::1", 0, 2)])]);
    assert_eq!(
        diff(&actual, &desired, &OwnsAll, Removal::Delete),
        vec![Op::EditDest(mark, dest("2001:db8::1", 0, 2))]
    );
}

#[test]
fn ops_name_their_kind_and_service() {
    let a = tcp("10.0.0.1", 80);
    let op = Op::AddDest(a, dest("192.168.0.1", 80, 1));
    assert_eq!(op.kind().as_str(), "add_dest");
    assert_eq!(op.service_key(), &a);
    assert_eq!(
        op.to_string(),
        "adding destination 192.168.0.1:80 of TCP 10.0.0.1:80 Route weight 1"
    );
    assert_eq!(
        Op::DelService(a).to_string(),
        "deleting virtual service TCP 10.0.0.1:80"
    );
}

#[test]
fn a_maglev_destination_is_placed_by_moving_only_those_above_it() {
    let a = tcp("10.0.0.1", 80);
    let mh = VirtualService::new(a, Scheduler::Mh);
    let (n1, n3, n4, n5) = (
        dest("10.0.1.1", 80, 1),
        dest("10.0.1.3", 80, 1),
        dest("10.0.1.4", 80, 1),
        dest("10.0.1.5", 80, 1),
    );
    let actual = table([(mh.clone(), vec![n1.clone(), n3.clone(), n5.clone()])]);
    run(vec![
        Case {
            what: "a destination with the highest key goes on the head: one write",
            actual: actual.clone(),
            desired: table([(
                mh.clone(),
                vec![n1.clone(), n3.clone(), n5.clone(), dest("10.0.1.9", 80, 1)],
            )]),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![Op::AddDest(a, dest("10.0.1.9", 80, 1))],
        },
        Case {
            what: "one in the middle: it goes on, then the one above it comes off and on again",
            actual: actual.clone(),
            desired: table([(
                mh.clone(),
                vec![n1.clone(), n3.clone(), n4.clone(), n5.clone()],
            )]),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![
                Op::AddDest(a, n4.clone()),
                Op::DelDest(a, n5.clone()),
                Op::AddDest(a, n5.clone()),
            ],
        },
        Case {
            what: "a removal moves nothing, and a weight change is an edit in place",
            actual: actual.clone(),
            desired: table([(mh.clone(), vec![n1.clone(), dest("10.0.1.5", 80, 3)])]),
            owner: owns_all,
            removal: Removal::Delete,
            expected: vec![
                Op::EditDest(a, dest("10.0.1.5", 80, 3)),
                Op::DelDest(a, n3.clone()),
            ],
        },
    ]);
    let after = applied(
        &actual,
        &diff(
            &actual,
            &table([(mh, vec![n1, n3, n4, n5])]),
            &OwnsAll,
            Removal::Delete,
        ),
    );
    let order: Vec<String> = after.services[&a]
        .list_order()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        order,
        ["10.0.1.5:80", "10.0.1.4:80", "10.0.1.3:80", "10.0.1.1:80"]
    );
}
