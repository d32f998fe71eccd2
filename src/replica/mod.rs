//! The shared read replica (`[cache]`): one in-memory copy of the keys the watch
//! hub watches (every tenant's keys, the root index, lease records), from which
//! `Range` requests are answered without going to etcd.
//!
//! ```text
//!  hub's upstream watch ──events, progress──▶ Replica::on_events / on_progress ──▶ Store
//!  load task ──paged ranges at one revision──▶ Replica::load (events meanwhile held back)
//!  ops::range ──▶ Replica::range: serializable: at once; linearizable: read index
//!                 (one shared upstream call), wait until applied ≥ it, answer locally
//! ```
//!
//! - [`store`]: the pure multi-version store (answers as etcd would, at the current
//!   revision or inside a window of past revisions);
//! - [`read_index`]: etcd's current revision for linearizable reads, one upstream
//!   call per batch of reads;
//! - [`load`]: the initial (and any later) load at one revision.
//!
//! Correctness: the replica holds exactly etcd's keys of the watched range at
//! revision `applied`, plus their versions since `floor`. A linearizable read sent
//! after its client saw revision R learns a revision ≥ R from a call sent after it
//! arrived, and is answered once the replica has applied that revision, so it sees
//! every write that finished before it began. A read the replica cannot answer
//! exactly (older than the window or than a compaction it knows of, sorted on a
//! value, waiting too long, replica not loaded) goes to etcd.

pub mod load;
mod pieces;
pub mod read_index;
pub mod store;

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::backend::Backend;
use crate::config::CacheConfig;
use crate::keyspace::{prefix_end, KeyLayout, Piece};
use crate::metrics::names;
use crate::pb::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
use crate::pb::mvccpb::Event;
use crate::upstream::CallCtx;
use pieces::{Pieces, Route};
use read_index::ReadIndex;
pub use store::{Answer, Store, Why};

/// Where the replica stands.
enum Phase {
    /// Not loaded (at start, after a gap in the feed, over budget): reads go to etcd.
    Empty,
    /// A load runs; events that arrive meanwhile wait here.
    Loading { pending: Vec<(i64, Vec<Event>)>, progress: i64 },
    /// Loaded and fed: answering.
    Live,
}

struct State {
    store: Store,
    /// One tenant's keys in one root: held, evicted over budget, or loading.
    pieces: Pieces,
    phase: Phase,
    /// The newest compaction etcdmux has seen: ranges below it get etcd's answer.
    compacted: i64,
    /// cluster_id, member_id and raft_term for answers (from etcd's latest header).
    header: ResponseHeader,
}

pub struct Replica {
    cfg: CacheConfig,
    layout: KeyLayout,
    /// The upstream range mirrored (the hub's watch range).
    range: Piece,
    /// Upstream prefixes of `cache.exclude_resources`.
    excluded: Vec<Piece>,
    st: Mutex<State>,
    /// The applied revision, for reads waiting to see a revision.
    applied: watch::Sender<i64>,
    /// Asks the load task to (re)load.
    reload: Notify,
    read_index: ReadIndex,
    /// Asks the watch hub to prove progress (set by the hub when it starts).
    nudge: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Replica {
    pub fn new(cfg: &CacheConfig, layout: KeyLayout, excluded: Vec<Piece>) -> Replica {
        Replica {
            cfg: cfg.clone(),
            range: layout.watch_range(),
            layout,
            excluded,
            st: Mutex::new(State {
                store: Store::new(),
                pieces: Pieces::default(),
                phase: Phase::Empty,
                compacted: 0,
                header: ResponseHeader::default(),
            }),
            applied: watch::Sender::new(0),
            reload: Notify::new(),
            read_index: ReadIndex::default(),
            nudge: OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How the hub is asked for a progress proof.
    pub fn set_nudge(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.nudge.set(f);
    }

    /// Whether the replica answers reads now.
    pub fn is_live(&self) -> bool {
        matches!(self.lock().phase, Phase::Live)
    }

    /// The events of one upstream watch response, in revision order (the hub calls
    /// this with every response, under its lock).
    pub fn on_events(&self, events: &[Event]) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut i = 0;
        while i < events.len() {
            let rev = events[i].kv.as_ref().map_or(0, |kv| kv.mod_revision);
            let n = events[i..].iter().take_while(|e| e.kv.as_ref().map_or(0, |kv| kv.mod_revision) == rev).count();
            let group = &events[i..i + n];
            i += n;
            match &mut st.phase {
                Phase::Live => {
                    let routes: Vec<Route> = group.iter().map(|ev| self.route(&mut st.pieces, rev, ev)).collect();
                    if routes.iter().all(|r| matches!(r, Route::Apply)) {
                        st.store.apply(rev, group);
                    } else {
                        let keep: Vec<Event> = group
                            .iter()
                            .zip(&routes)
                            .filter(|(_, r)| matches!(r, Route::Apply))
                            .map(|(ev, _)| ev.clone())
                            .collect();
                        st.store.apply(rev, &keep);
                    }
                }
                Phase::Loading { pending, .. } => {
                    pending.push((rev, group.to_vec()));
                    if pending.len() > self.cfg.max_pending_events {
                        tracing::warn!(held = pending.len(), "cache: too many events during a load; loading again");
                        st.phase = Phase::Empty;
                        self.reload.notify_one();
                        return;
                    }
                }
                Phase::Empty => return,
            }
        }
        self.applied_moved(st);
    }

    /// The piece id of an upstream key (`None`: a key of no tenant).
    fn piece_id(&self, key: &bytes::Bytes) -> Option<bytes::Bytes> {
        self.layout.piece_len(key).map(|n| key.slice(..n))
    }

    fn route(&self, pieces: &mut Pieces, rev: i64, ev: &Event) -> Route {
        match ev.kv.as_ref().and_then(|kv| self.piece_id(&kv.key)) {
            Some(id) => pieces.route(&id, rev, ev),
            None => Route::Apply,
        }
    }

    /// No event of the watched range up to `rev` is missing (a progress answer).
    pub fn on_progress(&self, rev: i64) {
        let mut st = self.lock();
        match &mut st.phase {
            Phase::Live => st.store.advance(rev),
            Phase::Loading { progress, .. } => *progress = (*progress).max(rev),
            Phase::Empty => return,
        }
        self.applied_moved(&mut st);
    }

    /// The feed broke with a gap (the hub resumed after a compaction): what is held
    /// may miss changes, so the replica empties and loads again.
    pub fn on_gap(&self) {
        let mut st = self.lock();
        st.phase = Phase::Empty;
        st.store = Store::new();
        st.pieces = Pieces::default();
        self.report(&st);
        drop(st);
        self.reload.notify_one();
    }

    /// etcd compacted at `rev` (a Compact through etcdmux): ranges below it are
    /// etcd's to refuse.
    pub fn on_compacted(&self, rev: i64) {
        let mut st = self.lock();
        st.compacted = st.compacted.max(rev);
        self.applied_moved(&mut st);
    }

    /// After `applied` moved: slide the window, check the budget, wake waiting reads.
    fn applied_moved(&self, st: &mut State) {
        if !matches!(st.phase, Phase::Live) {
            return;
        }
        let floor = (st.store.applied() - self.cfg.window_revisions).max(st.compacted);
        st.store.raise_floor(floor);
        st.pieces.settle(st.store.applied());
        if st.store.bytes() > self.cfg.max_bytes {
            // Past versions first, then the coldest pieces (to 90% of the budget, so
            // that eviction is not paid on every write); the whole replica last.
            st.store.raise_floor(st.store.applied());
            let target = self.cfg.max_bytes / 10 * 9;
            if st.store.bytes() > target {
                for id in st.pieces.coldest() {
                    if st.store.bytes() <= target {
                        break;
                    }
                    st.store.remove_piece(&id);
                    st.pieces.evicted(&id);
                    metrics::counter!(names::CACHE_EVICTIONS).increment(1);
                }
            }
            if st.store.bytes() > self.cfg.max_bytes {
                tracing::warn!(bytes = st.store.bytes(), max = self.cfg.max_bytes, "cache: over budget; emptied");
                metrics::counter!(names::CACHE_OVER_BUDGET).increment(1);
                st.phase = Phase::Empty;
                st.store = Store::new();
                st.pieces = Pieces::default();
                self.reload.notify_one();
            }
        }
        self.report(st);
        self.applied.send_replace(st.store.applied());
    }

    fn report(&self, st: &State) {
        metrics::gauge!(names::CACHE_BYTES).set(st.store.bytes() as f64);
        metrics::gauge!(names::CACHE_KEYS).set(st.store.len() as f64);
        metrics::gauge!(names::CACHE_REVISION).set(st.store.applied() as f64);
        metrics::gauge!(names::CACHE_PIECES_ABSENT).set(st.pieces.absent() as f64);
    }

    /// Whether the pieces a range reads are held: `Ok(floor)`, the oldest revision
    /// they can be read at; else why not (an evicted piece is asked for).
    fn piece_gate(&self, st: &mut State, req: &RangeRequest) -> Result<i64, &'static str> {
        let (key, end) = (&req.key[..], &req.range_end[..]);
        if self.layout.piece_free(key, end) {
            return Ok(0);
        }
        let within = |id: &[u8]| {
            let mut under = id.to_vec();
            under.push(b'/');
            end.is_empty() || (end != [0] && end <= &prefix_end(&under)[..])
        };
        let id = match self.layout.piece_len(key).map(|n| &key[..n]) {
            Some(id) if within(id) => id,
            // Across pieces: only while every piece is held.
            _ => return if st.pieces.absent() == 0 { Ok(0) } else { Err("evicted") },
        };
        let Some(p) = st.pieces.get(id) else { return Ok(0) };
        match p.state {
            pieces::State::Held => {
                let floor = p.floor;
                st.pieces.touch(id);
                Ok(floor)
            }
            pieces::State::Evicted => {
                if st.pieces.want(id) {
                    self.reload.notify_one();
                }
                Err("evicted")
            }
            pieces::State::Loading { .. } => Err("loading"),
        }
    }

    /// Whether `[key, range_end)` lies inside the mirrored range and outside every
    /// excluded resource.
    fn covers(&self, req: &RangeRequest) -> Result<(), &'static str> {
        let (key, end) = (&req.key[..], &req.range_end[..]);
        let r = &self.range;
        let inside = key >= &r.key[..]
            && match end {
                [] => key < &r.range_end[..],
                [0] => false,
                end => end <= &r.range_end[..],
            };
        if !inside {
            return Err("outside");
        }
        let overlaps =
            |p: &Piece| key < &p.range_end[..] && if end.is_empty() { key >= &p.key[..] } else { end > &p.key[..] };
        if self.excluded.iter().any(overlaps) {
            return Err("excluded");
        }
        Ok(())
    }

    /// Answers an upstream range from the replica, or `None` if it must go to etcd.
    /// `req` has passed etcd's checks.
    pub async fn range(&self, up: &dyn Backend, ctx: &CallCtx, req: &RangeRequest) -> Option<RangeResponse> {
        let forward = |why: &'static str| {
            metrics::counter!(names::CACHE_FORWARDED, "reason" => why).increment(1);
            None
        };
        if let Err(why) = self.covers(req) {
            return forward(why);
        }
        {
            let mut st = self.lock();
            if !matches!(st.phase, Phase::Live) {
                return forward("not_loaded");
            }
            if let Err(why) = self.piece_gate(&mut st, req) {
                return forward(why);
            }
        }
        // A range at a revision is linearizable too unless serializable: its data is
        // the revision's, but etcd's header is its current revision, which the
        // replica may not have applied yet (found by the differential test on SQL).
        let kind = if req.revision > 0 { "revision" } else { "linearizable" };
        let (kind, header) = if req.serializable {
            if ctx.require_leader {
                // etcd refuses it without a leader; only etcd knows.
                return forward("require_leader");
            }
            (if req.revision > 0 { kind } else { "serializable" }, None)
        } else {
            let Some(h) = self.read_index.current(|| self.fetch_revision(up, ctx)).await else {
                return forward("read_index_failed");
            };
            // Within one etcd cluster a linearizable read index is never below a
            // revision already seen: etcd went back (another cluster behind the same
            // endpoints, a restore from a backup), and only etcd knows its keys now.
            let applied = *self.applied.borrow();
            if h.revision < applied {
                tracing::warn!(read_index = h.revision, applied, "etcd's revision is behind the replica's");
                return forward("etcd_behind");
            }
            // A range at a revision needs etcd's revision only for its header: its
            // data is fixed once the replica has applied that revision (checked
            // below), so it does not wait for the replica to reach the read index.
            if req.revision == 0 && !self.wait_applied(h.revision).await {
                return forward("lagging");
            }
            (kind, Some(h))
        };
        let mut st = self.lock();
        if let Some(h) = header {
            st.header = ResponseHeader { revision: 0, ..h };
        }
        if req.revision > 0 && req.revision < st.compacted {
            return forward("compacted");
        }
        if !matches!(st.phase, Phase::Live) {
            return forward("not_loaded");
        }
        // The piece may have been evicted or reloaded while the read waited.
        let piece_floor = match self.piece_gate(&mut st, req) {
            Ok(floor) => floor,
            Err(why) => return forward(why),
        };
        // A linearizable read is answered at the read index R (the replica has
        // applied it): exactly what etcd would have answered when R was read, even if
        // the replica has moved on since (a progress fence, later writes).
        let at = match header {
            _ if req.revision > 0 => req.revision,
            Some(h) if h.revision >= st.store.floor() => h.revision,
            _ => st.store.applied(),
        };
        if at < piece_floor {
            return forward("before_window");
        }
        match st.store.range(&RangeRequest { revision: at, ..req.clone() }) {
            Answer::Served(mut resp) => {
                let revision = match header {
                    Some(h) if req.revision > 0 => h.revision,
                    _ if req.revision > 0 => st.store.applied(),
                    _ => at,
                };
                resp.header = Some(ResponseHeader { revision, ..st.header });
                drop(st);
                metrics::counter!(names::CACHE_HITS, "consistency" => kind).increment(1);
                Some(resp)
            }
            Answer::Forward(why) => forward(match why {
                Why::BeforeWindow => "before_window",
                Why::AfterApplied => "after_applied",
                Why::Sort => "sort",
                Why::NotLoaded => "not_loaded",
            }),
        }
    }

    /// etcd's current header: a one-key range on a key etcdmux never writes.
    async fn fetch_revision(&self, up: &dyn Backend, ctx: &CallCtx) -> Option<ResponseHeader> {
        metrics::counter!(names::CACHE_READ_INDEX_CALLS).increment(1);
        let req = RangeRequest {
            key: self.range.key.clone(),
            range_end: Default::default(),
            count_only: true,
            ..Default::default()
        };
        let resp = up.range(ctx, &req).await;
        resp.ok().and_then(|r| r.header)
    }

    /// Waits until the replica has applied `rev`; after `nudge_after_ms` asks the hub
    /// to prove progress (etcd's newest revision may be outside the watched range).
    /// False if that did not happen within `max_read_wait_ms`.
    async fn wait_applied(&self, rev: i64) -> bool {
        let mut rx = self.applied.subscribe();
        if *rx.borrow() >= rev {
            return true;
        }
        let started = tokio::time::Instant::now();
        let nudge_at = Duration::from_millis(self.cfg.nudge_after_ms);
        let limit = Duration::from_millis(self.cfg.max_read_wait_ms);
        let first = tokio::time::timeout(nudge_at.min(limit), rx.wait_for(|a| *a >= rev)).await.map(|r| r.is_ok());
        let reached = match first {
            Ok(reached) => reached,
            Err(_) => {
                let rest = limit.saturating_sub(nudge_at);
                if let Some(nudge) = self.nudge.get().filter(|_| !rest.is_zero()) {
                    nudge();
                }
                matches!(tokio::time::timeout(rest, rx.wait_for(|a| *a >= rev)).await, Ok(Ok(_)))
            }
        };
        metrics::histogram!(names::CACHE_READ_WAIT).record(started.elapsed().as_secs_f64());
        reached
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::keyspace::TenantName;
    use crate::pb::mvccpb::event::EventType;
    use crate::pb::mvccpb::KeyValue;
    use bytes::Bytes;

    fn kv(key: &Bytes, rev: i64, create: i64) -> KeyValue {
        KeyValue {
            key: key.clone(),
            value: Bytes::from_static(b"v"),
            create_revision: create,
            mod_revision: rev,
            version: 1,
            lease: 0,
        }
    }

    /// A piece loaded again has no versions from before its load: a range there at
    /// an older revision goes to etcd (which may hold keys deleted since), while the
    /// rest of the replica still answers it.
    #[tokio::test]
    async fn a_reloaded_piece_is_not_read_before_its_load() {
        let cfg = Config::parse("[cache]\nenabled = true", "test").expect("config");
        let up = crate::backend::etcd::EtcdBackend::new(&cfg).expect("a lazy upstream");
        let layout = KeyLayout::new("/registry", "/etcdmux");
        let r = Replica::new(&cfg.cache, layout.clone(), Vec::new());
        let (a, b) = (TenantName::new("a").expect("name"), TenantName::new("b").expect("name"));
        let (a1, a2, a3) =
            (layout.encode(&a, b"/pods/1"), layout.encode(&a, b"/pods/2"), layout.encode(&a, b"/pods/3"));
        let b1 = layout.encode(&b, b"/pods/1");
        let piece_a = a1.slice(..layout.piece_len(&a1).expect("a piece"));
        {
            let mut st = r.lock();
            st.store.load(10, [kv(&a1, 5, 5), kv(&a2, 6, 6), kv(&b1, 7, 7)]);
            for k in [&a1, &a2, &b1] {
                let id = r.piece_id(k).expect("a piece");
                st.pieces.seen(&id);
            }
            st.phase = Phase::Live;
            // Piece a evicted; while evicted, a2 is deleted at 11 and a3 created at 12.
            st.store.remove_piece(&piece_a);
            st.pieces.evicted(&piece_a);
        }
        let del = Event { r#type: EventType::Delete as i32, kv: Some(kv(&a2, 11, 0)), prev_kv: None };
        r.on_events(&[del]);
        r.on_events(&[Event { r#type: EventType::Put as i32, kv: Some(kv(&a3, 12, 12)), prev_kv: None }]);
        {
            let mut st = r.lock();
            assert!(st.pieces.want(&piece_a));
            let applied = st.store.applied();
            assert_eq!(st.pieces.loaded(&piece_a, 12, applied).map(|h| h.len()), Some(0));
            st.store.load_more([kv(&a1, 5, 5), kv(&a3, 12, 12)]);
        }
        let ctx = CallCtx::from_metadata(&Default::default(), Duration::from_secs(1));
        let at = |key: &Bytes, rev: i64| RangeRequest {
            key: key.slice(..key.len() - 1),
            range_end: prefix_end(&key.slice(..key.len() - 1)),
            revision: rev,
            // Serializable: answered without asking the (absent) etcd for its revision.
            serializable: true,
            ..Default::default()
        };
        assert_eq!(r.range(&up, &ctx, &at(&a1, 10)).await, None, "before piece a's load: etcd's to answer");
        let now = r.range(&up, &ctx, &at(&a1, 12)).await.expect("after its load: answered");
        assert_eq!(now.kvs.iter().map(|k| k.key.clone()).collect::<Vec<_>>(), [a1.clone(), a3.clone()]);
        let other = r.range(&up, &ctx, &at(&b1, 10)).await.expect("another piece: answered at 10");
        assert_eq!(other.kvs.len(), 1);
    }
}
