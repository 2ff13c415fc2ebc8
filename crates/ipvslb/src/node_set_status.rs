//! Each director's view of its NodeSets in their status: how many selected nodes take traffic,
//! which do not and why, and a `Ready` condition; Events on the NodeSet when a node's health
//! check fails or passes again. Written at most once a second, and only when it changed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipvslb_api::{DirectorBackends, NodeSet};
use ipvslb_core::health::Target;
use ipvslb_core::{AllDown, NodeInfo, NodeSetSpec, Standing};
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

/// What one NodeSet's status says, as last written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Summary {
    /// The NodeSet's `metadata.generation`, for `observedGeneration`.
    generation: Option<i64>,
    ready: u32,
    total: u32,
    /// `node: reason` for each selected node that takes no new connection.
    down: Vec<String>,
    /// The nodes among them whose health check fails.
    failing: BTreeSet<String>,
    /// Every node fails its check and the NodeSet keeps them all (`allDown: KeepAll`).
    failing_open: bool,
    /// Why the NodeSet cannot be used, if it cannot.
    invalid: Option<String>,
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
    // By uid: a NodeSet deleted and made again under its name is a new one.
    let mut written: BTreeMap<String, Summary> = BTreeMap::new();
    let mut since: BTreeMap<String, (bool, Time)> = BTreeMap::new();
    loop {
        let down = writer.checks.down();
        let nodes: Vec<NodeInfo> = writer
            .nodes
            .state()
            .iter()
            .map(|n| translate::node(n))
            .collect();
        let sets = writer.node_sets.state();
        for set in &sets {
            let uid = set.uid().unwrap_or_else(|| set.name_any());
            let summary = match translate::node_set(set) {
                Ok(spec) => summarize(&spec, &nodes, &down),
                Err(e) => Summary {
                    generation: None,
                    ready: 0,
                    total: 0,
                    down: Vec::new(),
                    failing: BTreeSet::new(),
                    failing_open: false,
                    invalid: Some(e.to_string()),
                },
            };
            let summary = Summary {
                generation: set.metadata.generation,
                ..summary
            };
            let before = written.get(&uid);
            if before == Some(&summary) {
                continue;
            }
            writer.announce(set, before, &summary).await;
            let ready = summary.ready > 0 || summary.failing_open;
            let transition = match since.get(&uid) {
                Some((was, at)) if *was == ready => at.clone(),
                _ => Time(k8s_openapi::jiff::Timestamp::now()),
            };
            since.insert(uid.clone(), (ready, transition.clone()));
            match writer.write(&manager, set, &summary, transition).await {
                Ok(()) => {
                    written.insert(uid, summary);
                }
                Err(e) => {
                    warn!(node_set = %set.name_any(), error = %e, "writing the NodeSet's status failed; retrying")
                }
            }
        }
        let live: BTreeSet<String> = sets
            .iter()
            .map(|s| s.uid().unwrap_or_else(|| s.name_any()))
            .collect();
        written.retain(|uid, _| live.contains(uid));
        since.retain(|uid, _| live.contains(uid));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// This director's view of `spec`'s nodes; a node fails its health check when a target of
/// this NodeSet's own check on one of its addresses is `down`.
fn summarize(spec: &NodeSetSpec, nodes: &[NodeInfo], down: &BTreeSet<Target>) -> Summary {
    let failing_addresses: BTreeSet<IpAddr> = match &spec.health {
        Some(policy) => down
            .iter()
            .filter(|t| t.check == policy.check)
            .map(|t| t.address)
            .collect(),
        None => BTreeSet::new(),
    };
    let selected: Vec<&NodeInfo> = nodes
        .iter()
        .filter(|n| spec.selector.matches(&n.labels))
        .collect();
    let mut failing = BTreeSet::new();
    let down: Vec<String> = selected
        .iter()
        .filter_map(|node| {
            let reason = match node.standing() {
                Standing::NotReady => "NotReady",
                Standing::Excluded => "Excluded",
                Standing::Cordoned => "Cordoned",
                Standing::Serving
                    if node
                        .addresses
                        .iter()
                        .any(|(_, a)| failing_addresses.contains(a)) =>
                {
                    failing.insert(node.name.clone());
                    "HealthCheckFailed"
                }
                Standing::Serving => return None,
            };
            Some(format!("{}: {reason}", node.name))
        })
        .collect();
    let total = selected.len() as u32;
    let ready = total - down.len() as u32;
    let keeps_all = spec
        .health
        .as_ref()
        .is_some_and(|p| p.all_down == AllDown::KeepAll);
    Summary {
        generation: None,
        ready,
        total,
        failing_open: keeps_all && ready == 0 && !failing.is_empty(),
        down,
        failing,
        invalid: None,
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
        let (status, reason, message) = condition(summary);
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
                    "observedGeneration": summary.generation,
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

    /// An Event on the NodeSet for each node whose health check started or stopped failing
    /// (the recorder counts repeats into a series). A node that only left the NodeSet, or went
    /// NotReady, gets none.
    async fn announce(&self, set: &NodeSet, before: Option<&Summary>, now: &Summary) {
        let was = before.map(|b| b.failing.clone()).unwrap_or_default();
        let still_down: BTreeSet<&str> = now
            .down
            .iter()
            .filter_map(|d| d.split(':').next())
            .collect();
        let changes = now.failing.difference(&was).map(|n| (n, true)).chain(
            was.difference(&now.failing)
                .filter(|n| !still_down.contains(n.as_str()))
                .map(|n| (n, false)),
        );
        for (node, failed) in changes {
            let (type_, reason, note) = if failed {
                (
                    EventType::Warning,
                    "BackendDown",
                    format!("node {node} fails its health check; new connections go elsewhere"),
                )
            } else {
                (
                    EventType::Normal,
                    "BackendUp",
                    format!("node {node} passes its health check again and takes traffic"),
                )
            };
            let event = Event {
                type_,
                reason: reason.to_owned(),
                note: Some(note),
                action: "HealthCheck".to_owned(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&event, &set.object_ref(&())).await {
                warn!(node_set = %set.name_any(), error = %e, reason, "could not publish an event");
            }
        }
    }
}

/// The `Ready` condition's status, reason and message.
fn condition(summary: &Summary) -> (&'static str, &'static str, String) {
    if let Some(why) = &summary.invalid {
        return ("False", "Invalid", why.clone());
    }
    let mut message = format!(
        "{} of {} nodes take new connections",
        summary.ready, summary.total
    );
    if !summary.down.is_empty() {
        message.push_str(&format!(" (not: {})", summary.down.join(", ")));
    }
    if summary.failing_open {
        message.push_str("; every node fails its check, and allDown: KeepAll keeps them all");
        return ("True", "FailingOpen", message);
    }
    let (status, reason) = match (summary.ready, summary.total) {
        (0, _) => ("False", "NoneReady"),
        (r, t) if r == t => ("True", "AllReady"),
        _ => ("True", "SomeDown"),
    };
    (status, reason, message)
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

    fn check() -> ipvslb_core::health::Check {
        ipvslb_core::health::Check {
            probe: ipvslb_core::health::Probe::Tcp,
            interval: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_millis(500),
            rise: 2,
            fall: 3,
        }
    }

    fn spec(all_down: AllDown) -> NodeSetSpec {
        NodeSetSpec {
            name: "default".into(),
            selector: Selector::default(),
            address_type: NodeAddressType::InternalIp,
            forwarding: ipvslb_core::Forwarding::DirectRouting,
            scheduler: ipvslb_ipvs::Scheduler::Rr,
            flags: ipvslb_ipvs::ServiceFlags::empty(),
            persistence: None,
            health: Some(ipvslb_core::HealthPolicy {
                check: check(),
                target: ipvslb_core::CheckTarget::Auto,
                port: Some(8081),
                all_down,
            }),
        }
    }

    fn down_at(addrs: &[&str], check: ipvslb_core::health::Check) -> BTreeSet<Target> {
        addrs
            .iter()
            .map(|a| Target {
                address: a.parse().unwrap(),
                port: 8081,
                check: check.clone(),
            })
            .collect()
    }

    #[test]
    fn every_selected_node_that_takes_no_new_connection_is_counted_with_its_reason() {
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
        let summary = summarize(
            &spec(AllDown::KeepAll),
            &nodes,
            &down_at(&["10.0.0.4"], check()),
        );
        assert_eq!((summary.ready, summary.total), (1, 4));
        assert_eq!(
            summary.down,
            ["n2: NotReady", "n3: Cordoned", "n4: HealthCheckFailed"]
        );
        assert_eq!(summary.failing, ["n4".to_owned()].into());
        assert!(!summary.failing_open);
    }

    #[test]
    fn only_this_node_sets_own_check_fails_its_nodes_and_all_failing_with_keep_all_is_open() {
        let nodes = [node("n1", "10.0.0.1"), node("n2", "10.0.0.2")];
        // Another NodeSet's check (other timing) on these addresses is not this one's.
        let mut other = check();
        other.interval = std::time::Duration::from_secs(7);
        let summary = summarize(
            &spec(AllDown::KeepAll),
            &nodes,
            &down_at(&["10.0.0.1"], other),
        );
        assert_eq!((summary.ready, summary.total), (2, 2));
        let all = down_at(&["10.0.0.1", "10.0.0.2"], check());
        let open = summarize(&spec(AllDown::KeepAll), &nodes, &all);
        assert!(open.failing_open);
        assert_eq!(condition(&open).1, "FailingOpen");
        let withdrawn = summarize(&spec(AllDown::Withdraw), &nodes, &all);
        assert_eq!(condition(&withdrawn).1, "NoneReady");
    }
}
