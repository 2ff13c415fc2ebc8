//! Pool edits under assigned Services, as ordered tables: each row edits the pools the way an
//! operator would (`kubectl apply` of a new, changed or deleted IPPool), rebuilds the allocator
//! from the Services' records as the controller does, reassigns every Service, and checks that
//! exactly the Services the rule names lost their addresses, each with a reason.

use std::collections::BTreeMap;
use std::net::IpAddr;

mod common;

use ipvslb_core::alloc::{AllocError, Allocator, PoolProblem};
use ipvslb_core::{PoolRole, PoolSpec, Requested, ServiceAllocation, ServiceClaim, ServiceName};

fn addr(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn svc(namespace: &str, name: &str, created: i64) -> ServiceClaim {
    common::claim(namespace, name, created)
}

fn pool(name: &str, created: i64, ranges: &[&str]) -> PoolSpec {
    common::pool(name, created, ranges)
}

/// The write-up's pool, created first.
fn default_pool() -> PoolSpec {
    pool("default", 100, &["10.240.0.210-10.240.0.215"])
}

/// A cluster as the allocator controller sees it: pools, and Services whose status records
/// what they were given.
struct Cluster {
    pools: Vec<PoolSpec>,
    services: Vec<ServiceClaim>,
    allocator: Allocator,
    problems: Vec<PoolProblem>,
}

/// What one edit did.
struct Edited {
    /// Services that lost their recorded addresses, with the reason given.
    released: BTreeMap<String, AllocError>,
}

impl Cluster {
    fn new(pools: Vec<PoolSpec>) -> Self {
        let (allocator, problems) = Allocator::new(pools.clone());
        Self {
            pools,
            services: Vec::new(),
            allocator,
            problems,
        }
    }

    /// Creates a Service and records what it gets.
    fn create(&mut self, claim: ServiceClaim) -> Option<Vec<IpAddr>> {
        let got = self.allocator.assign(&claim).ok().map(|a| a.addresses);
        let mut claim = claim;
        claim.current = got.clone().unwrap_or_default();
        self.services.push(claim);
        got
    }

    /// The addresses each Service's status records.
    fn records(&self) -> BTreeMap<String, Vec<IpAddr>> {
        self.services
            .iter()
            .map(|c| (c.name.to_string(), c.current.clone()))
            .collect()
    }

    /// Replaces the pools, rebuilds from the records and reassigns every Service, oldest
    /// first, as the controller's requeue after a pool change does.
    fn edit(&mut self, pools: Vec<PoolSpec>) -> Edited {
        self.pools = pools;
        let (allocator, problems) = Allocator::restored(self.pools.clone(), &self.services);
        self.allocator = allocator;
        self.problems = problems;
        let mut released = BTreeMap::new();
        self.services
            .sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
        for claim in &mut self.services {
            let (result, lost) = self.allocator.assign_explained(claim);
            if let Some(lost) = lost {
                assert_eq!(lost.addresses, claim.current, "{}", claim.name);
                released.insert(claim.name.to_string(), lost.reason);
            }
            claim.current = result.map(|a| a.addresses).unwrap_or_default();
        }
        Edited { released }
    }

    /// Applies `pools` and checks that only `moved` lost their addresses (each with a reason),
    /// and that every other Service kept exactly what it had (a pending one may get one).
    fn apply(&mut self, says: &str, pools: Vec<PoolSpec>, moved: &[&str]) -> Edited {
        let before = self.records();
        let edited = self.edit(pools);
        let after = self.records();
        for (name, held) in &before {
            let now = &after[name];
            if moved.contains(&name.as_str()) {
                assert!(
                    edited.released.contains_key(name),
                    "{says}: {name} should have been released (had {held:?}, now {now:?})"
                );
            } else if !held.is_empty() {
                assert_eq!(held, now, "{says}: {name} moved");
                assert!(
                    !edited.released.contains_key(name),
                    "{says}: {name} was released: {:?}",
                    edited.released.get(name)
                );
            }
        }
        self.check_no_address_twice(says);
        edited
    }

    fn check_no_address_twice(&self, says: &str) {
        let mut seen = BTreeMap::new();
        for claim in &self.services {
            for a in &claim.current {
                if let Some(other) = seen.insert(*a, claim.name.clone()) {
                    panic!("{says}: {a} is held by {other} and {}", claim.name);
                }
            }
        }
    }

    fn of(&self, name: &str) -> Vec<String> {
        self.records()[name]
            .iter()
            .map(ToString::to_string)
            .collect()
    }
}

/// The write-up's cluster: whoami, s1 and s3 on .210, .211 and .213 of `default` (s2 came and
/// went), as in the report that found the overlap bug.
fn write_up_cluster() -> Cluster {
    let mut c = Cluster::new(vec![default_pool()]);
    c.create(svc("default", "whoami", 1));
    c.create(svc("default", "s1", 2));
    c.create(svc("default", "s2", 3));
    c.create(svc("default", "s3", 4));
    c.services.retain(|s| s.name.name != "s2");
    c.edit(c.pools.clone());
    assert_eq!(c.of("default/whoami"), ["10.240.0.210"]);
    assert_eq!(c.of("default/s1"), ["10.240.0.211"]);
    assert_eq!(c.of("default/s3"), ["10.240.0.213"]);
    c
}

#[test]
fn a_younger_stray_pool_overlapping_default_strips_nobody_and_gets_only_the_overlap_condition() {
    let mut c = write_up_cluster();
    let stray = pool("a-stray", 200, &["10.240.0.214"]);
    c.apply(
        "a one-address pool named before default, created after it",
        vec![default_pool(), stray.clone()],
        &[],
    );
    assert_eq!(
        c.problems,
        vec![PoolProblem::Overlapping {
            pool: "a-stray".into(),
            other: "default".into(),
            range: "10.240.0.214".parse().expect("range"),
            shared: "10.240.0.214".parse().expect("range"),
        }]
    );
    assert!(c.problems[0].concerns("a-stray") && !c.problems[0].concerns("default"));
    assert_eq!(c.allocator.pool_of(addr("10.240.0.214")), Some("default"));
    assert_eq!(
        c.allocator.usage("a-stray").expect("pool").available_v4,
        0,
        "the stray pool has nothing of its own"
    );
    assert_eq!(
        c.create(svc("default", "s4", 10)),
        Some(vec![addr("10.240.0.212")]),
        "new Services still come from default"
    );
}

#[test]
fn only_the_contested_addresses_are_set_aside_in_the_younger_pool() {
    let mut c = write_up_cluster();
    let wide = pool("b", 200, &["10.240.0.214-10.240.0.220"]);
    c.apply(
        "a younger pool overlapping the top of default",
        vec![default_pool(), wide],
        &[],
    );
    assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
    assert!(
        c.problems[0]
            .to_string()
            .contains("pool b overlaps pool default on 10.240.0.214-10.240.0.215"),
        "{}",
        c.problems[0]
    );
    assert_eq!(c.allocator.pool_of(addr("10.240.0.215")), Some("default"));
    assert_eq!(c.allocator.pool_of(addr("10.240.0.216")), Some("b"));
    assert_eq!(
        c.allocator.usage("b").expect("pool").available_v4,
        5,
        "b keeps .216-.220"
    );
}

#[test]
fn an_older_pool_keeps_its_addresses_whatever_the_names() {
    let mut c = Cluster::new(vec![pool("z-old", 1, &["10.0.0.0/30"])]);
    c.create(svc("default", "a", 1));
    c.apply(
        "a pool whose name sorts first, created later, over the same addresses",
        vec![
            pool("z-old", 1, &["10.0.0.0/30"]),
            pool("a-new", 2, &["10.0.0.0/29"]),
        ],
        &[],
    );
    assert_eq!(c.allocator.pool_of(addr("10.0.0.0")), Some("z-old"));
    assert_eq!(c.allocator.pool_of(addr("10.0.0.4")), Some("a-new"));
}

#[test]
fn narrowing_a_pool_changes_new_assignments_only_and_counts_who_no_longer_matches() {
    let mut c = write_up_cluster();
    let mut narrowed = default_pool();
    narrowed.service_allocation = Some(ServiceAllocation {
        namespaces: vec!["prod".into()],
        ..ServiceAllocation::default()
    });
    c.apply(
        "default is restricted to namespace prod",
        vec![narrowed.clone()],
        &[],
    );
    assert_eq!(c.allocator.usage("default").expect("pool").non_matching, 3);
    assert_eq!(
        c.create(svc("default", "late", 10)),
        None,
        "a new Service of namespace default is refused"
    );
    assert_eq!(
        c.create(svc("prod", "api", 11)),
        Some(vec![addr("10.240.0.212")])
    );

    let mut no_auto = narrowed.clone();
    no_auto.auto_assign = false;
    c.apply("autoAssign is switched off", vec![no_auto], &[]);
    assert_eq!(c.allocator.usage("default").expect("pool").non_matching, 4);

    let mut priority = narrowed;
    priority
        .service_allocation
        .as_mut()
        .expect("set above")
        .priority = 50;
    c.apply(
        "autoAssign on again with another priority, and a younger pool",
        vec![priority, pool("other", 300, &["10.0.9.0/24"])],
        &[],
    );
    assert_eq!(c.allocator.usage("default").expect("pool").non_matching, 3);
}

#[test]
fn a_changed_namespace_label_keeps_the_holder() {
    let mut selective = pool("labelled", 1, &["10.0.0.0/29"]);
    selective.service_allocation = Some(ServiceAllocation {
        namespace_selectors: vec![ipvslb_core::Selector {
            match_labels: [("team".to_string(), "a".to_string())].into(),
            ..Default::default()
        }],
        ..ServiceAllocation::default()
    });
    let mut c = Cluster::new(vec![selective.clone()]);
    let mut claim = svc("team-a", "web", 1);
    std::sync::Arc::make_mut(&mut claim.namespace_labels).insert("team".into(), "a".into());
    assert_eq!(c.create(claim), Some(vec![addr("10.0.0.0")]));
    for claim in &mut c.services {
        claim.namespace_labels = Default::default();
    }
    c.apply("the namespace lost its label", vec![selective], &[]);
    assert_eq!(c.allocator.usage("labelled").expect("pool").non_matching, 1);
}

#[test]
fn avoid_buggy_ips_switched_on_keeps_a_holder_of_dot_255_and_counts_it_right() {
    let mut c = Cluster::new(vec![pool("edge", 1, &["10.0.0.255-10.0.1.1"])]);
    assert_eq!(
        c.create(svc("default", "edge", 1)),
        Some(vec![addr("10.0.0.255")])
    );
    let mut avoiding = pool("edge", 1, &["10.0.0.255-10.0.1.1"]);
    avoiding.avoid_buggy_ips = true;
    c.apply("avoidBuggyIPs is switched on", vec![avoiding], &[]);
    let usage = c.allocator.usage("edge").expect("pool");
    assert_eq!(
        (usage.assigned_v4, usage.available_v4),
        (1, 1),
        "only .1.1 is left"
    );
    assert_eq!(usage.non_matching, 1);
    assert_eq!(
        c.create(svc("default", "next", 2)),
        Some(vec![addr("10.0.1.1")])
    );
}

#[test]
fn removing_a_range_releases_exactly_its_holders_who_then_get_a_free_address() {
    let mut c = write_up_cluster();
    let edited = c.apply(
        "default shrinks to .210-.212",
        vec![pool("default", 100, &["10.240.0.210-10.240.0.212"])],
        &["default/s3"],
    );
    assert!(
        matches!(
            edited.released["default/s3"],
            AllocError::RequestedNotInPool(a) if a == addr("10.240.0.213")
        ),
        "{:?}",
        edited.released
    );
    assert_eq!(c.of("default/s3"), ["10.240.0.212"], "s3 got the free one");
}

#[test]
fn deleting_a_pool_releases_its_holders_and_nothing_else() {
    let mut c = Cluster::new(vec![
        pool("a", 1, &["10.0.0.0/30"]),
        pool("b", 2, &["10.0.1.0/30"]),
    ]);
    c.create(svc("default", "in-a", 1));
    let mut in_b = svc("default", "in-b", 2);
    in_b.pool = Some("b".into());
    c.create(in_b);
    c.apply(
        "pool a is deleted",
        vec![pool("b", 2, &["10.0.1.0/30"])],
        &["default/in-a"],
    );
    assert_eq!(
        c.of("default/in-a"),
        ["10.0.1.1"],
        "it moved to the pool left"
    );
    assert_eq!(c.of("default/in-b"), ["10.0.1.0"]);
}

#[test]
fn an_address_that_leaves_one_pool_but_lies_in_another_stays_with_its_holder() {
    let mut c = Cluster::new(vec![
        pool("old", 1, &["10.0.0.0/29"]),
        pool("new", 2, &["10.0.0.4/30"]),
    ]);
    for (i, n) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        c.create(svc("default", n, i as i64));
    }
    assert_eq!(c.of("default/e"), ["10.0.0.4"]);
    c.apply(
        "old shrinks to .0-.3: .4 now lies in new",
        vec![
            pool("old", 1, &["10.0.0.0/30"]),
            pool("new", 2, &["10.0.0.4/30"]),
        ],
        &[],
    );
    assert_eq!(
        c.allocator
            .assignment(&ServiceName::new("default", "e"))
            .map(|a| a.pool.as_str()),
        Some("new")
    );
}

#[test]
fn an_invalid_pool_keeps_its_holders_and_gives_out_nothing_new_until_it_is_fixed() {
    let mut c = write_up_cluster();
    let mut broken = default_pool();
    broken.role = PoolRole::Frozen(
        "spec.serviceAllocation.serviceSelectors[0]: operator Maybe is not In, NotIn, Exists or DoesNotExist".into(),
    );
    c.apply("default becomes invalid", vec![broken.clone()], &[]);
    assert_eq!(c.allocator.usage("default").expect("pool").non_matching, 3);
    let mut named = svc("default", "named", 10);
    named.pool = Some("default".into());
    let result = c.allocator.assign(&named);
    assert!(
        matches!(&result, Err(AllocError::PoolInvalid { pool, .. }) if pool == "default"),
        "{result:?}"
    );
    let mut requested = svc("default", "requested", 11);
    requested.requested = Requested::Addresses(vec![addr("10.240.0.214")]);
    assert!(matches!(
        c.allocator.assign(&requested),
        Err(AllocError::PoolInvalid { .. })
    ));
    assert!(matches!(
        c.allocator.assign(&svc("default", "any", 12)),
        Err(AllocError::NoPoolAvailable(_))
    ));
    c.apply("default is fixed", vec![default_pool()], &[]);
    assert_eq!(c.allocator.usage("default").expect("pool").non_matching, 0);
}

#[test]
fn an_older_pool_of_another_class_fences_its_addresses_off_from_ours() {
    let mut theirs = pool("theirs", 1, &["10.0.0.0/30"]);
    theirs.role = PoolRole::Foreign("example.com/other".into());
    let mut c = Cluster::new(vec![theirs.clone(), pool("ours", 2, &["10.0.0.0/29"])]);
    assert_eq!(
        c.create(svc("default", "a", 1)),
        Some(vec![addr("10.0.0.4")])
    );
    let mut named = svc("default", "b", 2);
    named.pool = Some("theirs".into());
    assert!(matches!(
        c.allocator.assign(&named),
        Err(AllocError::PoolOfOtherClass { .. })
    ));
    let mut requested = svc("default", "c", 3);
    requested.requested = Requested::Addresses(vec![addr("10.0.0.1")]);
    assert!(matches!(
        c.allocator.assign(&requested),
        Err(AllocError::PoolOfOtherClass { .. })
    ));
}

#[test]
fn a_deleted_older_pool_hands_its_contested_addresses_to_the_younger_one_without_moving_anyone() {
    let mut c = Cluster::new(vec![
        pool("first", 1, &["10.0.0.0/30"]),
        pool("second", 2, &["10.0.0.0/29"]),
    ]);
    for (i, n) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        c.create(svc("default", n, i as i64));
    }
    c.apply(
        "the older pool is deleted",
        vec![pool("second", 2, &["10.0.0.0/29"])],
        &[],
    );
    assert!(c.problems.is_empty(), "{:?}", c.problems);
    assert_eq!(c.allocator.usage("second").expect("pool").assigned_v4, 5);
}

#[test]
fn a_kept_holder_the_pool_no_longer_selects_gains_no_second_family() {
    let mut c = Cluster::new(vec![pool("ds", 1, &["10.0.0.0/30"])]);
    let mut prefer = svc("dev", "web", 1);
    prefer.families = ipvslb_core::FamilyPolicy::PreferDualStack {
        primary: ipvslb_core::IpFamily::V4,
    };
    assert_eq!(c.create(prefer), Some(vec!["10.0.0.0".parse().unwrap()]));
    let mut narrowed = pool("ds", 1, &["10.0.0.0/30", "2001:db8::/126"]);
    narrowed.service_allocation = Some(ServiceAllocation {
        namespaces: vec!["prod".into()],
        ..ServiceAllocation::default()
    });
    c.apply(
        "the pool is restricted to prod and gains IPv6",
        vec![narrowed],
        &[],
    );
    assert_eq!(
        c.of("dev/web"),
        ["10.0.0.0"],
        "no IPv6 address for a Service the pool no longer serves"
    );
}

#[test]
fn a_service_that_drops_a_family_keeps_the_address_of_the_other() {
    let mut c = Cluster::new(vec![pool("ds", 1, &["10.0.0.0/30", "2001:db8::/126"])]);
    c.create(svc("default", "first", 1));
    let mut dual = svc("default", "web", 2);
    dual.families = ipvslb_core::FamilyPolicy::RequireDualStack {
        primary: ipvslb_core::IpFamily::V4,
    };
    assert_eq!(
        c.create(dual),
        Some(vec![
            "10.0.0.1".parse().unwrap(),
            "2001:db8::".parse().unwrap()
        ])
    );
    // .0 comes free, then web becomes single-stack IPv4: it keeps .1, not the lowest free.
    c.services.retain(|s| s.name.name != "first");
    for claim in &mut c.services {
        claim.families = ipvslb_core::FamilyPolicy::SingleStack {
            primary: ipvslb_core::IpFamily::V4,
        };
    }
    let edited = c.edit(vec![pool("ds", 1, &["10.0.0.0/30", "2001:db8::/126"])]);
    assert!(edited.released.is_empty(), "{:?}", edited.released);
    assert_eq!(
        c.of("default/web"),
        ["10.0.0.1"],
        "the IPv4 address stays, the IPv6 one goes"
    );
}

#[test]
fn a_single_stack_service_made_dual_stack_keeps_its_address_and_gains_the_other_family() {
    let mut c = Cluster::new(vec![pool("ds", 1, &["10.0.0.0/30", "2001:db8::/126"])]);
    c.create(svc("default", "first", 1));
    assert_eq!(
        c.create(svc("default", "web", 2)),
        Some(vec!["10.0.0.1".parse().unwrap()])
    );
    c.services.retain(|s| s.name.name != "first");
    for claim in &mut c.services {
        claim.families = ipvslb_core::FamilyPolicy::RequireDualStack {
            primary: ipvslb_core::IpFamily::V4,
        };
    }
    let edited = c.edit(vec![pool("ds", 1, &["10.0.0.0/30", "2001:db8::/126"])]);
    assert!(edited.released.is_empty(), "{:?}", edited.released);
    assert_eq!(
        c.of("default/web"),
        ["10.0.0.1", "2001:db8::"],
        "it keeps .1 (not the lowest free .0) and gains IPv6"
    );
}
