//! Kernel tests: the real IPVS of the test VM (`cargo xtask vm-test`), as root.
//!
//! Every state is checked through two witnesses: our own dump, and `ipvsadm -L -n --exact` parsed
//! here independently of the library. The tests share one kernel table and run one at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Command;

use ipvslb_ipvs::netlink::{Error, Ipvs, Request, Vips};
use ipvslb_ipvs::{
    Destination, Family, ForwardingMethod, Op, OpKind, OwnsAll, Protocol, Removal, Scheduler,
    ServiceEntry, ServiceFlags, ServiceKey, Table, VirtualService,
};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a test address")
}

/// Runs a witness program and returns its standard output; a failure fails the test.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An empty kernel table, through ipvsadm (never through the code under test).
fn clear() -> Ipvs {
    run("ipvsadm", &["-C"]);
    Ipvs::open().expect("IPVS is there in the VM")
}

/// A service as the witness sees it: settings and destinations, as text.
type Witness = BTreeMap<String, (String, BTreeMap<String, String>)>;

/// `ipvsadm -L -n --exact`, parsed.
fn ipvsadm_view() -> Witness {
    let text = run("ipvsadm", &["-L", "-n", "--exact"]);
    let mut view = Witness::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        match tokens.first().copied() {
            Some("TCP" | "UDP" | "SCTP") if tokens.len() >= 3 => {
                let key = format!("{} {}", tokens[0], tokens[1]);
                let mut settings: Vec<&str> = tokens[2..].to_vec();
                settings[1..].sort_unstable();
                view.insert(key.clone(), (settings.join(" "), BTreeMap::new()));
                current = Some(key);
            }
            Some("FWM") if tokens.len() >= 3 => {
                let (key, rest) = if tokens.get(2) == Some(&"IPv6") {
                    (format!("FWM {} IPv6", tokens[1]), &tokens[3..])
                } else {
                    (format!("FWM {}", tokens[1]), &tokens[2..])
                };
                let mut settings: Vec<&str> = rest.to_vec();
                settings[1..].sort_unstable();
                view.insert(key.clone(), (settings.join(" "), BTreeMap::new()));
                current = Some(key);
            }
            Some("->") if tokens.get(1) != Some(&"RemoteAddress:Port") => {
                let service = current.as_ref().expect("a destination under a service");
                let entry = view.get_mut(service).expect("the service was read");
                entry
                    .1
                    .insert(tokens[1].to_owned(), format!("{} {}", tokens[2], tokens[3]));
            }
            _ => {}
        }
    }
    view
}

/// What `ipvsadm -L -n` would print for `table`, in the same parsed form, written from the model
/// by rules of ipvsadm's output, not by the library's own listing.
fn expected_view(table: &Table) -> Witness {
    let mut view = Witness::new();
    for (key, entry) in &table.services {
        let s = &entry.service;
        let mut settings = vec![s.scheduler.name().to_owned()];
        let mut sched_flags = Vec::new();
        let names = match s.scheduler {
            Scheduler::Sh => ["sh-fallback", "sh-port", "flag-3"],
            Scheduler::Mh => ["mh-fallback", "mh-port", "flag-3"],
            _ => ["flag-1", "flag-2", "flag-3"],
        };
        for (flag, name) in [
            ServiceFlags::SCHED1,
            ServiceFlags::SCHED2,
            ServiceFlags::SCHED3,
        ]
        .iter()
        .zip(names)
        {
            if s.flags.contains(*flag) {
                sched_flags.push(name);
            }
        }
        if !sched_flags.is_empty() {
            settings.push(format!("({})", sched_flags.join(",")));
        }
        if s.flags.contains(ServiceFlags::PERSISTENT) {
            settings.push("persistent".to_owned());
            settings.push(s.timeout.to_string());
            let family = match key {
                ServiceKey::Addr { address, .. } => Family::of(address),
                ServiceKey::FwMark { family, .. } => *family,
            };
            match family {
                Family::Inet if s.netmask != 32 => {
                    let mask = u32::MAX << (32 - u32::from(s.netmask));
                    settings.push("mask".to_owned());
                    settings.push(std::net::Ipv4Addr::from(mask).to_string());
                }
                Family::Inet6 if s.netmask != 128 => {
                    settings.push("mask".to_owned());
                    settings.push(s.netmask.to_string());
                }
                _ => {}
            }
        }
        if s.flags.contains(ServiceFlags::ONEPACKET) {
            settings.push("ops".to_owned());
        }
        settings[1..].sort_unstable();
        let dests = entry
            .destinations
            .values()
            .map(|d| {
                (
                    d.key().to_string(),
                    format!("{} {}", d.forwarding.ipvsadm_name(), d.weight),
                )
            })
            .collect();
        view.insert(key.to_string(), (settings.join(" "), dests));
    }
    view
}

/// `table` without counters, for comparing settings.
fn settings_only(table: &Table) -> Table {
    let mut table = table.clone();
    table.services.values_mut().for_each(without_counters);
    table
}

/// Removes the counters of `entry`, which the kernel keeps and a desired table has not.
fn without_counters(entry: &mut ServiceEntry) {
    entry.stats = None;
    entry.destination_stats.clear();
}

/// Both witnesses agree that the kernel holds exactly `desired`.
fn assert_kernel_holds(ipvs: &mut Ipvs, desired: &Table) {
    let dumped = settings_only(&ipvs.dump().expect("dump"));
    assert_eq!(dumped, settings_only(desired), "our dump differs");
    assert_eq!(ipvsadm_view(), expected_view(desired), "ipvsadm differs");
}

/// The schedulers this kernel ships a module for.
fn shipped_schedulers() -> Vec<Scheduler> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let dir = format!("/lib/modules/{}/kernel/net/netfilter/ipvs", release.trim());
    Scheduler::KNOWN
        .iter()
        .filter(|s| {
            std::fs::metadata(format!("{dir}/ip_vs_{}.ko", s.name())).is_ok()
                || std::fs::metadata(format!("{dir}/ip_vs_{}.ko.xz", s.name())).is_ok()
        })
        .cloned()
        .collect()
}

/// A mixed table: both families, every protocol, firewall marks, every shipped scheduler,
/// persistence, scheduler flags, every forwarding method that needs no extra module.
fn mixed_table() -> Table {
    let mut table = Table::new();
    let schedulers = shipped_schedulers();
    assert!(schedulers.len() >= 13, "schedulers: {schedulers:?}");
    let mut n = 0u16;
    for (i, scheduler) in schedulers.iter().enumerate() {
        for (j, (address, protocol)) in [
            (ip("10.240.0.10"), Protocol::Tcp),
            (ip("10.240.0.11"), Protocol::Udp),
            (ip("10.240.0.12"), Protocol::Sctp),
            (ip("fd00:240::10"), Protocol::Tcp),
            (ip("fd00:240::11"), Protocol::Udp),
            (ip("fd00:240::12"), Protocol::Sctp),
        ]
        .into_iter()
        .enumerate()
        {
            n += 1;
            let service = VirtualService::new(
                ServiceKey::addr(address, protocol, 1000 + i as u16),
                scheduler.clone(),
            );
            let base: IpAddr = if address.is_ipv4() {
                ip("192.168.10.0")
            } else {
                ip("fd00:10::")
            };
            let dests = (1..=3u8).map(|k| {
                let address = match base {
                    IpAddr::V4(a) => IpAddr::V4(std::net::Ipv4Addr::from(
                        u32::from(a) + u32::from(k) + 10 * j as u32,
                    )),
                    IpAddr::V6(a) => IpAddr::V6(std::net::Ipv6Addr::from(
                        u128::from(a) + u128::from(k) + 10 * j as u128,
                    )),
                };
                let forwarding = match k {
                    1 => ForwardingMethod::Masquerade,
                    2 => ForwardingMethod::Route,
                    _ => ForwardingMethod::Masquerade,
                };
                // Direct routing keeps the virtual port.
                let port = match forwarding {
                    ForwardingMethod::Masquerade => 30000 + n,
                    _ => 1000 + i as u16,
                };
                Destination {
                    upper_threshold: u32::from(k) * 100,
                    lower_threshold: u32::from(k) * 10,
                    ..Destination::new(address, port, forwarding, u32::from(k))
                }
            });
            table.insert(service, dests);
        }
    }
    table.insert(
        VirtualService {
            flags: ServiceFlags::SCHED1.union(ServiceFlags::SCHED2),
            ..VirtualService::new(
                ServiceKey::addr(ip("10.240.0.20"), Protocol::Tcp, 80),
                Scheduler::Mh,
            )
        },
        [Destination::new(
            ip("192.168.20.1"),
            8080,
            ForwardingMethod::Masquerade,
            5,
        )],
    );
    table.insert(
        VirtualService {
            flags: ServiceFlags::PERSISTENT,
            timeout: 300,
            netmask: 24,
            ..VirtualService::new(
                ServiceKey::addr(ip("10.240.0.21"), Protocol::Tcp, 443),
                Scheduler::Wlc,
            )
        },
        [],
    );
    table.insert(
        VirtualService {
            flags: ServiceFlags::PERSISTENT.union(ServiceFlags::ONEPACKET),
            timeout: 60,
            netmask: 64,
            ..VirtualService::new(
                ServiceKey::addr(ip("fd00:240::21"), Protocol::Udp, 53),
                Scheduler::Rr,
            )
        },
        [Destination::new(
            ip("fd00:20::1"),
            53,
            ForwardingMethod::Route,
            1,
        )],
    );
    for (family, mark) in [(Family::Inet, 7), (Family::Inet6, 8)] {
        let dest = match family {
            Family::Inet => ip("192.168.30.1"),
            Family::Inet6 => ip("fd00:30::1"),
        };
        table.insert(
            VirtualService::new(ServiceKey::FwMark { family, mark }, Scheduler::Sh),
            [Destination::new(dest, 0, ForwardingMethod::Route, 2)],
        );
    }
    table
}

#[test]
fn the_ipvs_family_resolves_and_reports_its_version() {
    let mut ipvs = clear();
    let info = ipvs.info().expect("GET_INFO");
    assert_eq!(info.version_string(), "1.2.1");
    assert!(info.connection_table_size > 0);
}

#[test]
fn services_of_every_kind_are_created_edited_and_deleted() {
    let mut ipvs = clear();
    let mut desired = mixed_table();
    let report = ipvs.sync(&OwnsAll, &desired, Removal::Delete).unwrap();
    assert_eq!(report.count(OpKind::AddService), desired.service_count());
    assert_eq!(report.count(OpKind::AddDest), desired.destination_count());
    assert_kernel_holds(&mut ipvs, &desired);

    // Edit: new schedulers and weights, destinations replaced, services gone.
    let keys: Vec<ServiceKey> = desired.services.keys().copied().collect();
    for (i, key) in keys.iter().enumerate() {
        match i % 4 {
            0 => {
                desired.services.remove(key);
            }
            1 => {
                let entry = desired.services.get_mut(key).unwrap();
                entry.service.scheduler = Scheduler::Wrr;
                for dest in entry.destinations.values_mut() {
                    dest.weight += 10;
                    dest.upper_threshold = 0;
                    dest.lower_threshold = 0;
                }
            }
            2 => {
                let entry = desired.services.get_mut(key).unwrap();
                if let Some(first) = entry.destinations.keys().next().copied() {
                    entry.destinations.remove(&first);
                }
                let mut extra = entry.destinations.values().next().cloned();
                if let Some(extra) = extra.as_mut() {
                    extra.port = extra.port.wrapping_add(1000);
                    extra.forwarding = ForwardingMethod::Masquerade;
                    entry.destinations.insert(extra.key(), extra.clone());
                }
            }
            _ => {}
        }
    }
    let report = ipvs.sync(&OwnsAll, &desired, Removal::Delete).unwrap();
    assert!(report.count(OpKind::DelService) > 0, "{report:?}");
    assert!(report.count(OpKind::EditService) > 0, "{report:?}");
    assert!(report.count(OpKind::EditDest) > 0, "{report:?}");
    assert!(report.count(OpKind::DelDest) > 0, "{report:?}");
    assert_kernel_holds(&mut ipvs, &desired);

    ipvs.sync(&OwnsAll, &Table::new(), Removal::Delete).unwrap();
    assert_kernel_holds(&mut ipvs, &Table::new());
}

#[test]
fn a_second_sync_with_the_same_table_makes_no_writes() {
    let mut ipvs = clear();
    let desired = mixed_table();
    let first = ipvs.sync(&OwnsAll, &desired, Removal::Delete).unwrap();
    assert!(first.writes > 0);
    let writes = ipvs.writes();
    let second = ipvs.sync(&OwnsAll, &desired, Removal::Delete).unwrap();
    assert_eq!(second.writes, 0, "{second:?}");
    assert_eq!(ipvs.writes(), writes, "netlink write requests were sent");
    assert_kernel_holds(&mut ipvs, &desired);
}

/// `count` services with `per_service` masquerade destinations each, in 10.241.0.0/16.
fn big_table(count: u32, per_service: u32) -> Table {
    let mut table = Table::new();
    for s in 0..count {
        let vip = IpAddr::V4(std::net::Ipv4Addr::from(0x0af1_0000 + s));
        let service = VirtualService::new(ServiceKey::addr(vip, Protocol::Tcp, 80), Scheduler::Rr);
        let dests = (0..per_service).map(|d| {
            Destination::new(
                IpAddr::V4(std::net::Ipv4Addr::from(0xc0a8_0000 + d)),
                30000 + (s % 1000) as u16,
                ForwardingMethod::Masquerade,
                1,
            )
        });
        table.insert(service, dests);
    }
    table
}

#[test]
fn a_batch_of_thousands_of_operations_is_applied_and_acknowledged() {
    let mut ipvs = clear();
    let desired = big_table(600, 9);
    let report = ipvs.sync(&OwnsAll, &desired, Removal::Delete).unwrap();
    assert_eq!(report.total(), 6000);
    assert_eq!(report.writes, 6000);
    assert_kernel_holds(&mut ipvs, &desired);
    let report = ipvs.sync(&OwnsAll, &Table::new(), Removal::Delete).unwrap();
    assert_eq!(report.count(OpKind::DelService), 600);
    assert_kernel_holds(&mut ipvs, &Table::new());
}

#[test]
fn services_whose_destinations_fill_several_datagrams_are_dumped_whole_among_small_ones() {
    // A dump longer than one datagram goes on as it is read; the next starts after its end.
    let mut ipvs = clear();
    let mut desired = big_table(40, 3);
    for entry in desired.services.values_mut().step_by(7) {
        let port = entry.destinations.values().next().unwrap().port;
        for d in 0..1500u32 {
            let dest = Destination::new(
                IpAddr::V4(std::net::Ipv4Addr::from(0xc0a9_0000 + d)),
                port,
                ForwardingMethod::Masquerade,
                2,
            );
            entry.destinations.insert(dest.key(), dest);
        }
    }
    assert_eq!(desired.destination_count(), 40 * 3 + 6 * 1500);
    ipvs.sync(&OwnsAll, &desired, Removal::Delete).unwrap();
    assert_kernel_holds(&mut ipvs, &desired);
    let (key, big) = desired.services.iter().next().unwrap();
    let mut one = ipvs.service(key).unwrap().expect("the service is there");
    without_counters(&mut one);
    assert_eq!(&one, big);
    let report = ipvs.sync(&OwnsAll, &desired, Removal::Delete).unwrap();
    assert_eq!(report.writes, 0);
    ipvs.sync(&OwnsAll, &Table::new(), Removal::Delete).unwrap();
}

/// Owns the services on 10.240.0.0/16 and fd00:240::/32, as a director owns its pools.
fn pool_owner(key: &ServiceKey) -> bool {
    match key.address() {
        Some(IpAddr::V4(a)) => a.octets()[..2] == [10, 240],
        Some(IpAddr::V6(a)) => a.segments()[..2] == [0xfd00, 0x240],
        None => false,
    }
}

const FOREIGN: &str = "TCP  192.0.2.1:80 wlc";

fn add_foreign() {
    run("ipvsadm", &["-A", "-t", "192.0.2.1:80", "-s", "wlc"]);
    run(
        "ipvsadm",
        &[
            "-a",
            "-t",
            "192.0.2.1:80",
            "-r",
            "198.51.100.1:80",
            "-m",
            "-w",
            "3",
        ],
    );
}

fn assert_foreign_untouched() {
    let text = run("ipvsadm", &["-L", "-n", "-t", "192.0.2.1:80"]);
    assert!(text.contains(FOREIGN), "{text}");
    assert!(text.contains("198.51.100.1:80"), "{text}");
    assert!(text.contains("Masq    3"), "{text}");
}

/// The owned part of the kernel's table, per our dump.
fn owned_part(ipvs: &mut Ipvs) -> Table {
    let mut table = settings_only(&ipvs.dump().unwrap());
    table.services.retain(|k, _| pool_owner(k));
    table
}

#[test]
fn drift_is_repaired_and_a_foreign_service_survives_every_sync() {
    let mut ipvs = clear();
    add_foreign();
    let mut desired = mixed_table();
    desired.services.retain(|k, _| pool_owner(k));
    ipvs.sync(&pool_owner, &desired, Removal::Delete).unwrap();
    assert_eq!(owned_part(&mut ipvs), settings_only(&desired));
    assert_foreign_untouched();

    // ipvsadm -C: everything gone, the foreign service too; it comes back by hand.
    run("ipvsadm", &["-C"]);
    add_foreign();
    let report = ipvs.sync(&pool_owner, &desired, Removal::Delete).unwrap();
    assert_eq!(report.count(OpKind::AddService), desired.service_count());
    assert_eq!(owned_part(&mut ipvs), settings_only(&desired));
    assert_foreign_untouched();

    // One destination deleted by hand.
    let (key, entry) = desired
        .services
        .iter()
        .find(|(k, e)| {
            matches!(
                k,
                ServiceKey::Addr {
                    protocol: Protocol::Tcp,
                    address: IpAddr::V4(_),
                    ..
                }
            ) && !e.destinations.is_empty()
        })
        .unwrap();
    let dest = entry.destinations.values().next().unwrap();
    let ServiceKey::Addr { address, port, .. } = key else {
        unreachable!()
    };
    let service_arg = format!("{address}:{port}");
    run(
        "ipvsadm",
        &["-d", "-t", &service_arg, "-r", &dest.key().to_string()],
    );
    let report = ipvs.sync(&pool_owner, &desired, Removal::Delete).unwrap();
    assert_eq!(report.total(), 1, "{report:?}");
    assert_eq!(report.count(OpKind::AddDest), 1);
    assert_eq!(owned_part(&mut ipvs), settings_only(&desired));
    assert_foreign_untouched();

    // A weight edited by hand.
    run(
        "ipvsadm",
        &[
            "-e",
            "-t",
            &service_arg,
            "-r",
            &dest.key().to_string(),
            "-m",
            "-w",
            "77",
        ],
    );
    let report = ipvs.sync(&pool_owner, &desired, Removal::Delete).unwrap();
    assert_eq!(report.count(OpKind::EditDest), 1, "{report:?}");
    assert_eq!(owned_part(&mut ipvs), settings_only(&desired));
    assert_foreign_untouched();

    // An owned service that nobody wants any more goes; the foreign one stays.
    run("ipvsadm", &["-A", "-t", "10.240.9.9:99", "-s", "rr"]);
    let report = ipvs.sync(&pool_owner, &desired, Removal::Delete).unwrap();
    assert_eq!(report.count(OpKind::DelService), 1, "{report:?}");
    assert_foreign_untouched();

    // Flushing removes only what is owned.
    ipvs.flush_owned(&pool_owner).unwrap();
    assert_eq!(owned_part(&mut ipvs), Table::new());
    assert_foreign_untouched();
    assert_eq!(ipvs.dump().unwrap().service_count(), 1);
}

#[test]
fn a_removed_destination_is_drained_to_weight_zero_before_it_is_deleted() {
    let mut ipvs = clear();
    let mut desired = big_table(1, 3);
    ipvs.sync(&OwnsAll, &desired, Removal::Drain).unwrap();
    let entry = desired.services.values_mut().next().unwrap();
    let gone = entry.destinations.keys().next().copied().unwrap();
    entry.destinations.remove(&gone);

    let report = ipvs.sync(&OwnsAll, &desired, Removal::Drain).unwrap();
    assert_eq!(report.count(OpKind::EditDest), 1, "{report:?}");
    let dumped = ipvs.dump().unwrap();
    let weight = dumped.services.values().next().unwrap().destinations[&gone].weight;
    assert_eq!(weight, 0);

    let report = ipvs.sync(&OwnsAll, &desired, Removal::Drain).unwrap();
    assert_eq!(report.count(OpKind::DelDest), 1, "{report:?}");
    assert_kernel_holds(&mut ipvs, &desired);
}

#[test]
fn one_service_converges_without_touching_the_others() {
    let mut ipvs = clear();
    let table = big_table(20, 2);
    ipvs.sync(&OwnsAll, &table, Removal::Delete).unwrap();
    let (key, entry) = table.services.iter().nth(5).unwrap();

    let mut changed = entry.clone();
    changed.service.scheduler = Scheduler::Lc;
    let extra = Destination::new(ip("192.168.99.1"), 80, ForwardingMethod::Masquerade, 4);
    changed.destinations.insert(extra.key(), extra);
    let report = ipvs.converge(key, Some(&changed), Removal::Delete).unwrap();
    assert_eq!(report.count(OpKind::EditService), 1, "{report:?}");
    assert_eq!(report.count(OpKind::AddDest), 1, "{report:?}");
    let mut expected = table.clone();
    expected.services.insert(*key, changed.clone());
    assert_kernel_holds(&mut ipvs, &expected);

    let again = ipvs.converge(key, Some(&changed), Removal::Delete).unwrap();
    assert_eq!(again.writes, 0);

    let gone = ipvs.converge(key, None, Removal::Delete).unwrap();
    assert_eq!(gone.count(OpKind::DelService), 1);
    expected.services.remove(key);
    assert_kernel_holds(&mut ipvs, &expected);
    assert!(ipvs.service(key).unwrap().is_none());
}

#[test]
fn the_kernel_refusals_come_back_typed_with_their_errno() {
    let mut ipvs = clear();
    let key = ServiceKey::addr(ip("10.240.1.1"), Protocol::Tcp, 80);
    let service = VirtualService::new(key, Scheduler::Rr);
    let dest = Destination::new(ip("192.168.1.1"), 80, ForwardingMethod::Masquerade, 1);
    ipvs.apply(&[Op::AddService(service.clone())]).unwrap();

    let missing = ServiceKey::addr(ip("10.240.1.2"), Protocol::Tcp, 80);
    let unknown_scheduler = VirtualService::new(
        ServiceKey::addr(ip("10.240.1.3"), Protocol::Tcp, 80),
        Scheduler::Other("nosuch".into()),
    );
    let err = ipvs
        .apply(&[
            Op::AddService(service.clone()),
            Op::AddDest(key, dest.clone()),
            Op::AddDest(missing, dest.clone()),
            Op::DelDest(
                key,
                Destination {
                    port: 81,
                    ..dest.clone()
                },
            ),
            Op::AddService(unknown_scheduler),
            Op::AddDest(key, dest.clone()),
        ])
        .unwrap_err();
    let Error::Apply { total, failures } = &err else {
        panic!("{err}")
    };
    assert_eq!(*total, 6);
    let errnos: Vec<Option<i32>> = failures.iter().map(Error::errno).collect();
    assert_eq!(
        errnos,
        [
            Some(libc::EEXIST),
            Some(libc::ESRCH),
            Some(libc::ENOENT),
            Some(libc::ENOENT),
            Some(libc::EEXIST)
        ]
        .to_vec(),
        "{err}"
    );
    assert!(failures[0].is_exists());
    assert!(failures[1].is_missing());
    let text = failures[0].to_string();
    assert!(
        text.starts_with("adding virtual service TCP 10.240.1.1:80")
            && text.contains("File exists"),
        "{text}"
    );
    let text = failures[3].to_string();
    assert!(text.contains("no such scheduler"), "{text}");
    assert!(matches!(
        failures[1],
        Error::Kernel {
            op: Request::Write(OpKind::AddDest),
            ..
        }
    ));
    // The good write between the bad ones was made.
    let entry = ipvs.service(&key).unwrap().unwrap();
    assert_eq!(entry.destinations.len(), 1);
}

/// `ip -o addr show dev NAME scope global`, as a set of addresses.
fn ip_addresses(dev: &str) -> BTreeSet<IpAddr> {
    run("ip", &["-o", "addr", "show", "dev", dev, "scope", "global"])
        .lines()
        .filter_map(|line| {
            let mut tokens = line.split_whitespace();
            tokens.find(|t| *t == "inet" || *t == "inet6")?;
            let cidr = tokens.next()?;
            cidr.split('/').next()?.parse().ok()
        })
        .collect()
}

#[test]
fn vip_addresses_appear_on_and_disappear_from_ipvslb0_only() {
    let lo_before = run("ip", &["-o", "addr", "show", "dev", "lo"]);
    let mut vips = Vips::open("ipvslb0").expect("the dummy interface");
    assert_eq!(vips.interface(), "ipvslb0");
    let link = run("ip", &["-o", "link", "show", "dev", "ipvslb0"]);
    assert!(link.contains("UP") || link.contains("UNKNOWN"), "{link}");

    let wanted: BTreeSet<IpAddr> = [ip("10.240.0.210"), ip("10.240.0.211"), ip("fd00:240::210")]
        .into_iter()
        .collect();
    assert_eq!(vips.sync(&wanted).unwrap(), (3, 0));
    assert_eq!(vips.list().unwrap(), wanted);
    assert_eq!(ip_addresses("ipvslb0"), wanted);
    let shown = run("ip", &["-o", "addr", "show", "dev", "ipvslb0"]);
    assert!(shown.contains("10.240.0.210/32"), "{shown}");
    assert!(shown.contains("fd00:240::210/128"), "{shown}");

    assert!(!vips.add(ip("10.240.0.210")).unwrap(), "already there");
    assert!(vips.remove(ip("10.240.0.211")).unwrap());
    assert!(!vips.remove(ip("10.240.0.211")).unwrap(), "already gone");

    // An interface that is not a dummy is someone else's.
    let veth = run(
        "ip",
        &[
            "link", "add", "notours", "type", "veth", "peer", "name", "notours1",
        ],
    );
    assert!(veth.is_empty());
    let err = Vips::open("notours").unwrap_err();
    assert!(
        matches!(err, Error::NotDummy { ref kind, .. } if kind == "veth"),
        "{err}"
    );
    let err = Vips::open("lo").unwrap_err();
    assert!(matches!(err, Error::NotDummy { .. }), "{err}");
    run("ip", &["link", "del", "notours"]);
    // A dummy interface without ipvslb's mark is someone else's too (kube-proxy's kube-ipvs0).
    run("ip", &["link", "add", "theirs0", "type", "dummy"]);
    let err = Vips::open("theirs0").unwrap_err();
    assert!(
        matches!(err, Error::NotOurs { ref alias, .. } if alias.is_none()),
        "{err}"
    );
    run("ip", &["link", "del", "theirs0"]);
    let details = run("ip", &["-d", "link", "show", "dev", "ipvslb0"]);
    assert!(details.contains("alias ipvslb"), "{details}");

    // Opening again finds the interface instead of failing.
    let mut again = Vips::open("ipvslb0").unwrap();
    assert_eq!(again.index(), vips.index());
    assert_eq!(again.sync(&BTreeSet::new()).unwrap(), (0, 2));
    assert!(ip_addresses("ipvslb0").is_empty());
    assert_eq!(
        run("ip", &["-o", "addr", "show", "dev", "lo"]),
        lo_before,
        "another interface was touched"
    );
}

#[test]
fn without_the_ip_vs_module_opening_says_to_load_it() {
    run("ipvsadm", &["-C"]);
    let loaded = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    let mut schedulers: Vec<&str> = loaded
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|m| m.starts_with("ip_vs_"))
        .collect();
    schedulers.push("ip_vs");
    for module in &schedulers {
        run("rmmod", &[module]);
    }
    // The generic netlink controller would load ip_vs on demand: keep it from doing so.
    let modprobe = "/proc/sys/kernel/modprobe";
    let helper = std::fs::read_to_string(modprobe).unwrap_or_default();
    std::fs::write(modprobe, "/bin/false\n").expect("set the module helper");
    let opened = Ipvs::open();
    std::fs::write(modprobe, helper).expect("restore the module helper");
    run("modprobe", &["ip_vs"]);
    let err = opened.expect_err("no IPVS family without ip_vs");
    assert!(matches!(err, Error::Unavailable), "{err:?}");
    assert_eq!(
        err.to_string(),
        "IPVS is not available: load the ip_vs module"
    );
    Ipvs::open().expect("IPVS is back");
}
