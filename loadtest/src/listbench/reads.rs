//! The load of listbench: readers (paged LISTs, GETs, LISTs at an exact revision),
//! the writer, and the check every answer goes through.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcdmux::pb::etcdserverpb::{
    compare, kv_client::KvClient, request_op, response_op, Compare, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use etcdmux::pb::mvccpb::KeyValue;
use etcdmux_loadtest::{b, chain, prefix_end, value, Error, Rng};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use super::{Shape, Target};

/// What readers and the writer saw.
#[derive(Default)]
pub struct Tally {
    pub list: Vec<Duration>,
    pub get: Vec<Duration>,
    pub exact: Vec<Duration>,
    pub errors: u64,
    pub stale: u64,
    /// The first few failures, for the report.
    pub failures: Vec<String>,
    pub writes: u64,
    pub conflicts: u64,
    pub read_backs: u64,
}

impl Tally {
    pub fn merge(&mut self, o: Tally) {
        self.list.extend(o.list);
        self.get.extend(o.get);
        self.exact.extend(o.exact);
        (self.errors, self.stale) = (self.errors + o.errors, self.stale + o.stale);
        (self.writes, self.conflicts, self.read_backs) =
            (self.writes + o.writes, self.conflicts + o.conflicts, self.read_backs + o.read_backs);
        let room = 10usize.saturating_sub(self.failures.len());
        self.failures.extend(o.failures.into_iter().take(room));
    }

    pub fn error(&mut self, what: String) {
        self.errors += 1;
        if self.failures.len() < 10 {
            self.failures.push(what);
        }
    }

    pub fn stale(&mut self, what: String) {
        self.stale += 1;
        if self.failures.len() < 10 {
            self.failures.push(what);
        }
    }

    pub fn reads(&self) -> usize {
        self.list.len() + self.get.len() + self.exact.len()
    }
}

/// Why a read's answer is wrong: `want` keys expected; `before[o]` is the revision of
/// the newest write to object `o` that finished before the read began (0: none
/// known), `at` the revision read at; `exact` when that revision was asked for (older
/// writes than `before` are not known then: only writes at or below `at` are checked).
fn check_read(kvs: &[KeyValue], want: usize, before: &[i64], at: i64, exact: bool) -> Option<String> {
    if kvs.len() != want {
        return Some(format!("{} keys at revision {at}, want {want}", kvs.len()));
    }
    for kv in kvs {
        let key = String::from_utf8_lossy(&kv.key);
        let Some(o) = key.rsplit_once("/obj").and_then(|(_, o)| o.parse::<usize>().ok()).filter(|&o| o < before.len())
        else {
            return Some(format!("unexpected key {key}"));
        };
        let done = before[o];
        if kv.mod_revision > at {
            return Some(format!("{key} at mod_revision {} in a read at revision {at}", kv.mod_revision));
        }
        if !exact && done > at {
            return Some(format!("read at revision {at}, before a write to {key} at {done} that had finished"));
        }
        if done <= at && kv.mod_revision < done {
            return Some(format!("{key} at mod_revision {}, a finished write made it {done}", kv.mod_revision));
        }
    }
    None
}

/// A paged list of `prefix`, as the apiserver does it: `limit` per page, each page
/// from the last key + "\0", later pages at the first page's revision (`rev` > 0:
/// every page at `rev`). Returns the keys and the revision read at.
async fn list(kv: &mut KvClient<Channel>, prefix: &str, limit: i64, rev: i64) -> Result<(Vec<KeyValue>, i64), Error> {
    let (mut from, end) = (b(prefix), prefix_end(prefix));
    let mut at = rev;
    let mut out = Vec::new();
    loop {
        let req = RangeRequest { key: from, range_end: end.clone(), limit, revision: at, ..Default::default() };
        let page = kv.range(req).await?.into_inner();
        if at == 0 {
            at = page.header.map_or(0, |h| h.revision);
        }
        let next = page.kvs.last().map(|kv| Bytes::from([&kv.key[..], b"\0"].concat()));
        out.extend(page.kvs);
        match next {
            Some(k) if page.more => from = k,
            _ => return Ok((out, at)),
        }
    }
}

/// What readers and the writer share.
pub struct Ctx {
    pub target: Target,
    pub shape: Shape,
    pub chans: Vec<Channel>,
    /// Per object: the revision of its newest write that etcd answered.
    pub known: Arc<Vec<AtomicI64>>,
    /// The newest revision a read was answered at.
    pub newest: AtomicI64,
    pub page_limit: i64,
    pub exact_lag: i64,
    /// Each reader's period when the rate is fixed (`None`: closed loop).
    pub pace: Option<Duration>,
    /// The revision the data was complete at: exact-revision lists read after it.
    pub loaded_at: i64,
    pub weights: [usize; 3],
    pub stop: Instant,
}

impl Ctx {
    fn kv(&self, rng: &mut Rng) -> KvClient<Channel> {
        KvClient::new(self.chans[rng.below(self.chans.len())].clone())
    }
}

pub async fn reader(ctx: Arc<Ctx>, mut rng: Rng, offset: Duration) -> Tally {
    let (mut t, s) = (Tally::default(), ctx.shape);
    let [lw, gw, ew] = ctx.weights;
    let mut turns = ctx.pace.map(|p| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + offset, p);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        i
    });
    loop {
        if let Some(turns) = &mut turns {
            turns.tick().await;
        }
        if Instant::now() >= ctx.stop {
            break;
        }
        let mut kv = ctx.kv(&mut rng);
        let (p, r, pick) = (rng.below(s.projects), rng.below(s.resources), rng.below(lw + gw + ew));
        let before: Vec<i64> = (0..s.objects).map(|o| ctx.known[s.index(p, r, o)].load(Ordering::Acquire)).collect();
        let prefix = ctx.target.prefix(p, r);
        let started = Instant::now();
        if pick < gw {
            let o = rng.below(s.objects);
            let key = ctx.target.key(p, r, o);
            match kv.range(RangeRequest { key: b(&key), ..Default::default() }).await {
                Ok(resp) => {
                    t.get.push(started.elapsed());
                    let resp = resp.into_inner();
                    let at = resp.header.map_or(0, |h| h.revision);
                    ctx.newest.fetch_max(at, Ordering::Relaxed);
                    if let Some(why) = check_read(&resp.kvs, 1, &before, at, false) {
                        t.stale(format!("GET {key}: {why}"));
                    }
                }
                Err(e) => t.error(format!("GET {key}: {e}")),
            }
        } else {
            let exact = pick >= gw + lw;
            let rev = if exact {
                (ctx.newest.load(Ordering::Relaxed) - rng.below(ctx.exact_lag as usize + 1) as i64).max(ctx.loaded_at)
            } else {
                0
            };
            match list(&mut kv, &prefix, ctx.page_limit, rev).await {
                Ok((kvs, at)) => {
                    let took = started.elapsed();
                    if exact {
                        t.exact.push(took);
                    } else {
                        t.list.push(took);
                        ctx.newest.fetch_max(at, Ordering::Relaxed);
                    }
                    if let Some(why) = check_read(&kvs, s.objects, &before, at, exact) {
                        t.stale(format!("LIST {prefix} (revision {rev}): {why}"));
                    }
                }
                Err(e) => t.error(format!("LIST {prefix} (revision {rev}): {}", chain(&*e))),
            }
        }
    }
    t
}

/// Updates random objects at `rate` per second until `ctx.stop` (the apiserver's
/// optimistic txn), then reads each one back through the same target: it must see
/// the write.
pub async fn writer(ctx: Arc<Ctx>, rate: u64, mut rng: Rng) -> Tally {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
    let mut set = JoinSet::new();
    while Instant::now() < ctx.stop {
        tick.tick().await;
        let s = ctx.shape;
        let (p, r, o) = (rng.below(s.projects), rng.below(s.resources), rng.below(s.objects));
        let (i, key, mut kv) = (s.index(p, r, o), b(&ctx.target.key(p, r, o)), ctx.kv(&mut rng));
        let (ctx, tally) = (ctx.clone(), tally.clone());
        while set.len() >= 64 {
            set.join_next().await;
        }
        set.spawn(async move {
            let rev = ctx.known[i].load(Ordering::Acquire);
            let txn = TxnRequest {
                compare: vec![Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Mod as i32,
                    key: key.clone(),
                    target_union: Some(compare::TargetUnion::ModRevision(rev)),
                    ..Default::default()
                }],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key.clone(),
                        value: value(rev as u64, s.value_bytes),
                        ..Default::default()
                    })),
                }],
                failure: vec![RequestOp {
                    request: Some(request_op::Request::RequestRange(RangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    })),
                }],
            };
            let name = String::from_utf8_lossy(&key).into_owned();
            let done = match kv.txn(txn).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    let current = match resp.responses.first().and_then(|r| r.response.as_ref()) {
                        Some(response_op::Response::ResponseRange(rr)) => {
                            rr.kvs.first().map_or(0, |kv| kv.mod_revision)
                        }
                        _ => resp.header.map_or(0, |h| h.revision),
                    };
                    ctx.known[i].fetch_max(current, Ordering::AcqRel);
                    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                    t.writes += 1;
                    t.conflicts += u64::from(!resp.succeeded);
                    current
                }
                Err(e) => {
                    tally.lock().unwrap_or_else(|e| e.into_inner()).error(format!("write {name}: {e}"));
                    return;
                }
            };
            let read = kv.range(RangeRequest { key: key.clone(), ..Default::default() }).await;
            let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
            t.read_backs += 1;
            match read {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    let at = resp.header.map_or(0, |h| h.revision);
                    let mut before = vec![0; s.objects];
                    before[o] = done;
                    if let Some(why) = check_read(&resp.kvs, 1, &before, at, false) {
                        t.stale(format!("read-back of {name}: {why}"));
                    }
                }
                Err(e) => t.error(format!("read-back of {name}: {e}")),
            }
        });
    }
    while set.join_next().await.is_some() {}
    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(o: usize, rev: i64) -> KeyValue {
        KeyValue { key: b(&Target::Mux.key(3, 1, o)), mod_revision: rev, ..Default::default() }
    }

    #[test]
    fn a_read_that_holds_every_finished_write_passes() {
        assert_eq!(check_read(&[kv(0, 5), kv(1, 9)], 2, &[5, 7], 10, false), None);
        assert_eq!(check_read(&[kv(1, 9)], 1, &[0, 9], 9, false), None, "a GET of one object");
    }

    #[test]
    fn a_read_missing_a_finished_write_is_stale() {
        let stale = check_read(&[kv(0, 5), kv(1, 6)], 2, &[5, 7], 10, false);
        assert!(stale.is_some_and(|s| s.contains("a finished write made it 7")));
        let behind = check_read(&[kv(0, 5), kv(1, 6)], 2, &[5, 7], 6, false);
        assert!(behind.is_some_and(|s| s.contains("before a write")), "read at a revision older than a finished write");
    }

    #[test]
    fn lists_must_hold_every_object_at_or_below_their_revision() {
        assert!(check_read(&[kv(0, 5)], 2, &[5, 5], 10, false).is_some_and(|s| s.contains("want 2")));
        assert!(check_read(&[kv(0, 5), kv(1, 12)], 2, &[0, 0], 10, true).is_some_and(|s| s.contains("mod_revision 12")));
        let other = KeyValue { key: b("/projects/p3/res1/default/x"), ..Default::default() };
        assert!(check_read(&[other], 1, &[0], 10, false).is_some_and(|s| s.contains("unexpected key")));
    }

    #[test]
    fn exact_reads_check_only_writes_at_or_below_their_revision() {
        assert_eq!(check_read(&[kv(0, 5), kv(1, 6)], 2, &[5, 20], 10, true), None, "a write after the revision");
        assert!(check_read(&[kv(0, 5), kv(1, 6)], 2, &[5, 8], 10, true).is_some(), "a write before it");
    }
}
