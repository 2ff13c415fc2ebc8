//! What the director knows of the cluster, kept as objects change rather than rebuilt for each
//! reconcile: the pools, NodeSets and Nodes translated into one [`Topology`] once per change of
//! any of them, and the EndpointSlices found by their Service. With them one Service's
//! reconcile costs that Service, and a node's change reaches only the Services whose NodeSet
//! selects it (kube-proxy's IPVS mode paid for every Service on each, kubernetes#95881).
//!
//! The reflectors' stores stay the truth: the indexes only say where to look, and every full
//! pass rebuilds them from the stores, since a relist can drop an object without the watch
//! streams telling.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use ipvslb_api::{ANNOTATION_ALLOW_SHARED_IP, IPPool, LABEL_SERVICE_NAME, NodeSet};
use ipvslb_core::health::Target;
use ipvslb_core::plan::{Plan, Topology};
use ipvslb_core::{NodeInfo, PlannedService, PoolRole, ServiceName};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::runtime::reflector::store::WriterDropped;
use kube::runtime::reflector::{ObjectRef, Store};
use tracing::warn;

use crate::cached::CachedService;
use crate::converge::Owned;
use crate::director::{Part, part_of, pool_of};
use crate::translate::{self, ClassPolicy};

/// The stores the director reads, and what is derived from them.
pub struct Cluster {
    classes: ClassPolicy,
    services: Store<CachedService>,
    pools: Store<IPPool>,
    node_sets: Store<NodeSet>,
    nodes: Store<Node>,
    slices: Store<EndpointSlice>,
    state: Mutex<State>,
}

/// The stores a [`Cluster`] reads.
pub struct Stores {
    /// The Services.
    pub services: Store<CachedService>,
    /// The IPPools.
    pub pools: Store<IPPool>,
    /// The NodeSets.
    pub node_sets: Store<NodeSet>,
    /// The Nodes, trimmed ([`translate::trim_node`]).
    pub nodes: Store<Node>,
    /// The EndpointSlices that name their Service.
    pub slices: Store<EndpointSlice>,
}

#[derive(Default)]
struct State {
    /// Moves on with every change of a pool, NodeSet or Node.
    version: u64,
    /// The view made at a version.
    built: Option<(u64, Arc<View>)>,
    /// Each Node as last seen by [`Cluster::node_changed`]: what a change takes it from.
    nodes: BTreeMap<String, NodeInfo>,
    /// The names of each Service's EndpointSlices.
    slices: BTreeMap<ServiceName, BTreeSet<String>>,
}

/// What a reconcile of one Service plans.
#[derive(Debug)]
pub struct ServicePlan {
    /// The view it was planned from.
    pub view: Arc<View>,
    /// The Service as planned (`None`: not ours, or in no pool).
    pub claim: Option<PlannedService>,
    /// Its part of the plan.
    pub part: Part,
}

/// Everything the planner needs besides the Services, as of one version of the stores.
#[derive(Debug, Default)]
pub struct View {
    /// This installation's pools, the NodeSets and the Nodes.
    pub topology: Topology,
    /// What the director may touch: the pools' ranges.
    pub owned: Owned,
}

impl Cluster {
    /// The view of `stores`, for the Services of `classes`.
    pub fn new(classes: ClassPolicy, stores: Stores) -> Self {
        Self {
            classes,
            services: stores.services,
            pools: stores.pools,
            node_sets: stores.node_sets,
            nodes: stores.nodes,
            slices: stores.slices,
            state: Mutex::default(),
        }
    }

    /// Waits until every store has been filled once.
    pub async fn filled(&self) -> Result<(), WriterDropped> {
        crate::filled(&self.pools).await?;
        crate::filled(&self.node_sets).await?;
        crate::filled(&self.nodes).await?;
        crate::filled(&self.slices).await?;
        crate::filled(&self.services).await
    }

    /// The current view: made again only when a pool, NodeSet or Node changed since the last.
    pub fn view(&self) -> Arc<View> {
        let mut state = self.lock();
        if let Some((version, view)) = &state.built
            && *version == state.version
        {
            return view.clone();
        }
        // Made under the lock: a change that lands meanwhile moves the version on after this
        // read of the stores, so the next call makes the view again.
        let view = Arc::new(self.make_view());
        state.built = Some((state.version, view.clone()));
        view
    }

    /// A pool or a NodeSet changed (or may have: a relist). Call it after the store holds the
    /// change and before the Services it affects are requeued.
    pub fn changed(&self) {
        self.lock().version += 1;
    }

    /// `node` changed in the store (or went from it): the Services whose NodeSet selects it,
    /// before or after the change, are the ones whose destinations may change.
    pub fn node_changed(&self, node: &Node) -> Vec<ObjectRef<CachedService>> {
        let name = node.name_any();
        let now = self
            .nodes
            .get(&ObjectRef::from_obj(node))
            .map(|n| translate::node(&n));
        let before = {
            let mut state = self.lock();
            state.version += 1;
            match &now {
                Some(info) => state.nodes.insert(name, info.clone()),
                None => state.nodes.remove(&name),
            }
        };
        let view = self.view();
        let sets: BTreeSet<&str> = [&before, &now]
            .into_iter()
            .flatten()
            .flat_map(|n| view.topology.node_sets_selecting(&n.labels))
            .collect();
        self.services_of_node_sets(&view, &sets)
    }

    /// The Services whose pool sends their traffic to one of `sets`.
    fn services_of_node_sets(
        &self,
        view: &View,
        sets: &BTreeSet<&str>,
    ) -> Vec<ObjectRef<CachedService>> {
        if sets.is_empty() {
            return Vec::new();
        }
        let pools = view.topology.pools();
        self.services
            .state()
            .iter()
            .filter(|s| {
                pool_of(&s.ingress_addresses(), pools)
                    .is_some_and(|p| sets.contains(p.node_set.as_str()))
            })
            .map(|s| ObjectRef::from_obj(&**s))
            .collect()
    }

    /// `slice` changed in the store (or went from it): its Service, to requeue.
    pub fn slice_changed(&self, slice: &EndpointSlice) -> Option<ObjectRef<CachedService>> {
        let service = service_of(slice)?;
        let present = self.slices.get(&ObjectRef::from_obj(slice)).is_some();
        let mut state = self.lock();
        let names = state.slices.entry(service.clone()).or_default();
        if present {
            names.insert(slice.name_any());
        } else {
            names.remove(&slice.name_any());
            if names.is_empty() {
                state.slices.remove(&service);
            }
        }
        Some(CachedService::reference(&service))
    }

    /// Ready endpoints per node of the Service `name`, from its EndpointSlices in the store.
    pub fn endpoints_of(&self, name: &ServiceName) -> BTreeMap<String, u32> {
        let names = self.lock().slices.get(name).cloned().unwrap_or_default();
        let slices: Vec<Arc<EndpointSlice>> = names
            .iter()
            .filter_map(|slice| {
                self.slices
                    .get(&ObjectRef::new(slice).within(&name.namespace))
            })
            // The index may lag a relist; the store's labels are the truth.
            .filter(|s| service_of(s).as_ref() == Some(name))
            .collect();
        translate::ready_endpoints(slices.iter().map(|s| &**s))
            .remove(name)
            .unwrap_or_default()
    }

    /// Ready endpoints per node of every Service, and the indexes made again from the stores:
    /// what a full pass plans with.
    pub fn refresh(&self) -> BTreeMap<ServiceName, BTreeMap<String, u32>> {
        let slices = self.slices.state();
        let mut by_service: BTreeMap<ServiceName, BTreeSet<String>> = BTreeMap::new();
        for slice in &slices {
            if let Some(service) = service_of(slice) {
                by_service
                    .entry(service)
                    .or_default()
                    .insert(slice.name_any());
            }
        }
        let nodes = self
            .nodes
            .state()
            .iter()
            .map(|n| (n.name_any(), translate::node(n)))
            .collect();
        {
            let mut state = self.lock();
            state.slices = by_service;
            state.nodes = nodes;
            state.version += 1;
        }
        translate::ready_endpoints(slices.iter().map(|s| &**s))
    }

    /// What a reconcile of `service` plans: its part of the plan ([`part_of`], with the
    /// Services on its VIPs), leaving out the destinations whose check is `down`.
    pub fn plan_service(&self, service: &Service, down: &BTreeSet<Target>) -> ServicePlan {
        let view = self.view();
        let name = translate::service_name(service);
        let claim = self.planned(service, &view, self.endpoints_of(&name));
        let part = match &claim {
            Some(planned) => {
                let mut services = self.sharing_peers(service, &view);
                services.push(planned.clone());
                part_of(&name, &services, &view.topology, down)
            }
            None => Part::default(),
        };
        ServicePlan { view, claim, part }
    }

    /// What a full pass plans: every Service, over indexes made again from the stores.
    pub fn plan_all(&self, down: &BTreeSet<Target>) -> (Arc<View>, Plan) {
        let mut endpoints = self.refresh();
        let view = self.view();
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
        let plan = view.topology.plan(&planned, down);
        (view, plan)
    }

    /// The Service as the planner sees it, if it is ours and has VIPs inside a pool.
    pub fn planned(
        &self,
        service: &Service,
        view: &View,
        endpoints: BTreeMap<String, u32>,
    ) -> Option<PlannedService> {
        if !self.classes.serves(service) || service.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let addresses = translate::ingress_addresses(service);
        let pool = pool_of(&addresses, view.topology.pools())?;
        translate::planned_service(service, addresses, pool.name.clone(), endpoints)
            .map_err(|e| warn!(error = %e, "not planned"))
            .ok()
    }

    /// The other Services on `service`'s VIPs, as planned. Only Services that allow sharing
    /// can have any, so the others do not pay for a look at every Service.
    pub fn sharing_peers(&self, service: &Service, view: &View) -> Vec<PlannedService> {
        self.sharing(service)
            .iter()
            .filter_map(|s| self.planned(s, view, BTreeMap::new()))
            .collect()
    }

    /// The other Services on `service`'s VIPs, planned or not.
    pub fn sharing(&self, service: &Service) -> Vec<Service> {
        let shares = |s: &Service| {
            s.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(ANNOTATION_ALLOW_SHARED_IP))
        };
        if !shares(service) {
            return Vec::new();
        }
        let name = translate::service_name(service);
        let addresses = translate::ingress_addresses(service);
        self.services
            .state()
            .iter()
            .filter(|c| c.service_name() != name)
            .map(|c| c.to_service())
            .filter(|s| {
                shares(s)
                    && translate::ingress_addresses(s)
                        .iter()
                        .any(|a| addresses.contains(a))
            })
            .collect()
    }

    /// The Services.
    pub fn services(&self) -> &Store<CachedService> {
        &self.services
    }

    fn make_view(&self) -> View {
        // This installation's pools only: another class's addresses are never ours to touch.
        // An invalid pool still explains its holders' VIPs, which keep being served.
        let pools: Vec<_> = self
            .pools
            .state()
            .iter()
            .map(|p| translate::pool_for(p, &self.classes).0)
            .filter(|p| !matches!(p.role, PoolRole::Foreign(_)))
            .collect();
        let node_sets = self
            .node_sets
            .state()
            .iter()
            .filter_map(|s| {
                translate::node_set(s)
                    .map_err(|e| warn!(node_set = %s.name_any(), error = %e, "skipping an invalid NodeSet"))
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
            topology: Topology::new(pools, node_sets, nodes),
            owned,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is indexes and a cache, each written whole: one a panicking holder left
        // is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The Service an EndpointSlice names.
fn service_of(slice: &EndpointSlice) -> Option<ServiceName> {
    let name = slice.labels().get(LABEL_SERVICE_NAME)?;
    Some(ServiceName::new(
        slice.namespace().as_deref().unwrap_or("default"),
        name.as_str(),
    ))
}

#[cfg(test)]
mod tests {
    use kube::runtime::reflector::{self, store::Writer};
    use kube::runtime::watcher;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    use super::*;
    use crate::translate::Unclassed;

    fn object<K: DeserializeOwned>(value: serde_json::Value) -> K {
        serde_json::from_value(value).expect("a valid object")
    }

    fn pool(name: &str, range: &str, node_set: &str) -> IPPool {
        object(json!({
            "apiVersion": "ipvslb.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": name},
            "spec": {"addresses": [range], "nodeSet": node_set}
        }))
    }

    fn node_set(name: &str, zone: &str) -> NodeSet {
        object(json!({
            "apiVersion": "ipvslb.io/v1alpha1", "kind": "NodeSet",
            "metadata": {"name": name},
            "spec": {"nodeSelector": {"matchLabels": {"zone": zone}}, "forwarding": "DirectRouting"}
        }))
    }

    fn node(name: &str, zone: &str, address: &str, ready: bool) -> Node {
        object(json!({
            "metadata": {"name": name, "labels": {"zone": zone}},
            "status": {
                "addresses": [{"type": "InternalIP", "address": address}],
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
            }
        }))
    }

    fn service(name: &str, vip: &str) -> CachedService {
        let mut cached: CachedService = object(json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": vip}]}}
        }));
        cached.trim();
        cached
    }

    fn slice(name: &str, service: &str, nodes: &[&str]) -> EndpointSlice {
        let endpoints: Vec<_> = nodes
            .iter()
            .map(|n| json!({"addresses": ["10.32.0.1"], "nodeName": n}))
            .collect();
        object(json!({
            "metadata": {"name": name, "namespace": "default",
                         "labels": {LABEL_SERVICE_NAME: service}},
            "addressType": "IPv4",
            "endpoints": endpoints
        }))
    }

    fn apply<K>(writer: &mut Writer<K>, object: K)
    where
        K: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        writer.apply_watcher_event(&watcher::Event::Apply(object));
    }

    fn delete<K>(writer: &mut Writer<K>, object: K)
    where
        K: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        writer.apply_watcher_event(&watcher::Event::Delete(object));
    }

    /// Zone `a` has pool `pa` with Service `sa`, zone `b` pool `pb` with `sb`; nodes `n1` (a)
    /// and `n2` (b).
    struct Fixture {
        cluster: Cluster,
        nodes: Writer<Node>,
        slices: Writer<EndpointSlice>,
        pools: Writer<IPPool>,
    }

    fn fixture() -> Fixture {
        let (services, mut services_writer) = reflector::store();
        let (pools, mut pools_writer) = reflector::store();
        let (node_sets, mut node_sets_writer) = reflector::store();
        let (nodes, mut nodes_writer) = reflector::store();
        let (slices, slices_writer) = reflector::store();
        apply(&mut services_writer, service("sa", "10.240.0.1"));
        apply(&mut services_writer, service("sb", "10.240.1.1"));
        apply(&mut pools_writer, pool("pa", "10.240.0.0/24", "a"));
        apply(&mut pools_writer, pool("pb", "10.240.1.0/24", "b"));
        apply(&mut node_sets_writer, node_set("a", "a"));
        apply(&mut node_sets_writer, node_set("b", "b"));
        apply(&mut nodes_writer, node("n1", "a", "192.0.2.1", true));
        apply(&mut nodes_writer, node("n2", "b", "192.0.2.2", true));
        let classes = ClassPolicy {
            class: "ipvslb.io/ipvs".into(),
            unclassed: Unclassed::Serve,
        };
        let cluster = Cluster::new(
            classes,
            Stores {
                services,
                pools,
                node_sets,
                nodes,
                slices,
            },
        );
        cluster.refresh();
        Fixture {
            cluster,
            nodes: nodes_writer,
            slices: slices_writer,
            pools: pools_writer,
        }
    }

    fn names(refs: Vec<ObjectRef<CachedService>>) -> Vec<String> {
        let mut names: Vec<String> = refs.into_iter().map(|r| r.name).collect();
        names.sort();
        names
    }

    fn destinations(cluster: &Cluster, name: &str) -> usize {
        let cached = cluster
            .services()
            .get(&ObjectRef::new(name).within("default"))
            .expect("the Service is in the store");
        let plan = cluster.plan_service(&cached.to_service(), &BTreeSet::new());
        plan.part.table.destination_count()
    }

    #[test]
    fn a_node_change_requeues_only_the_services_whose_node_set_selects_it_before_or_after() {
        let mut f = fixture();
        apply(&mut f.nodes, node("n1", "a", "192.0.2.1", false));
        let n1 = f.nodes_state("n1");
        assert_eq!(names(f.cluster.node_changed(&n1)), ["sa"]);
        assert_eq!(destinations(&f.cluster, "sa"), 0);

        // Moved to zone b: it leaves a's Services and joins b's.
        apply(&mut f.nodes, node("n1", "b", "192.0.2.1", true));
        let n1 = f.nodes_state("n1");
        assert_eq!(names(f.cluster.node_changed(&n1)), ["sa", "sb"]);
        assert_eq!(destinations(&f.cluster, "sb"), 2);

        // Gone: what it belonged to last is what it leaves.
        delete(&mut f.nodes, n1.clone());
        assert_eq!(names(f.cluster.node_changed(&n1)), ["sb"]);
        assert_eq!(destinations(&f.cluster, "sb"), 1);
    }

    #[test]
    fn the_view_is_made_once_per_change_and_follows_the_store() {
        let mut f = fixture();
        let first = f.cluster.view();
        assert!(
            Arc::ptr_eq(&first, &f.cluster.view()),
            "made again without a change"
        );
        assert_eq!(destinations(&f.cluster, "sa"), 1);

        // The pool of `sa` now sends its traffic to NodeSet b.
        apply(&mut f.pools, pool("pa", "10.240.0.0/24", "b"));
        f.cluster.changed();
        assert!(!Arc::ptr_eq(&first, &f.cluster.view()));
        let node_set = f
            .cluster
            .view()
            .topology
            .pool("pa")
            .map(|p| p.node_set.clone());
        assert_eq!(node_set.as_deref(), Some("b"));
        assert_eq!(destinations(&f.cluster, "sa"), 1);
    }

    #[test]
    fn endpoints_come_from_the_services_own_slices_and_a_removed_slice_counts_no_more() {
        let mut f = fixture();
        let name = ServiceName::new("default", "sa");
        let mine = slice("sa-x", "sa", &["n1", "n1"]);
        apply(&mut f.slices, mine.clone());
        apply(&mut f.slices, slice("sb-x", "sb", &["n2"]));
        assert_eq!(
            names(f.cluster.slice_changed(&mine).into_iter().collect()),
            ["sa"]
        );
        assert_eq!(
            f.cluster.endpoints_of(&name),
            BTreeMap::from([("n1".into(), 2)])
        );

        // Dropped by a relist, which tells no stream: the store is the truth.
        delete(&mut f.slices, mine.clone());
        assert_eq!(f.cluster.endpoints_of(&name), BTreeMap::new());
        // Seen by the stream: the index forgets it too, and a full pass rebuilds the index.
        f.cluster.slice_changed(&mine);
        assert!(!f.cluster.lock().slices.contains_key(&name));
        apply(&mut f.slices, mine);
        let all = f.cluster.refresh();
        assert_eq!(all.get(&name), Some(&BTreeMap::from([("n1".into(), 2)])));
        assert_eq!(
            f.cluster.endpoints_of(&name),
            BTreeMap::from([("n1".into(), 2)])
        );
    }

    impl Fixture {
        fn nodes_state(&self, name: &str) -> Node {
            (*self
                .cluster
                .nodes
                .get(&ObjectRef::new(name))
                .expect("the node is in the store"))
            .clone()
        }
    }
}
