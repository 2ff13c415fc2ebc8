//! ipvslb: bare-metal LoadBalancer Services for Kubernetes, with Linux IPVS.
//!
//! The binary's library half: the controllers (`allocator`, `director`), the translation of
//! Kubernetes objects into the core's types, `plan`, and the data-plane seam. `main.rs` only
//! parses the command line.

pub mod allocator;
pub mod cached;
pub mod converge;
pub mod dataplane;
pub mod director;
pub mod director_record;
pub mod election;
pub mod health;
pub mod leader;
pub mod manifests;
pub mod metrics;
pub mod node_set_status;
pub mod peers;
pub mod plan;
pub mod retire;
pub mod run;
#[cfg(target_os = "linux")]
pub mod segment;
pub mod server;
pub mod shared;
pub mod status;
pub mod translate;
pub mod view;

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

/// Objects per page of a list. A page is held whole, managed fields and all, while it is read:
/// small pages keep that peak small (it stays as resident memory after).
pub const LIST_PAGE: u32 = 100;

/// A kind of object ipvslb watches: cluster-wide, deserialized, shared between tasks.
pub trait Watched:
    kube::Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Watched for K where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// A cached, retried watch of every object of kind `K` in the cluster: `writer`'s store stays
/// filled, and the stream yields the watch events for a controller's triggers.
pub fn watch_all<K>(
    client: &kube::Client,
    writer: kube::runtime::reflector::store::Writer<K>,
    health: &server::Health,
    by: &'static str,
) -> impl futures::Stream<Item = Result<kube::runtime::watcher::Event<K>, kube::runtime::watcher::Error>>
+ Send
+ use<K>
where
    K: Watched,
{
    use kube::runtime::WatchStreamExt;
    watch_stream(
        client,
        kube::runtime::watcher::Config::default(),
        |_| {},
        health,
        by,
    )
    .reflect(writer)
}

/// A retried watch of the objects of kind `K` that `config` selects, each object trimmed by `slim`
/// (and of what no kind needs) before anyone sees it. Its errors are logged and, with its
/// progress, reported to `health` under the kind and `by` (whose cache it fills): a cache that
/// cannot be filled makes the process unready.
pub fn watch_stream<K>(
    client: &kube::Client,
    config: kube::runtime::watcher::Config,
    slim: fn(&mut K),
    health: &server::Health,
    by: &'static str,
) -> impl futures::Stream<Item = Result<kube::runtime::watcher::Event<K>, kube::runtime::watcher::Error>>
+ Send
+ use<K>
where
    K: Watched,
{
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    use kube::runtime::watcher::Event;
    let kind = kind_name::<K>();
    let name = server::health::WatchName { kind, by };
    health.watch_started(name);
    let health = health.clone();
    kube::runtime::watcher(
        kube::Api::<K>::all(client.clone()),
        config.page_size(LIST_PAGE),
    )
    .default_backoff()
    .inspect(move |event| match event {
        Ok(Event::InitDone) => health.watch_progressed(name, true),
        Ok(Event::Apply(_) | Event::Delete(_) | Event::InitApply(_)) => {
            health.watch_progressed(name, false)
        }
        Ok(Event::Init) => {}
        Err(error) => {
            tracing::warn!(kind, by, %error, "watch failed; retrying with backoff");
            health.watch_failed(name, error.to_string());
        }
    })
    // Nothing reads managedFields or kubectl's last-applied copy, and they are most of a
    // cached object's size: drop them before they reach a cache.
    .modify(move |object: &mut K| {
        let meta = object.meta_mut();
        meta.managed_fields = None;
        if let Some(annotations) = meta.annotations.as_mut() {
            annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
        slim(object);
    })
}

/// The kind of `K` as a name that lives as long as the process (for logs and health reports).
fn kind_name<K: Watched>() -> &'static str {
    match K::kind(&()) {
        std::borrow::Cow::Borrowed(kind) => kind,
        // Every kind ipvslb watches has a static name; a dynamic one is not worth leaking.
        std::borrow::Cow::Owned(_) => "object",
    }
}

/// Runs a controller's result stream to its end under the heartbeat `name`. Each result (and
/// a tick while idle) is a beat; errors that no error policy has seen are logged.
pub async fn drive<K, E, S>(name: &'static str, results: S, health: &server::Health)
where
    K: kube::Resource<DynamicType = ()>,
    E: std::error::Error + 'static,
    S: futures::Stream<
            Item = Result<
                (
                    kube::runtime::reflector::ObjectRef<K>,
                    kube::runtime::controller::Action,
                ),
                kube::runtime::controller::Error<E, kube::runtime::watcher::Error>,
            >,
        >,
{
    use futures::StreamExt;
    use kube::runtime::controller::Error as ControllerError;
    // An idle controller yields nothing: the ticks tell an idle one from one whose task is gone
    // (the heartbeat drops with it). Stuck reconciles are caught by their own bound.
    const TICK: std::time::Duration = std::time::Duration::from_secs(10);
    let heartbeat = health.heartbeat(name, TICK * 6);
    let mut results = std::pin::pin!(results);
    loop {
        let result = tokio::select! {
            result = results.next() => result,
            _ = tokio::time::sleep(TICK) => {
                heartbeat.beat();
                continue;
            }
        };
        let Some(result) = result else { break };
        heartbeat.beat();
        match result {
            Ok(_) => {}
            // The error policy logged it, with the object.
            Err(ControllerError::ReconcilerFailed(..)) => {}
            // The watch that failed logged it, with its kind.
            Err(ControllerError::QueueError(_)) => {}
            Err(ControllerError::ObjectNotFound(object)) => {
                tracing::debug!(controller = name, %object, "object gone before its reconcile")
            }
            Err(error) => tracing::warn!(controller = name, %error, "controller error"),
        }
    }
}
/// A Service controller fed by the shared watch (`applied`, `services`), at most `concurrency`
/// reconciles at once, that requeues every Service when a pool's spec changes (both roles read
/// the pools). Unbounded, a burst of thousands of Services became as many simultaneous
/// requests, which starved the Lease renewals of the API server's attention and cost a
/// connection and buffers each.
pub fn service_controller(
    applied: futures::stream::BoxStream<'static, std::sync::Arc<cached::CachedService>>,
    services: kube::runtime::reflector::Store<cached::CachedService>,
    pools: kube::runtime::reflector::Store<ipvslb_api::IPPool>,
    pool_changes: impl futures::Stream<Item = Result<ipvslb_api::IPPool, kube::runtime::watcher::Error>>
    + Send
    + 'static,
    concurrency: u16,
) -> kube::runtime::Controller<cached::CachedService> {
    let config = kube::runtime::controller::Config::default().concurrency(concurrency.max(1));
    kube::runtime::Controller::for_shared_stream(applied, services.clone())
        .with_config(config)
        .watches_stream(
            pool_changes,
            on_spec_change(pools, services, |p: &ipvslb_api::IPPool| p.spec.clone()),
        )
}

/// A reference to every Service in `store`: what a change to a pool or a NodeSet may affect.
pub fn all_services(
    store: &kube::runtime::reflector::Store<cached::CachedService>,
) -> Vec<kube::runtime::reflector::ObjectRef<cached::CachedService>> {
    store
        .state()
        .iter()
        .map(|s| kube::runtime::reflector::ObjectRef::from_obj(&**s))
        .collect()
}

/// Tells a real change of an object from a write to its status: remembers the last value each
/// object (by name) was seen with. A controller writing a pool's status must not requeue every
/// Service, or each status write would start the next.
pub struct ChangeFilter<V> {
    seen: std::sync::Mutex<std::collections::BTreeMap<String, V>>,
}

impl<V: PartialEq> ChangeFilter<V> {
    /// An empty filter: the first sighting of each object is a change.
    pub fn new() -> Self {
        Self {
            seen: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    /// Whether `name` now holding `value` (`None`: deleted) differs from the last sighting.
    pub fn changed(&self, name: String, value: Option<V>) -> bool {
        let Ok(mut seen) = self.seen.lock() else {
            return true;
        };
        match value {
            None => seen.remove(&name).is_some(),
            Some(value) => {
                let changed = seen.get(&name) != Some(&value);
                seen.insert(name, value);
                changed
            }
        }
    }
}

impl<V: PartialEq> Default for ChangeFilter<V> {
    fn default() -> Self {
        Self::new()
    }
}

/// A trigger for a Service controller: a change of an object of `store` (its spec read by
/// `spec`) requeues every Service of `services` when the spec changed or the object went, and
/// none for a status write.
pub fn on_spec_change<K, V>(
    store: kube::runtime::reflector::Store<K>,
    services: kube::runtime::reflector::Store<cached::CachedService>,
    spec: fn(&K) -> V,
) -> impl Fn(K) -> Vec<kube::runtime::reflector::ObjectRef<cached::CachedService>>
where
    K: kube::Resource<DynamicType = ()> + Clone,
    V: PartialEq,
{
    use kube::ResourceExt;
    let filter = ChangeFilter::new();
    move |object: K| {
        let present = store
            .get(&kube::runtime::reflector::ObjectRef::from_obj(&object))
            .is_some();
        if filter.changed(object.name_any(), present.then(|| spec(&object))) {
            all_services(&services)
        } else {
            Vec::new()
        }
    }
}

/// Resolves once `shutdown` says so (or its sender is gone).
pub async fn stopped(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Waits until `store` has been filled once. Polls in short rounds: with several tasks waiting
/// on one store at once (the Controller's runner among them), a single long wait was seen never
/// to wake.
pub async fn filled<K>(
    store: &kube::runtime::reflector::Store<K>,
) -> Result<(), kube::runtime::reflector::store::WriterDropped>
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        let round = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            store.wait_until_ready(),
        );
        if let Ok(result) = round.await {
            return result;
        }
    }
}

/// Aborts a spawned task when dropped, so a task's helpers end with it.
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::ChangeFilter;

    #[test]
    fn a_change_filter_passes_first_sightings_changes_and_deletions_only() {
        let filter = ChangeFilter::new();
        assert!(filter.changed("pool".into(), Some(1)));
        assert!(
            !filter.changed("pool".into(), Some(1)),
            "a status write keeps the spec"
        );
        assert!(filter.changed("pool".into(), Some(2)));
        assert!(filter.changed("pool".into(), None));
        assert!(
            !filter.changed("pool".into(), None),
            "a deletion is seen once"
        );
    }
}
