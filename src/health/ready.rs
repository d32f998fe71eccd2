//! The readiness decision: a pure function of what the probes and the watch hub
//! observed ([`decide`]), and the measure of the hub's lag ([`Lag`]).
//!
//! The hub *lags* when etcd reported a revision (in a probe) that the hub has not
//! dispatched yet, for longer than `max_watch_lag_ms`. An idle cluster never lags:
//! with no new revision there is nothing to be behind. Revisions outside the hub's
//! watched range (global keys) bring no event; the health task then asks the hub
//! for a progress probe, which proves it current (see `Hub::nudge_progress`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::watch::hub::HubSync;

/// Revisions remembered while the hub is behind (beyond that, the oldest one still
/// gives the time since which it has been behind).
const MAX_PENDING: usize = 256;

/// The bounds readiness checks against (from `[health]`).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_probe_age: Duration,
    pub max_watch_lag: Duration,
}

/// What readiness is decided from.
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    /// When the last probe of etcd succeeded.
    pub probe_ok: Option<Instant>,
    /// The last probe's error, if the last probe failed.
    pub probe_error: Option<&'a str>,
    pub hub: HubSync,
    /// Since when the hub has been behind a revision etcd reported ([`Lag`]).
    pub behind_since: Option<Instant>,
}

/// The result of each check: `Err` says why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub upstream: Result<(), String>,
    pub watch: Result<(), String>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.upstream.is_ok() && self.watch.is_ok()
    }

    /// One line per check (`upstream: ok`, `watch: upstream watch not open`), then
    /// the verdict: the body of `/readyz`.
    pub fn report(&self) -> String {
        let line = |name: &str, r: &Result<(), String>| match r {
            Ok(()) => format!("{name}: ok\n"),
            Err(e) => format!("{name}: {e}\n"),
        };
        let verdict = if self.is_ready() { "ready\n" } else { "not ready\n" };
        format!("{}{}{verdict}", line("upstream", &self.upstream), line("watch", &self.watch))
    }
}

/// Decides readiness at `now`.
pub fn decide(bounds: Bounds, now: Instant, obs: &Observed<'_>) -> Readiness {
    let last_error = obs.probe_error.map(|e| format!(" (last error: {e})")).unwrap_or_default();
    let upstream = match obs.probe_ok {
        Some(t) if now.saturating_duration_since(t) <= bounds.max_probe_age => Ok(()),
        Some(t) => Err(format!(
            "no successful probe of etcd for {} ms{last_error}",
            now.saturating_duration_since(t).as_millis()
        )),
        None => Err(format!("no successful probe of etcd yet{last_error}")),
    };
    let watch = if !obs.hub.ready {
        Err("the watch hub has not read etcd's revision yet".to_string())
    } else if !obs.hub.open {
        Err(format!("the upstream watch is not open (resuming after revision {})", obs.hub.last_rev))
    } else {
        match obs.behind_since.map(|t| now.saturating_duration_since(t)) {
            Some(lag) if lag > bounds.max_watch_lag => Err(format!(
                "behind etcd's revision for {} ms (dispatched through revision {})",
                lag.as_millis(),
                obs.hub.last_rev
            )),
            _ => Ok(()),
        }
    };
    Readiness { upstream, watch }
}

/// Revisions etcd reported that the hub had not reached, oldest first, with when
/// they were read.
#[derive(Debug, Default)]
pub struct Lag {
    pending: VecDeque<(i64, Instant)>,
}

impl Lag {
    /// A probe read etcd's revision `rev` at `at`, when the hub had dispatched
    /// through `hub_rev`.
    pub fn observe(&mut self, rev: i64, at: Instant, hub_rev: i64) {
        self.catch_up(hub_rev);
        let newer = self.pending.back().is_none_or(|&(r, _)| rev > r);
        if rev > hub_rev && newer && self.pending.len() < MAX_PENDING {
            self.pending.push_back((rev, at));
        }
    }

    /// Since when the hub, now through `hub_rev`, has been behind; `None` if it has
    /// reached every revision etcd reported.
    pub fn behind_since(&mut self, hub_rev: i64) -> Option<Instant> {
        self.catch_up(hub_rev);
        self.pending.front().map(|&(_, t)| t)
    }

    fn catch_up(&mut self, hub_rev: i64) {
        while self.pending.front().is_some_and(|&(r, _)| r <= hub_rev) {
            self.pending.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds { max_probe_age: Duration::from_secs(5), max_watch_lag: Duration::from_secs(10) };
    const SYNCED: HubSync = HubSync { ready: true, open: true, last_rev: 100 };

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn obs(probe_ok: Option<Instant>, hub: HubSync, behind_since: Option<Instant>) -> Observed<'static> {
        Observed { probe_ok, probe_error: None, hub, behind_since }
    }

    #[test]
    fn ready_with_a_recent_probe_and_a_current_hub() {
        let t0 = Instant::now();
        let r = decide(BOUNDS, at(t0, 4_000), &obs(Some(t0), SYNCED, None));
        assert!(r.is_ready(), "{r:?}");
        assert_eq!(r.report(), "upstream: ok\nwatch: ok\nready\n");
    }

    #[test]
    fn upstream_fails_without_a_probe_or_with_a_stale_one() {
        let t0 = Instant::now();
        let r = decide(BOUNDS, t0, &obs(None, SYNCED, None));
        assert!(r.upstream.as_ref().is_err_and(|e| e.contains("yet")), "{r:?}");
        assert!(!r.is_ready());
        let stale = Observed { probe_error: Some("connection refused"), ..obs(Some(t0), SYNCED, None) };
        let r = decide(BOUNDS, at(t0, 5_001), &stale);
        let e = r.upstream.clone().unwrap_err();
        assert!(e.contains("5001 ms") && e.contains("connection refused"), "{e}");
        assert!(r.watch.is_ok(), "the watch check is separate: {r:?}");
        assert!(r.report().starts_with("upstream: no successful probe"), "{}", r.report());
        assert!(r.report().ends_with("watch: ok\nnot ready\n"), "{}", r.report());
    }

    #[test]
    fn watch_fails_until_synced_and_while_closed() {
        let t0 = Instant::now();
        let unsynced = HubSync { ready: false, open: false, last_rev: 0 };
        let r = decide(BOUNDS, t0, &obs(Some(t0), unsynced, None));
        assert!(r.upstream.is_ok() && r.watch.is_err(), "{r:?}");
        let closed = HubSync { open: false, ..SYNCED };
        let r = decide(BOUNDS, t0, &obs(Some(t0), closed, None));
        assert!(r.watch.as_ref().is_err_and(|e| e.contains("not open")), "{r:?}");
        assert!(r.report().contains("watch: the upstream watch is not open"), "{}", r.report());
    }

    #[test]
    fn watch_fails_only_when_behind_longer_than_the_bound() {
        let t0 = Instant::now();
        let within = decide(BOUNDS, at(t0, 10_000), &obs(Some(at(t0, 10_000)), SYNCED, Some(t0)));
        assert!(within.is_ready(), "{within:?}");
        let beyond = decide(BOUNDS, at(t0, 10_001), &obs(Some(at(t0, 10_000)), SYNCED, Some(t0)));
        assert!(beyond.watch.as_ref().is_err_and(|e| e.contains("behind")), "{beyond:?}");
    }

    #[test]
    fn an_idle_cluster_never_lags() {
        let t0 = Instant::now();
        let mut lag = Lag::default();
        for i in 0..100 {
            lag.observe(100, at(t0, i * 1_000), 100);
            assert_eq!(lag.behind_since(100), None);
        }
    }

    #[test]
    fn lag_counts_from_the_oldest_revision_not_reached() {
        let t0 = Instant::now();
        let mut lag = Lag::default();
        lag.observe(101, t0, 100);
        lag.observe(105, at(t0, 1_000), 100);
        lag.observe(105, at(t0, 2_000), 100);
        assert_eq!(lag.behind_since(100), Some(t0));
        // Reached 101 but not 105: behind since 105 was read.
        assert_eq!(lag.behind_since(103), Some(at(t0, 1_000)));
        // Caught up with everything etcd reported.
        assert_eq!(lag.behind_since(105), None);
        // A hub ahead of the probe (the probe raced an event) is not behind.
        lag.observe(104, at(t0, 3_000), 105);
        assert_eq!(lag.behind_since(105), None);
    }

    #[test]
    fn a_hub_that_keeps_moving_but_never_catches_up_lags() {
        let t0 = Instant::now();
        let mut lag = Lag::default();
        for i in 0..20u64 {
            let hub = 100 + i as i64;
            lag.observe(hub + 5, at(t0, i * 1_000), hub);
        }
        let since = lag.behind_since(119).expect("behind");
        assert_eq!(since, at(t0, 15_000), "the oldest revision still unreached");
        let r = decide(BOUNDS, at(t0, 26_000), &obs(Some(at(t0, 26_000)), SYNCED, Some(since)));
        assert!(r.watch.is_err(), "{r:?}");
    }

    #[test]
    fn pending_revisions_are_bounded() {
        let t0 = Instant::now();
        let mut lag = Lag::default();
        for i in 0..1_000u64 {
            lag.observe(200 + i as i64, at(t0, i), 100);
        }
        assert!(lag.pending.len() <= MAX_PENDING);
        assert_eq!(lag.behind_since(100), Some(t0));
    }
}
