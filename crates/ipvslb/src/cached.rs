//! The Service as the shared cache holds it: the fields ipvslb reads, and nothing else.
//!
//! A cluster's Services are the largest thing ipvslb keeps. k8s-openapi's `Service` takes 840
//! bytes before its first string, and a single label or annotation costs a map node with room
//! for eleven. The cache holds this type instead; a reconcile turns the one Service it works
//! on back into a `Service` ([`CachedService::to_service`]) for the translation code.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    LoadBalancerStatus, Service, ServicePort, ServiceSpec, ServiceStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::reflector::ObjectRef;
use serde::Deserialize;

use ipvslb_core::ServiceName;

/// Annotations of other prefixes are never read.
const ANNOTATION_PREFIX: &str = "ipvslb.io/";

/// A Service, trimmed for the cache by [`CachedService::trim`].
#[derive(Resource, Clone, Debug, Default, Deserialize)]
#[resource(inherit = "Service")]
pub struct CachedService {
    /// Name, namespace, uid, creation and deletion times; labels and annotations move out.
    pub metadata: ObjectMeta,
    /// The labels (pools select Services by them), as a list.
    #[serde(skip)]
    labels: Vec<(String, String)>,
    /// The `ipvslb.io/` annotations, as a list.
    #[serde(skip)]
    annotations: Vec<(String, String)>,
    #[serde(default)]
    spec: Option<Spec>,
    #[serde(default)]
    status: Option<Status>,
}

/// What is read of `spec`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(rename = "type")]
    type_: Option<String>,
    load_balancer_class: Option<String>,
    #[serde(rename = "loadBalancerIP")]
    load_balancer_ip: Option<String>,
    ip_families: Option<Vec<String>>,
    ip_family_policy: Option<String>,
    external_traffic_policy: Option<String>,
    ports: Option<Vec<ServicePort>>,
}

/// What is read of `status`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    load_balancer: Option<LoadBalancerStatus>,
}

impl CachedService {
    /// Trims a freshly read Service for the cache: drops what nothing reads and moves labels
    /// and annotations into lists.
    pub fn trim(&mut self) {
        let meta = &mut self.metadata;
        meta.managed_fields = None;
        meta.owner_references = None;
        meta.finalizers = None;
        meta.generate_name = None;
        meta.resource_version = None;
        self.labels = meta.labels.take().unwrap_or_default().into_iter().collect();
        self.annotations = meta
            .annotations
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
            .collect();
        self.labels.shrink_to_fit();
        self.annotations.shrink_to_fit();
        // Of a Service of another type, only the type is read: it tells whether the Service
        // stopped being ours.
        if let Some(spec) = self.spec.as_mut()
            && spec.type_.as_deref() != Some("LoadBalancer")
        {
            *spec = Spec {
                type_: spec.type_.take(),
                ..Spec::default()
            };
        }
    }

    /// `namespace/name`.
    pub fn service_name(&self) -> ServiceName {
        crate::translate::service_name(self)
    }

    /// The cache's key of the Service `name`.
    pub fn reference(name: &ServiceName) -> ObjectRef<CachedService> {
        ObjectRef::new(&name.name).within(&name.namespace)
    }

    /// The recorded ingress addresses that are IP addresses, read without a copy of the
    /// Service.
    pub fn ingress_addresses(&self) -> Vec<std::net::IpAddr> {
        crate::translate::load_balancer_addresses(
            self.status.as_ref().and_then(|s| s.load_balancer.as_ref()),
        )
    }

    /// The Service as the translation code reads it.
    pub fn to_service(&self) -> Service {
        let map = |entries: &[(String, String)]| {
            (!entries.is_empty()).then(|| entries.iter().cloned().collect::<BTreeMap<_, _>>())
        };
        Service {
            metadata: ObjectMeta {
                labels: map(&self.labels),
                annotations: map(&self.annotations),
                ..self.metadata.clone()
            },
            spec: self.spec.clone().map(|s| ServiceSpec {
                type_: s.type_,
                load_balancer_class: s.load_balancer_class,
                load_balancer_ip: s.load_balancer_ip,
                ip_families: s.ip_families,
                ip_family_policy: s.ip_family_policy,
                external_traffic_policy: s.external_traffic_policy,
                ports: s.ports,
                ..ServiceSpec::default()
            }),
            status: self.status.clone().map(|s| ServiceStatus {
                load_balancer: s.load_balancer,
                ..ServiceStatus::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: serde_json::Value) -> CachedService {
        let mut cached: CachedService = serde_json::from_value(json).unwrap();
        cached.trim();
        cached
    }

    #[test]
    fn a_cached_service_gives_back_every_field_that_is_read() {
        let json = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "web", "namespace": "shop", "uid": "u-1",
                "creationTimestamp": "2026-01-02T03:04:05Z",
                "resourceVersion": "42",
                "labels": {"app": "web", "tier": "front"},
                "annotations": {
                    "ipvslb.io/address-pool": "public",
                    "kubectl.kubernetes.io/last-applied-configuration": "{...}",
                    "team": "x"
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
            },
            "spec": {
                "type": "LoadBalancer",
                "loadBalancerClass": "ipvslb.io/ipvs",
                "loadBalancerIP": "10.240.0.210",
                "ipFamilies": ["IPv4"],
                "ipFamilyPolicy": "SingleStack",
                "externalTrafficPolicy": "Local",
                "selector": {"app": "web"},
                "clusterIP": "10.96.0.10",
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "10.240.0.210", "ipMode": "VIP"}]}}
        });
        let full: Service = serde_json::from_value(json.clone()).unwrap();
        let back = read(json).to_service();
        let spec = back.spec.as_ref().unwrap();
        let full_spec = full.spec.as_ref().unwrap();
        assert_eq!(spec.type_, full_spec.type_);
        assert_eq!(spec.load_balancer_class, full_spec.load_balancer_class);
        assert_eq!(spec.load_balancer_ip, full_spec.load_balancer_ip);
        assert_eq!(spec.ip_families, full_spec.ip_families);
        assert_eq!(spec.ip_family_policy, full_spec.ip_family_policy);
        assert_eq!(
            spec.external_traffic_policy,
            full_spec.external_traffic_policy
        );
        assert_eq!(spec.ports, full_spec.ports);
        assert_eq!(spec.selector, None, "not read, not kept");
        assert_eq!(back.status, full.status);
        assert_eq!(back.metadata.labels, full.metadata.labels);
        assert_eq!(
            back.metadata.annotations,
            Some(BTreeMap::from([(
                "ipvslb.io/address-pool".to_owned(),
                "public".to_owned()
            )]))
        );
        assert_eq!(back.metadata.name.as_deref(), Some("web"));
        assert_eq!(back.metadata.uid.as_deref(), Some("u-1"));
        assert_eq!(
            back.metadata.creation_timestamp,
            full.metadata.creation_timestamp
        );
        assert_eq!(back.metadata.managed_fields, None);
    }

    #[test]
    fn a_service_of_another_type_keeps_only_its_type() {
        let back = read(serde_json::json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"type": "ClusterIP", "ports": [{"port": 5432}]}
        }))
        .to_service();
        let spec = back.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.ports, None);
    }
}
