//! The director controller: keeps this host's IPVS table and VIP addresses equal to the plan
//! for every Service with an assigned VIP.
//!
//! A change to one Service converges that Service's entries only. Changes to pools, NodeSets
//! and Nodes requeue the Services they may affect; EndpointSlices requeue their Service. A full
//! pass at start and every `resync` collects owned entries no Service claims (deleted while the
//! director was down) and repairs drift (someone ran `ipvsadm -C`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use ipvslb_api::{Announce, DirectorSpec, LABEL_SERVICE_NAME, NodeSet};
use ipvslb_core::health::Target;
use ipvslb_core::plan::{PlanError, PlanProblem, Topology};
use ipvslb_core::{PlannedService, PoolSpec, ServiceName};
use ipvslb_ipvs::{ServiceKey, Table};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::cached::CachedService;
use crate::converge::{Converger, Failure, Generation, Owned, Report};
use crate::dataplane::{self, Dataplane};
use crate::election::Election;
use crate::health::Checks;
use crate::metrics::Metrics;
use crate::shared::Subscription;
use crate::translate::{self, ClassPolicy};
use crate::view::{Cluster, ServicePlan, Stores};

/// Why a director reconcile failed; retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data plane refused or failed.
    #[error("converging {what}: {source}")]
    Dataplane {
        /// The Service, or "the full table".
        what: String,
        /// The data-plane error.
        #[source]
        source: dataplane::Error,
    },
    /// The data plane refused some of a Service's virtual services; the others were programmed.
    #[error("{count} virtual service(s) of Service {service} refused; the first, {key}: {message}")]
    Refused {
        /// The Service.
        service: ServiceName,
        /// How many of its virtual services were refused.
        count: usize,
        /// The first refused one.
        key: ServiceKey,
        /// The data plane's error for it.
        message: String,
    },
    /// The blocking task running the data plane died.
    #[error("the data-plane task failed: {0}")]
    Join(String),
}

impl Error {
    /// Whether the kernel's table may be other than planned after this error: it could not be
    /// read, a write's outcome is unknown, or the data-plane task died.
    fn leaves_the_table_unknown(&self) -> bool {
        match self {
            Error::Dataplane { source, .. } => matches!(
                source,
                dataplane::Error::Read(_) | dataplane::Error::Write(_) | dataplane::Error::Poisoned
            ),
            Error::Join(_) => true,
            Error::Refused { .. } => false,
        }
    }
}

/// The field manager and Event reporter of the director.
const MANAGER: &str = "ipvslb-director";

/// Settings of the director.
#[derive(Clone)]
pub struct Config {
    /// Which Services are ours.
    pub classes: ClassPolicy,
    /// How often the full pass runs.
    pub resync: Duration,
    /// How long removed destinations drain at weight 0 before deletion.
    pub drain_grace: Duration,
    /// How many Services are reconciled at once.
    pub concurrency: u16,
    /// The health checks' prober.
    pub probes: crate::health::Config,
    /// This director's name in NodeSet statuses.
    pub name: String,
    /// At most this many destinations get their kernel counters exported as metrics.
    pub max_destination_metrics: usize,
    /// Turns true when the director is to withdraw every announced VIP for good (a stop
    /// with a drain): it goes on serving what still reaches it.
    pub withdraw: watch::Receiver<bool>,
    /// The interface the VIPs are on (`--interface`), for `ipvslb status`.
    pub interface: String,
    /// The interface the VIPs are announced on, if any (for the Director resource).
    pub announce_interface: Option<String>,
    /// Where the director Leases of `L2` mode are, and their timings.
    pub lease_namespace: String,
    /// The timings of this director's Lease in `L2` mode.
    pub l2_lease: crate::peers::Timings,
}

/// What reconciles share.
pub struct Context<D> {
    config: Config,
    converger: Arc<Converger<D>>,
    services: Store<CachedService>,
    /// The pools, NodeSets, Nodes and EndpointSlices, as plans are made over them.
    cluster: Arc<Cluster>,
    metrics: Arc<Metrics>,
    /// Publishes Warning Events, counting repeats into a series.
    warnings: Recorder,
    /// Services whose part of the plan another Service's converge may have changed.
    requeue: futures::channel::mpsc::UnboundedSender<ObjectRef<CachedService>>,
    claims: Claims,
    /// What the plans check, and what is down.
    checks: Arc<Checks>,
    /// The label sets of the kernel counters last exported.
    exported: std::sync::Mutex<BTreeSet<Vec<(&'static str, String)>>>,
    /// The plan problems last published on each Service.
    told: std::sync::Mutex<BTreeMap<ServiceName, Vec<String>>>,
    /// What the latest full pass found, for the Director resource.
    passes: watch::Sender<crate::director_record::Pass>,
}

/// Runs the director over `dataplane` until `shutdown` fires. The kernel table is left in
/// place on shutdown: traffic keeps flowing while a director restarts.
pub async fn run<D: Dataplane>(
    client: Client,
    config: Config,
    services: Subscription<CachedService>,
    dataplane: D,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    let Subscription {
        store: services,
        applied,
        mut deleted,
    } = services;
    let (pools, pools_writer) = reflector::store();
    let (node_sets, node_sets_writer) = reflector::store();
    let (nodes, nodes_writer) = reflector::store();
    let (slices, slices_writer) = reflector::store();
    let (requeue_tx, requeue_rx) = futures::channel::mpsc::unbounded();
    let checks = Arc::new(Checks::default());
    let _prober = crate::AbortOnDrop(tokio::spawn(crate::health::run(
        checks.clone(),
        config.probes,
        requeue_tx.clone(),
        metrics.clone(),
        shutdown.clone(),
    )));
    let _status = crate::AbortOnDrop(tokio::spawn(crate::node_set_status::run(
        crate::node_set_status::Writer {
            director: config.name.clone(),
            client: client.clone(),
            node_sets: node_sets.clone(),
            nodes: nodes.clone(),
            checks: checks.clone(),
            recorder: Recorder::new(client.clone(), Reporter::from(MANAGER)),
        },
        shutdown.clone(),
    )));
    let cluster = Arc::new(Cluster::new(
        config.classes.clone(),
        Stores {
            services: services.clone(),
            pools: pools.clone(),
            node_sets: node_sets.clone(),
            nodes: nodes.clone(),
            slices: slices.clone(),
        },
    ));
    let converger = Arc::new(Converger::new(dataplane, config.drain_grace));
    let mode = converger.dataplane().announces();
    let (election_tx, election) = watch::channel(Election::default());
    let elected = election.clone();
    let (passes, pass) = watch::channel(crate::director_record::Pass::default());
    let _record = crate::AbortOnDrop(tokio::spawn(crate::director_record::run(
        client.clone(),
        config.name.clone(),
        DirectorSpec {
            announce: mode,
            interface: config.announce_interface.clone(),
        },
        crate::director_record::Sources {
            open: converger.open(),
            announced: converger.announced(),
            election,
            pass,
        },
        services.clone(),
        Recorder::new(client.clone(), Reporter::from(MANAGER)),
        shutdown.clone(),
    )));
    // Elected through Leases in L2 mode; at a stop the Lease task ends after the controller,
    // once it has withdrawn and deleted the Lease.
    let leases = (mode == Announce::L2).then(|| {
        let elect = {
            let converger = converger.clone();
            move |election: Election| {
                election_tx.send_replace(election.clone());
                let converger = converger.clone();
                async move { elect(converger, election).await }
            }
        };
        crate::AbortOnDrop(tokio::spawn(crate::peers::run(
            client.clone(),
            crate::peers::Config {
                namespace: config.lease_namespace.clone(),
                me: config.name.clone(),
                timings: config.l2_lease,
            },
            converger.open(),
            elect,
            {
                let converger = converger.clone();
                move |until| converger.dataplane().hold_until(until)
            },
            shutdown.clone(),
        )))
    });
    let ctx = Arc::new(Context {
        converger,
        config,
        services: services.clone(),
        cluster: cluster.clone(),
        metrics,
        warnings: Recorder::new(client.clone(), Reporter::from(MANAGER)),
        requeue: requeue_tx,
        claims: Claims::default(),
        checks,
        exported: Default::default(),
        told: Default::default(),
        passes,
    });

    ctx.metrics.status.set({
        let ctx = Arc::downgrade(&ctx);
        Arc::new(move || Some(ctx.upgrade()?.host_state(&elected.borrow())))
    });
    let on_delete = ctx.clone();
    let _deletions = crate::AbortOnDrop(tokio::spawn(async move {
        // Until the pools are known, nothing a deleted Service held is known to be ours.
        if on_delete.cluster.filled().await.is_err() {
            return;
        }
        while let Some(service) = deleted.recv().await {
            if let Err(e) = on_delete.converge_deleted(&service).await {
                warn!(service = %service.service_name(), error = %e, "removing a deleted Service's entries failed; the full pass will retry");
            }
        }
    }));
    // Each watch tells the cluster view of its events once the reflector applied them (a
    // relist's objects reach the store only at its end), before the Services they affect are
    // requeued.
    let pool_stream = {
        let (cluster, requeue) = (cluster.clone(), ctx.requeue.clone());
        crate::watch_all(&client, pools_writer, &ctx.metrics.health, "director")
            .inspect_ok(move |event| send_all(&requeue, cluster.topology_event(event)))
            .touched_objects()
    };
    let set_stream = {
        let (cluster, requeue) = (cluster.clone(), ctx.requeue.clone());
        crate::watch_all(&client, node_sets_writer, &ctx.metrics.health, "director")
            .inspect_ok(move |event| send_all(&requeue, cluster.topology_event(event)))
            .touched_objects()
    };
    let node_triggers = {
        let cluster = cluster.clone();
        triggers(
            crate::watch_stream(
                &client,
                watcher::Config::default(),
                translate::trim_node,
                &ctx.metrics.health,
                "director",
            )
            .reflect(nodes_writer),
            move |event| cluster.node_event(event),
        )
    };
    let slice_triggers = triggers(
        crate::watch_stream(
            &client,
            watcher::Config::default().labels(LABEL_SERVICE_NAME),
            |_: &mut EndpointSlice| {},
            &ctx.metrics.health,
            "director",
        )
        .reflect(slices_writer),
        move |event| cluster.slice_event(event),
    );

    // Dies with this future: an aborted controller must not leave a writer behind.
    let _background = crate::AbortOnDrop(tokio::spawn(full_passes(ctx.clone(), shutdown.clone())));
    let _withdraw = crate::AbortOnDrop(tokio::spawn(withdraw_when_told(ctx.clone())));
    let concurrency = ctx.config.concurrency;
    let health = ctx.metrics.health.clone();
    let results = crate::service_controller(
        applied,
        services.clone(),
        pools.clone(),
        pool_stream,
        concurrency,
    )
    .watches_stream(
        set_stream,
        crate::on_spec_change(node_sets.clone(), services.clone(), |s: &NodeSet| {
            s.spec.clone()
        }),
    )
    .reconcile_on(node_triggers)
    .reconcile_on(slice_triggers)
    .reconcile_on(requeue_rx)
    .graceful_shutdown_on(crate::stopped(shutdown.clone()))
    .run(reconcile, error_policy, ctx);
    crate::drive("director", results, &health).await;
    // Aborted with this future otherwise: a director that dies takes its Lease task along,
    // and its Lease expires as a crashed process's does.
    if let Some(mut leases) = leases {
        let _ = (&mut leases.0).await;
    }
}

/// Makes the announcements follow `election`, on a blocking thread.
async fn elect<D: Dataplane>(converger: Arc<Converger<D>>, election: Election) {
    let outcome = tokio::task::spawn_blocking(move || converger.elect(election))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    match outcome {
        Ok(report) if report.announced + report.withdrawn > 0 => {
            info!(
                announced = report.announced,
                withdrawn = report.withdrawn,
                "L2 announcements follow the director Leases"
            );
        }
        Ok(_) => {}
        Err(e) => {
            warn!(error = %e, "following the director Leases failed; the next full pass retries")
        }
    }
}

/// `name`'s part of a plan.
#[derive(Debug, Default)]
pub struct Part {
    /// The table a per-Service converge of it applies.
    pub table: Table,
    /// Why some of it could not be planned.
    pub problems: Vec<PlanProblem>,
    /// What its destinations are checked by.
    pub targets: BTreeSet<Target>,
}

/// The part of the plan of `services` that is `name`'s, leaving out destinations whose check
/// is `down`. `services` holds `name` and the Services sharing its VIPs, so that of two
/// claiming one virtual service the same one wins here as in the full pass.
pub fn part_of(
    name: &ServiceName,
    services: &[PlannedService],
    topology: &Topology,
    down: &BTreeSet<Target>,
) -> Part {
    let mut plan = topology.plan(services, down);
    let mut table = plan.table;
    table
        .services
        .retain(|key, _| plan.owners.get(key) == Some(name));
    let problems = plan
        .problems
        .into_iter()
        .filter(|p| &p.service == name)
        .collect();
    Part {
        table,
        problems,
        targets: plan.targets.remove(name).unwrap_or_default(),
    }
}

/// The Event reason for a plan problem.
fn problem_reason(error: &PlanError) -> &'static str {
    match error {
        PlanError::UnknownPool { .. } => "UnknownPool",
        PlanError::UnknownNodeSet { .. } => "UnknownNodeSet",
        PlanError::NoNodePort { .. } => "NoNodePort",
        PlanError::Collision { .. } => "PortCollision",
        PlanError::NoBackends { .. } => "NoBackends",
    }
}

fn names(services: &[Service]) -> Vec<ServiceName> {
    services.iter().map(translate::service_name).collect()
}

/// The pool a Service's VIPs come from: the one holding its first VIP. A Service in no pool
/// is not planned, and what it had is collected.
pub fn pool_of<'a>(addresses: &[IpAddr], pools: &'a [PoolSpec]) -> Option<&'a PoolSpec> {
    let first = addresses.first()?;
    pools
        .iter()
        .find(|p| p.ranges.iter().any(|r| r.contains(first)))
}

/// The Services to converge again after a converge: the holders of keys it was refused (one of
/// the two planned from a stale view), those once refused a key it freed, and, when its keys or
/// its claim ([`Claims`]) changed, the Services sharing its VIPs (a port it freed, took or gave
/// up asking for may be theirs now).
pub fn affected<'a>(
    report: &Report,
    claim_changed: bool,
    peers: impl IntoIterator<Item = &'a ServiceName>,
) -> std::collections::BTreeSet<ServiceName> {
    let mut names: std::collections::BTreeSet<ServiceName> = report
        .taken
        .iter()
        .map(|(_, holder)| holder.clone())
        .collect();
    names.extend(report.unblocked.iter().cloned());
    if report.keys_changed || claim_changed {
        names.extend(peers.into_iter().cloned());
    }
    names
}

/// What each Service last claimed (its VIPs and ports, or nothing when not planned): when that
/// changes, what the Services sharing its VIPs are given may change too, even if its own keys
/// do not (a port it asked for and never got, then gave up).
#[derive(Debug, Default)]
pub struct Claims(std::sync::Mutex<BTreeMap<ServiceName, Claim>>);

type Claim = Option<(Vec<IpAddr>, Vec<ipvslb_core::ServicePort>)>;

impl Claims {
    /// Records what `name` claims now, `planned` (`None`: nothing, or deleted); whether that
    /// differs from what it claimed before.
    pub fn changed(&self, name: &ServiceName, planned: Option<&PlannedService>) -> bool {
        let claim: Claim = planned.map(|p| (p.addresses.clone(), p.ports.clone()));
        let Ok(mut claims) = self.0.lock() else {
            return true; // unknown: requeueing is always safe
        };
        let before = match &claim {
            Some(_) => claims.insert(name.clone(), claim.clone()),
            None => claims.remove(name),
        };
        before.flatten() != claim
    }
}

/// The keys each Service owns in `plan`, sorted, as the full pass hands them to the converger.
pub fn keys_by_service(plan: &ipvslb_core::plan::Plan) -> BTreeMap<ServiceName, Vec<ServiceKey>> {
    // The owners come in key order, so each Service's keys come sorted.
    let mut by_service: BTreeMap<ServiceName, Vec<ServiceKey>> = BTreeMap::new();
    for (key, service) in &plan.owners {
        by_service.entry(service.clone()).or_default().push(*key);
    }
    by_service
}

/// Sends each of `services` to be reconciled.
fn send_all(
    requeue: &futures::channel::mpsc::UnboundedSender<ObjectRef<CachedService>>,
    services: Vec<ObjectRef<CachedService>>,
) {
    for service in services {
        let _ = requeue.unbounded_send(service);
    }
}

/// The Services to reconcile after each event of `events`, as `affected` says. Watch errors
/// are logged and retried where the watch is made.
fn triggers<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    affected: impl Fn(&watcher::Event<K>) -> Vec<ObjectRef<CachedService>> + Send + 'static,
) -> impl futures::Stream<Item = ObjectRef<CachedService>> + Send + 'static
where
    K: Send + 'static,
{
    use futures::StreamExt;
    events.flat_map(move |event| {
        futures::stream::iter(event.map(|e| affected(&e)).unwrap_or_default())
    })
}

async fn reconcile<D: Dataplane>(
    cached: Arc<CachedService>,
    ctx: Arc<Context<D>>,
) -> Result<Action, Error> {
    let name = cached.service_name();
    let _timer = ctx.metrics.reconcile_timer("director");
    let span = info_span!("direct", service = %name);
    async {
        // Planned before every cache is filled, a Service would lose the nodes and endpoints
        // not listed yet (the Services' cache fills first, and reconciles start with it).
        if ctx.cluster.filled().await.is_err() {
            return Ok(Action::await_change());
        }
        let seen = ctx.generation()?;
        let service = cached.to_service();
        let down = ctx.checks.down();
        let ServicePlan {
            view,
            mut claim,
            part:
                Part {
                    table: desired,
                    problems,
                    targets,
                },
        } = ctx.cluster.plan_service(&service, &down);
        ctx.checks.register(&name, targets);
        // A transition of a target this plan needs, between reading what is down and
        // registering, requeued only the Services registered then.
        if ctx.checks.down() != down {
            let _ = ctx.requeue.unbounded_send(CachedService::reference(&name));
        }
        ctx.tell_problems(&service, &name, &problems).await;
        let mut report = ctx
            .converge(&name, desired, view.owned.clone(), seen)
            .await?;
        // Deleted while this converge was being planned: the deletion's converge may have
        // run first, and nothing else would remove what this one just wrote.
        if ctx.services.get(&CachedService::reference(&name)).is_none() {
            let seen = ctx.generation()?;
            report.merge(
                ctx.converge(&name, Table::new(), view.owned.clone(), seen)
                    .await?,
            );
            ctx.checks.register(&name, BTreeSet::new());
            claim = None;
        }
        let claim_changed = ctx.claims.changed(&name, claim.as_ref());
        // The peers of now: a Service that came to share the VIP meanwhile is as affected as
        // the ones planned with.
        let peers = names(&ctx.cluster.sharing(&service));
        ctx.requeue_affected(&report, claim_changed, &peers);
        if let Some(first) = report.failures.first() {
            ctx.warn_refused(&report.failures).await;
            return Err(Error::Refused {
                service: name.clone(),
                count: report.failures.len(),
                key: first.key,
                message: first.message.clone(),
            });
        }
        Ok(match report.next_drain_deadline {
            Some(deadline) => Action::requeue(
                deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(100),
            ),
            None => Action::await_change(),
        })
    }
    .instrument(span)
    .await
}

fn error_policy<D: Dataplane>(
    service: Arc<CachedService>,
    error: &Error,
    ctx: Arc<Context<D>>,
) -> Action {
    warn!(service = %service.service_name(), %error, "converging failed; retrying");
    ctx.metrics.reconcile_error(
        "director",
        match error {
            Error::Dataplane { .. } => "dataplane",
            Error::Refused { .. } => "refused",
            Error::Join(_) => "join",
        },
    );
    Action::requeue(Duration::from_secs(5))
}

/// The full pass, at start (once the caches are filled) and every `resync`.
async fn full_passes<D: Dataplane>(ctx: Arc<Context<D>>, mut shutdown: watch::Receiver<bool>) {
    // Until the table has been made whole once, traffic may meet a stale one.
    let health = &ctx.metrics.health;
    health.require("director first pass", "the director's first full pass");
    if ctx.cluster.filled().await.is_err() {
        return;
    }
    // A pass that takes longer than a resync and a minute more is stuck, not slow.
    let heartbeat = health.heartbeat(
        "director full pass",
        ctx.config.resync * 2 + Duration::from_secs(60),
    );
    let mut repairs = 0;
    let mut first = true;
    loop {
        heartbeat.beat();
        match ctx.full_pass().await {
            Ok(report) => {
                if !first {
                    repairs += report.ops.values().sum::<usize>()
                        + report.addresses_added
                        + report.addresses_removed;
                }
                first = false;
                ctx.report_pass(&report, repairs as u64);
                info!(ops = ?report.ops, added = report.addresses_added, removed = report.addresses_removed, refused = report.failures.len(), "full pass done");
                // A refused virtual service is its Service's problem, said on that Service:
                // the director serves every other one and is ready.
                ctx.warn_refused(&report.failures).await;
                ctx.requeue_affected(&report, false, &[]);
                ctx.requeue_when_drained(&report);
                health.met("director first pass");
            }
            Err(e) => {
                warn!(error = %e, "full pass failed; retrying at the next resync");
                // A kernel that could not be read or written may hold a stale or partial
                // table: draw no traffic until a pass succeeds. A VIP address refused is that
                // VIP's problem, not the table's.
                if e.leaves_the_table_unknown()
                    && let Some(withdrawn) = withdraw(&ctx, Converger::hold_back).await
                    && withdrawn > 0
                {
                    warn!(
                        withdrawn,
                        "VIP announcements withdrawn until a full pass succeeds"
                    );
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(ctx.config.resync) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Withdraws every announced VIP once `ctx.config.withdraw` turns true.
async fn withdraw_when_told<D: Dataplane>(ctx: Arc<Context<D>>) {
    let mut told = ctx.config.withdraw.clone();
    if told.wait_for(|w| *w).await.is_err() {
        return;
    }
    if let Some(withdrawn) = withdraw(&ctx, Converger::stop_announcing).await {
        info!(
            withdrawn,
            "VIP announcements withdrawn; serving what still arrives until the drain ends"
        );
    }
}

/// Runs `how` (a withdrawal of announcements) on a blocking thread: how many it withdrew, or
/// `None` when it failed, which is logged.
async fn withdraw<D: Dataplane>(
    ctx: &Context<D>,
    how: fn(&Converger<D>) -> Result<usize, dataplane::Error>,
) -> Option<usize> {
    let converger = ctx.converger.clone();
    let outcome = tokio::task::spawn_blocking(move || how(&converger))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    outcome
        .inspect_err(|e| warn!(error = %e, "withdrawing the VIP announcements failed"))
        .ok()
}

impl<D: Dataplane> Context<D> {
    /// Removes a deleted Service's entries and requeues the Services sharing its VIPs, whose
    /// parts were planned with it.
    async fn converge_deleted(&self, deleted: &CachedService) -> Result<(), Error> {
        let name = deleted.service_name();
        let span = info_span!("forget", service = %name);
        async {
            let seen = self.generation()?;
            let view = self.cluster.view();
            let peers = names(&self.cluster.sharing(&deleted.to_service()));
            self.claims.changed(&name, None);
            self.checks.register(&name, BTreeSet::new());
            if let Ok(mut told) = self.told.lock() {
                told.remove(&name);
            }
            // Created again meanwhile: the new Service's reconcile converges from what the old
            // one held, and removing it here would undo that reconcile if it came first.
            if self
                .services
                .get(&CachedService::reference(&name))
                .is_none()
            {
                let report = self
                    .converge(&name, Table::new(), view.owned.clone(), seen)
                    .await?;
                self.requeue_affected(&report, false, &[]);
            }
            for peer in &peers {
                let _ = self.requeue.unbounded_send(CachedService::reference(peer));
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// A new generation, taken right before the caches are read for a converge.
    fn generation(&self) -> Result<Generation, Error> {
        self.converger
            .generation()
            .map_err(|source| Error::Dataplane {
                what: "the converger".into(),
                source,
            })
    }

    async fn converge(
        &self,
        name: &ServiceName,
        desired: Table,
        owned: Owned,
        seen: Generation,
    ) -> Result<Report, Error> {
        let converger = self.converger.clone();
        let service = name.clone();
        let report = tokio::task::spawn_blocking(move || {
            converger.converge_service(&service, &desired, &owned, seen, Instant::now())
        })
        .await
        .map_err(|e| Error::Join(e.to_string()))?
        .map_err(|source| {
            self.count_op("converge_service", "error");
            Error::Dataplane {
                what: format!("Service {name}"),
                source,
            }
        })?;
        self.record(&report);
        if !report.is_noop() {
            info!(ops = ?report.ops, added = report.addresses_added, removed = report.addresses_removed, "converged");
        }
        Ok(report)
    }

    async fn full_pass(&self) -> Result<Report, Error> {
        // Before the caches are read: a Service converged from a later view than this one
        // keeps its entries as that converge left them.
        let since = self.generation()?;
        let (view, plan) = self.cluster.plan_all(&self.checks.down());
        let existing: BTreeSet<ServiceName> = self
            .services
            .state()
            .iter()
            .map(|s| s.service_name())
            .collect();
        self.checks
            .register_missing(plan.targets.clone(), &existing);
        for problem in &plan.problems {
            debug!(service = %problem.service, error = %problem.error, "planned in part");
        }
        let by_service = keys_by_service(&plan);
        let converger = self.converger.clone();
        let owned = view.owned.clone();
        let table = plan.table;
        let report = tokio::task::spawn_blocking(move || {
            converger.converge_all(&table, by_service, &owned, since, Instant::now())
        })
        .await
        .map_err(|e| Error::Join(e.to_string()))?
        .map_err(|source| Error::Dataplane {
            what: "the full table".into(),
            source,
        })?;
        self.record(&report);
        // Per-Service converges keep the table current: whatever the full pass still writes
        // is drift someone made, or entries left from while the director was down.
        let repairs =
            report.ops.values().sum::<usize>() + report.addresses_added + report.addresses_removed;
        self.metrics.full_pass_repairs.inc_by(repairs as u64);
        if let Ok(mut exported) = self.exported.lock() {
            self.metrics.export_counters(
                &report.counters,
                self.config.max_destination_metrics,
                &mut exported,
            );
        }
        Ok(report)
    }

    /// What this director wants and knows now, for `ipvslb status`.
    fn host_state(&self, election: &Election) -> crate::status::HostState {
        let down = self.checks.down();
        let (view, plan) = self.cluster.plan_all(&down);
        let vips: BTreeSet<IpAddr> = plan
            .table
            .services
            .keys()
            .filter_map(|k| k.address())
            .collect();
        let dataplane = self.converger.dataplane();
        crate::status::HostState {
            director: self.config.name.clone(),
            ready: *self.converger.open().borrow(),
            interface: self.config.interface.clone(),
            announce: dataplane.announces(),
            announce_interface: self.config.announce_interface.clone(),
            vips: vips
                .iter()
                .map(|vip| {
                    let mode = view.owned.announce_of(vip);
                    crate::status::VipState {
                        vip: *vip,
                        mode,
                        elected: (mode == Announce::L2)
                            .then(|| election.winner(vip).map(str::to_owned))
                            .flatten(),
                    }
                })
                .collect(),
            desired: plan.table,
            announced: self.converger.announced().borrow().clone(),
            live: election.live.iter().cloned().collect(),
            backends_down: down
                .iter()
                .map(|t| format!("{}", std::net::SocketAddr::new(t.address, t.port)))
                .collect(),
        }
    }

    /// Tells the Director resource what a full pass found.
    fn report_pass(&self, report: &Report, repairs: u64) {
        let (vips, virtual_services) = self.converger.held().unwrap_or_default();
        self.passes.send_replace(crate::director_record::Pass {
            vips: vips as u64,
            virtual_services: virtual_services as u64,
            destinations: report.counters.len() as u64,
            finished: Some(k8s_openapi::jiff::Timestamp::now()),
            repairs,
        });
    }

    /// Requeues the Services whose part of the plan a converge may have made stale.
    fn requeue_affected(&self, report: &Report, claim_changed: bool, peers: &[ServiceName]) {
        for name in affected(report, claim_changed, peers) {
            let _ = self.requeue.unbounded_send(CachedService::reference(&name));
        }
    }

    /// Requeues the Services a full pass left draining once their deadline is past, so the
    /// drained destinations go then rather than at the next resync.
    fn requeue_when_drained(&self, report: &Report) {
        let Some(deadline) = report.next_drain_deadline else {
            return;
        };
        let names: Vec<ServiceName> = report.draining.iter().cloned().collect();
        let requeue = self.requeue.clone();
        let wait = deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(100);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            for name in names {
                let _ = requeue.unbounded_send(CachedService::reference(&name));
            }
        });
    }

    /// Says on the Service what keeps part of it unserved, when that changed since last said
    /// (every reconcile would otherwise repeat it).
    async fn tell_problems(&self, service: &Service, name: &ServiceName, problems: &[PlanProblem]) {
        let now: Vec<String> = problems.iter().map(|p| p.error.to_string()).collect();
        let changed = self
            .told
            .lock()
            .map(|mut told| {
                let changed = told.get(name) != Some(&now);
                if now.is_empty() {
                    told.remove(name);
                } else {
                    told.insert(name.clone(), now.clone());
                }
                changed
            })
            .unwrap_or(true);
        if !changed {
            return;
        }
        for problem in problems {
            self.warn(
                service,
                problem_reason(&problem.error),
                problem.error.to_string(),
            )
            .await;
        }
    }

    /// Publishes a Warning Event on `service`.
    async fn warn(&self, service: &Service, reason: &str, note: String) {
        let event = Event {
            type_: EventType::Warning,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Program".to_owned(),
            secondary: None,
        };
        if let Err(e) = self
            .warnings
            .publish(&event, &service.object_ref(&()))
            .await
        {
            warn!(service = %translate::service_name(service), error = %e, reason, "could not publish an event");
        }
    }

    /// Says on each Service which of its virtual services the data plane refused, and why.
    async fn warn_refused(&self, failures: &[Failure]) {
        for failure in failures {
            let Some(name) = &failure.service else {
                warn!(key = %failure.key, error = %failure.message, "removing an entry no Service claims failed; the next full pass retries");
                continue;
            };
            warn!(service = %name, key = %failure.key, error = %failure.message, "the data plane refused a virtual service");
            let Some(cached) = self.services.get(&CachedService::reference(name)) else {
                continue; // gone meanwhile: nobody to tell
            };
            let note = format!("programming {} failed: {}", failure.key, failure.message);
            self.warn(&cached.to_service(), "ProgrammingFailed", note)
                .await;
        }
    }

    fn record(&self, report: &Report) {
        for (kind, count) in &report.ops {
            self.metrics
                .dataplane_ops
                .get_or_create(&vec![
                    ("kind", (*kind).to_owned()),
                    ("result", "ok".to_owned()),
                ])
                .inc_by(*count as u64);
        }
        for (kind, count) in [
            ("add_address", report.addresses_added),
            ("del_address", report.addresses_removed),
        ] {
            if count > 0 {
                self.count_op_by(kind, "ok", count as u64);
            }
        }
    }

    fn count_op(&self, kind: &str, result: &str) {
        self.count_op_by(kind, result, 1);
    }

    fn count_op_by(&self, kind: &str, result: &str, n: u64) {
        self.metrics
            .dataplane_ops
            .get_or_create(&vec![
                ("kind", kind.to_owned()),
                ("result", result.to_owned()),
            ])
            .inc_by(n);
    }
}
