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

    /// How directors check that a node can take traffic (used by directors that probe).
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

/// A node health check.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// What to probe.
    #[serde(rename = "type")]
    pub kind: HealthCheckType,
    /// The port to probe; absent: the Service port (or NodePort under masquerade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// The HTTP path, for `HTTP` checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub path: Option<String>,
    /// Seconds between probes.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub interval_seconds: u32,
    /// Seconds before one probe fails.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: u32,
    /// Successes in a row that bring a node back.
    #[serde(default = "default_rise")]
    #[schemars(range(min = 1, max = 100))]
    pub rise: u32,
    /// Failures in a row that take a node out.
    #[serde(default = "default_fall")]
    #[schemars(range(min = 1, max = 100))]
    pub fall: u32,
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

/// What ipvslb has made of a NodeSet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSetStatus {
    /// Nodes selected and able to take traffic.
    #[serde(default)]
    pub ready_backends: u32,
    /// Nodes selected.
    #[serde(default)]
    pub total_backends: u32,
    /// `Ready` and friends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

fn default_interval() -> u32 {
    5
}

fn default_timeout() -> u32 {
    2
}

fn default_rise() -> u32 {
    2
}

fn default_fall() -> u32 {
    3
}
