//! The watch hub: every tenant's watches served from one upstream watch.
//!
//! ```text
//!  etcd ──one watch (prev_kv, progress)──▶ upstream task ──▶ HubState (one lock)
//!                                                          ├─ ring: recent events, bounded      (ring.rs)
//!                                                          ├─ fan-out: watchers by tenant, root (fanout.rs)
//!                                                          └─ progress: waiters and probes      (progress.rs)
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
//!
//! Every task of the hub (upstream watch, ticker, catch-ups, fence writers) is
//! spawned through the process's [`Tasks`] and ends when the hub stops: at the
//! shutdown signal, or [`Hub::stop`]. Client streams end with `UNAVAILABLE` then.

use crate::metrics::names;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use prost::Message;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::event::HubEvent;
use super::fanout::Fanout;
use super::progress::Progress;
use super::ring::Ring;
use super::sink::{Sent, Slot};
use super::watcher::Watcher;
use crate::config::WatchConfig;
use crate::keyspace::{KeyLayout, Piece};
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{ResponseHeader, WatchResponse};
use crate::pb::mvccpb::Event;
use crate::replica::read_index::ReadIndex;
use crate::replica::Replica;
use crate::shutdown::Tasks;

/// What the hub's lock guards.
pub(super) struct HubState {
    /// Recent events; covers `covers_from()..=last_rev`.
    pub(super) ring: Ring<Arc<HubEvent>>,
    /// Every event up to this revision has been dispatched.
    pub(super) last_rev: i64,
    /// cluster_id / member_id / raft_term of the latest upstream header.
    pub(super) header: ResponseHeader,
    pub(super) fanout: Fanout,
    /// Progress requests (each holding its answer's place on its stream) and probes.
    pub(super) progress: Progress<Slot>,
    pub(super) ready: bool,
}

impl HubState {
    /// Tells the progress state machine that every event up to `last_rev` has been
    /// dispatched; true if that completed a probe.
    pub(super) fn delivered(&mut self) -> bool {
        self.progress.delivered_through(self.last_rev)
    }

    /// A response header at `rev`.
    pub(super) fn header_at(&self, rev: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader { revision: rev, ..self.header })
    }
}

/// The hub's synchronisation with etcd, for readiness ([`Hub::sync`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubSync {
    /// The hub has read etcd's revision once and serves watches.
    pub ready: bool,
    /// Its upstream watch is open.
    pub open: bool,
    /// Every event up to this revision has been dispatched.
    pub last_rev: i64,
}

/// The hub. One per process.
pub struct Hub {
    pub(super) state: Mutex<HubState>,
    pub(super) cfg: WatchConfig,
    pub(super) layout: KeyLayout,
    /// The upstream range the hub watches.
    pub(super) range: Piece,
    /// Asks the upstream task to issue a progress probe, if one is wanted.
    pub(super) progress_kick: Notify,
    /// Signalled when a progress probe completes.
    pub(super) probe_done: Notify,
    pub(super) ready: Notify,
    pub(super) catchups: Semaphore,
    /// Whether etcd's own progress answers can be trusted (see `progress_is_reliable`).
    pub(super) upstream_progress: AtomicBool,
    /// Whether the upstream watch is open (created, and not broken since).
    pub(super) upstream_open: AtomicBool,
    /// Fires at the shutdown signal or [`Hub::stop`]: every hub task and client
    /// stream ends.
    stop: CancellationToken,
    /// The hub's own tasks, for [`Hub::stopped`].
    tracker: TaskTracker,
    /// The read replica the upstream watch feeds (`[cache] enabled`).
    pub(super) replica: OnceLock<Arc<Replica>>,
    /// etcd's current revision for watches created with start_revision 0: one
    /// upstream call shared by the creates that arrive together.
    pub(super) now_index: ReadIndex,
    /// Every stream's queued responses: one handle, cloned into each stream's sink
    /// (taken at the first stream, after the metrics recorder is installed).
    queued: OnceLock<metrics::Gauge>,
}

impl Hub {
    pub fn new(cfg: &WatchConfig, layout: KeyLayout) -> Arc<Hub> {
        let range = layout.watch_range();
        Arc::new(Hub {
            state: Mutex::new(HubState {
                ring: Ring::new(cfg.ring_events, cfg.ring_bytes),
                last_rev: 0,
                header: ResponseHeader::default(),
                fanout: Fanout::default(),
                progress: Progress::default(),
                ready: false,
            }),
            cfg: cfg.clone(),
            layout,
            range,
            progress_kick: Notify::new(),
            probe_done: Notify::new(),
            ready: Notify::new(),
            catchups: Semaphore::new(cfg.max_catchups),
            upstream_progress: AtomicBool::new(false),
            upstream_open: AtomicBool::new(false),
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
            replica: OnceLock::new(),
            now_index: ReadIndex::default(),
            queued: OnceLock::new(),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock would be a bug; the state is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the upstream watch and the progress ticker, as tasks of `proxy.tasks`
    /// that end when the hub stops (at the shutdown signal, or [`Hub::stop`]).
    pub fn start(self: &Arc<Self>, proxy: Arc<Proxy>) -> Vec<JoinHandle<()>> {
        metrics::gauge!(names::WATCH_UPSTREAM_WATCHES).set(0.0);
        let (hub, tasks) = (self.clone(), proxy.tasks.clone());
        proxy.tasks.spawn(async move {
            tokio::select! {
                _ = tasks.cancelled() => hub.stop(),
                _ = hub.stop.cancelled() => {}
            }
        });
        let upstream = self.spawn(&proxy.tasks, self.clone().run_upstream(proxy.clone()));
        let hub = self.clone();
        let ticker = self.spawn(&proxy.tasks, async move {
            let every = Duration::from_millis(hub.cfg.progress_notify_interval_ms.max(10));
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                hub.lock().progress.tick();
                hub.progress_kick.notify_one();
            }
        });
        let mut handles = vec![upstream, ticker];
        if let Some(replica) = &proxy.replica {
            let _ = self.replica.set(replica.clone());
            let hub = Arc::downgrade(self);
            replica.set_nudge(Box::new(move || {
                if let Some(hub) = hub.upgrade() {
                    hub.nudge_progress();
                }
            }));
            // The first load waits for the hub's watch to stand at etcd's revision, so
            // the hub delivers every change after the load's revision.
            let (hub, proxy) = (self.clone(), proxy.clone());
            handles.push(self.spawn(&proxy.tasks.clone(), async move {
                hub.ready().await;
                if let Some(replica) = &proxy.replica {
                    replica.run_loader(&*proxy.backend, proxy.cfg.default_timeout()).await;
                }
            }));
        }
        handles
    }

    /// Spawns one of the hub's tasks: owned by `tasks`, dropped when the hub stops.
    pub(super) fn spawn<F>(&self, tasks: &Tasks, fut: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop.clone();
        tasks.spawn(self.tracker.track_future(async move {
            tokio::select! {
                _ = fut => {}
                _ = stop.cancelled() => {}
            }
        }))
    }

    /// Stops the hub: its tasks end, and every client watch stream ends with
    /// `UNAVAILABLE` (clients reconnect and resume). The shutdown signal of
    /// `proxy.tasks` does the same.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Resolves once the hub has stopped and every task it spawned has ended.
    pub async fn stopped(&self) {
        self.stop.cancelled().await;
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// A token cancelled when the hub stops: for the tasks of client streams.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// The gauge of every stream's queued responses.
    pub(super) fn queued_gauge(&self) -> metrics::Gauge {
        self.queued.get_or_init(|| metrics::gauge!(names::WATCH_QUEUED_RESPONSES)).clone()
    }

    /// The revision through which every event has been dispatched.
    pub fn last_rev(&self) -> i64 {
        self.lock().last_rev
    }

    /// What readiness needs to know: whether the hub knows where etcd's history
    /// stands, whether its upstream watch is open, and how far it has dispatched.
    pub fn sync(&self) -> HubSync {
        let open = self.upstream_open.load(Ordering::Relaxed) && !self.stop.is_cancelled();
        let st = self.lock();
        HubSync { ready: st.ready, open, last_rev: st.last_rev }
    }

    /// Asks for a progress probe, as a periodic tick does: the hub then learns that
    /// it is current even when etcd's newest revisions lie outside the watched range
    /// (global keys), where no event would tell it. Against etcd without reliable
    /// progress answers this costs one fence write.
    pub fn nudge_progress(&self) {
        self.lock().progress.tick();
        self.progress_kick.notify_one();
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

    /// Sends a batch of events to every watcher they match: one response each.
    pub(super) fn dispatch(&self, st: &mut HubState, events: &[Arc<HubEvent>]) {
        let mut out: Vec<(Arc<Watcher>, Vec<Event>)> = Vec::new();
        let mut slot: HashMap<*const Watcher, usize> = HashMap::new();
        for ev in events {
            for w in st.fanout.candidates(&ev.tenant, &ev.root) {
                if w.matches(ev) {
                    let i = *slot.entry(Arc::as_ptr(w)).or_insert_with(|| {
                        out.push((w.clone(), Vec::new()));
                        out.len() - 1
                    });
                    out[i].1.push(w.render(ev));
                }
            }
        }
        let header = st.header_at(st.last_rev);
        let mut slow = Vec::new();
        for (w, evs) in out {
            let n = evs.len() as u64;
            match self.deliver(&w, header, evs) {
                Sent::Ok => {
                    w.active.store(true, Ordering::Relaxed);
                    metrics::counter!(names::WATCH_EVENTS_OUT).increment(n);
                    if let Some(m) = &w.tenant_metrics {
                        m.events.increment(n);
                    }
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
        w.sink.send_control(WatchResponse {
            header: st.header_at(st.last_rev),
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
        if st.fanout.remove(w) {
            if let Some(m) = &w.tenant_metrics {
                m.watchers.decrement(1.0);
            }
        }
        metrics::gauge!(names::WATCH_WATCHERS).set(st.fanout.len() as f64);
    }

    /// Registers a watcher: queues its `created` response, then serves it from the
    /// ring, or starts a catch-up when its start is older than the ring.
    pub fn add(self: &Arc<Self>, proxy: &Arc<Proxy>, w: Arc<Watcher>, mut created: WatchResponse) {
        let mut st = self.lock();
        created.header = st.header_at(st.last_rev);
        if !w.sink.send_control(created) {
            return;
        }
        metrics::counter!(names::WATCH_CREATED).increment(1);
        if w.from_rev >= st.ring.covers_from() && !w.compacted {
            self.hand_over(&mut st, &w, w.from_rev);
            return;
        }
        w.sink.catching_up.fetch_add(1, Ordering::Relaxed);
        drop(st);
        metrics::counter!(names::WATCH_CATCHUPS).increment(1);
        self.spawn(&proxy.tasks, self.clone().catch_up(proxy.clone(), w));
    }

    /// Replays the ring from `from` to a watcher and registers it for live events.
    /// The caller holds the lock and guarantees `from >= covers_from`, or that every
    /// event before `covers_from` from `from` on was already sent.
    pub(super) fn hand_over(&self, st: &mut HubState, w: &Arc<Watcher>, from: i64) {
        // Cancelled meanwhile (checked under the lock that `remove` takes too).
        if w.is_canceled() {
            return;
        }
        match self.replay(st, w, from) {
            Sent::Ok => {
                st.fanout.insert(w.clone());
                if let Some(m) = &w.tenant_metrics {
                    m.watchers.increment(1.0);
                }
                metrics::gauge!(names::WATCH_WATCHERS).set(st.fanout.len() as f64);
            }
            Sent::Full => self.cancel_slow(st, w),
            Sent::Gone => {}
        }
    }

    /// Sends `w` the ring's events from `from` on, in batches of whole revisions.
    fn replay(&self, st: &HubState, w: &Arc<Watcher>, from: i64) -> Sent {
        let mut batch: Vec<Event> = Vec::new();
        let mut batch_rev = 0;
        for ev in st.ring.replay_from(from) {
            if !w.matches(ev) {
                continue;
            }
            // Flush before a new revision once the batch is full: never split one.
            if batch.len() >= self.cfg.replay_batch && ev.rev != batch_rev {
                let sent = self.send_batch(st, w, std::mem::take(&mut batch), batch_rev);
                if sent != Sent::Ok {
                    return sent;
                }
            }
            batch_rev = ev.rev;
            batch.push(w.render(ev));
        }
        if batch.is_empty() {
            return Sent::Ok;
        }
        self.send_batch(st, w, batch, batch_rev)
    }

    fn send_batch(&self, st: &HubState, w: &Arc<Watcher>, events: Vec<Event>, rev: i64) -> Sent {
        let n = events.len() as u64;
        let sent = self.deliver(w, st.header_at(rev), events);
        if sent == Sent::Ok {
            metrics::counter!(names::WATCH_EVENTS_OUT).increment(n);
            if let Some(m) = &w.tenant_metrics {
                m.events.increment(n);
            }
        }
        sent
    }

    /// Sends `w` replayed events at `rev`; a watcher whose stream is full is
    /// cancelled. False unless sent.
    pub(super) fn send_replay(&self, st: &mut HubState, w: &Arc<Watcher>, events: Vec<Event>, rev: i64) -> bool {
        match self.send_batch(st, w, events, rev) {
            Sent::Ok => true,
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
