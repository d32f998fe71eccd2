//! The replica's multi-version key-value store: etcd's keys as etcd holds them
//! (upstream form), each with the versions of a bounded window of revisions, so a
//! `Range` at the current revision or at a revision inside the window is answered
//! exactly as etcd's would be, field for field.
//!
//! Pure: it is fed a snapshot ([`Store::load`]) and then every revision's events in
//! order ([`Store::apply`]); it never does I/O. Keys and values are `Bytes`, shared
//! with whoever handed them in (the watch hub's events), never copied.
//!
//! What a range needs to be answered here ([`Store::range`] says
//! [`Answer::Forward`] otherwise): its revision inside `[floor, applied]`, and a sort
//! on the key (or none). etcd sorts other targets with Go's unstable sort, so the order
//! of equal values is etcd's own; those ranges go to etcd.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

use bytes::Bytes;

use crate::pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::pb::etcdserverpb::{RangeRequest, RangeResponse};
use crate::pb::mvccpb::event::EventType;
use crate::pb::mvccpb::{Event, KeyValue};

/// Bytes a version costs beyond its key and value (the `KeyValue`, its place in
/// the history vector), so that many small keys are not counted as free.
const VERSION_OVERHEAD: usize = std::mem::size_of::<Version>() + 16;
/// Bytes a key costs beyond its versions (its map entry).
const KEY_OVERHEAD: usize = 64;

/// One version of a key: what a put stored, or the revision a delete removed it at.
#[derive(Debug, Clone, PartialEq)]
enum Version {
    Live(KeyValue),
    Gone(i64),
}

impl Version {
    fn revision(&self) -> i64 {
        match self {
            Version::Live(kv) => kv.mod_revision,
            Version::Gone(rev) => *rev,
        }
    }

    fn bytes(&self) -> usize {
        VERSION_OVERHEAD
            + match self {
                Version::Live(kv) => kv.value.len(),
                Version::Gone(_) => 0,
            }
    }
}

/// A key's versions, oldest first: every version newer than the store's floor, and
/// the newest one at or below it (what the key was at the floor).
#[derive(Debug, Default)]
struct History(Vec<Version>);

impl History {
    /// The version visible at `rev`: the newest with a revision at or below it.
    fn at(&self, rev: i64) -> Option<&KeyValue> {
        let i = self.0.partition_point(|v| v.revision() <= rev);
        match self.0[..i].last() {
            Some(Version::Live(kv)) => Some(kv),
            _ => None,
        }
    }
}

/// What [`Store::range`] decided.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// etcd's answer, without its header: the caller adds one with
    /// [`Store::applied`] (or a later revision it has waited for) as the revision.
    Served(RangeResponse),
    /// Not answerable here; send the range to etcd.
    Forward(Why),
}

/// Why a range goes to etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Its revision is older than the window (etcd may still have it, or answer
    /// "compacted").
    BeforeWindow,
    /// Its revision is newer than what the replica has applied (it may not exist
    /// yet: etcd answers "future revision" or the data).
    AfterApplied,
    /// Sorted on something other than the key: the order of equal values is that of
    /// etcd's unstable sort.
    Sort,
    /// The store holds no snapshot yet.
    NotLoaded,
}

/// The multi-version store of one part of etcd's key space.
#[derive(Debug)]
pub struct Store {
    keys: BTreeMap<Bytes, History>,
    /// Every change up to this revision is in.
    applied: i64,
    /// Ranges at revisions from here to `applied` are answered exactly.
    floor: i64,
    loaded: bool,
    /// Keys, values and bookkeeping held, by the accounting of [`Self::bytes`].
    bytes: usize,
    /// (revision, key) of every version that made older versions of its key (or,
    /// for a delete, the key itself) unnecessary once the floor reaches it, in
    /// revision order: raising the floor visits only these keys.
    trims: VecDeque<(i64, Bytes)>,
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

impl Store {
    pub fn new() -> Store {
        Store { keys: BTreeMap::new(), applied: 0, floor: 0, loaded: false, bytes: 0, trims: VecDeque::new() }
    }

    /// Starts from a snapshot: the live keys of the part at revision `rev` (all of
    /// them, in any order; paged loads call [`Self::load_more`] for later pages).
    pub fn load(&mut self, rev: i64, kvs: impl IntoIterator<Item = KeyValue>) {
        *self = Store::new();
        self.applied = rev;
        self.floor = rev;
        self.loaded = true;
        self.load_more(kvs);
    }

    /// More keys of the snapshot [`Self::load`] began (same revision).
    pub fn load_more(&mut self, kvs: impl IntoIterator<Item = KeyValue>) {
        for kv in kvs {
            self.push(kv.key.clone(), Version::Live(kv));
        }
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    /// The revision every change up to which is in the store.
    pub fn applied(&self) -> i64 {
        self.applied
    }

    /// The oldest revision a range can be answered at.
    pub fn floor(&self) -> i64 {
        self.floor
    }

    /// Keys, values and per-version bookkeeping held, in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Keys held (live or with history inside the window).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Every key held, in order.
    pub fn keys(&self) -> impl Iterator<Item = &Bytes> {
        self.keys.keys()
    }

    /// Applies the events of one revision, `rev`, which must be after
    /// [`Self::applied`] (events of earlier revisions are already in: ignored, so a
    /// resumed feed may repeat a revision). Returns whether they were applied.
    pub fn apply(&mut self, rev: i64, events: &[Event]) -> bool {
        if !self.loaded || rev <= self.applied {
            return false;
        }
        for ev in events {
            let Some(kv) = &ev.kv else { continue };
            let version = match EventType::try_from(ev.r#type) {
                Ok(EventType::Delete) => Version::Gone(rev),
                _ => Version::Live(kv.clone()),
            };
            self.push(kv.key.clone(), version);
        }
        self.applied = rev;
        true
    }

    /// Events of revision `rev` (at or before [`Self::applied`]) for keys that were
    /// not fed when they happened (a piece loaded again since): their versions are
    /// added without moving `applied`. The keys' newer versions must not be in yet.
    pub fn replay(&mut self, rev: i64, ev: &Event) {
        let Some(kv) = &ev.kv else { return };
        let version = match EventType::try_from(ev.r#type) {
            Ok(EventType::Delete) => Version::Gone(rev),
            _ => Version::Live(kv.clone()),
        };
        self.push(kv.key.clone(), version);
    }

    /// Drops the keys of one piece (the key `id` and the keys under `id/`), every
    /// version; returns the bytes freed.
    pub fn remove_piece(&mut self, id: &[u8]) -> usize {
        let before = self.bytes;
        let mut under = id.to_vec();
        under.push(b'/');
        let end = crate::keyspace::prefix_end(&under);
        let mut doomed: Vec<Bytes> = self
            .keys
            .range::<[u8], _>((Bound::Included(&under[..]), Bound::Excluded(&end[..])))
            .map(|(k, _)| k.clone())
            .collect();
        if self.keys.contains_key(id) {
            doomed.push(Bytes::copy_from_slice(id));
        }
        for k in doomed {
            if let Some(h) = self.keys.remove(&k) {
                self.bytes -= KEY_OVERHEAD + k.len() + h.0.iter().map(Version::bytes).sum::<usize>();
            }
        }
        before - self.bytes
    }

    /// Nothing changed in this part up to `rev` (a progress notification, or events
    /// of other parts).
    pub fn advance(&mut self, rev: i64) {
        if self.loaded && rev > self.applied {
            self.applied = rev;
        }
    }

    fn push(&mut self, key: Bytes, v: Version) {
        self.bytes += v.bytes();
        let (rev, gone) = (v.revision(), matches!(v, Version::Gone(_)));
        let h = self.keys.entry(key.clone()).or_insert_with_key(|k| {
            self.bytes += KEY_OVERHEAD + k.len();
            History::default()
        });
        let supersedes = !h.0.is_empty();
        h.0.push(v);
        if supersedes || gone {
            self.trims.push_back((rev, key));
        }
    }

    /// Moves the floor up to `floor` (at most to `applied`): versions no range at or
    /// after it can see are dropped, and keys deleted before it are forgotten. Costs
    /// one visit per version made obsolete, never a scan of every key.
    pub fn raise_floor(&mut self, floor: i64) {
        let floor = floor.min(self.applied);
        if floor <= self.floor {
            return;
        }
        self.floor = floor;
        while self.trims.front().is_some_and(|(rev, _)| *rev <= floor) {
            let Some((_, key)) = self.trims.pop_front() else { break };
            let Some(h) = self.keys.get_mut(&key) else { continue };
            // Keep the newest version at or below the floor, and all after it.
            let keep_from = h.0.partition_point(|v| v.revision() <= floor).saturating_sub(1);
            self.bytes -= h.0.drain(..keep_from).map(|v| v.bytes()).sum::<usize>();
            if matches!(h.0.as_slice(), [Version::Gone(rev)] if *rev <= floor) {
                self.bytes -= Version::Gone(0).bytes() + KEY_OVERHEAD + key.len();
                self.keys.remove(&key);
            }
        }
    }

    /// Answers a range over keys of this part as etcd would at the same revision,
    /// or says why it cannot. The request must have passed etcd's checks
    /// (`ops::validate`).
    pub fn range(&self, req: &RangeRequest) -> Answer {
        if !self.loaded {
            return Answer::Forward(Why::NotLoaded);
        }
        let rev = if req.revision <= 0 { self.applied } else { req.revision };
        if rev > self.applied {
            return Answer::Forward(Why::AfterApplied);
        }
        if rev < self.floor {
            return Answer::Forward(Why::BeforeWindow);
        }
        let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
        if target != SortTarget::Key {
            return Answer::Forward(Why::Sort);
        }
        Answer::Served(self.range_at(req, rev))
    }

    /// etcd's `applyRange`: the live keys at `rev` in order (all of them when the
    /// answer is sorted or filtered, else `limit + 1`), the revision filters, the
    /// order, then `limit` and `more`. `count` is every live key in the range.
    fn range_at(&self, req: &RangeRequest, rev: i64) -> RangeResponse {
        let live = self.scan(&req.key, &req.range_end).filter_map(|h| h.at(rev));
        let filtered = req.min_mod_revision != 0
            || req.max_mod_revision != 0
            || req.min_create_revision != 0
            || req.max_create_revision != 0;
        let descend = SortOrder::try_from(req.sort_order) == Ok(SortOrder::Descend);
        let mut resp = RangeResponse::default();
        if req.count_only {
            resp.count = live.count() as i64;
            return resp;
        }
        let fetch_all = filtered || descend || req.limit <= 0;
        let mut count = 0i64;
        let mut kvs = Vec::new();
        for kv in live {
            count += 1;
            if fetch_all || (kvs.len() as i64) <= req.limit {
                kvs.push(kv);
            }
        }
        let mut kvs: Vec<KeyValue> = kvs.into_iter().filter(|kv| keep(req, kv)).cloned().collect();
        if descend {
            kvs.reverse();
        }
        if req.limit > 0 && kvs.len() as i64 > req.limit {
            kvs.truncate(req.limit as usize);
            resp.more = true;
        }
        if req.keys_only {
            for kv in &mut kvs {
                kv.value = Bytes::new();
            }
        }
        resp.count = count;
        resp.kvs = kvs;
        resp
    }

    /// Histories of the keys in etcd's range `[key, range_end)`: one key when
    /// `range_end` is empty, every key from `key` on when it is `"\0"`.
    fn scan<'a>(&'a self, key: &[u8], range_end: &[u8]) -> Box<dyn Iterator<Item = &'a History> + 'a> {
        let start = Bound::Included(key);
        match range_end {
            [] => Box::new(self.keys.get(key).into_iter()),
            [0] => Box::new(self.keys.range::<[u8], _>((start, Bound::Unbounded)).map(|(_, h)| h)),
            end if end <= key => Box::new(std::iter::empty()),
            end => Box::new(self.keys.range::<[u8], _>((start, Bound::Excluded(end))).map(|(_, h)| h)),
        }
    }
}

/// etcd's revision filters (`pruneKVs`): whether `kv` stays in the answer.
fn keep(req: &RangeRequest, kv: &KeyValue) -> bool {
    !((req.max_mod_revision != 0 && kv.mod_revision > req.max_mod_revision)
        || (req.min_mod_revision != 0 && kv.mod_revision < req.min_mod_revision)
        || (req.max_create_revision != 0 && kv.create_revision > req.max_create_revision)
        || (req.min_create_revision != 0 && kv.create_revision < req.min_create_revision))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, create: i64, rev: i64, version: i64) -> KeyValue {
        KeyValue {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
            create_revision: create,
            mod_revision: rev,
            version,
            lease: 0,
        }
    }

    fn put(kv: KeyValue) -> Event {
        Event { r#type: EventType::Put as i32, kv: Some(kv), prev_kv: None }
    }

    fn del(key: &str, rev: i64) -> Event {
        let kv = KeyValue { key: Bytes::copy_from_slice(key.as_bytes()), mod_revision: rev, ..Default::default() };
        Event { r#type: EventType::Delete as i32, kv: Some(kv), prev_kv: None }
    }

    fn range(key: &str, end: &str) -> RangeRequest {
        RangeRequest {
            key: Bytes::copy_from_slice(key.as_bytes()),
            range_end: Bytes::copy_from_slice(end.as_bytes()),
            ..Default::default()
        }
    }

    fn keys(a: Answer) -> Vec<String> {
        match a {
            Answer::Served(r) => r.kvs.iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()).collect(),
            Answer::Forward(w) => panic!("forwarded: {w:?}"),
        }
    }

    #[test]
    fn history_inside_the_window_and_forgetting_below_it() {
        let mut s = Store::new();
        assert_eq!(s.range(&range("a", "z")), Answer::Forward(Why::NotLoaded));
        s.load(10, [kv("a", "1", 5, 5, 1), kv("b", "1", 6, 6, 1)]);
        assert!(s.apply(11, &[put(kv("a", "2", 5, 11, 2)), put(kv("c", "1", 11, 11, 1))]));
        assert!(s.apply(12, &[del("b", 12)]));
        assert!(!s.apply(12, &[del("a", 12)]), "a revision already applied is ignored");
        assert_eq!(keys(s.range(&range("a", "z"))), ["a", "c"]);
        let at = |rev| RangeRequest { revision: rev, ..range("a", "z") };
        assert_eq!(keys(s.range(&at(10))), ["a", "b"]);
        assert_eq!(keys(s.range(&at(11))), ["a", "b", "c"]);
        assert_eq!(s.range(&at(9)), Answer::Forward(Why::BeforeWindow));
        assert_eq!(s.range(&at(13)), Answer::Forward(Why::AfterApplied));
        s.advance(13);
        assert_eq!(keys(s.range(&at(13))), ["a", "c"]);

        let before = s.bytes();
        s.raise_floor(12);
        assert!(s.bytes() < before, "old versions freed");
        assert_eq!(s.len(), 2, "b, deleted at the floor, is forgotten");
        assert_eq!(s.range(&at(11)), Answer::Forward(Why::BeforeWindow));
        assert_eq!(keys(s.range(&at(12))), ["a", "c"]);
        s.raise_floor(13);
        s.raise_floor(100);
        assert_eq!(s.floor(), 13, "the floor never passes what is applied");
        s.raise_floor(13);
        assert_eq!(keys(s.range(&range("a", "\0"))), ["a", "c"]);
        assert_eq!(keys(s.range(&range("c", ""))), ["c"]);
        assert_eq!(keys(s.range(&range("c", "a"))), Vec::<String>::new());
        let accounted: usize =
            s.keys.iter().map(|(k, h)| KEY_OVERHEAD + k.len() + h.0.iter().map(Version::bytes).sum::<usize>()).sum();
        assert_eq!(s.bytes(), accounted, "byte accounting matches what is held");
    }

    #[test]
    fn limits_filters_and_order_as_etcd_applies_them() {
        let mut s = Store::new();
        s.load(4, [kv("a", "x", 2, 2, 1), kv("b", "y", 3, 3, 1), kv("c", "z", 4, 4, 1)]);
        let r = |f: fn(&mut RangeRequest)| {
            let mut req = range("a", "\0");
            f(&mut req);
            match s.range(&req) {
                Answer::Served(r) => r,
                Answer::Forward(w) => panic!("{w:?}"),
            }
        };
        let limited = r(|q| q.limit = 2);
        assert_eq!((limited.kvs.len(), limited.count, limited.more), (2, 3, true));
        let desc = r(|q| {
            q.limit = 2;
            q.sort_order = SortOrder::Descend as i32;
        });
        assert_eq!(desc.kvs.iter().map(|k| k.key.clone()).collect::<Vec<_>>(), ["c", "b"]);
        let filtered = r(|q| {
            q.min_mod_revision = 3;
            q.limit = 1;
        });
        assert_eq!((filtered.kvs[0].key.as_ref(), filtered.count, filtered.more), (&b"b"[..], 3, true));
        let counted = r(|q| q.count_only = true);
        assert_eq!((counted.kvs.len(), counted.count, counted.more), (0, 3, false));
        let bare = r(|q| q.keys_only = true);
        assert!(bare.kvs.iter().all(|kv| kv.value.is_empty()));
        let mut by_value = range("a", "\0");
        by_value.sort_target = SortTarget::Value as i32;
        assert_eq!(s.range(&by_value), Answer::Forward(Why::Sort));
    }
}
