//! Loading the replica: the watched range read page by page at one revision (the
//! first page's), while the hub's events arrive and are held back; then the held
//! events after that revision are applied and the replica goes live.
//!
//! Why nothing is missed: events are held from before the first page is asked for,
//! so every revision after the load's (which etcd had not reached when that page was
//! read) arrives held; events of earlier revisions are already in the pages and
//! are skipped. The loader starts only once the hub's watch stands at etcd's
//! revision, so the hub delivers everything after the load's revision.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use super::pieces::{Pieces, Route};
use super::{Phase, Replica, Store};
use crate::backend::Backend;
use crate::keyspace::prefix_end;
use crate::metrics::names;
use crate::pb::etcdserverpb::RangeRequest;
use crate::pb::mvccpb::Event;
use crate::upstream::classify::{EtcdError, UpstreamError};
use crate::upstream::CallCtx;

/// Why a load did not finish.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading from etcd: {0}")]
    Upstream(#[from] UpstreamError),
    #[error("interrupted (a gap in the watch feed, or too many events held back)")]
    Interrupted,
}

impl Replica {
    /// Loads when the replica is empty (at start, after a gap, after going over
    /// budget), backing off after failures, and looks for compactions made
    /// elsewhere every `compaction_check_ms`, forever: run it as an owned task.
    pub async fn run_loader(&self, up: &dyn Backend, timeout: Duration) {
        let base = Duration::from_millis(100);
        let mut backoff = base;
        let every = Duration::from_millis(self.cfg.compaction_check_ms.max(1));
        loop {
            let asked = self.reload.notified();
            tokio::pin!(asked);
            asked.as_mut().enable();
            if matches!(self.lock().phase, Phase::Empty) {
                let started = Instant::now();
                match self.load(up, timeout).await {
                    Ok(keys) => {
                        backoff = base;
                        metrics::counter!(names::CACHE_LOADS, "result" => "ok").increment(1);
                        metrics::histogram!(names::CACHE_LOAD_DURATION).record(started.elapsed().as_secs_f64());
                        tracing::info!(keys, seconds = started.elapsed().as_secs_f64(), "cache: loaded");
                    }
                    Err(e) => {
                        metrics::counter!(names::CACHE_LOADS, "result" => "error").increment(1);
                        tracing::warn!(error = %e, retry_in = ?backoff, "cache: load failed");
                        self.lock().phase = Phase::Empty;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            loop {
                let Some(id) = self.lock().pieces.next_wanted() else { break };
                let result = self.load_piece(up, timeout, &id).await;
                metrics::counter!(names::CACHE_PIECE_LOADS, "result" => if result.is_ok() { "ok" } else { "error" })
                    .increment(1);
                if let Err(e) = result {
                    tracing::debug!(error = %e, "cache: loading an evicted piece failed");
                    self.lock().pieces.load_failed(&id);
                }
            }
            if self.cfg.compaction_check_ms == 0 {
                asked.await;
                continue;
            }
            tokio::select! {
                _ = asked => {}
                _ = tokio::time::sleep(every) => {
                    if let Err(e) = self.check_compaction(up, timeout).await {
                        tracing::debug!(error = %e, "cache: compaction check failed");
                    }
                }
            }
        }
    }

    /// Finds a compaction etcd made at or after the window's floor that etcdmux did
    /// not see (another etcdmux replica's, or a client's straight to etcd): one range
    /// at the floor when there is none, a binary search over the window when there
    /// is. Ranges below it then get etcd's answer again.
    async fn check_compaction(&self, up: &dyn Backend, timeout: Duration) -> Result<(), UpstreamError> {
        let (floor, applied) = {
            let st = self.lock();
            if !matches!(st.phase, Phase::Live) {
                return Ok(());
            }
            (st.store.floor().max(st.compacted), st.store.applied())
        };
        if floor <= 0 || !self.compacted_at(up, timeout, floor).await? {
            return Ok(());
        }
        // etcd refuses revisions below its compaction: the first it serves is it.
        let (mut lo, mut hi) = (floor + 1, applied);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.compacted_at(up, timeout, mid).await? {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        tracing::info!(revision = lo, "cache: etcd was compacted elsewhere");
        self.on_compacted(lo);
        Ok(())
    }

    /// Whether etcd refuses a range at `rev` as compacted.
    async fn compacted_at(&self, up: &dyn Backend, timeout: Duration, rev: i64) -> Result<bool, UpstreamError> {
        let req = RangeRequest { key: self.range.key.clone(), count_only: true, revision: rev, ..Default::default() };
        let ctx = CallCtx::from_metadata(&Default::default(), timeout);
        match up.range(&ctx, &req).await {
            Ok(_) => Ok(false),
            Err(e) if e.etcd() == Some(EtcdError::Compacted) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// One load; returns the number of keys loaded.
    async fn load(&self, up: &dyn Backend, timeout: Duration) -> Result<usize, LoadError> {
        {
            let mut st = self.lock();
            st.phase = Phase::Loading { pending: Vec::new(), progress: 0 };
            st.store = Store::new();
        }
        let mut store = Store::new();
        let mut header = None;
        let mut key = self.range.key.clone();
        let mut limit = self.cfg.load_page_keys;
        // Over budget, the pieces not loaded: reads of them go to etcd and ask for them.
        let mut absent: HashSet<Bytes> = HashSet::new();
        loop {
            let req = RangeRequest {
                key: key.clone(),
                range_end: self.range.range_end.clone(),
                limit,
                revision: store.applied(),
                ..Default::default()
            };
            let ctx = CallCtx::from_metadata(&Default::default(), timeout);
            let resp = up.range(&ctx, &req).await?;
            if header.is_none() {
                let h = resp.header.unwrap_or_default();
                store.load(h.revision, []);
                header = Some(h);
            }
            let last = resp.kvs.last().map(|kv| kv.key.clone());
            let page_bytes: usize = resp.kvs.iter().map(|kv| kv.key.len() + kv.value.len()).sum();
            if absent.is_empty() {
                store.load_more(resp.kvs);
                if store.bytes() > self.cfg.max_bytes / 10 * 9 {
                    metrics::counter!(names::CACHE_OVER_BUDGET).increment(1);
                    // The piece this page ended in may be loaded in part: drop it too.
                    if let Some(id) = last.as_ref().and_then(|k| self.piece_id(k)) {
                        store.remove_piece(&id);
                        absent.insert(id);
                    }
                }
            } else {
                // Keys of no piece (the root index, lease records) are always held.
                for kv in resp.kvs {
                    match self.piece_id(&kv.key) {
                        Some(id) => {
                            absent.insert(id);
                        }
                        None => store.load_more([kv]),
                    }
                }
            }
            if !matches!(self.lock().phase, Phase::Loading { .. }) {
                return Err(LoadError::Interrupted);
            }
            limit = next_page_limit(limit, page_bytes);
            match last {
                Some(k) if resp.more => key = after(&k),
                _ => break,
            }
        }
        let mut st = self.lock();
        let Phase::Loading { pending, progress } = std::mem::replace(&mut st.phase, Phase::Live) else {
            return Err(LoadError::Interrupted);
        };
        let mut pieces = Pieces::default();
        for key in store.keys() {
            if let Some(id) = self.piece_id(key) {
                pieces.seen(&id);
            }
        }
        for id in &absent {
            pieces.seen(id);
            pieces.evicted(id);
        }
        if !absent.is_empty() {
            tracing::warn!(
                left = absent.len(),
                max = self.cfg.max_bytes,
                "cache: data over budget; pieces left out until read"
            );
        }
        for (rev, events) in pending {
            let keep: Vec<Event> =
                events.into_iter().filter(|ev| matches!(self.route(&mut pieces, rev, ev), Route::Apply)).collect();
            store.apply(rev, &keep);
        }
        st.pieces = pieces;
        store.advance(progress);
        let keys = store.len();
        st.store = store;
        if let Some(h) = header {
            st.header = h;
        }
        self.applied_moved(&mut st);
        Ok(keys)
    }
}

impl Replica {
    /// Loads one evicted piece a read asked for: its keys at one revision, then the
    /// events held back meanwhile (see [`super::pieces`]).
    async fn load_piece(&self, up: &dyn Backend, timeout: Duration, id: &Bytes) -> Result<(), LoadError> {
        let mut under = id.to_vec();
        under.push(b'/');
        let range_end = prefix_end(&under);
        let (mut key, mut at, mut kvs) = (id.clone(), 0, Vec::new());
        loop {
            let req = RangeRequest {
                key: key.clone(),
                range_end: range_end.clone(),
                limit: self.cfg.load_page_keys,
                revision: at,
                ..Default::default()
            };
            let ctx = CallCtx::from_metadata(&Default::default(), timeout);
            let resp = up.range(&ctx, &req).await?;
            if at == 0 {
                at = resp.header.map_or(0, |h| h.revision);
            }
            let last = resp.kvs.last().map(|kv| kv.key.clone());
            // Between `id` and `id/` lie other tenants' pieces (`p!x` after `p`).
            kvs.extend(resp.kvs.into_iter().filter(|kv| kv.key == id || kv.key.starts_with(&under)));
            match last {
                Some(k) if resp.more => key = after(&k),
                _ => break,
            }
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        if !matches!(st.phase, Phase::Live) {
            return Err(LoadError::Interrupted);
        }
        let applied = st.store.applied();
        let Some(held_back) = st.pieces.loaded(id, at, applied) else { return Err(LoadError::Interrupted) };
        st.store.load_more(kvs);
        for (rev, ev) in &held_back {
            st.store.replay(*rev, ev);
        }
        self.applied_moved(st);
        Ok(())
    }
}

/// Bytes of keys and values a load page aims at: pages grow while they carry less
/// (etcd walks every key from a page's start to the range's end for each page, so
/// fewer pages load much faster), and shrink when values are large.
const PAGE_BYTES: usize = 8 << 20;
/// The most keys one page asks for.
const MAX_PAGE_KEYS: i64 = 65_536;

/// The next page's key limit after a page of `limit` keys carried `bytes`.
fn next_page_limit(limit: i64, bytes: usize) -> i64 {
    if bytes < PAGE_BYTES / 2 {
        (limit * 2).min(MAX_PAGE_KEYS)
    } else if bytes > PAGE_BYTES * 2 {
        (limit / 2).max(1)
    } else {
        limit
    }
}

/// The smallest key after `k`.
fn after(k: &Bytes) -> Bytes {
    let mut next = BytesMut::with_capacity(k.len() + 1);
    next.put_slice(k);
    next.put_u8(0);
    next.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_grow_while_small_and_shrink_when_large() {
        assert_eq!(next_page_limit(1000, 1 << 20), 2000);
        assert_eq!(next_page_limit(60_000, 1 << 20), MAX_PAGE_KEYS);
        assert_eq!(next_page_limit(1000, PAGE_BYTES), 1000);
        assert_eq!(next_page_limit(1000, PAGE_BYTES * 3), 500);
        assert_eq!(next_page_limit(1, PAGE_BYTES * 3), 1, "never below one key");
    }
}
