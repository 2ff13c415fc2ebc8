//! Health checks as data and a schedule: which destination to probe when, and what the answers
//! make of it (rise and fall). Sans-IO: the caller runs the probes it is handed and reports each
//! outcome with the time; the monitor never sleeps and never opens a socket.
//!
//! One probe per [`Target`] (node address, port, check), shared by every Service whose
//! destinations need it. New targets start healthy (a director that restarts must not withdraw
//! everything while it probes again), except one whose address and port were down when they
//! left the set not long ago (a node that was NotReady for a while, a check whose timing was
//! edited): a dead node must not get traffic back only because it was forgotten. Targets are
//! spread over their interval; each next probe is
//! due an interval after the last was due, moved by up to a tenth of the interval, so that a
//! thousand targets added at once are never probed in the same millisecond.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Probe {
    /// A TCP connect.
    Tcp,
    /// An HTTP/1.1 `GET path`, healthy on 2xx and 3xx.
    Http {
        /// The request path.
        path: String,
        /// The `Host` header; `None`: the target's address and port.
        host: Option<String>,
    },
}

/// A check: the probe and its timing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Check {
    /// What each probe does.
    pub probe: Probe,
    /// Time between two probes of one target.
    pub interval: Duration,
    /// How long a probe may take before it counts as failed.
    pub timeout: Duration,
    /// Successes in a row that bring a failed target back.
    pub rise: u32,
    /// Failures in a row that take a healthy target out.
    pub fall: u32,
}

/// One thing to probe.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    /// The node's address.
    pub address: IpAddr,
    /// The port probed.
    pub port: u16,
    /// How.
    pub check: Check,
}

/// A target's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Health {
    /// Takes traffic.
    Up,
    /// Failed `fall` probes in a row and has not yet passed `rise`.
    Down,
}

/// A target changed state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Transition {
    /// The target.
    pub target: Target,
    /// Its new state.
    pub health: Health,
}

#[derive(Debug, Clone)]
struct State {
    health: Health,
    /// Failures in a row while up, successes in a row while down.
    streak: u32,
    /// When the next probe is due.
    due: Instant,
    /// A probe handed out and not yet reported.
    in_flight: bool,
}

/// How long the failure of a target that left the set is remembered.
const REMEMBER_DOWN: Duration = Duration::from_secs(600);

/// The schedule and the states of every target.
#[derive(Debug, Clone)]
pub struct Monitor {
    targets: BTreeMap<Target, State>,
    /// When each (address, port) that was down left the set.
    left_down: BTreeMap<(IpAddr, u16), Instant>,
    /// At most this many probes run at once; due ones beyond it wait their turn.
    max_in_flight: usize,
    in_flight: usize,
    /// xorshift64 state: jitter needs no more, and a seed makes runs repeatable.
    rng: u64,
}

impl Monitor {
    /// A monitor running at most `max_in_flight` probes at once (at least one); `seed` drives
    /// the spread and the jitter.
    pub fn new(max_in_flight: usize, seed: u64) -> Self {
        Self {
            targets: BTreeMap::new(),
            left_down: BTreeMap::new(),
            max_in_flight: max_in_flight.max(1),
            in_flight: 0,
            rng: seed | 1,
        }
    }

    /// Makes `wanted` the targets: new ones start healthy with their first probe somewhere in
    /// their first interval; gone ones are forgotten (a probe of one still in flight is
    /// ignored when it reports).
    pub fn set_targets(&mut self, wanted: BTreeSet<Target>, now: Instant) {
        let before = std::mem::take(&mut self.targets);
        for (target, state) in &before {
            if state.health == Health::Down && !wanted.contains(target) {
                self.left_down.insert((target.address, target.port), now);
            }
        }
        self.left_down
            .retain(|_, left| now.saturating_duration_since(*left) < REMEMBER_DOWN);
        for target in wanted {
            let state = match before.get(&target) {
                Some(state) => state.clone(),
                None => {
                    let offset = self.fraction_of(target.check.interval);
                    let remembered = self.left_down.remove(&(target.address, target.port));
                    State {
                        health: if remembered.is_some() {
                            Health::Down
                        } else {
                            Health::Up
                        },
                        streak: 0,
                        due: now + offset,
                        in_flight: false,
                    }
                }
            };
            self.targets.insert(target, state);
        }
        self.in_flight = self.targets.values().filter(|s| s.in_flight).count();
    }

    /// The probes to start now, within the bound on probes at once, most overdue first.
    pub fn due(&mut self, now: Instant) -> Vec<Target> {
        let mut ready: Vec<(Instant, Target)> = self
            .targets
            .iter()
            .filter(|(_, s)| !s.in_flight && s.due <= now)
            .map(|(t, s)| (s.due, t.clone()))
            .collect();
        ready.sort();
        let room = self.max_in_flight.saturating_sub(self.in_flight);
        ready.truncate(room);
        for (_, target) in &ready {
            if let Some(state) = self.targets.get_mut(target) {
                state.in_flight = true;
            }
        }
        self.in_flight += ready.len();
        ready.into_iter().map(|(_, t)| t).collect()
    }

    /// Takes the outcome of a probe handed out by [`Monitor::due`]; returns the transition it
    /// caused, if any.
    pub fn finished(&mut self, target: &Target, healthy: bool, now: Instant) -> Option<Transition> {
        let jitter = self.jitter(target.check.interval);
        let state = self.targets.get_mut(target)?;
        if !state.in_flight {
            return None;
        }
        state.in_flight = false;
        self.in_flight = self.in_flight.saturating_sub(1);
        // Keep the cadence: the next probe is due an interval after this one was, unless this
        // one took so long that it is due already.
        let next = state.due + target.check.interval;
        state.due = if next > now {
            let (later, earlier) = jitter;
            (next + later).checked_sub(earlier).unwrap_or(next).max(now)
        } else {
            now
        };
        let (threshold, towards) = match (state.health, healthy) {
            (Health::Up, false) => (target.check.fall, Health::Down),
            (Health::Down, true) => (target.check.rise, Health::Up),
            _ => {
                state.streak = 0;
                return None;
            }
        };
        state.streak += 1;
        if state.streak < threshold {
            return None;
        }
        state.streak = 0;
        state.health = towards;
        Some(Transition {
            target: target.clone(),
            health: towards,
        })
    }

    /// The state of `target`, if it is one.
    pub fn health(&self, target: &Target) -> Option<Health> {
        self.targets.get(target).map(|s| s.health)
    }

    /// The targets that are down.
    pub fn down(&self) -> BTreeSet<Target> {
        self.targets
            .iter()
            .filter(|(_, s)| s.health == Health::Down)
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// When [`Monitor::due`] next has something to hand out (`None`: nothing to probe, or
    /// everything in flight).
    pub fn next_due(&self) -> Option<Instant> {
        if self.in_flight >= self.max_in_flight {
            return None;
        }
        self.targets
            .values()
            .filter(|s| !s.in_flight)
            .map(|s| s.due)
            .min()
    }

    /// How many targets there are.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Whether there is no target.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// A uniformly spread point in `[0, span)`.
    fn fraction_of(&mut self, span: Duration) -> Duration {
        let nanos = span.as_nanos().max(1) as u64;
        Duration::from_nanos(self.next_random() % nanos)
    }

    /// `(later, earlier)`: one of them zero, the other up to a tenth of `interval`.
    fn jitter(&mut self, interval: Duration) -> (Duration, Duration) {
        let amount = self.fraction_of(interval / 10);
        if self.next_random().is_multiple_of(2) {
            (amount, Duration::ZERO)
        } else {
            (Duration::ZERO, amount)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(interval_ms: u64, rise: u32, fall: u32) -> Check {
        Check {
            probe: Probe::Tcp,
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(interval_ms / 2),
            rise,
            fall,
        }
    }

    fn target(last: u8, port: u16, check: &Check) -> Target {
        Target {
            address: IpAddr::from([10, 240, 0, last]),
            port,
            check: check.clone(),
        }
    }

    /// Runs the monitor on a virtual clock for `span`, answering every probe at once with
    /// `healthy(target, now)`, and returns the transitions with their times.
    fn drive(
        monitor: &mut Monitor,
        start: Instant,
        span: Duration,
        healthy: impl Fn(&Target, Instant) -> bool,
    ) -> Vec<(Duration, Transition)> {
        let mut now = start;
        let mut seen = Vec::new();
        while now < start + span {
            for t in monitor.due(now) {
                if let Some(transition) = monitor.finished(&t, healthy(&t, now), now) {
                    seen.push((now - start, transition));
                }
            }
            now += Duration::from_millis(1);
        }
        seen
    }

    #[test]
    fn a_target_goes_down_after_fall_failures_in_a_row_and_back_after_rise_successes() {
        let c = check(500, 2, 3);
        let t = target(101, 80, &c);
        let start = Instant::now();
        let mut m = Monitor::new(10, 7);
        m.set_targets([t.clone()].into(), start);
        assert_eq!(m.health(&t), Some(Health::Up), "new targets start healthy");
        // Dead from 2 s to 5 s.
        let dead = |_: &Target, now: Instant| {
            let at = now - start;
            !(Duration::from_secs(2)..Duration::from_secs(5)).contains(&at)
        };
        let seen = drive(&mut m, start, Duration::from_secs(8), dead);
        assert_eq!(seen.len(), 2, "one fall, one rise: {seen:?}");
        let (down_at, down) = &seen[0];
        let (up_at, up) = &seen[1];
        assert_eq!(down.health, Health::Down);
        assert_eq!(up.health, Health::Up);
        // Three probes at about 500 ms (jitter up to 50 ms) after the death: within 1.7 s.
        assert!(
            *down_at > Duration::from_secs(2) && *down_at <= Duration::from_millis(3700),
            "down at {down_at:?}"
        );
        assert!(
            *up_at > Duration::from_secs(5) && *up_at <= Duration::from_millis(6200),
            "up at {up_at:?}"
        );
    }

    #[test]
    fn a_failure_between_successes_resets_the_streak_so_a_flaky_target_stays_up() {
        let c = check(100, 2, 3);
        let t = target(101, 80, &c);
        let start = Instant::now();
        let mut m = Monitor::new(10, 1);
        m.set_targets([t.clone()].into(), start);
        // Every third probe fails: never three failures in a row.
        let mut n = 0;
        let mut now = start;
        for _ in 0..10_000 {
            for t in m.due(now) {
                n += 1;
                assert_eq!(m.finished(&t, n % 3 != 0, now), None);
            }
            now += Duration::from_millis(1);
        }
        assert!(n > 90, "probed {n} times in 10 s at 100 ms");
    }

    #[test]
    fn targets_added_at_once_are_spread_over_their_interval() {
        let c = check(1000, 2, 3);
        let start = Instant::now();
        let mut m = Monitor::new(usize::MAX, 42);
        let targets: BTreeSet<Target> = (0..1000u16).map(|p| target(101, 10_000 + p, &c)).collect();
        m.set_targets(targets, start);
        // Count first probes per 10 ms bucket over the first second (jitter may bring a
        // second probe of an early target into it too).
        let mut buckets = [0u32; 100];
        let mut probed = BTreeSet::new();
        let mut now = start;
        while now < start + Duration::from_secs(1) {
            for t in m.due(now) {
                if probed.insert(t.clone()) {
                    buckets[((now - start).as_millis() / 10) as usize] += 1;
                }
                let _ = m.finished(&t, true, now);
            }
            now += Duration::from_millis(1);
        }
        assert_eq!(
            buckets.iter().sum::<u32>(),
            1000,
            "each probed in its first interval"
        );
        let busiest = buckets.iter().max().copied().unwrap_or(0);
        assert!(busiest <= 30, "at most 3% in one 10 ms: {busiest}");
    }

    #[test]
    fn no_more_probes_run_at_once_than_the_bound() {
        let c = check(100, 2, 3);
        let start = Instant::now();
        let mut m = Monitor::new(5, 3);
        m.set_targets((0..50u16).map(|p| target(101, p + 1, &c)).collect(), start);
        let later = start + Duration::from_secs(1);
        let first = m.due(later);
        assert_eq!(first.len(), 5);
        assert!(m.due(later).is_empty(), "all five still in flight");
        assert_eq!(m.next_due(), None);
        let _ = m.finished(&first[0], true, later);
        assert_eq!(m.due(later).len(), 1, "one finished, one more starts");
    }

    #[test]
    fn a_target_shared_by_services_is_one_probe_and_keeps_its_state_across_updates() {
        let c = check(100, 1, 1);
        let t = target(101, 8081, &c);
        let start = Instant::now();
        let mut m = Monitor::new(10, 5);
        // Two Services name the same target: the set has it once.
        m.set_targets([t.clone(), t.clone()].into(), start);
        assert_eq!(m.len(), 1);
        let now = start + Duration::from_millis(200);
        let probes = m.due(now);
        assert_eq!(probes, vec![t.clone()]);
        let transition = m.finished(&t, false, now);
        assert_eq!(transition.map(|t| t.health), Some(Health::Down));
        // Another target comes; the first keeps its state.
        let other = target(102, 8081, &c);
        m.set_targets([t.clone(), other.clone()].into(), now);
        assert_eq!(m.health(&t), Some(Health::Down));
        assert_eq!(m.health(&other), Some(Health::Up));
        assert_eq!(m.down(), [t.clone()].into());
    }

    #[test]
    fn a_target_that_left_while_down_comes_back_down_even_with_another_check() {
        let c = check(100, 2, 1);
        let t = target(102, 8081, &c);
        let start = Instant::now();
        let mut m = Monitor::new(10, 13);
        m.set_targets([t.clone()].into(), start);
        let now = start + Duration::from_millis(200);
        assert_eq!(m.due(now).len(), 1);
        let _ = m.finished(&t, false, now);
        assert_eq!(m.health(&t), Some(Health::Down));
        // The node went NotReady (no plan needs it), or the check's timing was edited.
        m.set_targets(BTreeSet::new(), now);
        let edited = target(102, 8081, &check(500, 2, 3));
        m.set_targets([edited.clone()].into(), now + Duration::from_secs(30));
        assert_eq!(
            m.health(&edited),
            Some(Health::Down),
            "it must pass rise checks first"
        );
        // Long forgotten, it starts healthy like any new target.
        m.set_targets(BTreeSet::new(), now + Duration::from_secs(31));
        m.set_targets(
            [edited.clone()].into(),
            now + Duration::from_secs(31) + REMEMBER_DOWN,
        );
        assert_eq!(m.health(&edited), Some(Health::Up));
    }

    #[test]
    fn the_outcome_of_a_probe_for_a_target_that_left_is_ignored() {
        let c = check(100, 1, 1);
        let t = target(101, 80, &c);
        let start = Instant::now();
        let mut m = Monitor::new(10, 9);
        m.set_targets([t.clone()].into(), start);
        let now = start + Duration::from_millis(200);
        assert_eq!(m.due(now).len(), 1);
        m.set_targets(BTreeSet::new(), now);
        assert_eq!(m.finished(&t, false, now), None);
        assert!(m.is_empty());
        assert_eq!(m.next_due(), None);
    }

    #[test]
    fn a_slow_probe_is_followed_at_once_not_an_interval_late() {
        let c = check(100, 2, 3);
        let t = target(101, 80, &c);
        let start = Instant::now();
        let mut m = Monitor::new(10, 11);
        m.set_targets([t.clone()].into(), start);
        let first = start + Duration::from_millis(100);
        assert_eq!(m.due(first).len(), 1);
        // It took 350 ms (a timeout): the next one is due now, not at 450 ms + 100 ms.
        let done = first + Duration::from_millis(350);
        let _ = m.finished(&t, false, done);
        assert_eq!(m.next_due(), Some(done));
    }
}
