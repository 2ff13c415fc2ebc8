//! The allocator driven as a script: each table runs in order against one allocator, each row a
//! sentence saying what should happen.

mod common;

use std::net::IpAddr;

use ipvslb_core::alloc::{AllocError, Allocator, Assignment, PoolProblem, allocate_all};
use ipvslb_core::{
    FamilyPolicy, IpFamily, IpRange, PoolSpec, PortKey, Requested, Selector, ServiceAllocation,
    ServiceClaim, ServiceName,
};
use ipvslb_ipvs::Protocol;

// ---------------------------------------------------------------------------------------------
// Builders

fn name(path: &str) -> ServiceName {
    match path.split_once('/') {
        Some((ns, n)) => ServiceName::new(ns, n),
        None => ServiceName::new("default", path),
    }
}

fn addr(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn svc(path: &str) -> ServiceClaim {
    let name = name(path);
    common::claim(&name.namespace, &name.name, 0)
}

fn tcp(port: u16) -> PortKey {
    PortKey {
        protocol: Protocol::Tcp,
        port,
    }
}

trait ClaimExt: Sized {
    fn ips(self, ips: &[&str]) -> Self;
    fn malformed(self) -> Self;
    fn pool(self, pool: &str) -> Self;
    fn key(self, key: &str) -> Self;
    fn ports(self, ports: &[u16]) -> Self;
    fn families(self, families: FamilyPolicy) -> Self;
    fn current(self, ips: &[&str]) -> Self;
    fn created(self, at: i64) -> Self;
    fn label(self, k: &str, v: &str) -> Self;
    fn ns_label(self, k: &str, v: &str) -> Self;
}

impl ClaimExt for ServiceClaim {
    fn ips(mut self, ips: &[&str]) -> Self {
        self.requested = Requested::Addresses(ips.iter().map(|s| addr(s)).collect());
        self
    }
    fn malformed(mut self) -> Self {
        self.requested = Requested::Malformed(
            "ipvslb.io/load-balancer-ips: \"10.0.0.x\" is not an address".into(),
        );
        self
    }
    fn pool(mut self, pool: &str) -> Self {
        self.pool = Some(pool.into());
        self
    }
    fn key(mut self, key: &str) -> Self {
        self.sharing_key = Some(key.into());
        self
    }
    fn ports(mut self, ports: &[u16]) -> Self {
        self.ports = ports.iter().map(|p| tcp(*p)).collect();
        self
    }
    fn families(mut self, families: FamilyPolicy) -> Self {
        self.families = families;
        self
    }
    fn current(mut self, ips: &[&str]) -> Self {
        self.current = ips.iter().map(|s| addr(s)).collect();
        self
    }
    fn created(mut self, at: i64) -> Self {
        self.created = at;
        self
    }
    fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }
    fn ns_label(mut self, k: &str, v: &str) -> Self {
        std::sync::Arc::make_mut(&mut self.namespace_labels).insert(k.into(), v.into());
        self
    }
}

fn pool(name: &str, ranges: &[&str]) -> PoolSpec {
    common::pool(name, 0, ranges)
}

fn selective(mut spec: PoolSpec, priority: i32, namespaces: &[&str]) -> PoolSpec {
    spec.service_allocation = Some(ServiceAllocation {
        priority,
        namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
        ..ServiceAllocation::default()
    });
    spec
}

fn selector(k: &str, v: &str) -> Selector {
    Selector {
        match_labels: [(k.to_string(), v.to_string())].into(),
        ..Selector::default()
    }
}

const V6: FamilyPolicy = FamilyPolicy::SingleStack {
    primary: IpFamily::V6,
};
const PREFER: FamilyPolicy = FamilyPolicy::PreferDualStack {
    primary: IpFamily::V4,
};
const REQUIRE: FamilyPolicy = FamilyPolicy::RequireDualStack {
    primary: IpFamily::V4,
};
const REQUIRE_V6_FIRST: FamilyPolicy = FamilyPolicy::RequireDualStack {
    primary: IpFamily::V6,
};

// ---------------------------------------------------------------------------------------------
// The script runner

enum Op {
    Assign(ServiceClaim),
    Restore(ServiceClaim),
    Release(&'static str),
}

enum Want {
    /// These addresses, in this order.
    Got(&'static [&'static str]),
    /// Any addresses from this pool.
    From(&'static str),
    /// Addresses from this pool, in this order.
    FromGot(&'static str, &'static [&'static str]),
    /// An error of this variant whose message contains each of these.
    Fails(&'static str, &'static [&'static str]),
    /// A release that found nothing.
    Nothing,
}

struct Row {
    says: &'static str,
    op: Op,
    want: Want,
}

fn assign(says: &'static str, claim: ServiceClaim, want: Want) -> Row {
    Row {
        says,
        op: Op::Assign(claim),
        want,
    }
}

fn restore(says: &'static str, claim: ServiceClaim, want: Want) -> Row {
    Row {
        says,
        op: Op::Restore(claim),
        want,
    }
}

fn release(says: &'static str, path: &'static str, want: Want) -> Row {
    Row {
        says,
        op: Op::Release(path),
        want,
    }
}

fn run(allocator: &mut Allocator, rows: Vec<Row>) {
    for row in rows {
        let result: Option<Result<Assignment, AllocError>> = match &row.op {
            Op::Assign(claim) | Op::Restore(claim) => {
                let before = claim.clone();
                let result = match &row.op {
                    Op::Assign(_) => allocator.assign(claim),
                    _ => allocator.restore(claim),
                };
                assert_eq!(&before, claim, "{}: the claim was changed", row.says);
                if let Ok(a) = &result {
                    assert_eq!(
                        allocator.assignment(&claim.name),
                        Some(a),
                        "{}: the allocator does not record what it returned",
                        row.says
                    );
                }
                Some(result)
            }
            Op::Release(path) => allocator.release(&name(path)).map(Ok),
        };
        check(row.says, result, &row.want);
    }
}

fn check(says: &str, result: Option<Result<Assignment, AllocError>>, want: &Want) {
    let addrs = |a: &Assignment| {
        a.addresses
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
    };
    match (result, want) {
        (None, Want::Nothing) => {}
        (Some(Ok(a)), Want::Got(expected)) => assert_eq!(addrs(&a), *expected, "{says}"),
        (Some(Ok(a)), Want::From(pool)) => assert_eq!(a.pool, *pool, "{says}"),
        (Some(Ok(a)), Want::FromGot(pool, expected)) => {
            assert_eq!(
                (a.pool.as_str(), addrs(&a)),
                (*pool, expected.iter().map(|s| s.to_string()).collect()),
                "{says}"
            )
        }
        (Some(Err(e)), Want::Fails(variant, parts)) => {
            let debug = format!("{e:?}");
            let message = e.to_string();
            assert!(
                debug.starts_with(variant),
                "{says}: expected {variant}, got {debug}"
            );
            for part in *parts {
                assert!(
                    message.contains(part),
                    "{says}: {message:?} does not mention {part:?}"
                );
            }
        }
        (result, _) => panic!("{says}: unexpected outcome {result:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Scripts

#[test]
fn requested_addresses_are_given_once_and_refused_with_a_reason() {
    let (mut a, problems) = Allocator::new(vec![
        pool("a", &["10.0.0.0/29"]),
        pool("b", &["10.0.1.0/29"]),
    ]);
    assert!(problems.is_empty());
    run(
        &mut a,
        vec![
            assign(
                "s1 gets the address it asks for",
                svc("s1").ips(&["10.0.0.5"]),
                Want::FromGot("a", &["10.0.0.5"]),
            ),
            assign(
                "s1 asking again gets the same",
                svc("s1").ips(&["10.0.0.5"]),
                Want::Got(&["10.0.0.5"]),
            ),
            assign(
                "s2 can't take s1's IP",
                svc("s2").ips(&["10.0.0.5"]),
                Want::Fails("RequestedInUse", &["10.0.0.5", "default/s1"]),
            ),
            release("s1 frees it", "s1", Want::Got(&["10.0.0.5"])),
            release("s1 freeing it twice finds nothing", "s1", Want::Nothing),
            assign(
                "s2 can take it now",
                svc("s2").ips(&["10.0.0.5"]),
                Want::Got(&["10.0.0.5"]),
            ),
            assign(
                "s2 asking for another address moves there",
                svc("s2").ips(&["10.0.0.6"]),
                Want::Got(&["10.0.0.6"]),
            ),
            assign(
                "s3 gets the address s2 left",
                svc("s3").ips(&["10.0.0.5"]),
                Want::Got(&["10.0.0.5"]),
            ),
            assign(
                "an address outside every pool is refused",
                svc("s4").ips(&["192.168.7.7"]),
                Want::Fails("RequestedNotInPool", &["192.168.7.7"]),
            ),
            assign(
                "two IPv4 addresses are refused",
                svc("s4").families(PREFER).ips(&["10.0.0.1", "10.0.0.2"]),
                Want::Fails("TwoOfOneFamily", &["10.0.0.1", "10.0.0.2", "IPv4"]),
            ),
            assign(
                "three addresses are refused",
                svc("s4")
                    .families(PREFER)
                    .ips(&["10.0.0.1", "10.0.0.2", "2001:db8::1"]),
                Want::Fails("TooManyRequested", &["3 addresses"]),
            ),
            assign(
                "an IPv6 address for a single-stack IPv4 Service is refused",
                svc("s4").ips(&["2001:db8::1"]),
                Want::Fails("FamilyNotWanted", &["2001:db8::1", "single-stack IPv4"]),
            ),
            assign(
                "addresses from two pools are refused",
                svc("s4").families(PREFER).ips(&["10.0.0.1", "2001:db8::1"]),
                Want::Fails("RequestedNotInPool", &["2001:db8::1"]),
            ),
            assign(
                "an address outside the named pool is refused",
                svc("s4").pool("b").ips(&["10.0.0.1"]),
                Want::Fails("RequestedNotInNamedPool", &["10.0.0.1", "pool b"]),
            ),
            assign(
                "an unknown pool is refused",
                svc("s4").pool("nope"),
                Want::Fails("UnknownPool", &["nope"]),
            ),
            assign(
                "an unknown pool is refused with a request too",
                svc("s4").pool("nope").ips(&["10.0.0.1"]),
                Want::Fails("UnknownPool", &["nope"]),
            ),
            assign(
                "an address inside the named pool is given",
                svc("s4").pool("b").ips(&["10.0.1.3"]),
                Want::FromGot("b", &["10.0.1.3"]),
            ),
            assign(
                "a malformed request without an address is an error",
                svc("s5").malformed(),
                Want::Fails("MalformedRequest", &["10.0.0.x"]),
            ),
            assign(
                "a malformed request keeps the address held",
                svc("s4").malformed(),
                Want::Got(&["10.0.1.3"]),
            ),
            assign(
                "dropping the request keeps the address",
                svc("s4"),
                Want::Got(&["10.0.1.3"]),
            ),
            assign(
                "naming another pool moves the Service",
                svc("s4").pool("a"),
                Want::FromGot("a", &["10.0.0.0"]),
            ),
        ],
    );
}

#[test]
fn addresses_in_two_pools_are_refused_naming_both() {
    let (mut a, _) = Allocator::new(vec![
        pool("a", &["10.0.0.0/29"]),
        pool("b", &["10.0.1.0/29"]),
    ]);
    run(
        &mut a,
        vec![assign(
            "s1 asking for one address in each pool is refused",
            svc("s1").families(PREFER).ips(&["10.0.0.1", "10.0.1.1"]),
            Want::Fails("TwoOfOneFamily", &[]),
        )],
    );
    let (mut a, _) = Allocator::new(vec![
        pool("a", &["10.0.0.0/29"]),
        pool("b", &["2001:db8::/126"]),
    ]);
    run(
        &mut a,
        vec![assign(
            "s1 asking for an IPv4 of pool a and an IPv6 of pool b is refused",
            svc("s1")
                .families(REQUIRE)
                .ips(&["10.0.0.1", "2001:db8::1"]),
            Want::Fails(
                "RequestedInDifferentPools",
                &["10.0.0.1", "pool a", "2001:db8::1", "pool b"],
            ),
        )],
    );
}

#[test]
fn the_lowest_free_address_goes_first_until_the_pool_runs_out() {
    let (mut a, _) = Allocator::new(vec![pool("small", &["10.0.0.0/30"])]);
    run(
        &mut a,
        vec![
            assign(
                "s1 gets the first address",
                svc("s1"),
                Want::Got(&["10.0.0.0"]),
            ),
            assign("s2 gets the second", svc("s2"), Want::Got(&["10.0.0.1"])),
            assign("s3 gets the third", svc("s3"), Want::Got(&["10.0.0.2"])),
            assign("s4 gets the last", svc("s4"), Want::Got(&["10.0.0.3"])),
            assign(
                "s1 asking again keeps its address",
                svc("s1"),
                Want::Got(&["10.0.0.0"]),
            ),
            assign(
                "s5 finds the pool exhausted",
                svc("s5"),
                Want::Fails("PoolExhausted", &["pool small", "IPv4"]),
            ),
            release("s2 frees its address", "s2", Want::Got(&["10.0.0.1"])),
            assign(
                "s5 gets the freed address",
                svc("s5"),
                Want::Got(&["10.0.0.1"]),
            ),
            assign(
                "s6 asking for IPv6 finds no IPv6 range",
                svc("s6").families(V6),
                Want::Fails("FamilyUnavailable", &["pool small", "IPv6"]),
            ),
        ],
    );
    let usage = a.usage("small").expect("pool exists");
    assert_eq!((usage.assigned_v4, usage.available_v4), (4, 0));
}

#[test]
fn services_with_one_sharing_key_share_an_address_when_ports_differ() {
    let (mut a, _) = Allocator::new(vec![pool("a", &["10.0.0.0/29"])]);
    run(
        &mut a,
        vec![
            assign(
                "s1 with key k on port 80 gets the first address",
                svc("s1").key("k").ports(&[80]),
                Want::Got(&["10.0.0.0"]),
            ),
            assign(
                "s2 with key k on port 443 shares it",
                svc("s2").key("k").ports(&[443]),
                Want::Got(&["10.0.0.0"]),
            ),
            assign(
                "s3 with key k on port 80 gets a fresh address",
                svc("s3").key("k").ports(&[80]),
                Want::Got(&["10.0.0.1"]),
            ),
            assign(
                "s4 without a key can't take s1's IP",
                svc("s4").ips(&["10.0.0.0"]),
                Want::Fails("RequestedInUse", &["10.0.0.0", "allow-shared-ip"]),
            ),
            assign(
                "s4 with another key can't take s1's IP",
                svc("s4").key("other").ips(&["10.0.0.0"]),
                Want::Fails("RequestedInUse", &["10.0.0.0"]),
            ),
            assign(
                "s4 with key k on port 443 can't take s1's IP",
                svc("s4").key("k").ports(&[443]).ips(&["10.0.0.0"]),
                Want::Fails("SharingConflict", &["10.0.0.0", "default/s2", "TCP/443"]),
            ),
            assign(
                "s4 with key k on port 8080 may",
                svc("s4").key("k").ports(&[8080]).ips(&["10.0.0.0"]),
                Want::Got(&["10.0.0.0"]),
            ),
            assign(
                "s5 without a key gets an unshared address",
                svc("s5"),
                Want::Got(&["10.0.0.2"]),
            ),
            assign(
                "s6 with key k can't join s5's unshared address",
                svc("s6").key("k").ips(&["10.0.0.2"]),
                Want::Fails("RequestedInUse", &["default/s5"]),
            ),
            release("s1 leaves", "s1", Want::Got(&["10.0.0.0"])),
            assign(
                "the address stays held by its other sharers",
                svc("s7").ips(&["10.0.0.0"]),
                Want::Fails("RequestedInUse", &["10.0.0.0"]),
            ),
            assign(
                "s2 moving to port 8080 collides with s4 and moves",
                svc("s2").key("k").ports(&[8080]),
                Want::Got(&["10.0.0.1"]),
            ),
            release("s4 leaves", "s4", Want::Got(&["10.0.0.0"])),
            assign(
                "with every sharer gone the address is free for anyone",
                svc("s7").ips(&["10.0.0.0"]),
                Want::Got(&["10.0.0.0"]),
            ),
        ],
    );
}

#[test]
fn dual_stack_policies_take_both_families_or_fall_back_as_they_say() {
    let (mut a, _) = Allocator::new(vec![
        pool("ds", &["10.0.0.0/31", "2001:db8::/127"]),
        pool("v4only", &["10.1.0.0/30"]).pool_manual(),
    ]);
    run(
        &mut a,
        vec![
            assign(
                "a RequireDualStack Service gets one of each, primary first",
                svc("r1").families(REQUIRE),
                Want::FromGot("ds", &["10.0.0.0", "2001:db8::"]),
            ),
            assign(
                "an IPv6-primary Service lists IPv6 first",
                svc("r2").families(REQUIRE_V6_FIRST),
                Want::Got(&["2001:db8::1", "10.0.0.1"]),
            ),
            assign(
                "RequireDualStack from an IPv4-only pool is refused",
                svc("r3").families(REQUIRE).pool("v4only"),
                Want::Fails("FamilyUnavailable", &["v4only", "IPv6"]),
            ),
            assign(
                "RequireDualStack with IPv6 exhausted takes nothing",
                svc("r3").families(REQUIRE),
                Want::Fails("PoolExhausted", &["pool ds"]),
            ),
            assign(
                "PreferDualStack with both exhausted fails",
                svc("p1").families(PREFER),
                Want::Fails("PoolExhausted", &["pool ds", "IPv4"]),
            ),
            release("r1 leaves", "r1", Want::Got(&["10.0.0.0", "2001:db8::"])),
            assign(
                "PreferDualStack gets both when it can",
                svc("p1").families(PREFER),
                Want::Got(&["10.0.0.0", "2001:db8::"]),
            ),
            release("r2 leaves", "r2", Want::Got(&["2001:db8::1", "10.0.0.1"])),
            assign(
                "a single-stack IPv6 Service takes the last IPv6 address",
                svc("s6").families(V6),
                Want::Got(&["2001:db8::1"]),
            ),
            assign(
                "PreferDualStack settles for IPv4 when IPv6 is gone",
                svc("p2").families(PREFER),
                Want::Got(&["10.0.0.1"]),
            ),
            release("the IPv6 Service leaves", "s6", Want::Got(&["2001:db8::1"])),
            assign(
                "PreferDualStack gains IPv6 on the next pass, keeping its IPv4",
                svc("p2").families(PREFER),
                Want::Got(&["10.0.0.1", "2001:db8::1"]),
            ),
            release("p2 leaves", "p2", Want::Got(&["10.0.0.1", "2001:db8::1"])),
            assign(
                "RequireDualStack asking for one address gets the other family from its pool",
                svc("r4").families(REQUIRE).ips(&["2001:db8::1"]),
                Want::Got(&["10.0.0.1", "2001:db8::1"]),
            ),
        ],
    );
    let usage = a.usage("ds").expect("pool exists");
    assert_eq!((usage.assigned_v4, usage.assigned_v6), (2, 2));
    assert_eq!((usage.available_v4, usage.available_v6), (0, 0));
}

trait Manual {
    fn pool_manual(self) -> Self;
}

impl Manual for PoolSpec {
    fn pool_manual(mut self) -> Self {
        self.auto_assign = false;
        self
    }
}

#[test]
fn selective_pools_serve_matching_services_by_priority_and_no_one_else() {
    let mut silver = selective(pool("silver", &["10.2.0.0/29"]), 20, &[]);
    if let Some(sa) = &mut silver.service_allocation {
        sa.service_selectors = vec![selector("tier", "web")];
    }
    let mut bronze = selective(pool("bronze", &["10.3.0.0/29"]), 5, &[]);
    if let Some(sa) = &mut bronze.service_allocation {
        sa.namespace_selectors = vec![selector("team", "blue")];
    }
    let (mut a, _) = Allocator::new(vec![
        selective(pool("gold", &["10.1.0.0/29"]), 10, &["prod"]),
        silver,
        bronze,
        pool("general", &["10.9.0.0/31"]),
        pool("manual", &["10.8.0.0/29"]).pool_manual(),
    ]);
    run(
        &mut a,
        vec![
            assign(
                "a prod web Service gets silver, the higher priority",
                svc("prod/web").label("tier", "web"),
                Want::From("silver"),
            ),
            assign(
                "a prod api Service gets gold",
                svc("prod/api"),
                Want::From("gold"),
            ),
            assign(
                "a web Service elsewhere gets silver",
                svc("dev/web").label("tier", "web"),
                Want::From("silver"),
            ),
            assign(
                "a Service in a blue-labelled namespace gets bronze",
                svc("blue/x").ns_label("team", "blue"),
                Want::From("bronze"),
            ),
            assign(
                "any other Service gets general",
                svc("dev/x1"),
                Want::FromGot("general", &["10.9.0.0"]),
            ),
            assign(
                "another gets general too",
                svc("dev/x2"),
                Want::FromGot("general", &["10.9.0.1"]),
            ),
            assign(
                "when general runs out, gold is still not used for dev",
                svc("dev/x3"),
                Want::Fails("PoolExhausted", &["pool general"]),
            ),
            assign(
                "naming gold with the annotation does not open it to dev",
                svc("dev/x3").pool("gold"),
                Want::Fails(
                    "PoolNotForService",
                    &["pool gold serves only namespaces prod", "dev/x3"],
                ),
            ),
            assign(
                "requesting a gold address is refused the same way",
                svc("dev/x4").ips(&["10.1.0.7"]),
                Want::Fails(
                    "PoolNotForService",
                    &["address 10.1.0.7 is in pool gold", "namespaces prod"],
                ),
            ),
            assign(
                "nor do both together",
                svc("dev/x4").pool("gold").ips(&["10.1.0.7"]),
                Want::Fails("PoolNotForService", &["gold"]),
            ),
            assign(
                "a manual pool serves an explicit request",
                svc("dev/x4").ips(&["10.8.0.3"]),
                Want::FromGot("manual", &["10.8.0.3"]),
            ),
            assign(
                "a manual pool serves a pool annotation",
                svc("dev/x5").pool("manual"),
                Want::FromGot("manual", &["10.8.0.0"]),
            ),
        ],
    );

    let (mut only_manual, _) = Allocator::new(vec![pool("manual", &["10.8.0.0/29"]).pool_manual()]);
    let (mut only_gold, _) = Allocator::new(vec![selective(
        pool("gold", &["10.1.0.0/29"]),
        10,
        &["prod"],
    )]);
    let (mut none, _) = Allocator::new(Vec::new());
    run(
        &mut only_manual,
        vec![assign(
            "with only a manual pool nothing auto-assigns",
            svc("s1"),
            Want::Fails("NoPoolAvailable", &["autoAssign"]),
        )],
    );
    run(
        &mut only_gold,
        vec![assign(
            "with only a prod pool a dev Service finds none that selects it",
            svc("dev/s1"),
            Want::Fails("NoPoolAvailable", &["serviceAllocation"]),
        )],
    );
    run(
        &mut none,
        vec![assign(
            "with no pools at all the message says so",
            svc("s1"),
            Want::Fails("NoPoolAvailable", &["no IPPool"]),
        )],
    );
}

#[test]
fn avoid_buggy_ips_skips_dot_zero_and_dot_255() {
    let mut edge = pool("edge", &["10.0.0.254-10.0.1.1", "10.0.2.255/32"]);
    edge.avoid_buggy_ips = true;
    let (mut a, problems) = Allocator::new(vec![edge]);
    assert_eq!(
        problems,
        vec![PoolProblem::NothingUsable {
            pool: "edge".into(),
            range: "10.0.2.255".parse().expect("range"),
        }]
    );
    let usage = a.usage("edge").expect("pool exists");
    assert_eq!(usage.available_v4, 2);
    run(
        &mut a,
        vec![
            assign("s1 gets .254", svc("s1"), Want::Got(&["10.0.0.254"])),
            assign(
                "s2 skips .255 and .0 and gets .1",
                svc("s2"),
                Want::Got(&["10.0.1.1"]),
            ),
            assign(
                "s3 finds nothing left",
                svc("s3"),
                Want::Fails("PoolExhausted", &["edge"]),
            ),
            assign(
                "s3 can't ask for .0 either",
                svc("s3").ips(&["10.0.1.0"]),
                Want::Fails("AvoidedAddress", &["10.0.1.0", "avoidBuggyIPs"]),
            ),
            release("s1 leaves", "s1", Want::Got(&["10.0.0.254"])),
            assign("s3 gets .254 back", svc("s3"), Want::Got(&["10.0.0.254"])),
        ],
    );

    let mut wide = pool("wide", &["10.0.0.0/16"]);
    wide.avoid_buggy_ips = true;
    let (a, _) = Allocator::new(vec![wide]);
    assert_eq!(a.usage("wide").expect("pool").available_v4, 65536 - 512);
}

#[test]
fn overlapping_and_empty_pools_are_reported_and_the_older_pool_keeps_only_the_shared_stretch() {
    // Created in the same second: the name that sorts first counts as older.
    let (a, problems) = Allocator::new(vec![
        pool("b", &["10.0.0.128/25", "10.0.1.0/24"]),
        pool("a", &["10.0.0.0/24"]),
        pool("c", &[]),
        pool("a", &["10.7.0.0/24"]),
        pool("d", &["10.0.0.100-10.0.0.200", "10.0.1.250-10.0.2.9"]),
    ]);
    let range = |r: &str| r.parse::<IpRange>().expect("range");
    assert_eq!(
        problems,
        vec![
            PoolProblem::DuplicateName { pool: "a".into() },
            PoolProblem::Overlapping {
                pool: "b".into(),
                other: "a".into(),
                range: range("10.0.0.128/25"),
                shared: range("10.0.0.128-10.0.0.255"),
            },
            PoolProblem::NoRanges { pool: "c".into() },
            PoolProblem::Overlapping {
                pool: "d".into(),
                other: "a".into(),
                range: range("10.0.0.100-10.0.0.200"),
                shared: range("10.0.0.100-10.0.0.200"),
            },
            PoolProblem::Overlapping {
                pool: "d".into(),
                other: "b".into(),
                range: range("10.0.1.250-10.0.2.9"),
                shared: range("10.0.1.250-10.0.1.255"),
            },
        ]
    );
    let overlap = problems[1].to_string();
    assert!(
        overlap.contains(
            "pool b overlaps pool a on 10.0.0.128-10.0.0.255; those addresses stay with a"
        ),
        "{overlap}"
    );
    assert!(problems[1].concerns("b") && !problems[1].concerns("a"));
    assert_eq!(a.pool_of(addr("10.0.0.200")), Some("a"));
    assert_eq!(a.pool_of(addr("10.0.1.5")), Some("b"));
    assert_eq!(a.pool_of(addr("10.0.1.255")), Some("b"));
    assert_eq!(
        a.pool_of(addr("10.0.2.0")),
        Some("d"),
        "d keeps what nobody else has"
    );
    assert_eq!(a.pool_of(addr("10.7.0.5")), None);
    assert_eq!(a.pool_of(addr("2001:db8::1")), None);
    assert_eq!(a.usage("b").expect("pool").available_v4, 256);
    assert_eq!(a.usage("c").expect("pool").available_v4, 0);
    assert_eq!(a.usage("d").expect("pool").available_v4, 10);
    assert_eq!(a.problems(), problems.as_slice());
}

#[test]
fn restoring_at_start_up_keeps_recorded_addresses_and_the_older_service_wins() {
    let (mut a, _) = Allocator::new(vec![
        pool("a", &["10.0.0.0/29"]),
        pool("b", &["10.0.1.0/29"]),
        selective(pool("prod", &["10.0.2.0/29"]), 1, &["prod"]),
    ]);
    run(
        &mut a,
        vec![
            restore(
                "s1 keeps its recorded address, though it is not the lowest",
                svc("s1").current(&["10.0.0.5"]),
                Want::Got(&["10.0.0.5"]),
            ),
            restore(
                "s2 can't restore s1's address",
                svc("s2").current(&["10.0.0.5"]),
                Want::Fails("RequestedInUse", &["default/s1"]),
            ),
            restore(
                "a record outside every pool is not restored",
                svc("s3").current(&["10.9.9.9"]),
                Want::Fails("RequestedNotInPool", &["10.9.9.9"]),
            ),
            restore(
                "a record outside the annotated pool is not restored",
                svc("s3").pool("b").current(&["10.0.0.1"]),
                Want::Fails("RequestedNotInNamedPool", &["pool b"]),
            ),
            restore(
                "a record differing from the request is not restored",
                svc("s3").ips(&["10.0.0.2"]).current(&["10.0.0.1"]),
                Want::Fails("RequestChanged", &["10.0.0.2"]),
            ),
            restore(
                "a record of the wrong family is not restored",
                svc("s3").families(V6).current(&["10.0.0.1"]),
                Want::Fails("FamilyNotWanted", &[]),
            ),
            restore(
                "a dual-stack record missing a family is not restored",
                svc("s3").families(REQUIRE).current(&["10.0.0.1"]),
                Want::Fails("MissingFamily", &["IPv6"]),
            ),
            restore(
                "nothing recorded, nothing restored",
                svc("s4"),
                Want::Fails("NothingRecorded", &[]),
            ),
            restore(
                "a record in a pool that no longer selects the Service is kept: narrowing a pool changes new assignments only",
                svc("s4").current(&["10.0.2.1"]),
                Want::FromGot("prod", &["10.0.2.1"]),
            ),
            restore(
                "a record with a malformed request is restored",
                svc("s3").malformed().current(&["10.0.0.1"]),
                Want::Got(&["10.0.0.1"]),
            ),
            restore(
                "sharers with one key restore one address",
                svc("k1").key("k").ports(&[80]).current(&["10.0.1.1"]),
                Want::Got(&["10.0.1.1"]),
            ),
            restore(
                "and the second too",
                svc("k2").key("k").ports(&[443]).current(&["10.0.1.1"]),
                Want::Got(&["10.0.1.1"]),
            ),
            restore(
                "a third sharer on a taken port does not",
                svc("k3").key("k").ports(&[80]).current(&["10.0.1.1"]),
                Want::Fails("SharingConflict", &["default/k1", "TCP/80"]),
            ),
            assign(
                "after start-up, a new Service gets the lowest free address",
                svc("n1"),
                Want::Got(&["10.0.0.0"]),
            ),
            assign(
                "the next skips the restored ones",
                svc("n2"),
                Want::Got(&["10.0.0.2"]),
            ),
        ],
    );
}

#[test]
fn allocate_all_restores_the_older_claim_and_reassigns_the_younger() {
    let pools = vec![pool("a", &["10.0.0.0/29"])];
    let claims = vec![
        svc("young").created(20).current(&["10.0.0.3"]),
        svc("old").created(10).current(&["10.0.0.3"]),
        svc("insistent")
            .created(30)
            .ips(&["10.0.0.3"])
            .current(&["10.0.0.3"]),
        svc("new").created(5),
        svc("explicit").created(40).ips(&["10.0.0.0"]),
    ];
    let all = allocate_all(pools, &claims);
    let got = |n: &str| {
        all.results
            .get(&name(n))
            .cloned()
            .expect("a result per claim")
    };
    assert_eq!(got("old").map(|a| a.addresses), Ok(vec![addr("10.0.0.3")]));
    assert_eq!(
        got("insistent"),
        Err(AllocError::RequestedInUse {
            addr: addr("10.0.0.3"),
            by: name("old")
        })
    );
    assert_eq!(
        got("explicit").map(|a| a.addresses),
        Ok(vec![addr("10.0.0.0")]),
        "explicit requests go first"
    );
    assert_eq!(got("new").map(|a| a.addresses), Ok(vec![addr("10.0.0.1")]));
    assert_eq!(
        got("young").map(|a| a.addresses),
        Ok(vec![addr("10.0.0.2")])
    );
}

#[test]
fn allocations_list_in_address_order_and_say_when_truncated() {
    let (mut a, _) = Allocator::new(vec![pool("a", &["10.0.0.0/29", "2001:db8::/126"])]);
    for (i, n) in ["s3", "s1", "s2"].into_iter().enumerate() {
        let claim = svc(n).families(PREFER).created(i as i64);
        assert!(a.assign(&claim).is_ok());
    }
    let usage = a.usage("a").expect("pool exists");
    let (first, truncated) = usage.allocations(2);
    assert!(truncated);
    assert_eq!(
        first,
        vec![
            (addr("10.0.0.0"), vec![name("s3")]),
            (addr("10.0.0.1"), vec![name("s1")])
        ]
    );
    let (all, truncated) = usage.allocations(100);
    assert!(!truncated);
    assert_eq!(all.len(), 6);
    assert_eq!(all[3], (addr("2001:db8::"), vec![name("s3")]));
    assert_eq!(
        a.allocations("a", 6).map(|(v, t)| (v.len(), t)),
        Some((6, false))
    );
    assert_eq!(a.usage("missing"), None);
    assert_eq!(
        a.holders(addr("10.0.0.2")).collect::<Vec<_>>(),
        vec![&name("s2")]
    );
}

#[test]
fn an_ipv6_slash_64_is_counted_without_listing_it() {
    let (mut a, _) = Allocator::new(vec![pool("big", &["2001:db8::/64"])]);
    let claim = svc("s1").families(V6);
    assert_eq!(
        a.assign(&claim).map(|x| x.addresses),
        Ok(vec![addr("2001:db8::")])
    );
    assert_eq!(
        a.usage("big").expect("pool").available_v6,
        (1u128 << 64) - 1
    );
    let (mut a, _) = Allocator::new(vec![pool("all", &["::/0"])]);
    assert_eq!(
        a.usage("all").expect("pool").available_v6,
        u128::MAX,
        "::/0 saturates"
    );
    assert_eq!(a.assign(&claim).map(|x| x.addresses), Ok(vec![addr("::")]));
    assert!(a.release(&claim.name).is_some());
    assert_eq!(a.usage("all").expect("pool").available_v6, u128::MAX);
}

#[test]
fn priority_and_selection_choose_the_pool_before_the_family_count() {
    // dev's own IPv4-only pool is preferred over a dual-stack pool open to everyone.
    let (mut a, _) = Allocator::new(vec![
        selective(pool("dev-v4", &["10.4.0.0/31"]), 10, &["dev"]),
        pool("shared-ds", &["10.5.0.0/30", "2001:db8:5::/126"]),
    ]);
    run(
        &mut a,
        vec![
            assign(
                "PreferDualStack in dev takes IPv4 from its own pool, not both from the other",
                svc("dev/p1").families(PREFER),
                Want::FromGot("dev-v4", &["10.4.0.0"]),
            ),
            assign(
                "the same outside dev gets both from the open dual-stack pool",
                svc("web/p2").families(PREFER),
                Want::FromGot("shared-ds", &["10.5.0.0", "2001:db8:5::"]),
            ),
            assign(
                "RequireDualStack in dev still needs both from one pool, so it gets the open one",
                svc("dev/r1").families(REQUIRE),
                Want::FromGot("shared-ds", &["10.5.0.1", "2001:db8:5::1"]),
            ),
            assign(
                "PreferDualStack in dev takes the last IPv4 of its pool",
                svc("dev/p3").families(PREFER),
                Want::FromGot("dev-v4", &["10.4.0.1"]),
            ),
            assign(
                "with its own pool full it falls to the next pool, with both families there",
                svc("dev/p4").families(PREFER),
                Want::FromGot("shared-ds", &["10.5.0.2", "2001:db8:5::2"]),
            ),
        ],
    );
}

#[test]
fn namespaces_and_namespace_selectors_are_alternatives_and_service_selectors_narrow() {
    let mut team = selective(pool("team", &["10.6.0.0/29"]), 1, &["ops"]);
    if let Some(sa) = &mut team.service_allocation {
        sa.namespace_selectors = vec![selector("team", "blue")];
        sa.service_selectors = vec![selector("expose", "yes")];
    }
    let (mut a, _) = Allocator::new(vec![team]);
    run(
        &mut a,
        vec![
            assign(
                "a namespace named in the list qualifies without the label",
                svc("ops/a").label("expose", "yes"),
                Want::From("team"),
            ),
            assign(
                "a namespace with the label qualifies without being named",
                svc("blue-1/b")
                    .ns_label("team", "blue")
                    .label("expose", "yes"),
                Want::From("team"),
            ),
            assign(
                "a qualifying namespace still needs a matching Service",
                svc("ops/c"),
                Want::Fails("NoPoolAvailable", &["serviceAllocation"]),
            ),
            assign(
                "naming the pool from another namespace is refused, saying whom it serves",
                svc("dev/d").label("expose", "yes").pool("team"),
                Want::Fails(
                    "PoolNotForService",
                    &[
                        "pool team serves only namespaces ops or namespaces labelled team=blue, Services labelled expose=yes",
                        "not Service dev/d",
                    ],
                ),
            ),
        ],
    );
}
