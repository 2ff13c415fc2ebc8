//! The minimal ordered operations that turn one table into another.
//!
//! Both tables are walked side by side in key order (they are `BTreeMap`s), so a diff costs time
//! proportional to the sizes of the two tables, never to their product.

use std::collections::BTreeMap;
use std::fmt;
use std::iter::Peekable;

use crate::model::{
    DestKey, Destination, ServiceEntry, ServiceFlags, ServiceKey, Table, VirtualService,
};

/// Which services a caller owns; [`diff`] never emits an operation on any other.
pub trait Owner {
    /// Whether the service `key` is the caller's to change.
    fn owns(&self, key: &ServiceKey) -> bool;
}

impl<F: Fn(&ServiceKey) -> bool> Owner for F {
    fn owns(&self, key: &ServiceKey) -> bool {
        self(key)
    }
}

/// An [`Owner`] of every service: for tools that manage a whole table, and for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnsAll;

impl Owner for OwnsAll {
    fn owns(&self, _key: &ServiceKey) -> bool {
        true
    }
}

/// What to do with a destination that the desired table no longer has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Delete it now.
    Delete,
    /// First set its weight to 0 (established connections finish); delete it once it is at 0.
    Drain,
}

/// One change to the kernel table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `IPVS_CMD_NEW_SERVICE`.
    AddService(VirtualService),
    /// `IPVS_CMD_SET_SERVICE`.
    EditService(VirtualService),
    /// `IPVS_CMD_DEL_SERVICE` (its destinations go with it).
    DelService(ServiceKey),
    /// `IPVS_CMD_NEW_DEST`.
    AddDest(ServiceKey, Destination),
    /// `IPVS_CMD_SET_DEST`.
    EditDest(ServiceKey, Destination),
    /// `IPVS_CMD_DEL_DEST`.
    DelDest(ServiceKey, Destination),
}

/// The kind of an [`Op`], without its data: for error messages and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    /// [`Op::AddService`].
    AddService,
    /// [`Op::EditService`].
    EditService,
    /// [`Op::DelService`].
    DelService,
    /// [`Op::AddDest`].
    AddDest,
    /// [`Op::EditDest`].
    EditDest,
    /// [`Op::DelDest`].
    DelDest,
}

impl OpKind {
    /// A short snake-case name, stable enough for a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::AddService => "add_service",
            OpKind::EditService => "edit_service",
            OpKind::DelService => "del_service",
            OpKind::AddDest => "add_dest",
            OpKind::EditDest => "edit_dest",
            OpKind::DelDest => "del_dest",
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpKind::AddService => "adding virtual service",
            OpKind::EditService => "editing virtual service",
            OpKind::DelService => "deleting virtual service",
            OpKind::AddDest => "adding destination",
            OpKind::EditDest => "editing destination",
            OpKind::DelDest => "deleting destination",
        })
    }
}

impl Op {
    /// The kind of operation.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::AddService(_) => OpKind::AddService,
            Op::EditService(_) => OpKind::EditService,
            Op::DelService(_) => OpKind::DelService,
            Op::AddDest(..) => OpKind::AddDest,
            Op::EditDest(..) => OpKind::EditDest,
            Op::DelDest(..) => OpKind::DelDest,
        }
    }

    /// The virtual service the operation changes.
    pub fn service_key(&self) -> &ServiceKey {
        match self {
            Op::AddService(s) | Op::EditService(s) => &s.key,
            Op::DelService(k) | Op::AddDest(k, _) | Op::EditDest(k, _) | Op::DelDest(k, _) => k,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AddService(s) | Op::EditService(s) => {
                write!(f, "{} {} {}", self.kind(), s.key, s.scheduler)
            }
            Op::DelService(k) => write!(f, "{} {k}", self.kind()),
            Op::AddDest(k, d) | Op::EditDest(k, d) => write!(
                f,
                "{} {} of {k} {} weight {}",
                self.kind(),
                d.key(),
                d.forwarding,
                d.weight
            ),
            Op::DelDest(k, d) => write!(f, "{} {} of {k}", self.kind(), d.key()),
        }
    }
}

/// The ordered operations that turn `actual` into `desired` for the services `owner` owns.
///
/// Only owned services appear in the result. A service of `actual` that is not owned is left
/// alone even when `desired` lacks it (it belongs to someone else, such as kube-proxy), and a
/// service of `desired` that is not owned is ignored: a caller cannot create what it would not be
/// allowed to change or delete later.
///
/// The order is one the kernel accepts when applied front to back:
/// 1. every [`Op::DelService`], in key order (first, so that nothing is added to a service that is
///    about to go; a deleted service takes its destinations with it, so no [`Op::DelDest`] precedes
///    it);
/// 2. then, service by service in key order: [`Op::AddService`] followed by its [`Op::AddDest`]s,
///    or [`Op::EditService`] if the settings differ, then the new and changed destinations
///    ([`Op::AddDest`], [`Op::EditDest`]) in key order, and last the destinations that go.
///
/// Removals come after additions within a service so that replacing its only destination never
/// leaves it without one in between.
///
/// For a scheduler whose table follows the list's order
/// ([`Scheduler::depends_on_list_order`](crate::Scheduler::depends_on_list_order)), the
/// destination operations also leave the list in the canonical order
/// ([`ListOrder::Canonical`](crate::ListOrder::Canonical)), so that directors with the same
/// destinations hash a flow to the same one whatever their histories. A destination the list
/// holds out of place is deleted and added again at once; it comes back from the kernel's trash
/// with its connections.
///
/// Settings are compared without [`ServiceFlags::HASHED`] (the kernel sets it on every service)
/// and without counters. With [`Removal::Drain`], a destination that `desired` lacks becomes an
/// [`Op::EditDest`] to weight 0 while its weight is not 0, and an [`Op::DelDest`] once it is: the
/// caller runs the deleting pass when the grace period is over.
#[must_use]
pub fn diff(actual: &Table, desired: &Table, owner: &impl Owner, removal: Removal) -> Vec<Op> {
    let mut ops = Vec::new();

    for side in merge(&actual.services, &desired.services) {
        if let Side::Left(key, _) = side
            && owner.owns(key)
        {
            ops.push(Op::DelService(*key));
        }
    }

    // Removals of one service wait here until its additions are out.
    let mut removals = Vec::new();
    for side in merge(&actual.services, &desired.services) {
        match side {
            Side::Left(..) => {}
            Side::Right(key, wanted) => {
                if owner.owns(key) {
                    ops.push(Op::AddService(wanted.service.clone()));
                    ops.extend(
                        wanted
                            .destinations
                            .values()
                            .map(|d| Op::AddDest(*key, d.clone())),
                    );
                }
            }
            Side::Both(key, have, wanted) => {
                if !owner.owns(key) {
                    continue;
                }
                if !same_settings(&have.service, &wanted.service) {
                    ops.push(Op::EditService(wanted.service.clone()));
                }
                if wanted.service.scheduler.depends_on_list_order() {
                    ops.extend(in_canonical_order(*key, have, wanted, removal));
                    continue;
                }
                for dest in merge(&have.destinations, &wanted.destinations) {
                    match dest {
                        Side::Right(_, d) => ops.push(Op::AddDest(*key, d.clone())),
                        Side::Both(_, h, w) => {
                            if !same_destination(h, w) {
                                ops.push(Op::EditDest(*key, w.clone()));
                            }
                        }
                        Side::Left(_, h) => removals.push(removal_of(*key, h, removal)),
                    }
                }
                ops.append(&mut removals);
            }
        }
    }
    ops
}

/// The destination operations of a service whose scheduler builds its table from the list's
/// order: they leave the list in the canonical order (descending by key from the head), which
/// depends only on which destinations remain, never on the history that brought them there.
///
/// The kernel adds at the head, so the longest tail of the list already in place stays; every
/// destination that must come before it is added, in ascending key order, or, if the list
/// holds it out of place, deleted and added again at once. A destination deleted and added
/// again comes back from the kernel's trash with its connections; the cost is one pair of
/// writes per destination moved, and none when each new destination has the highest key.
/// Between the two writes the destination is not available: a packet of one of its
/// connections handled on another CPU in those microseconds is dropped (TCP sends it again),
/// or, with `expire_nodest_conn=1`, ends its connection.
/// Then the edits of the tail and last the removals, as [`diff`] orders them.
fn in_canonical_order(
    key: ServiceKey,
    have: &ServiceEntry,
    wanted: &ServiceEntry,
    removal: Removal,
) -> Vec<Op> {
    // What each remaining destination will be: a wanted one as wanted, a removed one that
    // drains at weight 0.
    let mut remaining: BTreeMap<DestKey, (Option<&Destination>, Destination)> = BTreeMap::new();
    let mut removals = Vec::new();
    for dest in merge(&have.destinations, &wanted.destinations) {
        match dest {
            Side::Right(k, w) => {
                remaining.insert(*k, (None, w.clone()));
            }
            Side::Both(k, h, w) => {
                remaining.insert(*k, (Some(h), w.clone()));
            }
            Side::Left(k, h) => match removal_of(key, h, removal) {
                Op::EditDest(_, drained) => {
                    remaining.insert(*k, (Some(h), drained));
                }
                op => removals.push(op),
            },
        }
    }
    let target: Vec<DestKey> = remaining.keys().rev().copied().collect();
    let listed: Vec<DestKey> = have
        .list_order()
        .into_iter()
        .filter(|k| remaining.contains_key(k))
        .collect();
    let in_place = target
        .iter()
        .rev()
        .zip(listed.iter().rev())
        .take_while(|(t, l)| t == l)
        .count();
    let (to_place, tail) = target.split_at(target.len() - in_place);

    let mut ops = Vec::new();
    for k in tail.iter().rev() {
        if let Some((Some(h), w)) = remaining.get(k)
            && !same_destination(h, w)
        {
            ops.push(Op::EditDest(key, w.clone()));
        }
    }
    for k in to_place.iter().rev() {
        if let Some((had, w)) = remaining.get(k) {
            if let Some(h) = had {
                ops.push(Op::DelDest(key, (*h).clone()));
            }
            ops.push(Op::AddDest(key, w.clone()));
        }
    }
    ops.append(&mut removals);
    ops
}

/// What removing `dest` from the service `key` takes under `removal`.
fn removal_of(key: ServiceKey, dest: &Destination, removal: Removal) -> Op {
    match removal {
        Removal::Drain if dest.weight != 0 => Op::EditDest(
            key,
            Destination {
                weight: 0,
                ..dest.clone()
            },
        ),
        Removal::Drain | Removal::Delete => Op::DelDest(key, dest.clone()),
    }
}

/// Whether two services have the same settings as far as the kernel's `SET_SERVICE` can change
/// them.
fn same_settings(a: &VirtualService, b: &VirtualService) -> bool {
    a.scheduler == b.scheduler
        && a.flags.without(ServiceFlags::HASHED) == b.flags.without(ServiceFlags::HASHED)
        && a.timeout == b.timeout
        && a.netmask == b.netmask
}

/// Whether two destinations with the same key have the same settings.
fn same_destination(a: &Destination, b: &Destination) -> bool {
    a.forwarding == b.forwarding
        && a.weight == b.weight
        && a.upper_threshold == b.upper_threshold
        && a.lower_threshold == b.lower_threshold
}

/// Where a key was found by [`merge`].
enum Side<'a, K, A, B> {
    /// Only in the first map.
    Left(&'a K, &'a A),
    /// Only in the second map.
    Right(&'a K, &'a B),
    /// In both.
    Both(&'a K, &'a A, &'a B),
}

/// The union of two maps' keys in order, each with the values found under it: one linear pass.
fn merge<'a, K: Ord, A, B>(
    left: &'a BTreeMap<K, A>,
    right: &'a BTreeMap<K, B>,
) -> Merge<'a, K, A, B> {
    Merge {
        left: left.iter().peekable(),
        right: right.iter().peekable(),
    }
}

/// The iterator of [`merge`].
struct Merge<'a, K, A, B> {
    left: Peekable<std::collections::btree_map::Iter<'a, K, A>>,
    right: Peekable<std::collections::btree_map::Iter<'a, K, B>>,
}

impl<'a, K: Ord, A, B> Iterator for Merge<'a, K, A, B> {
    type Item = Side<'a, K, A, B>;

    fn next(&mut self) -> Option<Self::Item> {
        let order = match (self.left.peek(), self.right.peek()) {
            (None, None) => return None,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((l, _)), Some((r, _))) => l.cmp(r),
        };
        match order {
            std::cmp::Ordering::Less => self.left.next().map(|(k, a)| Side::Left(k, a)),
            std::cmp::Ordering::Greater => self.right.next().map(|(k, b)| Side::Right(k, b)),
            std::cmp::Ordering::Equal => match (self.left.next(), self.right.next()) {
                (Some((k, a)), Some((_, b))) => Some(Side::Both(k, a, b)),
                // Both were just peeked, so both are there.
                _ => None,
            },
        }
    }
}
