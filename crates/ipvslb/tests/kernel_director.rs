//! Kernel tests of the director: its converger over the real data plane (IPVS over netlink,
//! VIPs on a dummy interface), in the test VM (`cargo xtask vm-test`), as root. `ipvsadm` and
//! `ip` are the witnesses. The tests share one kernel and run one at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use ipvslb::converge::{Converger, Owned};
use ipvslb::dataplane::{Dataplane, Kernel};
use ipvslb_core::ServiceName;
use ipvslb_ipvs::{
    Destination, ForwardingMethod, Protocol, Scheduler, ServiceKey, Table, VirtualService,
};

const INTERFACE: &str = "ipvslbd0";

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

/// A clean kernel: no IPVS services, no test interface (through the witnesses).
fn clean() {
    run("ipvsadm", &["-C"]);
    let _ = Command::new("ip")
        .args(["link", "del", INTERFACE])
        .stderr(std::process::Stdio::null())
        .status();
}

/// The virtual services `ipvsadm` lists, as `TCP  10.240.0.210:80 rr` lines.
fn ipvsadm_services() -> BTreeSet<String> {
    run("ipvsadm", &["-L", "-n"])
        .lines()
        .filter(|l| l.starts_with("TCP") || l.starts_with("UDP"))
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .collect()
}

fn addresses_on(dev: &str) -> BTreeSet<IpAddr> {
    run("ip", &["-o", "addr", "show", "dev", dev, "scope", "global"])
        .lines()
        .filter_map(|line| {
            let mut tokens = line.split_whitespace();
            tokens.find(|t| *t == "inet" || *t == "inet6")?;
            tokens.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

fn key(vip: &str, port: u16) -> ServiceKey {
    ServiceKey::addr(ip(vip), Protocol::Tcp, port)
}

fn table(entries: &[(ServiceKey, Scheduler)]) -> Table {
    let mut t = Table::new();
    for (k, scheduler) in entries {
        t.insert(
            VirtualService::new(*k, scheduler.clone()),
            [Destination::new(
                ip("10.0.0.1"),
                80,
                ForwardingMethod::Masquerade,
                1,
            )],
        );
    }
    t
}

fn pool() -> Owned {
    Owned::new(vec!["10.240.0.208/29".parse().expect("a range")])
}

fn svc(name: &str) -> ServiceName {
    ServiceName::new("default", name)
}

fn converger() -> Converger<Kernel> {
    Converger::new(
        Kernel::open(INTERFACE).expect("the kernel data plane"),
        Duration::ZERO,
    )
}

#[test]
fn a_restarted_director_collects_what_a_deleted_pool_explained_and_spares_a_foreign_neighbour() {
    clean();
    let web = table(&[(key("10.240.0.210", 80), Scheduler::Rr)]);
    let before = converger();
    let seen = before.generation().unwrap();
    before
        .converge_service(&svc("web"), &web, &pool(), seen, Instant::now())
        .unwrap();
    // Not in a pool, not on our interface: someone else's, next door.
    run("ipvsadm", &["-A", "-t", "10.240.0.240:80", "-s", "wlc"]);
    assert_eq!(
        ipvsadm_services(),
        BTreeSet::from([
            "TCP 10.240.0.210:80 rr".to_owned(),
            "TCP 10.240.0.240:80 wlc".to_owned()
        ])
    );
    assert_eq!(
        addresses_on(INTERFACE),
        BTreeSet::from([ip("10.240.0.210")])
    );
    drop(before);

    // The pool is deleted and the director restarts: nothing in memory, no pool.
    let after = converger();
    let since = after.generation().unwrap();
    let report = after
        .converge_all(
            &Table::new(),
            BTreeMap::new(),
            &Owned::new(Vec::new()),
            since,
            Instant::now(),
        )
        .unwrap();
    assert_eq!(report.ops.get("del_service"), Some(&1), "{report:?}");
    assert_eq!(
        ipvsadm_services(),
        BTreeSet::from(["TCP 10.240.0.240:80 wlc".to_owned()])
    );
    assert!(addresses_on(INTERFACE).is_empty());
    clean();
}

#[test]
fn a_full_pass_programs_everything_but_a_virtual_service_whose_scheduler_the_kernel_lacks() {
    clean();
    let c = converger();
    let bad = key("10.240.0.212", 80);
    // The kernel answers a scheduler it has no module for as it does one that does not exist.
    let desired = table(&[
        (key("10.240.0.210", 80), Scheduler::Rr),
        (key("10.240.0.211", 80), Scheduler::Wlc),
        (bad, Scheduler::Other("nosuch".into())),
    ]);
    let by_service = BTreeMap::from([
        (svc("a"), vec![key("10.240.0.210", 80)]),
        (svc("b"), vec![key("10.240.0.211", 80)]),
        (svc("bad"), vec![bad]),
    ]);
    let since = c.generation().unwrap();
    let report = c
        .converge_all(&desired, by_service, &pool(), since, Instant::now())
        .expect("one refused virtual service does not fail the pass");
    assert_eq!(report.failures.len(), 1, "{report:?}");
    let failure = &report.failures[0];
    assert_eq!(failure.service, Some(svc("bad")));
    assert_eq!(failure.key, bad);
    assert!(
        failure.message.contains("No such file or directory"),
        "{}",
        failure.message
    );
    assert_eq!(
        ipvsadm_services(),
        BTreeSet::from([
            "TCP 10.240.0.210:80 rr".to_owned(),
            "TCP 10.240.0.211:80 wlc".to_owned()
        ])
    );
    let dests = run("ipvsadm", &["-L", "-n", "-t", "10.240.0.211:80"]);
    assert!(dests.contains("10.0.0.1:80"), "{dests}");
    clean();
}

#[test]
fn an_existing_interface_ipvslb_did_not_create_is_refused_and_kube_proxys_is_warned_of() {
    clean();
    let _ = Command::new("ip")
        .args(["link", "del", "kube-ipvs0"])
        .stderr(std::process::Stdio::null())
        .status();
    // kube-proxy's IPVS mode: a dummy interface holding the LoadBalancer IPs.
    run("ip", &["link", "add", "kube-ipvs0", "type", "dummy"]);
    run(
        "ip",
        &["addr", "add", "10.240.0.210/32", "dev", "kube-ipvs0"],
    );
    let err = Kernel::open("kube-ipvs0")
        .err()
        .expect("kube-proxy's interface is not adopted");
    let text = err.to_string();
    assert!(
        text.contains("kube-ipvs0") && text.contains("not created by ipvslb"),
        "{text}"
    );
    assert_eq!(
        addresses_on("kube-ipvs0"),
        BTreeSet::from([ip("10.240.0.210")]),
        "its addresses are untouched"
    );

    // The interface ipvslb creates carries the mark, and is adopted again after a restart.
    let kernel = Kernel::open(INTERFACE).expect("created");
    let details = run("ip", &["-d", "link", "show", "dev", INTERFACE]);
    assert!(details.contains("alias ipvslb"), "{details}");
    let conflicts = kernel.conflicts().unwrap();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert!(conflicts[0].contains("kube-ipvs0"), "{}", conflicts[0]);
    drop(kernel);
    let again = Kernel::open(INTERFACE).expect("adopted: it is ours");
    run("ip", &["link", "del", "kube-ipvs0"]);
    assert!(again.conflicts().unwrap().is_empty());

    // A dummy interface someone else made under our name is refused too.
    clean();
    run("ip", &["link", "add", INTERFACE, "type", "dummy"]);
    assert!(Kernel::open(INTERFACE).is_err());
    clean();
}

#[test]
fn retiring_removes_the_directors_entries_and_addresses_and_leaves_foreign_ones() {
    clean();
    let c = converger();
    let web = table(&[
        (key("10.240.0.210", 80), Scheduler::Rr),
        (key("10.240.0.211", 443), Scheduler::Wlc),
    ]);
    c.converge_service(
        &svc("web"),
        &web,
        &pool(),
        c.generation().unwrap(),
        Instant::now(),
    )
    .unwrap();
    drop(c);
    run("ipvsadm", &["-A", "-t", "192.0.2.1:80", "-s", "wlc"]);
    run("ipvsadm", &["-A", "-t", "10.240.0.240:80", "-s", "rr"]);
    let kernel = Kernel::open_existing(INTERFACE).expect("the director's interface");
    // As `--no-cluster`: no pool known, the interface alone says what is ours.
    let text = ipvslb::retire::retire_on(kernel, &Owned::default(), INTERFACE).expect("retired");
    assert_eq!(
        text,
        "removed virtual service TCP 10.240.0.210:80\n\
         removed virtual service TCP 10.240.0.211:443\n\
         removed address 10.240.0.210 from ipvslbd0\n\
         removed address 10.240.0.211 from ipvslbd0\n"
    );
    assert_eq!(
        ipvsadm_services(),
        BTreeSet::from([
            "TCP 10.240.0.240:80 rr".to_owned(),
            "TCP 192.0.2.1:80 wlc".to_owned()
        ])
    );
    assert!(addresses_on(INTERFACE).is_empty());
    // Nothing left: a second retire says so.
    let kernel = Kernel::open_existing(INTERFACE).expect("still there");
    assert_eq!(
        ipvslb::retire::retire_on(kernel, &pool(), INTERFACE).unwrap(),
        "nothing of this director's was left\n"
    );
    clean();
    assert!(Kernel::open_existing(INTERFACE).is_err(), "never created");
}

/// No L2 test segment: neither `l2a` nor the peer's namespace.
fn remove_segment() {
    for args in [["link", "del", "l2a"], ["netns", "del", "l2peer"]] {
        let _ = Command::new("ip")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Runs a witness in network namespace `ns`.
fn in_ns(ns: &str, args: &[&str]) -> String {
    let net = format!("--net=/run/netns/{ns}");
    let mut all = vec![net.as_str()];
    all.extend_from_slice(args);
    run("nsenter", &all)
}

/// The MAC address `ns`'s neighbour table holds for `address` on `dev`, if any.
fn neighbour(ns: &str, dev: &str, address: &str) -> Option<String> {
    let text = in_ns(ns, &["ip", "neigh", "show", address, "dev", dev]);
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "lladdr")
        .map(|w| w[1].to_owned())
}

fn mac_of(dev: &str) -> String {
    let text = run("ip", &["-o", "link", "show", "dev", dev]);
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "link/ether")
        .map(|w| w[1].to_owned())
        .expect("an Ethernet address")
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn in_l2_mode_only_the_elected_vips_are_answered_the_segment_is_told_and_a_dead_directors_claims_expire()
 {
    use ipvslb::election::Election;
    use ipvslb_api::Announce;
    clean();
    remove_segment();
    // The segment: l2a here, l2b in the peer's namespace, whose neighbour entries for the VIPs
    // point elsewhere (as a client's do after another director held them): only the
    // announcements (gratuitous ARP, an advertisement with the override flag) can move them,
    // for the peer sends nothing itself.
    run("ip", &["netns", "add", "l2peer"]);
    run(
        "ip",
        &[
            "link", "add", "l2a", "type", "veth", "peer", "name", "l2b", "netns", "l2peer",
        ],
    );
    run("ip", &["addr", "add", "10.77.0.1/24", "dev", "l2a"]);
    run(
        "ip",
        &["addr", "add", "fd00:77::1/64", "dev", "l2a", "nodad"],
    );
    run("ip", &["link", "set", "l2a", "up"]);
    in_ns(
        "l2peer",
        &["ip", "addr", "add", "10.77.0.2/24", "dev", "l2b"],
    );
    in_ns(
        "l2peer",
        &["ip", "addr", "add", "fd00:77::2/64", "dev", "l2b", "nodad"],
    );
    in_ns("l2peer", &["ip", "link", "set", "l2b", "up"]);
    for vip in ["10.77.0.201", "10.77.0.202", "fd00:77::201"] {
        in_ns(
            "l2peer",
            &[
                "ip",
                "neigh",
                "replace",
                vip,
                "lladdr",
                "02:00:00:00:00:99",
                "dev",
                "l2b",
                "nud",
                "stale",
            ],
        );
    }
    let kernel = Kernel::open(INTERFACE)
        .and_then(|k| k.announcing_l2_on("l2a"))
        .expect("the kernel data plane in L2 mode on l2a");
    for (name, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
        let set = std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/l2a/{name}")).unwrap();
        assert_eq!(set.trim(), value, "{name}");
    }
    let c = Converger::new(kernel, Duration::ZERO);
    // The claim's deadline, which the Lease task keeps pushing forward in a running director.
    let far = || Some(Instant::now() + Duration::from_secs(3600));
    c.dataplane().hold_until(far());
    let ranges: Vec<ipvslb_core::IpRange> = vec![
        "10.77.0.200/29".parse().unwrap(),
        "fd00:77::200/125".parse().unwrap(),
    ];
    let owned =
        Owned::new(ranges.clone()).announcing(ranges.iter().map(|r| (*r, Announce::L2)).collect());
    let vips = ["10.77.0.201", "10.77.0.202", "fd00:77::201"];
    let mut all = Table::new();
    let mut by_service = BTreeMap::new();
    for (i, vip) in vips.iter().enumerate() {
        // A destination of the VIP's own family, or the kernel refuses the service.
        let backend = if vip.contains(':') {
            "fd00:77::10"
        } else {
            "10.77.0.10"
        };
        let mut part = Table::new();
        part.insert(
            VirtualService::new(key(vip, 80), Scheduler::Rr),
            [Destination::new(
                ip(backend),
                80,
                ForwardingMethod::Route,
                1,
            )],
        );
        all.services.extend(part.services.clone());
        by_service.insert(
            svc(&format!("s{i}")),
            part.services.keys().copied().collect(),
        );
    }
    c.converge_all(
        &all,
        by_service,
        &owned,
        c.generation().unwrap(),
        Instant::now(),
    )
    .unwrap();
    // Programmed, on ipvslb's interface, and answered nowhere until elected.
    assert_eq!(
        addresses_on(INTERFACE),
        vips.iter().map(|v| ip(v)).collect()
    );
    assert!(
        addresses_on("l2a")
            .iter()
            .all(|a| !vips.contains(&a.to_string().as_str()))
    );

    c.elect(Election {
        me: "d1".into(),
        live: ["d1".to_owned()].into(),
    })
    .unwrap();
    let here = mac_of("l2a");
    for vip in vips {
        assert!(addresses_on("l2a").contains(&ip(vip)), "{vip} on l2a");
        // Only the announcement can have told the peer: it sent nothing itself.
        wait_until(
            &format!("the peer to learn {vip} from the announcement"),
            Duration::from_secs(3),
            || neighbour("l2peer", "l2b", vip).as_deref() == Some(here.as_str()),
        );
    }

    // Another director wins some: they leave l2a (still served from ipvslb's interface).
    let both = Election {
        me: "d1".into(),
        live: ["d1".to_owned(), "d2".to_owned()].into(),
    };
    c.elect(both.clone()).unwrap();
    for vip in vips {
        assert_eq!(
            addresses_on("l2a").contains(&ip(vip)),
            both.wins(&ip(vip)),
            "{vip}"
        );
        assert!(addresses_on(INTERFACE).contains(&ip(vip)));
    }
    let kept: Vec<&str> = vips.iter().copied().filter(|v| both.wins(&ip(v))).collect();

    // Alone again, then a Service goes in a full pass: its VIP leaves ipvslb's interface and
    // the segment both (the full pass removes the address before it reconsiders the
    // announcements, so the segment must still know the VIP as its own).
    c.elect(Election {
        me: "d1".into(),
        live: ["d1".to_owned()].into(),
    })
    .unwrap();
    let mut fewer = all.clone();
    fewer.services.remove(&key(vips[0], 80));
    let mut by_service = BTreeMap::new();
    for (i, vip) in vips.iter().enumerate().skip(1) {
        by_service.insert(svc(&format!("s{i}")), vec![key(vip, 80)]);
    }
    c.converge_all(
        &fewer,
        by_service,
        &owned,
        c.generation().unwrap(),
        Instant::now(),
    )
    .unwrap();
    assert!(!addresses_on(INTERFACE).contains(&ip(vips[0])));
    assert!(
        !addresses_on("l2a").contains(&ip(vips[0])),
        "{} left on the segment",
        vips[0]
    );
    let vips = &vips[1..];

    // The claim's deadline passes (the Lease task is stuck, or gone) while the converger
    // still counts itself elected: the data plane lets go by itself, within a refresh.
    c.dataplane().hold_until(Some(Instant::now()));
    let lapsed = Instant::now();
    wait_until(
        "the lapsed claim to be withdrawn",
        Duration::from_secs(1),
        || vips.iter().all(|v| !addresses_on("l2a").contains(&ip(v))),
    );
    println!("a lapsed claim withdrawn after {:?}", lapsed.elapsed());
    // A new deadline, and the next full pass announces them again.
    c.dataplane().hold_until(far());
    c.converge_all(
        &fewer,
        {
            let mut by_service = BTreeMap::new();
            for (i, vip) in vips.iter().enumerate() {
                by_service.insert(svc(&format!("s{}", i + 1)), vec![key(vip, 80)]);
            }
            by_service
        },
        &owned,
        c.generation().unwrap(),
        Instant::now(),
    )
    .unwrap();
    assert!(vips.iter().all(|v| addresses_on("l2a").contains(&ip(v))));

    // The director dies without a word: the kernel drops its claims by itself once their
    // lifetime ends, and keeps serving them on ipvslb's interface.
    c.elect(Election {
        me: "d1".into(),
        live: ["d1".to_owned()].into(),
    })
    .unwrap();
    drop(c);
    let died = Instant::now();
    wait_until("the claims to expire", Duration::from_secs(4), || {
        vips.iter().all(|v| !addresses_on("l2a").contains(&ip(v)))
    });
    println!(
        "claims expired {:?} after the director was gone (kept before: {kept:?})",
        died.elapsed()
    );
    assert_eq!(
        addresses_on(INTERFACE),
        vips.iter().map(|v| ip(v)).collect()
    );
    remove_segment();
    clean();
}
