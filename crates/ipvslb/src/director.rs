//! The director controller: keeps this host's IPVS table and VIP addresses equal to the plan
//! for every Service with an assigned VIP.
//!
//! A change to one Service converges that Service's entries only. Changes to pools, NodeSets
//! and Nodes requeue the Services they may affect; EndpointSlices requeue their Service. A full
//! pass at start and every `resync` collects owned entries no Service claims (deleted while the
//! director was down) and repairs drift (someone ran `ipvsadm -C`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipvslb_api::{IPPool, LABEL_SERVICE_NAME, NodeSet};
use ipvslb_core::{NodeInfo, NodeSetSpec, PlannedService, PoolSpec, ServiceName};
use ipvslb_ipvs::{ServiceKey, Table};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::cached::CachedService;
use crate::converge::{Converger, Owned, Report};
use crate::dataplane::{self, Dataplane};
use crate::metrics::Metrics;
use crate::shared::Subscription;
use crate::translate::{self, ClassPolicy};

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
    /// The blocking task running the data plane died.
    #[error("the data-plane task failed: {0}")]
    Join(String),
}

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
}

/// What reconciles share.
pub struct Context<D> {
    config: Config,
    converger: Arc<Converger<D>>,
    services: Store<CachedService>,
    pools: Store<IPPool>,
    node_sets: Store<NodeSet>,
    nodes: Store<Node>,
    slices: Store<EndpointSlice>,
    metrics: Arc<Metrics>,
}

/// Everything the planner needs, translated from the caches.
struct View {
    pools: Vec<PoolSpec>,
    node_sets: Vec<NodeSetSpec>,
    nodes: Vec<NodeInfo>,
    owned: Owned,
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
    let ctx = Arc::new(Context {
        converger: Arc::new(Converger::new(dataplane, config.drain_grace)),
        config,
        services: services.clone(),
        pools: pools.clone(),
        node_sets: node_sets.clone(),
        nodes: nodes.clone(),
        slices: slices.clone(),
        metrics,
    });

    let on_delete = ctx.clone();
    let _deletions = crate::AbortOnDrop(tokio::spawn(async move {
        while let Some(service) = deleted.recv().await {
            let name = service.service_name();
            let owned = on_delete.view().owned;
            if let Err(e) = on_delete.converge(&name, Table::new(), owned).await {
                warn!(service = %name, error = %e, "removing a deleted Service's entries failed; the full pass will retry");
            }
        }
    }));
    let on_node = services.clone();
    let pool_stream =
        crate::watch_all(&client, pools_writer, &ctx.metrics.health).touched_objects();
    let set_stream =
        crate::watch_all(&client, node_sets_writer, &ctx.metrics.health).touched_objects();
    let node_stream = crate::watch_stream(
        &client,
        watcher::Config::default(),
        translate::trim_node,
        &ctx.metrics.health,
    )
    .reflect(nodes_writer)
    .touched_objects()
    .predicate_filter(node_relevance, Default::default());
    let slice_stream = crate::watch_stream(
        &client,
        watcher::Config::default().labels(LABEL_SERVICE_NAME),
        |_: &mut EndpointSlice| {},
        &ctx.metrics.health,
    )
    .reflect(slices_writer)
    .touched_objects();

    // Dies with this future: an aborted controller must not leave a writer behind.
    let _background = crate::AbortOnDrop(tokio::spawn(full_passes(ctx.clone(), shutdown.clone())));
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
    .watches_stream(node_stream, move |_: Node| crate::all_services(&on_node))
    .watches_stream(slice_stream, |slice: EndpointSlice| {
        let namespace = slice.namespace().unwrap_or_default();
        slice
            .labels()
            .get(LABEL_SERVICE_NAME)
            .map(|name| ObjectRef::new(name).within(&namespace))
    })
    .graceful_shutdown_on(crate::stopped(shutdown.clone()))
    .run(reconcile, error_policy, ctx);
    crate::drive("director", results, &health).await;
}

/// Only what the planner reads of a Node: its labels, readiness, addresses, cordon. Kubelets
/// update their Node every few seconds; the rest must not requeue every Service.
fn node_relevance(node: &Node) -> Option<u64> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let info = translate::node(node);
    let mut h = DefaultHasher::new();
    (info.labels, info.ready, info.unschedulable, info.addresses).hash(&mut h);
    Some(h.finish())
}

async fn reconcile<D: Dataplane>(
    cached: Arc<CachedService>,
    ctx: Arc<Context<D>>,
) -> Result<Action, Error> {
    let name = cached.service_name();
    let _timer = ctx.metrics.reconcile_timer("director");
    let span = info_span!("direct", service = %name);
    async {
        let view = ctx.view();
        let desired = ctx.desired_for(&cached.to_service(), &view);
        let report = ctx.converge(&name, desired, view.owned).await?;
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
    let caches = async {
        crate::filled(&ctx.pools).await?;
        crate::filled(&ctx.node_sets).await?;
        crate::filled(&ctx.nodes).await?;
        crate::filled(&ctx.slices).await?;
        crate::filled(&ctx.services).await
    };
    if caches.await.is_err() {
        return;
    }
    // A pass that takes longer than a resync and a minute more is stuck, not slow.
    let heartbeat = health.heartbeat(
        "director full pass",
        ctx.config.resync * 2 + Duration::from_secs(60),
    );
    loop {
        heartbeat.beat();
        match ctx.full_pass().await {
            Ok(report) => {
                info!(ops = ?report.ops, added = report.addresses_added, removed = report.addresses_removed, "full pass done");
                health.met("director first pass");
            }
            Err(e) => warn!(error = %e, "full pass failed; retrying at the next resync"),
        }
        tokio::select! {
            _ = tokio::time::sleep(ctx.config.resync) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

impl<D: Dataplane> Context<D> {
    fn view(&self) -> View {
        let pools: Vec<PoolSpec> = self
            .pools
            .state()
            .iter()
            .filter_map(|p| translate::pool(p).ok())
            .collect();
        let node_sets = self
            .node_sets
            .state()
            .iter()
            .filter_map(|s| {
                translate::node_set(s)
                    .map_err(|e| debug!(error = %e, "skipping an invalid NodeSet"))
                    .ok()
            })
            .collect();
        let nodes = self
            .nodes
            .state()
            .iter()
            .map(|n| translate::node(n))
            .collect();
        let owned = Owned::new(
            pools
                .iter()
                .flat_map(|p| p.ranges.iter().copied())
                .collect(),
        );
        View {
            pools,
            node_sets,
            nodes,
            owned,
        }
    }

    /// The Service as the planner sees it, if it is ours and has VIPs inside a pool.
    fn planned(
        &self,
        service: &Service,
        view: &View,
        endpoints: BTreeMap<String, u32>,
    ) -> Option<PlannedService> {
        if !self.config.classes.serves(service) || service.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let addresses = translate::ingress_addresses(service);
        let pool = view.pools.iter().find(|p| {
            addresses
                .first()
                .is_some_and(|a| p.ranges.iter().any(|r| r.contains(a)))
        })?;
        translate::planned_service(service, addresses, pool.name.clone(), endpoints)
            .map_err(|e| warn!(error = %e, "not planned"))
            .ok()
    }

    fn desired_for(&self, service: &Service, view: &View) -> Table {
        let name = translate::service_name(service);
        let endpoints = translate::ready_endpoints(
            self.slices
                .state()
                .iter()
                .filter(|s| {
                    s.namespace().as_deref() == Some(name.namespace.as_str())
                        && s.labels().get(LABEL_SERVICE_NAME) == Some(&name.name)
                })
                .map(|s| &**s),
        )
        .remove(&name)
        .unwrap_or_default();
        match self.planned(service, view, endpoints) {
            Some(planned) => {
                ipvslb_core::plan::plan(&[planned], &view.pools, &view.node_sets, &view.nodes).table
            }
            None => Table::new(),
        }
    }

    async fn converge(
        &self,
        name: &ServiceName,
        desired: Table,
        owned: Owned,
    ) -> Result<Report, Error> {
        let converger = self.converger.clone();
        let service = name.clone();
        let report = tokio::task::spawn_blocking(move || {
            converger.converge_service(&service, &desired, &owned, Instant::now())
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
        let view = self.view();
        let mut endpoints = translate::ready_endpoints(self.slices.state().iter().map(|s| &**s));
        let planned: Vec<PlannedService> = self
            .services
            .state()
            .iter()
            .filter_map(|s| {
                self.planned(
                    &s.to_service(),
                    &view,
                    endpoints.remove(&s.service_name()).unwrap_or_default(),
                )
            })
            .collect();
        let plan = ipvslb_core::plan::plan(&planned, &view.pools, &view.node_sets, &view.nodes);
        for problem in &plan.problems {
            debug!(service = %problem.service, error = %problem.error, "planned in part");
        }
        // The owners come in key order, so each Service's keys come sorted.
        let mut by_service: BTreeMap<ServiceName, Vec<ServiceKey>> = BTreeMap::new();
        for (key, service) in &plan.owners {
            by_service.entry(service.clone()).or_default().push(*key);
        }
        let converger = self.converger.clone();
        let owned = view.owned;
        let table = plan.table;
        let report = tokio::task::spawn_blocking(move || {
            converger.converge_all(&table, by_service, &owned, Instant::now())
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
        Ok(report)
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
