//! The load of one cell: the clients, each sending its requests back to back (or
//! paced), and what they saw.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcdmux::pb::etcdserverpb::{
    compare, kv_client::KvClient, request_op, response_op, Compare, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use etcdmux::upstream::body::WholeBody;
use etcdmux_loadtest::{chain, Rng};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use super::{Op, OPS};

/// What the clients of one cell saw.
#[derive(Default)]
pub struct Tally {
    /// Latencies of the requests answered inside the window, per [`Op`].
    pub lat: [Vec<Duration>; 3],
    pub errors: u64,
    pub conflicts: u64,
    pub failures: Vec<String>,
}

impl Tally {
    pub fn merge(&mut self, o: Tally) {
        for (mine, theirs) in self.lat.iter_mut().zip(o.lat) {
            mine.extend(theirs);
        }
        (self.errors, self.conflicts) = (self.errors + o.errors, self.conflicts + o.conflicts);
        let room = 5usize.saturating_sub(self.failures.len());
        self.failures.extend(o.failures.into_iter().take(room));
    }

    pub fn ops(&self) -> usize {
        self.lat.iter().map(Vec::len).sum()
    }

    /// Every latency, sorted.
    pub fn all(&self) -> Vec<Duration> {
        let mut v: Vec<Duration> = self.lat.iter().flatten().copied().collect();
        v.sort();
        v
    }
}

/// What every client of a cell shares.
pub struct Ctx {
    pub chans: Vec<Channel>,
    pub keys: Vec<Bytes>,
    /// The mod revision each key was last written at, as its writer saw it.
    pub revs: Arc<Vec<AtomicI64>>,
    pub value: Bytes,
    pub clients: usize,
    /// Cumulative weights of range, put, txn.
    pub mix: [usize; 3],
    pub timeout: Option<Duration>,
    /// Each client's interval between requests (`--rate`); `None`: back to back.
    pub pace: Option<Duration>,
    pub stop: Instant,
}

impl Ctx {
    /// A request with the configured deadline.
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = self.timeout {
            r.set_timeout(t);
        }
        r
    }

    fn pick(&self, rng: &mut Rng) -> Op {
        let n = rng.below(self.mix[2]);
        OPS.into_iter().zip(self.mix).find(|(_, w)| n < *w).map_or(Op::Range, |(op, _)| op)
    }
}

pub fn key(p: usize, r: usize, o: usize) -> String {
    format!("/projects/p{p}/res{r}/default/obj{o}")
}

pub fn put_req(key: &Bytes, value: &Bytes) -> PutRequest {
    PutRequest { key: key.clone(), value: value.clone(), ..Default::default() }
}

/// The apiserver's update of `key` last seen at `rev`.
fn update_txn(key: &Bytes, value: &Bytes, rev: i64) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Mod as i32,
            key: key.clone(),
            target_union: Some(compare::TargetUnion::ModRevision(rev)),
            ..Default::default()
        }],
        success: vec![RequestOp { request: Some(request_op::Request::RequestPut(put_req(key, value))) }],
        failure: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest { key: key.clone(), ..Default::default() })),
        }],
    }
}

/// One client: requests back to back until the window closes.
async fn client(ctx: Arc<Ctx>, c: usize, mut rng: Rng) -> Tally {
    let mut t = Tally::default();
    // Each request in two HTTP/2 frames, as Go's gRPC clients (the apiserver's) send
    // them; tonic alone adds an empty frame to end every request.
    let mut kv = KvClient::new(WholeBody::new(ctx.chans[c % ctx.chans.len()].clone()));
    let own: Vec<usize> = (c..ctx.keys.len()).step_by(ctx.clients).collect();
    // Paced clients take turns evenly spread over the interval; a late one skips the
    // turns it missed.
    let mut turns = ctx.pace.map(|p| {
        let offset = p * c as u32 / ctx.clients as u32;
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + offset, p);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        i
    });
    loop {
        if let Some(t) = &mut turns {
            t.tick().await;
        }
        let op = ctx.pick(&mut rng);
        let i = match op {
            Op::Range => rng.below(ctx.keys.len()),
            Op::Put | Op::Txn => own[rng.below(own.len())],
        };
        let k = &ctx.keys[i];
        let started = Instant::now();
        if started >= ctx.stop {
            break;
        }
        let out: Result<(), tonic::Status> = match op {
            Op::Range => kv.range(ctx.req(RangeRequest { key: k.clone(), ..Default::default() })).await.map(drop),
            Op::Put => kv.put(ctx.req(put_req(k, &ctx.value))).await.map(|r| {
                ctx.revs[i].store(r.into_inner().header.map_or(0, |h| h.revision), Ordering::Relaxed);
            }),
            Op::Txn => {
                let rev = ctx.revs[i].load(Ordering::Relaxed);
                kv.txn(ctx.req(update_txn(k, &ctx.value, rev))).await.map(|r| {
                    let r = r.into_inner();
                    let now = if r.succeeded {
                        r.header.map_or(0, |h| h.revision)
                    } else {
                        t.conflicts += 1;
                        match r.responses.first().and_then(|x| x.response.as_ref()) {
                            Some(response_op::Response::ResponseRange(rr)) => {
                                rr.kvs.first().map_or(0, |kv| kv.mod_revision)
                            }
                            _ => 0,
                        }
                    };
                    ctx.revs[i].store(now, Ordering::Relaxed);
                })
            }
        };
        let done = Instant::now();
        if done > ctx.stop {
            break;
        }
        match out {
            Ok(()) => t.lat[op as usize].push(done - started),
            Err(e) => {
                t.errors += 1;
                if t.failures.len() < 5 {
                    t.failures.push(format!("{op:?}: {}", chain(&e)));
                }
                // A target that fails every request must not spin the cores.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    t
}

/// Every client, until `ctx.stop`.
pub async fn run_clients(ctx: Ctx, seed: u64) -> Tally {
    let ctx = Arc::new(ctx);
    let mut set = JoinSet::new();
    for c in 0..ctx.clients {
        set.spawn(client(ctx.clone(), c, Rng(seed ^ ((c as u64 + 1) << 24))));
    }
    let mut all = Tally::default();
    while let Some(t) = set.join_next().await {
        match t {
            Ok(t) => all.merge(t),
            Err(e) => {
                all.errors += 1;
                all.failures.push(format!("a client task failed: {e}"));
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcdmux_loadtest::b;

    fn ctx(mix: [usize; 3]) -> Ctx {
        Ctx {
            chans: Vec::new(),
            keys: Vec::new(),
            revs: Arc::default(),
            value: Bytes::new(),
            clients: 1,
            mix,
            timeout: None,
            pace: None,
            stop: Instant::now(),
        }
    }

    #[test]
    fn the_mix_follows_the_weights() {
        let mut rng = Rng(7);
        let mut seen = [0usize; 3];
        let c = ctx([2, 3, 6]); // range 2, put 1, txn 3
        for _ in 0..60_000 {
            seen[c.pick(&mut rng) as usize] += 1;
        }
        for (got, want) in seen.iter().zip([20_000, 10_000, 30_000]) {
            assert!(got.abs_diff(want) < 1_000, "{seen:?}");
        }
        let only_txn = ctx([0, 0, 1]);
        assert!((0..100).all(|_| only_txn.pick(&mut rng) == Op::Txn));
    }

    #[test]
    fn the_update_is_the_apiservers() {
        let t = update_txn(&b("/k"), &b("v"), 42);
        assert_eq!(t.compare[0].target_union, Some(compare::TargetUnion::ModRevision(42)));
        assert_eq!(t.compare[0].target, compare::CompareTarget::Mod as i32);
        assert!(matches!(t.success[0].request, Some(request_op::Request::RequestPut(_))));
        assert!(matches!(t.failure[0].request, Some(request_op::Request::RequestRange(_))));
    }
}
