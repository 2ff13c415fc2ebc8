//! `ipvslb plan`: the allocator and the director's planner run over manifests read from files,
//! with the same core code as the controllers, and their decisions printed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipvslb_core::alloc::allocate_all;
use ipvslb_core::{PlannedService, ServiceName};
use ipvslb_ipvs::Table;
use serde::Serialize;

use crate::manifests::{self, Manifests};
use crate::translate::{self, ClassPolicy};

/// Why a plan could not be made at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The manifests could not be read.
    #[error(transparent)]
    Manifests(#[from] manifests::Error),
    /// An object is invalid.
    #[error("{origin}: {source}")]
    Invalid {
        /// Where the object came from.
        origin: manifests::Origin,
        /// What is wrong.
        #[source]
        source: translate::Invalid,
    },
}

/// The outcome for one Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceOutcome {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its VIPs, primary family first; empty when pending.
    pub ingress: Vec<IpAddr>,
    /// The pool they came from.
    pub pool: Option<String>,
    /// Why it has no VIP; `None` when assigned.
    pub reason: Option<String>,
}

/// Everything `plan` decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Per Service, in name order.
    pub services: Vec<ServiceOutcome>,
    /// The desired IPVS table.
    pub table: Table,
    /// Notes for the operator: ignored objects, pool problems, Services planned only in part.
    pub notes: Vec<String>,
}

/// Runs allocation then planning over `manifests`.
pub fn run(manifests: &Manifests, classes: &ClassPolicy) -> Result<Outcome, Error> {
    let mut notes: Vec<String> = manifests
        .ignored
        .iter()
        .map(|(origin, kind)| format!("{origin}: ignored {kind}: plan reads Services, IPPools, NodeSets, Nodes, EndpointSlices and Namespaces"))
        .collect();
    // An invalid pool stops the plan (fix it first); the controllers freeze it instead, which
    // a plan of the fixed pool shows exactly. Pools of another class only fence addresses off.
    let pools = manifests
        .pools
        .iter()
        .map(|(origin, p)| match translate::pool_for(p, classes) {
            (_, Some(source)) => Err(Error::Invalid {
                origin: origin.clone(),
                source,
            }),
            (spec, None) => Ok(spec),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let node_sets = manifests
        .node_sets
        .iter()
        .map(|(origin, s)| {
            translate::node_set(s).map_err(|source| Error::Invalid {
                origin: origin.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let nodes: Vec<_> = manifests
        .nodes
        .iter()
        .map(|(_, n)| translate::node(n))
        .collect();
    let namespace_labels: BTreeMap<String, std::sync::Arc<BTreeMap<String, String>>> = manifests
        .namespaces
        .iter()
        .map(|(_, ns)| {
            (
                ns.metadata.name.clone().unwrap_or_default(),
                std::sync::Arc::new(ns.metadata.labels.clone().unwrap_or_default()),
            )
        })
        .collect();

    let services: BTreeMap<ServiceName, _> = manifests
        .services
        .iter()
        .map(|(_, s)| s)
        .filter(|s| classes.serves(s))
        .map(|s| (translate::service_name(s), s))
        .collect();
    let no_labels = std::sync::Arc::default();
    let claims: Vec<_> = services
        .iter()
        .map(|(name, s)| {
            translate::claim(
                s,
                namespace_labels.get(&name.namespace).unwrap_or(&no_labels),
            )
        })
        .collect();
    let allocation = allocate_all(pools.clone(), &claims);
    notes.extend(
        allocation
            .released
            .iter()
            .map(|(name, released)| format!("{name}: {released}")),
    );
    let pools: Vec<_> = pools
        .into_iter()
        .filter(|p| p.role == ipvslb_core::PoolRole::Serving)
        .collect();
    notes.extend(
        allocation
            .problems
            .iter()
            .map(|p| format!("pool problem: {p}")),
    );

    let endpoints = translate::ready_endpoints(manifests.endpoint_slices.iter().map(|(_, s)| s));
    let mut outcomes = Vec::new();
    let mut planned: Vec<PlannedService> = Vec::new();
    for (name, service) in &services {
        let mut outcome = ServiceOutcome {
            namespace: name.namespace.clone(),
            name: name.name.clone(),
            ingress: Vec::new(),
            pool: None,
            reason: None,
        };
        match allocation.results.get(name) {
            Some(Ok(assignment)) => {
                outcome.ingress = assignment.addresses.clone();
                outcome.pool = Some(assignment.pool.clone());
                let ready = endpoints.get(name).cloned().unwrap_or_default();
                match translate::planned_service(
                    service,
                    assignment.addresses.clone(),
                    assignment.pool.clone(),
                    ready,
                ) {
                    Ok(p) => planned.push(p),
                    Err(e) => notes.push(format!("{name}: not planned: {e}")),
                }
            }
            Some(Err(e)) => outcome.reason = Some(e.to_string()),
            None => outcome.reason = Some("not considered by the allocator".into()),
        }
        outcomes.push(outcome);
    }
    let plan = ipvslb_core::plan::plan(&planned, &pools, &node_sets, &nodes);
    notes.extend(
        plan.problems
            .iter()
            .map(|p| format!("{}: {}", p.service, p.error)),
    );
    Ok(Outcome {
        services: outcomes,
        table: plan.table,
        notes,
    })
}

/// The JSON form: `{"services": [...], "ipvs": [...]}`.
#[derive(Serialize)]
struct JsonOutcome<'a> {
    services: &'a [ServiceOutcome],
    ipvs: Vec<JsonVirtualService>,
}

#[derive(Serialize)]
struct JsonVirtualService {
    address: Option<IpAddr>,
    protocol: Option<String>,
    port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fwmark: Option<u32>,
    scheduler: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    persistence: Option<u32>,
    destinations: Vec<JsonDestination>,
}

#[derive(Serialize)]
struct JsonDestination {
    address: IpAddr,
    port: u16,
    forwarding: String,
    weight: u32,
}

impl Outcome {
    /// One JSON object, as `plan -o json` prints it.
    pub fn to_json(&self) -> String {
        let ipvs = self
            .table
            .services
            .values()
            .map(|entry| {
                let vs = &entry.service;
                let (address, protocol, port, fwmark) = match vs.key {
                    ipvslb_ipvs::ServiceKey::Addr {
                        address,
                        protocol,
                        port,
                    } => (Some(address), Some(protocol.to_string()), Some(port), None),
                    ipvslb_ipvs::ServiceKey::FwMark { mark, .. } => (None, None, None, Some(mark)),
                };
                JsonVirtualService {
                    address,
                    protocol,
                    port,
                    fwmark,
                    scheduler: vs.scheduler.to_string(),
                    persistence: (vs.timeout > 0).then_some(vs.timeout),
                    destinations: entry
                        .destinations
                        .values()
                        .map(|d| JsonDestination {
                            address: d.address,
                            port: d.port,
                            forwarding: d.forwarding.to_string(),
                            weight: d.weight,
                        })
                        .collect(),
                }
            })
            .collect();
        let json = JsonOutcome {
            services: &self.services,
            ipvs,
        };
        // Serializing plain structs of strings and numbers cannot fail.
        serde_json::to_string_pretty(&json).unwrap_or_default()
    }

    /// Two tables: the Services with their EXTERNAL-IP or reason, then the IPVS table in the
    /// layout of `ipvsadm -L -n`.
    pub fn to_text(&self) -> String {
        let rows: Vec<[String; 5]> = self
            .services
            .iter()
            .map(|s| {
                let ips = s.ingress.iter().map(IpAddr::to_string).collect::<Vec<_>>();
                [
                    s.namespace.clone(),
                    s.name.clone(),
                    if ips.is_empty() {
                        "<pending>".into()
                    } else {
                        ips.join(",")
                    },
                    s.pool.clone().unwrap_or_else(|| "<none>".into()),
                    s.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        let mut out = String::new();
        let header = ["NAMESPACE", "NAME", "EXTERNAL-IP", "POOL", "REASON"].map(String::from);
        let widths: Vec<usize> = (0..5)
            .map(|i| {
                rows.iter()
                    .chain([&header])
                    .map(|r| r[i].len())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in [&header].into_iter().chain(rows.iter()) {
            let line: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            let _ = writeln!(out, "{}", line.join("   ").trim_end());
        }
        let _ = write!(out, "\n{}", ipvslb_ipvs::Listing(&self.table));
        out
    }
}
