//! Progress probes: the I/O around the [`super::progress`] state machine — taking
//! requests, issuing probes (a progress request on the upstream watch, or one fence
//! writer task), and queueing the answers.
//!
//! Against etcd without reliable progress answers, a probe writes the fence key
//! (`<meta>/bare//fence`, inside the watched range, never a tenant key) and waits
//! for the upstream watch to deliver it: etcd delivers it after every older event.
//! One probe runs at a time for the whole hub, so a flood of progress requests on
//! any number of streams costs one fence write per round trip.
//!
//! When etcd refuses writes (no space, no leader) or cannot be reached, the probe
//! retries a bounded number of times (`progress_fence_attempts`, within
//! `progress_probe_timeout_ms`). etcd answers progress from its own state, without a
//! write, so where the hub can prove progress without one it does too: if a read of
//! etcd's revision shows the hub has already dispatched everything up to it (the
//! usual case under a NOSPACE alarm, where the revision stands still), that proves
//! the answer as well as a fence. Otherwise the probe gives up: a progress answer is
//! never a guess, and a request must not wait forever, so the streams whose requests
//! waited for that probe end with `UNAVAILABLE` — etcd clients reconnect, resume
//! their watches from the last revision they got, and ask again; later requests get
//! the next probe.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Status;

use super::hub::{Hub, HubState};
use super::progress::{ProbeKind, PROGRESS_WATCH_ID};
use super::sink::StreamSink;
use crate::metrics::names;
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{watch_request, PutRequest, WatchProgressRequest, WatchRequest, WatchResponse};
use crate::upstream::CallCtx;

/// Keeps a gauge one higher while it lives.
struct Running(metrics::Gauge);

impl Running {
    fn new(name: &'static str) -> Running {
        let g = metrics::gauge!(name);
        g.increment(1.0);
        Running(g)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

fn progress_request() -> WatchRequest {
    WatchRequest { request_union: Some(watch_request::RequestUnion::ProgressRequest(WatchProgressRequest {})) }
}

impl Hub {
    /// A client asked for progress on its stream (`WatchProgressRequest`). Its
    /// answer's place on the stream is taken now, so waiting requests count against
    /// the stream's budget like queued responses.
    pub fn request_progress(&self, sink: &Arc<StreamSink>) {
        let Some(slot) = sink.reserve() else { return };
        let mut st = self.lock();
        st.progress.request(slot);
        self.progress_changed(&st);
    }

    /// Updates the waiters gauge and asks the upstream task for a probe if one is
    /// wanted.
    pub(super) fn progress_changed(&self, st: &HubState) {
        metrics::gauge!(names::WATCH_PROGRESS_WAITERS).set(st.progress.waiting() as f64);
        if st.progress.wants_probe() {
            self.progress_kick.notify_one();
        }
    }

    /// A probe completed: answer what it proved, and wake its fence writer.
    pub(super) fn probe_completed(&self, st: &mut HubState) {
        self.probe_done.notify_waiters();
        self.answer_progress(st);
    }

    /// Answers the progress requests whose probe has completed (and whose stream has
    /// no watcher still catching up), and the periodic notifications due. The answer
    /// is `last_rev`: every event up to it has been queued to every registered
    /// watcher, and the probe, issued after the request, proved it is no older than
    /// etcd's revision at the time of the request.
    pub(super) fn answer_progress(&self, st: &mut HubState) {
        let header = st.header_at(st.last_rev);
        st.progress.retain(|s| !s.sink().is_closed());
        for slot in st.progress.take_answerable(|s| s.sink().catching_up.load(Ordering::Relaxed) == 0) {
            slot.fill(WatchResponse { header, watch_id: PROGRESS_WATCH_ID, ..Default::default() });
        }
        if st.progress.take_tick() {
            for w in st.fanout.all() {
                if w.progress_notify && !w.active.swap(false, Ordering::Relaxed) {
                    let _ = w.sink.send(WatchResponse { header, watch_id: w.id, ..Default::default() });
                }
            }
        }
        self.progress_changed(st);
    }

    /// Issues the next probe if one is wanted and none is in flight: a progress
    /// request on the upstream watch (`tx`), or the fence writer. Called by the
    /// upstream task, which owns `tx`.
    pub(super) fn issue_probe(self: &Arc<Self>, proxy: &Arc<Proxy>, tx: &mpsc::Sender<WatchRequest>) {
        let mut st = self.lock();
        if self.upstream_progress.load(Ordering::Relaxed) {
            if !st.progress.wants_probe() {
                return;
            }
            // Never wait here: this task also reads the upstream watch. The channel
            // holds the create and a request a second at most.
            if tx.try_send(progress_request()).is_ok() {
                st.progress.issue(ProbeKind::Request);
            }
        } else if let Some(seq) = st.progress.issue(ProbeKind::Fence) {
            drop(st);
            self.spawn(&proxy.tasks, self.clone().fence_probe(proxy.clone(), seq));
        }
    }

    /// Sends another upstream progress request if `oldest`, the oldest unanswered a
    /// tick ago, still is (etcd may have dropped its answer) and something waits.
    /// Returns the oldest unanswered request now.
    pub(super) fn resend_request(&self, oldest: Option<u64>, tx: &mpsc::Sender<WatchRequest>) -> Option<u64> {
        let mut st = self.lock();
        if let Some(stalled) = oldest.filter(|_| self.upstream_progress.load(Ordering::Relaxed)) {
            if st.progress.oldest_request() == Some(stalled) && tx.try_send(progress_request()).is_ok() {
                st.progress.resend(stalled);
            }
        }
        st.progress.oldest_request()
    }

    /// Runs fence probe `seq` to its end: proved, or given up after its bounded
    /// attempts and time.
    async fn fence_probe(self: Arc<Self>, proxy: Arc<Proxy>, seq: u64) {
        let _running = Running::new(names::WATCH_PROGRESS_FENCE_WRITERS);
        let deadline = Instant::now() + Duration::from_millis(self.cfg.progress_probe_timeout_ms);
        let reason = match tokio::time::timeout_at(deadline, self.prove_with_fence(&proxy, seq, deadline)).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(_) => format!("no proof within {} ms", self.cfg.progress_probe_timeout_ms),
        };
        metrics::counter!(names::WATCH_PROGRESS_PROBES_FAILED).increment(1);
        tracing::warn!(%reason, "watch hub: progress probe gave up; the streams waiting for it end");
        let status = Status::unavailable(format!("etcdmux: cannot prove watch progress ({reason}); ask again"));
        let mut st = self.lock();
        for slot in st.progress.gave_up(seq) {
            slot.sink().end(status.clone());
        }
        self.progress_changed(&st);
    }

    /// Writes the fence (up to `progress_fence_attempts` times) and waits for its
    /// event; or proves progress by a read when etcd refuses the write.
    async fn prove_with_fence(&self, proxy: &Proxy, seq: u64, deadline: Instant) -> Result<(), String> {
        let fence = PutRequest { key: self.layout.fence_key(), ..Default::default() };
        let attempts = self.cfg.progress_fence_attempts.max(1);
        let mut backoff = Duration::from_millis(self.cfg.reconnect_backoff_ms.max(1));
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ctx = CallCtx::from_metadata(&Default::default(), deadline.saturating_duration_since(Instant::now()));
            match proxy.backend.put(&ctx, &fence).await {
                Ok(resp) => {
                    metrics::counter!(names::WATCH_PROGRESS_FENCES).increment(1);
                    let rev = resp.header.map_or(0, |h| h.revision);
                    {
                        let mut st = self.lock();
                        st.progress.fence_written(seq, rev);
                        if st.delivered() {
                            self.probe_completed(&mut st);
                        }
                    }
                    self.wait_probe(seq).await;
                    return Ok(());
                }
                Err(e) => {
                    metrics::counter!(names::WATCH_PROGRESS_FENCE_FAILURES).increment(1);
                    tracing::warn!(attempt, error = %e, "watch hub: progress fence write failed");
                    // A read taken now of a revision the hub has reached proves as much.
                    if let Ok(h) = Self::current_header(proxy).await {
                        if self.prove_by_read(seq, h.revision) {
                            return Ok(());
                        }
                    }
                    if attempt >= attempts {
                        return Err(format!("{attempt} fence writes failed, the last with: {e}"));
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Completes probe `seq` if the hub has dispatched every event up to `rev`, a
    /// revision of etcd read after the probe was issued.
    fn prove_by_read(&self, seq: u64, rev: i64) -> bool {
        let mut st = self.lock();
        if st.last_rev >= rev && st.progress.complete(seq) {
            self.probe_completed(&mut st);
            return true;
        }
        false
    }

    /// Waits until probe `seq` has completed.
    async fn wait_probe(&self, seq: u64) {
        loop {
            let done = self.probe_done.notified();
            if self.lock().progress.is_done(seq) {
                return;
            }
            done.await;
        }
    }
}
