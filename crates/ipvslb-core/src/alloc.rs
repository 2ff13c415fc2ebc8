//! VIP allocation: which Service holds which addresses of which pool.
//!
//! The allocator takes parsed pools and plain [`ServiceClaim`]s and makes no calls of its own; the
//! caller writes the resulting [`Assignment`]s into Service status, which is the only durable
//! record. On start the caller [`restore`](Allocator::restore)s every recorded assignment before it
//! [`assign`](Allocator::assign)s anything new, so a restart never moves an address.
//!
//! Costs are logarithmic in the number of allocations and independent of pool size: each pool keeps
//! its free addresses as disjoint intervals (split on allocation, merged on release), held
//! addresses sit in one ordered map, sharing keys map to their addresses, and the pool owning an
//! address is found in an ordered map of ranges. `avoidBuggyIPs` is applied arithmetically in
//! counts and by skipping when the lowest free address is taken, never by listing addresses.

mod free;

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use crate::model::{
    FamilyPolicy, IpFamily, PoolRole, PoolSpec, PortKey, Requested, ServiceClaim, ServiceName,
};
use crate::range::{IpRange, from_u128, to_u128};
use free::FreeSpace;

/// The addresses a Service holds, primary family first, and the pool they come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Assignment {
    /// One address per family, the Service's primary family first.
    pub addresses: Vec<IpAddr>,
    /// The pool all of them belong to.
    pub pool: String,
}

/// Why a Service got no address (or could not keep its recorded one). Each message is meant for
/// the Service's Warning Event, so it names what is wrong and what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// The pool has no free address of the family left.
    #[error(
        "pool {pool} has no free {family} address left; add addresses to it, free one, or choose another pool"
    )]
    PoolExhausted {
        /// The pool.
        pool: String,
        /// The family that ran out.
        family: IpFamily,
    },
    /// Every pool that serves the Service is out of addresses of the family.
    #[error(
        "no free {family} address is left in any pool that serves this Service ({}); add addresses or free some",
        .pools.join(", ")
    )]
    PoolsExhausted {
        /// The family that ran out.
        family: IpFamily,
        /// The pools tried, in the order they were tried.
        pools: Vec<String>,
    },
    /// No pool may serve the Service without an explicit request.
    #[error("no IP pool serves this Service: {0}")]
    NoPoolAvailable(NoPoolReason),
    /// The `ipvslb.io/pool` annotation names a pool that does not exist.
    #[error(
        "the ipvslb.io/pool annotation names pool {0}, which does not exist; fix the name or create the IPPool"
    )]
    UnknownPool(String),
    /// A requested address lies in no pool.
    #[error("address {0} is not in any IP pool; request an address from a pool, or add it to one")]
    RequestedNotInPool(IpAddr),
    /// A requested address lies outside the pool named by the annotation.
    #[error(
        "address {addr} is not in pool {pool}, which the ipvslb.io/pool annotation names; request one of its addresses or change the annotation"
    )]
    RequestedNotInNamedPool {
        /// The address.
        addr: IpAddr,
        /// The named pool.
        pool: String,
    },
    /// The Service names a pool, or requests an address of one, whose `serviceAllocation`
    /// does not select it. That is a restriction set by the pool's owner, which nothing on
    /// the Service lifts.
    #[error("{}pool {pool} serves only {serves}, not Service {service}; use a pool that serves it, or ask the pool's owner to widen its serviceAllocation", .addr.map(|a| format!("address {a} is in pool {pool}: ")).unwrap_or_default())]
    PoolNotForService {
        /// The requested address, if the Service asked for one.
        addr: Option<IpAddr>,
        /// The pool.
        pool: String,
        /// Whom the pool serves.
        serves: String,
        /// The Service refused.
        service: ServiceName,
    },
    /// Two requested addresses lie in different pools; a Service's addresses come from one pool.
    #[error(
        "addresses {first} (pool {first_pool}) and {second} (pool {second_pool}) are in different pools; request addresses of one pool"
    )]
    RequestedInDifferentPools {
        /// The first address.
        first: IpAddr,
        /// Its pool.
        first_pool: String,
        /// The second address.
        second: IpAddr,
        /// Its pool.
        second_pool: String,
    },
    /// The address ends in `.0` or `.255` and its pool avoids those.
    #[error(
        "address {addr} ends in .0 or .255, which pool {pool} avoids (avoidBuggyIPs); choose another address"
    )]
    AvoidedAddress {
        /// The address.
        addr: IpAddr,
        /// The pool.
        pool: String,
    },
    /// The address is held by a Service that does not share it with this one.
    #[error(
        "address {addr} is already in use by {by}; give both Services the same ipvslb.io/allow-shared-ip key (and distinct ports) to share it, or choose another address"
    )]
    RequestedInUse {
        /// The address.
        addr: IpAddr,
        /// A Service holding it.
        by: ServiceName,
    },
    /// The address is shared under the same key, but a port collides.
    #[error("address {addr} is shared with {by}, which already uses port {}/{} on it; change the port or the sharing key", .port.protocol, .port.port)]
    SharingConflict {
        /// The address.
        addr: IpAddr,
        /// The Service using the port.
        by: ServiceName,
        /// The colliding port.
        port: PortKey,
    },
    /// More addresses than families.
    #[error("{count} addresses given, but a Service holds at most one IPv4 and one IPv6 address")]
    TooManyRequested {
        /// How many were given.
        count: usize,
    },
    /// Two addresses of one family.
    #[error(
        "addresses {first} and {second} are both {family}; a Service holds at most one address per family"
    )]
    TwoOfOneFamily {
        /// The family.
        family: IpFamily,
        /// The first address.
        first: IpAddr,
        /// The second address.
        second: IpAddr,
    },
    /// An address of a family the single-stack Service does not use.
    #[error("address {addr} is {}, but this Service is single-stack {primary}; request an {primary} address or change its ipFamilyPolicy", IpFamily::of(.addr))]
    FamilyNotWanted {
        /// The address.
        addr: IpAddr,
        /// The Service's only family.
        primary: IpFamily,
    },
    /// A dual-stack Service's record lacks a family.
    #[error("this Service requires dual-stack but holds no {family} address")]
    MissingFamily {
        /// The missing family.
        family: IpFamily,
    },
    /// The address request could not be read.
    #[error("the address request cannot be read: {0}; fix it to get an address")]
    MalformedRequest(String),
    /// No pool in question has addresses of the family.
    #[error("{}", family_unavailable(*.family, .pool.as_deref()))]
    FamilyUnavailable {
        /// The family.
        family: IpFamily,
        /// The pool, when only one was in question.
        pool: Option<String>,
    },
    /// The recorded addresses do not include an address the Service now requests.
    #[error("this Service now requests {requested}, which it does not hold")]
    RequestChanged {
        /// The requested address.
        requested: IpAddr,
    },
    /// There is no recorded address to restore.
    #[error("this Service has no recorded address to restore")]
    NothingRecorded,
    /// The pool is invalid as written, so it gives out no new address.
    #[error("pool {pool} is invalid and assigns no new addresses until it is fixed: {reason}")]
    PoolInvalid {
        /// The pool.
        pool: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The pool belongs to another installation's load-balancer class.
    #[error(
        "pool {pool} belongs to load-balancer class {class}, which this ipvslb does not serve; use a pool of this class"
    )]
    PoolOfOtherClass {
        /// The pool.
        pool: String,
        /// Its class.
        class: String,
    },
}

/// Recorded addresses a Service could not keep, and why: what its Warning Event says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// The addresses it held.
    pub addresses: Vec<IpAddr>,
    /// Why it could not keep them.
    pub reason: AllocError,
}

impl Released {
    /// Whether the Service itself asked for the change (another address or another pool), as
    /// opposed to a pool edit taking its addresses away.
    pub fn asked_for(&self) -> bool {
        matches!(
            self.reason,
            AllocError::RequestChanged { .. } | AllocError::RequestedNotInNamedPool { .. }
        )
    }
}

impl fmt::Display for Released {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addresses: Vec<String> = self.addresses.iter().map(ToString::to_string).collect();
        write!(f, "released {}: {}", addresses.join(", "), self.reason)
    }
}

fn family_unavailable(family: IpFamily, pool: Option<&str>) -> String {
    match pool {
        Some(pool) => format!(
            "pool {pool} has no {family} addresses; add an {family} range to it or change the Service's ipFamilyPolicy"
        ),
        None => format!(
            "no pool that serves this Service has {family} addresses; add an {family} range or change the Service's ipFamilyPolicy"
        ),
    }
}

/// Why no pool serves a Service that asks for no pool and no address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPoolReason {
    /// No IPPool exists at all.
    NoPools,
    /// Pools with autoAssign exist, but each has a serviceAllocation that does not select it.
    NoneSelects,
    /// No pool has autoAssign enabled.
    NoneAutoAssigns,
}

impl fmt::Display for NoPoolReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NoPoolReason::NoPools => "there is no IPPool; create one",
            NoPoolReason::NoneSelects => {
                "every pool with autoAssign has a serviceAllocation that does not select it; ask a pool's owner to widen its serviceAllocation, or create a pool that serves it"
            }
            NoPoolReason::NoneAutoAssigns => {
                "no pool has autoAssign enabled; request an address or name a pool with the ipvslb.io/pool annotation"
            }
        })
    }
}

/// Something wrong with the pools themselves, reported once when the allocator is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolProblem {
    /// `pool` shares addresses with `other`, which came first (created earlier, or the same
    /// second and its name sorts first): `other` keeps the shared stretch, the rest of `range`
    /// stays in `pool`.
    Overlapping {
        /// The younger pool, which loses the shared addresses.
        pool: String,
        /// The older pool, which keeps them.
        other: String,
        /// The range of `pool` concerned.
        range: IpRange,
        /// The addresses both claim (one stretch; each stretch is its own problem).
        shared: IpRange,
    },
    /// The pool lists no ranges at all.
    NoRanges {
        /// The pool.
        pool: String,
    },
    /// Every address of the range ends in `.0` or `.255` and the pool avoids those.
    NothingUsable {
        /// The pool.
        pool: String,
        /// The range.
        range: IpRange,
    },
    /// Two pools have the same name; the second is ignored.
    DuplicateName {
        /// The name.
        pool: String,
    },
}

impl PoolProblem {
    /// The pool this problem marks.
    pub fn pool(&self) -> &str {
        match self {
            PoolProblem::Overlapping { pool, .. }
            | PoolProblem::NoRanges { pool }
            | PoolProblem::NothingUsable { pool, .. }
            | PoolProblem::DuplicateName { pool } => pool,
        }
    }

    /// Whether this problem marks `pool` (an overlap marks only the pool that loses the range).
    pub fn concerns(&self, pool: &str) -> bool {
        self.pool() == pool
    }

    /// Whether the pool is unusable as written (Invalid), rather than overlapping another.
    pub fn is_invalid(&self) -> bool {
        !matches!(self, PoolProblem::Overlapping { .. })
    }
}

impl fmt::Display for PoolProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolProblem::Overlapping {
                pool,
                other,
                range,
                shared,
            } => write!(
                f,
                "pool {pool} overlaps pool {other} on {shared}; those addresses stay with {other}, which came first, and the rest of {range} is used"
            ),
            PoolProblem::NoRanges { pool } => {
                write!(f, "pool {pool} has no address ranges; add at least one")
            }
            PoolProblem::NothingUsable { pool, range } => write!(
                f,
                "range {range} of pool {pool} holds only addresses ending in .0 or .255, which avoidBuggyIPs excludes"
            ),
            PoolProblem::DuplicateName { pool } => {
                write!(f, "pool name {pool} is used twice; only the first is used")
            }
        }
    }
}

/// How much of a pool is used, for its status and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    /// IPv4 addresses held by at least one Service.
    pub assigned_v4: u64,
    /// IPv6 addresses held by at least one Service.
    pub assigned_v6: u64,
    /// IPv4 addresses that a new Service could get (not held, not avoided as buggy).
    pub available_v4: u128,
    /// IPv6 addresses that a new Service could get. Saturates: a pool holding `::/0` reports
    /// `u128::MAX` minus what is assigned, one short of the truth.
    pub available_v6: u128,
    /// Services holding addresses of the pool that its rules as now written would not give
    /// them (its serviceAllocation, autoAssign or avoidBuggyIPs changed, or it became
    /// invalid): they keep their addresses; only new assignments follow the new rules.
    pub non_matching: u64,
    allocations: Vec<HeldAddress>,
}

/// A held address and the Services holding it, by name.
pub type HeldAddress = (IpAddr, Vec<ServiceName>);

impl PoolUsage {
    /// The held addresses in address order with their holders, at most `limit` of them, and
    /// whether more were left out.
    pub fn allocations(&self, limit: usize) -> (Vec<HeldAddress>, bool) {
        let shown = self.allocations.iter().take(limit).cloned().collect();
        (shown, self.allocations.len() > limit)
    }
}

/// The outcome of [`allocate_all`].
#[derive(Debug, Clone)]
pub struct Allocation {
    /// The allocator holding every successful assignment, ready for further changes.
    pub allocator: Allocator,
    /// Each Service's assignment or the reason it has none.
    pub results: BTreeMap<ServiceName, Result<Assignment, AllocError>>,
    /// Services whose recorded addresses could not be kept, and why.
    pub released: BTreeMap<ServiceName, Released>,
    /// Problems found in the pools.
    pub problems: Vec<PoolProblem>,
}

/// Allocates for a whole cluster at once, deterministically whatever the order of `claims`.
///
/// First every recorded assignment is restored, oldest Service first (so when two claim one
/// address the older keeps it); then the Services still without one are assigned, explicit
/// requests first, each group by (creation time, name). A Service whose record could not be
/// restored goes through assignment too: it may get a new address, or, when it explicitly asks
/// for the contested one, an error naming the holder. Claims are expected to have distinct names;
/// of duplicates only the oldest is considered.
pub fn allocate_all(pools: Vec<PoolSpec>, claims: &[ServiceClaim]) -> Allocation {
    let (mut allocator, problems) = Allocator::restored(pools, claims);
    let order = by_age(claims);
    let mut results: BTreeMap<ServiceName, Result<Assignment, AllocError>> = BTreeMap::new();
    for claim in &order {
        if let Some(held) = allocator.assignment(&claim.name) {
            results.insert(claim.name.clone(), Ok(held.clone()));
        }
    }
    let (explicit, rest): (Vec<&ServiceClaim>, Vec<&ServiceClaim>) = order
        .into_iter()
        .filter(|c| !results.contains_key(&c.name))
        .partition(|c| matches!(&c.requested, Requested::Addresses(a) if !a.is_empty()));
    let mut released = BTreeMap::new();
    let order: Vec<&ServiceClaim> = explicit.into_iter().chain(rest).collect();
    for claim in &order {
        let (result, lost) = allocator.assign_explained(claim);
        if let Some(lost) = lost {
            released.insert(claim.name.clone(), lost);
        }
        results.insert(claim.name.clone(), result);
    }
    // Once every status is written, what the released gave up is free: the Services still
    // pending get a second try, as the controller requeues them.
    let mut freed = false;
    for claim in &order {
        let written = match results.get(&claim.name) {
            Some(Ok(assignment)) => assignment.addresses.clone(),
            _ => Vec::new(),
        };
        freed |= allocator.settle(&claim.name, &written);
    }
    if freed {
        let pending: Vec<&ServiceClaim> = order
            .iter()
            .copied()
            .filter(|c| results.get(&c.name).is_some_and(Result::is_err))
            .collect();
        for claim in pending {
            let mut retry = claim.clone();
            retry.current.clear();
            results.insert(claim.name.clone(), allocator.assign(&retry));
        }
    }
    Allocation {
        allocator,
        results,
        released,
        problems,
    }
}

/// The claims oldest first (creation time, then name), each name once (the oldest).
fn by_age(claims: &[ServiceClaim]) -> Vec<&ServiceClaim> {
    let mut order: Vec<&ServiceClaim> = claims.iter().collect();
    order.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    let mut seen = BTreeSet::new();
    order.retain(|c| seen.insert(&c.name));
    order
}

/// Why addresses are being taken: what checks apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taking {
    /// The Service already holds them (its status records them): they stay while they lie in
    /// a pool of ours, even one whose rules now would not give them, or one that is invalid.
    Record,
    /// The Service asks for them: the pool's rules as now written apply.
    Request,
}

/// One pool with its free space and counters.
#[derive(Debug, Clone)]
struct Pool {
    spec: PoolSpec,
    /// The ranges in use (the spec's minus those set aside for overlap), merged, IPv4 first.
    intervals: Vec<(IpFamily, u128, u128)>,
    /// Free space per family (index [`fam`]).
    free: [FreeSpace; 2],
    /// Usable addresses per family (buggy ones excluded when avoided), saturating.
    capacity: [u128; 2],
    /// Held addresses per family.
    assigned: [u64; 2],
    /// Held IPv4 addresses that avoidBuggyIPs excludes from `capacity` (held from before the
    /// pool avoided them).
    assigned_avoided: u64,
    /// Addresses of `capacity` per family that a status still records though nobody holds them.
    recorded: [u64; 2],
    /// Holders whose addresses the pool's current rules would not give them.
    non_matching: u64,
}

impl Pool {
    fn empty(spec: PoolSpec) -> Self {
        Self {
            spec,
            intervals: Vec::new(),
            free: Default::default(),
            capacity: [0, 0],
            assigned: [0, 0],
            assigned_avoided: 0,
            recorded: [0, 0],
            non_matching: 0,
        }
    }

    fn name(&self) -> &str {
        &self.spec.name
    }

    /// Whether it may give out new addresses; the error says why not.
    fn serving(&self) -> Result<(), AllocError> {
        match &self.spec.role {
            PoolRole::Serving => Ok(()),
            PoolRole::Frozen(reason) => Err(AllocError::PoolInvalid {
                pool: self.name().to_owned(),
                reason: reason.clone(),
            }),
            PoolRole::Foreign(class) => Err(AllocError::PoolOfOtherClass {
                pool: self.name().to_owned(),
                class: class.clone(),
            }),
        }
    }

    /// Whether its rules as now written would give `addrs` to the claim.
    fn fits(&self, claim: &ServiceClaim, addrs: &[IpAddr]) -> bool {
        let asked = claim.pool.is_some()
            || matches!(&claim.requested, Requested::Addresses(a) if !a.is_empty());
        self.serving().is_ok()
            && self.selects(claim)
            && (asked || self.spec.auto_assign)
            && !addrs.iter().any(|a| self.avoids(*a))
    }

    fn has_family(&self, family: IpFamily) -> bool {
        self.intervals.iter().any(|(f, _, _)| *f == family)
    }

    fn avoids(&self, addr: IpAddr) -> bool {
        self.spec.avoid_buggy_ips && addr.is_ipv4() && free::is_buggy(to_u128(addr))
    }

    /// Whether the pool's `serviceAllocation` (if any) selects the Service.
    fn selects(&self, claim: &ServiceClaim) -> bool {
        self.spec
            .service_allocation
            .as_ref()
            .is_none_or(|sa| sa.selects(claim))
    }

    /// Refuses a Service its `serviceAllocation` does not select, whatever it asked for.
    fn check_selects(&self, claim: &ServiceClaim, addr: Option<IpAddr>) -> Result<(), AllocError> {
        match &self.spec.service_allocation {
            Some(sa) if !sa.selects(claim) => Err(AllocError::PoolNotForService {
                addr,
                pool: self.name().to_owned(),
                serves: sa.serves(),
                service: claim.name.clone(),
            }),
            _ => Ok(()),
        }
    }
}

/// What one Service holds.
#[derive(Debug, Clone)]
struct Holding {
    assignment: Assignment,
    /// Whether the pool's rules, when it was taken or last kept, would give it.
    fits: bool,
    sharing_key: Option<String>,
    ports: Vec<PortKey>,
}

/// One held address.
#[derive(Debug, Clone)]
struct Slot {
    pool: usize,
    sharing_key: Option<String>,
    holders: Holders,
    /// Which holder uses which port; kept only when the address has a sharing key.
    ports: BTreeMap<PortKey, ServiceName>,
}

/// The Services holding one address, in name order. Almost always one: a sorted `Vec` costs a
/// fraction of a `BTreeSet`, whose first element allocates a node for eleven.
#[derive(Debug, Clone, Default)]
struct Holders(Vec<ServiceName>);

impl Holders {
    fn first(&self) -> Option<&ServiceName> {
        self.0.first()
    }

    fn iter(&self) -> std::slice::Iter<'_, ServiceName> {
        self.0.iter()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn insert(&mut self, name: ServiceName) {
        if let Err(at) = self.0.binary_search(&name) {
            self.0.insert(at, name);
        }
    }

    fn remove(&mut self, name: &ServiceName) {
        if let Ok(at) = self.0.binary_search(name) {
            self.0.remove(at);
        }
    }
}

impl Slot {
    /// Whether `claim` may join the holders: same non-empty key and no colliding port.
    fn admits(&self, addr: IpAddr, claim: &ServiceClaim) -> Result<(), AllocError> {
        let Some(by) = self.holders.first() else {
            return Ok(());
        };
        if self.sharing_key.is_none() || self.sharing_key != claim.sharing_key {
            return Err(AllocError::RequestedInUse {
                addr,
                by: by.clone(),
            });
        }
        match claim
            .ports
            .iter()
            .find_map(|p| self.ports.get(p).map(|by| (*p, by)))
        {
            Some((port, by)) => Err(AllocError::SharingConflict {
                addr,
                by: by.clone(),
                port,
            }),
            None => Ok(()),
        }
    }
}

/// Assigns VIPs from IP pools to Services; see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Allocator {
    /// Sorted by name, names unique (foreign pools included: they only fence addresses off).
    pools: Vec<Pool>,
    /// Every range in use: (family, first) -> (last, pool index). Ranges never overlap.
    owners: BTreeMap<(IpFamily, u128), (u128, usize)>,
    services: BTreeMap<ServiceName, Holding>,
    slots: BTreeMap<IpAddr, Slot>,
    /// Sharing key -> the addresses held under it.
    shared: BTreeMap<String, BTreeSet<IpAddr>>,
    /// Addresses that Services' statuses still record though those Services do not hold them
    /// (they are giving them up, and their new status is not written yet), with those
    /// Services. Such an address is not free, even once its holder (if any) lets go, until
    /// [`settle`](Allocator::settle) says each of those statuses was rewritten; else a lost
    /// write followed by a new leader would find two statuses recording one address.
    recorded: BTreeMap<IpAddr, Vec<ServiceName>>,
    problems: Vec<PoolProblem>,
}

fn fam(family: IpFamily) -> usize {
    match family {
        IpFamily::V4 => 0,
        IpFamily::V6 => 1,
    }
}

fn primary(policy: FamilyPolicy) -> IpFamily {
    match policy {
        FamilyPolicy::SingleStack { primary }
        | FamilyPolicy::PreferDualStack { primary }
        | FamilyPolicy::RequireDualStack { primary } => primary,
    }
}

impl Allocator {
    /// An allocator over `pools`, holding nothing yet, and the problems found in the pools.
    ///
    /// Where pools share addresses, the pool that came first (created earlier; the same second:
    /// the name that sorts first) keeps them and only the shared stretches are set aside in the
    /// other (reported as [`PoolProblem::Overlapping`]), so no address ever belongs to two pools
    /// and a newcomer never takes an address from a pool in use.
    pub fn new(pools: Vec<PoolSpec>) -> (Allocator, Vec<PoolProblem>) {
        let mut specs = pools;
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        let mut allocator = Allocator {
            pools: Vec::new(),
            owners: BTreeMap::new(),
            services: BTreeMap::new(),
            slots: BTreeMap::new(),
            shared: BTreeMap::new(),
            recorded: BTreeMap::new(),
            problems: Vec::new(),
        };
        for spec in specs {
            if allocator
                .pools
                .last()
                .is_some_and(|p| p.spec.name == spec.name)
            {
                allocator
                    .problems
                    .push(PoolProblem::DuplicateName { pool: spec.name });
                continue;
            }
            allocator.pools.push(Pool::empty(spec));
        }
        let mut by_age: Vec<usize> = (0..allocator.pools.len()).collect();
        by_age.sort_by_key(|&i| {
            let spec = &allocator.pools[i].spec;
            (spec.created, spec.name.clone())
        });
        for index in by_age {
            allocator.take_ranges(index);
        }
        let problems = allocator.problems.clone();
        (allocator, problems)
    }

    /// An allocator over `pools` holding what each claim records (`current`), restored oldest
    /// first so that when two record one address the older keeps it. What cannot be restored
    /// is left for [`assign_explained`](Allocator::assign_explained), which says why.
    pub fn restored(
        pools: Vec<PoolSpec>,
        claims: &[ServiceClaim],
    ) -> (Allocator, Vec<PoolProblem>) {
        let (mut allocator, problems) = Allocator::new(pools);
        let order = by_age(claims);
        for claim in order.iter().filter(|c| !c.current.is_empty()) {
            // A failure holds nothing; the Service's next assignment explains it.
            let _ = allocator.restore(claim);
        }
        for claim in &order {
            allocator.reserve_recorded(&claim.name, &claim.current);
        }
        (allocator, problems)
    }

    /// The allocator for changed `pools`, from this one: every Service keeps what this
    /// allocator holds for it (which may be newer than its status) as long as that lies in a
    /// pool of ours and its request did not change. Where two holders now collide (one changed
    /// its ports on a shared address), each is restored with the ports it held, so the one
    /// that changed is the one that moves when it is next assigned. `claims` carry the
    /// statuses as `current`, and `writing` the addresses of status writes still in flight:
    /// what those record, or may record once written, and nobody holds stays out of reach
    /// until [`settle`](Allocator::settle), as here. (A decision dropped by the rebuild whose
    /// write lands later would otherwise find its address given to another.)
    pub fn rebuilt(
        &self,
        pools: Vec<PoolSpec>,
        claims: &[ServiceClaim],
        writing: &BTreeMap<ServiceName, Vec<IpAddr>>,
    ) -> (Allocator, Vec<PoolProblem>) {
        let (held, recorded): (Vec<ServiceClaim>, Vec<ServiceClaim>) = claims
            .iter()
            .cloned()
            .partition(|claim| self.services.contains_key(&claim.name));
        let held: Vec<ServiceClaim> = held
            .into_iter()
            .filter_map(|mut claim| {
                let holding = self.services.get(&claim.name)?;
                claim.current = holding.assignment.addresses.clone();
                claim.ports = holding.ports.clone();
                claim.sharing_key = holding.sharing_key.clone();
                Some(claim)
            })
            .collect();
        // What this allocator holds is the truth, and goes first; a status alone (a Service
        // it holds nothing for) is restored only where that leaves room.
        let (mut allocator, problems) = Allocator::new(pools);
        for claim in by_age(&held).into_iter().chain(by_age(&recorded)) {
            if !claim.current.is_empty() {
                let _ = allocator.restore(claim);
            }
        }
        for claim in claims {
            allocator.reserve_recorded(&claim.name, &claim.current);
        }
        for (name, addrs) in writing {
            allocator.reserve_recorded(name, addrs);
        }
        for (addr, names) in &self.recorded {
            for name in names {
                allocator.reserve_recorded(name, &[*addr]);
            }
        }
        (allocator, problems)
    }

    /// Gives pool `index` the addresses of its ranges that no pool before it has taken.
    fn take_ranges(&mut self, index: usize) {
        let spec = self.pools[index].spec.clone();
        if spec.ranges.is_empty() {
            self.problems.push(PoolProblem::NoRanges {
                pool: spec.name.clone(),
            });
        }
        let mut accepted: [Vec<(u128, u128)>; 2] = Default::default();
        for range in &spec.ranges {
            let family = range.family();
            let (first, last) = (to_u128(range.first()), to_u128(range.last()));
            let avoided = spec.avoid_buggy_ips && family == IpFamily::V4;
            if avoided && free::buggy_count(first, last) == range.size() {
                self.problems.push(PoolProblem::NothingUsable {
                    pool: spec.name.clone(),
                    range: *range,
                });
            }
            // The stretches between the parts other pools own are this pool's.
            let mut next = Some(first);
            for (start, end, other) in self.owned_within(family, first, last) {
                let shared = (start.max(first), end.min(last));
                if let Some(shared_range) =
                    IpRange::new(from_u128(family, shared.0), from_u128(family, shared.1))
                {
                    self.problems.push(PoolProblem::Overlapping {
                        pool: spec.name.clone(),
                        other: self.pools[other].spec.name.clone(),
                        range: *range,
                        shared: shared_range,
                    });
                }
                if let Some(from) = next
                    && from < shared.0
                {
                    accepted[fam(family)].push((from, shared.0 - 1));
                }
                next = shared.1.checked_add(1);
            }
            if let Some(from) = next
                && from <= last
            {
                accepted[fam(family)].push((from, last));
            }
        }

        let mut intervals = Vec::new();
        let mut capacity = [0u128; 2];
        for family in [IpFamily::V4, IpFamily::V6] {
            let merged = merge(&mut accepted[fam(family)]);
            let avoided = spec.avoid_buggy_ips && family == IpFamily::V4;
            for &(first, last) in &merged {
                let mut size = (last - first).saturating_add(1);
                if avoided {
                    size -= free::buggy_count(first, last);
                }
                capacity[fam(family)] = capacity[fam(family)].saturating_add(size);
                intervals.push((family, first, last));
                self.owners.insert((family, first), (last, index));
            }
            accepted[fam(family)] = merged;
        }
        let pool = &mut self.pools[index];
        pool.free = [
            FreeSpace::new(&accepted[0], spec.avoid_buggy_ips),
            FreeSpace::new(&accepted[1], false),
        ];
        pool.intervals = intervals;
        pool.capacity = capacity;
    }

    /// The ranges already owned that share addresses with `first..=last`, in address order:
    /// (start, end, pool index).
    fn owned_within(&self, family: IpFamily, first: u128, last: u128) -> Vec<(u128, u128, usize)> {
        let before = self
            .owners
            .range(..(family, first))
            .next_back()
            .filter(|((f, _), (end, _))| *f == family && *end >= first);
        before
            .into_iter()
            .chain(self.owners.range((family, first)..=(family, last)))
            .map(|(&(_, start), &(end, pool))| (start, end, pool))
            .collect()
    }

    /// The problems found in the pools when the allocator was built.
    pub fn problems(&self) -> &[PoolProblem] {
        &self.problems
    }

    /// Takes back exactly the addresses recorded in `claim.current`, at start-up, before any new
    /// assignment. They must lie in one pool, be free (or shareable under the sharing rules) and
    /// fit the claim's families, pool annotation and request; otherwise nothing is taken and the
    /// Service holds what it held before (normally nothing).
    pub fn restore(&mut self, claim: &ServiceClaim) -> Result<Assignment, AllocError> {
        if claim.current.is_empty() {
            return Err(AllocError::NothingRecorded);
        }
        let previous = self.unhold(&claim.name);
        let restored = self.take_exact(claim, &claim.current, Taking::Record);
        if restored.is_err()
            && let Some(previous) = previous
        {
            // Its addresses were freed just above, so they can be held again as they were.
            self.hold_again(&claim.name, previous);
        }
        restored
    }

    /// Gives the Service addresses that fit its claim.
    ///
    /// Idempotent: an assignment that still fits is returned unchanged (a PreferDualStack Service
    /// holding one family gains the other when its pool can now give it; what it holds never
    /// moves). When the claim no longer fits (another requested address, another pool, a port
    /// now colliding on a shared address), the old addresses are released and new ones chosen.
    /// A Service holding nothing first gets back its recorded `claim.current` when that fits as
    /// [`restore`](Allocator::restore) would take it. A malformed request keeps a held or
    /// recorded assignment and is an error without one.
    pub fn assign(&mut self, claim: &ServiceClaim) -> Result<Assignment, AllocError> {
        self.assign_explained(claim).0
    }

    /// [`assign`](Allocator::assign), and what became of the recorded addresses when the
    /// Service could not keep them (they left every pool of ours, or its request changed).
    pub fn assign_explained(
        &mut self,
        claim: &ServiceClaim,
    ) -> (Result<Assignment, AllocError>, Option<Released>) {
        if let Some(kept) = self.keep(claim) {
            // A family the Service no longer wants may still be in its status.
            self.reserve_recorded(&claim.name, &claim.current);
            return (Ok(kept), None);
        }
        // The Service's status is the allocation record: when it fits, take it back rather
        // than move the Service (a restore that happens late, or after a release).
        let mut released = None;
        if !claim.current.is_empty() {
            match self.take_exact(
                claim,
                &still_wanted(claim.families, &claim.current),
                Taking::Record,
            ) {
                Ok(recorded) => {
                    let kept = self.widen(claim, recorded);
                    self.reserve_recorded(&claim.name, &claim.current);
                    return (Ok(kept), None);
                }
                Err(reason) => {
                    released = Some(Released {
                        addresses: claim.current.clone(),
                        reason,
                    })
                }
            }
        }
        let result = match &claim.requested {
            Requested::Malformed(message) => Err(AllocError::MalformedRequest(message.clone())),
            Requested::Addresses(wanted) if !wanted.is_empty() => {
                self.assign_requested(claim, wanted)
            }
            _ => self.assign_any(claim),
        };
        if let Some(released) = &released {
            self.reserve_recorded(&claim.name, &released.addresses);
        }
        (result, released)
    }

    /// Keeps `addrs` from being handed out while `name`'s status records them, those of them
    /// that lie in a pool and that `name` does not hold. [`settle`](Allocator::settle) lets
    /// them go.
    pub fn reserve_recorded(&mut self, name: &ServiceName, addrs: &[IpAddr]) {
        for &addr in addrs {
            let Some(index) = self.pool_index(addr) else {
                continue;
            };
            let held = self.slots.get(&addr);
            if held.is_some_and(|slot| slot.holders.iter().any(|h| h == name)) {
                continue;
            }
            let unheld = held.is_none();
            let recorders = self.recorded.entry(addr).or_default();
            if recorders.contains(name) {
                continue;
            }
            recorders.push(name.clone());
            if recorders.len() == 1 && unheld {
                self.set_aside(addr, index, true);
            }
        }
    }

    /// Says that `name`'s status now records `written` (it was written, or needed no write):
    /// the addresses it was giving up are free unless another status records them too, and
    /// what it records but no longer holds (a decision dropped by a rebuild while its write
    /// was in flight) stays out of reach. True when an address came free.
    pub fn settle(&mut self, name: &ServiceName, written: &[IpAddr]) -> bool {
        let given_up: Vec<IpAddr> = self
            .recorded
            .iter()
            .filter(|(addr, by)| by.contains(name) && !written.contains(addr))
            .map(|(addr, _)| *addr)
            .collect();
        let mut freed = false;
        for addr in given_up {
            freed |= self.unrecord(name, addr);
        }
        self.reserve_recorded(name, written);
        freed
    }

    /// Forgets that `name`'s status records `addr`; true when the address came free.
    fn unrecord(&mut self, name: &ServiceName, addr: IpAddr) -> bool {
        let Some(recorders) = self.recorded.get_mut(&addr) else {
            return false;
        };
        recorders.retain(|n| n != name);
        if !recorders.is_empty() {
            return false;
        }
        self.recorded.remove(&addr);
        if self.slots.contains_key(&addr) {
            return false;
        }
        let Some(index) = self.pool_index(addr) else {
            return false;
        };
        let family = fam(IpFamily::of(&addr));
        let pool = &mut self.pools[index];
        pool.free[family].put_back(to_u128(addr));
        if !pool.avoids(addr) {
            pool.recorded[family] = pool.recorded[family].saturating_sub(1);
        }
        true
    }

    /// Counts an unheld address that a status records as not available; `take` when it is
    /// still in free space (it is not when its last holder just let go).
    fn set_aside(&mut self, addr: IpAddr, index: usize, take: bool) {
        let family = fam(IpFamily::of(&addr));
        let pool = &mut self.pools[index];
        if take {
            pool.free[family].take(to_u128(addr));
        }
        if !pool.avoids(addr) {
            pool.recorded[family] += 1;
        }
    }

    /// Frees what the Service holds and returns it (it is gone: its status records nothing).
    pub fn release(&mut self, name: &ServiceName) -> Option<Assignment> {
        self.settle(name, &[]);
        self.unhold(name).map(|h| h.assignment)
    }

    /// What the Service holds.
    pub fn assignment(&self, name: &ServiceName) -> Option<&Assignment> {
        self.services.get(name).map(|h| &h.assignment)
    }

    /// Every Service's assignment, by name.
    pub fn assignments(&self) -> impl Iterator<Item = (&ServiceName, &Assignment)> {
        self.services.iter().map(|(n, h)| (n, &h.assignment))
    }

    /// Every Service that holds an address or whose status keeps one out of reach: what a
    /// sweep for deletions the watch missed must [`release`](Allocator::release) when gone.
    pub fn services(&self) -> BTreeSet<ServiceName> {
        self.services
            .keys()
            .chain(self.recorded.values().flatten())
            .cloned()
            .collect()
    }

    /// Addresses that a Service's status still records though it does not hold them, with
    /// that Service: not free until it [`settle`](Allocator::settle)s.
    pub fn recorded(&self) -> impl Iterator<Item = (&IpAddr, &ServiceName)> {
        self.recorded
            .iter()
            .flat_map(|(addr, names)| names.iter().map(move |n| (addr, n)))
    }

    /// The Services holding `addr`, by name (several only when they share it).
    pub fn holders(&self, addr: IpAddr) -> impl Iterator<Item = &ServiceName> {
        self.slots
            .get(&addr)
            .into_iter()
            .flat_map(|s| s.holders.iter())
    }

    /// The pool containing `addr`, if any (ranges set aside for overlap belong to no pool here).
    pub fn pool_of(&self, addr: IpAddr) -> Option<&str> {
        self.pool_index(addr).map(|i| self.pools[i].name())
    }

    /// Counts and allocations of the pool named `pool`.
    ///
    /// Counts cost O(1); the allocations list is copied whole (O(held addresses)), so a caller
    /// that needs only the first few should use [`Allocator::allocations`].
    pub fn usage(&self, pool: &str) -> Option<PoolUsage> {
        let index = self.pool_named(pool)?;
        let p = &self.pools[index];
        let (allocations, _) = self.allocations(pool, usize::MAX)?;
        // Avoided addresses held from before are outside the capacity: they take nothing from it.
        let counted_v4 = (p.assigned[0] + p.recorded[0]).saturating_sub(p.assigned_avoided);
        Some(PoolUsage {
            assigned_v4: p.assigned[0],
            assigned_v6: p.assigned[1],
            available_v4: p.capacity[0].saturating_sub(u128::from(counted_v4)),
            available_v6: p.capacity[1].saturating_sub(u128::from(p.assigned[1] + p.recorded[1])),
            non_matching: p.non_matching,
            allocations,
        })
    }

    /// The first `limit` held addresses of `pool` in address order with their holders, and
    /// whether more were left out.
    pub fn allocations(&self, pool: &str, limit: usize) -> Option<(Vec<HeldAddress>, bool)> {
        let index = self.pool_named(pool)?;
        let mut held = self.pools[index]
            .intervals
            .iter()
            .flat_map(|&(f, first, last)| {
                self.slots
                    .range(from_u128(f, first)..=from_u128(f, last))
                    .map(|(addr, slot)| (*addr, slot.holders.iter().cloned().collect()))
            });
        let shown: Vec<_> = held.by_ref().take(limit).collect();
        let truncated = held.next().is_some();
        Some((shown, truncated))
    }

    /// Keeps (after re-checking) what the Service holds, if it still fits the claim.
    fn keep(&mut self, claim: &ServiceClaim) -> Option<Assignment> {
        let held = self.services.get(&claim.name)?;
        if matches!(claim.requested, Requested::Malformed(_)) {
            return Some(held.assignment.clone());
        }
        // Checking against the other holders is simplest with this Service's own use removed.
        let previous = self.unhold(&claim.name)?;
        let kept = self
            .take_exact(
                claim,
                &still_wanted(claim.families, &previous.assignment.addresses),
                Taking::Record,
            )
            .ok()?;
        Some(self.widen(claim, kept))
    }

    /// Adds the missing family to a PreferDualStack Service when its pool can give it.
    fn widen(&mut self, claim: &ServiceClaim, kept: Assignment) -> Assignment {
        let FamilyPolicy::PreferDualStack { primary } = claim.families else {
            return kept;
        };
        let [only] = kept.addresses[..] else {
            return kept;
        };
        let Some(index) = self.pool_named(&kept.pool) else {
            return kept;
        };
        let missing = IpFamily::of(&only).other();
        // A new address follows the pool's rules as now written, even for a kept holder.
        if !self.pools[index].has_family(missing) || !self.pools[index].fits(claim, &[]) {
            return kept;
        }
        let Some(extra) = self.pick(claim, index, missing) else {
            return kept;
        };
        self.unhold(&claim.name);
        self.commit(claim, index, primary, vec![only, extra])
    }

    /// Takes exactly `addrs` for the claim, or nothing.
    fn take_exact(
        &mut self,
        claim: &ServiceClaim,
        addrs: &[IpAddr],
        taking: Taking,
    ) -> Result<Assignment, AllocError> {
        check_shape(claim.families, addrs)?;
        let mut addrs = addrs.to_vec();
        if let FamilyPolicy::RequireDualStack { primary } = claim.families {
            for family in [primary, primary.other()] {
                if addrs.iter().any(|a| IpFamily::of(a) == family) {
                    continue;
                }
                // A holder that must now be dual-stack keeps its address and gains the other
                // family from the same pool, under that pool's rules as now written.
                if let (Taking::Record, [held]) = (taking, &addrs[..])
                    && let Ok(index) = self.pool_for_addresses(claim, &[*held], taking)
                    && self.pools[index].has_family(family)
                    && self.pools[index].fits(claim, &[])
                    && let Some(extra) = self.pick(claim, index, family)
                {
                    addrs.push(extra);
                    continue;
                }
                return Err(AllocError::MissingFamily { family });
            }
        }
        let addrs = &addrs[..];
        if let Requested::Addresses(wanted) = &claim.requested
            && let Some(requested) = wanted.iter().find(|w| !addrs.contains(w))
        {
            return Err(AllocError::RequestChanged {
                requested: *requested,
            });
        }
        let index = self.pool_for_addresses(claim, addrs, taking)?;
        self.check_available(claim, index, addrs, taking)?;
        Ok(self.commit(claim, index, primary(claim.families), addrs.to_vec()))
    }

    /// Serves an explicit request: the requested addresses, plus the other family from the same
    /// pool when the policy wants it.
    fn assign_requested(
        &mut self,
        claim: &ServiceClaim,
        wanted: &[IpAddr],
    ) -> Result<Assignment, AllocError> {
        check_shape(claim.families, wanted)?;
        let index = self.pool_for_addresses(claim, wanted, Taking::Request)?;
        self.check_available(claim, index, wanted, Taking::Request)?;
        let mut addrs = wanted.to_vec();
        let primary = primary(claim.families);
        let required = match claim.families {
            FamilyPolicy::SingleStack { .. } => None,
            FamilyPolicy::PreferDualStack { .. } => Some(false),
            FamilyPolicy::RequireDualStack { .. } => Some(true),
        };
        if let (Some(required), [only]) = (required, wanted) {
            let missing = IpFamily::of(only).other();
            let pool = &self.pools[index];
            let extra = if pool.has_family(missing) {
                self.pick(claim, index, missing)
                    .ok_or_else(|| AllocError::PoolExhausted {
                        pool: self.pools[index].name().to_owned(),
                        family: missing,
                    })
            } else {
                Err(AllocError::FamilyUnavailable {
                    family: missing,
                    pool: Some(pool.name().to_owned()),
                })
            };
            match extra {
                Ok(extra) => addrs.push(extra),
                Err(e) if required => return Err(e),
                Err(_) => {}
            }
        }
        Ok(self.commit(claim, index, primary, addrs))
    }

    /// Serves a Service that asks for any address: pool by pool, families as the policy wants.
    fn assign_any(&mut self, claim: &ServiceClaim) -> Result<Assignment, AllocError> {
        let candidates = self.candidates(claim)?;
        let primary = primary(claim.families);
        let both = [primary, primary.other()];
        match claim.families {
            FamilyPolicy::SingleStack { .. } => {
                self.take_from_pools(claim, &candidates, &[primary])
            }
            FamilyPolicy::RequireDualStack { .. } => {
                self.take_from_pools(claim, &candidates, &both)
            }
            FamilyPolicy::PreferDualStack { .. } => {
                // Priority and selection choose the pool; the pool's families decide how many
                // addresses the Service gets, never the other way round.
                for &index in &candidates {
                    for families in [&both[..], &[primary], &[primary.other()]] {
                        if let Ok(assignment) = self.take_in_pool(claim, index, families) {
                            return Ok(assignment);
                        }
                    }
                }
                self.take_from_pools(claim, &candidates, &[primary])
            }
        }
    }

    /// The pools that may serve a Service asking for any address, best first: the named pool;
    /// else matching selective pools by priority then name, then the other autoAssign pools.
    fn candidates(&self, claim: &ServiceClaim) -> Result<Vec<usize>, AllocError> {
        if let Some(name) = &claim.pool {
            let index = self
                .pool_named(name)
                .ok_or_else(|| AllocError::UnknownPool(name.clone()))?;
            self.pools[index].serving()?;
            self.pools[index].check_selects(claim, None)?;
            return Ok(vec![index]);
        }
        let auto = |p: &&Pool| p.spec.auto_assign && !p.intervals.is_empty() && p.serving().is_ok();
        let mut selective: Vec<(i32, usize)> = self
            .pools
            .iter()
            .enumerate()
            .filter(|(_, p)| auto(p) && p.selects(claim))
            .filter_map(|(i, p)| Some((p.spec.service_allocation.as_ref()?.priority, i)))
            .collect();
        // Pools are in name order, so a stable sort on priority alone breaks ties by name.
        selective.sort_by_key(|(priority, _)| std::cmp::Reverse(*priority));
        let open = self
            .pools
            .iter()
            .enumerate()
            .filter(|(_, p)| auto(p) && p.spec.service_allocation.is_none())
            .map(|(i, _)| i);
        let candidates: Vec<usize> = selective.into_iter().map(|(_, i)| i).chain(open).collect();
        if !candidates.is_empty() {
            return Ok(candidates);
        }
        let reason = if self.pools.is_empty() {
            NoPoolReason::NoPools
        } else if self
            .pools
            .iter()
            .any(|p| p.spec.auto_assign && p.serving().is_ok())
        {
            NoPoolReason::NoneSelects
        } else {
            NoPoolReason::NoneAutoAssigns
        };
        Err(AllocError::NoPoolAvailable(reason))
    }

    /// Takes one address of each family from the first pool that can give them all.
    fn take_from_pools(
        &mut self,
        claim: &ServiceClaim,
        pools: &[usize],
        families: &[IpFamily],
    ) -> Result<Assignment, AllocError> {
        let mut failures = Vec::new();
        for &index in pools {
            match self.take_in_pool(claim, index, families) {
                Ok(assignment) => return Ok(assignment),
                Err(e) => failures.push(e),
            }
        }
        if failures.len() == 1
            && let Some(only) = failures.pop()
        {
            return Err(only);
        }
        let exhausted: Vec<(IpFamily, String)> = failures
            .iter()
            .filter_map(|e| match e {
                AllocError::PoolExhausted { pool, family } => Some((*family, pool.clone())),
                _ => None,
            })
            .collect();
        match exhausted.first() {
            Some((family, _)) => Err(AllocError::PoolsExhausted {
                family: *family,
                pools: exhausted.into_iter().map(|(_, p)| p).collect(),
            }),
            None => Err(AllocError::FamilyUnavailable {
                family: failures
                    .iter()
                    .find_map(|e| match e {
                        AllocError::FamilyUnavailable { family, .. } => Some(*family),
                        _ => None,
                    })
                    .unwrap_or(families.first().copied().unwrap_or(IpFamily::V4)),
                pool: None,
            }),
        }
    }

    fn take_in_pool(
        &mut self,
        claim: &ServiceClaim,
        index: usize,
        families: &[IpFamily],
    ) -> Result<Assignment, AllocError> {
        let pool = &self.pools[index];
        if let Some(&family) = families.iter().find(|f| !pool.has_family(**f)) {
            return Err(AllocError::FamilyUnavailable {
                family,
                pool: Some(pool.name().to_owned()),
            });
        }
        let mut addrs = Vec::with_capacity(families.len());
        for &family in families {
            // Picks do not take anything, so a failure on the second family leaves nothing held.
            match self.pick(claim, index, family) {
                Some(addr) => addrs.push(addr),
                None => {
                    return Err(AllocError::PoolExhausted {
                        pool: self.pools[index].name().to_owned(),
                        family,
                    });
                }
            }
        }
        Ok(self.commit(claim, index, primary(claim.families), addrs))
    }

    /// The address of `family` in the pool that the claim would get, without taking it: an
    /// address already shared under its key where no port collides, else the lowest free one.
    fn pick(&mut self, claim: &ServiceClaim, index: usize, family: IpFamily) -> Option<IpAddr> {
        if let Some(key) = &claim.sharing_key
            && let Some(addrs) = self.shared.get(key)
        {
            let shareable = addrs.iter().find(|addr| {
                IpFamily::of(addr) == family
                    && self.slots.get(addr).is_some_and(|slot| {
                        slot.pool == index && slot.admits(**addr, claim).is_ok()
                    })
            });
            if let Some(addr) = shareable {
                return Some(*addr);
            }
        }
        let n = self.pools[index].free[fam(family)].lowest()?;
        Some(from_u128(family, n))
    }

    /// The one pool holding all of `addrs`, checked against the claim's pool annotation and,
    /// for a request, the pool's serviceAllocation and avoidBuggyIPs as now written.
    fn pool_for_addresses(
        &self,
        claim: &ServiceClaim,
        addrs: &[IpAddr],
        taking: Taking,
    ) -> Result<usize, AllocError> {
        if let Some(name) = &claim.pool
            && self.pool_named(name).is_none()
        {
            return Err(AllocError::UnknownPool(name.clone()));
        }
        let mut found: Option<(IpAddr, usize)> = None;
        for &addr in addrs {
            let index = match (self.pool_index(addr), &claim.pool) {
                (Some(i), Some(name)) if self.pools[i].name() != name => None,
                (found, _) => found,
            };
            let Some(index) = index else {
                return Err(match &claim.pool {
                    Some(pool) => AllocError::RequestedNotInNamedPool {
                        addr,
                        pool: pool.clone(),
                    },
                    None => AllocError::RequestedNotInPool(addr),
                });
            };
            let pool = &self.pools[index];
            match (&pool.spec.role, taking) {
                (PoolRole::Foreign(_), _) | (PoolRole::Frozen(_), Taking::Request) => {
                    pool.serving()?
                }
                _ => {}
            }
            let request = taking == Taking::Request;
            if request {
                pool.check_selects(claim, Some(addr))?;
            }
            if request && pool.avoids(addr) {
                return Err(AllocError::AvoidedAddress {
                    addr,
                    pool: pool.name().to_owned(),
                });
            }
            match found {
                Some((first, other)) if other != index => {
                    return Err(AllocError::RequestedInDifferentPools {
                        first,
                        first_pool: self.pools[other].name().to_owned(),
                        second: addr,
                        second_pool: pool.name().to_owned(),
                    });
                }
                _ => found = Some((addr, index)),
            }
        }
        found
            .map(|(_, index)| index)
            .ok_or(AllocError::NothingRecorded)
    }

    /// Whether each address is free or may be shared with the claim. Another Service's stale
    /// record keeps an address from a newcomer, never from a Service that holds or records it
    /// itself (it may have shared it with the one whose record is stale).
    fn check_available(
        &self,
        claim: &ServiceClaim,
        index: usize,
        addrs: &[IpAddr],
        taking: Taking,
    ) -> Result<(), AllocError> {
        for &addr in addrs {
            match self.slots.get(&addr) {
                Some(slot) => slot.admits(addr, claim)?,
                None => {
                    if let Some(by) = self
                        .recorded
                        .get(&addr)
                        .filter(|_| taking == Taking::Request)
                        .and_then(|names| names.iter().find(|n| **n != claim.name))
                    {
                        return Err(AllocError::RequestedInUse {
                            addr,
                            by: by.clone(),
                        });
                    }
                    // An address of the pool that nobody holds or records is free.
                    debug_assert!(self.pools[index].intervals.iter().any(|&(f, a, b)| {
                        f == IpFamily::of(&addr) && (a..=b).contains(&to_u128(addr))
                    }));
                }
            }
        }
        Ok(())
    }

    /// Records that the claim holds `addrs` of pool `index` (checked by the caller).
    fn commit(
        &mut self,
        claim: &ServiceClaim,
        index: usize,
        primary: IpFamily,
        mut addrs: Vec<IpAddr>,
    ) -> Assignment {
        addrs.sort_by_key(|a| IpFamily::of(a) != primary);
        let holding = Holding {
            fits: self.pools[index].fits(claim, &addrs),
            assignment: Assignment {
                addresses: addrs,
                pool: self.pools[index].name().to_owned(),
            },
            sharing_key: claim.sharing_key.clone(),
            ports: claim.ports.clone(),
        };
        let assignment = holding.assignment.clone();
        self.hold_again(&claim.name, holding);
        assignment
    }

    /// Records `holding` for `name` without checks.
    fn hold_again(&mut self, name: &ServiceName, holding: Holding) {
        for &addr in &holding.assignment.addresses {
            let Some(index) = self.pool_index(addr) else {
                continue;
            };
            // Holding an address ends this Service's record of it. An unheld recorded address
            // is out of free space already, and counted as set aside until now.
            if !self.slots.contains_key(&addr) && self.recorded.contains_key(&addr) {
                let family = fam(IpFamily::of(&addr));
                let pool = &mut self.pools[index];
                if !pool.avoids(addr) {
                    pool.recorded[family] = pool.recorded[family].saturating_sub(1);
                }
            }
            if let Some(recorders) = self.recorded.get_mut(&addr) {
                recorders.retain(|n| n != name);
                if recorders.is_empty() {
                    self.recorded.remove(&addr);
                }
            }
            let slot = match self.slots.entry(addr) {
                Entry::Occupied(slot) => slot.into_mut(),
                Entry::Vacant(vacant) => {
                    let family = IpFamily::of(&addr);
                    let pool = &mut self.pools[index];
                    pool.free[fam(family)].take(to_u128(addr));
                    pool.assigned[fam(family)] += 1;
                    if pool.avoids(addr) {
                        pool.assigned_avoided += 1;
                    }
                    if let Some(key) = &holding.sharing_key {
                        self.shared.entry(key.clone()).or_default().insert(addr);
                    }
                    vacant.insert(Slot {
                        pool: index,
                        sharing_key: holding.sharing_key.clone(),
                        holders: Holders::default(),
                        ports: BTreeMap::new(),
                    })
                }
            };
            slot.holders.insert(name.clone());
            // Ports matter only where sharing is possible; an unshared address refuses everyone.
            if slot.sharing_key.is_some() {
                for port in &holding.ports {
                    slot.ports.insert(*port, name.clone());
                }
            }
        }
        if !holding.fits
            && let Some(index) = self.pool_named(&holding.assignment.pool)
        {
            self.pools[index].non_matching += 1;
        }
        self.services.insert(name.clone(), holding);
    }

    /// Forgets what `name` holds, freeing addresses nobody else holds.
    fn unhold(&mut self, name: &ServiceName) -> Option<Holding> {
        let holding = self.services.remove(name)?;
        if !holding.fits
            && let Some(index) = self.pool_named(&holding.assignment.pool)
        {
            let pool = &mut self.pools[index];
            pool.non_matching = pool.non_matching.saturating_sub(1);
        }
        for addr in &holding.assignment.addresses {
            let Some(slot) = self.slots.get_mut(addr) else {
                continue;
            };
            slot.holders.remove(name);
            for port in &holding.ports {
                if slot.ports.get(port) == Some(name) {
                    slot.ports.remove(port);
                }
            }
            if !slot.holders.is_empty() {
                continue;
            }
            let Some(slot) = self.slots.remove(addr) else {
                continue;
            };
            let family = IpFamily::of(addr);
            // Another status still records it: set aside, not free, until that one settles.
            let recorded = self.recorded.contains_key(addr);
            if recorded {
                self.set_aside(*addr, slot.pool, false);
            }
            let pool = &mut self.pools[slot.pool];
            if !recorded {
                pool.free[fam(family)].put_back(to_u128(*addr));
            }
            pool.assigned[fam(family)] = pool.assigned[fam(family)].saturating_sub(1);
            if pool.avoids(*addr) {
                pool.assigned_avoided = pool.assigned_avoided.saturating_sub(1);
            }
            if let Some(key) = slot.sharing_key
                && let Some(addrs) = self.shared.get_mut(&key)
            {
                addrs.remove(addr);
                if addrs.is_empty() {
                    self.shared.remove(&key);
                }
            }
        }
        Some(holding)
    }

    fn pool_named(&self, name: &str) -> Option<usize> {
        self.pools
            .binary_search_by(|p| p.spec.name.as_str().cmp(name))
            .ok()
    }

    fn pool_index(&self, addr: IpAddr) -> Option<usize> {
        let family = IpFamily::of(&addr);
        let n = to_u128(addr);
        let (&(f, _), &(last, index)) = self.owners.range(..=(family, n)).next_back()?;
        (f == family && n <= last).then_some(index)
    }
}

/// The held addresses a Service keeps under its policy as now written: a single-stack Service
/// keeps its family's address and lets the other go, rather than moving both.
fn still_wanted(policy: FamilyPolicy, addrs: &[IpAddr]) -> Vec<IpAddr> {
    match policy {
        FamilyPolicy::SingleStack { primary } => addrs
            .iter()
            .copied()
            .filter(|a| IpFamily::of(a) == primary)
            .collect(),
        _ => addrs.to_vec(),
    }
}

/// Checks the count and families of a list of addresses against the policy.
fn check_shape(policy: FamilyPolicy, addrs: &[IpAddr]) -> Result<(), AllocError> {
    if addrs.len() > 2 {
        return Err(AllocError::TooManyRequested { count: addrs.len() });
    }
    if let [first, second] = addrs
        && IpFamily::of(first) == IpFamily::of(second)
    {
        return Err(AllocError::TwoOfOneFamily {
            family: IpFamily::of(first),
            first: *first,
            second: *second,
        });
    }
    if let FamilyPolicy::SingleStack { primary } = policy
        && let Some(addr) = addrs.iter().find(|a| IpFamily::of(a) != primary)
    {
        return Err(AllocError::FamilyNotWanted {
            addr: *addr,
            primary,
        });
    }
    Ok(())
}

/// Sorts and merges overlapping or adjacent intervals (a pool may list overlapping ranges of its
/// own; that is not a conflict).
fn merge(intervals: &mut [(u128, u128)]) -> Vec<(u128, u128)> {
    intervals.sort_unstable();
    let mut merged: Vec<(u128, u128)> = Vec::with_capacity(intervals.len());
    for &(first, last) in intervals.iter() {
        match merged.last_mut() {
            Some((_, end)) if first <= end.saturating_add(1) => *end = (*end).max(last),
            _ => merged.push((first, last)),
        }
    }
    merged
}
