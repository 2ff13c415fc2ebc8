//! `Table::apply`: the in-memory table accepts and refuses what the kernel does.

mod common;

use common::{dest, rr, table, tcp};
use ipvslb_ipvs::{
    ApplyError, Destination, Op, OpKind, Scheduler, ServiceFlags, Table, VirtualService,
};

#[test]
fn each_operation_changes_the_table_as_the_kernel_would() {
    let a = tcp("10.0.0.1", 80);
    let mut t = Table::new();
    t.apply(&Op::AddService(rr(a))).unwrap();
    t.apply(&Op::AddDest(a, dest("192.168.0.1", 80, 1)))
        .unwrap();
    t.apply(&Op::AddDest(a, dest("192.168.0.2", 80, 1)))
        .unwrap();
    t.apply(&Op::EditService(VirtualService::new(a, Scheduler::Wrr)))
        .unwrap();
    t.apply(&Op::EditDest(a, dest("192.168.0.2", 80, 5)))
        .unwrap();
    t.apply(&Op::DelDest(a, dest("192.168.0.1", 80, 1)))
        .unwrap();
    assert_eq!(
        t,
        table([(
            VirtualService::new(a, Scheduler::Wrr),
            vec![dest("192.168.0.2", 80, 5)]
        )])
    );
    t.apply(&Op::DelService(a)).unwrap();
    assert_eq!(t, Table::new());
}

#[test]
fn deleting_a_destination_matches_it_by_address_and_port_only() {
    let a = tcp("10.0.0.1", 80);
    let mut t = table([(rr(a), vec![dest("192.168.0.1", 80, 1)])]);
    t.apply(&Op::DelDest(a, dest("192.168.0.1", 80, 42)))
        .unwrap();
    assert_eq!(t.destination_count(), 0);
}

#[test]
fn the_hashed_flag_is_never_stored() {
    let a = tcp("10.0.0.1", 80);
    let hashed = VirtualService {
        flags: ServiceFlags::HASHED.union(ServiceFlags::PERSISTENT),
        timeout: 60,
        ..rr(a)
    };
    let mut t = Table::new();
    t.apply(&Op::AddService(hashed.clone())).unwrap();
    assert_eq!(t.services[&a].service.flags, ServiceFlags::PERSISTENT);
    t.apply(&Op::EditService(hashed)).unwrap();
    assert_eq!(t.services[&a].service.flags, ServiceFlags::PERSISTENT);
}

#[test]
fn refused_operations_say_why_name_the_service_and_change_nothing() {
    let a = tcp("10.0.0.1", 80);
    let missing = tcp("10.0.0.9", 80);
    let start = table([(rr(a), vec![dest("192.168.0.1", 80, 1)])]);
    let out_of_range = Destination {
        upper_threshold: 1,
        lower_threshold: 2,
        ..dest("192.168.0.1", 80, 1)
    };
    let rows: Vec<(&str, Op, ApplyError, &str)> = vec![
        (
            "adding a service that exists",
            Op::AddService(rr(a)),
            ApplyError::ServiceExists(a),
            "adding virtual service TCP 10.0.0.1:80: it already exists",
        ),
        (
            "editing a service that does not exist",
            Op::EditService(rr(missing)),
            ApplyError::NoSuchService {
                op: OpKind::EditService,
                key: missing,
            },
            "editing virtual service failed: virtual service TCP 10.0.0.9:80 does not exist",
        ),
        (
            "deleting a service that does not exist",
            Op::DelService(missing),
            ApplyError::NoSuchService {
                op: OpKind::DelService,
                key: missing,
            },
            "deleting virtual service failed: virtual service TCP 10.0.0.9:80 does not exist",
        ),
        (
            "adding a destination to a service that does not exist",
            Op::AddDest(missing, dest("192.168.0.1", 80, 1)),
            ApplyError::NoSuchService {
                op: OpKind::AddDest,
                key: missing,
            },
            "adding destination failed: virtual service TCP 10.0.0.9:80 does not exist",
        ),
        (
            "adding a destination that exists",
            Op::AddDest(a, dest("192.168.0.1", 80, 2)),
            ApplyError::DestinationExists {
                service: a,
                dest: dest("192.168.0.1", 80, 2).key(),
            },
            "adding destination 192.168.0.1:80 to TCP 10.0.0.1:80: it already exists",
        ),
        (
            "editing a destination that does not exist",
            Op::EditDest(a, dest("192.168.0.2", 80, 1)),
            ApplyError::NoSuchDestination {
                op: OpKind::EditDest,
                service: a,
                dest: dest("192.168.0.2", 80, 1).key(),
            },
            "editing destination 192.168.0.2:80 of TCP 10.0.0.1:80: no such destination",
        ),
        (
            "deleting a destination that does not exist",
            Op::DelDest(a, dest("192.168.0.2", 80, 1)),
            ApplyError::NoSuchDestination {
                op: OpKind::DelDest,
                service: a,
                dest: dest("192.168.0.2", 80, 1).key(),
            },
            "deleting destination 192.168.0.2:80 of TCP 10.0.0.1:80: no such destination",
        ),
        (
            "a lower threshold above the upper one",
            Op::EditDest(a, out_of_range.clone()),
            ApplyError::OutOfRange {
                op: OpKind::EditDest,
                service: a,
                dest: out_of_range.key(),
                reason: "lower threshold 2 is above upper threshold 1".into(),
            },
            "editing destination 192.168.0.1:80 of TCP 10.0.0.1:80: \
             lower threshold 2 is above upper threshold 1",
        ),
        (
            "a weight the kernel's signed field cannot hold",
            Op::AddDest(a, dest("192.168.0.3", 80, u32::MAX)),
            ApplyError::OutOfRange {
                op: OpKind::AddDest,
                service: a,
                dest: dest("192.168.0.3", 80, 1).key(),
                reason: "weight 4294967295 is above 2147483647".into(),
            },
            "adding destination 192.168.0.3:80 of TCP 10.0.0.1:80: \
             weight 4294967295 is above 2147483647",
        ),
    ];
    for (what, op, error, message) in rows {
        let mut t = start.clone();
        let got = t.apply(&op);
        assert_eq!(got, Err(error), "{what}");
        assert_eq!(got.unwrap_err().to_string(), message, "{what}");
        assert_eq!(t, start, "{what}: the table must be unchanged");
    }
}
