//! One watch and one cache of a kind for every controller of the process. The allocator and
//! the director both follow every Service; with a cache each, a cluster's Services were held
//! twice.

use std::sync::Arc;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt, TryStreamExt};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;

use crate::Watched;

/// A watch of every object of kind `K` that hands out [`Subscription`]s, then runs.
///
/// The fan-out is its own rather than kube's shared reflector: kube's handle, asked for an
/// object deleted before it was read, returned `Pending` without a waker and stalled its
/// controller until something else woke it (Services created meanwhile waited a minute).
pub struct SharedWatch<K>
where
    K: Watched,
{
    store: Store<K>,
    writer: Writer<K>,
    applied: Vec<mpsc::UnboundedSender<ObjectRef<K>>>,
    deletions: Vec<mpsc::UnboundedSender<Arc<K>>>,
}

/// What a controller gets of a shared watch: the cache, the objects that changed, and the
/// objects that were deleted (which a controller cannot read from a cache that dropped them).
pub struct Subscription<K>
where
    K: Watched,
{
    /// The shared cache.
    pub store: Store<K>,
    /// Each object that was created or changed, and every object after each (re)list, as the
    /// cache holds it; one deleted meanwhile is skipped.
    pub applied: BoxStream<'static, Arc<K>>,
    /// Each object that was deleted, as last seen.
    pub deleted: mpsc::UnboundedReceiver<Arc<K>>,
}

impl<K> SharedWatch<K>
where
    K: Watched,
{
    /// A watch with no subscribers yet.
    pub fn new() -> Self {
        let (store, writer) = reflector::store();
        Self {
            store,
            writer,
            applied: Vec::new(),
            deletions: Vec::new(),
        }
    }

    /// A subscription.
    pub fn subscribe(&mut self) -> Subscription<K> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.applied.push(tx);
        let (tx, deleted) = mpsc::unbounded_channel();
        self.deletions.push(tx);
        let store = self.store.clone();
        let applied = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|changed| (changed, rx))
        })
        .filter_map(move |changed| futures::future::ready(store.get(&changed)))
        .boxed();
        Subscription {
            store: self.store.clone(),
            applied,
            deleted,
        }
    }

    /// Runs the watch (for as long as the future is polled), reporting to `health`; `slim`
    /// trims each object before it is cached.
    pub fn run(
        self,
        client: &kube::Client,
        slim: fn(&mut K),
        health: &crate::server::Health,
    ) -> impl Future<Output = ()> + Send + use<K> {
        let Self {
            store,
            writer,
            applied,
            deletions,
        } = self;
        // After `reflect`: a subscriber reads what it is told of from the cache.
        let stream =
            crate::watch_stream::<K>(client, watcher::Config::default(), slim, health, "shared")
                .reflect(writer)
                .inspect_ok(move |event| match event {
                    watcher::Event::Apply(object) => {
                        let changed = ObjectRef::from_obj(object);
                        for tx in &applied {
                            let _ = tx.send(changed.clone());
                        }
                    }
                    watcher::Event::InitDone => {
                        for object in store.state() {
                            let changed = ObjectRef::from_obj(&*object);
                            for tx in &applied {
                                let _ = tx.send(changed.clone());
                            }
                        }
                    }
                    watcher::Event::Delete(object) => {
                        let object = Arc::new(object.clone());
                        for tx in &deletions {
                            let _ = tx.send(object.clone());
                        }
                    }
                    watcher::Event::Init | watcher::Event::InitApply(_) => {}
                });
        drain(stream)
    }
}

impl<K> Default for SharedWatch<K>
where
    K: Watched,
{
    fn default() -> Self {
        Self::new()
    }
}

async fn drain<S: Stream>(stream: S) {
    stream.for_each(|_| futures::future::ready(())).await;
}
