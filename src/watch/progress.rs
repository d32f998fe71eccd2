//! Progress: answers to `WatchProgressRequest`s and periodic notifications, proved
//! either by etcd's own progress answer or by a fence write the hub waits to see.

use crate::metrics::names;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::hub::{Hub, HubState};
use super::sink::StreamSink;
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{PutRequest, WatchResponse};
use crate::upstream::{CallCtx, Retry};

/// The progress response's watch id: etcd's "applies to every watcher of the stream".
pub const PROGRESS_WATCH_ID: i64 = -1;

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

/// One client progress request.
pub(super) struct Waiter {
    pub(super) sink: Arc<StreamSink>,
    /// The probe that answers it: the first issued after the request.
    pub(super) after: u64,
}

impl Hub {
    /// Proves progress without trusting etcd's progress answer: write the fence key
    /// (inside the watched range) and wait for its event, which etcd delivers after
    /// every older event.
    pub(super) async fn write_fence(self: Arc<Self>, proxy: Arc<Proxy>) {
        let seq = {
            let mut st = self.lock();
            st.probes_issued += 1;
            st.probes_issued
        };
        let fence = PutRequest { key: self.layout.fence_key(), ..Default::default() };
        let mut backoff = Duration::from_millis(self.cfg.reconnect_backoff_ms.max(1));
        loop {
            let ctx = CallCtx::from_metadata(&Default::default(), proxy.cfg.default_timeout());
            match proxy
                .upstream
                .kv_call(&ctx, Retry::OnlyUnsent, &fence, |mut c, r| async move { c.put(r).await })
                .await
            {
                Ok(resp) => {
                    let rev = resp.header.map_or(0, |h| h.revision);
                    let mut st = self.lock();
                    st.pending_fences.push((rev, seq));
                    self.check_fences(&mut st);
                    metrics::counter!(names::WATCH_PROGRESS_FENCES).increment(1);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "watch hub: progress fence write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Completes the probes of fences the upstream watch has delivered.
    pub(super) fn check_fences(&self, st: &mut HubState) {
        let last = st.last_rev;
        let mut done = st.probes_done;
        st.pending_fences.retain(|&(rev, seq)| {
            if rev <= last {
                done = done.max(seq);
                false
            } else {
                true
            }
        });
        if done > st.probes_done {
            st.probes_done = done;
            self.answer_progress(st);
        }
    }

    /// Answers the progress requests whose probe has completed (and whose stream has
    /// no watcher still catching up), and the periodic notifications due. The answer
    /// is `last_rev`: every event up to it has been queued to every registered
    /// watcher, and the probe, issued after the request, proved it is no older than
    /// etcd's revision at the time of the request.
    pub(super) fn answer_progress(&self, st: &mut HubState) {
        let header = self.header(st, st.last_rev);
        let done = st.probes_done;
        st.progress_waiters.retain(|w| {
            if w.after > done || w.sink.catching_up.load(Ordering::Relaxed) > 0 {
                return true;
            }
            w.sink.send_reliable(WatchResponse { header, watch_id: PROGRESS_WATCH_ID, ..Default::default() });
            false
        });
        if st.tick_due && st.probes_done > 0 {
            st.tick_due = false;
            for ws in st.watchers.values() {
                for w in ws.all() {
                    if w.progress_notify && !w.active.swap(false, Ordering::Relaxed) {
                        let _ = w.sink.send(WatchResponse { header, watch_id: w.id, ..Default::default() });
                    }
                }
            }
        }
    }

    /// A client asked for progress on its stream (`WatchProgressRequest`).
    pub fn request_progress(&self, sink: &Arc<StreamSink>) {
        let mut st = self.lock();
        let after = st.probes_issued + 1;
        st.progress_waiters.push(Waiter { sink: sink.clone(), after });
        drop(st);
        self.progress_kick.notify_one();
    }
}
