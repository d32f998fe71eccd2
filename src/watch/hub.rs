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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::config::WatchConfig;
use crate::keylayout::{prefix_end, root_of, KeyLayout, Piece, Root};
use crate::pb::etcdserverpb::{
    watch_request, PutRequest, RangeRequest, ResponseHeader, WatchCreateRequest, WatchProgressRequest, WatchRequest,
    WatchResponse,
};
use crate::pb::mvccpb::{event::EventType, Event};
use crate::proxy::Proxy;
use crate::tenant::{ClientPrefix, End, TenantName};
use crate::upstream::{CallCtx, Retry};

/// Consecutive failed catch-up attempts before the watcher is cancelled.
const CATCH_UP_ATTEMPTS: u32 = 8;

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

/// One upstream event in tenant form, shared by every watcher it reaches.
pub struct HubEvent {
    pub rev: i64,
    pub tenant: TenantName,
    /// The tenant key.
    pub key: Bytes,
    /// The resource root of `key`, for the fan-out index.
    root: Root,
    /// kv and prev_kv with tenant keys.
    event: Event,
    /// The same event with keys in key-path-rule client form, made on first use.
    prefixed: OnceLock<Event>,
    size: usize,
}

impl HubEvent {
    fn from_upstream(layout: &KeyLayout, mut event: Event) -> Option<HubEvent> {
        let kv = event.kv.as_mut()?;
        let (tenant, key) = layout.decode(&kv.key)?;
        kv.key = key.clone();
        let rev = kv.mod_revision;
        let mut size = 96 + key.len() + kv.value.len();
        if let Some(prev) = event.prev_kv.as_mut() {
            prev.key = key.clone();
            size += prev.value.len();
        }
        let root = root_of(&key);
        Some(HubEvent { rev, tenant, key, root, event, prefixed: OnceLock::new(), size })
    }

    fn is_put(&self) -> bool {
        self.event.r#type == EventType::Put as i32
    }
}

/// How a watcher's events are shown to its client.
pub enum Render {
    /// Tenant keys as they are (static listeners).
    Tenant,
    /// Tenant keys under the tenant's key-path prefix.
    Prefixed(ClientPrefix),
}

/// One client watcher.
pub struct Watcher {
    pub id: i64,
    pub sink: Arc<StreamSink>,
    pub tenant: TenantName,
    pub start: Bytes,
    pub end: End,
    /// Events before this revision are not for this watcher.
    pub from_rev: i64,
    pub prev_kv: bool,
    pub no_put: bool,
    pub no_delete: bool,
    pub progress_notify: bool,
    /// Split responses larger than etcd's request limit into fragments.
    pub fragment: bool,
    pub render: Render,
    canceled: AtomicBool,
    /// Whether events reached this watcher since the last progress tick.
    active: AtomicBool,
    /// Its start was compacted in etcd: only etcd can answer it, through a catch-up.
    pub compacted: bool,
    /// The one resource root its range lies in, if it lies in one.
    root: Option<Root>,
}

impl Watcher {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: i64,
        sink: Arc<StreamSink>,
        tenant: TenantName,
        start: Bytes,
        end: End,
        from_rev: i64,
        create: &WatchCreateRequest,
        render: Render,
    ) -> Watcher {
        use crate::pb::etcdserverpb::watch_create_request::FilterType;
        Watcher {
            id,
            sink,
            tenant,
            start,
            end,
            from_rev,
            prev_kv: create.prev_kv,
            no_put: create.filters.contains(&(FilterType::Noput as i32)),
            no_delete: create.filters.contains(&(FilterType::Nodelete as i32)),
            progress_notify: create.progress_notify,
            fragment: create.fragment,
            render,
            canceled: AtomicBool::new(false),
            active: AtomicBool::new(false),
            compacted: false,
            root: None,
        }
        .with_root()
    }

    fn with_root(mut self) -> Watcher {
        let root = root_of(&self.start);
        self.root = match (&self.end, &root) {
            (End::Single, _) => Some(root),
            (End::Key(e), Root::Slash { name, single: false }) => {
                let lo = [b"/", &name[..], b"/"].concat();
                let hi = prefix_end(&lo);
                (self.start.as_ref() >= lo.as_slice() && e.as_ref() <= hi.as_ref()).then_some(root)
            }
            _ => None,
        };
        self
    }

    fn matches(&self, ev: &HubEvent) -> bool {
        // The tenant check is what keeps replay and catch-up tenant-closed: they walk
        // every event, not the tenant index that live dispatch uses.
        if ev.tenant != self.tenant || ev.rev < self.from_rev || self.canceled.load(Ordering::Relaxed) {
            return false;
        }
        let in_range = match &self.end {
            End::Single => ev.key == self.start,
            End::Key(e) => ev.key >= self.start && ev.key < *e,
            End::Unbounded => ev.key >= self.start,
        };
        in_range && !(if ev.is_put() { self.no_put } else { self.no_delete })
    }

    fn render(&self, ev: &HubEvent) -> Event {
        let mut e = match &self.render {
            Render::Tenant => ev.event.clone(),
            Render::Prefixed(cp) => ev
                .prefixed
                .get_or_init(|| {
                    let mut e = ev.event.clone();
                    let key = cp.render(&ev.key);
                    if let Some(kv) = e.kv.as_mut() {
                        kv.key = key.clone();
                    }
                    if let Some(p) = e.prev_kv.as_mut() {
                        p.key = key;
                    }
                    e
                })
                .clone(),
        };
        if !self.prev_kv {
            e.prev_kv = None;
        }
        e
    }

    pub fn cancel(&self) -> bool {
        !self.canceled.swap(true, Ordering::Relaxed)
    }

    pub fn is_canceled(&self) -> bool {
        self.canceled.load(Ordering::Relaxed)
    }
}

/// One tenant's watchers, indexed by the resource root their range lies in, so an
/// event is checked only against watchers of its tenant and root (plus the few whose
/// range spans roots). A tenant without watchers has no entry at all.
#[derive(Default)]
struct TenantWatchers {
    by_root: HashMap<Root, Vec<Arc<Watcher>>>,
    wide: Vec<Arc<Watcher>>,
}

impl TenantWatchers {
    fn insert(&mut self, w: Arc<Watcher>) {
        match &w.root {
            Some(r) => self.by_root.entry(r.clone()).or_default().push(w),
            None => self.wide.push(w),
        }
    }

    /// Removes `w`; true if it was there.
    fn remove(&mut self, w: &Arc<Watcher>) -> bool {
        let list = match &w.root {
            Some(r) => match self.by_root.get_mut(r) {
                Some(l) => l,
                None => return false,
            },
            None => &mut self.wide,
        };
        let before = list.len();
        list.retain(|x| !Arc::ptr_eq(x, w));
        let removed = list.len() < before;
        if let Some(r) = &w.root {
            if self.by_root.get(r).is_some_and(|l| l.is_empty()) {
                self.by_root.remove(r);
            }
        }
        removed
    }

    /// The watchers an event in `root` may match.
    fn candidates<'a>(&'a self, root: &Root) -> impl Iterator<Item = &'a Arc<Watcher>> {
        self.by_root.get(root).into_iter().flatten().chain(self.wide.iter())
    }

    fn all(&self) -> impl Iterator<Item = &Arc<Watcher>> {
        self.by_root.values().flatten().chain(self.wide.iter())
    }

    fn is_empty(&self) -> bool {
        self.by_root.is_empty() && self.wide.is_empty()
    }
}

/// A queued message of one client stream.
/// Boxed, so that a queue's preallocated block of slots stays small for the many
/// idle streams an apiserver keeps open.
pub enum Outgoing {
    /// Counts against the stream's buffer (events, progress).
    Data(Box<WatchResponse>),
    /// Must not be dropped (created, cancels): bounded by the watcher count, and by
    /// the request reader waiting while the stream is full.
    Control(Box<WatchResponse>),
    /// Ends the stream with an error.
    End(Box<Status>),
}

/// The sending side of one client Watch stream: one ordered queue, so a watcher's
/// `created` always precedes its events and a cancel follows them, with the number
/// of queued data responses bounded by `stream_buffer`.
pub struct StreamSink {
    queue: mpsc::UnboundedSender<Outgoing>,
    /// Data responses queued and not yet taken by the client.
    queued: Arc<AtomicUsize>,
    limit: usize,
    /// Signalled when the client takes a response.
    pub room: Arc<Notify>,
    pub require_leader: bool,
    /// Watchers of this stream still catching up: progress waits for them.
    catching_up: AtomicUsize,
}

/// Outcome of queueing a response on a stream.
enum Sent {
    Ok,
    Full,
    Gone,
}

/// The receiving side, for the response stream.
pub struct SinkReceiver {
    pub queue: mpsc::UnboundedReceiver<Outgoing>,
    pub queued: Arc<AtomicUsize>,
    pub room: Arc<Notify>,
}

impl StreamSink {
    pub fn new(buffer: usize, require_leader: bool) -> (Arc<StreamSink>, SinkReceiver) {
        let (queue, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let room = Arc::new(Notify::new());
        let sink = StreamSink {
            queue,
            queued: queued.clone(),
            limit: buffer,
            room: room.clone(),
            require_leader,
            catching_up: AtomicUsize::new(0),
        };
        (Arc::new(sink), SinkReceiver { queue: rx, queued, room })
    }

    fn send(&self, r: WatchResponse) -> Sent {
        self.send_all(std::iter::once(r))
    }

    /// Queues responses that belong together (the fragments of one response): all
    /// of them, or none when the stream has no room for all.
    fn send_all<I>(&self, rs: I) -> Sent
    where
        I: IntoIterator<Item = WatchResponse>,
        I::IntoIter: ExactSizeIterator,
    {
        let rs = rs.into_iter();
        if self.queue.is_closed() {
            return Sent::Gone;
        }
        if self.queued.load(Ordering::Relaxed) + rs.len() > self.limit {
            return Sent::Full;
        }
        self.queued.fetch_add(rs.len(), Ordering::Relaxed);
        for r in rs {
            if self.queue.send(Outgoing::Data(Box::new(r))).is_err() {
                return Sent::Gone;
            }
        }
        Sent::Ok
    }

    /// Queues an events response; false when the stream has no room (or is gone).
    pub fn send_events(&self, r: WatchResponse) -> bool {
        matches!(self.send(r), Sent::Ok)
    }

    /// Whether the client is behind by a full buffer.
    pub fn is_full(&self) -> bool {
        self.queued.load(Ordering::Relaxed) >= self.limit
    }

    /// Resolves when the client's response stream is gone.
    pub async fn closed(&self) {
        self.queue.closed().await
    }

    /// Queues a response that must not be dropped (created, cancels).
    pub fn send_reliable(&self, r: WatchResponse) {
        let _ = self.queue.send(Outgoing::Control(Box::new(r)));
    }

    /// Ends the stream with `status` after what is already queued.
    pub fn end(&self, status: Status) {
        let _ = self.queue.send(Outgoing::End(Box::new(status)));
    }
}

struct HubState {
    ring: VecDeque<Arc<HubEvent>>,
    ring_bytes: usize,
    /// The ring holds every event with revision in `covers_from..=last_rev`.
    covers_from: i64,
    /// Every event up to this revision has been dispatched.
    last_rev: i64,
    /// cluster_id / member_id / raft_term of the latest upstream header.
    header: ResponseHeader,
    watchers: HashMap<TenantName, TenantWatchers>,
    watcher_count: usize,
    /// Progress requests waiting for a probe issued after them.
    progress_waiters: Vec<Waiter>,
    /// Probes (upstream progress requests or fence writes) issued and completed, in
    /// order: a request is answered by the first probe issued after it.
    probes_issued: u64,
    probes_done: u64,
    /// Fence writes not seen yet: (revision, probe).
    pending_fences: Vec<(i64, u64)>,
    /// Upstream progress requests sent and not answered: their probes, in order.
    inflight_requests: VecDeque<u64>,
    tick_due: bool,
    ready: bool,
}

/// One client progress request.
struct Waiter {
    sink: Arc<StreamSink>,
    /// The probe that answers it: the first issued after the request.
    after: u64,
}

/// The hub. One per process.
pub struct Hub {
    state: Mutex<HubState>,
    cfg: WatchConfig,
    layout: KeyLayout,
    /// The upstream range the hub watches.
    range: Piece,
    progress_kick: Notify,
    ready: Notify,
    catchups: Semaphore,
    /// Whether etcd's own progress answers can be trusted (see `progress_is_reliable`).
    upstream_progress: AtomicBool,
}

/// What the upstream task does after one response.
enum Next {
    Continue,
    Reopen,
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

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock would be a bug; the state is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the upstream watch and the progress ticker; abort the handles to stop.
    pub fn start(self: &Arc<Self>, proxy: Arc<Proxy>) -> Vec<tokio::task::JoinHandle<()>> {
        metrics::gauge!("etcdmux_watch_upstream_watches").set(0.0);
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

    fn header(&self, st: &HubState, rev: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader { revision: rev, ..st.header })
    }

    async fn etcd_version(proxy: &Proxy) -> Option<String> {
        let ctx = CallCtx::from_metadata(&Default::default(), proxy.cfg.default_timeout());
        let req = crate::pb::etcdserverpb::StatusRequest {};
        let resp =
            proxy.upstream.maintenance_call(&ctx, Retry::Safe, &req, |mut c, r| async move { c.status(r).await }).await;
        resp.ok().map(|r| r.version)
    }

    async fn current_header(proxy: &Proxy) -> Result<ResponseHeader, Status> {
        let ctx = CallCtx::from_metadata(&Default::default(), proxy.cfg.default_timeout());
        let req = RangeRequest { key: proxy.layout.void_key(), ..Default::default() };
        let resp = proxy.upstream.kv_call(&ctx, Retry::Safe, &req, |mut c, r| async move { c.range(r).await }).await?;
        Ok(resp.header.unwrap_or_default())
    }

    /// Whether etcd has compacted history at `rev`: the ring may still hold those
    /// events, but etcd refuses a watch from there, and so must the hub. A range at
    /// that revision fails exactly when a watch from it would.
    pub async fn is_compacted(&self, proxy: &Proxy, rev: i64) -> Result<bool, Status> {
        if rev > self.lock().last_rev {
            return Ok(false);
        }
        let ctx = CallCtx::from_metadata(&Default::default(), proxy.cfg.default_timeout());
        let req = RangeRequest { key: proxy.layout.void_key(), revision: rev, ..Default::default() };
        match proxy.upstream.kv_call(&ctx, Retry::Safe, &req, |mut c, r| async move { c.range(r).await }).await {
            Ok(_) => Ok(false),
            Err(s) if s.code() == Code::OutOfRange && s.message().contains("compacted") => Ok(true),
            Err(s) => Err(s),
        }
    }

    /// The revision a watch with start_revision 0 starts at: etcd's current + 1.
    pub async fn now(&self, proxy: &Proxy) -> Result<i64, Status> {
        Ok(Self::current_header(proxy).await?.revision + 1)
    }

    async fn run_upstream(self: Arc<Self>, proxy: Arc<Proxy>) {
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
                        st.covers_from = rev + 1;
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
                    let no_leader = s.message().contains("no leader");
                    tracing::warn!(error = %s, "watch hub: upstream watch broke; resuming");
                    metrics::counter!("etcdmux_watch_upstream_restarts_total").increment(1);
                    if no_leader {
                        self.no_leader();
                    }
                }
            }
            metrics::gauge!("etcdmux_watch_upstream_watches").set(0.0);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Runs one upstream watch from `start` until it ends.
    async fn watch_upstream(
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
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        req.metadata_mut().insert(crate::upstream::REQUIRE_LEADER, tonic::metadata::MetadataValue::from_static("true"));
        let (ep, ch) = proxy.upstream.stream_channel();
        let mut client = proxy.upstream.watch(ch);
        let mut stream = match client.watch(req).await {
            Ok(s) => s.into_inner(),
            Err(s) => {
                proxy.upstream.report(ep, &s);
                return Err(s);
            }
        };
        metrics::gauge!("etcdmux_watch_upstream_watches").set(1.0);
        {
            // Requests sent on the previous stream died with it; ask again.
            let mut st = self.lock();
            st.inflight_requests.clear();
            if !st.progress_waiters.is_empty() || st.tick_due {
                self.progress_kick.notify_one();
            }
        }
        loop {
            tokio::select! {
                _ = self.progress_kick.notified() => {
                    if self.upstream_progress.load(Ordering::Relaxed) {
                        let progress = WatchRequest {
                            request_union: Some(watch_request::RequestUnion::ProgressRequest(WatchProgressRequest {})),
                        };
                        // Never wait here: this task also reads the upstream watch.
                        let mut st = self.lock();
                        if tx.try_send(progress).is_ok() {
                            st.probes_issued += 1;
                            let seq = st.probes_issued;
                            st.inflight_requests.push_back(seq);
                        } else {
                            self.progress_kick.notify_one();
                        }
                    } else {
                        tokio::spawn(self.clone().write_fence(proxy.clone()));
                    }
                }
                msg = stream.message() => match msg.inspect_err(|s| proxy.upstream.report(ep, s))? {
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

    /// Proves progress without trusting etcd's progress answer: write the fence key
    /// (inside the watched range) and wait for its event, which etcd delivers after
    /// every older event.
    async fn write_fence(self: Arc<Self>, proxy: Arc<Proxy>) {
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
                    metrics::counter!("etcdmux_watch_progress_fences_total").increment(1);
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
    fn check_fences(&self, st: &mut HubState) {
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

    /// Applies one upstream response.
    fn on_upstream(&self, resp: WatchResponse) -> Next {
        let mut st = self.lock();
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
                self.check_fences(&mut st);
            } else if self.upstream_progress.load(Ordering::Relaxed) {
                st.last_rev = st.last_rev.max(rev);
                if let Some(seq) = st.inflight_requests.pop_front() {
                    st.probes_done = st.probes_done.max(seq);
                }
                self.check_fences(&mut st);
                self.answer_progress(&mut st);
            }
            return Next::Continue;
        }
        metrics::counter!("etcdmux_watch_events_in_total").increment(resp.events.len() as u64);
        // Every event counts for the revision reached, keys of no tenant included.
        let raw_max = resp.events.iter().filter_map(|e| e.kv.as_ref()).map(|kv| kv.mod_revision).max().unwrap_or(0);
        let events: Vec<Arc<HubEvent>> =
            resp.events.into_iter().filter_map(|e| HubEvent::from_upstream(&self.layout, e)).map(Arc::new).collect();
        st.last_rev = st.last_rev.max(raw_max);
        self.dispatch(&mut st, &events);
        for e in events {
            st.ring_bytes += e.size;
            st.ring.push_back(e);
        }
        self.evict(&mut st);
        self.check_fences(&mut st);
        Next::Continue
    }

    /// Sends a batch of events to every watcher they match: one response each.
    fn dispatch(&self, st: &mut HubState, events: &[Arc<HubEvent>]) {
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
                    metrics::counter!("etcdmux_watch_events_out_total").increment(n);
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
    fn deliver(&self, w: &Watcher, header: Option<ResponseHeader>, events: Vec<Event>) -> Sent {
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
    fn cancel_slow(&self, st: &mut HubState, w: &Arc<Watcher>) {
        if !w.cancel() {
            return;
        }
        Self::unregister(st, w);
        metrics::counter!("etcdmux_watch_slow_cancels_total").increment(1);
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

    fn unregister(st: &mut HubState, w: &Arc<Watcher>) {
        if let Some(ws) = st.watchers.get_mut(&w.tenant) {
            if ws.remove(w) {
                st.watcher_count -= 1;
            }
            if ws.is_empty() {
                // No per-tenant state is kept for a tenant without watchers.
                st.watchers.remove(&w.tenant);
            }
        }
        metrics::gauge!("etcdmux_watch_watchers").set(st.watcher_count as f64);
    }

    fn evict(&self, st: &mut HubState) {
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
        metrics::gauge!("etcdmux_watch_ring_events").set(st.ring.len() as f64);
        metrics::gauge!("etcdmux_watch_ring_bytes").set(st.ring_bytes as f64);
    }

    /// The upstream history the hub needs was compacted while it was away: watchers
    /// that needed those revisions get etcd's compacted cancel; watchers starting at
    /// or after the compact revision lost nothing and stay.
    fn compacted(&self, st: &mut HubState, compact_rev: i64) {
        tracing::warn!(compact_rev, last_rev = st.last_rev, "watch hub: resume revision compacted");
        let header = self.header(st, compact_rev);
        let lost: Vec<Arc<Watcher>> =
            st.watchers.values().flat_map(|ws| ws.all()).filter(|w| w.from_rev < compact_rev).cloned().collect();
        for w in &lost {
            if w.cancel() {
                w.sink.send_reliable(WatchResponse {
                    header,
                    watch_id: w.id,
                    canceled: true,
                    compact_revision: compact_rev,
                    ..Default::default()
                });
            }
            Self::unregister(st, w);
        }
        st.ring.clear();
        st.ring_bytes = 0;
        st.last_rev = compact_rev - 1;
        st.covers_from = compact_rev;
    }

    /// etcd lost its leader: streams that asked to require one end, as etcd ends them.
    fn no_leader(&self) {
        let mut st = self.lock();
        let ended: Vec<Arc<Watcher>> =
            st.watchers.values().flat_map(|ws| ws.all()).filter(|w| w.sink.require_leader).cloned().collect();
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

    /// Answers the progress requests whose probe has completed (and whose stream has
    /// no watcher still catching up), and the periodic notifications due. The answer
    /// is `last_rev`: every event up to it has been queued to every registered
    /// watcher, and the probe, issued after the request, proved it is no older than
    /// etcd's revision at the time of the request.
    fn answer_progress(&self, st: &mut HubState) {
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

    /// Registers a watcher: queues its `created` response, then serves it from the
    /// ring, or starts a catch-up when its start is older than the ring.
    pub fn add(self: &Arc<Self>, proxy: &Arc<Proxy>, w: Arc<Watcher>, mut created: WatchResponse) {
        let mut st = self.lock();
        created.header = self.header(&st, st.last_rev);
        w.sink.send_reliable(created);
        metrics::counter!("etcdmux_watch_created_total").increment(1);
        if w.from_rev >= st.covers_from && !w.compacted {
            self.hand_over(&mut st, &w, w.from_rev);
            return;
        }
        w.sink.catching_up.fetch_add(1, Ordering::Relaxed);
        drop(st);
        metrics::counter!("etcdmux_watch_catchups_total").increment(1);
        tokio::spawn(self.clone().catch_up(proxy.clone(), w));
    }

    /// Replays the ring from `from` to a watcher and registers it for live events.
    /// The caller holds the lock and guarantees `from >= covers_from`, or that every
    /// event before `covers_from` from `from` on was already sent.
    fn hand_over(&self, st: &mut HubState, w: &Arc<Watcher>, from: i64) {
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
        metrics::gauge!("etcdmux_watch_watchers").set(st.watcher_count as f64);
    }

    fn send_replay(&self, st: &mut HubState, w: &Arc<Watcher>, events: Vec<Event>, rev: i64) -> bool {
        let n = events.len() as u64;
        match self.deliver(w, self.header(st, rev), events) {
            Sent::Ok => {
                metrics::counter!("etcdmux_watch_events_out_total").increment(n);
                true
            }
            Sent::Full => {
                self.cancel_slow(st, w);
                false
            }
            Sent::Gone => false,
        }
    }

    /// Serves a watcher older than the ring from a temporary upstream watch, until
    /// it reaches what the ring covers; then hands it over.
    async fn catch_up(self: Arc<Self>, proxy: Arc<Proxy>, w: Arc<Watcher>) {
        let _permit = self.catchups.acquire().await;
        let mut next = w.from_rev;
        let mut backoff = Duration::from_millis(self.cfg.reconnect_backoff_ms.max(1));
        let mut failures = 0;
        loop {
            match self.catch_up_once(&proxy, &w, &mut next).await {
                Ok(_) => break,
                Err(s) => {
                    tracing::debug!(error = %s, watch_id = w.id, "catch-up watch broke; resuming");
                    failures += 1;
                    if w.is_canceled() {
                        break;
                    }
                    if failures >= CATCH_UP_ATTEMPTS {
                        // Give up on this watcher alone, with the reason: its client can
                        // re-watch from its last revision.
                        let reason = format!("etcdmux: cannot catch up from etcd: {}", s.message());
                        self.cancel_catching_up(&w, 0, reason);
                        break;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let mut st = self.lock();
        w.sink.catching_up.fetch_sub(1, Ordering::Relaxed);
        // A progress request may have waited for this watcher only.
        self.answer_progress(&mut st);
    }

    /// One catch-up upstream watch from `*next`. Ok(true) when the watcher was handed
    /// over or cancelled.
    async fn catch_up_once(&self, proxy: &Proxy, w: &Arc<Watcher>, next: &mut i64) -> Result<bool, Status> {
        let (tx, rx) = mpsc::channel(4);
        let create = WatchCreateRequest {
            key: self.range.key.clone(),
            range_end: self.range.range_end.clone(),
            start_revision: *next,
            prev_kv: w.prev_kv,
            ..Default::default()
        };
        let _ = tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) }).await;
        let (ep, ch) = proxy.upstream.stream_channel();
        let mut client = proxy.upstream.watch(ch);
        let mut stream = match client.watch(tonic::Request::new(ReceiverStream::new(rx))).await {
            Ok(s) => s.into_inner(),
            Err(s) => {
                proxy.upstream.report(ep, &s);
                return Err(s);
            }
        };
        // The catch-up must learn when it has seen everything before the ring. etcd
        // 3.4 answers a progress request even before an old watch has caught up, so
        // instead a fence key inside the watched range is written once the watch
        // exists: its event comes after every older event, and carries a revision
        // the ring covers.
        let fence = PutRequest { key: self.layout.fence_key(), ..Default::default() };
        let ctx = CallCtx::from_metadata(&Default::default(), proxy.cfg.default_timeout());
        proxy.upstream.kv_call(&ctx, Retry::OnlyUnsent, &fence, |mut c, r| async move { c.put(r).await }).await?;
        loop {
            tokio::select! {
                msg = stream.message() => {
                    let Some(resp) = msg? else { return Err(Status::unavailable("catch-up stream ended")) };
                    if w.canceled.load(Ordering::Relaxed) || w.sink.queue.is_closed() {
                        return Ok(true);
                    }
                    if resp.compact_revision > 0 {
                        self.cancel_catching_up(w, resp.compact_revision, String::new());
                        return Ok(true);
                    }
                    if resp.created {
                        continue;
                    }
                    if resp.canceled {
                        return Err(Status::unavailable(resp.cancel_reason));
                    }
                    if self.catch_up_step(w, next, resp) {
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// Cancels a watcher that is still catching up (so not in the index).
    fn cancel_catching_up(&self, w: &Arc<Watcher>, compact_revision: i64, cancel_reason: String) {
        if w.cancel() {
            let st = self.lock();
            w.sink.send_reliable(WatchResponse {
                header: self.header(&st, st.last_rev),
                watch_id: w.id,
                canceled: true,
                compact_revision,
                cancel_reason,
                ..Default::default()
            });
        }
    }

    /// Delivers one catch-up response; true once the watcher is handed over.
    fn catch_up_step(&self, w: &Arc<Watcher>, next: &mut i64, resp: WatchResponse) -> bool {
        let events: Vec<HubEvent> =
            resp.events.iter().cloned().filter_map(|e| HubEvent::from_upstream(&self.layout, e)).collect();
        // Through which revision this upstream watch has shown everything: the last
        // event it sent, of any key in the range (the fence included).
        let known_to = resp.events.iter().filter_map(|e| e.kv.as_ref()).map(|kv| kv.mod_revision).max().unwrap_or(0);
        let mut st = self.lock();
        let cov = st.covers_from;
        let mine: Vec<Event> =
            events.iter().filter(|e| e.rev >= *next && e.rev < cov && w.matches(e)).map(|e| w.render(e)).collect();
        if !mine.is_empty() {
            let rev = events.iter().filter(|e| e.rev < cov).map(|e| e.rev).max().unwrap_or(*next);
            if !self.send_replay(&mut st, w, mine, rev) {
                return true;
            }
        }
        if known_to >= *next {
            *next = (known_to + 1).min(cov);
        }
        if known_to >= cov - 1 {
            self.hand_over(&mut st, w, cov);
            return true;
        }
        false
    }

    /// Removes a watcher (client cancel or stream end).
    pub fn remove(&self, w: &Arc<Watcher>) {
        w.cancel();
        let mut st = self.lock();
        Self::unregister(&mut st, w);
    }
}
