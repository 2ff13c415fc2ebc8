use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::ObjectMeta;
use proptest::prelude::*;

use super::{Candidate, Step, Timings, TimingsError};

const TIMINGS: Timings = Timings {
    lease: Duration::from_secs(15),
    renew_deadline: Duration::from_secs(10),
    retry: Duration::from_secs(2),
};

fn lease(spec: Option<LeaseSpec>) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some("ipvslb-allocator".into()),
            resource_version: Some("1".into()),
            ..ObjectMeta::default()
        },
        spec,
    }
}

fn held_by(holder: &str, duration: Option<i32>, renewed: Option<Timestamp>) -> Lease {
    lease(Some(LeaseSpec {
        holder_identity: Some(holder.into()),
        lease_duration_seconds: duration,
        renew_time: renewed.map(MicroTime),
        ..LeaseSpec::default()
    }))
}

fn candidate(identity: &str) -> Candidate {
    Candidate::new(identity, TIMINGS).unwrap()
}

fn holder(step: &Step) -> Option<&str> {
    match step {
        Step::Replace(lease) => lease.spec.as_ref()?.holder_identity.as_deref(),
        Step::Create(spec) => spec.holder_identity.as_deref(),
        Step::Wait => None,
    }
}

#[test]
fn timings_that_could_let_two_replicas_act_at_once_are_refused() {
    assert_eq!(
        Timings::from_lease(Duration::from_millis(900)).unwrap_err(),
        TimingsError::LeaseTooShort(Duration::from_millis(900))
    );
    let equal = Timings {
        renew_deadline: TIMINGS.lease,
        ..TIMINGS
    };
    assert!(matches!(
        Candidate::new("a", equal).unwrap_err(),
        TimingsError::DeadlineNotBelowLease { .. }
    ));
    let slow_retry = Timings {
        retry: TIMINGS.renew_deadline,
        ..TIMINGS
    };
    assert!(matches!(
        slow_retry.check().unwrap_err(),
        TimingsError::RetryNotBelowDeadline { .. }
    ));
    let one = Timings::from_lease(Duration::from_secs(1)).unwrap();
    assert!(one.renew_deadline < one.lease && one.retry < one.renew_deadline);
}

#[test]
fn a_lease_duration_with_a_fraction_is_written_rounded_up() {
    let timings = Timings::from_lease(Duration::from_millis(1500)).unwrap();
    let mut a = Candidate::new("a", timings).unwrap();
    let Step::Create(spec) = a.decide(Instant::now(), Timestamp::now(), None) else {
        panic!("no Lease: create one");
    };
    assert_eq!(spec.lease_duration_seconds, Some(2));
}

#[test]
fn another_holders_lease_expires_by_the_observers_clock_whatever_its_renew_time_says() {
    let t0 = Instant::now();
    // Renewed, by its own clock, an hour in the past and a year in the future.
    for renewed in [
        Timestamp::now() - SignedDuration::from_hours(1),
        Timestamp::now() + SignedDuration::from_hours(24 * 365),
        Timestamp::MIN,
        Timestamp::MAX,
    ] {
        let mut b = candidate("b");
        let record = held_by("a", Some(15), Some(renewed));
        assert_eq!(b.decide(t0, Timestamp::now(), Some(&record)), Step::Wait);
        let almost = t0 + TIMINGS.lease - Duration::from_millis(1);
        assert_eq!(
            b.decide(almost, Timestamp::now(), Some(&record)),
            Step::Wait
        );
        let step = b.decide(t0 + TIMINGS.lease, Timestamp::now(), Some(&record));
        assert_eq!(
            holder(&step),
            Some("b"),
            "unchanged for a lease: taken over"
        );
    }
}

#[test]
fn a_renewal_seen_restarts_the_wait() {
    let t0 = Instant::now();
    let mut b = candidate("b");
    let first = held_by("a", Some(15), Some(Timestamp::UNIX_EPOCH));
    assert_eq!(b.decide(t0, Timestamp::now(), Some(&first)), Step::Wait);
    let renewed = held_by(
        "a",
        Some(15),
        Some(Timestamp::UNIX_EPOCH + SignedDuration::from_secs(1)),
    );
    let t1 = t0 + Duration::from_secs(10);
    assert_eq!(b.decide(t1, Timestamp::now(), Some(&renewed)), Step::Wait);
    assert_eq!(
        b.decide(t0 + TIMINGS.lease, Timestamp::now(), Some(&renewed)),
        Step::Wait,
        "15 s after the first sighting, but 5 s after the renewal"
    );
    assert_eq!(
        holder(&b.decide(t1 + TIMINGS.lease, Timestamp::now(), Some(&renewed))),
        Some("b")
    );
}

#[test]
fn a_corrupt_lease_duration_never_shortens_the_wait_nor_panics() {
    let t0 = Instant::now();
    for duration in [None, Some(0), Some(-1), Some(i32::MIN), Some(1)] {
        let mut b = candidate("b");
        let record = held_by("a", duration, None);
        assert_eq!(b.decide(t0, Timestamp::now(), Some(&record)), Step::Wait);
        assert_eq!(
            b.decide(
                t0 + Duration::from_secs(14),
                Timestamp::now(),
                Some(&record)
            ),
            Step::Wait,
            "{duration:?} seconds: our own 15 s are waited"
        );
        let step = b.decide(t0 + TIMINGS.lease, Timestamp::now(), Some(&record));
        assert_eq!(holder(&step), Some("b"), "{duration:?}");
    }
    // The largest duration a Lease can hold is waited, without overflow.
    let mut b = candidate("b");
    let record = held_by("a", Some(i32::MAX), None);
    assert_eq!(b.decide(t0, Timestamp::now(), Some(&record)), Step::Wait);
    let step = b.decide(
        t0 + Duration::from_secs(3600),
        Timestamp::now(),
        Some(&record),
    );
    assert_eq!(step, Step::Wait);
}

#[test]
fn a_lease_without_spec_holder_or_sane_counters_is_taken_with_sane_ones() {
    let t0 = Instant::now();
    let cases = [
        (lease(None), 1),
        (lease(Some(LeaseSpec::default())), 1),
        (held_by("", Some(15), Some(Timestamp::MAX)), 1),
        (
            lease(Some(LeaseSpec {
                lease_transitions: Some(-7),
                ..LeaseSpec::default()
            })),
            1,
        ),
        (
            lease(Some(LeaseSpec {
                lease_transitions: Some(i32::MAX),
                ..LeaseSpec::default()
            })),
            i32::MAX,
        ),
    ];
    for (record, transitions) in cases {
        let mut b = candidate("b");
        let Step::Replace(written) = b.decide(t0, Timestamp::now(), Some(&record)) else {
            panic!("a Lease without holder is free: {record:?}");
        };
        let spec = written.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(transitions), "{record:?}");
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(
            written.metadata.resource_version.as_deref(),
            Some("1"),
            "the write is conditional on what was read"
        );
    }
}

#[test]
fn a_leader_acts_until_its_renew_deadline_and_not_a_moment_longer() {
    let t0 = Instant::now();
    let mut a = candidate("a");
    assert!(!a.leading(t0));
    let _ = a.decide(t0, Timestamp::now(), None);
    a.written(t0);
    assert!(a.leading(t0 + TIMINGS.renew_deadline - Duration::from_millis(1)));
    assert!(!a.leading(t0 + TIMINGS.renew_deadline));
}

#[test]
fn a_leader_that_reads_another_holder_steps_down_at_once() {
    let t0 = Instant::now();
    let mut a = candidate("a");
    a.written(t0);
    let taken = held_by("b", Some(15), Some(Timestamp::now()));
    assert_eq!(a.decide(t0, Timestamp::now(), Some(&taken)), Step::Wait);
    assert!(!a.leading(t0));
}

#[test]
fn a_release_clears_only_a_lease_this_candidate_holds() {
    let mut a = candidate("a");
    a.written(Instant::now());
    assert_eq!(a.release(&held_by("b", Some(15), None)), None);
    let released = a.release(&held_by("a", Some(15), Some(Timestamp::now())));
    let spec = released.unwrap().spec.unwrap();
    assert_eq!((spec.holder_identity, spec.renew_time), (None, None));
    assert!(!a.leading(Instant::now()));
}

/// The API server's side of the model: one Lease and its resourceVersion.
#[derive(Default)]
struct Server {
    lease: Option<Lease>,
    version: u64,
}

impl Server {
    fn write(&mut self, step: &Step, read_version: Option<&str>) -> bool {
        let current = self
            .lease
            .as_ref()
            .and_then(|l| l.metadata.resource_version.clone());
        let mut lease = match step {
            Step::Create(spec) if self.lease.is_none() => lease(Some(spec.clone())),
            Step::Replace(lease) if current.as_deref() == read_version && current.is_some() => {
                (**lease).clone()
            }
            _ => return false,
        };
        self.version += 1;
        lease.metadata.resource_version = Some(self.version.to_string());
        self.lease = Some(lease);
        true
    }
}

/// Where a replica is in its round; each phase happens at a step of its own, so replicas'
/// reads, writes and answers interleave and take time.
enum Phase {
    Idle,
    /// Read at `started`; the answer is on its way.
    Read {
        started: Instant,
        lease: Option<Box<Lease>>,
    },
    /// The write is on its way.
    Writing {
        started: Instant,
        step: Step,
        read_version: Option<String>,
    },
    /// The server answered `ok`; the answer is on its way (it may be lost).
    Answering {
        started: Instant,
        ok: bool,
    },
}

struct Replica {
    candidate: Candidate,
    /// This host's monotonic clock starts elsewhere than the others'.
    origin: Instant,
    /// This host's wall clock is wrong by this much.
    skew: SignedDuration,
    phase: Phase,
}

struct World {
    elapsed: Duration,
    server: Server,
    replicas: Vec<Replica>,
}

impl World {
    fn new(skews: &[i64]) -> Self {
        let base = Instant::now();
        let replicas = skews
            .iter()
            .enumerate()
            .map(|(i, skew)| Replica {
                candidate: candidate(&format!("replica-{i}")),
                origin: base + Duration::from_secs(1000 * i as u64),
                skew: SignedDuration::from_secs(*skew),
                phase: Phase::Idle,
            })
            .collect();
        Self {
            elapsed: Duration::ZERO,
            server: Server::default(),
            replicas,
        }
    }

    fn now(&self, i: usize) -> Instant {
        self.replicas[i].origin + self.elapsed
    }

    fn wall(&self, i: usize) -> Timestamp {
        let true_wall = Timestamp::UNIX_EPOCH
            + SignedDuration::from_secs(1_800_000_000)
            + SignedDuration::try_from(self.elapsed).unwrap();
        true_wall + self.replicas[i].skew
    }

    /// Moves replica `i` one phase on; `lose` drops an answer on the way back.
    fn advance(&mut self, i: usize, lose: bool) {
        let now = self.now(i);
        let wall = self.wall(i);
        let phase = std::mem::replace(&mut self.replicas[i].phase, Phase::Idle);
        self.replicas[i].phase = match phase {
            Phase::Idle => Phase::Read {
                started: now,
                lease: self.server.lease.clone().map(Box::new),
            },
            Phase::Read { started, lease } => {
                let read_version = lease
                    .as_ref()
                    .and_then(|l| l.metadata.resource_version.clone());
                match self.replicas[i]
                    .candidate
                    .decide(now, wall, lease.as_deref())
                {
                    Step::Wait => Phase::Idle,
                    step => Phase::Writing {
                        started,
                        step,
                        read_version,
                    },
                }
            }
            Phase::Writing {
                started,
                step,
                read_version,
            } => Phase::Answering {
                started,
                ok: self.server.write(&step, read_version.as_deref()),
            },
            Phase::Answering { started, ok } => {
                if ok && !lose {
                    self.replicas[i].candidate.written(started);
                }
                Phase::Idle
            }
        };
    }

    fn leaders(&self) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|i| self.replicas[*i].candidate.leading(self.now(*i)))
            .collect()
    }

    fn holder(&self) -> Option<String> {
        self.server
            .lease
            .as_ref()?
            .spec
            .as_ref()?
            .holder_identity
            .clone()
    }

    /// Leadership only begins at a step, so checking after each one covers every instant.
    fn check(&self, history: &str) -> Result<(), TestCaseError> {
        let leaders = self.leaders();
        prop_assert!(
            leaders.len() <= 1,
            "two leaders {leaders:?} at {:?}\n{history}",
            self.elapsed
        );
        if let Some(&leader) = leaders.first() {
            let name = format!("replica-{leader}");
            let holder = self.holder();
            prop_assert_eq!(
                holder.as_deref(),
                Some(name.as_str()),
                "a leader acts without holding the Lease\n{}",
                history
            );
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn with_a_clock_skewed_by_minutes_at_most_one_replica_leads_at_any_instant(
        skew in prop_oneof![Just(0i64), -900i64..900, Just(-600), Just(600)],
        steps in proptest::collection::vec((0usize..3, 0u64..4000, proptest::bool::weighted(0.2)), 1..400),
    ) {
        let mut world = World::new(&[0, skew, -skew / 2]);
        let mut history = String::new();
        let mut led = false;
        for (replica, millis, lose) in steps {
            world.elapsed += Duration::from_millis(millis);
            world.advance(replica, lose);
            history.push_str(&format!("{:?} replica-{replica}{}\n", world.elapsed, if lose { " (answer lost)" } else { "" }));
            world.check(&history)?;
            led |= !world.leaders().is_empty();
        }
        // And someone leads once the network behaves: the safety above is not bought by never
        // electing anyone.
        for _ in 0..100 {
            for replica in 0..3 {
                world.elapsed += TIMINGS.retry / 4;
                world.advance(replica, false);
                world.check(&history)?;
            }
            if !world.leaders().is_empty() {
                led = true;
                break;
            }
        }
        prop_assert!(led, "nobody ever led\n{}", history);
    }
}
