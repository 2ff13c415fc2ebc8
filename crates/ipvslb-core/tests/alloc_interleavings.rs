//! The allocator controller's protocol as a deterministic simulation: Service creates, changes
//! and deletes, reconciles (a decision, then its status write, which may be delayed or lost),
//! pool edits, missed deletions and leader changes happen in an order drawn from a seed. After
//! every step no address is held twice; at quiescence every status matches the allocator, no
//! address is recorded twice, a new leader would move nothing, and no Service ever lost an
//! address the rules let it keep.
//!
//! `IPVSLB_SEED=n cargo test -p ipvslb-core --test alloc_interleavings` replays one seed;
//! `IPVSLB_SEEDS=n` runs that many (default 5,000); with `IPVSLB_TRACE=1` a failing seed's steps
//! also show what the allocator holds and what statuses keep out of reach after each decision.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipvslb_core::alloc::{AllocError, Allocator};
use ipvslb_core::{
    IpRange, PoolRole, PoolSpec, Requested, ServiceAllocation, ServiceClaim, ServiceName,
};

/// xorshift64*: small, seedable, the same on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn v4(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
}

/// How the simulated controller rebuilds for changed pools.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rebuild {
    /// Under the lock its decisions take (the controller's mechanism).
    Atomic,
    /// Snapshot, then replace later, with decisions possible in between (the old mechanism,
    /// kept to prove this simulation finds its race).
    Split,
}

/// One Service in the API: what it asks (spec) and what its status records.
#[derive(Clone)]
struct ApiService {
    claim: ServiceClaim,
    /// Bumped on every spec change, so a move can be tied to one.
    generation: u64,
    status: Vec<IpAddr>,
    /// The generation the status was decided for.
    status_generation: u64,
}

/// A decision whose status write has not reached the API yet.
struct Write {
    name: ServiceName,
    addresses: Vec<IpAddr>,
    /// The spec generation it was decided for.
    generation: u64,
    /// Whether the rules let the Service's recorded addresses go: they had left every pool, or
    /// they collide with a Service that changed its ports on a shared address (a new leader
    /// cannot tell which of two changed, so the older keeps the address).
    justified: bool,
}

struct Sim {
    rng: Rng,
    rebuild: Rebuild,
    pools: Vec<PoolSpec>,
    pool_clock: i64,
    api: BTreeMap<ServiceName, ApiService>,
    /// Each Service's sharing key (never changed), kept after deletion: the allocator may
    /// still hold a Service whose deletion it missed.
    keys: BTreeMap<ServiceName, Option<String>>,
    next_service: u32,
    /// The leader's allocator and the pools it was built for.
    allocator: Option<(Allocator, Vec<PoolSpec>)>,
    /// A split rebuild's snapshot, replaced into the allocator at a later step.
    snapshot: Option<(Vec<PoolSpec>, Allocator, Vec<ServiceClaim>)>,
    writes: Vec<Write>,
    /// Services whose records the rules let go, until their new status is written (a lost
    /// write is decided again, and the second decision no longer sees the reason).
    justified: std::collections::BTreeSet<ServiceName>,
    /// What happened, shared with the runner so that a failure can print it.
    log: Log,
}

type Log = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

trait Push {
    fn push(&self, line: String);
}

impl Push for Log {
    fn push(&self, line: String) {
        if let Ok(mut log) = self.lock() {
            log.push(line);
        }
    }
}

impl Sim {
    fn new(seed: u64, rebuild: Rebuild, log: Log) -> Self {
        let mut sim = Self {
            rng: Rng::new(seed),
            rebuild,
            pools: Vec::new(),
            pool_clock: 0,
            api: BTreeMap::new(),
            keys: BTreeMap::new(),
            next_service: 0,
            allocator: None,
            snapshot: None,
            writes: Vec::new(),
            justified: Default::default(),
            log,
        };
        let main = sim.new_pool("main", 0, 7);
        sim.pools.push(main);
        sim
    }

    fn new_pool(&mut self, name: &str, first: u8, last: u8) -> PoolSpec {
        self.pool_clock += 1;
        let mut pool = common::pool(name, self.pool_clock, &[]);
        pool.ranges = vec![IpRange::new(v4(first), v4(last)).expect("ordered")];
        pool
    }

    /// The claims as the controller builds them from its cache: status as the record.
    fn claims(&self) -> Vec<ServiceClaim> {
        self.api
            .values()
            .map(|s| {
                let mut claim = s.claim.clone();
                claim.current = s.status.clone();
                claim
            })
            .collect()
    }

    fn step(&mut self) {
        match self.rng.below(100) {
            0..=17 => self.create(),
            18..=25 => self.change(),
            26..=33 => self.delete(),
            34..=59 => self.reconcile_one(),
            60..=77 => self.flush_one(),
            78..=87 => self.edit_pools(),
            88..=91 => self.finish_split_rebuild(),
            92..=95 => self.lose_leadership(),
            _ => self.lose_a_write(),
        }
        self.check_allocator();
    }

    fn create(&mut self) {
        let name = ServiceName::new(
            if self.rng.chance(30) {
                "team"
            } else {
                "default"
            },
            format!("s{}", self.next_service),
        );
        self.next_service += 1;
        let mut claim = common::claim(&name.namespace, &name.name, i64::from(self.next_service));
        if self.rng.chance(20) {
            claim.requested = Requested::Addresses(vec![v4(self.rng.below(16) as u8)]);
        }
        if self.rng.chance(25) {
            claim.sharing_key = Some("k".into());
            claim.ports[0].port = 80 + self.rng.below(3) as u16;
        }
        self.log.push(format!("create {name}"));
        self.keys.insert(name.clone(), claim.sharing_key.clone());
        self.api.insert(
            name,
            ApiService {
                claim,
                generation: 0,
                status: Vec::new(),
                status_generation: 0,
            },
        );
    }

    fn pick(&mut self) -> Option<ServiceName> {
        if self.api.is_empty() {
            return None;
        }
        let i = self.rng.below(self.api.len());
        self.api.keys().nth(i).cloned()
    }

    fn change(&mut self) {
        let Some(name) = self.pick() else { return };
        let port = 80 + self.rng.below(3) as u16;
        let request = self.rng.chance(30).then(|| v4(self.rng.below(16) as u8));
        let service = self.api.get_mut(&name).expect("picked");
        service.generation += 1;
        service.claim.ports[0].port = port;
        service.claim.requested = match request {
            Some(addr) => Requested::Addresses(vec![addr]),
            None => Requested::Any,
        };
        self.log
            .push(format!("change {name}: port {port}, request {request:?}"));
    }

    fn delete(&mut self) {
        let Some(name) = self.pick() else { return };
        self.api.remove(&name);
        // Its status write in flight, if any, fails: the object is gone.
        self.writes.retain(|w| w.name != name);
        self.log.push(format!("delete {name}"));
        // The delete event may be missed while a watch restarts; the periodic pass collects.
        if !self.rng.chance(20)
            && let Some((allocator, _)) = self.allocator.as_mut()
        {
            allocator.release(&name);
        }
    }

    /// What the controller's reconcile does: (re)build if needed, decide, queue the write.
    fn reconcile_one(&mut self) {
        let Some(name) = self.pick() else { return };
        self.reconcile(&name);
    }

    fn reconcile(&mut self, name: &ServiceName) {
        // The controller never reconciles one object twice at once: a Service whose write is
        // still in flight waits for it.
        if self.writes.iter().any(|w| w.name == *name) {
            return;
        }
        if self.allocator.is_none() {
            // A new leader: from a fresh list of every Service's status.
            let (allocator, _) = Allocator::restored(self.pools.clone(), &self.claims());
            self.allocator = Some((allocator, self.pools.clone()));
            self.log.push("new leader rebuilt from the statuses".into());
        }
        let stale = self
            .allocator
            .as_ref()
            .is_some_and(|(_, p)| *p != self.pools);
        if stale {
            match self.rebuild {
                Rebuild::Atomic => self.rebuild_now(),
                Rebuild::Split if self.snapshot.is_none() => {
                    let (allocator, _) = self.allocator.as_ref().expect("leading");
                    self.snapshot = Some((self.pools.clone(), allocator.clone(), self.claims()));
                    self.log.push("rebuild: snapshot taken".into());
                }
                Rebuild::Split => {}
            }
        }
        let service = &self.api[name];
        let mut claim = service.claim.clone();
        claim.current = service.status.clone();
        let (allocator, pools) = self.allocator.as_mut().expect("built above");
        let record_left_pools = claim
            .current
            .iter()
            .any(|a| !pools.iter().any(|p| p.ranges.iter().any(|r| r.contains(a))));
        let (result, released) = allocator.assign_explained(&claim);
        let collided_after_a_change = match released.as_ref().map(|r| &r.reason) {
            Some(AllocError::SharingConflict { by, .. }) => {
                self.api.get(by).is_some_and(|by| by.generation != 0)
            }
            _ => false,
        };
        if record_left_pools || collided_after_a_change {
            self.justified.insert(name.clone());
        }
        let why = match (&result, &released) {
            (Err(e), _) => format!(" ({e})"),
            (_, Some(r)) => format!(" ({r})"),
            _ => String::new(),
        };
        let addresses = result.map(|a| a.addresses).unwrap_or_default();
        if std::env::var_os("IPVSLB_TRACE").is_some() {
            let held: Vec<String> = allocator
                .assignments()
                .map(|(n, a)| format!("{n}={:?}", a.addresses))
                .collect();
            let recorded: Vec<String> = allocator
                .recorded()
                .map(|(a, n)| format!("{a}<-{n}"))
                .collect();
            self.log
                .push(format!("  held {held:?} recorded {recorded:?}"));
        }
        self.log.push(format!("decide {name}: {addresses:?}{why}"));
        let generation = self.api[name].generation;
        self.writes.push(Write {
            name: name.clone(),
            addresses,
            generation,
            justified: self.justified.contains(name),
        });
    }

    /// The status writes in flight, by Service.
    fn writing(&self) -> BTreeMap<ServiceName, Vec<IpAddr>> {
        self.writes
            .iter()
            .map(|w| (w.name.clone(), w.addresses.clone()))
            .collect()
    }

    fn rebuild_now(&mut self) {
        let claims = self.claims();
        let (old, _) = self.allocator.as_ref().expect("leading");
        let (allocator, _) = old.rebuilt(self.pools.clone(), &claims, &self.writing());
        self.allocator = Some((allocator, self.pools.clone()));
        self.log.push("rebuild for changed pools".into());
    }

    fn finish_split_rebuild(&mut self) {
        if let Some((pools, old, claims)) = self.snapshot.take()
            && self.allocator.is_some()
        {
            let (allocator, _) = old.rebuilt(pools.clone(), &claims, &self.writing());
            self.allocator = Some((allocator, pools));
            self.log.push("rebuild: replaced from the snapshot".into());
        }
    }

    /// A status write reaching the API (the Service may have changed or gone meanwhile).
    fn flush_one(&mut self) {
        if self.writes.is_empty() {
            return;
        }
        let write = self.writes.remove(self.rng.below(self.writes.len()));
        self.apply_write(write);
    }

    fn apply_write(&mut self, write: Write) {
        let Some(service) = self.api.get_mut(&write.name) else {
            return;
        };
        let before = service.status.clone();
        // The status records what the allocator decided: what it gave up may go to others.
        if let Some((allocator, _)) = self.allocator.as_mut() {
            allocator.settle(&write.name, &write.addresses);
        }
        if before == write.addresses {
            return;
        }
        // A move of a recorded address must have a reason the rules accept.
        self.justified.remove(&write.name);
        let Some(service) = self.api.get_mut(&write.name) else {
            return;
        };
        if !before.is_empty() {
            // Only a change since the status was decided excuses a move.
            let changed_spec = write.generation != service.status_generation;
            assert!(
                changed_spec || write.justified,
                "{} lost {before:?} (now {:?}) with no reason the rules accept",
                write.name,
                write.addresses
            );
        }
        service.status = write.addresses;
        service.status_generation = write.generation;
        self.log
            .push(format!("status {}: {:?}", write.name, service.status));
    }

    fn lose_a_write(&mut self) {
        if !self.writes.is_empty() {
            let lost = self.writes.remove(self.rng.below(self.writes.len()));
            self.log.push(format!("write lost: {}", lost.name));
            // The controller retries a failed write: the Service is reconciled again.
            if self.api.contains_key(&lost.name) {
                self.reconcile(&lost.name.clone());
            }
        }
    }

    fn lose_leadership(&mut self) {
        // Writes in flight when the lease is lost are refused (the leader checks before each).
        self.allocator = None;
        self.snapshot = None;
        self.writes.clear();
        self.log.push("leadership lost".into());
    }

    fn edit_pools(&mut self) {
        let i = self.rng.below(self.pools.len());
        match self.rng.below(6) {
            0 => {
                let first = self.rng.below(12) as u8;
                let name = format!("p{}", self.pool_clock);
                let last = first + self.rng.below(4) as u8;
                let pool = self.new_pool(&name, first, last);
                self.pools.push(pool);
            }
            1 if self.pools.len() > 1 => {
                self.pools.remove(i);
            }
            2 => {
                let pool = &mut self.pools[i];
                let range = pool.ranges[0];
                let (first, last) = (range.first(), range.last());
                if let (IpAddr::V4(f), IpAddr::V4(l)) = (first, last) {
                    let (f, l) = (f.octets()[3], l.octets()[3]);
                    let new_last = if self.rng.chance(50) && l > f {
                        l - 1
                    } else {
                        (l + 1).min(15)
                    };
                    pool.ranges = vec![IpRange::new(v4(f), v4(new_last)).expect("ordered")];
                }
            }
            3 => {
                self.pools[i].service_allocation = match self.pools[i].service_allocation {
                    Some(_) => None,
                    None => Some(ServiceAllocation {
                        namespaces: vec!["team".into()],
                        ..ServiceAllocation::default()
                    }),
                }
            }
            4 => self.pools[i].auto_assign = !self.pools[i].auto_assign,
            _ => {
                self.pools[i].role = match self.pools[i].role {
                    PoolRole::Serving => PoolRole::Frozen("spec.serviceAllocation: bad".into()),
                    _ => PoolRole::Serving,
                }
            }
        }
        self.log.push(format!(
            "pools: {:?}",
            self.pools
                .iter()
                .map(|p| format!(
                    "{}@{}{:?} {:?} auto={} sa={}",
                    p.name,
                    p.created,
                    p.ranges,
                    p.role,
                    p.auto_assign,
                    p.service_allocation.is_some()
                ))
                .collect::<Vec<_>>()
        ));
    }

    fn check_allocator(&self) {
        let Some((allocator, _)) = &self.allocator else {
            return;
        };
        let mut seen = BTreeMap::new();
        for (name, assignment) in allocator.assignments() {
            for a in &assignment.addresses {
                if let Some(other) = seen.insert(*a, name.clone()) {
                    let sharing = |n: &ServiceName| self.keys.get(n).cloned().flatten();
                    assert!(
                        sharing(name).is_some() && sharing(name) == sharing(&other),
                        "{a} held by {other} and {name} without sharing"
                    );
                }
            }
        }
    }

    /// Stops making changes, finishes every rebuild, collects missed deletions, and reconciles
    /// and writes until nothing changes; then checks the end state.
    fn quiesce(&mut self) {
        self.finish_split_rebuild();
        if let Some((allocator, _)) = self.allocator.as_mut() {
            let gone: Vec<ServiceName> = allocator
                .services()
                .into_iter()
                .filter(|n| !self.api.contains_key(n))
                .collect();
            for name in gone {
                allocator.release(&name);
            }
        }
        for _ in 0..4 {
            let names: Vec<ServiceName> = self.api.keys().cloned().collect();
            for name in &names {
                self.reconcile(name);
            }
            for write in std::mem::take(&mut self.writes) {
                self.apply_write(write);
            }
        }
        if self.allocator.is_none() {
            // No Service was left to reconcile: a leader still comes up.
            let (allocator, _) = Allocator::restored(self.pools.clone(), &self.claims());
            self.allocator = Some((allocator, self.pools.clone()));
        }
        let (allocator, _) = self.allocator.as_ref().expect("built above");
        for (name, service) in &self.api {
            let held = allocator
                .assignment(name)
                .map(|a| a.addresses.clone())
                .unwrap_or_default();
            assert_eq!(
                service.status, held,
                "{name}: status and allocator disagree"
            );
        }
        let mut recorded = BTreeMap::new();
        for (name, service) in &self.api {
            for a in &service.status {
                if let Some(other) = recorded.insert(*a, name.clone()) {
                    let key = |n: &ServiceName| self.api[n].claim.sharing_key.clone();
                    assert!(
                        key(name).is_some() && key(name) == key(&other),
                        "{a} recorded for {other} and {name}"
                    );
                }
            }
        }
        // A new leader restores and reconciles: nothing moves.
        let before: BTreeMap<ServiceName, Vec<IpAddr>> = self
            .api
            .iter()
            .map(|(n, s)| (n.clone(), s.status.clone()))
            .collect();
        self.allocator = None;
        let names: Vec<ServiceName> = self.api.keys().cloned().collect();
        for name in &names {
            self.reconcile(name);
        }
        for write in std::mem::take(&mut self.writes) {
            self.apply_write(write);
        }
        let after: BTreeMap<ServiceName, Vec<IpAddr>> = self
            .api
            .iter()
            .map(|(n, s)| (n.clone(), s.status.clone()))
            .collect();
        assert_eq!(before, after, "a new leader moved Services");
    }
}

fn run_seed(seed: u64, rebuild: Rebuild) -> Result<(), String> {
    let log = Log::default();
    let shared = log.clone();
    let outcome = std::panic::catch_unwind(move || {
        let mut sim = Sim::new(seed, rebuild, shared);
        for _ in 0..150 {
            sim.step();
        }
        sim.quiesce();
    });
    outcome.map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let steps = log.lock().map(|l| l.join("\n")).unwrap_or_default();
        format!("{message}\nsteps:\n{steps}")
    })
}

fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("IPVSLB_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let count = std::env::var("IPVSLB_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    (0..count).collect()
}

#[test]
fn any_interleaving_of_allocator_work_keeps_every_address_unique_and_every_holder_in_place() {
    for seed in seeds() {
        if let Err(message) = run_seed(seed, Rebuild::Atomic) {
            panic!(
                "seed {seed} failed: {message}\nreplay: IPVSLB_SEED={seed} cargo test -p ipvslb-core --test alloc_interleavings"
            );
        }
    }
}

#[test]
fn the_simulation_finds_the_race_of_a_rebuild_split_from_the_decisions() {
    // The old controller snapshotted the holders, then replaced the allocator later: a
    // decision in between was forgotten. The simulation must be able to see that.
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let found = (0..2000).find(|seed| run_seed(*seed, Rebuild::Split).is_err());
    std::panic::set_hook(prev);
    assert!(
        found.is_some(),
        "no seed of 2,000 found the split rebuild's race"
    );
}
