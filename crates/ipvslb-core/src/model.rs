//! The core's own plain types. The binary translates Kubernetes objects into these (one module,
//! `translate`), so the core never sees an API type and its tests build inputs in a line.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipvslb_ipvs::{Protocol, Scheduler, ServiceFlags};
use serde::Serialize;

use crate::range::IpRange;
use crate::selector::Selector;

/// A Service's `namespace/name`, its identity everywhere in the core.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceName {
    /// The namespace.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl ServiceName {
    /// `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of `addr`.
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// The other family.
    pub fn other(self) -> Self {
        match self {
            IpFamily::V4 => IpFamily::V6,
            IpFamily::V6 => IpFamily::V4,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

/// Which families a Service wants VIPs of, from `spec.ipFamilies` and `spec.ipFamilyPolicy`.
/// `primary` is `ipFamilies[0]` (IPv4 when the list is empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FamilyPolicy {
    /// One VIP of `primary`'s family.
    SingleStack {
        /// The only family.
        primary: IpFamily,
    },
    /// One VIP per family where a pool can give one; at least the primary or the other.
    PreferDualStack {
        /// The preferred family, listed first in the status.
        primary: IpFamily,
    },
    /// One VIP per family, or none at all.
    RequireDualStack {
        /// The family listed first in the status.
        primary: IpFamily,
    },
}

/// One port of a Service, as IPVS sees it: protocol and port number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortKey {
    /// The protocol.
    pub protocol: Protocol,
    /// The Service port.
    pub port: u16,
}

/// What a Service asks of the allocator, read from its spec, annotations and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceClaim {
    /// `namespace/name`.
    pub name: ServiceName,
    /// `metadata.creationTimestamp` in seconds since the epoch; the older Service wins a conflict.
    pub created: i64,
    /// The families wanted.
    pub families: FamilyPolicy,
    /// Addresses requested by `spec.loadBalancerIP` or the `ipvslb.io/load-balancer-ips` annotation.
    pub requested: Requested,
    /// The pool named by the `ipvslb.io/pool` annotation.
    pub pool: Option<String>,
    /// The `ipvslb.io/allow-shared-ip` key; Services with equal keys may share a VIP.
    pub sharing_key: Option<String>,
    /// The Service's ports (for sharing: two Services share a VIP only if no port collides).
    pub ports: Vec<PortKey>,
    /// The addresses already in `status.loadBalancer.ingress` (the allocation record).
    pub current: Vec<IpAddr>,
    /// The Service's labels (for pool service selectors).
    pub labels: BTreeMap<String, String>,
    /// The labels of the Service's namespace (for pool namespace selectors), shared by the
    /// claims of one namespace: a new leader builds a claim for every Service at once.
    pub namespace_labels: std::sync::Arc<BTreeMap<String, String>>,
}

/// The addresses a Service asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requested {
    /// Any address.
    Any,
    /// These addresses, at most one per family.
    Addresses(Vec<IpAddr>),
    /// The request could not be read; the message names the field and the bad value.
    Malformed(String),
}

/// An IPPool as the core sees it: parsed, validated ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// The pool's name.
    pub name: String,
    /// `metadata.creationTimestamp` in seconds since the epoch: when two pools overlap, the
    /// older keeps the contested addresses (ties go to the name that sorts first).
    pub created: i64,
    /// What the allocator may do with the pool.
    pub role: PoolRole,
    /// Its address ranges, each within one family.
    pub ranges: Vec<IpRange>,
    /// Whether Services that ask for no pool and no address may get one from here.
    pub auto_assign: bool,
    /// Skip IPv4 addresses ending in `.0` and `.255`.
    pub avoid_buggy_ips: bool,
    /// The NodeSet that serves this pool's VIPs.
    pub node_set: String,
    /// Which Services this pool is for; `None` serves any Service.
    pub service_allocation: Option<ServiceAllocation>,
}

/// What the allocator may do with a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolRole {
    /// Valid and of this installation's class: it serves new assignments by its rules.
    Serving,
    /// Invalid as written (the reason says why): it assigns nothing new, but the Services
    /// holding its addresses keep them until it is fixed or deleted. `ranges` holds what could
    /// be read of it.
    Frozen(String),
    /// Of another installation's load-balancer class (named): it assigns and holds nothing
    /// here, but it keeps the addresses it shares with a younger pool of ours, as any older
    /// pool does, so two installations never hand out one address.
    Foreign(String),
}

/// A pool's `serviceAllocation`: a restriction (it serves only the Services it selects,
/// whatever they ask for), and a preference by priority among the pools that select a Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceAllocation {
    /// Higher values are tried first.
    pub priority: i32,
    /// Namespaces served by name. With `namespace_selectors`, the alternatives: a namespace
    /// named here or matching a selector qualifies (both empty: any namespace).
    pub namespaces: Vec<String>,
    /// Namespaces served by label (see `namespaces`).
    pub namespace_selectors: Vec<Selector>,
    /// Services served by label, within the namespaces above (empty: any Service).
    pub service_selectors: Vec<Selector>,
}

impl ServiceAllocation {
    /// Whether it selects the Service `claim` describes.
    pub fn selects(&self, claim: &ServiceClaim) -> bool {
        let any_namespace = self.namespaces.is_empty() && self.namespace_selectors.is_empty();
        let namespace = any_namespace
            || self.namespaces.contains(&claim.name.namespace)
            || self
                .namespace_selectors
                .iter()
                .any(|s| s.matches(&claim.namespace_labels));
        namespace
            && (self.service_selectors.is_empty()
                || self
                    .service_selectors
                    .iter()
                    .any(|s| s.matches(&claim.labels)))
    }

    /// Whom it serves, for a refusal's message: `namespaces prod or namespaces labelled
    /// team=a, Services labelled tier=web`.
    pub fn serves(&self) -> String {
        let mut namespaces: Vec<String> = Vec::new();
        if !self.namespaces.is_empty() {
            namespaces.push(format!("namespaces {}", self.namespaces.join(", ")));
        }
        namespaces.extend(
            self.namespace_selectors
                .iter()
                .map(|s| format!("namespaces labelled {s}")),
        );
        let mut whom = if namespaces.is_empty() {
            "any namespace".to_owned()
        } else {
            namespaces.join(" or ")
        };
        if !self.service_selectors.is_empty() {
            let services: Vec<String> = self
                .service_selectors
                .iter()
                .map(ToString::to_string)
                .collect();
            whom.push_str(&format!(", Services labelled {}", services.join(" or ")));
        }
        whom
    }
}

/// Where a NodeSet's traffic goes on each node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum NodeAddressType {
    /// The node's `InternalIP`.
    InternalIp,
    /// The node's `ExternalIP`.
    ExternalIp,
}

/// How a NodeSet forwards to its nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Forwarding {
    /// LVS-DR: destination port = Service port; the node accepts the VIP itself.
    DirectRouting,
    /// NAT to the Service's NodePort.
    Masquerade,
    /// IP-in-IP to the Service port.
    Tunnel,
}

/// A NodeSet as the core sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSetSpec {
    /// The NodeSet's name.
    pub name: String,
    /// Which nodes (empty selector: all).
    pub selector: Selector,
    /// Which node address receives traffic.
    pub address_type: NodeAddressType,
    /// How traffic gets there.
    pub forwarding: Forwarding,
    /// The default scheduler.
    pub scheduler: Scheduler,
    /// Scheduler flags (`sh-port`, `mh-fallback`, ...).
    pub flags: ServiceFlags,
    /// Persistence timeout in seconds, if persistent.
    pub persistence: Option<u32>,
    /// How the directors check the nodes, if they do.
    pub health: Option<HealthPolicy>,
}

/// A NodeSet's health check: the check and where it points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPolicy {
    /// The probe and its timing.
    pub check: crate::health::Check,
    /// Which port of a node.
    pub target: CheckTarget,
    /// A fixed port, overriding `target`.
    pub port: Option<u16>,
    /// What a virtual service does when all its destinations fail.
    pub all_down: AllDown,
}

/// Which port of a node a check probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckTarget {
    /// `healthCheckNodePort` for Local Services, else the NodePort, else the destination port.
    Auto,
    /// The NodePort (else the destination port).
    NodePort,
    /// The Service port.
    ServicePort,
}

/// What a virtual service does when all its destinations fail their checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllDown {
    /// Keeps them all (fail open).
    KeepAll,
    /// Drops them all.
    Withdraw,
}

/// The well-known label that keeps a node out of every external load balancer.
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// Whether a node of a NodeSet takes traffic, before any health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Takes new connections.
    Serving,
    /// Its `Ready` condition is not `True`: no destination.
    NotReady,
    /// Labelled out of external load balancers: no destination.
    Excluded,
    /// Cordoned: a destination at weight 0, so live connections finish.
    Cordoned,
}

impl NodeInfo {
    /// Where the node stands, by the rules every director applies.
    pub fn standing(&self) -> Standing {
        if !self.ready {
            Standing::NotReady
        } else if self.labels.contains_key(EXCLUDE_LABEL) {
            Standing::Excluded
        } else if self.unschedulable {
            Standing::Cordoned
        } else {
            Standing::Serving
        }
    }
}

/// A Node as the core sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its `Ready` condition is `True`.
    pub ready: bool,
    /// `spec.unschedulable` (cordoned).
    pub unschedulable: bool,
    /// Its addresses by type.
    pub addresses: Vec<(NodeAddressType, IpAddr)>,
}

/// One port of an assigned Service, for the planner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ServicePort {
    /// The protocol.
    pub protocol: Protocol,
    /// The Service port (the virtual port).
    pub port: u16,
    /// The NodePort, if the Service has one (needed for masquerade).
    pub node_port: Option<u16>,
}

/// `spec.externalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TrafficPolicy {
    /// Any selected node.
    Cluster,
    /// Only nodes with a ready endpoint of the Service, weighted by their count.
    Local,
}

/// A Service with assigned VIPs, as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedService {
    /// `namespace/name`.
    pub name: ServiceName,
    /// `metadata.creationTimestamp` in seconds since the Unix epoch (`i64::MAX` when unknown):
    /// of Services claiming one virtual service, the oldest keeps it.
    pub created: i64,
    /// Its VIPs.
    pub addresses: Vec<IpAddr>,
    /// The pool the VIPs came from (chooses the NodeSet).
    pub pool: String,
    /// Its ports.
    pub ports: Vec<ServicePort>,
    /// `spec.externalTrafficPolicy`.
    pub traffic_policy: TrafficPolicy,
    /// The `ipvslb.io/scheduler` override.
    pub scheduler: Option<Scheduler>,
    /// Ready endpoints per node name (from EndpointSlices), for [`TrafficPolicy::Local`].
    pub ready_endpoints: BTreeMap<String, u32>,
    /// `spec.healthCheckNodePort` (Local Services only), which kube-proxy serves.
    pub health_check_node_port: Option<u16>,
}
