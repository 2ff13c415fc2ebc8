//! Seeded interleavings of the director's operations against the in-memory data plane.
//!
//! Each seed drives a small cluster (Services, some sharing a VIP; two pools; three nodes) and
//! the director's machinery through a random order of events: Services created, changed and
//! deleted; pools shrunk, deleted and restored; nodes going unready; per-Service reconciles
//! planned at one step and converged at a later one; full passes whose snapshot is taken at one
//! step and applied at a later one; deletions converged on their own path; drain deadlines
//! passing. At quiescence (no reconcile pending, every deadline passed) the owned table must be
//! exactly the plan of the final objects, the interface must hold exactly its VIPs, a final full
//! pass must find nothing to repair, and the foreign entries must be as they were.
//!
//! A failing seed prints how to replay it: `IPVSLB_SEED=<seed> cargo test -p ipvslb --test
//! interleavings -- --nocapture` runs that seed alone and prints its steps.
//! `IPVSLB_SEEDS=<n>` changes how many seeds run.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipvslb::converge::{Converger, Generation, Owned, Report};
use ipvslb::dataplane::{Dataplane, Memory};
use ipvslb::director::{Claims, affected, keys_by_service, part_of, pool_of};
use ipvslb_core::plan::{Topology, plan};
use ipvslb_core::{
    Forwarding, NodeAddressType, NodeInfo, NodeSetSpec, PlannedService, PoolSpec, Selector,
    ServiceName, ServicePort, TrafficPolicy,
};
use ipvslb_ipvs::{Op, Protocol, Scheduler, ServiceFlags, ServiceKey, Table, VirtualService};

const GRACE: Duration = Duration::from_secs(10);
const STEPS: usize = 60;
const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
const PORTS: [u16; 3] = [53, 80, 443];
/// Where Services that allow sharing all go.
const SHARED_VIP: &str = "10.240.0.210";
/// VIPs of Services that share nothing: pool `p` (two of them leave when it shrinks) and `q`.
const OWN_VIPS: [&str; 5] = [
    "10.240.0.211",
    "10.240.0.212",
    "10.240.0.213",
    "10.240.0.225",
    "10.240.0.226",
];

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a test address")
}

/// splitmix64: small, and the same sequence on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[self.below(items.len())].clone())
    }

    fn ports(&mut self) -> Vec<u16> {
        let mask = 1 + self.below(7);
        PORTS
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, p)| *p)
            .collect()
    }
}

#[derive(Debug, Clone)]
struct Svc {
    created: i64,
    vip: IpAddr,
    ports: Vec<u16>,
    shares: bool,
}

/// The API objects, as the director's caches hold them.
struct World {
    services: BTreeMap<String, Svc>,
    p_shrunk: bool,
    q_deleted: bool,
    ready: [bool; 3],
    scheduler: Scheduler,
    clock: i64,
}

impl World {
    fn new() -> Self {
        Self {
            services: BTreeMap::new(),
            p_shrunk: false,
            q_deleted: false,
            ready: [true; 3],
            scheduler: Scheduler::Rr,
            clock: 0,
        }
    }

    fn pools(&self) -> Vec<PoolSpec> {
        let pool = |name: &str, range: &str| PoolSpec {
            name: name.into(),
            created: 0,
            role: ipvslb_core::PoolRole::Serving,
            ranges: vec![range.parse().expect("a range")],
            auto_assign: true,
            avoid_buggy_ips: false,
            node_set: "default".into(),
            service_allocation: None,
        };
        // Shrunk to a /31, `p` keeps .208-.209: the shared VIP and .211-.213 leave it.
        let mut pools = vec![pool(
            "p",
            if self.p_shrunk {
                "10.240.0.208/31"
            } else {
                "10.240.0.208/29"
            },
        )];
        if !self.q_deleted {
            pools.push(pool("q", "10.240.0.224/29"));
        }
        pools
    }

    fn node_sets(&self) -> Vec<NodeSetSpec> {
        vec![NodeSetSpec {
            name: "default".into(),
            selector: Selector::default(),
            address_type: NodeAddressType::InternalIp,
            forwarding: Forwarding::DirectRouting,
            scheduler: self.scheduler.clone(),
            flags: ServiceFlags::empty(),
            persistence: None,
            health: None,
        }]
    }

    fn nodes(&self) -> Vec<NodeInfo> {
        (0..3)
            .map(|i| NodeInfo {
                name: format!("node{i}"),
                labels: BTreeMap::new(),
                ready: self.ready[i],
                unschedulable: false,
                addresses: vec![(
                    NodeAddressType::InternalIp,
                    ip(&format!("10.0.0.{}", i + 1)),
                )],
            })
            .collect()
    }

    fn owned(&self) -> Owned {
        Owned::new(self.pools().iter().flat_map(|p| p.ranges.clone()).collect())
    }

    /// As the director's `planned`: a Service in no pool is not planned.
    fn planned(&self, name: &str) -> Option<PlannedService> {
        let svc = self.services.get(name)?;
        let pools = self.pools();
        let pool = pool_of(&[svc.vip], &pools)?;
        Some(PlannedService {
            name: ServiceName::new("default", name),
            created: svc.created,
            addresses: vec![svc.vip],
            pool: pool.name.clone(),
            ports: svc
                .ports
                .iter()
                .map(|port| ServicePort {
                    protocol: Protocol::Tcp,
                    port: *port,
                    node_port: None,
                })
                .collect(),
            traffic_policy: TrafficPolicy::Cluster,
            scheduler: None,
            ready_endpoints: BTreeMap::new(),
            health_check_node_port: None,
        })
    }

    /// As the director's `sharing_peers`.
    fn peers(&self, name: &str, of: &Svc) -> Vec<PlannedService> {
        if !of.shares {
            return Vec::new();
        }
        self.services
            .iter()
            .filter(|(other, s)| other.as_str() != name && s.shares && s.vip == of.vip)
            .filter_map(|(other, _)| self.planned(other))
            .collect()
    }

    /// What a reconcile of `name` plans now, and the peers it would requeue.
    fn part(&self, name: &str) -> (Table, Vec<PlannedService>) {
        let Some(svc) = self.services.get(name) else {
            return (Table::new(), Vec::new());
        };
        let peers = self.peers(name, svc);
        let Some(planned) = self.planned(name) else {
            return (Table::new(), peers);
        };
        let mut services = peers.clone();
        services.push(planned);
        let part = part_of(
            &ServiceName::new("default", name),
            &services,
            &Topology::new(self.pools(), self.node_sets(), self.nodes()),
            &Default::default(),
        );
        (part.table, peers)
    }

    fn plan(&self) -> ipvslb_core::plan::Plan {
        let planned: Vec<PlannedService> = self
            .services
            .keys()
            .filter_map(|n| self.planned(n))
            .collect();
        plan(&planned, &self.pools(), &self.node_sets(), &self.nodes())
    }

    fn free_vip(&self, rng: &mut Rng) -> Option<IpAddr> {
        let used: BTreeSet<IpAddr> = self.services.values().map(|s| s.vip).collect();
        let free: Vec<IpAddr> = OWN_VIPS
            .iter()
            .map(|v| ip(v))
            .filter(|v| !used.contains(v))
            .collect();
        rng.pick(&free)
    }
}

/// A full pass between its snapshot and its apply.
struct Pass {
    since: Generation,
    table: Table,
    by_service: BTreeMap<ServiceName, Vec<ServiceKey>>,
    owned: Owned,
}

/// The director: its converger, its controller's queue, its deletion path, its full pass.
struct Director {
    converger: Converger<std::sync::Arc<Memory>>,
    memory: std::sync::Arc<Memory>,
    pending: BTreeSet<String>,
    /// Reconciles planned and not yet converged (at most one per Service, as the controller).
    inflight: BTreeMap<String, (Table, Option<PlannedService>, Owned, Generation)>,
    claims: Claims,
    deletions: Vec<Svc>,
    deleted_names: Vec<String>,
    pass: Option<Pass>,
    timers: Vec<(Instant, String)>,
    now: Instant,
    trace: bool,
}

impl Director {
    fn report(
        &mut self,
        name: &str,
        report: &Report,
        claim_changed: bool,
        peers: &[PlannedService],
    ) {
        if self.trace {
            println!("     {name}: {report:?}");
        }
        if let Some(deadline) = report.next_drain_deadline {
            self.timers.push((deadline, name.to_owned()));
        }
        for other in affected(report, claim_changed, peers.iter().map(|p| &p.name)) {
            self.pending.insert(other.name);
        }
    }

    fn start_reconcile(&mut self, world: &World, name: String) -> Result<(), String> {
        self.pending.remove(&name);
        let seen = self.converger.generation().map_err(|e| e.to_string())?;
        if world.services.contains_key(&name) {
            let (desired, _) = world.part(&name);
            let claim = world.planned(&name);
            self.inflight
                .insert(name, (desired, claim, world.owned(), seen));
        }
        Ok(())
    }

    fn finish_reconcile(&mut self, world: &World, name: String) -> Result<(), String> {
        let Some((desired, mut claim, owned, seen)) = self.inflight.remove(&name) else {
            return Ok(());
        };
        let service = ServiceName::new("default", &name);
        let mut report = self
            .converger
            .converge_service(&service, &desired, &owned, seen, self.now)
            .map_err(|e| e.to_string())?;
        // As the director's reconcile: deleted meanwhile, so converged away again.
        let seen = self.converger.generation().map_err(|e| e.to_string())?;
        if !world.services.contains_key(&name) {
            report.merge(
                self.converger
                    .converge_service(&service, &Table::new(), &world.owned(), seen, self.now)
                    .map_err(|e| e.to_string())?,
            );
            claim = None;
        }
        let claim_changed = self.claims.changed(&service, claim.as_ref());
        let peers = world
            .services
            .get(&name)
            .map(|svc| world.peers(&name, svc))
            .unwrap_or_default();
        self.report(&name, &report, claim_changed, &peers);
        Ok(())
    }

    fn converge_deletion(&mut self, world: &World, index: usize) -> Result<(), String> {
        let name = self.deleted_names.remove(index);
        let svc = self.deletions.remove(index);
        let seen = self.converger.generation().map_err(|e| e.to_string())?;
        // As the director's deletion path: the Services sharing its VIPs were planned with
        // it; a Service of that name again is a new one, whose reconcile converges from what
        // the old one held.
        let peers = world.peers(&name, &svc);
        self.pending
            .extend(peers.iter().map(|p| p.name.name.clone()));
        self.claims
            .changed(&ServiceName::new("default", &name), None);
        if world.services.contains_key(&name) {
            return Ok(());
        }
        let report = self
            .converger
            .converge_service(
                &ServiceName::new("default", &name),
                &Table::new(),
                &world.owned(),
                seen,
                self.now,
            )
            .map_err(|e| e.to_string())?;
        self.report(&name, &report, false, &[]);
        Ok(())
    }

    fn start_pass(&mut self, world: &World) -> Result<(), String> {
        let since = self.converger.generation().map_err(|e| e.to_string())?;
        let plan = world.plan();
        self.pass = Some(Pass {
            since,
            by_service: keys_by_service(&plan),
            table: plan.table,
            owned: world.owned(),
        });
        Ok(())
    }

    fn finish_pass(&mut self) -> Result<Report, String> {
        let Some(pass) = self.pass.take() else {
            return Ok(Report::default());
        };
        let report = self
            .converger
            .converge_all(
                &pass.table,
                pass.by_service,
                &pass.owned,
                pass.since,
                self.now,
            )
            .map_err(|e| e.to_string())?;
        if self.trace {
            println!("     pass: {report:?}");
        }
        for other in affected(&report, false, []) {
            self.pending.insert(other.name);
        }
        // As the director's full pass: what it left draining converges again at the deadline.
        if let Some(deadline) = report.next_drain_deadline {
            for name in &report.draining {
                self.timers.push((deadline, name.name.clone()));
            }
        }
        Ok(report)
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = self.timers.drain(..).partition(|(t, _)| *t <= now);
        self.timers = later;
        self.pending.extend(due.into_iter().map(|(_, n)| n));
    }
}

/// Entries that are not ipvslb's: one far away, one next to the pools, never on its interface.
fn foreign() -> Table {
    let mut t = Table::new();
    for (vip, port) in [("192.168.1.1", 443), ("10.240.0.240", 80)] {
        t.insert(
            VirtualService::new(
                ServiceKey::addr(ip(vip), Protocol::Tcp, port),
                Scheduler::Wlc,
            ),
            [],
        );
    }
    t
}

fn run_seed(seed: u64, trace: bool) -> Result<(), String> {
    let mut rng = Rng(seed);
    let mut world = World::new();
    let memory = std::sync::Arc::new(Memory::default());
    let foreign = foreign();
    let setup: Vec<Op> = foreign
        .services
        .values()
        .map(|e| Op::AddService(e.service.clone()))
        .collect();
    memory.apply(&setup).map_err(|e| e.to_string())?;
    let mut d = Director {
        converger: Converger::new(memory.clone(), GRACE),
        memory: memory.clone(),
        pending: BTreeSet::new(),
        inflight: BTreeMap::new(),
        deletions: Vec::new(),
        deleted_names: Vec::new(),
        pass: None,
        timers: Vec::new(),
        now: Instant::now(),
        trace,
        claims: Claims::default(),
    };
    let log = |step: usize, what: String| {
        if trace {
            println!("{step:3}: {what}");
        }
    };
    for step in 0..STEPS {
        match rng.below(12) {
            0 | 1 => {
                let absent: Vec<&str> = NAMES
                    .iter()
                    .copied()
                    .filter(|n| !world.services.contains_key(*n))
                    .collect();
                let Some(name) = rng.pick(&absent) else {
                    continue;
                };
                let shares = rng.below(2) == 0;
                let vip = if shares {
                    Some(ip(SHARED_VIP))
                } else {
                    world.free_vip(&mut rng)
                };
                let Some(vip) = vip else { continue };
                world.clock += 1;
                let svc = Svc {
                    created: world.clock,
                    vip,
                    ports: rng.ports(),
                    shares,
                };
                log(step, format!("create {name} {svc:?}"));
                world.services.insert(name.to_owned(), svc);
                d.pending.insert(name.to_owned());
            }
            2 => {
                let names: Vec<String> = world.services.keys().cloned().collect();
                let Some(name) = rng.pick(&names) else {
                    continue;
                };
                let ports = rng.ports();
                let new_vip = if world.services[&name].shares {
                    None
                } else {
                    world.free_vip(&mut rng)
                };
                let svc = world.services.get_mut(&name).expect("picked from the map");
                svc.ports = ports;
                if let Some(vip) = new_vip.filter(|_| rng.below(2) == 0) {
                    svc.vip = vip;
                }
                log(step, format!("change {name} {svc:?}"));
                d.pending.insert(name);
            }
            3 => {
                let names: Vec<String> = world.services.keys().cloned().collect();
                let Some(name) = rng.pick(&names) else {
                    continue;
                };
                log(step, format!("delete {name}"));
                let svc = world.services.remove(&name).expect("picked from the map");
                d.pending.remove(&name);
                d.deletions.push(svc);
                d.deleted_names.push(name);
            }
            4 => {
                if rng.below(2) == 0 {
                    world.p_shrunk = !world.p_shrunk;
                } else {
                    world.q_deleted = !world.q_deleted;
                }
                log(
                    step,
                    format!(
                        "pools: p shrunk {}, q deleted {}",
                        world.p_shrunk, world.q_deleted
                    ),
                );
                d.pending.extend(world.services.keys().cloned());
            }
            5 => {
                if rng.below(3) == 0 {
                    world.scheduler = if world.scheduler == Scheduler::Rr {
                        Scheduler::Wlc
                    } else {
                        Scheduler::Rr
                    };
                } else {
                    let i = rng.below(3);
                    world.ready[i] = !world.ready[i];
                }
                log(
                    step,
                    format!(
                        "NodeSet: scheduler {}, ready {:?}",
                        world.scheduler, world.ready
                    ),
                );
                d.pending.extend(world.services.keys().cloned());
            }
            6 | 7 => {
                let startable: Vec<String> = d
                    .pending
                    .iter()
                    .filter(|n| !d.inflight.contains_key(*n))
                    .cloned()
                    .collect();
                if let Some(name) = rng.pick(&startable) {
                    log(step, format!("reconcile {name}: plan"));
                    d.start_reconcile(&world, name)?;
                }
            }
            8 => {
                let names: Vec<String> = d.inflight.keys().cloned().collect();
                if let Some(name) = rng.pick(&names) {
                    log(step, format!("reconcile {name}: converge"));
                    d.finish_reconcile(&world, name)?;
                }
            }
            9 => {
                if !d.deletions.is_empty() {
                    let i = rng.below(d.deletions.len());
                    log(
                        step,
                        format!("deletion of {}: converge", d.deleted_names[i]),
                    );
                    d.converge_deletion(&world, i)?;
                }
            }
            10 => {
                if d.pass.is_none() {
                    log(step, "full pass: snapshot".into());
                    d.start_pass(&world)?;
                } else {
                    log(step, "full pass: apply".into());
                    d.finish_pass()?;
                }
            }
            _ => {
                let by = Duration::from_secs(rng.below(16) as u64);
                log(step, format!("time passes: {by:?}"));
                d.advance(by);
            }
        }
    }

    // Quiescence: what is in flight lands, then the controller works through its queue and
    // its timers until nothing is left.
    log(STEPS, "quiescence".into());
    let names: Vec<String> = d.inflight.keys().cloned().collect();
    for name in names {
        d.finish_reconcile(&world, name)?;
    }
    while !d.deletions.is_empty() {
        d.converge_deletion(&world, 0)?;
    }
    d.finish_pass()?;
    for _ in 0..100 {
        while let Some(name) = d.pending.pop_first() {
            d.start_reconcile(&world, name.clone())?;
            d.finish_reconcile(&world, name)?;
        }
        if d.timers.is_empty() {
            break;
        }
        d.advance(GRACE + Duration::from_secs(1));
    }
    if !d.pending.is_empty() || !d.timers.is_empty() {
        return Err("the controller's queue never emptied".into());
    }

    let expected = world.plan().table;
    let kernel = d.memory.table().map_err(|e| e.to_string())?;
    let mut ours = kernel.clone();
    ours.services
        .retain(|k, _| !foreign.services.contains_key(k));
    if ours != expected {
        let keys: BTreeSet<&ServiceKey> = ours
            .services
            .keys()
            .chain(expected.services.keys())
            .collect();
        let differing: Vec<String> = keys
            .into_iter()
            .filter(|k| ours.services.get(*k) != expected.services.get(*k))
            .map(|k| {
                format!(
                    "{k}\n    kernel: {:?}\n    plan:   {:?}",
                    ours.services.get(k).map(|e| (&e.service, &e.destinations)),
                    expected
                        .services
                        .get(k)
                        .map(|e| (&e.service, &e.destinations))
                )
            })
            .collect();
        return Err(format!(
            "the owned table is not the plan:\n  {}",
            differing.join("\n  ")
        ));
    }
    let vips: BTreeSet<IpAddr> = expected
        .services
        .keys()
        .filter_map(|k| k.address())
        .collect();
    let addresses = d.memory.addresses().map_err(|e| e.to_string())?;
    if addresses != vips {
        return Err(format!(
            "the interface holds {addresses:?}, the plan's VIPs are {vips:?}"
        ));
    }
    for (key, entry) in &foreign.services {
        if kernel.services.get(key) != Some(entry) {
            return Err(format!("the foreign entry {key} was touched"));
        }
    }
    // Nothing left for a full pass to repair.
    d.start_pass(&world)?;
    let repair = d.finish_pass()?;
    if !repair.is_noop() {
        return Err(format!("a final full pass still had work: {repair:?}"));
    }
    Ok(())
}

#[test]
fn every_seeded_interleaving_of_director_operations_ends_with_the_plan_in_the_kernel() {
    if let Some(seed) = std::env::var("IPVSLB_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        if let Err(e) = run_seed(seed, true) {
            panic!("seed {seed}: {e}");
        }
        return;
    }
    let seeds: u64 = std::env::var("IPVSLB_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    let started = Instant::now();
    for seed in 0..seeds {
        if let Err(e) = run_seed(seed, false) {
            panic!(
                "seed {seed} failed: {e}\nreplay it with: IPVSLB_SEED={seed} cargo test -p ipvslb --test interleavings -- --nocapture"
            );
        }
    }
    println!("{seeds} seeds in {:.1?}", started.elapsed());
}
