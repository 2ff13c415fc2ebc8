//! What the director knows of the cluster, kept as objects change rather than rebuilt for each
//! reconcile: the pools, NodeSets and Nodes translated into one [`Topology`] once per change of
//! any of them, and the EndpointSlices found by their Service. With them one Service's
//! reconcile costs that Service, and a node's change reaches only the Services whose NodeSet
//! selects it.
//!
//! The reflectors' stores stay the truth. Each watch hands this view its events once the
//! reflector applied them: a change moves the view's version on, and a relist's end (when its
//! objects reach the store at once) is compared whole with what was known. The indexes only
//! say where to look, and each full pass makes the view again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
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
use kube::runtime::watcher::Event;
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
    /// Every store has been filled once.
    filled: AtomicBool,
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
    /// Each Node as last seen by [`Cluster::node_event`]: what a change takes it from.
    nodes: BTreeMap<String, NodeInfo>,
    /// The names of each Service's EndpointSlices.
    slices: BTreeMap<ServiceName, BTreeSet<String>>,
    /// The Service of each indexed EndpointSlice, by namespace and name.
    slice_services: BTreeMap<(String, String), ServiceName>,
}

impl State {
    fn index(&mut self, id: (String, String), service: ServiceName) {
        self.slices
            .entry(service.clone())
            .or_default()
            .insert(id.1.clone());
        self.slice_services.insert(id, service);
    }

    /// Forgets the slice `id`; the Service it was indexed under.
    fn unindex(&mut self, id: &(String, String)) -> Option<ServiceName> {
        let service = self.slice_services.remove(id)?;
        if let Some(names) = self.slices.get_mut(&service) {
            names.remove(&id.1);
            if names.is_empty() {
                self.slices.remove(&service);
            }
        }
        Some(service)
    }
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
            filled: AtomicBool::new(false),
        }
    }

    /// Waits until every store has been filled once; at once after that (every reconcile
    /// asks).
    pub async fn filled(&self) -> Result<(), WriterDropped> {
        if self.filled.load(Ordering::Acquire) {
            return Ok(());
        }
        crate::filled(&self.pools).await?;
        crate::filled(&self.node_sets).await?;
        crate::filled(&self.nodes).await?;
        crate::filled(&self.slices).await?;
        crate::filled(&self.services).await?;
        self.filled.store(true, Ordering::Release);
        Ok(())
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

    /// An event of the pools' or the NodeSets' watch, once the reflector applied it: the view
    /// is made again. After a relist, every Service (what changed meanwhile was not seen one
    /// object at a time); a single change requeues through the spec filter of the watch.
    pub fn topology_event<K>(&self, event: &Event<K>) -> Vec<ObjectRef<CachedService>> {
        match event {
            Event::Apply(_) | Event::Delete(_) => {
                self.lock().version += 1;
                Vec::new()
            }
            Event::InitDone => {
                self.lock().version += 1;
                crate::all_services(&self.services)
            }
            // A relist's objects reach the store only at its end.
            Event::Init | Event::InitApply(_) => Vec::new(),
        }
    }

    /// An event of the Nodes' watch, once the reflector applied it: the Services whose NodeSet
    /// selects a node that changed, before or after the change, are the ones whose
    /// destinations may change. A change of nothing the planner reads (a kubelet's heartbeat)
    /// requeues nothing.
    pub fn node_event(&self, event: &Event<Node>) -> Vec<ObjectRef<CachedService>> {
        let changed: Vec<(Option<NodeInfo>, Option<NodeInfo>)> = match event {
            Event::Apply(node) | Event::Delete(node) => {
                let mut state = self.lock();
                // Read under the lock: what is recorded is what the store held after it.
                let now = self
                    .nodes
                    .get(&ObjectRef::from_obj(node))
                    .map(|n| translate::node(&n));
                let name = node.name_any();
                let before = match &now {
                    Some(info) => state.nodes.insert(name, info.clone()),
                    None => state.nodes.remove(&name),
                };
                if before == now {
                    return Vec::new();
                }
                state.version += 1;
                vec![(before, now)]
            }
            Event::InitDone => {
                let mut state = self.lock();
                let now: BTreeMap<String, NodeInfo> = self
                    .nodes
                    .state()
                    .iter()
                    .map(|n| (n.name_any(), translate::node(n)))
                    .collect();
                let before = std::mem::replace(&mut state.nodes, now);
                state.version += 1;
                let names: BTreeSet<&String> = before.keys().chain(state.nodes.keys()).collect();
                names
                    .into_iter()
                    .map(|n| (before.get(n).cloned(), state.nodes.get(n).cloned()))
                    .filter(|(b, a)| b != a)
                    .collect()
            }
            Event::Init | Event::InitApply(_) => return Vec::new(),
        };
        let view = self.view();
        let sets: BTreeSet<&str> = changed
            .iter()
            .flat_map(|(before, now)| [before, now])
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

    /// An event of the EndpointSlices' watch, once the reflector applied it: the Services
    /// whose slices changed. A slice is remembered with its Service, so that one whose label
    /// went (its deletion from the watch carries no label) still requeues the Service it was.
    pub fn slice_event(&self, event: &Event<EndpointSlice>) -> Vec<ObjectRef<CachedService>> {
        let mut state = self.lock();
        let touched: BTreeSet<ServiceName> = match event {
            Event::Apply(slice) | Event::Delete(slice) => {
                let id = slice_id(slice);
                let present = self
                    .slices
                    .get(&ObjectRef::from_obj(slice))
                    .and_then(|s| service_of(&s));
                let before = state.unindex(&id);
                if let Some(service) = &present {
                    state.index(id, service.clone());
                }
                before.into_iter().chain(present).collect()
            }
            Event::InitDone => {
                let before = std::mem::take(&mut state.slice_services);
                state.slices.clear();
                for slice in self.slices.state() {
                    if let Some(service) = service_of(&slice) {
                        state.index(slice_id(&slice), service);
                    }
                }
                // Every Service that had or has slices: a relist's changes are not seen one
                // by one.
                before
                    .into_values()
                    .chain(state.slice_services.values().cloned())
                    .collect()
            }
            Event::Init | Event::InitApply(_) => BTreeSet::new(),
        };
        touched.iter().map(CachedService::reference).collect()
    }

    /// Ready endpoints per node of the Service `name`, from its EndpointSlices in the store.
    fn endpoints_of(&self, name: &ServiceName) -> BTreeMap<String, u32> {
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

    /// Ready endpoints per node of every Service, for a full pass; the view is made again, so
    /// whatever a watch did not say reaches the plan at the latest here.
    fn refresh(&self) -> BTreeMap<ServiceName, BTreeMap<String, u32>> {
        self.lock().version += 1;
        translate::ready_endpoints(self.slices.state().iter().map(|s| &**s))
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
    fn planned(
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
    fn sharing_peers(&self, service: &Service, view: &View) -> Vec<PlannedService> {
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
        let (pools, modes): (Vec<_>, Vec<_>) = self
            .pools
            .state()
            .iter()
            .map(|p| (translate::pool_for(p, &self.classes).0, p.spec.announce))
            .filter(|(p, _)| !matches!(p.role, PoolRole::Foreign(_)))
            .unzip();
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
        let announce = pools
            .iter()
            .zip(modes)
            .flat_map(|(p, mode)| p.ranges.iter().map(move |r| (*r, mode)))
            .collect();
        let owned = Owned::new(
            pools
                .iter()
                .flat_map(|p| p.ranges.iter().copied())
                .collect(),
        )
        .announcing(announce);
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

/// An EndpointSlice's namespace and name.
fn slice_id(slice: &EndpointSlice) -> (String, String) {
    (
        slice.namespace().unwrap_or_else(|| "default".to_owned()),
        slice.name_any(),
    )
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
    use ipvslb_ipvs::Table;

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

    /// Zone `a` has pool `pa` with Service `sa`, zone `b` pool `pb` with `sb`; nodes `n1` (a)
    /// and `n2` (b).
    struct Fixture {
        cluster: Cluster,
        services: Writer<CachedService>,
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
        // The first lists' ends.
        cluster.node_event(&Event::InitDone);
        cluster.slice_event(&Event::InitDone);
        Fixture {
            cluster,
            services: services_writer,
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

    /// `event` applied to the store, as the reflector applies it before the stream goes on.
    fn seen<K>(writer: &mut Writer<K>, event: Event<K>) -> Event<K>
    where
        K: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        writer.apply_watcher_event(&event);
        event
    }

    fn address(cluster: &Cluster, name: &str) -> Vec<String> {
        let cached = cluster
            .services()
            .get(&ObjectRef::new(name).within("default"))
            .expect("the Service is in the store");
        let plan = cluster.plan_service(&cached.to_service(), &BTreeSet::new());
        plan.part
            .table
            .services
            .values()
            .flat_map(|e| e.destinations.keys().map(|d| d.address.to_string()))
            .collect()
    }

    #[test]
    fn a_node_change_requeues_only_the_services_whose_node_set_selects_it_before_or_after() {
        let mut f = fixture();
        let n1 = seen(
            &mut f.nodes,
            Event::Apply(node("n1", "a", "192.0.2.1", false)),
        );
        assert_eq!(names(f.cluster.node_event(&n1)), ["sa"]);
        assert_eq!(destinations(&f.cluster, "sa"), 0);
        // The same node again (a kubelet's heartbeat): nothing to do.
        assert_eq!(names(f.cluster.node_event(&n1)), Vec::<String>::new());

        // Moved to zone b: it leaves a's Services and joins b's.
        let moved = seen(
            &mut f.nodes,
            Event::Apply(node("n1", "b", "192.0.2.1", true)),
        );
        assert_eq!(names(f.cluster.node_event(&moved)), ["sa", "sb"]);
        assert_eq!(destinations(&f.cluster, "sb"), 2);

        // Gone: what it belonged to last is what it leaves.
        let gone = seen(
            &mut f.nodes,
            Event::Delete(node("n1", "b", "192.0.2.1", true)),
        );
        assert_eq!(names(f.cluster.node_event(&gone)), ["sb"]);
        assert_eq!(address(&f.cluster, "sb"), ["192.0.2.2"]);
    }

    #[test]
    fn a_relist_reaches_the_view_and_requeues_what_changed_meanwhile() {
        let mut f = fixture();
        assert_eq!(address(&f.cluster, "sa"), ["192.0.2.1"]);
        // While the watch was down, n1 moved to zone b and n3 joined zone a.
        for event in [
            Event::Init,
            Event::InitApply(node("n1", "b", "192.0.2.1", true)),
            Event::InitApply(node("n2", "b", "192.0.2.2", true)),
            Event::InitApply(node("n3", "a", "192.0.2.3", true)),
        ] {
            let event = seen(&mut f.nodes, event);
            assert_eq!(names(f.cluster.node_event(&event)), Vec::<String>::new());
            // Planned meanwhile from the store as it was.
            assert_eq!(address(&f.cluster, "sa"), ["192.0.2.1"]);
        }
        let done = seen(&mut f.nodes, Event::InitDone);
        assert_eq!(names(f.cluster.node_event(&done)), ["sa", "sb"]);
        assert_eq!(address(&f.cluster, "sa"), ["192.0.2.3"]);
        assert_eq!(address(&f.cluster, "sb"), ["192.0.2.1", "192.0.2.2"]);
    }

    #[test]
    fn the_view_is_made_once_per_change_and_follows_the_store() {
        let mut f = fixture();
        let first = f.cluster.view();
        assert!(
            Arc::ptr_eq(&first, &f.cluster.view()),
            "made again without a change"
        );
        assert_eq!(address(&f.cluster, "sa"), ["192.0.2.1"]);

        // The pool of `sa` now sends its traffic to NodeSet b.
        let event = seen(&mut f.pools, Event::Apply(pool("pa", "10.240.0.0/24", "b")));
        assert!(f.cluster.topology_event(&event).is_empty());
        assert!(!Arc::ptr_eq(&first, &f.cluster.view()));
        assert_eq!(address(&f.cluster, "sa"), ["192.0.2.2"]);
        // After a relist, every Service.
        let done = seen(&mut f.pools, Event::InitDone);
        assert_eq!(names(f.cluster.topology_event(&done)), ["sa", "sb"]);
    }

    #[test]
    fn endpoints_come_from_the_services_own_slices_and_follow_deletions_and_relists() {
        let mut f = fixture();
        let name = ServiceName::new("default", "sa");
        let mine = slice("sa-x", "sa", &["n1", "n1"]);
        let added = seen(&mut f.slices, Event::Apply(mine.clone()));
        assert_eq!(names(f.cluster.slice_event(&added)), ["sa"]);
        let other = seen(&mut f.slices, Event::Apply(slice("sb-x", "sb", &["n2"])));
        assert_eq!(names(f.cluster.slice_event(&other)), ["sb"]);
        assert_eq!(
            f.cluster.endpoints_of(&name),
            BTreeMap::from([("n1".into(), 2)])
        );

        // Its label removed: the watch deletes it, without the label, and `sa` is requeued.
        let mut unlabelled = mine.clone();
        unlabelled.metadata.labels = None;
        let removed = seen(&mut f.slices, Event::Delete(unlabelled));
        assert_eq!(names(f.cluster.slice_event(&removed)), ["sa"]);
        assert_eq!(f.cluster.endpoints_of(&name), BTreeMap::new());

        // Back during a relist, which no longer lists `sb`'s: both seen at its end.
        for event in [Event::Init, Event::InitApply(mine), Event::InitDone] {
            let event = seen(&mut f.slices, event);
            let requeued = names(f.cluster.slice_event(&event));
            if matches!(event, Event::InitDone) {
                assert_eq!(requeued, ["sa", "sb"]);
            }
        }
        assert_eq!(
            f.cluster.endpoints_of(&ServiceName::new("default", "sb")),
            BTreeMap::new()
        );
        assert_eq!(
            f.cluster.endpoints_of(&name),
            BTreeMap::from([("n1".into(), 2)])
        );
        assert_eq!(
            f.cluster.refresh().get(&name),
            Some(&BTreeMap::from([("n1".into(), 2)]))
        );
    }

    /// splitmix64: small, and the same sequence on every machine.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % n as u64) as usize
        }
    }

    const NODES: [&str; 4] = ["n1", "n2", "n3", "n4"];
    const SERVICES: [&str; 3] = ["sa", "sb", "la"];

    fn random_node(rng: &mut Rng) -> Node {
        let i = rng.below(NODES.len());
        let zone = ["a", "b", "c"][rng.below(3)];
        node(
            NODES[i],
            zone,
            &format!("192.0.2.{}", i + 1),
            rng.below(4) != 0,
        )
    }

    fn random_slice(rng: &mut Rng) -> EndpointSlice {
        let on: Vec<&str> = NODES
            .iter()
            .copied()
            .filter(|_| rng.below(2) == 0)
            .collect();
        slice(["la-1", "la-2"][rng.below(2)], "la", &on)
    }

    /// What `name`'s reconcile plans now.
    fn planned(cluster: &Cluster, name: &str) -> Table {
        let cached = cluster
            .services()
            .get(&ObjectRef::new(name).within("default"))
            .expect("the Service is in the store");
        cluster
            .plan_service(&cached.to_service(), &BTreeSet::new())
            .part
            .table
    }

    /// What a director starting afresh on the same stores plans for `name`.
    fn afresh(cluster: &Cluster, name: &str) -> Table {
        let fresh = Cluster::new(
            cluster.classes.clone(),
            Stores {
                services: cluster.services.clone(),
                pools: cluster.pools.clone(),
                node_sets: cluster.node_sets.clone(),
                nodes: cluster.nodes.clone(),
                slices: cluster.slices.clone(),
            },
        );
        fresh.node_event(&Event::InitDone);
        fresh.slice_event(&Event::InitDone);
        planned(&fresh, name)
    }

    /// Seeded runs of node and slice changes, relists (with changes while they run) and
    /// reconciles at any moment, each event's requeues reconciled at once: after every step,
    /// every Service's last plan is what a fresh director would plan. A Service the view failed
    /// to requeue, or one planned from a stale view, keeps a different plan.
    #[test]
    fn no_change_or_relist_leaves_a_service_with_a_stale_plan() {
        for seed in 0..300 {
            let mut rng = Rng(seed);
            let mut f = fixture();
            let mut local = service("la", "10.240.0.2");
            local.trim();
            let mut local: Service = local.to_service();
            local.spec.as_mut().expect("a spec").external_traffic_policy = Some("Local".into());
            let mut local: CachedService = object(serde_json::to_value(&local).expect("json"));
            local.trim();
            apply(&mut f.services, local);
            let mut last: BTreeMap<&str, Table> = SERVICES
                .iter()
                .map(|n| (*n, planned(&f.cluster, n)))
                .collect();
            let mut relisting: Option<&str> = None;
            for step in 0..40 {
                let requeued = match (relisting, rng.below(8)) {
                    (None, 0) => {
                        relisting = Some(["nodes", "slices"][rng.below(2)]);
                        match relisting {
                            Some("nodes") => {
                                let e = seen(&mut f.nodes, Event::Init);
                                f.cluster.node_event(&e)
                            }
                            _ => {
                                let e = seen(&mut f.slices, Event::Init);
                                f.cluster.slice_event(&e)
                            }
                        }
                    }
                    (Some(kind), 0 | 1) => {
                        relisting = None;
                        if kind == "nodes" {
                            let e = seen(&mut f.nodes, Event::InitDone);
                            f.cluster.node_event(&e)
                        } else {
                            let e = seen(&mut f.slices, Event::InitDone);
                            f.cluster.slice_event(&e)
                        }
                    }
                    (Some("nodes"), _) => {
                        let e = seen(&mut f.nodes, Event::InitApply(random_node(&mut rng)));
                        f.cluster.node_event(&e)
                    }
                    (Some(_), _) => {
                        let e = seen(&mut f.slices, Event::InitApply(random_slice(&mut rng)));
                        f.cluster.slice_event(&e)
                    }
                    (None, 1) => {
                        let e = seen(&mut f.nodes, Event::Delete(random_node(&mut rng)));
                        f.cluster.node_event(&e)
                    }
                    (None, 2) => {
                        let e = seen(&mut f.slices, Event::Delete(random_slice(&mut rng)));
                        f.cluster.slice_event(&e)
                    }
                    (None, 3) => {
                        let e = seen(&mut f.slices, Event::Apply(random_slice(&mut rng)));
                        f.cluster.slice_event(&e)
                    }
                    (None, 4) => {
                        // A reconcile for no reason: it may cache a view at any moment.
                        vec![ObjectRef::new(SERVICES[rng.below(3)]).within("default")]
                    }
                    (None, _) => {
                        let e = seen(&mut f.nodes, Event::Apply(random_node(&mut rng)));
                        f.cluster.node_event(&e)
                    }
                };
                for reference in requeued {
                    let name = SERVICES
                        .iter()
                        .find(|n| **n == reference.name)
                        .expect("one of the Services");
                    last.insert(name, planned(&f.cluster, name));
                }
                for name in SERVICES {
                    assert_eq!(
                        last[name],
                        afresh(&f.cluster, name),
                        "seed {seed}, step {step}: {name} keeps a stale plan"
                    );
                }
            }
        }
    }
}
