//! ipvslb: bare-metal LoadBalancer Services for Kubernetes, with Linux IPVS.
//!
//! The binary's library half: the controllers (`allocator`, `director`), the translation of
//! Kubernetes objects into the core's types, `plan`, and the data-plane seam. `main.rs` only
//! parses the command line.

pub mod allocator;
pub mod converge;
pub mod dataplane;
pub mod director;
pub mod leader;
pub mod manifests;
pub mod metrics;
pub mod plan;
pub mod run;
pub mod translate;

use translate::Unclassed;

/// Which Services ipvslb serves.
#[derive(clap::Args)]
pub struct ClassArgs {
    /// The `spec.loadBalancerClass` this ipvslb serves.
    #[arg(long, env = "IPVSLB_LOAD_BALANCER_CLASS", default_value = ipvslb_api::LOAD_BALANCER_CLASS)]
    pub load_balancer_class: String,
    /// LoadBalancer Services without a class: serve them, or leave them to another implementation.
    #[arg(long, env = "IPVSLB_UNCLASSED_SERVICES", value_enum, default_value_t = Unclassed::Serve)]
    pub unclassed_services: Unclassed,
}

/// A cached, retried watch of every object of kind `K` in the cluster: `writer`'s store stays
/// filled, and the stream yields the watch events for a controller's triggers.
pub fn watch_all<K>(
    client: &kube::Client,
    writer: kube::runtime::reflector::store::Writer<K>,
) -> impl futures::Stream<Item = Result<kube::runtime::watcher::Event<K>, kube::runtime::watcher::Error>>
+ Send
+ use<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    use kube::runtime::WatchStreamExt;
    kube::runtime::watcher(
        kube::Api::<K>::all(client.clone()),
        kube::runtime::watcher::Config::default(),
    )
    .default_backoff()
    // Nothing reads managedFields or kubectl's last-applied copy, and they are most of a
    // cached object's size: drop them before they reach the store.
    .modify(|object: &mut K| {
        object.meta_mut().managed_fields = None;
        if let Some(annotations) = object.meta_mut().annotations.as_mut() {
            annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    })
    .reflect(writer)
}

/// A reference to every Service in `store`: what a change to a pool or a NodeSet may affect.
pub fn all_services(
    store: &kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Service>,
) -> Vec<kube::runtime::reflector::ObjectRef<k8s_openapi::api::core::v1::Service>> {
    store
        .state()
        .iter()
        .map(|s| kube::runtime::reflector::ObjectRef::from_obj(&**s))
        .collect()
}

/// Aborts a spawned task when dropped, so a task's helpers end with it.
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
