//! What `/healthz` and `/readyz` answer: whether the loops of the process still turn, and
//! whether every cache it decides from is filled.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The health of the process, shared by every loop that reports to it.
#[derive(Clone, Default)]
pub struct Health {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    loops: BTreeMap<&'static str, Loop>,
    watches: BTreeMap<WatchName, Watch>,
    /// Conditions that must be met before the process is ready, with what they wait for.
    pending: BTreeMap<&'static str, &'static str>,
    /// Reconciles running now, per controller: when each started.
    in_flight: BTreeMap<&'static str, BTreeMap<u64, Instant>>,
    next_reconcile: u64,
    stopping: bool,
}

struct Loop {
    last: Instant,
    bound: Duration,
    running: bool,
}

enum Watch {
    /// Listing, not yet complete; the last error if the list failed.
    Filling(Option<String>),
    Filled,
    /// Filled once, then failing (the cache may be stale) since `at`.
    Failing {
        error: String,
        at: Instant,
    },
}

/// A watch that failed after its cache was filled and has not failed again for this long is
/// taken as streaming again: the watcher retries within its backoff's ceiling of 30 s, and a
/// watch it re-establishes yields no event that would say so.
const WATCH_RECOVERED: Duration = Duration::from_secs(60);

/// A loop's proof of life; dropping it says the loop ended.
#[must_use = "a dropped heartbeat reports its loop as stopped"]
pub struct Heartbeat {
    health: Health,
    name: &'static str,
}

/// A reconcile in flight, counted until dropped.
pub struct InFlight {
    health: Health,
    controller: &'static str,
    id: u64,
}

/// A reconcile running for longer than this is taken as stuck: every call in one is bounded
/// well below it (the client's timeouts, the data plane's batches).
const RECONCILE_BOUND: Duration = Duration::from_secs(120);

/// One watch: the kind it lists and the role whose cache it fills (the allocator and the
/// director each keep their own cache of pools, and each must be filled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WatchName {
    /// The kind (`IPPool`, ...).
    pub kind: &'static str,
    /// Whose cache (`allocator`, `director`, `shared`).
    pub by: &'static str,
}

impl std::fmt::Display for WatchName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.kind, self.by)
    }
}

impl Health {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind, still worth reporting.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers loop `name`, which must beat at least once every `bound`.
    pub fn heartbeat(&self, name: &'static str, bound: Duration) -> Heartbeat {
        self.lock().loops.insert(
            name,
            Loop {
                last: Instant::now(),
                bound,
                running: true,
            },
        );
        Heartbeat {
            health: self.clone(),
            name,
        }
    }

    /// From now on, loops that end are not failures: the process is stopping.
    pub fn stopping(&self) {
        self.lock().stopping = true;
    }

    /// Readiness waits for `condition` (and says it waits for `what`) until [`Health::met`].
    pub fn require(&self, condition: &'static str, what: &'static str) {
        self.lock().pending.insert(condition, what);
    }

    /// `condition` is met.
    pub fn met(&self, condition: &'static str) {
        self.lock().pending.remove(condition);
    }

    /// Counts a reconcile of `controller` until the guard drops.
    pub fn reconcile(&self, controller: &'static str) -> InFlight {
        let mut state = self.lock();
        let id = state.next_reconcile;
        state.next_reconcile = id.wrapping_add(1);
        state
            .in_flight
            .entry(controller)
            .or_default()
            .insert(id, Instant::now());
        InFlight {
            health: self.clone(),
            controller,
            id,
        }
    }

    /// The reconciles running now, per controller, for a log line.
    pub fn in_flight(&self) -> String {
        let state = self.lock();
        let counts: Vec<String> = state
            .in_flight
            .iter()
            .filter(|(_, running)| !running.is_empty())
            .map(|(controller, running)| format!("{controller}: {}", running.len()))
            .collect();
        if counts.is_empty() {
            "none".to_owned()
        } else {
            counts.join(", ")
        }
    }

    /// A watch of `kind` started listing.
    pub fn watch_started(&self, kind: WatchName) {
        self.lock()
            .watches
            .entry(kind)
            .or_insert(Watch::Filling(None));
    }

    /// The watch of `kind` delivered: its cache is filled (`complete`) or it is streaming
    /// changes again after an error.
    pub fn watch_progressed(&self, kind: WatchName, complete: bool) {
        let mut state = self.lock();
        let watch = state.watches.entry(kind).or_insert(Watch::Filling(None));
        match watch {
            Watch::Filling(_) if !complete => {}
            _ => *watch = Watch::Filled,
        }
    }

    /// The watch of `kind` failed with `error`.
    pub fn watch_failed(&self, kind: WatchName, error: String) {
        let mut state = self.lock();
        let watch = state.watches.entry(kind).or_insert(Watch::Filling(None));
        *watch = match watch {
            Watch::Filling(_) => Watch::Filling(Some(error)),
            Watch::Filled | Watch::Failing { .. } => Watch::Failing {
                error,
                at: Instant::now(),
            },
        };
    }

    /// `Ok` while every loop beats within its bound and no reconcile is stuck; otherwise why not.
    pub fn live(&self) -> Result<(), String> {
        self.live_at(Instant::now())
    }

    fn live_at(&self, now: Instant) -> Result<(), String> {
        let state = self.lock();
        let mut problems = Vec::new();
        for (name, l) in &state.loops {
            if !l.running {
                if !state.stopping {
                    problems.push(format!("{name}: stopped"));
                }
            } else if now.saturating_duration_since(l.last) > l.bound {
                problems.push(format!(
                    "{name}: no progress for {}s (bound {}s)",
                    now.saturating_duration_since(l.last).as_secs(),
                    l.bound.as_secs()
                ));
            }
        }
        for (controller, running) in &state.in_flight {
            let oldest = running.values().min().copied();
            if let Some(since) =
                oldest.filter(|t| now.saturating_duration_since(*t) > RECONCILE_BOUND)
            {
                problems.push(format!(
                    "{controller}: a reconcile has run for {}s",
                    now.saturating_duration_since(since).as_secs()
                ));
            }
        }
        verdict(problems)
    }

    /// `Ok` once every cache is filled, every watch streams and every condition is met;
    /// otherwise why not.
    pub fn ready(&self) -> Result<(), String> {
        self.ready_at(Instant::now())
    }

    fn ready_at(&self, now: Instant) -> Result<(), String> {
        let state = self.lock();
        let mut problems = Vec::new();
        for (kind, watch) in &state.watches {
            match watch {
                Watch::Filled => {}
                Watch::Filling(None) => problems.push(format!("{kind}: cache not filled yet")),
                Watch::Filling(Some(e)) => {
                    problems.push(format!("{kind}: cache cannot be filled: {e}"))
                }
                Watch::Failing { error, at }
                    if now.saturating_duration_since(*at) < WATCH_RECOVERED =>
                {
                    problems.push(format!("{kind}: watch failing: {error}"))
                }
                Watch::Failing { .. } => {}
            }
        }
        for what in state.pending.values() {
            problems.push(format!("waiting for {what}"));
        }
        verdict(problems)
    }
}

fn verdict(problems: Vec<String>) -> Result<(), String> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

impl Heartbeat {
    /// The loop made progress.
    pub fn beat(&self) {
        if let Some(l) = self.health.lock().loops.get_mut(self.name) {
            l.last = Instant::now();
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if let Some(l) = self.health.lock().loops.get_mut(self.name) {
            l.running = false;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(running) = self.health.lock().in_flight.get_mut(self.controller) {
            running.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_ends_or_stalls_fails_liveness_with_its_name_unless_the_process_stops() {
        let health = Health::default();
        let beat = health.heartbeat("full pass", Duration::from_secs(60));
        assert_eq!(health.live(), Ok(()));
        let later = Instant::now() + Duration::from_secs(61);
        let stalled = health.live_at(later).unwrap_err();
        assert!(stalled.contains("full pass: no progress"), "{stalled}");
        drop(beat);
        assert_eq!(health.live(), Err("full pass: stopped".to_owned()));
        health.stopping();
        assert_eq!(health.live(), Ok(()));
    }

    #[test]
    fn a_stuck_reconcile_fails_liveness_and_a_finished_one_is_forgotten() {
        let health = Health::default();
        let reconcile = health.reconcile("director");
        let later = Instant::now() + RECONCILE_BOUND + Duration::from_secs(1);
        assert!(health.live_at(later).unwrap_err().contains("director"));
        drop(reconcile);
        assert_eq!(health.live_at(later), Ok(()));
    }

    #[test]
    fn readiness_names_the_kind_whose_cache_cannot_be_filled_until_it_is() {
        let health = Health::default();
        let pools = WatchName {
            kind: "IPPool",
            by: "allocator",
        };
        let directors = WatchName {
            kind: "IPPool",
            by: "director",
        };
        health.watch_started(pools);
        health.watch_started(directors);
        health.watch_progressed(directors, true);
        health.watch_failed(pools, "403 forbidden".into());
        let why = health.ready().unwrap_err();
        assert!(
            why.contains("IPPool (allocator): cache cannot be filled: 403"),
            "one role's filled cache does not hide the other's: {why}"
        );
        health.watch_progressed(pools, false);
        assert!(
            health.ready().is_err(),
            "a partial list is not a filled cache"
        );
        health.watch_progressed(pools, true);
        assert_eq!(health.ready(), Ok(()));
        health.watch_failed(pools, "gone".into());
        assert!(health.ready().unwrap_err().contains("watch failing"));
        let quiet = Instant::now() + WATCH_RECOVERED;
        assert_eq!(
            health.ready_at(quiet),
            Ok(()),
            "no new error within the backoff: the watch was re-established"
        );
        health.watch_progressed(pools, false);
        assert_eq!(health.ready(), Ok(()), "streaming again after an error");
        health.require("first pass", "the director's first full pass");
        assert_eq!(
            health.ready(),
            Err("waiting for the director's first full pass".to_owned())
        );
        health.met("first pass");
        assert_eq!(health.ready(), Ok(()));
    }
}
