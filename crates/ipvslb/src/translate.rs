//! The one place where Kubernetes objects become the core's plain types. Errors name the object
//! and the field, since they end up in an Event, a condition or `ipvslb plan`'s output.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use ipvslb_api::{
    ANNOTATION_ALLOW_SHARED_IP, ANNOTATION_LOAD_BALANCER_IPS, ANNOTATION_POOL,
    ANNOTATION_SCHEDULER, IPPool, LABEL_SERVICE_NAME, NodeSet, SchedulerFlag, SchedulerName,
};
use ipvslb_core::health::{Check, Probe};
use ipvslb_core::{
    AllDown, CheckTarget, FamilyPolicy, Forwarding, HealthPolicy, IpFamily, NodeAddressType,
    NodeInfo, NodeSetSpec, PoolRole, PoolSpec, PortKey, Requested, Requirement, Selector,
    ServiceAllocation, ServiceClaim, ServiceName, ServicePort, TrafficPolicy,
};
use ipvslb_ipvs::{Protocol, Scheduler, ServiceFlags};
use k8s_openapi::api::core::v1::{LoadBalancerStatus, Node, Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// An object that cannot be used as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name}: {field}: {message}")]
pub struct Invalid {
    /// The object's kind.
    pub kind: &'static str,
    /// Its name (`namespace/name` when namespaced).
    pub name: String,
    /// The field at fault.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Which load-balancer classes this ipvslb serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassPolicy {
    /// The class served (`ipvslb.io/ipvs` by default).
    pub class: String,
    /// Whether Services without a class are served too.
    pub unclassed: Unclassed,
}

/// What to do with LoadBalancer Services that name no `loadBalancerClass`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Unclassed {
    /// Serve them (the cluster's only load-balancer implementation).
    Serve,
    /// Leave them to another implementation.
    Ignore,
}

impl ClassPolicy {
    /// Whether `service` is a LoadBalancer Service this ipvslb serves.
    pub fn serves(&self, service: &Service) -> bool {
        let Some(spec) = &service.spec else {
            return false;
        };
        if spec.type_.as_deref() != Some("LoadBalancer") {
            return false;
        }
        match &spec.load_balancer_class {
            Some(class) => *class == self.class,
            None => self.unclassed == Unclassed::Serve,
        }
    }

    /// Whether `pool` belongs to this installation: its `loadBalancerClass`, or the default
    /// class when it names none.
    pub fn uses_pool(&self, pool: &IPPool) -> bool {
        pool_class(pool) == self.class
    }
}

/// The load-balancer class a pool belongs to.
pub fn pool_class(pool: &IPPool) -> &str {
    pool.spec
        .load_balancer_class
        .as_deref()
        .unwrap_or(ipvslb_api::LOAD_BALANCER_CLASS)
}

/// The `namespace/name` of a namespaced object.
pub fn service_name(service: &impl kube::Resource) -> ServiceName {
    let meta = service.meta();
    ServiceName::new(
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or(""),
    )
}

/// The addresses recorded in `status.loadBalancer.ingress`, as written.
pub fn ingress_ips(service: &Service) -> Vec<String> {
    service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ingress| ingress.iter().filter_map(|i| i.ip.clone()).collect())
        .unwrap_or_default()
}

/// The recorded ingress addresses that are IP addresses.
pub fn ingress_addresses(service: &Service) -> Vec<IpAddr> {
    load_balancer_addresses(
        service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref()),
    )
}

/// The ingress addresses of a `status.loadBalancer` that are IP addresses.
pub fn load_balancer_addresses(status: Option<&LoadBalancerStatus>) -> Vec<IpAddr> {
    status
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

/// What `service` asks of the allocator. Malformed requests become [`Requested::Malformed`]
/// rather than errors, so the Service keeps what it has and gets a readable reason.
pub fn claim(
    service: &Service,
    namespace_labels: &std::sync::Arc<BTreeMap<String, String>>,
) -> ServiceClaim {
    let spec = service.spec.clone().unwrap_or_default();
    let annotations = service.metadata.annotations.clone().unwrap_or_default();
    let requested = requested(
        spec.load_balancer_ip.as_deref(),
        annotations.get(ANNOTATION_LOAD_BALANCER_IPS),
    );
    let current = ingress_addresses(service);
    ServiceClaim {
        name: service_name(service),
        created: created(service),
        families: family_policy(&spec, &requested),
        requested,
        pool: annotations
            .get(ANNOTATION_POOL)
            .map(|p| p.trim().to_owned()),
        sharing_key: annotations
            .get(ANNOTATION_ALLOW_SHARED_IP)
            .map(|k| k.trim().to_owned()),
        ports: spec
            .ports
            .unwrap_or_default()
            .iter()
            .filter_map(|p| {
                Some(PortKey {
                    protocol: protocol(p.protocol.as_deref())?,
                    port: u16::try_from(p.port).ok()?,
                })
            })
            .collect(),
        current,
        labels: service.metadata.labels.clone().unwrap_or_default(),
        namespace_labels: namespace_labels.clone(),
    }
}

/// The addresses requested by `spec.loadBalancerIP` and the `ipvslb.io/load-balancer-ips`
/// annotation; when both are set the field must be one of the annotation's addresses.
fn requested(field: Option<&str>, annotation: Option<&String>) -> Requested {
    let mut addresses: Vec<IpAddr> = Vec::new();
    if let Some(list) = annotation {
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.parse::<IpAddr>() {
                Ok(addr) => addresses.push(addr),
                Err(_) => {
                    return Requested::Malformed(format!(
                        "annotation {ANNOTATION_LOAD_BALANCER_IPS}: {item:?} is not an IP address"
                    ));
                }
            }
        }
        let v4 = addresses.iter().filter(|a| a.is_ipv4()).count();
        if v4 > 1 || addresses.len() - v4 > 1 {
            return Requested::Malformed(format!(
                "annotation {ANNOTATION_LOAD_BALANCER_IPS}: {list:?} names more than one address of a family"
            ));
        }
    }
    match field.map(str::trim).filter(|s| !s.is_empty()) {
        None => {}
        Some(text) => match text.parse::<IpAddr>() {
            Err(_) => {
                return Requested::Malformed(format!(
                    "spec.loadBalancerIP: {text:?} is not an IP address"
                ));
            }
            Ok(addr) if annotation.is_some() && !addresses.contains(&addr) => {
                return Requested::Malformed(format!(
                    "spec.loadBalancerIP {addr} is not among the addresses of annotation {ANNOTATION_LOAD_BALANCER_IPS}"
                ));
            }
            Ok(addr) if annotation.is_none() => addresses.push(addr),
            Ok(_) => {}
        },
    }
    if addresses.is_empty() {
        Requested::Any
    } else {
        Requested::Addresses(addresses)
    }
}

/// The families a Service gets VIPs of: those it has, from `spec.clusterIPs` where set, else
/// `spec.ipFamilies` (the API server narrows both to what the cluster runs: a PreferDualStack
/// Service on a single-stack cluster has one family, and must not get a VIP of the other).
fn family_policy(spec: &ServiceSpec, requested: &Requested) -> FamilyPolicy {
    let from_ips: Vec<IpFamily> = spec
        .cluster_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| IpFamily::of(&ip))
        .collect();
    let has: Vec<IpFamily> = if from_ips.is_empty() {
        spec.ip_families
            .iter()
            .flatten()
            .map(|f| match f.as_str() {
                "IPv6" => IpFamily::V6,
                _ => IpFamily::V4,
            })
            .collect()
    } else {
        from_ips
    };
    let primary = match has.first() {
        Some(family) => *family,
        // Manifests read offline have no ipFamilies yet (the API server fills them in): follow
        // the requested address if there is one.
        None => match requested {
            Requested::Addresses(a) if !a.is_empty() && a.iter().all(|a| a.is_ipv6()) => {
                IpFamily::V6
            }
            _ => IpFamily::V4,
        },
    };
    let one_family = has.len() == 1;
    match spec.ip_family_policy.as_deref() {
        Some("PreferDualStack") if one_family => FamilyPolicy::SingleStack { primary },
        Some("PreferDualStack") => FamilyPolicy::PreferDualStack { primary },
        Some("RequireDualStack") => FamilyPolicy::RequireDualStack { primary },
        _ => FamilyPolicy::SingleStack { primary },
    }
}

fn protocol(text: Option<&str>) -> Option<Protocol> {
    match text.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

/// `metadata.creationTimestamp` in seconds; a Service not yet stored counts as the newest.
/// The planner's view of an assigned Service. Fails when its scheduler annotation names no
/// scheduler.
pub fn planned_service(
    service: &Service,
    addresses: Vec<IpAddr>,
    pool: String,
    ready_endpoints: BTreeMap<String, u32>,
) -> Result<ipvslb_core::PlannedService, Invalid> {
    let spec = service.spec.clone().unwrap_or_default();
    let name = service_name(service);
    let scheduler = match service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_SCHEDULER))
    {
        None => None,
        Some(text) => match text.trim().parse::<Scheduler>() {
            Ok(Scheduler::Other(other)) => {
                return Err(Invalid {
                    kind: "Service",
                    name: name.to_string(),
                    field: format!("metadata.annotations[{ANNOTATION_SCHEDULER}]"),
                    message: format!(
                        "{other:?} is not an IPVS scheduler (rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, fo, ovf, mh)"
                    ),
                });
            }
            Ok(known) => Some(known),
            Err(never) => match never {},
        },
    };
    Ok(ipvslb_core::PlannedService {
        name,
        created: created(service),
        addresses,
        pool,
        ports: spec
            .ports
            .unwrap_or_default()
            .iter()
            .filter_map(|p| {
                Some(ServicePort {
                    protocol: protocol(p.protocol.as_deref())?,
                    port: u16::try_from(p.port).ok()?,
                    node_port: p.node_port.and_then(|n| u16::try_from(n).ok()),
                })
            })
            .collect(),
        health_check_node_port: spec
            .health_check_node_port
            .and_then(|n| u16::try_from(n).ok()),
        traffic_policy: match spec.external_traffic_policy.as_deref() {
            Some("Local") => TrafficPolicy::Local,
            _ => TrafficPolicy::Cluster,
        },
        scheduler,
        ready_endpoints,
    })
}

/// Every IPPool as the allocator of `classes` sees it, never failing: a pool of another class is
/// [`PoolRole::Foreign`] (it fences its addresses off), an invalid one [`PoolRole::Frozen`]
/// with what could be read of its ranges (its holders keep their addresses), and the error
/// says why it is frozen.
pub fn pool_for(pool: &IPPool, classes: &ClassPolicy) -> (PoolSpec, Option<Invalid>) {
    let readable = || PoolSpec {
        name: pool.metadata.name.clone().unwrap_or_default(),
        created: created(pool),
        role: PoolRole::Serving,
        ranges: pool
            .spec
            .addresses
            .iter()
            .filter_map(|a| a.0.parse().ok())
            .collect(),
        auto_assign: false,
        avoid_buggy_ips: pool.spec.avoid_buggy_ips,
        node_set: pool.spec.node_set.clone(),
        service_allocation: None,
    };
    if !classes.uses_pool(pool) {
        let mut spec = readable();
        spec.role = PoolRole::Foreign(pool_class(pool).to_owned());
        return (spec, None);
    }
    match self::pool(pool) {
        Ok(spec) => (spec, None),
        Err(invalid) => {
            let mut spec = readable();
            spec.role = PoolRole::Frozen(invalid.to_string());
            (spec, Some(invalid))
        }
    }
}

fn created(object: &impl kube::Resource) -> i64 {
    object
        .meta()
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or(i64::MAX)
}

/// An IPPool as the core sees it. Unparsable ranges make the pool invalid as a whole: half a
/// pool would hand out addresses the operator did not mean to give.
pub fn pool(pool: &IPPool) -> Result<PoolSpec, Invalid> {
    let name = pool.metadata.name.clone().unwrap_or_default();
    let invalid = |field: String, message: String| Invalid {
        kind: "IPPool",
        name: name.clone(),
        field,
        message,
    };
    if pool.spec.addresses.is_empty() {
        return Err(invalid(
            "spec.addresses".into(),
            "must list at least one CIDR or range".into(),
        ));
    }
    let ranges = pool
        .spec
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.0.parse().map_err(|e: ipvslb_core::RangeError| {
                invalid(format!("spec.addresses[{i}]"), e.to_string())
            })
        })
        .collect::<Result<_, _>>()?;
    let service_allocation = match &pool.spec.service_allocation {
        None => None,
        Some(sa) => Some(ServiceAllocation {
            priority: sa.priority,
            namespaces: sa.namespaces.clone(),
            namespace_selectors: selectors(
                &sa.namespace_selectors,
                "spec.serviceAllocation.namespaceSelectors",
            )
            .map_err(|(field, message)| invalid(field, message))?,
            service_selectors: selectors(
                &sa.service_selectors,
                "spec.serviceAllocation.serviceSelectors",
            )
            .map_err(|(field, message)| invalid(field, message))?,
        }),
    };
    Ok(PoolSpec {
        name: name.clone(),
        created: created(pool),
        role: PoolRole::Serving,
        ranges,
        auto_assign: pool.spec.auto_assign,
        avoid_buggy_ips: pool.spec.avoid_buggy_ips,
        node_set: pool.spec.node_set.clone(),
        service_allocation,
    })
}

fn selectors(list: &[LabelSelector], field: &str) -> Result<Vec<Selector>, (String, String)> {
    list.iter()
        .enumerate()
        .map(|(i, s)| selector(s, &format!("{field}[{i}]")))
        .collect()
}

/// A label selector, with its operators checked.
pub fn selector(selector: &LabelSelector, field: &str) -> Result<Selector, (String, String)> {
    let match_expressions = selector
        .match_expressions
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, e)| {
            let values = e.values.clone().unwrap_or_default();
            let key = e.key.clone();
            match e.operator.as_str() {
                "In" => Ok(Requirement::In(key, values)),
                "NotIn" => Ok(Requirement::NotIn(key, values)),
                "Exists" => Ok(Requirement::Exists(key)),
                "DoesNotExist" => Ok(Requirement::DoesNotExist(key)),
                other => Err((
                    format!("{field}.matchExpressions[{i}].operator"),
                    format!("{other:?} is not one of In, NotIn, Exists, DoesNotExist"),
                )),
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(Selector {
        match_labels: selector.match_labels.clone().unwrap_or_default(),
        match_expressions,
    })
}

/// A NodeSet as the core sees it.
pub fn node_set(set: &NodeSet) -> Result<NodeSetSpec, Invalid> {
    let name = set.metadata.name.clone().unwrap_or_default();
    let spec = &set.spec;
    let selector =
        selector(&spec.node_selector, "spec.nodeSelector").map_err(|(field, message)| Invalid {
            kind: "NodeSet",
            name: name.clone(),
            field,
            message,
        })?;
    let scheduler = scheduler(spec.scheduler);
    let mut flags = ServiceFlags::empty();
    for (i, flag) in spec.scheduler_flags.iter().enumerate() {
        let (bit, needs) = match flag {
            SchedulerFlag::ShFallback => (ServiceFlags::SCHED1, Scheduler::Sh),
            SchedulerFlag::ShPort => (ServiceFlags::SCHED2, Scheduler::Sh),
            SchedulerFlag::MhFallback => (ServiceFlags::SCHED1, Scheduler::Mh),
            SchedulerFlag::MhPort => (ServiceFlags::SCHED2, Scheduler::Mh),
        };
        if scheduler != needs {
            return Err(Invalid {
                kind: "NodeSet",
                name,
                field: format!("spec.schedulerFlags[{i}]"),
                message: format!("this flag needs scheduler {needs}, not {scheduler}"),
            });
        }
        flags = flags.union(bit);
    }
    Ok(NodeSetSpec {
        name: name.clone(),
        selector,
        address_type: match spec.address_type {
            ipvslb_api::NodeAddressType::InternalIP => NodeAddressType::InternalIp,
            ipvslb_api::NodeAddressType::ExternalIP => NodeAddressType::ExternalIp,
        },
        forwarding: match spec.forwarding {
            ipvslb_api::Forwarding::DirectRouting => Forwarding::DirectRouting,
            ipvslb_api::Forwarding::Masquerade => Forwarding::Masquerade,
            ipvslb_api::Forwarding::Tunnel => Forwarding::Tunnel,
        },
        scheduler,
        flags,
        persistence: spec.persistence.map(|p| p.timeout_seconds),
        health: health_policy(&name, spec.health_check.as_ref())?,
    })
}

/// The NodeSet's health check as the planner takes it; `None` when there is none to run.
fn health_policy(
    name: &str,
    check: Option<&ipvslb_api::HealthCheck>,
) -> Result<Option<HealthPolicy>, Invalid> {
    let Some(check) = check else {
        return Ok(None);
    };
    let invalid = |field: &str, message: String| Invalid {
        kind: "NodeSet",
        name: name.to_owned(),
        field: format!("spec.healthCheck.{field}"),
        message,
    };
    let duration = |field: &str, text: &str| {
        humantime::parse_duration(text).map_err(|e| {
            invalid(
                field,
                format!("{text:?} is no duration such as 500ms or 5s: {e}"),
            )
        })
    };
    let interval = duration("interval", &check.interval)?;
    let timeout = duration("timeout", &check.timeout)?;
    if !(Duration::from_millis(10)..=Duration::from_secs(3600)).contains(&interval) {
        return Err(invalid(
            "interval",
            format!("{} is outside 10ms to 1h", check.interval),
        ));
    }
    if timeout.is_zero() {
        return Err(invalid(
            "timeout",
            format!("{} must be above zero", check.timeout),
        ));
    }
    // A probe still running when the next is due would only delay it: cut to the interval.
    let timeout = timeout.min(interval);
    let probe = match check.kind {
        ipvslb_api::HealthCheckType::None => return Ok(None),
        ipvslb_api::HealthCheckType::TCP => Probe::Tcp,
        ipvslb_api::HealthCheckType::HTTP => Probe::Http {
            path: check.path.clone().unwrap_or_else(|| "/".to_owned()),
            host: check.host.clone(),
        },
    };
    Ok(Some(HealthPolicy {
        check: Check {
            probe,
            interval,
            timeout,
            rise: check.rise.max(1),
            fall: check.fall.max(1),
        },
        target: match check.target {
            ipvslb_api::HealthCheckTarget::Auto => CheckTarget::Auto,
            ipvslb_api::HealthCheckTarget::NodePort => CheckTarget::NodePort,
            ipvslb_api::HealthCheckTarget::ServicePort => CheckTarget::ServicePort,
        },
        port: check.port,
        all_down: match check.all_down {
            ipvslb_api::AllDown::KeepAll => AllDown::KeepAll,
            ipvslb_api::AllDown::Withdraw => AllDown::Withdraw,
        },
    }))
}

fn scheduler(name: SchedulerName) -> Scheduler {
    match name {
        SchedulerName::Rr => Scheduler::Rr,
        SchedulerName::Wrr => Scheduler::Wrr,
        SchedulerName::Lc => Scheduler::Lc,
        SchedulerName::Wlc => Scheduler::Wlc,
        SchedulerName::Lblc => Scheduler::Lblc,
        SchedulerName::Lblcr => Scheduler::Lblcr,
        SchedulerName::Dh => Scheduler::Dh,
        SchedulerName::Sh => Scheduler::Sh,
        SchedulerName::Sed => Scheduler::Sed,
        SchedulerName::Nq => Scheduler::Nq,
        SchedulerName::Fo => Scheduler::Fo,
        SchedulerName::Ovf => Scheduler::Ovf,
        SchedulerName::Mh => Scheduler::Mh,
    }
}

/// Trims a Node to what [`node`] reads, before it is cached: a Node's status lists its images
/// and volumes, many times the size of the rest.
pub fn trim_node(node: &mut Node) {
    use k8s_openapi::api::core::v1::{NodeSpec, NodeStatus};
    node.metadata.annotations = None;
    node.metadata.owner_references = None;
    node.spec = node.spec.take().map(|spec| NodeSpec {
        unschedulable: spec.unschedulable,
        ..NodeSpec::default()
    });
    node.status = node.status.take().map(|status| NodeStatus {
        addresses: status.addresses,
        conditions: status.conditions.map(|conditions| {
            conditions
                .into_iter()
                .filter(|c| c.type_ == "Ready")
                .collect()
        }),
        ..NodeStatus::default()
    });
}

/// A Node as the core sees it. Addresses that are not IPs (hostnames) are skipped: they are
/// legal in `status.addresses` but useless to IPVS.
pub fn node(node: &Node) -> NodeInfo {
    let status = node.status.as_ref();
    NodeInfo {
        name: node.metadata.name.clone().unwrap_or_default(),
        labels: node.metadata.labels.clone().unwrap_or_default(),
        ready: status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        unschedulable: node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false),
        addresses: status
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|a| {
                let kind = match a.type_.as_str() {
                    "InternalIP" => NodeAddressType::InternalIp,
                    "ExternalIP" => NodeAddressType::ExternalIp,
                    _ => return None,
                };
                Some((kind, a.address.parse().ok()?))
            })
            .collect(),
    }
}

/// Ready endpoints per node, per Service, from EndpointSlices. A dual-stack Service has a slice
/// per family listing the same pods, so the count per node is the largest over families.
pub fn ready_endpoints<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> BTreeMap<ServiceName, BTreeMap<String, u32>> {
    let mut per_family: BTreeMap<(ServiceName, String, String), u32> = BTreeMap::new();
    for slice in slices {
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
        else {
            continue;
        };
        let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
        let name = ServiceName::new(namespace, service.as_str());
        for endpoint in slice.endpoints.iter().flatten() {
            // An absent `ready` means ready, as the EndpointSlice API defines it.
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if let (true, Some(node)) = (ready, &endpoint.node_name) {
                *per_family
                    .entry((name.clone(), node.clone(), slice.address_type.clone()))
                    .or_default() += 1;
            }
        }
    }
    let mut out: BTreeMap<ServiceName, BTreeMap<String, u32>> = BTreeMap::new();
    for ((service, node, _), count) in per_family {
        let slot = out.entry(service).or_default().entry(node).or_default();
        *slot = (*slot).max(count);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trimmed_node_reads_the_same_and_drops_its_images() {
        let full: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "node1", "labels": {"zone": "a"},
                         "annotations": {"node.alpha.kubernetes.io/ttl": "0"}},
            "spec": {"unschedulable": true, "podCIDR": "10.244.1.0/24"},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "10.240.0.101"},
                              {"type": "Hostname", "address": "node1"}],
                "conditions": [{"type": "Ready", "status": "True"},
                               {"type": "MemoryPressure", "status": "False"}],
                "images": [{"names": ["registry.example/app:1"], "sizeBytes": 1000}]
            }
        }))
        .unwrap();
        let mut trimmed = full.clone();
        trim_node(&mut trimmed);
        assert_eq!(node(&trimmed), node(&full));
        let status = trimmed.status.unwrap();
        assert_eq!(status.images, None);
        assert_eq!(status.conditions.map(|c| c.len()), Some(1));
        assert_eq!(trimmed.metadata.annotations, None);
    }

    fn families_of(spec: serde_json::Value) -> FamilyPolicy {
        let spec: ServiceSpec = serde_json::from_value(spec).unwrap();
        family_policy(&spec, &Requested::Any)
    }

    #[test]
    fn a_service_gets_vips_of_the_families_it_has_and_never_of_one_it_lacks() {
        use IpFamily::{V4, V6};
        let cases = [
            (
                "PreferDualStack on a single-stack cluster (one family) is single-stack",
                serde_json::json!({"ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv4"], "clusterIPs": ["10.96.0.10"]}),
                FamilyPolicy::SingleStack { primary: V4 },
            ),
            (
                "PreferDualStack with both families prefers both, the first one primary",
                serde_json::json!({"ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv6", "IPv4"], "clusterIPs": ["fd00::10", "10.96.0.10"]}),
                FamilyPolicy::PreferDualStack { primary: V6 },
            ),
            (
                "clusterIPs win over ipFamilies where they disagree",
                serde_json::json!({"ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv4", "IPv6"], "clusterIPs": ["fd00::10"]}),
                FamilyPolicy::SingleStack { primary: V6 },
            ),
            (
                "RequireDualStack stays required",
                serde_json::json!({"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"]}),
                FamilyPolicy::RequireDualStack { primary: V4 },
            ),
            (
                "a manifest read offline, with no families yet, keeps its policy",
                serde_json::json!({"ipFamilyPolicy": "PreferDualStack"}),
                FamilyPolicy::PreferDualStack { primary: V4 },
            ),
            (
                "no policy is single-stack of the first family",
                serde_json::json!({"ipFamilies": ["IPv6"]}),
                FamilyPolicy::SingleStack { primary: V6 },
            ),
        ];
        for (says, spec, want) in cases {
            assert_eq!(families_of(spec), want, "{says}");
        }
    }
}
