//! One watch and one cache of a kind for every controller of the process. The allocator and
//! the director both follow every Service; with a cache each, a cluster's Services were held
//! twice.

use std::sync::Arc;

use futures::{Stream, StreamExt, TryStreamExt};
use kube::runtime::reflector::{self, ReflectHandle, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;

use crate::Watched;

/// How many changes the watch may run ahead of its slowest subscriber.
const BUFFER: usize = 1024;

/// A watch of every object of kind `K` that hands out [`Subscription`]s, then runs.
pub struct SharedWatch<K>
where
    K: Watched,
{
    writer: Writer<K>,
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
    /// Each object that was created or changed, and every object after each (re)list.
    pub applied: ReflectHandle<K>,
    /// Each object that was deleted, as last seen.
    pub deleted: mpsc::UnboundedReceiver<Arc<K>>,
}

impl<K> SharedWatch<K>
where
    K: Watched,
{
    /// A watch with no subscribers yet.
    pub fn new() -> Self {
        let (_, writer) = reflector::store_shared(BUFFER);
        Self {
            writer,
            deletions: Vec::new(),
        }
    }

    /// A subscription; every subscriber must keep polling its `applied` stream, or the watch
    /// waits for it.
    pub fn subscribe(&mut self) -> Subscription<K> {
        let (tx, deleted) = mpsc::unbounded_channel();
        self.deletions.push(tx);
        Subscription {
            store: self.writer.as_reader(),
            applied: self
                .writer
                .subscribe()
                .expect("a writer made by store_shared has subscribers"),
            deleted,
        }
    }

    /// Runs the watch (for as long as the future is polled); `slim` trims each object before
    /// it is cached.
    pub fn run(
        self,
        client: &kube::Client,
        slim: fn(&mut K),
    ) -> impl Future<Output = ()> + Send + use<K> {
        let deletions = self.deletions;
        let stream = crate::watch_stream::<K>(client, watcher::Config::default(), slim)
            .inspect_ok(move |event| {
                if let watcher::Event::Delete(object) = event {
                    let object = Arc::new(object.clone());
                    for tx in &deletions {
                        let _ = tx.send(object.clone());
                    }
                }
            })
            .reflect_shared(self.writer);
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
