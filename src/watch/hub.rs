//! The watch hub: every tenant's watches served from one upstream watch.
//!
//! ```text
//!  etcd ──one watch (prev_kv, progress)──▶ upstream task ──▶ HubState (one lock)
//!                                                          ├─ ring: recent events, bounded
//!                                                          ├─ watchers by tenant
//!                                                          └─ streams waiting for progress
//!  client streams ◀── bounded queue per stream ◀── dispatch (one response per watcher per upstream response)
//! ```
//!
//! One upstream watch covers the whole layout (the slash layout and the bare keys
//! under the meta prefix, with whatever lies between filtered out), so there is one
//! revision order and events of one revision always arrive together. Each upstream
//! event is decoded and rewritten to tenant form once; the rendered client form is
//! cached on the event, and watchers share its bytes.
//!
//! Guarantees per watcher, and how they hold:
//! - *ordered, unique, no gaps*: one dispatcher applies upstream responses in order;
//!   the hub tracks `last_rev`, the revision through which every event has been
//!   dispatched, and re-opens a broken upstream watch at `last_rev + 1`;
//! - *atomic*: etcd never splits a revision across watch responses (etcdmux does
//!   not ask for fragments upstream), and a watcher gets one response per upstream
//!   response;
//! - *resumable*: a watcher starting inside the ring (`covers_from..=last_rev`) is
//!   replayed from it under the same lock that registers it; an older start catches
//!   up through a temporary upstream watch, then hands over to the ring exactly where
//!   its own stream ends — both under the lock, so nothing is missed or repeated;
//! - *slow watchers* cannot block anyone: queues are bounded and sends never wait; a
//!   watcher whose stream is full is cancelled alone with a reason.

use crate::metrics::names;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prost::Message;
use tokio::sync::{Notify, Semaphore};

use super::event::HubEvent;
use super::fanout::TenantWatchers;
use super::progress::Waiter;
use super::sink::Sent;
use super::watcher::Watcher;
use crate::config::WatchConfig;
use crate::keyspace::{KeyLayout, Piece, TenantName};
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{ResponseHeader, WatchResponse};
use crate::pb::mvccpb::Event;

pub(super) struct HubState {
    pub(super) ring: VecDeque<Arc<HubEvent>>,
    pub(super) ring_bytes: usize,
    /// The ring holds every event with revision in `covers_from..=last_rev`.
    pub(super) covers_from: i64,
    /// Every event up to this revision has been dispatched.
    pub(super) last_rev: i64,
    /// cluster_id / member_id / raft_term of the latest upstream header.
    pub(super) header: ResponseHeader,
    pub(super) watchers: HashMap<TenantName, TenantWatchers>,
    pub(super) watcher_count: usize,
    /// Progress requests waiting for a probe issued after them.
    pub(super) progress_waiters: Vec<Waiter>,
    /// Probes (upstream progress requests or fence writes) issued and completed, in
    /// order: a request is answered by the first probe issued after it.
    pub(super) probes_issued: u64,
    pub(super) probes_done: u64,
    /// Fence writes not seen yet: (revision, probe).
    pub(super) pending_fences: Vec<(i64, u64)>,
    /// Upstream progress requests sent and not answered: their probes, in order.
    pub(super) inflight_requests: VecDeque<u64>,
    pub(super) tick_due: bool,
    pub(super) ready: bool,
}

/// The hub. One per process.
pub struct Hub {
    pub(super) state: Mutex<HubState>,
    pub(super) cfg: WatchConfig,
    pub(super) layout: KeyLayout,
    /// The upstream range the hub watches.
    pub(super) range: Piece,
    pub(super) progress_kick: Notify,
    pub(super) ready: Notify,
    pub(super) catchups: Semaphore,
    /// Whether etcd's own progress answers can be trusted (see `progress_is_reliable`).
    pub(super) upstream_progress: AtomicBool,
}

impl Hub {
    pub fn new(cfg: &WatchConfig, layout: KeyLayout) -> Arc<Hub> {
        let range = layout.watch_range();
        Arc::new(Hub {
            state: Mutex::new(HubState {
                ring: VecDeque::new(),
                ring_bytes: 0,
                covers_from: 1,
                last_rev: 0,
                header: ResponseHeader::default(),
                watchers: HashMap::new(),
                watcher_count: 0,
                progress_waiters: Vec::new(),
                probes_issued: 0,
                probes_done: 0,
                pending_fences: Vec::new(),
                inflight_requests: VecDeque::new(),
                tick_due: false,
                ready: false,
            }),
            cfg: cfg.clone(),
            layout,
            range,
            progress_kick: Notify::new(),
            ready: Notify::new(),
            catchups: Semaphore::new(cfg.max_catchups),
            upstream_progress: AtomicBool::new(false),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock would be a bug; the state is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the upstream watch and the progress ticker; abort the handles to stop.
    pub fn start(self: &Arc<Self>, proxy: Arc<Proxy>) -> Vec<tokio::task::JoinHandle<()>> {
        metrics::gauge!(names::WATCH_UPSTREAM_WATCHES).set(0.0);
        let upstream = tokio::spawn(self.clone().run_upstream(proxy));
        let hub = self.clone();
        let ticker = tokio::spawn(async move {
            let every = Duration::from_millis(hub.cfg.progress_notify_interval_ms.max(10));
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                hub.lock().tick_due = true;
                hub.progress_kick.notify_one();
            }
        });
        vec![upstream, ticker]
    }

    /// Waits until the hub knows where etcd's history stands.
    pub async fn ready(&self) {
        loop {
            let notified = self.ready.notified();
            if self.lock().ready {
                return;
            }
            notified.await;
        }
    }

    pub(super) fn header(&self, st: &HubState, rev: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader { revision: rev, ..st.header })
    }

    /// Sends a batch of events to every watcher they match: one response each.
    pub(super) fn dispatch(&self, st: &mut HubState, events: &[Arc<HubEvent>]) {
        let mut out: Vec<(Arc<Watcher>, Vec<Event>)> = Vec::new();
        let mut slot: HashMap<*const Watcher, usize> = HashMap::new();
        for ev in events {
            let Some(ws) = st.watchers.get(&ev.tenant) else { continue };
            for w in ws.candidates(&ev.root) {
                if w.matches(ev) {
                    let i = *slot.entry(Arc::as_ptr(w)).or_insert_with(|| {
                        out.push((w.clone(), Vec::new()));
                        out.len() - 1
                    });
                    out[i].1.push(w.render(ev));
                }
            }
        }
        let header = self.header(st, st.last_rev);
        let mut slow = Vec::new();
        for (w, evs) in out {
            let n = evs.len() as u64;
            match self.deliver(&w, header, evs) {
                Sent::Ok => {
                    w.active.store(true, Ordering::Relaxed);
                    metrics::counter!(names::WATCH_EVENTS_OUT).increment(n);
                }
                Sent::Full => slow.push(w),
                Sent::Gone => {}
            }
        }
        for w in slow {
            self.cancel_slow(st, &w);
        }
    }

    /// Queues `events` for `w` as one response or, when the watcher asked for
    /// fragments and the response is larger than etcd's request limit, as etcd
    /// fragments it: every part but the last flagged `fragment`, a revision's events
    /// never split between watchers' streams.
    pub(super) fn deliver(&self, w: &Watcher, header: Option<ResponseHeader>, events: Vec<Event>) -> Sent {
        let limit = self.cfg.fragment_bytes;
        let resp = WatchResponse { header, watch_id: w.id, events, ..Default::default() };
        if !w.fragment || resp.encoded_len() <= limit {
            return w.sink.send(resp);
        }
        let mut parts: Vec<Vec<Event>> = Vec::new();
        let mut current: Vec<Event> = Vec::new();
        let mut size = 0;
        for e in resp.events {
            let len = e.encoded_len();
            if !current.is_empty() && size + len > limit {
                parts.push(std::mem::take(&mut current));
                size = 0;
            }
            size += len;
            current.push(e);
        }
        parts.push(current);
        let n = parts.len();
        let fragments = parts.into_iter().enumerate().map(|(i, events)| WatchResponse {
            header,
            watch_id: w.id,
            events,
            fragment: i + 1 < n,
            ..Default::default()
        });
        w.sink.send_all(fragments)
    }

    /// Cancels a watcher whose stream cannot take more: alone, with a reason.
    pub(super) fn cancel_slow(&self, st: &mut HubState, w: &Arc<Watcher>) {
        if !w.cancel() {
            return;
        }
        Self::unregister(st, w);
        metrics::counter!(names::WATCH_SLOW_CANCELS).increment(1);
        w.sink.send_reliable(WatchResponse {
            header: self.header(st, st.last_rev),
            watch_id: w.id,
            canceled: true,
            cancel_reason: format!(
                "etcdmux: watcher fell behind ({} responses queued on its stream); re-watch from the revision after the last event received",
                self.cfg.stream_buffer
            ),
            ..Default::default()
        });
    }

    pub(super) fn unregister(st: &mut HubState, w: &Arc<Watcher>) {
        if let Some(ws) = st.watchers.get_mut(&w.tenant) {
            if ws.remove(w) {
                st.watcher_count -= 1;
            }
            if ws.is_empty() {
                // No per-tenant state is kept for a tenant without watchers.
                st.watchers.remove(&w.tenant);
            }
        }
        metrics::gauge!(names::WATCH_WATCHERS).set(st.watcher_count as f64);
    }

    pub(super) fn evict(&self, st: &mut HubState) {
        while st.ring.len() > self.cfg.ring_events || st.ring_bytes > self.cfg.ring_bytes {
            let Some(first) = st.ring.pop_front() else { break };
            st.ring_bytes -= first.size;
            // Whole revisions only: the ring covers from the next revision on.
            while st.ring.front().is_some_and(|e| e.rev == first.rev) {
                if let Some(e) = st.ring.pop_front() {
                    st.ring_bytes -= e.size;
                }
            }
            st.covers_from = first.rev + 1;
        }
        metrics::gauge!(names::WATCH_RING_EVENTS).set(st.ring.len() as f64);
        metrics::gauge!(names::WATCH_RING_BYTES).set(st.ring_bytes as f64);
    }

    /// Registers a watcher: queues its `created` response, then serves it from the
    /// ring, or starts a catch-up when its start is older than the ring.
    pub fn add(self: &Arc<Self>, proxy: &Arc<Proxy>, w: Arc<Watcher>, mut created: WatchResponse) {
        let mut st = self.lock();
        created.header = self.header(&st, st.last_rev);
        w.sink.send_reliable(created);
        metrics::counter!(names::WATCH_CREATED).increment(1);
        if w.from_rev >= st.covers_from && !w.compacted {
            self.hand_over(&mut st, &w, w.from_rev);
            return;
        }
        w.sink.catching_up.fetch_add(1, Ordering::Relaxed);
        drop(st);
        metrics::counter!(names::WATCH_CATCHUPS).increment(1);
        tokio::spawn(self.clone().catch_up(proxy.clone(), w));
    }

    /// Replays the ring from `from` to a watcher and registers it for live events.
    /// The caller holds the lock and guarantees `from >= covers_from`, or that every
    /// event before `covers_from` from `from` on was already sent.
    pub(super) fn hand_over(&self, st: &mut HubState, w: &Arc<Watcher>, from: i64) {
        // Cancelled meanwhile (checked under the lock that `remove` takes too).
        if w.is_canceled() {
            return;
        }
        let from = from.max(st.covers_from);
        let first = st.ring.partition_point(|e| e.rev < from);
        let mut batch: Vec<Event> = Vec::new();
        let mut batch_rev = 0;
        let mut ok = true;
        let total = st.ring.len();
        for i in first..total {
            let ev = st.ring[i].clone();
            if !w.matches(&ev) {
                continue;
            }
            // Flush before a new revision once the batch is full: never split one.
            if batch.len() >= self.cfg.replay_batch && ev.rev != batch_rev {
                ok = self.send_replay(st, w, std::mem::take(&mut batch), batch_rev);
                if !ok {
                    break;
                }
            }
            batch_rev = ev.rev;
            batch.push(w.render(&ev));
        }
        if ok && !batch.is_empty() {
            ok = self.send_replay(st, w, batch, batch_rev);
        }
        if !ok {
            return;
        }
        st.watchers.entry(w.tenant.clone()).or_default().insert(w.clone());
        st.watcher_count += 1;
        metrics::gauge!(names::WATCH_WATCHERS).set(st.watcher_count as f64);
    }

    pub(super) fn send_replay(&self, st: &mut HubState, w: &Arc<Watcher>, events: Vec<Event>, rev: i64) -> bool {
        let n = events.len() as u64;
        match self.deliver(w, self.header(st, rev), events) {
            Sent::Ok => {
                metrics::counter!(names::WATCH_EVENTS_OUT).increment(n);
                true
            }
            Sent::Full => {
                self.cancel_slow(st, w);
                false
            }
            Sent::Gone => false,
        }
    }

    /// Removes a watcher (client cancel or stream end).
    pub fn remove(&self, w: &Arc<Watcher>) {
        w.cancel();
        let mut st = self.lock();
        Self::unregister(&mut st, w);
    }
}
