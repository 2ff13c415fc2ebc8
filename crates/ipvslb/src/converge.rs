//! The director's convergence: from a plan to the data plane, per Service (cost proportional to
//! that Service) or for the whole table (start-up, periodic repair, garbage collection).
//!
//! What it may touch: virtual services whose address lies in some IPPool or is on its own
//! interface ([`Owned`]), and the addresses of that interface. Destinations that leave the plan are drained (weight 0) for
//! a grace period before they are deleted, so live connections finish.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipvslb_api::Announce;
use ipvslb_core::{IpRange, ServiceName};
use ipvslb_ipvs::{DestKey, Removal, ServiceEntry, ServiceKey, Table, diff};

use tracing::{debug, warn};

use crate::dataplane::{self, Dataplane};
use crate::election::Election;

/// How often a draining destination's connection counts are looked at again: often enough
/// that an idle one goes soon, rarely enough that a node's drain is not a reconcile per
/// Service every second.
const DRAIN_CHECK: Duration = Duration::from_secs(5);

/// What one convergence did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Operations applied, by kind (`add_service`, `edit_dest`, ...).
    pub ops: BTreeMap<&'static str, usize>,
    /// VIP addresses added to the interface.
    pub addresses_added: usize,
    /// VIP addresses removed from the interface.
    pub addresses_removed: usize,
    /// The earliest time a draining destination may be deleted, if any is draining.
    pub next_drain_deadline: Option<Instant>,
    /// The Services with a draining destination: to converge again at the deadline, when the
    /// destination can go.
    pub draining: BTreeSet<ServiceName>,
    /// The virtual services the data plane refused; everything else was applied.
    pub failures: Vec<Failure>,
    /// Per-Service converge: the keys of its desired table another Service holds, left to that
    /// Service, with the holder (whose view may be the stale one).
    pub taken: Vec<(ServiceKey, ServiceName)>,
    /// Per-Service converge: whether the Service now holds other keys than before, which
    /// may change what the Services sharing its VIPs are given.
    pub keys_changed: bool,
    /// Services once refused a key that has come free (or may have changed hands in a full
    /// pass): each should converge again.
    pub unblocked: BTreeSet<ServiceName>,
    /// Full pass: the kernel's counters of each owned destination, as its dump read them.
    pub counters: BTreeMap<(ServiceKey, ipvslb_ipvs::DestKey), ipvslb_ipvs::Stats>,
    /// VIPs announced.
    pub announced: usize,
    /// VIPs whose announcement was withdrawn.
    pub withdrawn: usize,
}

/// What [`Converger::retire`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retired {
    /// The virtual services (with their destinations).
    pub services: Vec<ServiceKey>,
    /// The addresses of the interface.
    pub addresses: Vec<IpAddr>,
    /// The announcements withdrawn (the addresses of the announce interface).
    pub announced: Vec<IpAddr>,
    /// What the kernel refused to remove.
    pub failures: Vec<Failure>,
}

/// A virtual service the data plane refused to program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The Service it is for (`None`: an entry no Service claims, which was to be removed).
    pub service: Option<ServiceName>,
    /// The virtual service.
    pub key: ServiceKey,
    /// The data plane's error, for the first refused write of that key.
    pub message: String,
}

impl Report {
    /// Whether nothing was written.
    pub fn is_noop(&self) -> bool {
        self.ops.is_empty()
            && self.addresses_added == 0
            && self.addresses_removed == 0
            && self.announced == 0
            && self.withdrawn == 0
    }

    /// Adds what a later converge did: one report for both.
    pub fn merge(&mut self, later: Report) {
        for (kind, count) in later.ops {
            *self.ops.entry(kind).or_default() += count;
        }
        self.addresses_added += later.addresses_added;
        self.addresses_removed += later.addresses_removed;
        self.announced += later.announced;
        self.withdrawn += later.withdrawn;
        self.next_drain_deadline = match (self.next_drain_deadline, later.next_drain_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.draining.extend(later.draining);
        self.failures.extend(later.failures);
        self.taken.extend(later.taken);
        self.keys_changed |= later.keys_changed;
        self.unblocked.extend(later.unblocked);
    }
}

/// What this director owns in the kernel: the virtual services on an address of some IPPool or
/// of its own interface. The interface is the kernel's record of the VIPs this director
/// programmed, so what a deleted, shrunk or invalid pool explained is still collected.
#[derive(Debug, Clone, Default)]
pub struct Owned {
    ranges: Vec<IpRange>,
    interface: BTreeSet<IpAddr>,
    /// How the VIPs of each range are announced, by their pool.
    announce: Arc<[(IpRange, Announce)]>,
}

impl Owned {
    /// Owns the addresses of these ranges (the interface's come with each converge).
    pub fn new(ranges: Vec<IpRange>) -> Self {
        Self {
            ranges,
            interface: BTreeSet::new(),
            announce: Arc::new([]),
        }
    }

    /// The same, with the announcement mode of each pool's ranges.
    pub fn announcing(mut self, modes: Vec<(IpRange, Announce)>) -> Self {
        self.announce = modes.into();
        self
    }

    /// How `vip` is announced: as its pool says, `None` outside every pool.
    pub fn announce_of(&self, vip: &IpAddr) -> Announce {
        self.announce
            .iter()
            .find(|(range, _)| range.contains(vip))
            .map_or(Announce::None, |(_, mode)| *mode)
    }

    /// Whether a virtual service is ours.
    pub fn owns(&self, key: &ServiceKey) -> bool {
        key.address().is_some_and(|a| {
            self.interface.contains(&a) || self.ranges.iter().any(|r| r.contains(&a))
        })
    }

    /// Whether a virtual service is ours, given the interface's addresses.
    fn owns_on(&self, key: &ServiceKey, interface: &BTreeSet<IpAddr>) -> bool {
        self.owns(key) || key.address().is_some_and(|a| interface.contains(&a))
    }

    /// These ranges and the addresses of the interface.
    pub fn with_interface(&self, interface: BTreeSet<IpAddr>) -> Self {
        Self {
            ranges: self.ranges.clone(),
            interface,
            announce: self.announce.clone(),
        }
    }
}

/// When a view of the caches was taken: every reconcile and every full pass takes one before it
/// reads the caches, so of two converges of a Service's keys the one planned from the later
/// view wins, whichever is applied last.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Generation(u64);

/// Per-director memory that is allowed to be lost: which keys each Service was given, when each
/// draining destination started draining, and the interface's addresses as last seen. After a
/// restart the full pass rebuilds the first and the last, and draining restarts its clock, which
/// only lengthens a grace period.
pub struct Converger<D> {
    dataplane: D,
    grace: Duration,
    state: Mutex<State>,
    /// The VIPs announced, each time that changes: for the director's own report.
    announced_tx: tokio::sync::watch::Sender<BTreeSet<IpAddr>>,
    /// Whether announcements are open (a full pass programmed the kernel, and no stop or
    /// failed pass closed them since): whether this director is fit to be elected.
    open_tx: tokio::sync::watch::Sender<bool>,
}

/// Where a convergence takes the interface's addresses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Addresses {
    /// The kernel, read afresh: the full pass repairs what someone else changed.
    Read,
    /// What this converger last read or wrote: reading every VIP of the interface for each
    /// Service would make a burst of n Services cost n².
    Remembered,
}

#[derive(Default)]
struct State {
    /// The keys each Service was given, sorted: a `Vec` of the usual one or two keys costs a
    /// fraction of a set's node.
    held: BTreeMap<ServiceName, Vec<ServiceKey>>,
    /// How many held keys each VIP carries: an address goes when its count reaches zero.
    vip_users: BTreeMap<IpAddr, usize>,
    /// Which Service holds each held key.
    holders: BTreeMap<ServiceKey, ServiceName>,
    /// The Services refused each key because another held it: told when it comes free.
    waiting: BTreeMap<ServiceKey, BTreeSet<ServiceName>>,
    /// The interface's addresses as last read or written (`None`: unknown, read next time).
    interface: Option<BTreeSet<IpAddr>>,
    draining: BTreeMap<(ServiceKey, DestKey), Instant>,
    /// The last generation handed out.
    generation: u64,
    /// The generation of the view each Service's latest per-Service converge was planned from,
    /// for those a full pass has not yet superseded.
    converged: BTreeMap<ServiceName, u64>,
    /// The VIPs each Service can serve: those of its held keys that the kernel took and that
    /// have a destination taking new connections.
    serving: BTreeMap<ServiceName, Vec<IpAddr>>,
    /// How many Services can serve each VIP: a VIP is announced while its count is above zero.
    serving_count: BTreeMap<IpAddr, usize>,
    /// Whether VIPs are announced now.
    announcing: Announcing,
    /// The announced VIPs as last read or written (`None`: unknown, read next time).
    announced: Option<BTreeSet<IpAddr>>,
    /// Each pool's announcement mode, as of the latest converge.
    modes: Owned,
    /// The live directors, for the VIPs of `L2` pools (`None`: not known yet, so none is
    /// announced).
    election: Option<Election>,
}

/// Whether a director announces the VIPs it can serve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Announcing {
    /// Not yet, or not any more: no full pass has programmed the kernel since the start or
    /// since the last one that failed. A director with a stale or empty table must not draw
    /// traffic.
    #[default]
    Waiting,
    /// Every VIP it can serve.
    Open,
    /// Never again: it is stopping, and routers move the flows to the other directors.
    Stopped,
}

impl State {
    /// Records that `name` now holds `keys` (none: it holds nothing).
    fn hold(&mut self, name: &ServiceName, keys: Vec<ServiceKey>) {
        if let Some(previous) = self.held.remove(name) {
            for key in &previous {
                if self.holders.get(key) == Some(name) {
                    self.holders.remove(key);
                }
            }
            for vip in previous.iter().filter_map(|k| k.address()) {
                if let Some(count) = self.vip_users.get_mut(&vip) {
                    *count -= 1;
                    if *count == 0 {
                        self.vip_users.remove(&vip);
                    }
                }
            }
        }
        if keys.is_empty() {
            return;
        }
        for vip in keys.iter().filter_map(|k| k.address()) {
            *self.vip_users.entry(vip).or_default() += 1;
        }
        for key in &keys {
            self.holders.insert(*key, name.clone());
        }
        self.held.insert(name.clone(), keys);
    }

    /// Records that `name` can serve `vips` (sorted, without repeats); returns the VIPs that
    /// became or stopped being served by any Service.
    fn serve(&mut self, name: &ServiceName, vips: Vec<IpAddr>) -> Vec<IpAddr> {
        let mut flipped = Vec::new();
        for vip in self.serving.remove(name).unwrap_or_default() {
            if let Some(count) = self.serving_count.get_mut(&vip) {
                *count -= 1;
                if *count == 0 {
                    self.serving_count.remove(&vip);
                    flipped.push(vip);
                }
            }
        }
        for vip in &vips {
            let count = self.serving_count.entry(*vip).or_default();
            *count += 1;
            if *count == 1 {
                // Gone and back in one converge: no change.
                match flipped.iter().position(|v| v == vip) {
                    Some(i) => {
                        flipped.swap_remove(i);
                    }
                    None => flipped.push(*vip),
                }
            }
        }
        if !vips.is_empty() {
            self.serving.insert(name.clone(), vips);
        }
        flipped
    }

    /// Forgets what every Service holds.
    fn forget_holdings(&mut self) {
        self.held.clear();
        self.vip_users.clear();
        self.holders.clear();
    }
}

impl<D: Dataplane> Converger<D> {
    /// A converger over `dataplane` that drains removed destinations for `grace`.
    pub fn new(dataplane: D, grace: Duration) -> Self {
        Self {
            dataplane,
            grace,
            state: Mutex::new(State::default()),
            announced_tx: tokio::sync::watch::Sender::new(BTreeSet::new()),
            open_tx: tokio::sync::watch::Sender::new(false),
        }
    }

    /// A new generation: take one right before reading the caches to plan a converge.
    pub fn generation(&self) -> Result<Generation, dataplane::Error> {
        let mut state = self.lock()?;
        state.generation += 1;
        Ok(Generation(state.generation))
    }

    /// The data plane.
    pub fn dataplane(&self) -> &D {
        &self.dataplane
    }

    /// The VIPs this director announces, updated each time that changes.
    pub fn announced(&self) -> tokio::sync::watch::Receiver<BTreeSet<IpAddr>> {
        self.announced_tx.subscribe()
    }

    /// How many VIPs the interface holds and how many virtual services the Services hold, as
    /// this converger last saw them.
    pub fn held(&self) -> Result<(usize, usize), dataplane::Error> {
        let state = self.lock()?;
        Ok((
            state.interface.as_ref().map_or(0, BTreeSet::len),
            state.holders.len(),
        ))
    }

    /// Whether announcements are open, updated each time that changes.
    pub fn open(&self) -> tokio::sync::watch::Receiver<bool> {
        self.open_tx.subscribe()
    }

    /// Announces the `L2` VIPs `election` gives this director and withdraws the others, once a
    /// full pass has opened the announcements.
    pub fn elect(&self, election: Election) -> Result<Report, dataplane::Error> {
        let mut state = self.lock()?;
        let mut report = Report::default();
        // The same election again: nothing to do, unless the last try could not finish.
        if state.election.as_ref() == Some(&election) && state.announced.is_some() {
            return Ok(report);
        }
        state.election = Some(election);
        self.announce_all(&mut state, &mut report)?;
        Ok(report)
    }

    /// Converges the entries of one Service: `desired` holds exactly its virtual services
    /// (empty when it has none any more), planned from the view taken at `seen`. Reads only
    /// its own keys from the kernel.
    pub fn converge_service(
        &self,
        name: &ServiceName,
        desired: &Table,
        owned: &Owned,
        seen: Generation,
        now: Instant,
    ) -> Result<Report, dataplane::Error> {
        // Held for the whole converge: a full pass applying a snapshot must not interleave
        // with it, or each would undo part of the other.
        let mut state = self.lock()?;
        state.converged.insert(name.clone(), seen.0);
        state.modes = owned.clone();
        let previous = state.held.get(name).cloned().unwrap_or_default();
        // A key another Service holds is that Service's, whatever a plan made from a partial
        // or stale view says: this converge neither takes it over nor, later, deletes it.
        let taken: Vec<(ServiceKey, ServiceName)> = desired
            .services
            .keys()
            .filter_map(|k| {
                state
                    .holders
                    .get(k)
                    .filter(|holder| *holder != name)
                    .map(|holder| (*k, holder.clone()))
            })
            .collect();
        let desired = if taken.is_empty() {
            Cow::Borrowed(desired)
        } else {
            debug!(service = %name, keys = ?taken, "leaving virtual services another Service holds");
            let mut own = desired.clone();
            own.services
                .retain(|k, _| !taken.iter().any(|(t, _)| t == k));
            Cow::Owned(own)
        };
        let desired = desired.as_ref();
        self.load_interface(&mut state, Addresses::Remembered)?;
        let interface = state.interface.as_ref();
        let keys: BTreeSet<ServiceKey> = desired
            .services
            .keys()
            .chain(previous.iter())
            .copied()
            .filter(|k| interface.map_or(owned.owns(k), |i| owned.owns_on(k, i)))
            .collect();
        let mut actual = Table::new();
        for key in &keys {
            if let Some(entry) = self.dataplane.service(key)? {
                actual.services.insert(*key, entry);
            }
        }
        let (mut report, draining) = self.apply_diff(
            &mut state,
            &actual,
            desired,
            &|k: &ServiceKey| keys.contains(k),
            now,
        )?;
        if !draining.is_empty() {
            report.draining.insert(name.clone());
        }
        for failure in &mut report.failures {
            failure.service = Some(name.clone());
        }
        for (key, _) in &taken {
            state.waiting.entry(*key).or_default().insert(name.clone());
        }
        report.taken = taken;
        let vips = self.add_missing_vips(&mut state, desired, &mut report)?;
        let now_held: Vec<ServiceKey> = desired.services.keys().copied().collect();
        report.keys_changed = now_held != previous;
        for key in previous.iter().filter(|k| !now_held.contains(k)) {
            if let Some(waiters) = state.waiting.remove(key) {
                report.unblocked.extend(waiters);
            }
        }
        state.hold(name, now_held);
        let mut touched = state.serve(
            name,
            serving_vips(desired.services.iter(), &report.failures),
        );
        // Its own VIPs too: their pool's mode may be what changed.
        touched.extend(
            desired
                .services
                .keys()
                .chain(previous.iter())
                .filter_map(|k| k.address()),
        );
        self.announce_these(&mut state, touched, &mut report)?;
        // A VIP this Service gave up may still serve another Service sharing it: remove the
        // address only when no Service holds a key on it.
        let released: Vec<IpAddr> = previous
            .iter()
            .filter_map(|k| k.address())
            .filter(|vip| !state.vip_users.contains_key(vip) && !vips.contains(vip))
            .collect();
        self.del_vips(&mut state, released, &mut report)?;
        Ok(report)
    }

    /// Converges the whole owned table to `desired` and the interface to its VIPs; also
    /// forgets Services that are gone, so their entries are collected. `desired` and
    /// `by_service` are a snapshot of the caches taken at `since`: the keys of a Service whose
    /// latest converge was planned from a later view are left, in the kernel and in memory, as
    /// that converge left them.
    pub fn converge_all(
        &self,
        desired: &Table,
        by_service: BTreeMap<ServiceName, Vec<ServiceKey>>,
        owned: &Owned,
        since: Generation,
        now: Instant,
    ) -> Result<Report, dataplane::Error> {
        let mut state = self.lock()?;
        state.modes = owned.clone();
        let newer: BTreeMap<ServiceName, Vec<ServiceKey>> = state
            .converged
            .iter()
            .filter(|(_, g)| **g > since.0)
            .map(|(name, _)| {
                (
                    name.clone(),
                    state.held.get(name).cloned().unwrap_or_default(),
                )
            })
            .collect();
        // What a newer Service holds now is as its converge left it: the pass does not touch
        // it. What the snapshot gave a newer Service beyond that is stale: the pass does not
        // create it, and removes it as no Service's.
        let fresh: BTreeSet<ServiceKey> = newer.values().flatten().copied().collect();
        let stale: BTreeSet<ServiceKey> = by_service
            .iter()
            .filter(|(name, _)| newer.contains_key(*name))
            .flat_map(|(_, keys)| keys)
            .copied()
            .collect();
        let mut wanted = desired.clone();
        wanted
            .services
            .retain(|k, _| !fresh.contains(k) && !stale.contains(k));
        self.load_interface(&mut state, Addresses::Read)?;
        let owned = &owned.with_interface(state.interface.clone().unwrap_or_default());
        let actual = self.dataplane.dump(owned)?;
        let (mut report, draining) = self.apply_diff(
            &mut state,
            &actual,
            &wanted,
            &|k: &ServiceKey| owned.owns(k) && !fresh.contains(k),
            now,
        )?;
        report.counters = actual
            .services
            .iter()
            .filter(|(k, _)| owned.owns(k))
            .flat_map(|(k, entry)| {
                entry
                    .destination_stats
                    .iter()
                    .map(move |(d, stats)| ((*k, *d), *stats))
            })
            .collect();
        report.draining = by_service
            .iter()
            .filter(|(_, keys)| keys.iter().any(|k| draining.contains(k)))
            .map(|(name, _)| name.clone())
            .collect();
        for failure in &mut report.failures {
            failure.service = by_service
                .iter()
                .find(|(_, keys)| keys.contains(&failure.key))
                .map(|(name, _)| name.clone());
        }
        let mut vips = self.add_missing_vips(&mut state, &wanted, &mut report)?;
        vips.extend(newer.values().flatten().filter_map(|k| k.address()));
        let unwanted: Vec<IpAddr> = state
            .interface
            .iter()
            .flatten()
            .filter(|vip| !vips.contains(vip))
            .copied()
            .collect();
        self.del_vips(&mut state, unwanted, &mut report)?;
        state.forget_holdings();
        let kept_serving: Vec<(ServiceName, Vec<IpAddr>)> = newer
            .keys()
            .filter_map(|name| Some((name.clone(), state.serving.get(name)?.clone())))
            .collect();
        state.serving.clear();
        state.serving_count.clear();
        for (name, mut keys) in by_service {
            if !newer.contains_key(&name) {
                keys.retain(|k| !fresh.contains(k));
                let mine = keys.iter().filter_map(|k| wanted.services.get_key_value(k));
                state.serve(&name, serving_vips(mine, &report.failures));
                state.hold(&name, keys);
            }
        }
        for (name, keys) in newer {
            state.hold(&name, keys);
        }
        for (name, vips) in kept_serving {
            state.serve(&name, vips);
        }
        // The kernel holds the table now: the director may draw traffic.
        if state.announcing == Announcing::Waiting {
            state.announcing = Announcing::Open;
            self.open_tx.send_replace(true);
        }
        self.announce_all(&mut state, &mut report)?;
        // Converges older than this pass are now part of what it applied.
        state.converged.retain(|_, g| *g > since.0);
        // Who holds what may have changed under the waiters: each looks again.
        report.unblocked = std::mem::take(&mut state.waiting)
            .into_values()
            .flatten()
            .collect();
        Ok(report)
    }

    /// Takes the director out of service: removes every virtual service it owns (an address in
    /// `owned`'s pools or on its interface), every address of its interface and every
    /// announcement, and nothing else. Returns what was there to remove and what the kernel refused.
    pub fn retire(&self, owned: &Owned) -> Result<Retired, dataplane::Error> {
        let addresses = self.dataplane.addresses()?;
        let announced = self.dataplane.announced()?.unwrap_or_default();
        let here = owned.with_interface(addresses.clone());
        let services: Vec<ServiceKey> = self
            .dataplane
            .dump(&here)?
            .services
            .into_keys()
            .filter(|k| here.owns(k))
            .collect();
        // Routers first move the traffic elsewhere, then the entries go.
        self.stop_announcing()?;
        let since = self.generation()?;
        let report =
            self.converge_all(&Table::new(), BTreeMap::new(), owned, since, Instant::now())?;
        Ok(Retired {
            services,
            addresses: addresses.into_iter().collect(),
            announced: announced.into_iter().collect(),
            failures: report.failures,
        })
    }

    /// Withdraws every announced VIP for good, as a stopping director does first, so routers
    /// move its flows before it stops; the VIPs stay on its own interface, so packets still
    /// on their way are served meanwhile. Returns how many were withdrawn.
    pub fn stop_announcing(&self) -> Result<usize, dataplane::Error> {
        let mut state = self.lock()?;
        state.announcing = Announcing::Stopped;
        self.open_tx.send_replace(false);
        let mut report = Report::default();
        self.announce_all(&mut state, &mut report)?;
        Ok(report.withdrawn)
    }

    /// Withdraws every announced VIP until a full pass programs the kernel again: the last one
    /// failed, so this director's table may be stale.
    pub fn hold_back(&self) -> Result<usize, dataplane::Error> {
        let mut state = self.lock()?;
        if state.announcing == Announcing::Open {
            state.announcing = Announcing::Waiting;
            self.open_tx.send_replace(false);
        }
        let mut report = Report::default();
        self.announce_all(&mut state, &mut report)?;
        Ok(report.withdrawn)
    }

    /// Whether this director announces `vip` now, if it can serve it: its pool's mode is the
    /// one this data plane announces in, and in `L2` mode the election gives it this VIP.
    fn claims(&self, state: &State, vip: &IpAddr) -> bool {
        let mode = state.modes.announce_of(vip);
        mode != Announce::None
            && mode == self.dataplane.announces()
            && (mode != Announce::L2 || state.election.as_ref().is_some_and(|e| e.wins(vip)))
    }

    /// Announces or withdraws `vips` (some of which became or stopped being served), as their
    /// counts and [`Self::claims`] say.
    fn announce_these(
        &self,
        state: &mut State,
        vips: Vec<IpAddr>,
        report: &mut Report,
    ) -> Result<(), dataplane::Error> {
        // Nothing to announce through: every per-Service converge passes here.
        if vips.is_empty()
            || state.announcing != Announcing::Open
            || self.dataplane.announces() == Announce::None
        {
            return Ok(());
        }
        let mut announced = match state.announced.take() {
            Some(known) => known,
            None => match self.dataplane.announced()? {
                Some(read) => read,
                None => return Ok(()),
            },
        };
        let mut wanted = BTreeSet::new();
        let mut unwanted = BTreeSet::new();
        for vip in vips {
            if state.serving_count.contains_key(&vip) && self.claims(state, &vip) {
                wanted.insert(vip);
            } else {
                unwanted.insert(vip);
            }
        }
        let complete = self.announce_exactly(&mut announced, &wanted, &unwanted, report);
        state.announced = complete.then_some(announced);
        Ok(())
    }

    /// Makes the announced VIPs, read afresh, exactly those to announce now.
    fn announce_all(&self, state: &mut State, report: &mut Report) -> Result<(), dataplane::Error> {
        state.announced = None;
        let Some(mut announced) = self.dataplane.announced()? else {
            return Ok(());
        };
        let wanted: BTreeSet<IpAddr> = match state.announcing {
            Announcing::Open => state
                .serving_count
                .keys()
                .filter(|vip| self.claims(state, vip))
                .copied()
                .collect(),
            Announcing::Waiting | Announcing::Stopped => BTreeSet::new(),
        };
        let unwanted: BTreeSet<IpAddr> = announced.difference(&wanted).copied().collect();
        let complete = self.announce_exactly(&mut announced, &wanted, &unwanted, report);
        state.announced = complete.then_some(announced);
        Ok(())
    }

    /// Withdraws the `unwanted` VIPs and announces the `wanted` ones, as `announced` (what is
    /// announced now) lacks or holds them, and keeps `announced` up to date. One VIP the data
    /// plane refuses (an IPv6 VIP on a host without IPv6) is logged and left to the next full
    /// pass: it must not keep the others from being announced, nor fail the pass, which would
    /// withdraw every VIP of every director at once. Returns whether all were done.
    fn announce_exactly(
        &self,
        announced: &mut BTreeSet<IpAddr>,
        wanted: &BTreeSet<IpAddr>,
        unwanted: &BTreeSet<IpAddr>,
        report: &mut Report,
    ) -> bool {
        let mut complete = true;
        let present: Vec<IpAddr> = unwanted.intersection(announced).copied().collect();
        for vip in present {
            match self.dataplane.withdraw(vip) {
                Ok(()) => {
                    announced.remove(&vip);
                    report.withdrawn += 1;
                }
                Err(e) => {
                    warn!(%vip, error = %e, "withdrawing the announcement failed");
                    complete = false;
                }
            }
        }
        let missing: Vec<IpAddr> = wanted.difference(announced).copied().collect();
        for vip in missing {
            match self.dataplane.announce(vip) {
                Ok(()) => {
                    announced.insert(vip);
                    report.announced += 1;
                }
                Err(e) => {
                    warn!(%vip, error = %e, "announcing failed");
                    complete = false;
                }
            }
        }
        self.announced_tx.send_if_modified(|told| {
            let changed = told != announced;
            if changed {
                told.clone_from(announced);
            }
            changed
        });
        complete
    }

    /// Makes the interface's addresses known, read afresh or as remembered.
    fn load_interface(&self, state: &mut State, source: Addresses) -> Result<(), dataplane::Error> {
        if source == Addresses::Read || state.interface.is_none() {
            state.interface = None;
            state.interface = Some(self.dataplane.addresses()?);
        }
        Ok(())
    }

    /// Adds the VIPs of `desired` the interface lacks; returns the wanted ones.
    fn add_missing_vips(
        &self,
        state: &mut State,
        desired: &Table,
        report: &mut Report,
    ) -> Result<BTreeSet<IpAddr>, dataplane::Error> {
        let vips: BTreeSet<IpAddr> = desired
            .services
            .keys()
            .filter_map(|k| k.address())
            .collect();
        // Unknown until written back: a failure halfway leaves it to the next read.
        let mut present = match state.interface.take() {
            Some(known) => known,
            None => self.dataplane.addresses()?,
        };
        let missing: Vec<IpAddr> = vips.difference(&present).copied().collect();
        for vip in missing {
            self.dataplane.add_address(vip)?;
            present.insert(vip);
            report.addresses_added += 1;
        }
        state.interface = Some(present);
        Ok(vips)
    }

    /// Removes `vips` from the interface, those it holds.
    fn del_vips(
        &self,
        state: &mut State,
        vips: Vec<IpAddr>,
        report: &mut Report,
    ) -> Result<(), dataplane::Error> {
        let Some(mut present) = state.interface.take() else {
            return Ok(());
        };
        for vip in vips {
            if present.remove(&vip) {
                self.dataplane.del_address(vip)?;
                report.addresses_removed += 1;
            }
        }
        state.interface = Some(present);
        Ok(())
    }

    /// Diffs with draining: destinations that left `desired` go to weight 0 and stay there
    /// until their grace period is over or the kernel counts no connection to them.
    fn apply_diff(
        &self,
        state: &mut State,
        actual: &Table,
        desired: &Table,
        owner: &dyn Fn(&ServiceKey) -> bool,
        now: Instant,
    ) -> Result<(Report, BTreeSet<ServiceKey>), dataplane::Error> {
        let mut desired = desired.clone();
        let mut next_deadline: Option<Instant> = None;
        let mut draining = BTreeSet::new();
        for (key, entry) in &actual.services {
            let Some(wanted) = desired.services.get_mut(key) else {
                // The whole service goes: nothing left to drain into, and its clocks go too,
                // or they would pile up and shorten the grace of a later drain.
                if owner(key) {
                    state.draining.retain(|(k, _), _| k != key);
                }
                continue;
            };
            for (dest_key, dest) in &entry.destinations {
                if wanted.destinations.contains_key(dest_key) {
                    state.draining.remove(&(*key, *dest_key));
                    continue;
                }
                let started = *state.draining.entry((*key, *dest_key)).or_insert(now);
                let mut deadline = started + self.grace;
                // The kernel counts the destination's connections: once it is at weight 0 (no
                // new connection can have been scheduled to it since the counts were read)
                // and none is left, active or not, there is nothing to wait for. Until then,
                // look again soon.
                if let Some(stats) = entry.destination_stats.get(dest_key) {
                    let idle = stats.active_connections == 0 && stats.inactive_connections == 0;
                    if idle && dest.weight == 0 {
                        deadline = now;
                    } else {
                        deadline = deadline.min(now + DRAIN_CHECK);
                    }
                }
                if now < deadline {
                    let mut kept = dest.clone();
                    kept.weight = 0;
                    wanted.destinations.insert(*dest_key, kept);
                    next_deadline = Some(next_deadline.map_or(deadline, |d| d.min(deadline)));
                    draining.insert(*key);
                } else {
                    state.draining.remove(&(*key, *dest_key));
                }
            }
        }
        let ops = diff(
            actual,
            &desired,
            &|k: &ServiceKey| owner(k),
            Removal::Delete,
        );
        // One refused key must not keep the others from being programmed: the caller learns
        // which keys were refused, and the next converge tries them again.
        let refused = match self.dataplane.apply(&ops) {
            Ok(()) => Vec::new(),
            Err(dataplane::Error::Apply { failures, .. }) => failures,
            Err(e) => return Err(e),
        };
        let mut report = Report {
            next_drain_deadline: next_deadline,
            ..Report::default()
        };
        let mut first_refusal: BTreeMap<ServiceKey, String> = BTreeMap::new();
        for failure in refused {
            if let Some(op) = ops.get(failure.index) {
                first_refusal
                    .entry(*op.service_key())
                    .or_insert(failure.message);
            }
        }
        for op in ops
            .iter()
            .filter(|op| !first_refusal.contains_key(op.service_key()))
        {
            *report.ops.entry(op.kind().as_str()).or_default() += 1;
        }
        report.failures = first_refusal
            .into_iter()
            .map(|(key, message)| Failure {
                service: None,
                key,
                message,
            })
            .collect();
        Ok((report, draining))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, dataplane::Error> {
        self.state.lock().map_err(|_| dataplane::Error::Poisoned)
    }
}

/// The VIPs of `entries` that can serve: a virtual service the data plane took (none of
/// `failures`) with a destination that takes new connections. Sorted, without repeats.
fn serving_vips<'a>(
    entries: impl Iterator<Item = (&'a ServiceKey, &'a ServiceEntry)>,
    failures: &[Failure],
) -> Vec<IpAddr> {
    let vips: BTreeSet<IpAddr> = entries
        .filter(|(key, _)| !failures.iter().any(|f| f.key == **key))
        .filter(|(_, entry)| entry.destinations.values().any(|d| d.weight > 0))
        .filter_map(|(key, _)| key.address())
        .collect();
    vips.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use ipvslb_ipvs::{Destination, ForwardingMethod, Protocol, Scheduler, VirtualService};

    use super::*;

    /// A per-Service converge planned from the view as it is now.
    fn converge(c: &Converger<Memory>, name: &str, desired: &Table, now: Instant) -> Report {
        c.converge_service(&svc(name), desired, &owned(), c.generation().unwrap(), now)
            .unwrap()
    }
    use crate::dataplane::Memory;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn key(vip: &str, port: u16) -> ServiceKey {
        ServiceKey::addr(ip(vip), Protocol::Tcp, port)
    }

    fn table(entries: &[(ServiceKey, &[(&str, u32)])]) -> Table {
        let mut t = Table::new();
        for (k, dests) in entries {
            t.insert(
                VirtualService::new(*k, Scheduler::Rr),
                dests
                    .iter()
                    .map(|(a, w)| Destination::new(ip(a), 80, ForwardingMethod::Route, *w)),
            );
        }
        t
    }

    /// The test pool, announced over BGP (as `Memory::announcing` announces).
    fn owned() -> Owned {
        let range: IpRange = "10.240.0.208/29".parse().unwrap();
        Owned::new(vec![range]).announcing(vec![(range, Announce::Bgp)])
    }

    fn svc(name: &str) -> ServiceName {
        ServiceName::new("default", name)
    }

    #[test]
    fn converging_the_same_service_twice_writes_nothing_the_second_time() {
        let c = Converger::new(Memory::default(), Duration::ZERO);
        let desired = table(&[(key("10.240.0.210", 80), &[("10.0.0.1", 1), ("10.0.0.2", 1)])]);
        let now = Instant::now();
        let first = c
            .converge_service(
                &svc("whoami"),
                &desired,
                &owned(),
                c.generation().unwrap(),
                now,
            )
            .unwrap();
        assert_eq!(first.ops.get("add_service"), Some(&1));
        assert_eq!(first.ops.get("add_dest"), Some(&2));
        assert_eq!(first.addresses_added, 1);
        let writes = c.dataplane().writes();
        let second = c
            .converge_service(
                &svc("whoami"),
                &desired,
                &owned(),
                c.generation().unwrap(),
                now,
            )
            .unwrap();
        assert!(second.is_noop(), "{second:?}");
        assert_eq!(c.dataplane().writes(), writes);
        assert_eq!(c.dataplane().table().unwrap(), desired);
    }

    #[test]
    fn the_per_service_path_remembers_the_interface_and_the_full_pass_rereads_it() {
        let c = Converger::new(Memory::default(), Duration::ZERO);
        let now = Instant::now();
        let web = table(&[(key("10.240.0.210", 80), &[("10.0.0.1", 1)])]);
        let api = table(&[(key("10.240.0.211", 80), &[("10.0.0.1", 1)])]);
        converge(&c, "web", &web, now);
        // Someone removes the VIP behind the director's back.
        c.dataplane().del_address(ip("10.240.0.210")).unwrap();
        let other = c
            .converge_service(&svc("api"), &api, &owned(), c.generation().unwrap(), now)
            .unwrap();
        assert_eq!(other.addresses_added, 1, "only its own VIP: {other:?}");
        assert_eq!(
            c.dataplane().addresses().unwrap(),
            BTreeSet::from([ip("10.240.0.211")]),
            "the per-Service path does not list the interface"
        );
        let mut both = web.clone();
        both.services.extend(api.services.clone());
        let by_service = BTreeMap::from([
            (svc("web"), vec![key("10.240.0.210", 80)]),
            (svc("api"), vec![key("10.240.0.211", 80)]),
        ]);
        let repaired = c
            .converge_all(&both, by_service, &owned(), c.generation().unwrap(), now)
            .unwrap();
        assert_eq!(repaired.addresses_added, 1, "{repaired:?}");
        assert_eq!(
            c.dataplane().addresses().unwrap(),
            BTreeSet::from([ip("10.240.0.210"), ip("10.240.0.211")])
        );
        // Giving up a VIP removes it, remembered or not.
        let gone = c
            .converge_service(
                &svc("api"),
                &Table::new(),
                &owned(),
                c.generation().unwrap(),
                now,
            )
            .unwrap();
        assert_eq!(gone.addresses_removed, 1, "{gone:?}");
        assert_eq!(
            c.dataplane().addresses().unwrap(),
            BTreeSet::from([ip("10.240.0.210")])
        );
    }

    #[test]
    fn a_drain_cut_short_by_the_services_removal_starts_afresh_next_time() {
        let c = Converger::new(Memory::default(), Duration::from_secs(30));
        let k = key("10.240.0.210", 80);
        let both = table(&[(k, &[("10.0.0.1", 1), ("10.0.0.2", 1)])]);
        let one = table(&[(k, &[("10.0.0.1", 1)])]);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let step = |desired: &Table, now: Instant| {
            c.converge_service(&svc("web"), desired, &owned(), c.generation().unwrap(), now)
                .unwrap()
        };
        step(&both, at(0));
        step(&one, at(1)); // 10.0.0.2 starts draining
        step(&Table::new(), at(2)); // the whole virtual service goes
        step(&both, at(100));
        let again = step(&one, at(101));
        assert_eq!(
            again.next_drain_deadline,
            Some(at(131)),
            "a full grace period, not the clock of the first drain"
        );
        let kernel = c.dataplane().table().unwrap();
        assert_eq!(kernel.services[&k].destinations.len(), 2, "still draining");
    }

    #[test]
    fn a_draining_destination_goes_as_soon_as_the_kernel_counts_no_connection_to_it() {
        let c = Converger::new(Memory::default(), Duration::from_secs(30));
        let k = key("10.240.0.210", 80);
        let t0 = Instant::now();
        let both = table(&[(k, &[("10.0.0.1", 1), ("10.0.0.2", 1)])]);
        let one_left = table(&[(k, &[("10.0.0.1", 1)])]);
        let leaving = ipvslb_ipvs::DestKey {
            address: ip("10.0.0.2"),
            port: 80,
        };
        converge(&c, "web", &both, t0);
        // No connection yet, but at weight 1 one may be scheduled any moment: weight 0 first.
        c.dataplane().set_connections(k, leaving, 0, 0).unwrap();
        let first = converge(&c, "web", &one_left, t0 + Duration::from_secs(1));
        assert_eq!(first.ops.get("edit_dest"), Some(&1));
        assert_eq!(first.ops.get("del_dest"), None);
        c.dataplane().set_connections(k, leaving, 1, 2).unwrap();
        let draining = converge(&c, "web", &one_left, t0 + Duration::from_secs(2));
        assert_eq!(
            draining.next_drain_deadline,
            Some(t0 + Duration::from_secs(2) + DRAIN_CHECK),
            "with connections left, it looks again soon, not at the end of the grace"
        );
        let kernel = c.dataplane().table().unwrap();
        assert_eq!(kernel.services[&k].destinations[&leaving].weight, 0);
        c.dataplane().set_connections(k, leaving, 0, 0).unwrap();
        let gone = converge(&c, "web", &one_left, t0 + Duration::from_secs(7));
        assert_eq!(gone.ops.get("del_dest"), Some(&1));
        assert_eq!(gone.next_drain_deadline, None);
        let kernel = c.dataplane().table().unwrap();
        assert!(!kernel.services[&k].destinations.contains_key(&leaving));
    }

    #[test]
    fn a_draining_destination_whose_connections_never_end_goes_at_the_end_of_its_grace() {
        let c = Converger::new(Memory::default(), Duration::from_secs(30));
        let k = key("10.240.0.210", 80);
        let t0 = Instant::now();
        let leaving = ipvslb_ipvs::DestKey {
            address: ip("10.0.0.2"),
            port: 80,
        };
        converge(
            &c,
            "web",
            &table(&[(k, &[("10.0.0.1", 1), ("10.0.0.2", 1)])]),
            t0,
        );
        c.dataplane().set_connections(k, leaving, 3, 0).unwrap();
        let one_left = table(&[(k, &[("10.0.0.1", 1)])]);
        let _ = converge(&c, "web", &one_left, t0);
        let before_end = converge(&c, "web", &one_left, t0 + Duration::from_secs(29));
        assert_eq!(before_end.ops.get("del_dest"), None);
        assert_eq!(
            before_end.next_drain_deadline,
            Some(t0 + Duration::from_secs(30)),
            "the next look is the end of the grace, not past it"
        );
        let end = converge(&c, "web", &one_left, t0 + Duration::from_secs(30));
        assert_eq!(end.ops.get("del_dest"), Some(&1));
    }

    #[test]
    fn a_removed_destination_drains_at_weight_zero_until_its_grace_period_ends() {
        let c = Converger::new(Memory::default(), Duration::from_secs(30));
        let k = key("10.240.0.210", 80);
        let t0 = Instant::now();
        c.converge_service(
            &svc("web"),
            &table(&[(k, &[("10.0.0.1", 1), ("10.0.0.2", 1)])]),
            &owned(),
            c.generation().unwrap(),
            t0,
        )
        .unwrap();
        let one_left = table(&[(k, &[("10.0.0.1", 1)])]);
        let draining = c
            .converge_service(
                &svc("web"),
                &one_left,
                &owned(),
                c.generation().unwrap(),
                t0 + Duration::from_secs(1),
            )
            .unwrap();
        assert_eq!(draining.ops.get("edit_dest"), Some(&1));
        assert_eq!(
            draining.next_drain_deadline,
            Some(t0 + Duration::from_secs(31))
        );
        let kernel = c.dataplane().table().unwrap();
        assert_eq!(
            kernel.services[&k].destinations.len(),
            2,
            "still there, at weight 0"
        );
        assert!(
            kernel.services[&k]
                .destinations
                .values()
                .any(|d| d.address == ip("10.0.0.2") && d.weight == 0)
        );
        let still = c
            .converge_service(
                &svc("web"),
                &one_left,
                &owned(),
                c.generation().unwrap(),
                t0 + Duration::from_secs(20),
            )
            .unwrap();
        assert!(still.is_noop());
        let done = c
            .converge_service(
                &svc("web"),
                &one_left,
                &owned(),
                c.generation().unwrap(),
                t0 + Duration::from_secs(32),
            )
            .unwrap();
        assert_eq!(done.ops.get("del_dest"), Some(&1));
        assert_eq!(c.dataplane().table().unwrap(), one_left);
    }

    #[test]
    fn a_port_change_removes_the_old_virtual_service_and_keeps_the_vip() {
        let c = Converger::new(Memory::default(), Duration::ZERO);
        let now = Instant::now();
        c.converge_service(
            &svc("web"),
            &table(&[(key("10.240.0.210", 80), &[("10.0.0.1", 1)])]),
            &owned(),
            c.generation().unwrap(),
            now,
        )
        .unwrap();
        let moved = table(&[(key("10.240.0.210", 8080), &[("10.0.0.1", 1)])]);
        let report = c
            .converge_service(&svc("web"), &moved, &owned(), c.generation().unwrap(), now)
            .unwrap();
        assert_eq!(report.ops.get("del_service"), Some(&1));
        assert_eq!(report.addresses_removed, 0);
        assert_eq!(c.dataplane().table().unwrap(), moved);
        assert!(
            c.dataplane()
                .addresses()
                .unwrap()
                .contains(&ip("10.240.0.210"))
        );
    }

    fn announced(c: &Converger<Memory>) -> Vec<String> {
        let set = c.dataplane().announced().unwrap().unwrap_or_default();
        set.iter().map(ToString::to_string).collect()
    }

    fn full_pass(c: &Converger<Memory>, services: &[(&str, &Table)]) -> Report {
        pass_with(c, &owned(), services)
    }

    #[test]
    fn vips_are_announced_once_a_full_pass_programmed_them_and_while_they_can_serve() {
        let c = Converger::new(Memory::announcing(), Duration::ZERO);
        let now = Instant::now();
        let web = table(&[(key("10.240.0.210", 80), &[("10.0.0.1", 1)])]);
        let dns = table(&[(key("10.240.0.211", 53), &[("10.0.0.1", 1)])]);
        converge(&c, "web", &web, now);
        assert!(
            announced(&c).is_empty(),
            "nothing before the first full pass"
        );
        assert_eq!(c.dataplane().addresses().unwrap().len(), 1);

        let first = full_pass(&c, &[("web", &web), ("dns", &dns)]);
        assert_eq!(first.announced, 2);
        assert_eq!(announced(&c), ["10.240.0.210", "10.240.0.211"]);

        // No destination that takes connections (all failed their checks, or drained): the VIP
        // stays on the director's interface but is no longer announced.
        let down = table(&[(key("10.240.0.211", 53), &[])]);
        let report = converge(&c, "dns", &down, now);
        assert_eq!((report.withdrawn, report.announced), (1, 0));
        assert_eq!(announced(&c), ["10.240.0.210"]);
        assert!(
            c.dataplane()
                .addresses()
                .unwrap()
                .contains(&ip("10.240.0.211"))
        );
        let up = converge(&c, "dns", &dns, now);
        assert_eq!(up.announced, 1);
        assert_eq!(announced(&c), ["10.240.0.210", "10.240.0.211"]);
        assert!(converge(&c, "dns", &dns, now).is_noop());

        // Someone withdrew one by hand: the next full pass announces it again.
        c.dataplane().withdraw(ip("10.240.0.210")).unwrap();
        let repaired = full_pass(&c, &[("web", &web), ("dns", &dns)]);
        assert_eq!(repaired.announced, 1);
        assert_eq!(announced(&c), ["10.240.0.210", "10.240.0.211"]);
    }

    /// Two pools: 10.240.0.208/29 in `mode`, 10.240.0.216/29 in `other`.
    fn two_pools(mode: Announce, other: Announce) -> Owned {
        let (a, b): (IpRange, IpRange) = (
            "10.240.0.208/29".parse().unwrap(),
            "10.240.0.216/29".parse().unwrap(),
        );
        Owned::new(vec![a, b]).announcing(vec![(a, mode), (b, other)])
    }

    fn pass_with(c: &Converger<Memory>, owned: &Owned, services: &[(&str, &Table)]) -> Report {
        let mut all = Table::new();
        let mut by_service = BTreeMap::new();
        for (name, part) in services {
            all.services.extend(part.services.clone());
            by_service.insert(svc(name), part.services.keys().copied().collect());
        }
        c.converge_all(
            &all,
            by_service,
            owned,
            c.generation().unwrap(),
            Instant::now(),
        )
        .unwrap()
    }

    fn election(me: &str, live: &[&str]) -> Election {
        Election {
            me: me.to_owned(),
            live: live.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn an_l2_director_announces_exactly_the_vips_of_l2_pools_the_election_gives_it() {
        let c = Converger::new(Memory::announcing_in(Announce::L2), Duration::ZERO);
        let owned = two_pools(Announce::L2, Announce::Bgp);
        let vips: Vec<String> = (210..216).map(|i| format!("10.240.0.{i}")).collect();
        let mut parts: Vec<(String, Table)> = vips
            .iter()
            .map(|v| (v.clone(), table(&[(key(v, 80), &[("10.0.0.1", 1)])])))
            .collect();
        parts.push((
            "bgp".into(),
            table(&[(key("10.240.0.217", 80), &[("10.0.0.1", 1)])]),
        ));
        let services: Vec<(&str, &Table)> = parts.iter().map(|(n, t)| (n.as_str(), t)).collect();

        // No election seen yet: an L2 VIP is nobody's.
        pass_with(&c, &owned, &services);
        assert!(announced(&c).is_empty());

        let both = election("dir1", &["dir1", "dir2"]);
        c.elect(both.clone()).unwrap();
        let mine: Vec<String> = vips.iter().filter(|v| both.wins(&ip(v))).cloned().collect();
        assert!(
            !mine.is_empty() && mine.len() < vips.len(),
            "{mine:?}: the test needs a split"
        );
        // The BGP pool's VIP is not this director's to announce in L2 mode.
        assert_eq!(announced(&c), mine);
        assert_eq!(
            *c.announced().borrow(),
            mine.iter().map(|v| ip(v)).collect()
        );

        // Alone: every L2 VIP; its own Lease stale: none; the same election again: no write.
        c.elect(election("dir1", &["dir1"])).unwrap();
        assert_eq!(announced(&c), vips);
        assert!(c.elect(election("dir1", &["dir1"])).unwrap().is_noop());
        let lapsed = c.elect(election("dir1", &["dir2"])).unwrap();
        assert_eq!(lapsed.withdrawn, vips.len());
        assert!(announced(&c).is_empty());

        // The pool switched to None: its VIPs are withdrawn by the Services' own converges.
        c.elect(election("dir1", &["dir1"])).unwrap();
        let none = two_pools(Announce::None, Announce::Bgp);
        let (name, part) = &parts[0];
        let report = c
            .converge_service(
                &svc(name),
                part,
                &none,
                c.generation().unwrap(),
                Instant::now(),
            )
            .unwrap();
        assert_eq!(report.withdrawn, 1);
        assert!(!announced(&c).contains(name));
    }

    #[test]
    fn a_bgp_director_leaves_the_vips_of_l2_and_unannounced_pools_alone() {
        let c = Converger::new(Memory::announcing(), Duration::ZERO);
        let owned = two_pools(Announce::L2, Announce::Bgp);
        let l2 = table(&[(key("10.240.0.210", 80), &[("10.0.0.1", 1)])]);
        let bgp = table(&[(key("10.240.0.217", 80), &[("10.0.0.1", 1)])]);
        pass_with(&c, &owned, &[("l2", &l2), ("bgp", &bgp)]);
        c.elect(election("dir1", &["dir1"])).unwrap();
        assert_eq!(announced(&c), ["10.240.0.217"]);
        let plain = two_pools(Announce::None, Announce::None);
        pass_with(&c, &plain, &[("l2", &l2), ("bgp", &bgp)]);
        assert!(announced(&c).is_empty());
    }

    #[test]
    fn a_shared_vip_is_announced_while_any_of_its_services_can_serve() {
        let c = Converger::new(Memory::announcing(), Duration::ZERO);
        let now = Instant::now();
        let tcp = table(&[(key("10.240.0.210", 53), &[("10.0.0.1", 1)])]);
        let tls = table(&[(key("10.240.0.210", 853), &[("10.0.0.1", 1)])]);
        full_pass(&c, &[("dns-tcp", &tcp), ("dot", &tls)]);
        let tcp_down = table(&[(key("10.240.0.210", 53), &[("10.0.0.1", 0)])]);
        assert_eq!(converge(&c, "dns-tcp", &tcp_down, now).withdrawn, 0);
        assert_eq!(announced(&c), ["10.240.0.210"]);
        let tls_down = table(&[(key("10.240.0.210", 853), &[])]);
        assert_eq!(converge(&c, "dot", &tls_down, now).withdrawn, 1);
        assert!(announced(&c).is_empty());
    }

    #[test]
    fn a_refused_virtual_service_is_not_announced() {
        let c = Converger::new(Memory::announcing(), Duration::ZERO);
        let refused = key("10.240.0.212", 80);
        c.dataplane()
            .refuse_writes_to(refused, "no such scheduler")
            .unwrap();
        let web = table(&[(key("10.240.0.210", 80), &[("10.0.0.1", 1)])]);
        let broken = table(&[(refused, &[("10.0.0.1", 1)])]);
        let report = full_pass(&c, &[("web", &web), ("broken", &broken)]);
        assert_eq!(report.failures.len(), 1);
        assert_eq!(announced(&c), ["10.240.0.210"]);
    }

    #[test]
    fn a_vip_the_data_plane_refuses_to_announce_keeps_neither_the_others_nor_the_pass_from_going_on()
     {
        let c = Converger::new(Memory::announcing(), Duration::ZERO);
        c.dataplane()
            .refuse_to_announce(ip("10.240.0.210"))
            .unwrap();
        let web = table(&[(key("10.240.0.210", 80), &[("10.0.0.1", 1)])]);
        let dns = table(&[(key("10.240.0.211", 53), &[("10.0.0.1", 1)])]);
        let report = full_pass(&c, &[("web", &web), ("dns", &dns)]);
        assert_eq!(report.announced, 1);
        assert_eq!(announced(&c), ["10.240.0.211"]);
        // Still wanted: the next pass tries again, and nothing else changes.
        let again = full_pass(&c, &[("web", &web), ("dns", &dns)]);
        assert_eq!((again.announced, again.withdrawn), (0, 0));
    }

    #[test]
    fn a_stopping_director_withdraws_everything_first_and_announces_nothing_after() {
        let c = Converger::new(Memory::announcing(), Duration::ZERO);
        let web = table(&[(key("10.240.0.210", 80), &[("10.0.0.1", 1)])]);
        full_pass(&c, &[("web", &web)]);
        assert_eq!(c.stop_announcing().unwrap(), 1);
        assert!(announced(&c).is_empty());
        // It still serves what reaches it meanwhile.
        assert_eq!(c.dataplane().table().unwrap(), web);
        assert_eq!(c.dataplane().addresses().unwrap().len(), 1);
        let dns = table(&[(key("10.240.0.211", 53), &[("10.0.0.1", 1)])]);
        converge(&c, "dns", &dns, Instant::now());
        full_pass(&c, &[("web", &web), ("dns", &dns)]);
        assert!(announced(&c).is_empty());
    }

    #[test]
    fn held_back_after_a_failed_full_pass_until_one_succeeds() {
        let c = Converger::new(Memory::announcing(), Duration::ZERO);
        let web = table(&[(key("10.240.0.210", 80), &[("10.0.0.1", 1)])]);
        full_pass(&c, &[("web", &web)]);
        assert_eq!(c.hold_back().unwrap(), 1);
        let dns = table(&[(key("10.240.0.211", 53), &[("10.0.0.1", 1)])]);
        converge(&c, "dns", &dns, Instant::now());
        assert!(announced(&c).is_empty());
        full_pass(&c, &[("web", &web), ("dns", &dns)]);
        assert_eq!(announced(&c), ["10.240.0.210", "10.240.0.211"]);
    }

    #[test]
    fn a_data_plane_without_an_announce_interface_announces_nothing() {
        let c = Converger::new(Memory::default(), Duration::ZERO);
        let web = table(&[(key("10.240.0.210", 80), &[("10.0.0.1", 1)])]);
        let report = full_pass(&c, &[("web", &web)]);
        assert_eq!((report.announced, report.withdrawn), (0, 0));
        assert_eq!(c.dataplane().announced().unwrap(), None);
    }

    #[test]
    fn a_shared_vip_stays_until_its_last_service_goes() {
        let c = Converger::new(Memory::default(), Duration::ZERO);
        let now = Instant::now();
        let tcp = table(&[(key("10.240.0.210", 53), &[("10.0.0.1", 1)])]);
        let other = table(&[(key("10.240.0.210", 853), &[("10.0.0.1", 1)])]);
        converge(&c, "dns-tcp", &tcp, now);
        converge(&c, "dot", &other, now);
        let gone = c
            .converge_service(
                &svc("dns-tcp"),
                &Table::new(),
                &owned(),
                c.generation().unwrap(),
                now,
            )
            .unwrap();
        assert_eq!(gone.addresses_removed, 0);
        assert_eq!(c.dataplane().table().unwrap(), other);
        let last = c
            .converge_service(
                &svc("dot"),
                &Table::new(),
                &owned(),
                c.generation().unwrap(),
                now,
            )
            .unwrap();
        assert_eq!(last.addresses_removed, 1);
        assert!(c.dataplane().addresses().unwrap().is_empty());
    }

    #[test]
    fn the_full_pass_repairs_drift_collects_orphans_and_never_touches_foreign_services() {
        let c = Converger::new(Memory::default(), Duration::ZERO);
        let now = Instant::now();
        let foreign = key("192.168.1.1", 443);
        let orphan = key("10.240.0.211", 80);
        c.dataplane()
            .apply(&[
                ipvslb_ipvs::Op::AddService(VirtualService::new(foreign, Scheduler::Wlc)),
                ipvslb_ipvs::Op::AddService(VirtualService::new(orphan, Scheduler::Rr)),
            ])
            .unwrap();
        let desired = table(&[(key("10.240.0.210", 80), &[("10.0.0.1", 1)])]);
        let by_service = BTreeMap::from([(svc("web"), vec![key("10.240.0.210", 80)])]);
        let report = c
            .converge_all(
                &desired,
                by_service.clone(),
                &owned(),
                c.generation().unwrap(),
                now,
            )
            .unwrap();
        assert_eq!(report.ops.get("del_service"), Some(&1), "{report:?}");
        let kernel = c.dataplane().table().unwrap();
        assert!(kernel.services.contains_key(&foreign));
        assert!(!kernel.services.contains_key(&orphan));
        // someone runs `ipvsadm -d` on our destination
        let dest = kernel.services[&key("10.240.0.210", 80)]
            .destinations
            .values()
            .next()
            .unwrap()
            .clone();
        c.dataplane()
            .apply(&[ipvslb_ipvs::Op::DelDest(key("10.240.0.210", 80), dest)])
            .unwrap();
        let repair = c
            .converge_all(
                &desired,
                by_service.clone(),
                &owned(),
                c.generation().unwrap(),
                now,
            )
            .unwrap();
        assert_eq!(repair.ops.get("add_dest"), Some(&1));
        let again = c
            .converge_all(&desired, by_service, &owned(), c.generation().unwrap(), now)
            .unwrap();
        assert!(again.is_noop());
    }

    fn web() -> Table {
        table(&[(key("10.240.0.210", 80), &[("10.0.0.1", 1)])])
    }

    fn held_by(name: &str, t: &Table) -> BTreeMap<ServiceName, Vec<ServiceKey>> {
        BTreeMap::from([(svc(name), t.services.keys().copied().collect())])
    }

    #[test]
    fn a_service_created_after_the_full_pass_took_its_snapshot_keeps_its_entries() {
        let c = Converger::new(Memory::default(), Duration::ZERO);
        let now = Instant::now();
        let since = c.generation().unwrap();
        // The caches, as the pass read them: no Service yet.
        let snapshot = (Table::new(), BTreeMap::new());
        converge(&c, "web", &web(), now);
        c.converge_all(&snapshot.0, snapshot.1, &owned(), since, now)
            .unwrap();
        assert_eq!(c.dataplane().table().unwrap(), web());
        assert_eq!(
            c.dataplane().addresses().unwrap(),
            BTreeSet::from([ip("10.240.0.210")])
        );
        // Its held keys survived the pass: deleting it now removes its entries and its VIP.
        converge(&c, "web", &Table::new(), now);
        assert_eq!(c.dataplane().table().unwrap(), Table::new());
        assert!(c.dataplane().addresses().unwrap().is_empty());
    }

    #[test]
    fn a_service_deleted_after_the_full_pass_took_its_snapshot_is_not_brought_back() {
        let c = Converger::new(Memory::default(), Duration::ZERO);
        let now = Instant::now();
        converge(&c, "web", &web(), now);
        let since = c.generation().unwrap();
        let snapshot = (web(), held_by("web", &web()));
        converge(&c, "web", &Table::new(), now);
        c.converge_all(&snapshot.0, snapshot.1, &owned(), since, now)
            .unwrap();
        assert_eq!(c.dataplane().table().unwrap(), Table::new());
        assert!(c.dataplane().addresses().unwrap().is_empty());
    }

    #[test]
    fn a_service_changed_after_the_full_pass_took_its_snapshot_is_not_rolled_back() {
        let c = Converger::new(Memory::default(), Duration::ZERO);
        let now = Instant::now();
        converge(&c, "web", &web(), now);
        let since = c.generation().unwrap();
        let snapshot = (web(), held_by("web", &web()));
        let moved = table(&[(key("10.240.0.211", 8080), &[("10.0.0.2", 1)])]);
        converge(&c, "web", &moved, now);
        c.converge_all(&snapshot.0, snapshot.1, &owned(), since, now)
            .unwrap();
        assert_eq!(c.dataplane().table().unwrap(), moved);
        assert_eq!(
            c.dataplane().addresses().unwrap(),
            BTreeSet::from([ip("10.240.0.211")])
        );
        // The next pass, from a snapshot taken now, agrees and writes nothing.
        let since = c.generation().unwrap();
        let again = c
            .converge_all(&moved, held_by("web", &moved), &owned(), since, now)
            .unwrap();
        assert!(again.is_noop(), "{again:?}");
    }

    #[test]
    fn a_full_pass_applies_what_it_can_and_reports_each_refused_key_with_its_service() {
        let c = Converger::new(Memory::default(), Duration::ZERO);
        let now = Instant::now();
        let bad = key("10.240.0.212", 80);
        c.dataplane()
            .refuse_writes_to(bad, "No such file or directory (os error 2)")
            .unwrap();
        let good = table(&[
            (key("10.240.0.210", 80), &[("10.0.0.1", 1)]),
            (key("10.240.0.211", 80), &[("10.0.0.1", 1)]),
        ]);
        let mut desired = good.clone();
        desired
            .services
            .extend(table(&[(bad, &[("10.0.0.1", 1)])]).services);
        let by_service = BTreeMap::from([
            (svc("a"), vec![key("10.240.0.210", 80)]),
            (svc("bad"), vec![bad]),
            (svc("z"), vec![key("10.240.0.211", 80)]),
        ]);
        let since = c.generation().unwrap();
        let report = c
            .converge_all(&desired, by_service, &owned(), since, now)
            .unwrap();
        assert_eq!(c.dataplane().table().unwrap(), good);
        assert_eq!(
            report.failures,
            vec![Failure {
                service: Some(svc("bad")),
                key: bad,
                message: "No such file or directory (os error 2)".into(),
            }]
        );
        assert!(
            c.dataplane()
                .addresses()
                .unwrap()
                .is_superset(&BTreeSet::from([ip("10.240.0.210"), ip("10.240.0.211")]))
        );
        // The held map was rebuilt: the last Service's deletion takes its VIP.
        let gone = c
            .converge_service(
                &svc("z"),
                &Table::new(),
                &owned(),
                c.generation().unwrap(),
                now,
            )
            .unwrap();
        assert_eq!(gone.addresses_removed, 1, "{gone:?}");
    }

    #[test]
    fn a_service_never_takes_over_or_deletes_a_virtual_service_another_service_holds() {
        let c = Converger::new(Memory::default(), Duration::ZERO);
        let now = Instant::now();
        let contested = key("10.240.0.210", 80);
        let older = table(&[(contested, &[("10.0.0.1", 1)])]);
        converge(&c, "older", &older, now);
        // A plan made from a stale or partial view may still hand the newer one the key.
        let newer = table(&[
            (contested, &[("10.0.0.9", 1)]),
            (key("10.240.0.210", 443), &[("10.0.0.9", 1)]),
        ]);
        let report = c
            .converge_service(
                &svc("newer"),
                &newer,
                &owned(),
                c.generation().unwrap(),
                now,
            )
            .unwrap();
        assert_eq!(report.taken, vec![(contested, svc("older"))]);
        let kernel = c.dataplane().table().unwrap();
        assert_eq!(kernel.services[&contested], older.services[&contested]);
        assert!(kernel.services.contains_key(&key("10.240.0.210", 443)));
        converge(&c, "newer", &Table::new(), now);
        assert_eq!(c.dataplane().table().unwrap(), older);
        assert_eq!(
            c.dataplane().addresses().unwrap(),
            BTreeSet::from([ip("10.240.0.210")])
        );
    }

    #[test]
    fn a_restarted_director_collects_the_entries_and_vips_of_a_deleted_pool_and_spares_its_neighbour()
     {
        let memory = std::sync::Arc::new(Memory::default());
        let now = Instant::now();
        let before = Converger::new(memory.clone(), Duration::ZERO);
        before
            .converge_service(
                &svc("web"),
                &web(),
                &owned(),
                before.generation().unwrap(),
                now,
            )
            .unwrap();
        let neighbour = key("10.240.0.230", 80);
        memory
            .apply(&[ipvslb_ipvs::Op::AddService(VirtualService::new(
                neighbour,
                Scheduler::Wlc,
            ))])
            .unwrap();
        drop(before);
        // The pool is gone and nothing is in memory: only the interface remembers the VIP.
        let after = Converger::new(memory.clone(), Duration::ZERO);
        let no_pools = Owned::new(Vec::new());
        let since = after.generation().unwrap();
        let report = after
            .converge_all(&Table::new(), BTreeMap::new(), &no_pools, since, now)
            .unwrap();
        assert_eq!(report.ops.get("del_service"), Some(&1), "{report:?}");
        assert_eq!(report.addresses_removed, 1, "{report:?}");
        let kernel = memory.table().unwrap();
        assert_eq!(
            kernel.services.keys().copied().collect::<Vec<_>>(),
            vec![neighbour]
        );
        assert!(memory.addresses().unwrap().is_empty());
    }

    #[test]
    fn a_service_whose_pool_is_deleted_loses_its_entries_and_vip_on_its_next_converge() {
        let c = Converger::new(Memory::default(), Duration::ZERO);
        let now = Instant::now();
        converge(&c, "web", &web(), now);
        let gone = c
            .converge_service(
                &svc("web"),
                &Table::new(),
                &Owned::new(Vec::new()),
                c.generation().unwrap(),
                now,
            )
            .unwrap();
        assert_eq!(gone.ops.get("del_service"), Some(&1), "{gone:?}");
        assert_eq!(gone.addresses_removed, 1, "{gone:?}");
        assert_eq!(c.dataplane().table().unwrap(), Table::new());
    }

    #[test]
    fn retiring_removes_what_the_director_owns_and_nothing_else() {
        let memory = std::sync::Arc::new(Memory::default());
        let now = Instant::now();
        let before = Converger::new(memory.clone(), Duration::ZERO);
        let both = table(&[
            (key("10.240.0.210", 80), &[("10.0.0.1", 1)]),
            (key("10.240.0.211", 443), &[("10.0.0.1", 1)]),
        ]);
        before
            .converge_service(
                &svc("web"),
                &both,
                &owned(),
                before.generation().unwrap(),
                now,
            )
            .unwrap();
        let neighbour = key("10.240.0.240", 80);
        let in_pool_only = key("10.240.0.212", 80);
        memory
            .apply(&[
                ipvslb_ipvs::Op::AddService(VirtualService::new(neighbour, Scheduler::Wlc)),
                ipvslb_ipvs::Op::AddService(VirtualService::new(in_pool_only, Scheduler::Rr)),
            ])
            .unwrap();
        drop(before);
        let retired = Converger::new(memory.clone(), Duration::ZERO)
            .retire(&owned())
            .unwrap();
        assert_eq!(
            retired.services,
            vec![
                key("10.240.0.210", 80),
                key("10.240.0.211", 443),
                in_pool_only
            ]
        );
        assert_eq!(
            retired.addresses,
            vec![ip("10.240.0.210"), ip("10.240.0.211")]
        );
        assert!(retired.failures.is_empty());
        assert_eq!(
            memory
                .table()
                .unwrap()
                .services
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![neighbour]
        );
        assert!(memory.addresses().unwrap().is_empty());
    }
}
