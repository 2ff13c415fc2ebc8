//! Leader election on a `coordination.k8s.io/v1` Lease, so one allocator acts at a time.
//!
//! Every write goes through the Lease's `resourceVersion` (optimistic concurrency): of two
//! candidates that both see an expired lease, exactly one replace succeeds. A leader that cannot
//! renew before its lease runs out steps down *before* another can take over (it stops at
//! `renew_deadline`, shorter than the lease), so two replicas never act at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

/// Why one election round failed.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("the API server did not answer in time")]
    TimedOut,
}

/// Lease timings.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// How long a lease is valid after a renewal.
    pub lease: Duration,
    /// A leader that has not renewed for this long steps down (must be below `lease`).
    pub renew_deadline: Duration,
    /// How often candidates and the leader try.
    pub retry: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// One candidate for a Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: Timings,
}

impl Elector {
    /// A candidate named `identity` for Lease `namespace/name`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timings: Timings,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            timings,
        }
    }

    /// Campaigns until `shutdown` fires, publishing whether this candidate leads. On shutdown a
    /// leader releases the Lease so a standby takes over at once rather than after expiry.
    pub async fn run(self, leading: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        let mut last_renewal: Option<tokio::time::Instant> = None;
        loop {
            // A request that hangs must not keep a stale leader acting: bound each round.
            let round = tokio::time::timeout(self.timings.retry * 2, self.try_acquire_or_renew());
            match round.await.unwrap_or_else(|_| Err(RoundError::TimedOut)) {
                Ok(true) => {
                    if !*leading.borrow() {
                        info!(lease = %self.name, identity = %self.identity, "became leader");
                    }
                    last_renewal = Some(tokio::time::Instant::now());
                    leading.send_replace(true);
                }
                Ok(false) => {
                    if *leading.borrow() {
                        warn!(lease = %self.name, "lost the lease to another candidate");
                    }
                    last_renewal = None;
                    leading.send_replace(false);
                }
                Err(e) => {
                    warn!(lease = %self.name, error = %e, "lease update failed");
                    let expired =
                        last_renewal.is_none_or(|t| t.elapsed() >= self.timings.renew_deadline);
                    if expired && *leading.borrow() {
                        warn!(lease = %self.name, "could not renew in time: stepping down");
                        leading.send_replace(false);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.timings.retry) => {}
                _ = shutdown.changed() => break,
            }
        }
        if *leading.borrow() {
            leading.send_replace(false);
            if let Err(e) = self.release().await {
                warn!(lease = %self.name, error = %e, "could not release the lease; it expires by itself");
            } else {
                info!(lease = %self.name, "released the lease");
            }
        }
    }

    /// One round: create the Lease, renew ours, or take over an expired one.
    async fn try_acquire_or_renew(&self) -> Result<bool, RoundError> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let ours = holder == Some(self.identity.as_str());
        let duration =
            SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
        let expired = spec
            .renew_time
            .as_ref()
            .is_none_or(|t| t.0 + duration < now);
        if !ours && holder.is_some() && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours {
            spec.acquire_time.map(|t| t.0).unwrap_or(now)
        } else {
            now
        };
        lease.spec = Some(self.spec(acquired, now, transitions));
        // `replace` carries the resourceVersion we read: a concurrent writer makes it fail.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }

    fn spec(&self, acquired: Timestamp, renewed: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.timings.lease.as_secs()).unwrap_or(15)),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(renewed)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }
}
