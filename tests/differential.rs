//! Differential test: the same randomized sequence of KV operations is sent to
//! etcdmux (in front of etcd A, or on the SQL backend in a PostgreSQL) and straight
//! to etcd B, with the client keys used
//! as a plain prefix there. Root-index puts ride inside the same upstream txn, so
//! revisions stay in step and whole responses must be equal: kvs, count, more,
//! deleted, prev_kvs, txn branches, header revisions and error texts. Only the
//! cluster/member ids and raft term (different clusters) are cleared.
//!
//! Keys are chosen around the layout's edges: several resource roots, API groups,
//! `/pods` vs `/pods/` vs `/pods!`, `/`, keys without a leading `/` (static mode),
//! 0xff bytes. Ranges include single keys, prefixes, from-key, the whole tenant and
//! explicit pairs, so cross-root reads, deletes and txns are exercised.

mod common;

use common::{norm_header, norm_ops, show, Out, Store};

use bytes::Bytes;
use etcdmux::pb::etcdserverpb::{
    compare, kv_client::KvClient, request_op, CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

/// Tenant keys used by the workload (at most 12, so that etcd's own sort of ties is
/// its stable insertion sort, like ours).
const SLASH_KEYS: &[&[u8]] = &[
    b"/pods/ns/a",
    b"/pods/ns/b",
    b"/pods/other/c",
    b"/pods",
    b"/pods!x",
    b"/configmaps/ns/c",
    b"/apps.k8s.io/deployments/ns/d",
    b"/apps.k8s.io",
    b"/",
    b"//x",
    b"/pods/ns/\xff",
    b"/z.y/w",
];
const BARE_KEYS: &[&[u8]] = &[b"a", b"b/x", b"0", b"!", b"\xffz", b"/pods/ns/a", b"/pods", b"/", b"zz", b"a/"];

fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut e = p.to_vec();
    while let Some(last) = e.pop() {
        if last < 0xff {
            e.push(last + 1);
            return e;
        }
    }
    vec![0]
}

struct Gen {
    rng: StdRng,
    /// Client prefix of the tenant (`/projects/p` or empty).
    prefix: Vec<u8>,
    keys: &'static [&'static [u8]],
    rev: i64,
    admin: bool,
}

impl Gen {
    fn key(&mut self) -> Bytes {
        let k = self.keys[self.rng.random_range(0..self.keys.len())];
        Bytes::from([self.prefix.as_slice(), k].concat())
    }

    /// A `(key, range_end)` pair inside the tenant.
    fn range(&mut self) -> (Bytes, Bytes) {
        let k = self.key();
        match self.rng.random_range(0..6) {
            0 => (k, Bytes::new()),
            1 => {
                let cut = self.rng.random_range(self.prefix.len() + 1..=k.len());
                let p = k.slice(..cut);
                let e = Bytes::from(prefix_end(&p));
                (p, e)
            }
            2 => (k, Bytes::from_static(b"\0")),
            3 if !self.prefix.is_empty() => {
                let mut whole = self.prefix.clone();
                whole.push(b'/');
                let e = prefix_end(&whole);
                (Bytes::from(whole), Bytes::from(e))
            }
            3 => (Bytes::new(), Bytes::from_static(b"\0")),
            _ => {
                let a = self.key();
                let b = self.key();
                if a <= b {
                    (a, b)
                } else {
                    (b, a)
                }
            }
        }
    }

    fn range_req(&mut self) -> RangeRequest {
        let (key, range_end) = self.range();
        let mut r = RangeRequest { key, range_end, ..Default::default() };
        if self.rng.random_bool(0.4) {
            r.limit = self.rng.random_range(1..4);
        }
        if self.rng.random_bool(0.3) {
            r.sort_order = self.rng.random_range(0..3);
            r.sort_target = self.rng.random_range(0..5);
        }
        if self.rng.random_bool(0.15) && self.rev > 1 {
            r.revision = self.rng.random_range(1..=self.rev);
        }
        r.keys_only = self.rng.random_bool(0.15);
        r.count_only = self.rng.random_bool(0.1);
        if self.rng.random_bool(0.1) && self.rev > 1 {
            r.min_mod_revision = self.rng.random_range(1..=self.rev);
        }
        if self.rng.random_bool(0.1) && self.rev > 1 {
            r.max_create_revision = self.rng.random_range(1..=self.rev);
        }
        r
    }

    fn put_req(&mut self) -> PutRequest {
        PutRequest {
            key: self.key(),
            value: Bytes::from(format!("v{}", self.rng.random_range(0..5))),
            prev_kv: self.rng.random_bool(0.5),
            ..Default::default()
        }
    }

    fn delete_req(&mut self) -> DeleteRangeRequest {
        let (key, range_end) = self.range();
        DeleteRangeRequest { key, range_end, prev_kv: self.rng.random_bool(0.5) }
    }

    /// A delete inside a txn. Not from-key: etcd's duplicate-key check reads a
    /// `"\0"` range_end as an empty interval, so etcd accepts a txn that deletes
    /// from a key on and puts a key after it, while etcdmux's upstream txn (with a
    /// real end) is refused with etcd's duplicate-key error. README lists this.
    fn txn_delete_req(&mut self) -> DeleteRangeRequest {
        loop {
            let d = self.delete_req();
            if d.range_end.as_ref() != b"\0" {
                return d;
            }
        }
    }

    /// A compare over one key or a range inside one resource root.
    fn compare(&mut self) -> Compare {
        let key = self.key();
        let range_end = if self.rng.random_bool(0.25) && key.ends_with(b"/a") {
            Bytes::from(prefix_end(&key[..key.len() - 1]))
        } else {
            Bytes::new()
        };
        let key = if range_end.is_empty() { key } else { key.slice(..key.len() - 1) };
        let target = self.rng.random_range(0..4);
        let union = match target {
            0 => compare::TargetUnion::Version(self.rng.random_range(0..3)),
            1 => compare::TargetUnion::CreateRevision(self.rng.random_range(0..=self.rev + 1)),
            2 => compare::TargetUnion::ModRevision(self.rng.random_range(0..=self.rev + 1)),
            _ => compare::TargetUnion::Value(Bytes::from(format!("v{}", self.rng.random_range(0..5)))),
        };
        Compare { result: self.rng.random_range(0..4), target, key, range_end, target_union: Some(union) }
    }

    fn op(&mut self, depth: usize) -> RequestOp {
        use request_op::Request as R;
        let r = match self.rng.random_range(0..if depth < 1 { 4 } else { 3 }) {
            0 => R::RequestRange(self.range_req()),
            1 => R::RequestPut(self.put_req()),
            2 => R::RequestDeleteRange(self.txn_delete_req()),
            _ => R::RequestTxn(self.txn_req(depth + 1)),
        };
        RequestOp { request: Some(r) }
    }

    fn txn_req(&mut self, depth: usize) -> TxnRequest {
        let nc = self.rng.random_range(0..3);
        let ns = self.rng.random_range(0..4);
        let nf = self.rng.random_range(0..3);
        TxnRequest {
            compare: (0..nc).map(|_| self.compare()).collect(),
            success: (0..ns).map(|_| self.op(depth)).collect(),
            failure: (0..nf).map(|_| self.op(depth)).collect(),
        }
    }
}

async fn apply(c: &mut KvClient<Channel>, op: &request_op::Request) -> Out {
    use request_op::Request as R;
    match op.clone() {
        R::RequestRange(r) => show(c.range(r).await, |v| norm_header(&mut v.header)),
        R::RequestPut(r) => show(c.put(r).await, |v| norm_header(&mut v.header)),
        R::RequestDeleteRange(r) => show(c.delete_range(r).await, |v| norm_header(&mut v.header)),
        R::RequestTxn(r) => show(c.txn(r).await, |v| {
            norm_header(&mut v.header);
            norm_ops(&mut v.responses);
        }),
    }
}

async fn run(mux_toml: &str, prefix: &[u8], keys: &'static [&'static [u8]], seed: u64, steps: usize, admin: bool) {
    run_on(Store::Etcd, mux_toml, prefix, keys, seed, steps, admin).await
}

async fn run_on(
    store: Store,
    mux_toml: &str,
    prefix: &[u8],
    keys: &'static [&'static [u8]],
    seed: u64,
    steps: usize,
    admin: bool,
) {
    common::init_tracing();
    let (mux, behind) = common::start_on(store, mux_toml).await;
    let etcd_b = common::Etcd::start();
    let mut via_mux = KvClient::connect(mux.url.clone()).await.expect("connect etcdmux");
    let mut direct = KvClient::connect(etcd_b.client_url.clone()).await.expect("connect etcd");
    let mut g = Gen { rng: StdRng::seed_from_u64(seed), prefix: prefix.to_vec(), keys, rev: 1, admin };
    for step in 0..steps {
        let op = match g.rng.random_range(0..100) {
            0..=29 => request_op::Request::RequestPut(g.put_req()),
            30..=59 => request_op::Request::RequestRange(g.range_req()),
            60..=71 => request_op::Request::RequestDeleteRange(g.delete_req()),
            72..=97 => request_op::Request::RequestTxn(g.txn_req(0)),
            _ if g.admin && g.rev > 3 => {
                let rev = g.rng.random_range(1..g.rev);
                let req = CompactionRequest { revision: rev, physical: false };
                let a = show(via_mux.compact(req).await, |v| norm_header(&mut v.header));
                let b = show(direct.compact(req).await, |v| norm_header(&mut v.header));
                assert_eq!(a, b, "seed {seed} step {step}: compact {rev}");
                continue;
            }
            _ => continue,
        };
        let a = apply(&mut via_mux, &op).await;
        let b = apply(&mut direct, &op).await;
        assert_eq!(a, b, "seed {seed} step {step}: {op:?}");
        // Track the store revision for revision-bearing requests.
        if let Ok(r) = direct.range(RangeRequest { key: Bytes::from_static(b"\0"), ..Default::default() }).await {
            if let Some(h) = r.into_inner().header {
                g.rev = h.revision;
            }
        }
    }
    // Tenant-closed upstream: the store holds only layout and index keys.
    let stored: Vec<Vec<u8>> = match &behind {
        common::StoreGuard::Etcd(etcd_a) => {
            let mut raw = KvClient::connect(etcd_a.client_url.clone()).await.expect("connect etcd A");
            let all = raw
                .range(RangeRequest {
                    key: Bytes::from_static(b"\0"),
                    range_end: Bytes::from_static(b"\0"),
                    keys_only: true,
                    ..Default::default()
                })
                .await
                .expect("raw range")
                .into_inner();
            all.kvs.into_iter().map(|kv| kv.key.to_vec()).collect()
        }
        common::StoreGuard::Sql(pg) => pg
            .psql("SELECT DISTINCT encode(key, 'hex') FROM etcdmux_kv")
            .lines()
            .map(|h| (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex")).collect())
            .collect(),
    };
    assert!(!stored.is_empty(), "the workload stored nothing");
    for key in stored {
        assert!(
            key.starts_with(b"/registry/") || key.starts_with(b"/etcdmux/"),
            "unexpected upstream key {:?}",
            String::from_utf8_lossy(&key)
        );
    }
}

/// Ranges answered by the replica so far, in this test process.
fn cache_hits() -> f64 {
    let handle = etcdmux::metrics::install().expect("metrics recorder");
    common::sum_metric(&handle.render(), "etcdmux_cache_hits_total").unwrap_or(0.0)
}

/// Seeds to run: `ETCDMUX_DIFF_SEEDS=N` runs N seeds (for `make soak`); CI runs a few.
fn seeds(base: u64, default: u64) -> impl Iterator<Item = u64> {
    let n = std::env::var("ETCDMUX_DIFF_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    base..base + n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn milo_rules_match_direct_etcd() {
    for seed in seeds(1, 3) {
        run(&common::without_cache(common::MILO_TOML), b"/projects/p", SLASH_KEYS, seed, 250, true).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_tenant_matches_direct_etcd() {
    for seed in seeds(1001, 2) {
        run(&common::without_cache(&common::static_toml("tenant-a")), b"", BARE_KEYS, seed, 250, false).await;
    }
}

/// The SQL backend answers as etcd does, response for response (header revisions
/// and error texts included), in both layouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_sql_backend_milo_rules_match_direct_etcd() {
    for seed in seeds(4001, 3) {
        run_on(Store::Sql, common::MILO_TOML, b"/projects/p", SLASH_KEYS, seed, 250, true).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_sql_backend_static_tenant_matches_direct_etcd() {
    for seed in seeds(5001, 2) {
        run_on(Store::Sql, &common::static_toml("tenant-a"), b"", BARE_KEYS, seed, 250, false).await;
    }
}

/// Both layouts again with the replica on: every range etcdmux answers from it must
/// be etcd's answer (one test, so that the hit counts are this test's alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_read_replica_etcdmux_matches_direct_etcd() {
    let before = cache_hits();
    for seed in seeds(2001, 3) {
        run(&common::compared_with_etcd(common::MILO_TOML), b"/projects/p", SLASH_KEYS, seed, 250, true).await;
    }
    let milo = cache_hits() - before;
    assert!(milo > 100.0, "ranges were answered by the replica ({milo})");
    for seed in seeds(3001, 2) {
        run(&common::compared_with_etcd(&common::static_toml("tenant-a")), b"", BARE_KEYS, seed, 250, false).await;
    }
    let bare = cache_hits() - before - milo;
    assert!(bare > 50.0, "ranges were answered by the replica ({bare})");
}
