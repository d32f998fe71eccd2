//! The hub's one upstream watch: opened at the revision after the last one
//! dispatched, re-opened after any break, its responses applied in order.

use crate::metrics::names;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tonic::{Code, Status};

use super::event::HubEvent;
use super::hub::{Hub, HubState};
use super::progress::{progress_is_reliable, PROGRESS_WATCH_ID};
use super::sink::StreamSink;
use super::watcher::Watcher;
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{
    watch_request, RangeRequest, ResponseHeader, WatchCreateRequest, WatchRequest, WatchResponse,
};
use crate::upstream::call::StreamCtx;
use crate::upstream::classify::{EtcdError, Failure, UpstreamError};
use crate::upstream::CallCtx;

/// How long an upstream progress request may stay the oldest unanswered before
/// another is sent.
const REQUEST_RESEND: Duration = Duration::from_secs(1);

/// What the upstream task does after one response.
pub(super) enum Next {
    Continue,
    Reopen,
}

impl Hub {
    pub(super) async fn etcd_version(proxy: &Proxy) -> Option<String> {
        let ctx = CallCtx::from_metadata(&Default::default(), proxy.cfg.default_timeout());
        let req = crate::pb::etcdserverpb::StatusRequest {};
        let resp = proxy.backend.status(&ctx, &req).await;
        resp.ok().map(|r| r.version)
    }

    pub(super) async fn current_header(proxy: &Proxy) -> Result<ResponseHeader, UpstreamError> {
        let ctx = CallCtx::from_metadata(&Default::default(), proxy.cfg.default_timeout());
        let req = RangeRequest { key: proxy.layout.void_key(), ..Default::default() };
        let resp = proxy.backend.range(&ctx, &req).await?;
        Ok(resp.header.unwrap_or_default())
    }

    /// Whether etcd has compacted history at `rev`: the ring may still hold those
    /// events, but etcd refuses a watch from there, and so must the hub. A range at
    /// that revision fails exactly when a watch from it would.
    pub async fn is_compacted(&self, proxy: &Proxy, rev: i64) -> Result<bool, UpstreamError> {
        if rev > self.lock().last_rev {
            return Ok(false);
        }
        let ctx = CallCtx::from_metadata(&Default::default(), proxy.cfg.default_timeout());
        let req = RangeRequest { key: proxy.layout.void_key(), revision: rev, ..Default::default() };
        match proxy.backend.range(&ctx, &req).await {
            Ok(_) => Ok(false),
            Err(e) if e.etcd() == Some(EtcdError::Compacted) => Ok(true),
            Err(s) => Err(s),
        }
    }

    /// The revision a watch with start_revision 0 starts at: etcd's current + 1,
    /// from a call sent after this was asked (so never older than etcd's revision
    /// when the create arrived), shared by the creates that arrive meanwhile. If
    /// that call failed, one of this create's own tells why.
    pub async fn now(&self, proxy: &Proxy) -> Result<i64, UpstreamError> {
        let shared = self.now_index.current(|| async { Self::current_header(proxy).await.ok() }).await;
        match shared {
            Some(h) => Ok(h.revision + 1),
            None => Ok(Self::current_header(proxy).await?.revision + 1),
        }
    }

    pub(super) async fn run_upstream(self: Arc<Self>, proxy: Arc<Proxy>) {
        let base = Duration::from_millis(self.cfg.reconnect_backoff_ms.max(1));
        let mut backoff = base;
        loop {
            if !self.lock().ready {
                let reliable = Self::etcd_version(&proxy).await.is_some_and(|v| progress_is_reliable(&v));
                self.upstream_progress.store(reliable, Ordering::Relaxed);
                match Self::current_header(&proxy).await {
                    Ok(h) => {
                        let rev = h.revision;
                        let mut st = self.lock();
                        st.header = ResponseHeader { revision: 0, ..h };
                        st.last_rev = rev;
                        st.ring.reset(rev + 1);
                        st.ready = true;
                        drop(st);
                        self.ready.notify_waiters();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "watch hub: cannot read etcd's revision");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            let start = self.lock().last_rev + 1;
            match self.watch_upstream(&proxy, start, &mut backoff, base).await {
                Ok(()) => {}
                Err(s) => {
                    let no_leader = Failure::of(&s) == Failure::Etcd(EtcdError::NoLeader);
                    tracing::warn!(error = %s, "watch hub: upstream watch broke; resuming");
                    metrics::counter!(names::WATCH_UPSTREAM_RESTARTS).increment(1);
                    if no_leader {
                        self.no_leader();
                    }
                }
            }
            self.upstream_open.store(false, Ordering::Relaxed);
            metrics::gauge!(names::WATCH_UPSTREAM_WATCHES).set(0.0);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Runs one upstream watch from `start` until it ends.
    pub(super) async fn watch_upstream(
        self: &Arc<Self>,
        proxy: &Arc<Proxy>,
        start: i64,
        backoff: &mut Duration,
        base: Duration,
    ) -> Result<(), Status> {
        let (tx, rx) = mpsc::channel(16);
        let create = WatchCreateRequest {
            key: self.range.key.clone(),
            range_end: self.range.range_end.clone(),
            start_revision: start,
            progress_notify: true,
            prev_kv: true,
            ..Default::default()
        };
        let _ = tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) }).await;
        // The hub's watch never ends on its own, and must hear when etcd loses its leader.
        let ctx = StreamCtx { deadline: None, require_leader: true };
        let mut stream = proxy.backend.watch(&ctx, rx).await?;
        metrics::gauge!(names::WATCH_UPSTREAM_WATCHES).set(1.0);
        self.upstream_open.store(true, Ordering::Relaxed);
        {
            // A request sent on the previous stream died with it; ask again.
            let mut st = self.lock();
            st.progress.upstream_reset();
            self.progress_changed(&st);
        }
        // etcd may drop a progress answer: a request still the oldest unanswered a
        // tick later is sent again.
        let mut resend = tokio::time::interval(REQUEST_RESEND);
        resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut oldest = None;
        loop {
            tokio::select! {
                _ = self.progress_kick.notified() => self.issue_probe(proxy, &tx),
                _ = resend.tick() => oldest = self.resend_request(oldest, &tx),
                msg = stream.message() => match msg? {
                    Some(resp) => {
                        *backoff = base;
                        if let Next::Reopen = self.on_upstream(resp) {
                            return Ok(());
                        }
                    }
                    None => return Err(Status::unavailable("upstream watch stream ended")),
                },
            }
        }
    }

    /// Applies one upstream response.
    pub(super) fn on_upstream(&self, resp: WatchResponse) -> Next {
        let asked = Instant::now();
        let mut st = self.lock();
        let held = Instant::now();
        if let Some(h) = &resp.header {
            st.header = ResponseHeader { revision: 0, ..*h };
        }
        if resp.compact_revision > 0 {
            self.compacted(&mut st, resp.compact_revision);
            return Next::Reopen;
        }
        if resp.canceled {
            tracing::warn!(reason = %resp.cancel_reason, "watch hub: upstream cancelled the watch");
            return Next::Reopen;
        }
        if resp.created {
            return Next::Continue;
        }
        if resp.events.is_empty() {
            // A progress notification. Periodic ones come only for a synced watch;
            // answers to requests are trusted only where etcd waits for sync first.
            let rev = resp.header.map_or(0, |h| h.revision);
            if resp.watch_id != PROGRESS_WATCH_ID {
                st.last_rev = st.last_rev.max(rev);
                self.replica_progress(st.last_rev);
                if st.delivered() {
                    self.probe_completed(&mut st);
                }
            } else if self.upstream_progress.load(Ordering::Relaxed) {
                st.last_rev = st.last_rev.max(rev);
                self.replica_progress(st.last_rev);
                st.progress.answered();
                st.delivered();
                self.probe_completed(&mut st);
            }
            return Next::Continue;
        }
        metrics::counter!(names::WATCH_EVENTS_IN).increment(resp.events.len() as u64);
        if let Some(replica) = self.replica.get() {
            replica.on_events(&resp.events);
        }
        // Every event counts for the revision reached, keys of no tenant included.
        let raw_max = resp.events.iter().filter_map(|e| e.kv.as_ref()).map(|kv| kv.mod_revision).max().unwrap_or(0);
        let events: Vec<Arc<HubEvent>> =
            resp.events.into_iter().filter_map(|e| HubEvent::from_upstream(&self.layout, e)).map(Arc::new).collect();
        st.last_rev = st.last_rev.max(raw_max);
        self.dispatch(&mut st, &events);
        st.ring.extend(events);
        metrics::gauge!(names::WATCH_RING_EVENTS).set(st.ring.len() as f64);
        metrics::gauge!(names::WATCH_RING_BYTES).set(st.ring.bytes() as f64);
        if st.delivered() {
            self.probe_completed(&mut st);
        }
        drop(st);
        metrics::histogram!(names::WATCH_HUB_LOCK_WAIT).record(held.duration_since(asked).as_secs_f64());
        metrics::histogram!(names::WATCH_HUB_LOCK_HOLD).record(held.elapsed().as_secs_f64());
        Next::Continue
    }

    /// The upstream history the hub needs was compacted while it was away: watchers
    /// that needed those revisions get etcd's compacted cancel; watchers starting at
    /// or after the compact revision lost nothing and stay.
    pub(super) fn compacted(&self, st: &mut HubState, compact_rev: i64) {
        tracing::warn!(compact_rev, last_rev = st.last_rev, "watch hub: resume revision compacted");
        let header = st.header_at(compact_rev);
        let lost: Vec<Arc<Watcher>> = st.fanout.all().filter(|w| w.from_rev < compact_rev).cloned().collect();
        for w in &lost {
            if w.cancel() {
                w.sink.send_control(WatchResponse {
                    header,
                    watch_id: w.id,
                    canceled: true,
                    compact_revision: compact_rev,
                    ..Default::default()
                });
            }
            Self::unregister(st, w);
        }
        st.ring.reset(compact_rev);
        st.last_rev = compact_rev - 1;
        // The replica missed the compacted changes too: it loads again.
        if let Some(replica) = self.replica.get() {
            replica.on_gap();
        }
    }

    fn replica_progress(&self, rev: i64) {
        if let Some(replica) = self.replica.get() {
            replica.on_progress(rev);
        }
    }

    /// etcd lost its leader: streams that asked to require one end, as etcd ends them.
    pub(super) fn no_leader(&self) {
        let mut st = self.lock();
        let ended: Vec<Arc<Watcher>> = st.fanout.all().filter(|w| w.sink.require_leader).cloned().collect();
        let mut sinks: Vec<&Arc<StreamSink>> = Vec::new();
        for w in &ended {
            if !sinks.iter().any(|s| Arc::ptr_eq(s, &w.sink)) {
                sinks.push(&w.sink);
                w.sink.end(Status::new(Code::Unavailable, "etcdserver: no leader"));
            }
        }
        for w in &ended {
            w.cancel();
            Self::unregister(&mut st, w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WatchConfig;
    use crate::keyspace::{KeyLayout, TenantName};
    use crate::pb::mvccpb::{Event, KeyValue};

    fn count(text: &str, name: &str) -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(&format!("{name}_count ")))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    #[test]
    fn each_event_batch_records_how_long_it_waited_for_and_held_the_lock() {
        let recorder = crate::metrics::builder().expect("buckets").build_recorder();
        let handle = recorder.handle();
        let layout = KeyLayout::new("/registry", "/etcdmux");
        let hub = Hub::new(&WatchConfig::default(), layout.clone());
        let tenant = TenantName::new("p1").expect("tenant");
        let put = |rev: i64| WatchResponse {
            events: vec![Event {
                kv: Some(KeyValue {
                    key: layout.encode(&tenant, b"/pods/ns/x"),
                    mod_revision: rev,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        metrics::with_local_recorder(&recorder, || {
            // A progress notification is no batch of events.
            assert!(matches!(hub.on_upstream(WatchResponse::default()), Next::Continue));
            let text = handle.render();
            assert_eq!(count(&text, names::WATCH_HUB_LOCK_HOLD), None, "{text}");
            assert!(matches!(hub.on_upstream(put(5)), Next::Continue));
            assert!(matches!(hub.on_upstream(put(6)), Next::Continue));
        });
        let text = handle.render();
        assert_eq!(count(&text, names::WATCH_HUB_LOCK_HOLD), Some(2.0), "{text}");
        assert_eq!(count(&text, names::WATCH_HUB_LOCK_WAIT), Some(2.0), "{text}");
        assert_eq!(hub.last_rev(), 6);
    }
}
