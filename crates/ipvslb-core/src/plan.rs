//! Planning: from Services with assigned VIPs, their pools, NodeSets and Nodes, the IPVS table a
//! director must hold. One virtual service per (VIP, protocol, port); one destination per usable
//! node of the pool's NodeSet.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipvslb_ipvs::{
    Destination, ForwardingMethod, ServiceFlags, ServiceKey, Table, VirtualService, host_prefix,
};

use crate::health::Target;
use crate::model::{
    AllDown, CheckTarget, Forwarding, HealthPolicy, IpFamily, NodeInfo, NodeSetSpec,
    PlannedService, PoolSpec, ServiceName, ServicePort, Standing, TrafficPolicy,
};

/// The desired table and what kept parts of it from being planned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct Plan {
    /// The desired IPVS table.
    pub table: Table,
    /// Per Service, why some or all of its entries are missing or empty.
    pub problems: Vec<PlanProblem>,
    /// Which Service each virtual service is for.
    pub owners: BTreeMap<ServiceKey, ServiceName>,
    /// What each Service's destinations are checked by (NodeSets with a health check only).
    pub targets: BTreeMap<ServiceName, BTreeSet<Target>>,
}

/// A Service that could not be planned in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanProblem {
    /// The Service.
    pub service: ServiceName,
    /// Why.
    pub error: PlanError,
}

/// Why a Service's IPVS entries are missing or have no destinations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The Service's pool does not exist (any more).
    #[error("its VIPs come from pool {pool:?}, which does not exist")]
    UnknownPool {
        /// The pool's name.
        pool: String,
    },
    /// The pool names a NodeSet that does not exist.
    #[error("pool {pool:?} sends traffic to NodeSet {node_set:?}, which does not exist")]
    UnknownNodeSet {
        /// The pool's name.
        pool: String,
        /// The missing NodeSet.
        node_set: String,
    },
    /// Masquerade forwards to the NodePort, and this port has none.
    #[error(
        "port {port}/{protocol} has no NodePort, which Masquerade forwarding needs (is allocateLoadBalancerNodePorts false?)"
    )]
    NoNodePort {
        /// The protocol.
        protocol: ipvslb_ipvs::Protocol,
        /// The Service port.
        port: u16,
    },
    /// Another Service already has this virtual service.
    #[error("{key} is already served for {holder}")]
    Collision {
        /// The virtual service.
        key: ServiceKey,
        /// The Service that has it.
        holder: ServiceName,
    },
    /// No node can take this VIP's traffic.
    #[error("NodeSet {node_set:?} has no ready node with an {family} address for {address}{local}", local = if *.local { " and a ready endpoint (externalTrafficPolicy: Local)" } else { "" })]
    NoBackends {
        /// The NodeSet.
        node_set: String,
        /// The VIP.
        address: IpAddr,
        /// The VIP's family.
        family: IpFamily,
        /// Whether `externalTrafficPolicy: Local` narrowed the nodes.
        local: bool,
    },
}

/// A node that may receive a NodeSet's traffic.
#[derive(Debug, Clone, Copy)]
struct Backend {
    /// Its index in the topology's nodes.
    node: usize,
    /// Cordoned nodes keep their destination at weight 0: live connections finish, new ones go
    /// elsewhere.
    draining: bool,
}

/// What plans are made over: the pools, the NodeSets and the nodes, with the nodes each
/// NodeSet sends traffic to found once. A director keeps one for as long as none of them
/// changes, so planning one Service costs that Service's own destinations, not a scan of every
/// NodeSet and node.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    pools: Vec<PoolSpec>,
    pool_index: BTreeMap<String, usize>,
    node_sets: BTreeMap<String, (NodeSetSpec, Vec<Backend>)>,
    nodes: Vec<NodeInfo>,
}

impl Topology {
    /// The topology of these objects. Of two pools (or NodeSets) with one name, the later one
    /// counts.
    pub fn new(pools: Vec<PoolSpec>, node_sets: Vec<NodeSetSpec>, nodes: Vec<NodeInfo>) -> Self {
        let pool_index = pools
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        let node_sets = node_sets
            .into_iter()
            .map(|set| {
                let backends = backends_of(&set, &nodes);
                (set.name.clone(), (set, backends))
            })
            .collect();
        Self {
            pools,
            pool_index,
            node_sets,
            nodes,
        }
    }

    /// The pools, in the order given.
    pub fn pools(&self) -> &[PoolSpec] {
        &self.pools
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&PoolSpec> {
        self.pool_index.get(name).map(|&i| &self.pools[i])
    }

    /// The names of the NodeSets whose selector matches `labels`: those a node with these
    /// labels belongs to, whatever its standing.
    pub fn node_sets_selecting<'a>(
        &'a self,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a str> {
        self.node_sets
            .values()
            .filter(|(set, _)| set.selector.matches(labels))
            .map(|(set, _)| set.name.as_str())
    }

    /// The plan of `services` over this topology, leaving out the destinations whose check is
    /// `down` ([`plan_checked`]). Services are taken oldest first (then by name), so when two
    /// claim one virtual service the older keeps it, whatever order they come in.
    pub fn plan(&self, services: &[PlannedService], down: &BTreeSet<Target>) -> Plan {
        let mut ordered: Vec<&PlannedService> = services.iter().collect();
        ordered.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
        let mut plan = Plan::default();
        for service in ordered {
            self.plan_service(service, down, &mut plan);
        }
        plan
    }

    /// Adds `service`'s entries to `plan`: the Services planned before it keep what they hold.
    fn plan_service(&self, service: &PlannedService, down: &BTreeSet<Target>, plan: &mut Plan) {
        let mut problem = |error| {
            plan.problems.push(PlanProblem {
                service: service.name.clone(),
                error,
            })
        };
        let Some(pool) = self.pool(&service.pool) else {
            problem(PlanError::UnknownPool {
                pool: service.pool.clone(),
            });
            return;
        };
        let Some((set, set_backends)) = self.node_sets.get(&pool.node_set) else {
            problem(PlanError::UnknownNodeSet {
                pool: pool.name.clone(),
                node_set: pool.node_set.clone(),
            });
            return;
        };
        for address in &service.addresses {
            let dests = destinations_for(service, set, set_backends, &self.nodes, address);
            if dests.is_empty() {
                problem(PlanError::NoBackends {
                    node_set: set.name.clone(),
                    address: *address,
                    family: IpFamily::of(address),
                    local: service.traffic_policy == TrafficPolicy::Local,
                });
            }
            for port in &service.ports {
                let key = ServiceKey::addr(*address, port.protocol, port.port);
                if let Some(holder) = plan.owners.get(&key) {
                    problem(PlanError::Collision {
                        key,
                        holder: holder.clone(),
                    });
                    continue;
                }
                let Some(dest_port) = destination_port(set.forwarding, port) else {
                    problem(PlanError::NoNodePort {
                        protocol: port.protocol,
                        port: port.port,
                    });
                    continue;
                };
                plan.owners.insert(key, service.name.clone());
                let virtual_service = virtual_service(key, service, set);
                let mut kept: Vec<Destination> = dests
                    .iter()
                    .map(|(addr, method, weight)| {
                        Destination::new(*addr, dest_port, *method, *weight)
                    })
                    .collect();
                if let Some(policy) = &set.health {
                    let target = |addr: IpAddr| Target {
                        address: addr,
                        port: check_port(policy, service, port, dest_port),
                        check: policy.check.clone(),
                    };
                    let targets = plan.targets.entry(service.name.clone()).or_default();
                    targets.extend(kept.iter().map(|d| target(d.address)));
                    let healthy: Vec<Destination> = kept
                        .iter()
                        .filter(|d| !down.contains(&target(d.address)))
                        .cloned()
                        .collect();
                    // Failing open keeps the destinations when none that takes new connections
                    // (a cordoned one is at weight 0) passes.
                    if healthy.iter().any(|d| d.weight > 0) || policy.all_down == AllDown::Withdraw
                    {
                        kept = healthy;
                    }
                }
                plan.table.insert(virtual_service, kept);
            }
        }
    }
}

/// Plans the desired table. Deterministic: Services are taken oldest first (then by name), so
/// when two claim the same virtual service the older keeps it, whatever the newer one is named
/// or when it arrives, and the newer gets a [`PlanError::Collision`].
pub fn plan(
    services: &[PlannedService],
    pools: &[PoolSpec],
    node_sets: &[NodeSetSpec],
    nodes: &[NodeInfo],
) -> Plan {
    plan_checked(services, pools, node_sets, nodes, &BTreeSet::new())
}

/// [`plan`], leaving out the destinations whose health-check target is in `down` (all of a
/// virtual service's are kept when all are down and the NodeSet says
/// [`AllDown::KeepAll`]).
pub fn plan_checked(
    services: &[PlannedService],
    pools: &[PoolSpec],
    node_sets: &[NodeSetSpec],
    nodes: &[NodeInfo],
    down: &BTreeSet<Target>,
) -> Plan {
    Topology::new(pools.to_vec(), node_sets.to_vec(), nodes.to_vec()).plan(services, down)
}

/// The nodes of `set` that can take traffic at all: selected, Ready, not excluded.
fn backends_of(set: &NodeSetSpec, nodes: &[NodeInfo]) -> Vec<Backend> {
    nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| set.selector.matches(&n.labels))
        .filter_map(|(node, info)| match info.standing() {
            Standing::Serving => Some(Backend {
                node,
                draining: false,
            }),
            Standing::Cordoned => Some(Backend {
                node,
                draining: true,
            }),
            Standing::NotReady | Standing::Excluded => None,
        })
        .collect()
}

/// `(node address, forwarding method, weight)` for one VIP of `service`.
fn destinations_for(
    service: &PlannedService,
    set: &NodeSetSpec,
    backends: &[Backend],
    nodes: &[NodeInfo],
    vip: &IpAddr,
) -> Vec<(IpAddr, ForwardingMethod, u32)> {
    let family = IpFamily::of(vip);
    let method = forwarding_method(set.forwarding);
    let mut dests: Vec<_> = backends
        .iter()
        .filter_map(|b| {
            let node = &nodes[b.node];
            let address = node
                .addresses
                .iter()
                .find(|(kind, addr)| *kind == set.address_type && IpFamily::of(addr) == family)
                .map(|(_, addr)| *addr)?;
            let weight = match service.traffic_policy {
                TrafficPolicy::Cluster => 1,
                // kube-proxy drops Local traffic on a node without a ready endpoint, so such a
                // node is no destination at all; the others get a share of their endpoints.
                TrafficPolicy::Local => match service.ready_endpoints.get(&node.name) {
                    Some(&n) if n > 0 => n,
                    _ => return None,
                },
            };
            Some((address, method, if b.draining { 0 } else { weight }))
        })
        .collect();
    // Two nodes reporting one address would make one destination; keep the first by address.
    dests.sort();
    dests.dedup_by_key(|(addr, _, _)| *addr);
    dests
}

fn forwarding_method(forwarding: Forwarding) -> ForwardingMethod {
    match forwarding {
        Forwarding::DirectRouting => ForwardingMethod::Route,
        Forwarding::Masquerade => ForwardingMethod::Masquerade,
        Forwarding::Tunnel => ForwardingMethod::Tunnel,
    }
}

/// The destination port: the Service port, except under masquerade where it is the NodePort.
fn destination_port(forwarding: Forwarding, port: &ServicePort) -> Option<u16> {
    match forwarding {
        Forwarding::DirectRouting | Forwarding::Tunnel => Some(port.port),
        Forwarding::Masquerade => port.node_port,
    }
}

/// The node port a check of `port`'s destinations probes.
fn check_port(
    policy: &HealthPolicy,
    service: &PlannedService,
    port: &ServicePort,
    dest_port: u16,
) -> u16 {
    if let Some(fixed) = policy.port {
        return fixed;
    }
    let auto = || {
        service
            .health_check_node_port
            .filter(|_| service.traffic_policy == TrafficPolicy::Local)
            .or(port.node_port)
            .unwrap_or(dest_port)
    };
    match policy.target {
        CheckTarget::Auto => auto(),
        CheckTarget::NodePort => port.node_port.unwrap_or(dest_port),
        CheckTarget::ServicePort => port.port,
    }
}

fn virtual_service(key: ServiceKey, service: &PlannedService, set: &NodeSetSpec) -> VirtualService {
    let scheduler = service
        .scheduler
        .clone()
        .unwrap_or_else(|| set.scheduler.clone());
    let mut vs = VirtualService::new(key, scheduler);
    vs.flags = set.flags;
    if let Some(timeout) = set.persistence {
        vs.flags = vs.flags.union(ServiceFlags::PERSISTENT);
        vs.timeout = timeout;
    }
    if let Some(address) = key.address() {
        vs.netmask = host_prefix(&address);
    }
    vs
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ipvslb_ipvs::{Protocol, Scheduler};

    use super::*;
    use crate::model::{EXCLUDE_LABEL, NodeAddressType};
    use crate::selector::Selector;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn node(name: &str, addrs: &[&str]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            labels: BTreeMap::new(),
            ready: true,
            unschedulable: false,
            addresses: addrs
                .iter()
                .map(|a| (NodeAddressType::InternalIp, ip(a)))
                .collect(),
        }
    }

    fn pool(name: &str, node_set: &str) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            ranges: vec!["10.240.0.210-10.240.0.215".parse().unwrap()],
            created: 0,
            role: crate::model::PoolRole::Serving,
            auto_assign: true,
            avoid_buggy_ips: false,
            node_set: node_set.into(),
            service_allocation: None,
        }
    }

    fn node_set(forwarding: Forwarding) -> NodeSetSpec {
        NodeSetSpec {
            name: "default".into(),
            selector: Selector::default(),
            address_type: NodeAddressType::InternalIp,
            forwarding,
            scheduler: Scheduler::Rr,
            flags: ServiceFlags::empty(),
            persistence: None,
            health: None,
        }
    }

    fn service(name: &str, vips: &[&str], ports: &[(u16, Option<u16>)]) -> PlannedService {
        PlannedService {
            name: ServiceName::new("default", name),
            created: 0,
            addresses: vips.iter().map(|a| ip(a)).collect(),
            pool: "pool".into(),
            ports: ports
                .iter()
                .map(|&(port, node_port)| ServicePort {
                    protocol: Protocol::Tcp,
                    port,
                    node_port,
                })
                .collect(),
            traffic_policy: TrafficPolicy::Cluster,
            scheduler: None,
            ready_endpoints: BTreeMap::new(),
            health_check_node_port: None,
        }
    }

    fn dests(plan: &Plan, key: ServiceKey) -> Vec<(IpAddr, u16, ForwardingMethod, u32)> {
        plan.table.services[&key]
            .destinations
            .values()
            .map(|d| (d.address, d.port, d.forwarding, d.weight))
            .collect()
    }

    #[test]
    fn whoami_is_routed_to_both_nodes_as_in_classic_lvs_dr() {
        let nodes = [
            node("node1", &["10.240.0.101"]),
            node("node2", &["10.240.0.102"]),
        ];
        let whoami = service("whoami", &["10.240.0.210"], &[(80, Some(31220))]);
        let plan = plan(
            &[whoami],
            &[pool("pool", "default")],
            &[node_set(Forwarding::DirectRouting)],
            &nodes,
        );
        assert_eq!(plan.problems, vec![]);
        let key = ServiceKey::addr(ip("10.240.0.210"), Protocol::Tcp, 80);
        assert_eq!(plan.table.services[&key].service.scheduler, Scheduler::Rr);
        assert_eq!(
            dests(&plan, key),
            vec![
                (ip("10.240.0.101"), 80, ForwardingMethod::Route, 1),
                (ip("10.240.0.102"), 80, ForwardingMethod::Route, 1)
            ]
        );
    }

    fn checked(set: NodeSetSpec, all_down: AllDown, port: Option<u16>) -> NodeSetSpec {
        NodeSetSpec {
            health: Some(HealthPolicy {
                check: crate::health::Check {
                    probe: crate::health::Probe::Tcp,
                    interval: std::time::Duration::from_millis(500),
                    timeout: std::time::Duration::from_millis(250),
                    rise: 2,
                    fall: 3,
                },
                target: CheckTarget::Auto,
                port,
                all_down,
            }),
            ..set
        }
    }

    fn down_at(set: &NodeSetSpec, addrs: &[(&str, u16)]) -> BTreeSet<Target> {
        let check = set.health.as_ref().map(|h| h.check.clone()).unwrap();
        addrs
            .iter()
            .map(|(a, port)| Target {
                address: ip(a),
                port: *port,
                check: check.clone(),
            })
            .collect()
    }

    #[test]
    fn a_destination_whose_check_is_down_is_left_out_and_the_others_stay() {
        let nodes = [
            node("node1", &["10.240.0.101"]),
            node("node2", &["10.240.0.102"]),
        ];
        let set = checked(node_set(Forwarding::DirectRouting), AllDown::KeepAll, None);
        let whoami = service("whoami", &["10.240.0.210"], &[(80, Some(31220))]);
        // Auto probes the NodePort when the Service has one.
        let down = down_at(&set, &[("10.240.0.102", 31220)]);
        let pools = [pool("pool", "default")];
        let plan = plan_checked(&[whoami], &pools, &[set], &nodes, &down);
        let key = ServiceKey::addr(ip("10.240.0.210"), Protocol::Tcp, 80);
        assert_eq!(
            dests(&plan, key),
            vec![(ip("10.240.0.101"), 80, ForwardingMethod::Route, 1)]
        );
        let name = ServiceName::new("default", "whoami");
        assert_eq!(
            plan.targets[&name]
                .iter()
                .map(|t| (t.address, t.port))
                .collect::<Vec<_>>(),
            vec![(ip("10.240.0.101"), 31220), (ip("10.240.0.102"), 31220)],
            "both are still checked, so the down one can come back"
        );
    }

    #[test]
    fn when_every_check_is_down_keep_all_fails_open_and_withdraw_empties_the_service() {
        let nodes = [
            node("node1", &["10.240.0.101"]),
            node("node2", &["10.240.0.102"]),
        ];
        let whoami = service("whoami", &["10.240.0.210"], &[(80, None)]);
        let key = ServiceKey::addr(ip("10.240.0.210"), Protocol::Tcp, 80);
        let pools = [pool("pool", "default")];
        for (all_down, left) in [(AllDown::KeepAll, 2), (AllDown::Withdraw, 0)] {
            // A fixed port: one probe per node, whatever the Service.
            let set = checked(node_set(Forwarding::DirectRouting), all_down, Some(8081));
            let down = down_at(&set, &[("10.240.0.101", 8081), ("10.240.0.102", 8081)]);
            let plan = plan_checked(std::slice::from_ref(&whoami), &pools, &[set], &nodes, &down);
            assert_eq!(dests(&plan, key).len(), left, "{all_down:?}");
            assert!(
                plan.table.services.contains_key(&key),
                "the service itself stays"
            );
        }
    }

    #[test]
    fn a_local_service_is_checked_on_its_health_check_node_port() {
        let nodes = [node("node1", &["10.240.0.101"])];
        let mut local = service("local", &["10.240.0.211"], &[(80, Some(31220))]);
        local.traffic_policy = TrafficPolicy::Local;
        local.health_check_node_port = Some(32000);
        local.ready_endpoints = [("node1".to_owned(), 1)].into();
        let set = checked(node_set(Forwarding::DirectRouting), AllDown::KeepAll, None);
        let plan = plan_checked(
            &[local],
            &[pool("pool", "default")],
            &[set],
            &nodes,
            &BTreeSet::new(),
        );
        let ports: Vec<u16> = plan.targets[&ServiceName::new("default", "local")]
            .iter()
            .map(|t| t.port)
            .collect();
        assert_eq!(ports, vec![32000]);
    }

    #[test]
    fn masquerade_targets_the_node_port_and_reports_ports_without_one() {
        let nodes = [node("node1", &["10.240.0.101"])];
        let svc = service("web", &["10.240.0.210"], &[(80, Some(31220)), (81, None)]);
        let plan = plan(
            &[svc],
            &[pool("pool", "default")],
            &[node_set(Forwarding::Masquerade)],
            &nodes,
        );
        let key = ServiceKey::addr(ip("10.240.0.210"), Protocol::Tcp, 80);
        assert_eq!(
            dests(&plan, key),
            vec![(ip("10.240.0.101"), 31220, ForwardingMethod::Masquerade, 1)]
        );
        assert_eq!(plan.table.service_count(), 1);
        assert!(matches!(
            plan.problems[0].error,
            PlanError::NoNodePort { port: 81, .. }
        ));
    }

    #[test]
    fn unready_excluded_and_wrong_family_nodes_are_no_destinations_and_cordoned_ones_drain() {
        let mut down = node("down", &["10.240.0.103"]);
        down.ready = false;
        let mut excluded = node("excluded", &["10.240.0.104"]);
        excluded.labels.insert(EXCLUDE_LABEL.into(), String::new());
        let mut cordoned = node("cordoned", &["10.240.0.105"]);
        cordoned.unschedulable = true;
        let nodes = [
            node("up", &["10.240.0.101", "fd00::101"]),
            down,
            excluded,
            cordoned,
            node("v6only", &["fd00::102"]),
        ];
        let svc = service("web", &["10.240.0.210", "2001:db8::1"], &[(80, None)]);
        let plan = plan(
            &[svc],
            &[pool("pool", "default")],
            &[node_set(Forwarding::DirectRouting)],
            &nodes,
        );
        let v4 = ServiceKey::addr(ip("10.240.0.210"), Protocol::Tcp, 80);
        let v6 = ServiceKey::addr(ip("2001:db8::1"), Protocol::Tcp, 80);
        assert_eq!(
            dests(&plan, v4),
            vec![
                (ip("10.240.0.101"), 80, ForwardingMethod::Route, 1),
                (ip("10.240.0.105"), 80, ForwardingMethod::Route, 0)
            ]
        );
        assert_eq!(
            dests(&plan, v6),
            vec![
                (ip("fd00::101"), 80, ForwardingMethod::Route, 1),
                (ip("fd00::102"), 80, ForwardingMethod::Route, 1)
            ]
        );
    }

    #[test]
    fn local_traffic_goes_only_to_nodes_with_ready_endpoints_weighted_by_their_count() {
        let nodes = [
            node("a", &["10.0.0.1"]),
            node("b", &["10.0.0.2"]),
            node("c", &["10.0.0.3"]),
        ];
        let mut svc = service("web", &["10.240.0.210"], &[(80, None)]);
        svc.traffic_policy = TrafficPolicy::Local;
        svc.ready_endpoints = BTreeMap::from([("a".into(), 3), ("b".into(), 0)]);
        let plan = plan(
            &[svc],
            &[pool("pool", "default")],
            &[node_set(Forwarding::DirectRouting)],
            &nodes,
        );
        let key = ServiceKey::addr(ip("10.240.0.210"), Protocol::Tcp, 80);
        assert_eq!(
            dests(&plan, key),
            vec![(ip("10.0.0.1"), 80, ForwardingMethod::Route, 3)]
        );
    }

    #[test]
    fn a_service_without_backends_keeps_its_virtual_service_and_is_reported() {
        let svc = service("web", &["10.240.0.210"], &[(80, None)]);
        let plan = plan(
            &[svc],
            &[pool("pool", "default")],
            &[node_set(Forwarding::DirectRouting)],
            &[],
        );
        assert_eq!(plan.table.service_count(), 1);
        assert_eq!(plan.table.destination_count(), 0);
        assert!(matches!(
            plan.problems[0].error,
            PlanError::NoBackends { .. }
        ));
    }

    #[test]
    fn the_first_service_by_name_keeps_a_contested_virtual_service() {
        let nodes = [node("a", &["10.0.0.1"])];
        let b = service("b", &["10.240.0.210"], &[(80, None)]);
        let a = service("a", &["10.240.0.210"], &[(80, None), (443, None)]);
        let plan = plan(
            &[b, a],
            &[pool("pool", "default")],
            &[node_set(Forwarding::DirectRouting)],
            &nodes,
        );
        assert_eq!(plan.table.service_count(), 2);
        assert_eq!(plan.problems.len(), 1);
        assert_eq!(plan.problems[0].service.name, "b");
        assert!(
            matches!(&plan.problems[0].error, PlanError::Collision { holder, .. } if holder.name == "a")
        );
    }

    #[test]
    fn unknown_pools_and_node_sets_are_reported_not_planned() {
        let nodes = [node("a", &["10.0.0.1"])];
        let mut lost = service("lost", &["10.240.0.210"], &[(80, None)]);
        lost.pool = "gone".into();
        let orphan = service("orphan", &["10.240.0.211"], &[(80, None)]);
        let plan = plan(
            &[lost, orphan],
            &[pool("pool", "nowhere")],
            &[node_set(Forwarding::DirectRouting)],
            &nodes,
        );
        assert!(plan.table.services.is_empty());
        assert!(matches!(
            plan.problems[0].error,
            PlanError::UnknownPool { .. }
        ));
        assert!(matches!(
            plan.problems[1].error,
            PlanError::UnknownNodeSet { .. }
        ));
    }

    #[test]
    fn persistence_and_scheduler_overrides_reach_the_virtual_service() {
        let nodes = [node("a", &["10.0.0.1"])];
        let mut set = node_set(Forwarding::DirectRouting);
        set.persistence = Some(300);
        set.scheduler = Scheduler::Mh;
        set.flags = ServiceFlags::SCHED1;
        let mut svc = service("web", &["10.240.0.210"], &[(80, None)]);
        let plain = plan(
            &[svc.clone()],
            &[pool("pool", "default")],
            &[set.clone()],
            &nodes,
        );
        svc.scheduler = Some(Scheduler::Wrr);
        let overridden = plan(&[svc], &[pool("pool", "default")], &[set], &nodes);
        let key = ServiceKey::addr(ip("10.240.0.210"), Protocol::Tcp, 80);
        let vs = &plain.table.services[&key].service;
        assert_eq!((vs.scheduler.clone(), vs.timeout), (Scheduler::Mh, 300));
        assert!(
            vs.flags
                .contains(ServiceFlags::PERSISTENT.union(ServiceFlags::SCHED1))
        );
        assert_eq!(
            overridden.table.services[&key].service.scheduler,
            Scheduler::Wrr
        );
    }

    /// Services sharing one VIP, as (name, created, ports), and who must hold each contested
    /// port: one case per row.
    #[test]
    fn of_services_colliding_on_a_shared_vip_the_oldest_keeps_the_virtual_service() {
        type Row = (
            &'static str,
            &'static [(&'static str, i64, &'static [u16])],
            &'static [(u16, &'static str)],
        );
        let rows: &[Row] = &[
            (
                "a newer Service named first does not take the older one's port",
                &[("zeta", 100, &[80]), ("alpha", 200, &[80, 443])],
                &[(80, "zeta"), (443, "alpha")],
            ),
            (
                "of two created in the same second, the first by name keeps it",
                &[("b", 100, &[80]), ("a", 100, &[80])],
                &[(80, "a")],
            ),
            (
                "a Service not yet stored counts as the newest",
                &[("a", i64::MAX, &[80]), ("b", 100, &[80])],
                &[(80, "b")],
            ),
            (
                "ports that do not collide are each their own Service's",
                &[("a", 200, &[53]), ("b", 100, &[853])],
                &[(53, "a"), (853, "b")],
            ),
        ];
        let nodes = [node("n", &["10.0.0.1"])];
        for (case, services, holders) in rows {
            let planned: Vec<PlannedService> = services
                .iter()
                .map(|(name, created, ports)| {
                    let mut s = service(
                        name,
                        &["10.240.0.210"],
                        &ports.iter().map(|p| (*p, None)).collect::<Vec<_>>(),
                    );
                    s.created = *created;
                    s
                })
                .collect();
            let before = planned.clone();
            let plan = plan(
                &planned,
                &[pool("pool", "default")],
                &[node_set(Forwarding::DirectRouting)],
                &nodes,
            );
            assert_eq!(planned, before, "{case}: the input is not mutated");
            let got: Vec<(u16, String)> = plan
                .owners
                .iter()
                .filter_map(|(k, owner)| match k {
                    ServiceKey::Addr { port, .. } => Some((*port, owner.name.clone())),
                    ServiceKey::FwMark { .. } => None,
                })
                .collect();
            let want: Vec<(u16, String)> =
                holders.iter().map(|(p, n)| (*p, (*n).to_owned())).collect();
            assert_eq!(got, want, "{case}");
            for problem in &plan.problems {
                let PlanError::Collision { holder, .. } = &problem.error else {
                    panic!("{case}: {problem:?}");
                };
                assert_ne!(holder, &problem.service, "{case}");
            }
            let collisions = services
                .iter()
                .flat_map(|(_, _, ports)| ports.iter())
                .count()
                - holders.len();
            assert_eq!(plan.problems.len(), collisions, "{case}");
        }
    }
}
