//! Leader election on a `coordination.k8s.io/v1` Lease, so one allocator acts at a time.
//!
//! The semantics are client-go's `leaderelection`:
//!
//! - Every write goes through the Lease's `resourceVersion` (optimistic concurrency): of two
//!   candidates that both see an expired lease, exactly one write succeeds.
//! - Expiry is judged on the observer's own monotonic clock, from the moment it saw the record
//!   change. Another host's `renewTime` is never compared with the local wall clock: a clock
//!   skewed by minutes would otherwise take a live Lease for dead (or a dead one for live).
//! - A leader stops acting when `renew_deadline` has passed since the start of its last
//!   successful renewal. A standby waits `lease` (longer) from when it saw that renewal, which
//!   came after its start: the leader has stopped before any standby can take over.
//!
//! [`Candidate`] is the decision, without I/O or clock (time comes in as arguments, so tests
//! drive replicas with skewed clocks through seeded interleavings); [`Elector`] runs one
//! against the API server.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tracing::{Instrument, info, info_span, warn};

/// Why one election round failed.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("reading or writing Lease {lease}: {source}")]
    Api {
        lease: String,
        #[source]
        source: kube::Error,
    },
    #[error("Lease {lease}: the API server did not answer in time")]
    TimedOut { lease: String },
}

/// Timings that cannot keep two replicas from acting at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingsError {
    /// Lease durations are written in whole seconds.
    #[error("lease duration {0:?} is below one second")]
    LeaseTooShort(Duration),
    /// The leader must stop before a standby may take over.
    #[error("renew deadline {renew_deadline:?} must be below the lease duration {lease:?}")]
    DeadlineNotBelowLease {
        /// The lease duration.
        lease: Duration,
        /// The renew deadline.
        renew_deadline: Duration,
    },
    /// A leader must get more than one try before its deadline.
    #[error("retry period {retry:?} must be below the renew deadline {renew_deadline:?}")]
    RetryNotBelowDeadline {
        /// The renew deadline.
        renew_deadline: Duration,
        /// The retry period.
        retry: Duration,
    },
}

/// Lease timings.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// How long a standby waits, from seeing the last renewal, before taking over.
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

impl Timings {
    /// Timings for a lease duration, in client-go's proportions (15 s, 10 s, 2 s).
    pub fn from_lease(lease: Duration) -> Result<Self, TimingsError> {
        let timings = Self {
            lease,
            renew_deadline: lease.mul_f64(2.0 / 3.0),
            retry: (lease / 7).max(Duration::from_millis(100)),
        };
        timings.check()?;
        Ok(timings)
    }

    /// Whether these timings keep leaders apart.
    pub fn check(&self) -> Result<(), TimingsError> {
        if self.lease < Duration::from_secs(1) {
            return Err(TimingsError::LeaseTooShort(self.lease));
        }
        if self.renew_deadline >= self.lease {
            return Err(TimingsError::DeadlineNotBelowLease {
                lease: self.lease,
                renew_deadline: self.renew_deadline,
            });
        }
        if self.retry >= self.renew_deadline {
            return Err(TimingsError::RetryNotBelowDeadline {
                renew_deadline: self.renew_deadline,
                retry: self.retry,
            });
        }
        Ok(())
    }

    /// The duration as written in the Lease: whole seconds, rounded up, so that no reader
    /// waits less than this replica's lease.
    fn lease_seconds(&self) -> i32 {
        let seconds = self
            .lease
            .as_secs()
            .saturating_add(u64::from(self.lease.subsec_nanos() > 0));
        i32::try_from(seconds).unwrap_or(i32::MAX)
    }
}

/// What a candidate does with the Lease it just read.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum Step {
    /// There is none: create one with this spec.
    Create(LeaseSpec),
    /// Write this (acquire or renew), conditional on the `resourceVersion` read.
    Replace(Box<Lease>),
    /// Another holder's lease has not expired: wait.
    Wait,
}

/// One candidate's view of the election, without I/O: each input carries the time.
#[derive(Debug, Clone)]
pub struct Candidate {
    identity: String,
    timings: Timings,
    /// The record last read and when (on this candidate's monotonic clock) it was first seen.
    observed: Option<(Option<LeaseSpec>, Instant)>,
    /// This candidate acts until then.
    leading_until: Option<Instant>,
}

impl Candidate {
    /// A candidate named `identity`, which leads nothing yet.
    pub fn new(identity: &str, timings: Timings) -> Result<Self, TimingsError> {
        timings.check()?;
        Ok(Self {
            identity: identity.to_owned(),
            timings,
            observed: None,
            leading_until: None,
        })
    }

    /// Whether this candidate may act at `now`.
    pub fn leading(&self, now: Instant) -> bool {
        self.leading_until.is_some_and(|until| now < until)
    }

    /// When leadership ends unless renewed.
    pub fn lead_deadline(&self) -> Option<Instant> {
        self.leading_until
    }

    /// Decides what to write, given the Lease read at `now` (monotonic) and `wall` (this
    /// host's clock, only ever written, never compared with another host's).
    pub fn decide(&mut self, now: Instant, wall: Timestamp, lease: Option<&Lease>) -> Step {
        let Some(lease) = lease else {
            return Step::Create(self.spec(wall, wall, 0));
        };
        let spec = lease.spec.clone();
        if self.observed.as_ref().is_none_or(|(seen, _)| *seen != spec) {
            self.observed = Some((spec.clone(), now));
        }
        let spec = spec.unwrap_or_default();
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let ours = holder == Some(self.identity.as_str());
        if let Some(holder) = holder.filter(|_| !ours) {
            let seen = self.observed.as_ref().map_or(now, |(_, at)| *at);
            // None: the expiry is beyond what the clock can count, which is never.
            let expiry = seen.checked_add(self.wait_for(&spec));
            if expiry.is_none_or(|expiry| now < expiry) {
                if self.leading_until.take().is_some() {
                    warn!(%holder, "the Lease has another holder: stepping down");
                }
                return Step::Wait;
            }
        }
        let transitions = spec.lease_transitions.unwrap_or(0).max(0);
        let (acquired, transitions) = if ours {
            (spec.acquire_time.map_or(wall, |t| t.0), transitions)
        } else {
            (wall, transitions.saturating_add(1))
        };
        let mut lease = lease.clone();
        lease.spec = Some(self.spec(acquired, wall, transitions));
        Step::Replace(Box::new(lease))
    }

    /// The write of a round that started (before its read) at `started` succeeded.
    pub fn written(&mut self, started: Instant) {
        self.leading_until = started.checked_add(self.timings.renew_deadline);
    }

    /// The Lease to write to give it up, if this candidate holds `lease`.
    pub fn release(&mut self, lease: &Lease) -> Option<Lease> {
        self.leading_until = None;
        let spec = lease.spec.as_ref()?;
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return None;
        }
        let mut lease = lease.clone();
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = None;
        }
        Some(lease)
    }

    /// How long after seeing a record change another holder's lease lasts: what the record
    /// says, but never less than ours (a corrupt or hostile duration must not shorten the wait).
    fn wait_for(&self, spec: &LeaseSpec) -> Duration {
        let written = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(Duration::ZERO, Duration::from_secs);
        written.max(self.timings.lease)
    }

    fn spec(&self, acquired: Timestamp, renewed: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timings.lease_seconds()),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(renewed)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }
}

/// One candidate for a Lease, against the API server.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    candidate: Candidate,
    timings: Timings,
}

impl Elector {
    /// A candidate named `identity` for Lease `namespace/name`; refuses timings that could let
    /// two replicas act at once.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timings: Timings,
    ) -> Result<Self, TimingsError> {
        Ok(Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            candidate: Candidate::new(identity, timings)?,
            timings,
        })
    }

    /// Campaigns until `shutdown` fires, publishing whether this candidate leads. On shutdown a
    /// leader releases the Lease so a standby takes over at once rather than after expiry.
    pub async fn run(mut self, leading: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        let span = info_span!(
            "election",
            lease = %self.name,
            identity = %self.candidate.identity
        );
        async {
            loop {
                let started = Instant::now();
                // A request that hangs must not keep a stale leader acting: a round ends at
                // the lead deadline at the latest.
                let bound = started + self.timings.renew_deadline;
                let until = self
                    .candidate
                    .lead_deadline()
                    .filter(|d| *d > started)
                    .map_or(bound, |d| d.min(bound));
                let round = tokio::time::timeout_at(until.into(), self.round(started));
                // Stopping does not wait for a round the API server does not answer.
                let result = tokio::select! {
                    result = round => result,
                    _ = shutdown.changed() => break,
                };
                if let Err(e) = result.unwrap_or_else(|_| {
                    Err(RoundError::TimedOut {
                        lease: self.name.clone(),
                    })
                }) {
                    warn!(error = %e, "lease round failed");
                }
                self.publish(&leading);
                let wake = tokio::time::sleep(self.timings.retry);
                let deadline = self
                    .candidate
                    .lead_deadline()
                    .unwrap_or(started + self.timings.lease);
                tokio::select! {
                    _ = wake => {}
                    // Leadership ends on time even between rounds.
                    _ = tokio::time::sleep_until(deadline.into()), if *leading.borrow() => {}
                    _ = shutdown.changed() => break,
                }
                self.publish(&leading);
            }
            if *leading.borrow() {
                leading.send_replace(false);
                match self.release().await {
                    Ok(()) => info!("released the lease"),
                    Err(e) => {
                        warn!(error = %e, "could not release the lease; it expires by itself")
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    fn publish(&self, leading: &watch::Sender<bool>) {
        let now = self.candidate.leading(Instant::now());
        let was = leading.send_replace(now);
        match (was, now) {
            (false, true) => info!("became leader"),
            (true, false) => warn!("lost the lease or could not renew it in time: stepping down"),
            _ => {}
        }
    }

    /// One round: read, decide, write.
    async fn round(&mut self, started: Instant) -> Result<(), RoundError> {
        let api_error = |source| RoundError::Api {
            lease: self.name.clone(),
            source,
        };
        let lease = self.api.get_opt(&self.name).await.map_err(api_error)?;
        let step = self
            .candidate
            .decide(Instant::now(), Timestamp::now(), lease.as_ref());
        let written = match step {
            Step::Wait => return Ok(()),
            Step::Create(spec) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            // `replace` carries the resourceVersion read: a concurrent writer makes it fail.
            Step::Replace(lease) => {
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(_) => {
                self.candidate.written(started);
                Ok(())
            }
            // Another candidate wrote first; the next read shows who.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(api_error(e)),
        }
    }

    async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(released) = self.candidate.release(&lease) else {
            return Ok(());
        };
        self.api
            .replace(&self.name, &PostParams::default(), &released)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests;
