//! Director Leases: which directors are live, for the election of `L2` announcers
//! ([`crate::election`]). ipvslb builds no membership protocol: each director in `L2` mode
//! holds one `coordination.k8s.io/v1` Lease of its own (`ipvslb-director-<name>`, labelled
//! [`LABEL_DIRECTOR_LEASE`]), renewed every sixth of its duration, and watches the others'.
//! Each renewal is a write of its own: a slow one delays none after it.
//!
//! The rules are those of client-go's leader election, per director instead of per group:
//!
//! - A peer is live until its Lease's duration has passed since this director *saw* it renewed,
//!   on this director's own monotonic clock (clock skew between hosts does not matter).
//! - This director counts itself live only until two thirds of its duration after the start of
//!   its latest renewal that it has seen come back through the same watch: a director that
//!   cannot write its Lease, or whose watch no longer delivers (it would no longer see the
//!   others leave or join), stops announcing before any peer can take its Lease for expired.
//! - A director that stops withdraws its announcements first and then deletes its Lease, so its
//!   peers take over at once instead of after the Lease's duration.
//! - A director that (re)joins counts itself live only the deadline (two thirds of its
//!   duration) after it first saw its Lease back: a peer still counting itself live by then
//!   has seen a renewal of its own written later, and so (a watch delivers in commit order)
//!   the joiner's Lease before it, and has withdrawn what the joiner wins. A VIP moving to a
//!   joiner has a moment with no announcer, not one with two.
//! - The deadline also bounds the data plane: it withdraws by itself once it passes
//!   ([`crate::dataplane::Dataplane::hold_until`]), even if this task is stuck or gone.
//! - A director renews its Lease only while it is fit to serve (a full pass has programmed the
//!   kernel, and it is not stopping); otherwise it deletes it and its VIPs move.
//!
//! The durations are whole seconds in `spec.leaseDurationSeconds` (rounded up, for other
//! readers) and exact in the annotation [`ANNOTATION_LEASE_DURATION`], which peers read first.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::election::Election;

/// The label of every director Lease; its value is the director's name.
pub const LABEL_DIRECTOR_LEASE: &str = "ipvslb.io/director-lease";

/// The exact lease duration (`1500ms`), which `spec.leaseDurationSeconds` can only round.
pub const ANNOTATION_LEASE_DURATION: &str = "ipvslb.io/lease-duration";

/// The most renewals changing the Lease under way at once: each gives up at the deadline,
/// which is four renewal periods.
const IN_FLIGHT: usize = 4;

/// The longest Lease duration taken from a Lease.
const MAX_LEASE: Duration = Duration::from_secs(3600);

/// The field manager of the director's Lease writes.
const MANAGER: &str = "ipvslb-director";

/// The name of a director's Lease.
pub fn lease_name(director: &str) -> String {
    format!("ipvslb-director-{director}")
}

/// Lease timings of one director.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// How long peers wait, from seeing a renewal, before taking the Lease for expired.
    pub lease: Duration,
}

impl Timings {
    /// The default: peers take over 1.5 s after the last renewal they saw at most.
    pub const DEFAULT: Self = Self {
        lease: Duration::from_millis(1500),
    };

    /// Timings for `lease`, which must leave a renewal every sixth of it at least 100 ms, and
    /// be no longer than peers take one to be.
    pub fn new(lease: Duration) -> Result<Self, String> {
        if lease < Duration::from_millis(600) {
            return Err(format!("{lease:?} is below 600ms"));
        }
        if lease > MAX_LEASE {
            return Err(format!("{lease:?} is above {MAX_LEASE:?}"));
        }
        Ok(Self { lease })
    }

    /// How often the Lease is renewed: every sixth of it, so that the director stays live
    /// while any renewal of the last half of its deadline comes back in time; with every
    /// third, one write slower than a third of the Lease (seen here under load) made it let
    /// go of every VIP, and rejoin only the deadline after the next came back.
    pub fn renew(&self) -> Duration {
        self.lease / 6
    }

    /// How long after the start of its last renewal seen back a director stops announcing:
    /// a third of the lease before any peer may take over.
    pub fn deadline(&self) -> Duration {
        self.lease.mul_f64(2.0 / 3.0)
    }
}

/// What one director has seen of the director Leases, without I/O or clock: times come in as
/// arguments.
#[derive(Debug)]
pub struct Membership {
    me: String,
    timings: Timings,
    /// Each peer's latest renewal and when this director saw it change.
    peers: BTreeMap<String, Seen>,
    /// The renewals this director sent, by their `renewTime`, with when each write started.
    sent: BTreeMap<Timestamp, Instant>,
    /// Until when this director counts itself live.
    fresh_until: Option<Instant>,
    /// When it last became fresh after not being so.
    joined: Option<Instant>,
    /// The peers seen during the relist under way, if one is.
    relisting: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
struct Seen {
    renewed: Option<Timestamp>,
    at: Instant,
    lease: Duration,
}

impl Membership {
    /// Nothing seen yet.
    pub fn new(me: &str, timings: Timings) -> Self {
        Self {
            me: me.to_owned(),
            timings,
            peers: BTreeMap::new(),
            sent: BTreeMap::new(),
            fresh_until: None,
            joined: None,
            relisting: None,
        }
    }

    /// A renewal with `renewed` as its `renewTime` is being written, from `started`.
    pub fn sending(&mut self, renewed: Timestamp, started: Instant) {
        self.sent.insert(renewed, started);
        // A write that never came back is forgotten after a few newer ones.
        while self.sent.len() > 8 {
            self.sent.pop_first();
        }
    }

    /// This director gave up its Lease (unfit, or stopping): it is not live from now on.
    pub fn resigned(&mut self) {
        self.fresh_until = None;
        self.joined = None;
        self.sent.clear();
    }

    /// A watch event.
    pub fn observe(&mut self, event: &watcher::Event<Lease>, now: Instant) {
        match event {
            watcher::Event::Apply(lease) => self.applied(lease, now),
            watcher::Event::Delete(lease) => self.deleted(lease),
            watcher::Event::Init => self.relisting = Some(Vec::new()),
            watcher::Event::InitApply(lease) => {
                self.applied(lease, now);
                if let (Some(seen), Some(name)) = (self.relisting.as_mut(), director_of(lease)) {
                    seen.push(name);
                }
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.relisting.take() {
                    self.peers.retain(|name, _| seen.contains(name));
                }
            }
        }
    }

    fn applied(&mut self, lease: &Lease, now: Instant) {
        let Some(name) = director_of(lease) else {
            return;
        };
        let renewed = lease
            .spec
            .as_ref()
            .and_then(|s| s.renew_time.as_ref())
            .map(|t| t.0);
        if name == self.me {
            if let Some(started) = renewed.and_then(|r| self.sent.get(&r).copied()) {
                if self.fresh_until.is_none_or(|until| until <= now) {
                    self.joined = Some(now);
                }
                let until = started + self.timings.deadline();
                self.fresh_until = Some(self.fresh_until.map_or(until, |u| u.max(until)));
                self.sent.retain(|_, s| *s > started);
            }
            return;
        }
        let lease_duration = duration_of(lease);
        let changed = self
            .peers
            .get(&name)
            .is_none_or(|seen| seen.renewed != renewed);
        if changed {
            self.peers.insert(
                name,
                Seen {
                    renewed,
                    at: now,
                    lease: lease_duration,
                },
            );
        }
    }

    fn deleted(&mut self, lease: &Lease) {
        match director_of(lease) {
            // Deleted by someone else: peers take its VIPs at once, so it lets go at once.
            Some(name) if name == self.me => self.resigned(),
            Some(name) => {
                self.peers.remove(&name);
            }
            None => {}
        }
    }

    /// Until when this director may announce: the end of its freshness once it has joined.
    pub fn claim_until(&self, now: Instant) -> Option<Instant> {
        self.election(now)
            .is_live()
            .then_some(self.fresh_until)
            .flatten()
    }

    /// The live directors at `now`.
    pub fn election(&self, now: Instant) -> Election {
        let mut live: std::collections::BTreeSet<String> = self
            .peers
            .iter()
            .filter(|(_, seen)| seen.at + seen.lease > now)
            .map(|(name, _)| name.clone())
            .collect();
        if self.fresh_until.is_some_and(|until| until > now)
            && self
                .joined
                .is_some_and(|joined| now >= joined + self.timings.deadline())
        {
            live.insert(self.me.clone());
        }
        Election {
            me: self.me.clone(),
            live,
        }
    }

    /// The next moment the election may change by the clock alone (a Lease expiring).
    pub fn next_expiry(&self, now: Instant) -> Option<Instant> {
        self.peers
            .values()
            .map(|seen| seen.at + seen.lease)
            .chain(self.fresh_until)
            .chain(self.joined.map(|joined| joined + self.timings.deadline()))
            .filter(|at| *at > now)
            .min()
    }
}

/// The director a Lease is of, by its label.
fn director_of(lease: &Lease) -> Option<String> {
    lease.labels().get(LABEL_DIRECTOR_LEASE).cloned()
}

/// A Lease's duration: the exact annotation, else the whole seconds of its spec, else the
/// default (a Lease without either was not written by ipvslb: it still counts for as long).
fn duration_of(lease: &Lease) -> Duration {
    lease
        .annotations()
        .get(ANNOTATION_LEASE_DURATION)
        .and_then(|text| humantime::parse_duration(text).ok())
        // A duration nobody meant (years) must not overflow the clock.
        .map(|d| d.min(MAX_LEASE))
        .or_else(|| {
            lease
                .spec
                .as_ref()
                .and_then(|s| s.lease_duration_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .map(|s| Duration::from_secs(s).min(MAX_LEASE))
        })
        .unwrap_or(Timings::DEFAULT.lease)
}

/// The settings of [`run`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the Leases are (the release's namespace).
    pub namespace: String,
    /// This director's name.
    pub me: String,
    /// Its Lease timings.
    pub timings: Timings,
}

/// Holds this director's Lease while `fit` says it can serve, watches its peers', and hands
/// every change of the live set to `elect` (which returns once the announcements follow it).
/// At `shutdown` it hands over an election without itself, then deletes its Lease.
pub async fn run<E, F, H>(
    client: Client,
    config: Config,
    mut fit: watch::Receiver<bool>,
    elect: E,
    hold: H,
    mut shutdown: watch::Receiver<bool>,
) where
    E: Fn(Election) -> F,
    F: Future<Output = ()>,
    H: Fn(Option<Instant>),
{
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let name = lease_name(&config.me);
    let mut membership = Membership::new(&config.me, config.timings);
    let mut leases = watcher(
        api.clone(),
        watcher::Config::default().labels(LABEL_DIRECTOR_LEASE),
    )
    .default_backoff()
    .boxed();
    let mut renewals = tokio::time::interval(config.timings.renew());
    renewals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut writes = Writes::default();
    let mut applied = Election {
        me: config.me.clone(),
        ..Election::default()
    };
    elect(applied.clone()).await;
    let mut holding = false;
    loop {
        let wake = membership
            .next_expiry(Instant::now())
            .map(tokio::time::Instant::from_std);
        let woke = tokio::select! {
            _ = renewals.tick() => Wake::Renewal,
            () = writes.next() => Wake::Renewed,
            event = leases.next() => match event {
                Some(event) => Wake::Lease(Box::new(event)),
                None => return,
            },
            _ = sleep_until(wake) => Wake::Clock,
            _ = fit.changed() => Wake::Fitness,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let serving = *fit.borrow_and_update();
        match woke {
            Wake::Renewal if serving => {
                holding = true;
                if let Some(kind) = writes.room() {
                    let write = renewal(&api, &name, &config, &mut membership, kind);
                    writes.spawn(kind, write);
                } else {
                    debug!(lease = %name, "the director Lease's earlier renewals are still under way; this one is left out");
                }
            }
            Wake::Renewal if holding => {
                holding = false;
                membership.resigned();
                give_up(&api, &name, &config.me, &applied, &elect, &mut writes).await;
            }
            Wake::Lease(event) => match *event {
                Ok(event) => {
                    if let watcher::Event::Delete(lease) = &event
                        && lease.name_any() == name
                    {
                        writes.lost();
                    }
                    membership.observe(&event, Instant::now());
                }
                Err(e) => {
                    warn!(lease = %name, error = %e, "watching the director Leases failed; retrying");
                }
            },
            Wake::Fitness if !serving => membership.resigned(),
            Wake::Renewal | Wake::Renewed | Wake::Fitness | Wake::Clock => {}
        }
        let at = Instant::now();
        let now = membership.election(at);
        // The data plane's own deadline first when the claim grows, so that it keeps what
        // the election is about to give it; after the election when the claim ends.
        let until = membership.claim_until(at);
        if until.is_some() {
            hold(until);
        }
        if now != applied {
            info!(live = ?now.live, announcing = now.is_live(), "director Leases changed");
            elect(now.clone()).await;
            applied = now;
        }
        if until.is_none() {
            hold(None);
        }
    }
    hold(None);
    membership.resigned();
    give_up(&api, &name, &config.me, &applied, &elect, &mut writes).await;
}

/// The renewals under way, each a task of its own: a slow one delays none after it, and is
/// cut off only once it could no longer keep this director live (a cancelled request costs
/// its HTTP/1.1 connection, which under load made the next renewals pay for new ones).
#[derive(Default)]
struct Writes {
    /// Whether the Lease is known to exist (a renewal wrote it): then a renewal only changes
    /// it, with a merge patch that cannot bring it back once deleted; else it creates it.
    exists: bool,
    /// Renewals that create the Lease (server-side apply), one at a time: a delete waits
    /// for it, which it could otherwise undo.
    creating: JoinSet<Renewed>,
    /// Renewals that only change it.
    changing: JoinSet<Renewed>,
}

impl Writes {
    /// Which renewal may start now, if one may: one creating at a time; as many changing as
    /// can still come back within the deadline.
    fn room(&mut self) -> Option<Write> {
        while let Some(done) = self
            .creating
            .try_join_next()
            .or_else(|| self.changing.try_join_next())
        {
            self.finished(done);
        }
        if self.exists {
            (self.changing.len() < IN_FLIGHT).then_some(Write::Change)
        } else {
            self.creating.is_empty().then_some(Write::Create)
        }
    }

    fn spawn(&mut self, kind: Write, write: impl Future<Output = Renewed> + Send + 'static) {
        match kind {
            Write::Create => self.creating.spawn(write),
            Write::Change => self.changing.spawn(write),
        };
    }

    /// Waits for a renewal to end (forever when none is under way).
    async fn next(&mut self) {
        let done = tokio::select! {
            Some(done) = self.creating.join_next() => done,
            Some(done) = self.changing.join_next() => done,
            else => std::future::pending().await,
        };
        self.finished(done);
    }

    fn finished(&mut self, done: Result<Renewed, tokio::task::JoinError>) {
        match done {
            Ok(Renewed::Written) => self.exists = true,
            Ok(Renewed::Missing) => self.exists = false,
            Ok(Renewed::Failed) => {}
            Err(e) => warn!(error = %e, "a renewal of the director Lease ended abnormally"),
        }
    }

    /// The Lease was deleted.
    fn lost(&mut self) {
        self.exists = false;
    }

    /// Before a delete: every renewal under way waited for (each gives up at the deadline).
    /// A creating one could undo the delete; a changing one could not, but cut off it would
    /// take its connection down, and the delete would wait for a new one instead.
    async fn settle(&mut self) {
        while let Some(done) = self.creating.join_next().await {
            self.finished(done);
        }
        while let Some(done) = self.changing.join_next().await {
            self.finished(done);
        }
        self.exists = false;
    }
}

/// Withdraws this director's announcements, waits for the renewals under way, then deletes
/// its Lease: peers take over only once it has stopped answering.
async fn give_up<E, F>(
    api: &Api<Lease>,
    name: &str,
    me: &str,
    applied: &Election,
    elect: &E,
    writes: &mut Writes,
) where
    E: Fn(Election) -> F,
    F: Future<Output = ()>,
{
    let started = Instant::now();
    let mut without = applied.clone();
    without.live.remove(me);
    elect(without).await;
    let withdrawn = started.elapsed();
    writes.settle().await;
    let settled = started.elapsed();
    let params = DeleteParams::default();
    match tokio::time::timeout(Duration::from_secs(5), api.delete(name, &params)).await {
        // The three times tell where a slow handover went: withdrawing, the renewals still
        // under way, or the delete itself.
        Ok(Ok(_)) => info!(
            lease = %name,
            ?withdrawn,
            ?settled,
            deleted = ?started.elapsed(),
            "director Lease deleted: its VIPs move to the other directors now"
        ),
        Ok(Err(kube::Error::Api(e))) if e.code == 404 => {}
        Ok(Err(e)) => {
            warn!(lease = %name, error = %e, "deleting the director Lease failed: the other directors take over when it expires")
        }
        Err(_) => {
            warn!(lease = %name, "deleting the director Lease timed out: the other directors take over when it expires")
        }
    }
}

/// How a renewal writes the Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// A server-side apply: the Lease is not known to exist.
    Create,
    /// A merge patch, which fails on a deleted Lease rather than bring it back.
    Change,
}

/// What a renewal's write came to.
enum Renewed {
    Written,
    /// The Lease it was to change is gone.
    Missing,
    Failed,
}

/// A renewal of this director's Lease, recorded as sent: the write (creating the Lease, or
/// only changing it), to run as a task of its own, gives up at the deadline, past which it
/// could no longer keep this director live.
fn renewal(
    api: &Api<Lease>,
    name: &str,
    config: &Config,
    membership: &mut Membership,
    kind: Write,
) -> impl Future<Output = Renewed> + Send + 'static {
    // Microseconds, as the API server keeps a MicroTime: the watch must give back this value.
    let now = Timestamp::now();
    let renewed = Timestamp::from_microsecond(now.as_microsecond()).unwrap_or(now);
    let started = Instant::now();
    membership.sending(renewed, started);
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some([(LABEL_DIRECTOR_LEASE.to_owned(), config.me.clone())].into()),
            annotations: Some(
                [(
                    ANNOTATION_LEASE_DURATION.to_owned(),
                    humantime::format_duration(config.timings.lease).to_string(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(config.me.clone()),
            lease_duration_seconds: Some(
                i32::try_from(config.timings.lease.as_secs_f64().ceil() as u64).unwrap_or(i32::MAX),
            ),
            renew_time: Some(MicroTime(renewed)),
            ..LeaseSpec::default()
        }),
    };
    let (api, name, bound) = (api.clone(), name.to_owned(), config.timings.deadline());
    async move {
        let (params, patch) = match kind {
            Write::Create => (PatchParams::apply(MANAGER).force(), Patch::Apply(&lease)),
            Write::Change => {
                let params = PatchParams {
                    field_manager: Some(MANAGER.to_owned()),
                    ..PatchParams::default()
                };
                (params, Patch::Merge(&lease))
            }
        };
        match tokio::time::timeout(bound, api.patch(&name, &params, &patch)).await {
            Ok(Ok(_)) => {
                debug!(lease = %name, took = ?started.elapsed(), "director Lease renewed");
                Renewed::Written
            }
            Ok(Err(kube::Error::Api(e))) if e.code == 404 => {
                debug!(lease = %name, "the director Lease is gone; the next renewal creates it");
                Renewed::Missing
            }
            Ok(Err(e)) => {
                warn!(lease = %name, error = %e, "renewing the director Lease failed");
                Renewed::Failed
            }
            Err(_) => {
                warn!(lease = %name, "renewing the director Lease timed out");
                Renewed::Failed
            }
        }
    }
}

/// What woke the Lease loop.
enum Wake {
    Renewal,
    Renewed,
    Lease(Box<Result<watcher::Event<Lease>, watcher::Error>>),
    Clock,
    Fitness,
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(director: &str, renewed: Timestamp, duration: Option<&str>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(lease_name(director)),
                labels: Some([(LABEL_DIRECTOR_LEASE.to_owned(), director.to_owned())].into()),
                annotations: duration
                    .map(|d| [(ANNOTATION_LEASE_DURATION.to_owned(), d.to_owned())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                lease_duration_seconds: Some(2),
                renew_time: Some(MicroTime(renewed)),
                ..LeaseSpec::default()
            }),
        }
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn live(m: &Membership, now: Instant) -> Vec<String> {
        m.election(now).live.into_iter().collect()
    }

    #[test]
    fn a_peer_is_live_for_its_duration_after_it_was_seen_renewed_on_this_clock() {
        let t0 = Instant::now();
        let mut m = Membership::new("dir1", Timings::DEFAULT);
        // Its renewTime is an hour off this host's clock: only when it was seen counts.
        m.observe(
            &watcher::Event::Apply(lease("dir2", at(3600), Some("1500ms"))),
            t0,
        );
        assert_eq!(live(&m, t0 + Duration::from_millis(1400)), ["dir2"]);
        assert!(live(&m, t0 + Duration::from_millis(1500)).is_empty());
        assert_eq!(m.next_expiry(t0), Some(t0 + Duration::from_millis(1500)));
        // The same record again (a relist) does not renew it.
        m.observe(
            &watcher::Event::Apply(lease("dir2", at(3600), Some("1500ms"))),
            t0 + Duration::from_secs(1),
        );
        assert!(live(&m, t0 + Duration::from_millis(1600)).is_empty());
        // A new renewal does; without the annotation the spec's whole seconds count.
        m.observe(
            &watcher::Event::Apply(lease("dir2", at(3601), None)),
            t0 + Duration::from_secs(2),
        );
        assert_eq!(live(&m, t0 + Duration::from_millis(3900)), ["dir2"]);
        assert!(live(&m, t0 + Duration::from_secs(4)).is_empty());
    }

    #[test]
    fn this_director_is_live_only_until_two_thirds_after_a_renewal_it_saw_come_back() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut m = Membership::new("dir1", Timings::DEFAULT);
        m.sending(at(10), t0);
        // Written, not yet seen through the watch: not live.
        assert!(live(&m, t0 + ms(100)).is_empty());
        m.observe(
            &watcher::Event::Apply(lease("dir1", at(10), None)),
            t0 + ms(300),
        );
        m.sending(at(11), t0 + ms(500));
        m.observe(
            &watcher::Event::Apply(lease("dir1", at(11), None)),
            t0 + ms(600),
        );
        // Joining: live the deadline (1 s) after it first saw itself back, once every peer
        // still live has seen it and let go of what it wins.
        assert!(live(&m, t0 + ms(1299)).is_empty());
        assert_eq!(live(&m, t0 + ms(1300)), ["dir1"]);
        assert_eq!(m.claim_until(t0 + ms(1300)), Some(t0 + ms(1500)));
        // Timed from the last write's start, not from when it came back: peers wait 1.5 s
        // from when they saw it, which is later.
        assert_eq!(live(&m, t0 + ms(1499)), ["dir1"]);
        assert!(live(&m, t0 + ms(1500)).is_empty());
        assert_eq!(m.claim_until(t0 + ms(1500)), None);
        // A Lease record this director never wrote (another process of the same name) gives
        // it nothing.
        m.observe(
            &watcher::Event::Apply(lease("dir1", at(12), None)),
            t0 + ms(1600),
        );
        assert!(live(&m, t0 + ms(1700)).is_empty());
    }

    #[test]
    fn a_deleted_lease_leaves_at_once_and_a_relist_drops_the_leases_gone_meanwhile() {
        let t0 = Instant::now();
        let mut m = Membership::new("dir1", Timings::DEFAULT);
        m.observe(&watcher::Event::Apply(lease("dir2", at(1), None)), t0);
        m.observe(&watcher::Event::Apply(lease("dir3", at(1), None)), t0);
        m.observe(&watcher::Event::Delete(lease("dir2", at(1), None)), t0);
        assert_eq!(live(&m, t0), ["dir3"]);
        m.observe(&watcher::Event::Apply(lease("dir2", at(2), None)), t0);
        m.observe(&watcher::Event::Init, t0);
        m.observe(&watcher::Event::InitApply(lease("dir3", at(1), None)), t0);
        m.observe(&watcher::Event::InitDone, t0);
        assert_eq!(live(&m, t0), ["dir3"]);
    }

    #[test]
    fn resigning_or_its_lease_deleted_ends_this_directors_liveness_at_once() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut m = Membership::new("dir1", Timings::DEFAULT);
        let renew = |m: &mut Membership, n: i64, at_ms: u64| {
            m.sending(at(n), t0 + ms(at_ms));
            m.observe(
                &watcher::Event::Apply(lease("dir1", at(n), None)),
                t0 + ms(at_ms),
            );
        };
        for (n, at_ms) in [(10, 0), (11, 500), (12, 1000)] {
            renew(&mut m, n, at_ms);
        }
        assert_eq!(live(&m, t0 + ms(1000)), ["dir1"]);
        m.resigned();
        assert!(live(&m, t0 + ms(1000)).is_empty());
        // Back, then its Lease deleted by someone else: peers take its VIPs at once, so it
        // lets go at once too.
        for (n, at_ms) in [(13, 1500), (14, 2000), (15, 2500)] {
            renew(&mut m, n, at_ms);
        }
        assert_eq!(live(&m, t0 + ms(2500)), ["dir1"]);
        m.observe(
            &watcher::Event::Delete(lease("dir1", at(15), None)),
            t0 + ms(2600),
        );
        assert!(live(&m, t0 + ms(2600)).is_empty());
    }

    #[test]
    fn an_absurd_lease_duration_does_not_overflow_the_clock() {
        let t0 = Instant::now();
        let mut m = Membership::new("dir1", Timings::DEFAULT);
        m.observe(
            &watcher::Event::Apply(lease("dir2", at(1), Some("300000000000years"))),
            t0,
        );
        assert_eq!(live(&m, t0 + Duration::from_secs(3599)), ["dir2"]);
        assert!(live(&m, t0 + Duration::from_secs(3600)).is_empty());
    }

    #[test]
    fn one_slow_renewal_among_prompt_ones_leaves_this_director_live() {
        // Renewals every period, each back through the watch 100 ms after it started but one
        // back after 800 ms (the slowest write seen in the kernel VM's end-to-end run).
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let timings = Timings::DEFAULT;
        let mut timeline: Vec<(Duration, Option<i64>, i64)> = Vec::new();
        for k in 0..24 {
            let start = timings.renew() * u32::try_from(k).unwrap();
            let back = start + if k == 10 { ms(800) } else { ms(100) };
            timeline.push((start, None, k));
            timeline.push((back, Some(k), k));
        }
        timeline.sort();
        let mut m = Membership::new("dir1", timings);
        let mut lapses = Vec::new();
        let mut events = timeline.into_iter().peekable();
        let end = timings.renew() * 23;
        let mut now = Duration::ZERO;
        while now < end {
            while let Some((_, what, k)) = events.next_if(|(at, _, _)| *at <= now) {
                match what {
                    None => m.sending(at(k), t0 + now),
                    Some(_) => {
                        m.observe(&watcher::Event::Apply(lease("dir1", at(k), None)), t0 + now)
                    }
                }
            }
            // Live from the join on (the first renewal back, plus the deadline).
            if now >= ms(100) + timings.deadline() && !m.election(t0 + now).is_live() {
                lapses.push(now);
            }
            now += ms(10);
        }
        assert!(lapses.is_empty(), "not live at {:?}", lapses.first());
    }

    #[tokio::test]
    async fn a_slow_renewal_delays_none_after_it_and_one_creates_the_lease_at_a_time() {
        let mut writes = Writes::default();
        // Not known to exist: the renewal creates it.
        assert_eq!(writes.room(), Some(Write::Create));
        writes.spawn(Write::Create, async { Renewed::Written });
        writes.next().await;
        // Written: the next ones change it, and one that hangs holds back none after it
        // until IN_FLIGHT of them are under way.
        for _ in 0..IN_FLIGHT {
            assert_eq!(writes.room(), Some(Write::Change));
            writes.spawn(Write::Change, std::future::pending());
        }
        assert_eq!(writes.room(), None);
        // The Lease deleted under it: the next renewal creates it, one at a time.
        writes.lost();
        assert_eq!(writes.room(), Some(Write::Create));
        writes.spawn(Write::Create, std::future::pending());
        assert_eq!(writes.room(), None);
        // A changing renewal that finds the Lease gone makes the next one create it.
        let mut writes = Writes {
            exists: true,
            ..Writes::default()
        };
        writes.spawn(Write::Change, async { Renewed::Missing });
        writes.next().await;
        assert_eq!(writes.room(), Some(Write::Create));
    }

    #[test]
    fn timings_refuse_a_lease_too_short_to_renew() {
        assert!(Timings::new(Duration::from_millis(500)).is_err());
        assert!(Timings::new(MAX_LEASE + Duration::from_secs(1)).is_err());
        let t = Timings::new(Duration::from_secs(3)).unwrap();
        assert_eq!(
            (t.renew(), t.deadline()),
            (Duration::from_millis(500), Duration::from_secs(2))
        );
    }
}
