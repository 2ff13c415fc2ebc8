//! `Director`: one director host's own account of what it serves (`kubectl get directors`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::pool::Announce;

/// A director host, as it reports itself. Each director creates and updates the object of its
/// own name (`--director-name`); nothing else writes it, and an operator reads it to see which
/// director serves and announces what.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ipvslb.io",
    version = "v1alpha1",
    kind = "Director",
    doc = "A Director: one director host's own report of the VIPs it holds and announces and of its IPVS table.",
    plural = "directors",
    shortname = "dir",
    status = "DirectorStatus",
    printcolumn = r#"{"name":"Ready","type":"boolean","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Announce","type":"string","jsonPath":".spec.announce"}"#,
    printcolumn = r#"{"name":"Interface","type":"string","jsonPath":".spec.interface"}"#,
    printcolumn = r#"{"name":"VIPs","type":"integer","jsonPath":".status.vips"}"#,
    printcolumn = r#"{"name":"Announcing","type":"string","jsonPath":".status.announcing"}"#,
    printcolumn = r#"{"name":"Services","type":"integer","jsonPath":".status.virtualServices"}"#,
    printcolumn = r#"{"name":"Destinations","type":"integer","jsonPath":".status.destinations"}"#,
    printcolumn = r#"{"name":"Drift","type":"integer","jsonPath":".status.driftRepaired"}"#,
    printcolumn = r#"{"name":"Last-Pass","type":"date","jsonPath":".status.lastFullPass"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DirectorSpec {
    /// The announcement mode this director runs in: it announces the VIPs of the pools of
    /// this mode only.
    #[serde(default)]
    pub announce: Announce,
    /// The interface it announces on (`--l2-interface` or `--announce-interface`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

/// What a director holds, as of its last report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DirectorStatus {
    /// Whether its caches are filled and a full pass has programmed the kernel since it
    /// started (or since the last pass that failed).
    #[serde(default)]
    pub ready: bool,
    /// How many VIPs it holds (its `--interface`'s addresses).
    #[serde(default)]
    pub vips: u64,
    /// The VIPs it announces now, comma-separated (the `Announcing` column): the first 32,
    /// then `+N more`; empty when it announces none.
    #[serde(default)]
    pub announcing: String,
    /// How many VIPs it announces.
    #[serde(default)]
    pub announced: u64,
    /// The virtual services it owns in the kernel's IPVS table.
    #[serde(default)]
    pub virtual_services: u64,
    /// Their destinations.
    #[serde(default)]
    pub destinations: u64,
    /// When its last full pass ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_full_pass: Option<Time>,
    /// The kernel writes full passes made since it started to repair what someone else
    /// changed (`ipvsadm -C`, a VIP removed by hand).
    #[serde(default)]
    pub drift_repaired: u64,
    /// The live directors it elects L2 announcers among (its own Lease and its peers'), in
    /// `L2` mode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
}
