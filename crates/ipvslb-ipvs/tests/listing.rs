//! The listing, byte for byte against the layout of `ipvsadm -L -n`.

mod common;

use common::{dest, ip, rr, tcp, udp};
use ipvslb_ipvs::{
    DestKey, Destination, Family, ForwardingMethod, Listing, Protocol, Scheduler, ServiceFlags,
    ServiceKey, Stats, Table, VirtualService,
};

const HEADER: &str = "IP Virtual Server version 1.2.1 (size=4096)\n\
                      Prot LocalAddress:Port Scheduler Flags\n  \
                      -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n";

#[test]
fn an_empty_table_lists_only_the_header() {
    assert_eq!(Listing(&Table::new()).to_string(), HEADER);
}

#[test]
fn a_small_table_lists_exactly_as_ipvsadm_does() {
    let mut t = Table::new();
    let web = tcp("10.240.0.210", 80);
    t.insert(
        rr(web),
        [dest("10.240.0.102", 80, 1), dest("10.240.0.101", 80, 1)],
    );
    if let Some(entry) = t.services.get_mut(&web) {
        let busy = Stats {
            active_connections: 2,
            inactive_connections: 5,
            ..Stats::default()
        };
        let key = DestKey {
            address: ip("10.240.0.101"),
            port: 80,
        };
        entry.destination_stats.insert(key, busy);
    }
    t.insert(
        VirtualService {
            flags: ServiceFlags::SCHED1.union(ServiceFlags::SCHED2),
            ..VirtualService::new(tcp("10.240.0.211", 443), Scheduler::Mh)
        },
        [Destination::new(
            ip("10.240.0.103"),
            443,
            ForwardingMethod::Tunnel,
            1,
        )],
    );
    t.insert(
        VirtualService {
            flags: ServiceFlags::PERSISTENT,
            timeout: 300,
            netmask: 24,
            ..VirtualService::new(udp("10.240.0.210", 53), Scheduler::Wrr)
        },
        [Destination::new(
            ip("10.240.0.101"),
            53,
            ForwardingMethod::Masquerade,
            2,
        )],
    );
    t.insert(
        VirtualService {
            flags: ServiceFlags::SCHED2,
            ..VirtualService::new(
                ServiceKey::addr(ip("10.240.0.212"), Protocol::Sctp, 3868),
                Scheduler::Sh,
            )
        },
        [dest("10.240.0.104", 3868, 1)],
    );
    t.insert(
        VirtualService {
            flags: ServiceFlags::PERSISTENT,
            timeout: 60,
            netmask: 64,
            ..rr(tcp("2001:db8::10", 80))
        },
        [dest("2001:db8::101", 80, 1)],
    );
    t.insert(
        VirtualService::new(
            ServiceKey::FwMark {
                family: Family::Inet,
                mark: 5,
            },
            Scheduler::Wlc,
        ),
        [dest("10.240.0.105", 0, 1)],
    );
    t.insert(
        VirtualService {
            flags: ServiceFlags::PERSISTENT.union(ServiceFlags::ONEPACKET),
            timeout: 10,
            ..rr(ServiceKey::FwMark {
                family: Family::Inet6,
                mark: 3,
            })
        },
        [dest("2001:db8::102", 0, 1)],
    );

    // ipvsadm's order: address services by family, protocol number, address, port; then marks.
    let expected = [
        "TCP  10.240.0.210:80 rr",
        "  -> 10.240.0.101:80              Route   1      2          5         ",
        "  -> 10.240.0.102:80              Route   1      0          0         ",
        "TCP  10.240.0.211:443 mh (mh-fallback,mh-port)",
        "  -> 10.240.0.103:443             Tunnel  1      0          0         ",
        "UDP  10.240.0.210:53 wrr persistent 300 mask 255.255.255.0",
        "  -> 10.240.0.101:53              Masq    2      0          0         ",
        "SCTP 10.240.0.212:3868 sh (sh-port)",
        "  -> 10.240.0.104:3868            Route   1      0          0         ",
        "TCP  [2001:db8::10]:80 rr persistent 60 mask 64",
        "  -> [2001:db8::101]:80           Route   1      0          0         ",
        "FWM  3 IPv6 rr persistent 10 ops",
        "  -> [2001:db8::102]:0            Route   1      0          0         ",
        "FWM  5 wlc",
        "  -> 10.240.0.105:0               Route   1      0          0         ",
    ];
    let expected = format!("{HEADER}{}\n", expected.join("\n"));
    assert_eq!(t.listing().to_string(), expected);
}

#[test]
fn scheduler_flags_without_a_scheduler_name_list_as_numbered_flags() {
    let mut t = Table::new();
    t.insert(
        VirtualService {
            flags: ServiceFlags::SCHED1.union(ServiceFlags::SCHED3),
            ..rr(tcp("10.0.0.1", 80))
        },
        [],
    );
    assert_eq!(
        t.listing().to_string(),
        format!("{HEADER}TCP  10.0.0.1:80 rr (flag-1,flag-3)\n")
    );
}

#[test]
fn a_persistent_service_without_a_mask_lists_no_mask() {
    let mut t = Table::new();
    t.insert(
        VirtualService {
            flags: ServiceFlags::PERSISTENT,
            timeout: 360,
            ..rr(tcp("10.0.0.1", 80))
        },
        [],
    );
    assert_eq!(
        t.listing().to_string(),
        format!("{HEADER}TCP  10.0.0.1:80 rr persistent 360\n")
    );
}
