//! The names a Service, a Node or an Event uses to talk to ipvslb.

/// The API group of ipvslb's custom resources.
pub const GROUP: &str = "ipvslb.io";

/// The `spec.loadBalancerClass` that ipvslb serves by default.
pub const LOAD_BALANCER_CLASS: &str = "ipvslb.io/ipvs";

/// Annotation naming the IPPool a Service's VIPs must come from.
pub const ANNOTATION_POOL: &str = "ipvslb.io/pool";

/// Annotation requesting specific VIPs: comma-separated, at most one per family.
pub const ANNOTATION_LOAD_BALANCER_IPS: &str = "ipvslb.io/load-balancer-ips";

/// Annotation with a sharing key: Services with equal keys may share a VIP when no port collides.
pub const ANNOTATION_ALLOW_SHARED_IP: &str = "ipvslb.io/allow-shared-ip";

/// Annotation overriding the NodeSet's scheduler for one Service (`rr`, `wrr`, `mh`, ...).
pub const ANNOTATION_SCHEDULER: &str = "ipvslb.io/scheduler";

/// The well-known Node label that keeps a node out of every external load balancer.
pub const LABEL_EXCLUDE_FROM_EXTERNAL_LB: &str =
    "node.kubernetes.io/exclude-from-external-load-balancers";

/// The label EndpointSlices carry with the name of their Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// The NodeSet a pool uses when it names none.
pub const DEFAULT_NODE_SET: &str = "default";

/// The most allocations an IPPool's status lists before it marks the list truncated: keeps the
/// object far below etcd's size limit whatever the pool's size.
pub const MAX_STATUS_ALLOCATIONS: usize = 1000;
