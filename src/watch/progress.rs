//! Progress: the state machine behind answers to `WatchProgressRequest`s and the
//! periodic notifications. Pure: the hub does the I/O ([`super::probe`]) and holds
//! this under its lock.
//!
//! A progress answer says "every event up to revision R has been sent, and R is no
//! older than etcd's revision when you asked". The hub proves the second half with a
//! *probe* issued after the request: etcd's own progress answer where it can be
//! trusted, otherwise a fence write whose event the upstream watch must deliver.
//!
//! - Probes are numbered in the order they are issued; a request is answered by the
//!   first probe issued after it (`after`), or by any later one.
//! - At most one probe is in flight, for every stream together: requests that arrive
//!   meanwhile wait for the next one. A flood of requests costs one probe per
//!   probe's round trip, whatever the number of requests or streams.
//! - etcd may drop a progress answer (its watch channel full): an upstream request
//!   that stays unanswered may be sent again ([`Progress::resend`]). Answers then
//!   complete the oldest request still outstanding, which was sent no later than
//!   the one etcd answered, so a late or missing answer never completes a probe too
//!   early.
//! - A probe that gives up fails the requests that were waiting for it (the hub ends
//!   their streams: a progress answer is never a guess); later requests get the next
//!   probe.
//! - A periodic tick is answered like a request.

/// The progress response's watch id: etcd's "applies to every watcher of the stream".
pub const PROGRESS_WATCH_ID: i64 = -1;

use std::collections::VecDeque;

/// Whether this etcd answers a `WatchProgressRequest` only once the watch has sent
/// every event up to the answered revision. Older releases answer at once with the
/// current revision, even while the watch is still catching up; the apiserver gates
/// consistent reads from cache on the same releases.
pub fn progress_is_reliable(version: &str) -> bool {
    let mut parts = version.trim_start_matches('v').split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor, patch) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    match (major, minor) {
        (3, 4) => patch >= 31,
        (3, 5) => patch >= 13,
        (3, m) => m > 5,
        (m, _) => m > 3,
    }
}

/// How a probe proves progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProbeKind {
    /// A progress request on the upstream watch (etcd that waits for sync first).
    Request,
    /// A fence write, complete once the upstream watch has delivered its revision.
    Fence,
}

/// The fence write in flight.
#[derive(Debug, Clone, Copy)]
struct Fence {
    seq: u64,
    /// Its revision, once written.
    rev: Option<i64>,
}

/// One waiting request: answered once probe `after` (or a later one) completed.
struct Waiter<W> {
    after: u64,
    item: W,
}

/// Waiting requests and the probes that answer them.
pub(super) struct Progress<W> {
    /// In request order, so `after` never decreases along it.
    waiters: Vec<Waiter<W>>,
    /// Probes issued so far; the last one's number.
    issued: u64,
    /// The latest probe completed.
    done: u64,
    fence: Option<Fence>,
    /// Upstream progress requests sent and not answered, oldest first.
    requests: VecDeque<u64>,
    /// A periodic tick waits for this probe.
    tick_after: Option<u64>,
}

impl<W> Default for Progress<W> {
    fn default() -> Self {
        Progress { waiters: Vec::new(), issued: 0, done: 0, fence: None, requests: VecDeque::new(), tick_after: None }
    }
}

impl<W> Progress<W> {
    /// A request: it waits for the first probe issued from now on.
    pub(super) fn request(&mut self, item: W) {
        self.waiters.push(Waiter { after: self.issued + 1, item });
    }

    /// A periodic notification is due: it is sent once a probe issued from now on
    /// completed.
    pub(super) fn tick(&mut self) {
        self.tick_after.get_or_insert(self.issued + 1);
    }

    /// Requests waiting (for a probe, or for their stream's catch-ups).
    pub(super) fn waiting(&self) -> usize {
        self.waiters.len()
    }

    /// Whether a probe is in flight.
    #[cfg(test)]
    pub(super) fn in_flight(&self) -> Option<ProbeKind> {
        if self.fence.is_some() {
            Some(ProbeKind::Fence)
        } else if !self.requests.is_empty() {
            Some(ProbeKind::Request)
        } else {
            None
        }
    }

    /// Whether probe `seq` (or a later one) has completed.
    pub(super) fn is_done(&self, seq: u64) -> bool {
        self.done >= seq
    }

    /// Whether something waits for a probe not yet completed.
    fn needs_probe(&self) -> bool {
        let waiting = self.waiters.last().is_some_and(|w| w.after > self.done);
        let tick = self.tick_after.is_some_and(|t| t > self.done);
        waiting || tick
    }

    /// Whether a probe should be issued now: something waits for a probe not yet
    /// completed, and none is in flight.
    pub(super) fn wants_probe(&self) -> bool {
        self.fence.is_none() && self.requests.is_empty() && self.needs_probe()
    }

    /// Issues a probe if one is wanted; its number.
    pub(super) fn issue(&mut self, kind: ProbeKind) -> Option<u64> {
        if !self.wants_probe() {
            return None;
        }
        Some(self.issue_now(kind))
    }

    fn issue_now(&mut self, kind: ProbeKind) -> u64 {
        self.issued += 1;
        match kind {
            ProbeKind::Fence => self.fence = Some(Fence { seq: self.issued, rev: None }),
            ProbeKind::Request => self.requests.push_back(self.issued),
        }
        self.issued
    }

    /// The oldest upstream request still unanswered.
    pub(super) fn oldest_request(&self) -> Option<u64> {
        self.requests.front().copied()
    }

    /// Sends another upstream request while `stalled` (the oldest, seen unanswered
    /// for a while) is still outstanding and something waits: etcd may have dropped
    /// its answer. Its number.
    pub(super) fn resend(&mut self, stalled: u64) -> Option<u64> {
        if self.oldest_request() != Some(stalled) || !self.needs_probe() {
            return None;
        }
        Some(self.issue_now(ProbeKind::Request))
    }

    /// The fence of probe `seq` was written at revision `rev`.
    pub(super) fn fence_written(&mut self, seq: u64, rev: i64) {
        if let Some(f) = self.fence.as_mut().filter(|f| f.seq == seq) {
            f.rev = Some(rev);
        }
    }

    /// The upstream watch has delivered every event through `last_rev`: completes
    /// the fence in flight if it is among them. True if a probe completed.
    pub(super) fn delivered_through(&mut self, last_rev: i64) -> bool {
        match self.fence {
            Some(Fence { seq, rev: Some(rev) }) if rev <= last_rev => self.complete(seq),
            _ => false,
        }
    }

    /// etcd answered a progress request: it completes the oldest outstanding one.
    /// True if a probe completed.
    pub(super) fn answered(&mut self) -> bool {
        match self.requests.pop_front() {
            Some(seq) => {
                self.done = self.done.max(seq);
                true
            }
            None => false,
        }
    }

    /// The fence probe `seq` proved progress (by whatever means). True if it was in
    /// flight.
    pub(super) fn complete(&mut self, seq: u64) -> bool {
        if self.fence.is_none_or(|f| f.seq != seq) {
            return false;
        }
        self.fence = None;
        self.done = self.done.max(seq);
        true
    }

    /// The upstream watch was re-opened: progress requests in flight died with the
    /// old one, and are issued again (their waiters lose nothing).
    pub(super) fn upstream_reset(&mut self) {
        self.requests.clear();
    }

    /// Probe `seq` gave up: the requests that were waiting for it fail (returned);
    /// later ones wait for the next probe.
    pub(super) fn gave_up(&mut self, seq: u64) -> Vec<W> {
        if self.fence.is_none_or(|f| f.seq != seq) {
            return Vec::new();
        }
        self.fence = None;
        let done = self.done;
        if self.tick_after.is_some_and(|t| t <= seq) {
            // Notifications wait for the next tick.
            self.tick_after = None;
        }
        self.take(|w| w.after > done && w.after <= seq)
    }

    /// Takes the requests whose probe completed and that `ready` accepts (their
    /// stream has nothing still catching up), in request order.
    pub(super) fn take_answerable(&mut self, ready: impl Fn(&W) -> bool) -> Vec<W> {
        let done = self.done;
        self.take(|w| w.after <= done && ready(&w.item))
    }

    /// Whether the periodic notifications are due now (and clears the tick).
    pub(super) fn take_tick(&mut self) -> bool {
        let due = self.tick_after.is_some_and(|t| t <= self.done);
        if due {
            self.tick_after = None;
        }
        due
    }

    /// Drops waiting requests that `keep` refuses (their stream is gone).
    pub(super) fn retain(&mut self, keep: impl Fn(&W) -> bool) {
        self.waiters.retain(|w| keep(&w.item));
    }

    fn take(&mut self, pick: impl Fn(&Waiter<W>) -> bool) -> Vec<W> {
        if !self.waiters.iter().any(&pick) {
            return Vec::new();
        }
        let (picked, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters).into_iter().partition(pick);
        self.waiters = kept;
        picked.into_iter().map(|w| w.item).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reliable_versions() {
        assert!(!progress_is_reliable("3.4.23"));
        assert!(progress_is_reliable("3.4.31"));
        assert!(!progress_is_reliable("3.5.12"));
        assert!(progress_is_reliable("v3.5.13"));
        assert!(progress_is_reliable("3.6.0"));
        assert!(!progress_is_reliable("2.3.8"));
    }

    #[test]
    fn a_flood_of_requests_costs_one_probe_per_round_trip() {
        let mut p = Progress::default();
        for i in 0..1000 {
            p.request(i);
        }
        assert_eq!(p.issue(ProbeKind::Fence), Some(1));
        // While it is in flight, requests wait for the next probe, and none is issued.
        for i in 1000..2000 {
            p.request(i);
            assert_eq!(p.issue(ProbeKind::Fence), None);
        }
        p.fence_written(1, 50);
        assert!(!p.delivered_through(49), "the fence's event is not delivered yet");
        assert!(p.delivered_through(50));
        let first = p.take_answerable(|_| true);
        assert_eq!(first, (0..1000).collect::<Vec<_>>(), "exactly the requests before the probe");
        assert!(p.wants_probe());
        assert_eq!(p.issue(ProbeKind::Fence), Some(2));
        p.fence_written(2, 51);
        assert!(p.delivered_through(60));
        assert_eq!(p.take_answerable(|_| true).len(), 1000);
        assert!(!p.wants_probe(), "nothing waits");
        assert_eq!(p.waiting(), 0);
    }

    #[test]
    fn a_request_is_never_answered_by_a_probe_issued_before_it() {
        let mut p = Progress::default();
        p.request("a");
        p.issue(ProbeKind::Request);
        p.request("b");
        assert!(p.answered());
        assert_eq!(p.take_answerable(|_| true), vec!["a"]);
        assert_eq!(p.take_answerable(|_| true), Vec::<&str>::new());
        assert!(!p.answered(), "no probe in flight");
        p.issue(ProbeKind::Request);
        assert!(p.answered());
        assert_eq!(p.take_answerable(|_| true), vec!["b"]);
    }

    #[test]
    fn requests_wait_for_their_streams_catch_ups() {
        let mut p = Progress::default();
        p.request(1);
        p.request(2);
        let seq = p.issue(ProbeKind::Fence).unwrap();
        assert!(p.complete(seq));
        assert_eq!(p.take_answerable(|&s| s != 2), vec![1]);
        assert!(!p.wants_probe(), "request 2 has its probe; it waits for its stream only");
        assert_eq!(p.take_answerable(|_| true), vec![2]);
    }

    #[test]
    fn a_lost_upstream_request_is_issued_again_and_fences_survive_a_reset() {
        let mut p = Progress::default();
        p.request(1);
        p.issue(ProbeKind::Request);
        p.upstream_reset();
        assert!(p.wants_probe());
        assert_eq!(p.issue(ProbeKind::Fence), Some(2));
        p.fence_written(2, 10);
        p.upstream_reset();
        assert_eq!(p.in_flight(), Some(ProbeKind::Fence));
        assert!(p.delivered_through(10));
        assert_eq!(p.take_answerable(|_| true), vec![1]);
    }

    #[test]
    fn a_dropped_upstream_answer_is_asked_again_and_answers_complete_the_oldest() {
        let mut p = Progress::default();
        p.request("a");
        let s1 = p.issue(ProbeKind::Request).unwrap();
        p.request("b");
        assert_eq!(p.issue(ProbeKind::Request), None, "one at a time");
        assert_eq!(p.resend(s1 + 1), None, "only the oldest request can be stalled");
        // No answer for a while: ask again.
        let s2 = p.resend(s1).unwrap();
        assert_eq!(p.oldest_request(), Some(s1));
        // An answer (whichever request it was for) completes the oldest only: "b"
        // came after s1 was sent, so it is not answered yet.
        assert!(p.answered());
        assert_eq!(p.take_answerable(|_| true), vec!["a"]);
        assert_eq!(p.oldest_request(), Some(s2));
        assert!(p.answered());
        assert_eq!(p.take_answerable(|_| true), vec!["b"]);
        assert!(!p.answered());
        assert_eq!(p.resend(s2), None, "nothing outstanding");
        p.request("c");
        let s3 = p.issue(ProbeKind::Request).unwrap();
        p.take_answerable(|_| true);
        assert!(p.answered());
        assert_eq!(p.take_answerable(|_| true), vec!["c"]);
        assert_eq!(p.resend(s3), None);
    }

    #[test]
    fn giving_up_fails_only_the_requests_waiting_for_that_probe() {
        let mut p = Progress::default();
        p.request("old");
        let s1 = p.issue(ProbeKind::Fence).unwrap();
        p.request("new");
        assert_eq!(p.gave_up(s1), vec!["old"]);
        assert_eq!(p.gave_up(s1), Vec::<&str>::new(), "once");
        assert!(p.wants_probe(), "the later request gets its own probe");
        let s2 = p.issue(ProbeKind::Fence).unwrap();
        p.fence_written(s2, 3);
        // A stale completion of the failed probe changes nothing.
        assert!(!p.complete(s1));
        assert!(p.delivered_through(3));
        assert_eq!(p.take_answerable(|_| true), vec!["new"]);
    }

    #[test]
    fn ticks_wait_for_a_probe_issued_after_them() {
        let mut p: Progress<()> = Progress::default();
        assert!(!p.take_tick());
        p.tick();
        assert!(p.wants_probe());
        assert!(!p.take_tick(), "no probe since the tick");
        p.issue(ProbeKind::Request).unwrap();
        p.tick(); // a second tick while the first waits: one notification
        assert!(p.answered());
        assert!(p.take_tick());
        assert!(!p.take_tick());
        assert!(!p.wants_probe());
    }

    #[test]
    fn retain_drops_requests_of_gone_streams() {
        let mut p = Progress::default();
        p.request(1);
        p.request(2);
        p.retain(|&s| s == 2);
        assert_eq!(p.waiting(), 1);
        let s = p.issue(ProbeKind::Fence).unwrap();
        p.complete(s);
        assert_eq!(p.take_answerable(|_| true), vec![2]);
    }
}
