//! `NodeSet`: which nodes receive a pool's traffic, and how IPVS sends it there.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A set of Kubernetes nodes that IPVS balances a pool's VIPs over (`kubectl get nodesets`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ipvslb.io",
    version = "v1alpha1",
    kind = "NodeSet",
    doc = "A NodeSet: the nodes that receive a pool's traffic, and how IPVS forwards it there.",
    plural = "nodesets",
    shortname = "nset",
    status = "NodeSetStatus",
    printcolumn = r#"{"name":"Forwarding","type":"string","jsonPath":".spec.forwarding"}"#,
    printcolumn = r#"{"name":"Scheduler","type":"string","jsonPath":".spec.scheduler"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyBackends"}"#,
    printcolumn = r#"{"name":"Total","type":"integer","jsonPath":".status.totalBackends"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.schedulerFlags) || self.schedulerFlags.all(f, !f.startsWith('sh-') || self.scheduler == 'sh')",
        "message": "schedulerFlags sh-fallback and sh-port need scheduler sh"
    },
    {
        "rule": "!has(self.schedulerFlags) || self.schedulerFlags.all(f, !f.startsWith('mh-') || self.scheduler == 'mh')",
        "message": "schedulerFlags mh-fallback and mh-port need scheduler mh"
    }
]))]
pub struct NodeSetSpec {
    /// Which Nodes belong to the set; empty selects every node.
    #[serde(default)]
    pub node_selector: LabelSelector,

    /// Which node address receives the traffic.
    #[serde(default)]
    pub address_type: NodeAddressType,

    /// How IPVS forwards to the nodes.
    #[serde(default)]
    pub forwarding: Forwarding,

    /// The IPVS scheduler; a Service may override it with the `ipvslb.io/scheduler` annotation.
    #[serde(default)]
    pub scheduler: SchedulerName,

    /// Scheduler flags, as `ipvsadm -b` takes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    pub scheduler_flags: Vec<SchedulerFlag>,

    /// Client affinity: connections from one client go to one node for this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistence: Option<Persistence>,

    /// How every director checks that a node can take traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

/// Which node address is a destination.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum NodeAddressType {
    /// The node's `InternalIP`.
    #[default]
    InternalIP,
    /// The node's `ExternalIP`.
    ExternalIP,
}

/// How IPVS forwards to a node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Forwarding {
    /// Classic LVS-DR: the packet keeps the VIP and the Service port; kube-proxy on the node
    /// accepts the VIP. Director and nodes share a layer-2 segment.
    #[default]
    DirectRouting,
    /// NAT to the Service's NodePort; replies must route back through the director.
    Masquerade,
    /// IP-in-IP to the Service port; the node decapsulates and accepts the VIP.
    Tunnel,
}

/// An IPVS scheduler, by its kernel name.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerName {
    /// Round robin.
    #[default]
    Rr,
    /// Weighted round robin.
    Wrr,
    /// Least connection.
    Lc,
    /// Weighted least connection.
    Wlc,
    /// Locality-based least connection.
    Lblc,
    /// Locality-based least connection with replication.
    Lblcr,
    /// Destination hashing.
    Dh,
    /// Source hashing.
    Sh,
    /// Shortest expected delay.
    Sed,
    /// Never queue.
    Nq,
    /// Weighted failover.
    Fo,
    /// Weighted overflow.
    Ovf,
    /// Maglev hashing.
    Mh,
}

/// A scheduler flag, as `ipvsadm -b` spells it.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum SchedulerFlag {
    /// `sh`: try the next destination when the hashed one is unavailable.
    ShFallback,
    /// `sh`: hash the source port too.
    ShPort,
    /// `mh`: try the next destination when the hashed one is unavailable.
    MhFallback,
    /// `mh`: hash the source port too.
    MhPort,
}

/// Client persistence.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Persistence {
    /// How long a client sticks to its node after its last connection, in seconds.
    #[schemars(range(min = 1, max = 2678400))]
    pub timeout_seconds: u32,
}

/// A node health check, run by every director against each destination it programs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.type == 'HTTP' || (!has(self.path) && !has(self.host))",
        "message": "path and host are for HTTP checks"
    },
    {
        "rule": "duration(self.interval) >= duration('10ms') && duration(self.interval) <= duration('1h')",
        "message": "interval must be 10ms to 1h"
    },
    {
        "rule": "duration(self.timeout) > duration('0s')",
        "message": "timeout must be above zero"
    }
]))]
pub struct HealthCheck {
    /// What to probe.
    #[serde(rename = "type")]
    pub kind: HealthCheckType,
    /// Which port of the node to probe; `port` overrides it.
    #[serde(default)]
    pub target: HealthCheckTarget,
    /// A fixed port to probe on every node (a node agent's, say), whatever `target` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// The HTTP path, for `HTTP` checks (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), regex(pattern = r"^/"))]
    pub path: Option<String>,
    /// The HTTP `Host` header, for `HTTP` checks (default: the node's address and port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub host: Option<String>,
    /// Time between two probes of one destination, such as `500ms` or `5s` (10 ms to 1 h).
    /// Each destination's probes are spread over the interval, with a jitter of a tenth of it.
    #[serde(default = "default_interval")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub interval: String,
    /// How long one probe may take before it counts as failed, such as `1s`; a timeout longer
    /// than the interval is cut to it.
    #[serde(default = "default_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub timeout: String,
    /// Successes in a row that bring a failed destination back.
    #[serde(default = "default_rise")]
    #[schemars(range(min = 1, max = 100))]
    pub rise: u32,
    /// Failures in a row that take a destination out (weight 0, then removed once drained).
    #[serde(default = "default_fall")]
    #[schemars(range(min = 1, max = 100))]
    pub fall: u32,
    /// What happens when every destination of a virtual service fails its checks.
    #[serde(default)]
    pub all_down: AllDown,
}

/// The kind of health check.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum HealthCheckType {
    /// A TCP connect.
    TCP,
    /// An HTTP GET answered with 2xx or 3xx.
    HTTP,
    /// No check: the Node's Ready condition alone decides.
    None,
}

/// Which port of a node a check probes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum HealthCheckTarget {
    /// The Service's `healthCheckNodePort` for `externalTrafficPolicy: Local` (kube-proxy
    /// answers 200 only where the node has a ready endpoint, as cloud load balancers probe),
    /// else the port's NodePort when it has one (kube-proxy's path to a pod), else the port
    /// the destination receives.
    #[default]
    Auto,
    /// The port's NodePort (else the port the destination receives).
    NodePort,
    /// The Service port (for nodes that serve the VIP themselves).
    ServicePort,
}

/// What a virtual service does when all its destinations fail their checks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AllDown {
    /// Keep every destination (fail open, as keepalived does): a check that fails everywhere
    /// at once more likely says something about the check or the director than the nodes.
    #[default]
    KeepAll,
    /// Remove them all: new connections are refused.
    Withdraw,
}

/// What ipvslb has made of a NodeSet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSetStatus {
    /// Nodes selected and able to take traffic, as the director that wrote last sees them
    /// (the `Ready` column; `directors` has each director's view).
    #[serde(default)]
    pub ready_backends: u32,
    /// Nodes selected (the `Total` column).
    #[serde(default)]
    pub total_backends: u32,
    /// Each director's view: which selected nodes it sends traffic to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub directors: Vec<DirectorBackends>,
    /// `Ready`: some selected node takes traffic (reasons `AllReady`, `SomeDown`, `NoneReady`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One director's view of a NodeSet's nodes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DirectorBackends {
    /// The director (its host name, or `--director-name`).
    pub name: String,
    /// Selected nodes it sends new connections to.
    pub ready_backends: u32,
    /// Selected nodes.
    pub total_backends: u32,
    /// Selected nodes it does not send new connections to, each with why (`NotReady`,
    /// `Cordoned`, `Excluded`, `HealthCheckFailed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub down: Vec<String>,
}

fn default_interval() -> String {
    "5s".to_owned()
}

fn default_timeout() -> String {
    "2s".to_owned()
}

fn default_rise() -> u32 {
    2
}

fn default_fall() -> u32 {
    3
}
