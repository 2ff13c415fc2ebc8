//! The allocator controller: gives LoadBalancer Services their VIPs from IPPools and records
//! them in `status.loadBalancer.ingress`, the only durable allocation record.
//!
//! Every replica watches; only the Lease holder acts. On becoming leader it rebuilds every
//! assignment from a fresh (quorum) list of Services before it assigns anything, so a restart
//! or a leader change never moves an address and never hands one out twice.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipvslb_api::{IPPool, IPPoolStatus, MAX_STATUS_ALLOCATIONS};
use ipvslb_core::alloc::{AllocError, Allocator, Assignment, PoolProblem, Released};
use ipvslb_core::{IpFamily, PoolRole, PoolSpec, ServiceClaim, ServiceName};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::{Notify, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::cached::CachedService;
use crate::metrics::Metrics;
use crate::shared::Subscription;
use crate::translate::{self, ClassPolicy};

/// The annotation that records which pool a Service's VIPs came from. Written by the allocator;
/// its presence also marks the status as ipvslb's to clear.
pub const ANNOTATION_ASSIGNED_POOL: &str = "ipvslb.io/assigned-pool";

/// The field manager of every write.
const MANAGER: &str = "ipvslb-allocator";

/// Why a reconcile failed; retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Listing Services to rebuild the assignments failed.
    #[error("listing Services to rebuild assignments: {0}")]
    Rebuild(#[source] kube::Error),
    /// Writing a Service's status failed.
    #[error("writing the status of Service {service}: {source}")]
    WriteStatus {
        /// The Service.
        service: ServiceName,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Writing a Service's annotation failed.
    #[error("annotating Service {service}: {source}")]
    Annotate {
        /// The Service.
        service: ServiceName,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The shared state was poisoned by a panic elsewhere.
    #[error("allocator state is unusable after an earlier failure")]
    Poisoned,
    /// This replica lost the Lease while the reconcile ran: it must not write. Becoming leader
    /// again requeues every Service.
    #[error("not the leader any more: this replica does not hold the Lease")]
    NotLeading,
    /// The caches stopped (shutting down).
    #[error("the caches stopped before they were filled")]
    Stopped,
}

impl Error {
    /// The metric label of the error.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Rebuild(_) => "rebuild",
            Error::WriteStatus { .. } => "write_status",
            Error::Annotate { .. } => "annotate",
            Error::Poisoned => "poisoned",
            Error::NotLeading => "not_leading",
            Error::Stopped => "stopped",
        }
    }
}

/// Settings of the allocator.
#[derive(Clone)]
pub struct Config {
    /// Which Services are ours.
    pub classes: ClassPolicy,
    /// How many Services are reconciled at once.
    pub concurrency: u16,
    /// How often pool statuses are checked without a change to prompt it (and deletions
    /// missed by the watch collected).
    pub status_resync: Duration,
}

/// What reconciles share.
pub struct Context {
    client: Client,
    config: Config,
    services: Store<CachedService>,
    pools: Store<IPPool>,
    namespaces: Store<Namespace>,
    leading: watch::Receiver<bool>,
    state: Mutex<Option<State>>,
    /// Serializes rebuilds: two reconciles that both find no allocator must not both build
    /// one, or the second would forget what the first assigned meanwhile.
    rebuilding: tokio::sync::Mutex<()>,
    caches_ready: tokio::sync::OnceCell<()>,
    /// Services refused for now; an address coming free requeues them.
    pending: Mutex<std::collections::BTreeSet<ServiceName>>,
    /// Status writes decided and not yet confirmed, by Service: a rebuild keeps their
    /// addresses out of reach, since each may land after the decision was dropped.
    writing: Mutex<BTreeMap<ServiceName, Vec<IpAddr>>>,
    requeue: futures::channel::mpsc::UnboundedSender<ObjectRef<CachedService>>,
    /// Publishes Warning Events, counting repeats into a series.
    warnings: Recorder,
    metrics: Arc<Metrics>,
    pools_changed: Notify,
}

/// The caches the allocator decides from.
struct Caches {
    services: Store<CachedService>,
    pools: Store<IPPool>,
    namespaces: Store<Namespace>,
}

impl Context {
    fn new(
        client: Client,
        config: Config,
        caches: Caches,
        leading: watch::Receiver<bool>,
        requeue: futures::channel::mpsc::UnboundedSender<ObjectRef<CachedService>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            warnings: Recorder::new(client.clone(), Reporter::from(MANAGER)),
            client,
            config,
            services: caches.services,
            pools: caches.pools,
            namespaces: caches.namespaces,
            leading,
            state: Mutex::new(None),
            rebuilding: tokio::sync::Mutex::new(()),
            caches_ready: tokio::sync::OnceCell::new(),
            pending: Mutex::new(std::collections::BTreeSet::new()),
            writing: Mutex::new(BTreeMap::new()),
            requeue,
            metrics,
            pools_changed: Notify::new(),
        }
    }
}

/// The labels of each namespace, shared by the claims built in one pass.
type NamespaceLabels = BTreeMap<String, Arc<BTreeMap<String, String>>>;

/// The allocator as rebuilt for the current pools and leadership.
struct State {
    pools: Vec<PoolSpec>,
    allocator: Allocator,
}

impl State {
    /// The allocator over `pools` holding what `claims` record, with its pools' problems logged.
    fn restored(pools: Vec<PoolSpec>, claims: &[ServiceClaim]) -> Self {
        let (allocator, problems) = Allocator::restored(pools.clone(), claims);
        Self::logged(pools, allocator, &problems)
    }

    fn logged(pools: Vec<PoolSpec>, allocator: Allocator, problems: &[PoolProblem]) -> Self {
        let restored = allocator.assignments().count();
        info!(pools = pools.len(), restored, "rebuilt assignments");
        for problem in problems {
            warn!(pool = problem.pool(), %problem, "pool problem");
        }
        for pool in &pools {
            if let PoolRole::Frozen(reason) = &pool.role {
                warn!(pool = %pool.name, %reason, "invalid pool: its holders keep their addresses, it assigns nothing new");
            }
        }
        Self { pools, allocator }
    }
}

/// What the allocator decided for one Service, and what became of recorded addresses it could
/// not keep.
enum Decision {
    /// It holds these addresses.
    Assigned(Assignment, Option<Released>),
    /// It gets none, for this reason.
    Failed(AllocError, Option<Released>),
    /// It is not (or no longer) ours.
    NotOurs,
}

/// Runs the allocator until `shutdown` fires.
pub async fn run(
    client: Client,
    config: Config,
    services: Subscription<CachedService>,
    metrics: Arc<Metrics>,
    leading: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
) {
    let Subscription {
        store: services,
        applied,
        mut deleted,
    } = services;
    let (pools, pools_writer) = reflector::store();
    let (namespaces, namespaces_writer) = reflector::store();
    let (requeue_tx, requeue_rx) = futures::channel::mpsc::unbounded();
    let ctx = Arc::new(Context::new(
        client.clone(),
        config,
        Caches {
            services: services.clone(),
            pools: pools.clone(),
            namespaces: namespaces.clone(),
        },
        leading.clone(),
        requeue_tx,
        metrics,
    ));

    let on_delete = ctx.clone();
    let _deletions = crate::AbortOnDrop(tokio::spawn(async move {
        while let Some(service) = deleted.recv().await {
            on_delete.forget(&service.service_name());
        }
    }));
    let pool_stream =
        crate::watch_all(&client, pools_writer, &ctx.metrics.health, "allocator").touched_objects();
    let namespace_stream =
        crate::watch_all(&client, namespaces_writer, &ctx.metrics.health, "allocator")
            .applied_objects();

    let on_namespace = services.clone();
    let became_leader = leadership_gained(leading.clone());
    // Dies with this future: an aborted controller must not leave a writer behind.
    let _background = crate::AbortOnDrop(tokio::spawn(write_pool_statuses(
        ctx.clone(),
        shutdown.clone(),
    )));
    let concurrency = ctx.config.concurrency;
    let health = ctx.metrics.health.clone();
    let results = crate::service_controller(
        applied,
        services.clone(),
        pools.clone(),
        pool_stream,
        concurrency,
    )
    .watches_stream(namespace_stream, move |ns: Namespace| {
        let name = ns.name_any();
        on_namespace
            .state()
            .iter()
            .filter(|s| s.namespace().as_deref() == Some(name.as_str()))
            .map(|s| ObjectRef::from_obj(&**s))
            .collect::<Vec<_>>()
    })
    .reconcile_all_on(became_leader)
    .reconcile_on(requeue_rx)
    .graceful_shutdown_on(crate::stopped(shutdown.clone()))
    .run(reconcile, error_policy, ctx);
    crate::drive("allocator", results, &health).await;
}

/// A stream that yields each time this replica becomes leader.
fn leadership_gained(leading: watch::Receiver<bool>) -> impl futures::Stream<Item = ()> + Send {
    futures::stream::unfold(leading, |mut rx| async move {
        loop {
            rx.changed().await.ok()?;
            if *rx.borrow_and_update() {
                return Some(((), rx));
            }
        }
    })
}

async fn reconcile(cached: Arc<CachedService>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = cached.service_name();
    let _timer = ctx.metrics.reconcile_timer("allocator");
    if !*ctx.leading.borrow() {
        ctx.drop_state();
        return Ok(Action::await_change());
    }
    let span = info_span!("allocate", service = %name);
    async {
        debug!("reconciling");
        ctx.ensure_state().await?;
        debug!("state ready");
        let service = cached.to_service();
        let decision = ctx.decide(&service)?;
        ctx.apply(&service, &name, decision).await
    }
    .instrument(span)
    .await
}

fn error_policy(service: Arc<CachedService>, error: &Error, ctx: Arc<Context>) -> Action {
    if matches!(error, Error::NotLeading | Error::Stopped) {
        debug!(service = %service.service_name(), %error, "not acting");
        return Action::await_change();
    }
    warn!(service = %service.service_name(), %error, "allocation failed; retrying");
    ctx.metrics.reconcile_error("allocator", error.kind());
    Action::requeue(Duration::from_secs(5))
}

impl Context {
    fn drop_state(&self) {
        if let Ok(mut state) = self.state.lock() {
            *state = None;
        }
    }

    /// Builds the allocator when leadership is new, from a fresh list of Services. (A pool
    /// change rebuilds it inside [`decide`](Self::decide), under the same lock as every
    /// decision, so no decision can be made on an allocator about to be replaced.)
    async fn ensure_state(&self) -> Result<(), Error> {
        // Deciding with a half-filled cache would fail Services whose pool is not read yet,
        // and a failure clears a status: wait for every cache first. One task waits for the
        // stores, the others for it.
        self.caches_ready
            .get_or_try_init(|| async {
                crate::filled(&self.pools).await?;
                crate::filled(&self.namespaces).await?;
                crate::filled(&self.services).await
            })
            .await
            .map_err(|_| Error::Stopped)?;
        if self.state.lock().map_err(|_| Error::Poisoned)?.is_some() {
            return Ok(());
        }
        let _rebuilding = self.rebuilding.lock().await;
        if self.state.lock().map_err(|_| Error::Poisoned)?.is_some() {
            return Ok(());
        }
        // A new leader reads the API, not its cache: the old leader's last writes may not
        // have reached the cache yet, and missing one would hand an address out twice.
        let claims = self.listed_claims().await?;
        let state = State::restored(self.current_pools(), &claims);
        *self.state.lock().map_err(|_| Error::Poisoned)? = Some(state);
        self.pools_changed.notify_one();
        Ok(())
    }

    /// Every IPPool as this allocator uses it (its own, frozen when invalid; other classes'
    /// only to fence their addresses off), by name.
    fn current_pools(&self) -> Vec<PoolSpec> {
        let mut pools: Vec<PoolSpec> = self
            .pools
            .state()
            .iter()
            .map(|p| translate::pool_for(p, &self.config.classes).0)
            .collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        pools
    }

    /// Rebuilds `state` for changed pools from the cache's Services, each holding what the
    /// old allocator gave it (which may be newer than the cache): only what left every pool
    /// of ours is released.
    fn rebuild(&self, state: &mut State, pools: Vec<PoolSpec>) {
        let mut memo = NamespaceLabels::new();
        let claims: Vec<ServiceClaim> = self
            .services
            .state()
            .iter()
            .filter_map(|s| self.claim_if_ours(&s.to_service(), &mut memo))
            .collect();
        let writing = self.writing.lock().map(|w| w.clone()).unwrap_or_default();
        let (allocator, problems) = state.allocator.rebuilt(pools.clone(), &claims, &writing);
        *state = State::logged(pools, allocator, &problems);
        self.pools_changed.notify_one();
    }

    /// The claims of every Service of ours, listed from the API a page at a time: a whole list
    /// at once, managed fields and all, was seen to take ten times the cache's memory for a
    /// moment, and the heap kept it.
    async fn listed_claims(&self) -> Result<Vec<ServiceClaim>, Error> {
        let api = Api::<Service>::all(self.client.clone());
        let mut params = ListParams::default().limit(crate::LIST_PAGE);
        let mut claims = Vec::new();
        let mut memo = NamespaceLabels::new();
        loop {
            let page = api.list(&params).await.map_err(Error::Rebuild)?;
            claims.extend(
                page.items
                    .iter()
                    .filter_map(|s| self.claim_if_ours(s, &mut memo)),
            );
            match page.metadata.continue_.as_deref() {
                Some(token) if !token.is_empty() => params = params.continue_token(token),
                _ => return Ok(claims),
            }
        }
    }

    /// The claim of `service` if it is ours and not being deleted.
    fn claim_if_ours(&self, service: &Service, memo: &mut NamespaceLabels) -> Option<ServiceClaim> {
        (self.config.classes.serves(service) && service.metadata.deletion_timestamp.is_none())
            .then(|| self.claim(service, memo))
    }

    fn claim(&self, service: &Service, memo: &mut NamespaceLabels) -> ServiceClaim {
        let namespace = service.namespace().unwrap_or_default();
        let labels = match memo.get(&namespace) {
            Some(labels) => labels.clone(),
            None => {
                let labels = Arc::new(
                    self.namespaces
                        .get(&ObjectRef::new(&namespace))
                        .and_then(|ns| ns.metadata.labels.clone())
                        .unwrap_or_default(),
                );
                memo.insert(namespace, labels.clone());
                labels
            }
        };
        translate::claim(service, &labels)
    }

    fn decide(&self, service: &Service) -> Result<Decision, Error> {
        let name = translate::service_name(service);
        let mut guard = self.state.lock().map_err(|_| Error::Poisoned)?;
        // ensure_state just built it: only a lost lease drops it.
        let Some(state) = guard.as_mut() else {
            return Err(Error::NotLeading);
        };
        let pools = self.current_pools();
        if state.pools != pools {
            self.rebuild(state, pools);
        }
        // A Service deleted while this reconcile ran must not keep what it is given now: the
        // cache drops it before the delete event releases it, and both happen under this lock.
        let gone = self
            .services
            .get(&CachedService::reference(&name))
            .is_none();
        let ours = self.config.classes.serves(service)
            && service.metadata.deletion_timestamp.is_none()
            && !gone;
        let before = state.allocator.assignment(&name).cloned();
        let decision = if !ours {
            state.allocator.release(&name);
            Decision::NotOurs
        } else {
            match state
                .allocator
                .assign_explained(&self.claim(service, &mut NamespaceLabels::new()))
            {
                (Ok(a), released) => Decision::Assigned(a, released),
                (Err(e), released) => Decision::Failed(e, released),
            }
        };
        let changed = state.allocator.assignment(&name) != before.as_ref();
        // Both under the state lock, so that a rebuild or a release in between sees them.
        if let Decision::Assigned(assignment, _) = &decision
            && assignment.addresses != translate::ingress_addresses(service)
            && let Ok(mut writing) = self.writing.lock()
        {
            writing.insert(name.clone(), assignment.addresses.clone());
        }
        if let Ok(mut pending) = self.pending.lock() {
            if matches!(decision, Decision::Failed(..)) {
                pending.insert(name.clone());
            } else {
                pending.remove(&name);
            }
            self.metrics.services_pending.set(pending.len() as i64);
        }
        drop(guard);
        // Only a change of what is held moves the pool's counts or frees space.
        if changed {
            self.pools_changed.notify_one();
            if before.is_some() {
                self.retry_pending();
            }
        }
        Ok(decision)
    }

    /// Releases what Services no longer in the cache hold: a delete event can be missed while
    /// a watch restarts.
    fn release_vanished(&self) {
        let Ok(mut guard) = self.state.lock() else {
            return;
        };
        let Some(state) = guard.as_mut() else {
            return;
        };
        let vanished: Vec<ServiceName> = state
            .allocator
            .services()
            .into_iter()
            .filter(|name| self.services.get(&CachedService::reference(name)).is_none())
            .collect();
        let freed = !vanished.is_empty();
        for name in vanished {
            info!(service = %name, "released the addresses of a Service that is gone");
            state.allocator.release(&name);
            if let Ok(mut writing) = self.writing.lock() {
                writing.remove(&name);
            }
        }
        drop(guard);
        if freed {
            self.retry_pending();
        }
    }

    /// Forgets a deleted Service's addresses (its status write in flight, if any, fails).
    fn forget(&self, name: &ServiceName) {
        if let Ok(mut guard) = self.state.lock() {
            if let Ok(mut writing) = self.writing.lock() {
                writing.remove(name);
            }
            if let Ok(mut pending) = self.pending.lock() {
                pending.remove(name);
                self.metrics.services_pending.set(pending.len() as i64);
            }
            if let Some(state) = guard.as_mut()
                && state.allocator.release(name).is_some()
            {
                drop(guard);
                debug!(service = %name, "released the addresses of a deleted Service");
                self.pools_changed.notify_one();
                self.retry_pending();
            }
        }
    }

    /// Tells the allocator that `name`'s status now records `written`.
    fn settle(&self, name: &ServiceName, written: &[IpAddr]) {
        let freed = self
            .state
            .lock()
            .ok()
            .and_then(|mut guard| {
                if let Ok(mut writing) = self.writing.lock() {
                    writing.remove(name);
                }
                guard.as_mut().map(|s| s.allocator.settle(name, written))
            })
            .unwrap_or(false);
        if freed {
            self.pools_changed.notify_one();
            self.retry_pending();
        }
    }

    /// Requeues every Service waiting for an address: one may have come free.
    fn retry_pending(&self) {
        let Ok(pending) = self.pending.lock() else {
            return;
        };
        for name in pending.iter() {
            let _ = self.requeue.unbounded_send(CachedService::reference(name));
        }
    }

    /// Makes the API match the decision: status, annotation, Event.
    async fn apply(
        &self,
        service: &Service,
        name: &ServiceName,
        decision: Decision,
    ) -> Result<Action, Error> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), &name.namespace);
        let recorded = translate::ingress_ips(service);
        let annotated = service.annotations().get(ANNOTATION_ASSIGNED_POOL).cloned();
        match &decision {
            Decision::Assigned(_, Some(released)) | Decision::Failed(_, Some(released))
                if !released.asked_for() =>
            {
                warn!(%released, "recorded addresses released");
                self.event(
                    service,
                    EventType::Warning,
                    "AddressReleased",
                    format!("{released}; it gets another address if one is free"),
                )
                .await;
            }
            _ => {}
        }
        match decision {
            Decision::Assigned(assignment, _) => {
                let wanted: Vec<String> = assignment
                    .addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                if recorded != wanted {
                    self.ensure_leading()?;
                    let ingress: Vec<_> = wanted
                        .iter()
                        .map(|ip| json!({"ip": ip, "ipMode": "VIP"}))
                        .collect();
                    let patch = json!({"status": {"loadBalancer": {"ingress": ingress}}});
                    api.patch_status(
                        &name.name,
                        &PatchParams::apply(MANAGER),
                        &Patch::Merge(&patch),
                    )
                    .await
                    .map_err(|source| Error::WriteStatus {
                        service: name.clone(),
                        source,
                    })?;
                    info!(addresses = %wanted.join(","), pool = %assignment.pool, "assigned");
                    self.event(
                        service,
                        EventType::Normal,
                        "IPAllocated",
                        format!(
                            "Assigned {} from pool {}",
                            wanted.join(", "),
                            assignment.pool
                        ),
                    )
                    .await;
                }
                // The status records exactly what is held now: what it gave up may go to others.
                self.settle(name, &assignment.addresses);
                if annotated.as_deref() != Some(assignment.pool.as_str()) {
                    self.ensure_leading()?;
                    let patch = json!({"metadata": {"annotations": {ANNOTATION_ASSIGNED_POOL: assignment.pool}}});
                    api.patch(
                        &name.name,
                        &PatchParams::apply(MANAGER),
                        &Patch::Merge(&patch),
                    )
                    .await
                    .map_err(|source| Error::Annotate {
                        service: name.clone(),
                        source,
                    })?;
                }
                Ok(Action::await_change())
            }
            Decision::Failed(reason, _) => {
                if annotated.is_some() && !recorded.is_empty() {
                    self.clear(&api, name).await?;
                }
                // A status that another wrote stays, and keeps its addresses from others.
                if annotated.is_some() || recorded.is_empty() {
                    self.settle(name, &[]);
                } else {
                    self.settle(name, &translate::ingress_addresses(service));
                }
                warn!(%reason, "no addresses");
                self.event(
                    service,
                    EventType::Warning,
                    "AllocationFailed",
                    reason.to_string(),
                )
                .await;
                // Pools and Services that could free space requeue it; the timer is a backstop.
                Ok(Action::requeue(Duration::from_secs(300)))
            }
            Decision::NotOurs => {
                // A Service of another class may carry the annotation of another ipvslb
                // serving that class: only a Service that stopped being a LoadBalancer is ours
                // to clear. (The class of an existing LoadBalancer Service cannot change.)
                let load_balancer =
                    service.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer");
                if annotated.is_some()
                    && !load_balancer
                    && service.metadata.deletion_timestamp.is_none()
                {
                    self.clear(&api, name).await?;
                    info!("released: no longer a LoadBalancer Service");
                }
                Ok(Action::await_change())
            }
        }
    }

    /// Removes the status and annotation this allocator wrote.
    async fn clear(&self, api: &Api<Service>, name: &ServiceName) -> Result<(), Error> {
        self.ensure_leading()?;
        let status = json!({"status": {"loadBalancer": {"ingress": null}}});
        api.patch_status(
            &name.name,
            &PatchParams::apply(MANAGER),
            &Patch::Merge(&status),
        )
        .await
        .map_err(|source| Error::WriteStatus {
            service: name.clone(),
            source,
        })?;
        let annotation = json!({"metadata": {"annotations": {ANNOTATION_ASSIGNED_POOL: null}}});
        api.patch(
            &name.name,
            &PatchParams::apply(MANAGER),
            &Patch::Merge(&annotation),
        )
        .await
        .map_err(|source| Error::Annotate {
            service: name.clone(),
            source,
        })?;
        Ok(())
    }

    /// A replica that lost the lease must not write: checked right before each write.
    fn ensure_leading(&self) -> Result<(), Error> {
        if *self.leading.borrow() {
            Ok(())
        } else {
            self.drop_state();
            Err(Error::NotLeading)
        }
    }

    async fn event(
        &self,
        object: &impl Resource<DynamicType = ()>,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Allocate".to_owned(),
            secondary: None,
        };
        // kube's recorder keeps each Event it sent for six minutes, to count repeats into a
        // series. Warnings repeat (a refused Service is retried); an assignment's Normal Event
        // does not, and caching one per Service was a fifth of the memory after a burst.
        let published = match type_ {
            EventType::Warning => self.warnings.publish(&event, &object.object_ref(&())).await,
            EventType::Normal => {
                Recorder::new(self.client.clone(), Reporter::from(MANAGER))
                    .publish(&event, &object.object_ref(&()))
                    .await
            }
        };
        if let Err(e) = published {
            warn!(error = %e, reason, "could not publish an event");
        }
    }
}

/// Keeps the status of every IPPool of this class and the pool metrics current, at most twice
/// a second; every `status_resync` it also collects Services whose deletion was missed.
async fn write_pool_statuses(ctx: Arc<Context>, mut shutdown: watch::Receiver<bool>) {
    let heartbeat = ctx
        .metrics
        .health
        .heartbeat("pool status writer", Duration::from_secs(120));
    loop {
        heartbeat.beat();
        tokio::select! {
            _ = ctx.pools_changed.notified() => {}
            _ = tokio::time::sleep(ctx.config.status_resync) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        if !*ctx.leading.borrow() {
            continue;
        }
        ctx.release_vanished();
        for pool in ctx.pools.state() {
            if !ctx.config.classes.uses_pool(&pool) {
                continue;
            }
            match write_pool_status(&ctx, &pool).await {
                Ok(()) => {}
                // Someone wrote the pool since the cache saw it: the watch brings the new
                // version, and the next round writes over it.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    debug!(pool = %pool.name_any(), "pool changed while its status was written; again next round");
                    ctx.pools_changed.notify_one();
                }
                Err(e) => {
                    warn!(pool = %pool.name_any(), error = %e, "could not write the pool status")
                }
            }
        }
    }
}

/// Writes the pool's status when it differs from the computed one. The status is replaced
/// whole: a merge patch would keep every allocation that was ever listed.
async fn write_pool_status(ctx: &Context, pool: &IPPool) -> Result<(), kube::Error> {
    let name = pool.name_any();
    let previous = pool.status.clone().unwrap_or_default();
    let Some(status) = ctx.pool_status(pool, &previous) else {
        return Ok(()); // no allocator yet (not leading, or rebuilding)
    };
    if previous == status || !*ctx.leading.borrow() {
        return Ok(());
    }
    let api: Api<IPPool> = Api::all(ctx.client.clone());
    // The cached copy carries the resourceVersion it was read at, so a pool changed since is
    // a conflict rather than a lost write; the status subresource ignores everything else.
    let mut written = pool.clone();
    written.status = Some(status.clone());
    api.replace_status(&name, &PostParams::default(), &written)
        .await?;
    ctx.metrics.pool_status_writes.inc();
    for (kind, reason) in [("Invalid", "Invalid"), ("Overlapping", "Overlap")] {
        let now = status
            .conditions
            .iter()
            .find(|c| c.type_ == kind && c.status == "True");
        let before = previous
            .conditions
            .iter()
            .any(|c| c.type_ == kind && c.status == "True");
        if let (Some(condition), false) = (now, before) {
            ctx.event(pool, EventType::Warning, reason, condition.message.clone())
                .await;
        }
    }
    Ok(())
}

impl Context {
    /// The status `pool` should have, and the pool metrics on the way.
    fn pool_status(&self, pool: &IPPool, previous: &IPPoolStatus) -> Option<IPPoolStatus> {
        let name = pool.name_any();
        let mut guard = self.state.lock().ok()?;
        let state = guard.as_mut()?;
        // The pools changed since a Service's decision last rebuilt the allocator (and none
        // may be decided soon: a pool change requeues the Services, but the writer may come
        // first): a status computed from the older pools would stamp this pool's generation
        // on problems found without it, such as "overlaps nothing" for a pool just added.
        let pools = self.current_pools();
        if state.pools != pools {
            self.rebuild(state, pools);
        }
        let allocator = &state.allocator;
        let mut invalid: Vec<String> = translate::pool(pool)
            .err()
            .iter()
            .map(ToString::to_string)
            .collect();
        let mut overlapping = Vec::new();
        for problem in allocator.problems().iter().filter(|p| p.concerns(&name)) {
            if problem.is_invalid() {
                invalid.push(problem.to_string());
            } else {
                overlapping.push(problem.to_string());
            }
        }
        let mut status = IPPoolStatus::default();
        if let Some(usage) = allocator.usage(&name) {
            status.assigned_ipv4 = usage.assigned_v4;
            status.assigned_ipv6 = usage.assigned_v6;
            status.assigned = usage.assigned_v4 + usage.assigned_v6;
            status.available_ipv4 = u64::try_from(usage.available_v4).unwrap_or(u64::MAX);
            status.available_ipv6 = usage.available_v6.to_string();
            status.available = usage
                .available_v4
                .saturating_add(usage.available_v6)
                .to_string();
            status.non_matching_holders = usage.non_matching;
            self.record_pool_metrics(&name, &usage);
        }
        if let Some((held, truncated)) = allocator.allocations(&name, MAX_STATUS_ALLOCATIONS) {
            status.allocations = held
                .into_iter()
                .map(|(addr, holders)| {
                    (
                        addr.to_string(),
                        holders
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                    )
                })
                .collect();
            status.allocations_truncated = truncated;
        }
        drop(guard);
        let (invalid, overlapping) = (invalid.join("; "), overlapping.join("; "));
        let ready = invalid.is_empty() && overlapping.is_empty();
        let generation = pool.metadata.generation;
        status.conditions = vec![
            condition(
                previous,
                generation,
                "Ready",
                ready,
                if ready {
                    "Serving"
                } else if invalid.is_empty() {
                    "Overlapping"
                } else {
                    "Invalid"
                },
                if invalid.is_empty() {
                    &overlapping
                } else {
                    &invalid
                },
            ),
            condition(
                previous,
                generation,
                "Overlapping",
                !overlapping.is_empty(),
                if overlapping.is_empty() {
                    "NoOverlap"
                } else {
                    "Overlap"
                },
                &overlapping,
            ),
            condition(
                previous,
                generation,
                "Invalid",
                !invalid.is_empty(),
                if invalid.is_empty() {
                    "Valid"
                } else {
                    "Invalid"
                },
                &invalid,
            ),
        ];
        Some(status)
    }

    fn record_pool_metrics(&self, pool: &str, usage: &ipvslb_core::alloc::PoolUsage) {
        for (family, assigned, available) in [
            (IpFamily::V4, usage.assigned_v4, usage.available_v4),
            (IpFamily::V6, usage.assigned_v6, usage.available_v6),
        ] {
            let labels = |state: &str| {
                vec![
                    ("pool", pool.to_owned()),
                    ("family", family.to_string()),
                    ("state", state.to_owned()),
                ]
            };
            // A gauge is a float: beyond 2^53 it is approximate, which a dashboard can bear.
            self.metrics
                .pool_addresses
                .get_or_create(&labels("assigned"))
                .set(assigned as f64);
            self.metrics
                .pool_addresses
                .get_or_create(&labels("available"))
                .set(available as f64);
        }
        let assigned = i64::try_from(usage.assigned_v4 + usage.assigned_v6).unwrap_or(i64::MAX);
        self.metrics
            .assignments
            .get_or_create(&vec![("pool", pool.to_owned())])
            .set(assigned);
    }
}

/// A condition that keeps its transition time while its status stays the same.
fn condition(
    previous: &IPPoolStatus,
    generation: Option<i64>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let last = previous
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: last.unwrap_or_else(|| Time(Timestamp::now())),
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, created: &str, addresses: &str) -> IPPool {
        serde_json::from_value(json!({
            "apiVersion": "ipvslb.io/v1alpha1",
            "kind": "IPPool",
            "metadata": {"name": name, "generation": 1, "creationTimestamp": created},
            "spec": {"loadBalancerClass": "test.ipvslb.io/unit", "addresses": [addresses]},
        }))
        .unwrap()
    }

    /// A Context whose pool cache holds `pools`, with no Service and no API server behind it
    /// (the client is never used here).
    fn context(pools: &[IPPool]) -> Context {
        let (store, mut writer) = reflector::store();
        for pool in pools {
            writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(pool.clone()));
        }
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        Context::new(
            Client::try_from(config).unwrap(),
            Config {
                classes: ClassPolicy {
                    class: "test.ipvslb.io/unit".to_owned(),
                    unclassed: translate::Unclassed::Ignore,
                },
                concurrency: 1,
                status_resync: Duration::from_secs(60),
            },
            Caches {
                services: reflector::store().0,
                pools: store,
                namespaces: reflector::store().0,
            },
            watch::channel(true).1,
            futures::channel::mpsc::unbounded().0,
            Arc::new(Metrics::new()),
        )
    }

    #[tokio::test]
    async fn a_pool_added_after_the_last_decision_is_reported_with_what_it_overlaps() {
        let old = pool("quiet", "2026-01-01T00:00:00Z", "10.252.12.0/29");
        let stray = pool("a-stray", "2026-01-02T00:00:00Z", "10.252.12.4/30");
        let ctx = context(&[old.clone(), stray.clone()]);
        // The allocator as the last Service's decision left it: before the stray pool came.
        *ctx.state.lock().unwrap() = Some(State::restored(
            vec![translate::pool_for(&old, &ctx.config.classes).0],
            &[],
        ));
        // No Service is decided meanwhile; the status writer's round comes first.
        let status = ctx
            .pool_status(&stray, &IPPoolStatus::default())
            .expect("a status while leading with an allocator");
        let overlapping = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Overlapping")
            .expect("an Overlapping condition");
        assert_eq!(overlapping.status, "True", "{status:?}");
        assert!(overlapping.message.contains("quiet"), "{status:?}");
        assert_eq!(overlapping.observed_generation, Some(1));
    }
}
