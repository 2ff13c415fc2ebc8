//! `IPPool`: the addresses ipvslb may hand out as VIPs, and to which Services.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::names::DEFAULT_NODE_SET;

/// A pool of VIP addresses (`kubectl get ippools`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ipvslb.io",
    version = "v1alpha1",
    kind = "IPPool",
    doc = "An IPPool: addresses ipvslb may assign as VIPs, and to which Services.",
    plural = "ippools",
    shortname = "ipp",
    status = "IPPoolStatus",
    printcolumn = r#"{"name":"Addresses","type":"string","jsonPath":".spec.addresses"}"#,
    printcolumn = r#"{"name":"Auto-Assign","type":"boolean","jsonPath":".spec.autoAssign"}"#,
    printcolumn = r#"{"name":"Assigned","type":"integer","jsonPath":".status.assigned"}"#,
    printcolumn = r#"{"name":"Available","type":"string","jsonPath":".status.available"}"#,
    printcolumn = r#"{"name":"NodeSet","type":"string","jsonPath":".spec.nodeSet"}"#,
    printcolumn = r#"{"name":"Announce","type":"string","jsonPath":".spec.announce"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolSpec {
    /// The pool's addresses: CIDRs (`10.240.0.208/29`, `2001:db8::/64`), `first-last` ranges
    /// (`10.240.0.210-10.240.0.215`) or single addresses, IPv4 and IPv6 mixed as needed.
    #[schemars(length(min = 1, max = 256))]
    pub addresses: Vec<PoolAddress>,

    /// Whether Services that name no pool and no address may get addresses from this pool.
    #[serde(default = "default_true")]
    pub auto_assign: bool,

    /// Skip IPv4 addresses ending in `.0` and `.255`, which some old network gear mishandles.
    #[serde(default, rename = "avoidBuggyIPs")]
    pub avoid_buggy_ips: bool,

    /// The NodeSet whose nodes receive the traffic of this pool's VIPs.
    #[serde(default = "default_node_set")]
    #[schemars(length(min = 1, max = 253))]
    pub node_set: String,

    /// Which Services this pool serves; absent: any Service. A restriction: a Service it does
    /// not select never gets an address of this pool, whether it names the pool, requests one
    /// of its addresses or relies on auto-assignment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_allocation: Option<ServiceAllocation>,

    /// The load-balancer class of the ipvslb installation that uses this pool (its
    /// `--load-balancer-class`); absent: the default class, `ipvslb.io/ipvs`. Another
    /// installation never assigns, programs or reports this pool's addresses, and where pools
    /// of two classes overlap the older pool keeps the shared addresses for both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub load_balancer_class: Option<String>,

    /// How the directors make this pool's VIPs reachable: `None` (the network routes the
    /// ranges to the directors statically), `L2` (one elected director answers ARP and NDP for
    /// each VIP on its `--l2-interface`) or `BGP` (each director serving a VIP puts it on its
    /// `--announce-interface`, which the host's routing daemon exports). A director announces
    /// only the pools of the mode it runs in.
    #[serde(default)]
    pub announce: Announce,
}

/// How a pool's VIPs are announced (`spec.announce`).
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    JsonSchema,
)]
pub enum Announce {
    /// Not at all: static routes to the directors, or a router configured by hand.
    #[default]
    None,
    /// ARP (IPv4) and NDP (IPv6) from one director per VIP, elected through Leases.
    L2,
    /// Through the routing daemon on each director that serves the VIP.
    #[serde(rename = "BGP")]
    Bgp,
}

impl std::fmt::Display for Announce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Announce::None => "None",
            Announce::L2 => "L2",
            Announce::Bgp => "BGP",
        })
    }
}

/// One entry of `spec.addresses`: a CIDR, a `first-last` range, or one address.
#[derive(
    Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(transparent)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "isCIDR(self) || isIP(self) || (self.split('-').size() == 2 && isIP(self.split('-')[0].trim()) && isIP(self.split('-')[1].trim()) && ip(self.split('-')[0].trim()).family() == ip(self.split('-')[1].trim()).family())",
        "message": "must be a CIDR (10.240.0.208/29, 2001:db8::/64), a range of one family (10.240.0.210-10.240.0.215) or an IP address"
    },
    {
        "rule": "!isCIDR(self) || cidr(self).masked() == cidr(self)",
        "message": "the CIDR has host bits set: write its network address (for example 10.240.0.208/29, not 10.240.0.210/29)"
    }
]))]
pub struct PoolAddress(#[schemars(length(min = 1, max = 100))] pub String);

/// Which Services a pool serves, and how much it is preferred. A Service qualifies when its
/// namespace is named in `namespaces` or matches one of `namespaceSelectors` (both empty: any
/// namespace), and, if `serviceSelectors` is set, its labels match one of them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAllocation {
    /// Among the pools that select a Service, a higher priority is tried first (MetalLB's
    /// `serviceAllocation.priority` runs the other way: lower first). Pools with a
    /// serviceAllocation come before pools without one.
    #[serde(default)]
    pub priority: i32,
    /// Namespaces served, by name; a namespace named here or matching `namespaceSelectors`
    /// qualifies (both empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub namespaces: Vec<String>,
    /// Namespaces served, by label: any selector may match; an alternative to `namespaces`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub namespace_selectors: Vec<LabelSelector>,
    /// Services served, by label, within the namespaces above: any selector may match (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub service_selectors: Vec<LabelSelector>,
}

/// What ipvslb has made of a pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolStatus {
    /// Assigned addresses, both families (the `Assigned` column).
    #[serde(default)]
    pub assigned: u64,
    /// Addresses still free, both families, in decimal (the `Available` column). A string
    /// because an IPv6 pool can hold up to 2^128 addresses, far beyond a JSON integer; it
    /// saturates at 2^128-1 (only `::/0` reaches it).
    #[serde(default)]
    pub available: String,
    /// Assigned IPv4 addresses.
    #[serde(default, rename = "assignedIPv4")]
    pub assigned_ipv4: u64,
    /// Assigned IPv6 addresses.
    #[serde(default, rename = "assignedIPv6")]
    pub assigned_ipv6: u64,
    /// Free IPv4 addresses (at most 2^32, so an integer).
    #[serde(default, rename = "availableIPv4")]
    pub available_ipv4: u64,
    /// Free IPv6 addresses in decimal (a string: see `available`).
    #[serde(default, rename = "availableIPv6")]
    pub available_ipv6: String,
    /// Assigned address -> the Services holding it (`namespace/name`, comma-separated when
    /// shared). At most `MAX_STATUS_ALLOCATIONS` entries, lowest addresses first.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub allocations: BTreeMap<String, String>,
    /// True when `allocations` was cut at its limit; the counts above stay exact.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allocations_truncated: bool,
    /// Services holding addresses of this pool that it would not give them as now written
    /// (its serviceAllocation, autoAssign or avoidBuggyIPs changed after they got them, or it
    /// is invalid). They keep their addresses: a pool edit changes new assignments only.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub non_matching_holders: u64,
    /// `Ready`, `Overlapping`, `Invalid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn default_true() -> bool {
    true
}

fn default_node_set() -> String {
    DEFAULT_NODE_SET.to_owned()
}
