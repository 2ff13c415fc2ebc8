//! Each director's view of its NodeSets in their status: how many selected nodes take traffic,
//! which do not and why, and a `Ready` condition; Events on the NodeSet when a node's health
//! check fails or passes again. Written at most once a second, and only when it changed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipvslb_api::{DirectorBackends, NodeSet};
use ipvslb_core::health::Target;
use ipvslb_core::{NodeInfo, NodeSetSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::health::Checks;
use crate::translate;

/// The well-known label that keeps a node out of every external load balancer.
const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// What one NodeSet's status says, as last written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Summary {
    ready: u32,
    total: u32,
    /// `node: reason` for each selected node that takes no new connection.
    down: Vec<String>,
}

/// What the writer needs.
pub struct Writer {
    /// This director's name in the status.
    pub director: String,
    /// Writes the status.
    pub client: Client,
    /// The NodeSets, as the director caches them.
    pub node_sets: Store<NodeSet>,
    /// The Nodes, as the director caches them.
    pub nodes: Store<Node>,
    /// What is down.
    pub checks: Arc<Checks>,
    /// Publishes the Events.
    pub recorder: Recorder,
}

/// Writes the status of every NodeSet whenever this director's view of it changes, checking
/// once a second, until `shutdown`.
pub async fn run(writer: Writer, mut shutdown: watch::Receiver<bool>) {
    // Before the caches are filled every NodeSet would look empty.
    if crate::filled(&writer.node_sets).await.is_err()
        || crate::filled(&writer.nodes).await.is_err()
    {
        return;
    }
    let manager = format!("ipvslb-director-{}", writer.director);
    let mut written: BTreeMap<String, Summary> = BTreeMap::new();
    let mut since: BTreeMap<String, (bool, Time)> = BTreeMap::new();
    let mut was_down: BTreeSet<Target> = BTreeSet::new();
    loop {
        let down = writer.checks.down();
        let nodes: Vec<NodeInfo> = writer
            .nodes
            .state()
            .iter()
            .map(|n| translate::node(n))
            .collect();
        let sets: Vec<(Arc<NodeSet>, NodeSetSpec)> = writer
            .node_sets
            .state()
            .into_iter()
            .filter_map(|set| translate::node_set(&set).ok().map(|spec| (set, spec)))
            .collect();
        writer.announce(&sets, &nodes, &was_down, &down).await;
        was_down = down.clone();
        let failing: BTreeSet<IpAddr> = down.iter().map(|t| t.address).collect();
        for (set, spec) in &sets {
            let summary = summarize(spec, &nodes, &failing);
            if written.get(&spec.name) == Some(&summary) {
                continue;
            }
            let ready = summary.ready > 0;
            let transition = match since.get(&spec.name) {
                Some((was, at)) if *was == ready => at.clone(),
                _ => Time(k8s_openapi::jiff::Timestamp::now()),
            };
            since.insert(spec.name.clone(), (ready, transition.clone()));
            match writer.write(&manager, set, &summary, transition).await {
                Ok(()) => {
                    written.insert(spec.name.clone(), summary);
                }
                Err(e) => {
                    warn!(node_set = %spec.name, error = %e, "writing the NodeSet's status failed; retrying")
                }
            }
        }
        written.retain(|name, _| sets.iter().any(|(_, s)| &s.name == name));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// This director's view of `spec`'s nodes.
fn summarize(spec: &NodeSetSpec, nodes: &[NodeInfo], failing: &BTreeSet<IpAddr>) -> Summary {
    let selected: Vec<&NodeInfo> = nodes
        .iter()
        .filter(|n| spec.selector.matches(&n.labels))
        .collect();
    let down: Vec<String> = selected
        .iter()
        .filter_map(|node| {
            let reason = if !node.ready {
                "NotReady"
            } else if node.labels.contains_key(EXCLUDE_LABEL) {
                "Excluded"
            } else if node.unschedulable {
                "Cordoned"
            } else if node.addresses.iter().any(|(_, a)| failing.contains(a)) {
                "HealthCheckFailed"
            } else {
                return None;
            };
            Some(format!("{}: {reason}", node.name))
        })
        .collect();
    let total = selected.len() as u32;
    Summary {
        ready: total - down.len() as u32,
        total,
        down,
    }
}

impl Writer {
    async fn write(
        &self,
        manager: &str,
        set: &NodeSet,
        summary: &Summary,
        transition: Time,
    ) -> Result<(), kube::Error> {
        let (status, reason) = match (summary.ready, summary.total) {
            (0, _) => ("False", "NoneReady"),
            (r, t) if r == t => ("True", "AllReady"),
            _ => ("True", "SomeDown"),
        };
        let mut message = format!(
            "{} of {} nodes take new connections",
            summary.ready, summary.total
        );
        if !summary.down.is_empty() {
            message.push_str(&format!(" (not: {})", summary.down.join(", ")));
        }
        let entry = DirectorBackends {
            name: self.director.clone(),
            ready_backends: summary.ready,
            total_backends: summary.total,
            down: summary.down.clone(),
        };
        let patch = serde_json::json!({
            "apiVersion": "ipvslb.io/v1alpha1",
            "kind": "NodeSet",
            "status": {
                "readyBackends": summary.ready,
                "totalBackends": summary.total,
                "directors": [entry],
                "conditions": [{
                    "type": "Ready",
                    "status": status,
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": transition,
                    "observedGeneration": set.metadata.generation,
                }],
            }
        });
        let api: Api<NodeSet> = Api::all(self.client.clone());
        api.patch_status(
            &set.name_any(),
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        debug!(node_set = %set.name_any(), ready = summary.ready, total = summary.total, "NodeSet status written");
        Ok(())
    }

    /// Events on the NodeSets of each node whose check failed or passed again since the last
    /// look (the recorder counts repeats into a series).
    async fn announce(
        &self,
        sets: &[(Arc<NodeSet>, NodeSetSpec)],
        nodes: &[NodeInfo],
        before: &BTreeSet<Target>,
        now: &BTreeSet<Target>,
    ) {
        let changes = now
            .difference(before)
            .map(|t| (t, true))
            .chain(before.difference(now).map(|t| (t, false)));
        for (target, failed) in changes {
            let Some(node) = nodes
                .iter()
                .find(|n| n.addresses.iter().any(|(_, a)| *a == target.address))
            else {
                continue;
            };
            let (type_, reason, note) = if failed {
                (
                    EventType::Warning,
                    "BackendDown",
                    format!(
                        "node {} failed {} health checks of {}:{} in a row; new connections go elsewhere",
                        node.name, target.check.fall, target.address, target.port
                    ),
                )
            } else {
                (
                    EventType::Normal,
                    "BackendUp",
                    format!(
                        "node {} passed {} health checks of {}:{} in a row and takes traffic again",
                        node.name, target.check.rise, target.address, target.port
                    ),
                )
            };
            let event = Event {
                type_,
                reason: reason.to_owned(),
                note: Some(note),
                action: "HealthCheck".to_owned(),
                secondary: None,
            };
            for (set, _) in sets
                .iter()
                .filter(|(_, spec)| spec.selector.matches(&node.labels))
            {
                if let Err(e) = self.recorder.publish(&event, &set.object_ref(&())).await {
                    warn!(node_set = %set.name_any(), error = %e, reason, "could not publish an event");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ipvslb_core::{NodeAddressType, Selector};

    use super::*;

    fn node(name: &str, addr: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            labels: BTreeMap::new(),
            ready: true,
            unschedulable: false,
            addresses: vec![(NodeAddressType::InternalIp, addr.parse().unwrap())],
        }
    }

    #[test]
    fn every_selected_node_that_takes_no_new_connection_is_counted_with_its_reason() {
        let spec = NodeSetSpec {
            name: "default".into(),
            selector: Selector::default(),
            address_type: NodeAddressType::InternalIp,
            forwarding: ipvslb_core::Forwarding::DirectRouting,
            scheduler: ipvslb_ipvs::Scheduler::Rr,
            flags: ipvslb_ipvs::ServiceFlags::empty(),
            persistence: None,
            health: None,
        };
        let mut unready = node("n2", "10.0.0.2");
        unready.ready = false;
        let mut cordoned = node("n3", "10.0.0.3");
        cordoned.unschedulable = true;
        let nodes = [
            node("n1", "10.0.0.1"),
            unready,
            cordoned,
            node("n4", "10.0.0.4"),
        ];
        let failing: BTreeSet<IpAddr> = ["10.0.0.4".parse().unwrap()].into();
        assert_eq!(
            summarize(&spec, &nodes, &failing),
            Summary {
                ready: 1,
                total: 4,
                down: vec![
                    "n2: NotReady".into(),
                    "n3: Cordoned".into(),
                    "n4: HealthCheckFailed".into()
                ],
            }
        );
    }
}
