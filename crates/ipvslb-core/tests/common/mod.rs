//! Builders shared by the allocator's test files: a plain single-stack Service and a pool.

use std::collections::BTreeMap;

use ipvslb_core::{
    FamilyPolicy, IpFamily, IpRange, PoolRole, PoolSpec, PortKey, Requested, ServiceClaim,
    ServiceName,
};
use ipvslb_ipvs::Protocol;

/// A single-stack IPv4 Service on TCP port 80 that asks for any address.
pub fn claim(namespace: &str, name: &str, created: i64) -> ServiceClaim {
    ServiceClaim {
        name: ServiceName::new(namespace, name),
        created,
        families: FamilyPolicy::SingleStack {
            primary: IpFamily::V4,
        },
        requested: Requested::Any,
        pool: None,
        sharing_key: None,
        ports: vec![PortKey {
            protocol: Protocol::Tcp,
            port: 80,
        }],
        current: Vec::new(),
        labels: BTreeMap::new(),
        namespace_labels: Default::default(),
    }
}

/// A serving, auto-assigning pool over `ranges` for any Service.
pub fn pool(name: &str, created: i64, ranges: &[&str]) -> PoolSpec {
    PoolSpec {
        name: name.into(),
        created,
        role: PoolRole::Serving,
        ranges: ranges
            .iter()
            .map(|r| r.parse::<IpRange>().expect("test range"))
            .collect(),
        auto_assign: true,
        avoid_buggy_ips: false,
        node_set: "default".into(),
        service_allocation: None,
    }
}
