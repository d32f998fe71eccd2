//! A hostile tenant cannot crash, flood or confuse the shared etcd through KV and
//! Txn: every field of every KV request is checked before anything goes upstream,
//! keys never alias across listener kinds, cross-root reads in a txn stay within
//! etcd's op limit, txn nesting stays within what etcdmux can decode, huge limits do
//! not overflow, and leases stay with their owner on every kind of key.

mod common;

use common::{norm_header, norm_ops, show, Out};

use bytes::Bytes;
use etcdmux::pb::etcdserverpb::{
    compare, kv_client::KvClient, request_op, response_op, CompactionRequest, Compare, DeleteRangeRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest, TxnResponse,
};
use tonic::transport::Channel;
use tonic::Code;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn kv(url: &str) -> KvClient<Channel> {
    KvClient::connect(url.to_string()).await.unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

async fn revision(c: &mut KvClient<Channel>) -> i64 {
    let r = c.range(RangeRequest { key: b("\0"), ..Default::default() }).await.expect("etcd answers");
    r.into_inner().header.expect("header").revision
}

#[derive(Clone, Debug)]
enum Call {
    Range(RangeRequest),
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactionRequest),
}

async fn call(c: &mut KvClient<Channel>, op: &Call) -> Out {
    match op.clone() {
        Call::Range(r) => show(c.range(r).await, |v| norm_header(&mut v.header)),
        Call::Put(r) => show(c.put(r).await, |v| norm_header(&mut v.header)),
        Call::Delete(r) => show(c.delete_range(r).await, |v| norm_header(&mut v.header)),
        Call::Compact(r) => show(c.compact(r).await, |v| norm_header(&mut v.header)),
        Call::Txn(r) => show(c.txn(r).await, |v| {
            norm_header(&mut v.header);
            norm_ops(&mut v.responses);
        }),
    }
}

fn range(key: &str, end: &str) -> RangeRequest {
    RangeRequest { key: b(key), range_end: b(end), ..Default::default() }
}

fn op(r: request_op::Request) -> RequestOp {
    RequestOp { request: Some(r) }
}

fn txn(success: Vec<request_op::Request>) -> TxnRequest {
    TxnRequest { success: success.into_iter().map(op).collect(), ..Default::default() }
}

use request_op::Request as R;

/// What etcd answers a request: its answer when etcd 3.4 survives the request
/// (compared with a second etcd), or the error etcd 3.6 gives where etcd 3.4 would
/// crash or has no check (never sent to etcd).
enum Want {
    SameAsEtcd,
    Etcd36(&'static str),
}

const SORT: &str = "etcdserver: invalid sort option";

fn cases() -> Vec<(&'static str, Call, Want)> {
    let one = || range("/projects/f/pods/", "/projects/f/pods0");
    let all = || range("/projects/f/", "/projects/f0");
    let sorted = |mut r: RangeRequest, order: i32, target: i32| {
        r.sort_order = order;
        r.sort_target = target;
        r
    };
    let with = |mut r: RangeRequest, f: fn(&mut RangeRequest)| {
        f(&mut r);
        r
    };
    let pw = |f: fn(&mut PutRequest)| {
        let mut r = PutRequest { key: b("/projects/f/pods/ns/a"), ..Default::default() };
        f(&mut r);
        r
    };
    let cmp = |result: i32, target: i32, union: Option<compare::TargetUnion>| TxnRequest {
        compare: vec![Compare {
            result,
            target,
            key: b("/projects/f/pods/ns/a"),
            range_end: Bytes::new(),
            target_union: union,
        }],
        success: vec![op(R::RequestRange(one()))],
        failure: vec![op(R::RequestRange(range("/projects/f/configmaps/ns/c", "")))],
    };
    use Want::*;
    vec![
        // Enums etcd 3.4 does not check: a bad sort target is a nil sorter there.
        ("sort target 99, one root", Call::Range(sorted(one(), 0, 99)), Etcd36(SORT)),
        ("ascend by target -7, one root", Call::Range(sorted(one(), 1, -7)), Etcd36(SORT)),
        ("sort target 99, across roots", Call::Range(sorted(all(), 0, 99)), Etcd36(SORT)),
        ("ascend by target -7, across roots", Call::Range(sorted(all(), 1, -7)), Etcd36(SORT)),
        ("sort order 7", Call::Range(sorted(one(), 7, 0)), Etcd36(SORT)),
        ("sort order -1", Call::Range(sorted(all(), -1, 1)), Etcd36(SORT)),
        ("txn range, sort target 99", Call::Txn(txn(vec![R::RequestRange(sorted(one(), 0, 99))])), Etcd36(SORT)),
        (
            "txn failure range across roots, target 5",
            Call::Txn(TxnRequest {
                failure: vec![op(R::RequestRange(sorted(all(), 2, 5)))],
                ..txn(vec![R::RequestRange(one())])
            }),
            Etcd36(SORT),
        ),
        (
            "nested txn range, order 3",
            Call::Txn(txn(vec![R::RequestTxn(txn(vec![R::RequestRange(sorted(one(), 3, 0))]))])),
            Etcd36(SORT),
        ),
        (
            "bad sort before an empty key in a later op",
            Call::Txn(txn(vec![
                R::RequestRange(sorted(one(), 0, 99)),
                R::RequestPut(PutRequest { key: Bytes::new(), ..Default::default() }),
            ])),
            Etcd36(SORT),
        ),
        // etcd checks the key first.
        ("empty key with a bad sort", Call::Range(sorted(range("", "\0"), 0, 99)), SameAsEtcd),
        (
            "empty key in an op before a bad sort",
            Call::Txn(txn(vec![R::RequestRange(range("", "")), R::RequestRange(sorted(one(), 0, 99))])),
            SameAsEtcd,
        ),
        // Ops and puts.
        (
            "txn op without a request",
            Call::Txn(TxnRequest { success: vec![RequestOp { request: None }], ..Default::default() }),
            SameAsEtcd,
        ),
        (
            "op without a request in a nested failure branch",
            Call::Txn(txn(vec![R::RequestTxn(TxnRequest {
                failure: vec![RequestOp { request: None }],
                ..Default::default()
            })])),
            SameAsEtcd,
        ),
        ("ignore_lease with a lease", Call::Put(pw(|r| (r.ignore_lease, r.lease) = (true, 0x1234))), SameAsEtcd),
        ("ignore_value with a value", Call::Put(pw(|r| (r.ignore_value, r.value) = (true, b("v")))), SameAsEtcd),
        (
            "txn put: ignore_lease, lease",
            Call::Txn(txn(vec![R::RequestPut(pw(|r| (r.ignore_lease, r.lease) = (true, 7)))])),
            SameAsEtcd,
        ),
        ("negative lease", Call::Put(pw(|r| r.lease = -5)), SameAsEtcd),
        (
            "empty delete key",
            Call::Delete(DeleteRangeRequest { key: Bytes::new(), range_end: b("\0"), prev_kv: true }),
            SameAsEtcd,
        ),
        // Numbers: negative, zero and extreme limits and revisions.
        ("negative limit, one root", Call::Range(with(one(), |r| r.limit = -3)), SameAsEtcd),
        ("negative limit, across roots", Call::Range(with(all(), |r| r.limit = -3)), SameAsEtcd),
        ("limit i64::MAX, one root", Call::Range(with(one(), |r| r.limit = i64::MAX)), SameAsEtcd),
        ("limit i64::MAX, across roots", Call::Range(with(all(), |r| r.limit = i64::MAX)), SameAsEtcd),
        (
            "limit i64::MAX, across roots, by mod descending",
            Call::Range(sorted(with(all(), |r| r.limit = i64::MAX), 2, 3)),
            SameAsEtcd,
        ),
        (
            "limit i64::MAX, across roots, by value, keys only",
            Call::Range(sorted(with(all(), |r| (r.limit, r.keys_only) = (i64::MAX, true)), 0, 4)),
            SameAsEtcd,
        ),
        (
            "limit i64::MAX across roots in a txn",
            Call::Txn(txn(vec![R::RequestRange(with(all(), |r| r.limit = i64::MAX))])),
            SameAsEtcd,
        ),
        ("negative revision, one root", Call::Range(with(one(), |r| r.revision = -1)), SameAsEtcd),
        ("negative revision, across roots", Call::Range(with(all(), |r| r.revision = -5)), SameAsEtcd),
        (
            "negative revision in a txn",
            Call::Txn(txn(vec![R::RequestRange(with(all(), |r| r.revision = -5))])),
            SameAsEtcd,
        ),
        ("revision -1 in a txn", Call::Txn(txn(vec![R::RequestRange(with(one(), |r| r.revision = -1))])), SameAsEtcd),
        (
            "negative revision filters across roots",
            Call::Range(with(all(), |r| (r.min_mod_revision, r.max_create_revision) = (-4, -1))),
            SameAsEtcd,
        ),
        ("min mod revision i64::MAX", Call::Range(with(all(), |r| r.min_mod_revision = i64::MAX)), SameAsEtcd),
        ("compact to revision -1", Call::Compact(CompactionRequest { revision: -1, physical: false }), SameAsEtcd),
        // Compare enums and target unions: etcd evaluates them, never refuses.
        ("compare result 9", Call::Txn(cmp(9, 2, Some(compare::TargetUnion::ModRevision(1)))), SameAsEtcd),
        ("compare target 9", Call::Txn(cmp(0, 9, Some(compare::TargetUnion::Version(1)))), SameAsEtcd),
        ("compare target -1, result -1", Call::Txn(cmp(-1, -1, None)), SameAsEtcd),
        ("compare MOD with a value union", Call::Txn(cmp(2, 2, Some(compare::TargetUnion::Value(b("x"))))), SameAsEtcd),
        ("compare VALUE without a union", Call::Txn(cmp(0, 3, None)), SameAsEtcd),
        (
            "compare LEASE with a version union",
            Call::Txn(cmp(0, 4, Some(compare::TargetUnion::Version(0)))),
            SameAsEtcd,
        ),
    ]
}

/// Every out-of-range field gets etcd's answer, and nothing reaches etcd that could
/// crash it or write anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_fields_get_etcds_answer() {
    common::init_tracing();
    let etcd = common::Etcd::start();
    let direct_etcd = common::Etcd::start();
    let mux = common::start_mux(&etcd, common::MILO_TOML).await;
    let mut m = kv(&mux.url).await;
    let mut d = kv(&direct_etcd.client_url).await;
    let mut raw = kv(&etcd.client_url).await;
    for (k, v) in
        [("pods/ns/a", "1"), ("pods/ns/b", "2"), ("configmaps/ns/c", "3"), ("secrets/ns/d", "4"), ("pods/ns/a", "5")]
    {
        let put = PutRequest { key: b(&format!("/projects/f/{k}")), value: b(v), ..Default::default() };
        m.put(put.clone()).await.unwrap();
        d.put(put).await.unwrap();
    }
    let before = revision(&mut raw).await;
    for (what, req, want) in cases() {
        let got = call(&mut m, &req).await;
        match want {
            Want::SameAsEtcd => assert_eq!(got, call(&mut d, &req).await, "{what}"),
            Want::Etcd36(text) => assert_eq!(got, Err((Code::InvalidArgument, text.to_string())), "{what}"),
        }
        // etcd is alive after every case, and nothing was written.
        assert_eq!(revision(&mut raw).await, before, "{what} wrote something (or etcd is down)");
    }
}

/// A static listener for tenant `a` and a key-path listener, on one etcdmux.
const STATIC_AND_KEY_PATH: &str = r#"
[[listener]]
addr = "127.0.0.1:0"
static_tenant = "a"

[[listener]]
addr = "127.0.0.1:0"

[tenancy]
rule = [ { prefix = "/projects/{tenant}/" } ]
global_keys = ["compact_rev_key"]
"#;

fn key_strs(kvs: &[etcdmux::pb::mvccpb::KeyValue]) -> Vec<String> {
    kvs.iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()).collect()
}

/// A key without a leading `/`, written on a static listener, has no client form on
/// a key-path listener (`/projects/a` + `b/pods/x` names tenant `ab`): key-path
/// reads, deletes, watches and lease answers never show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_keys_never_alias_across_listener_kinds() {
    let etcd = common::Etcd::start();
    let mux = common::start_mux(&etcd, STATIC_AND_KEY_PATH).await;
    let addrs = mux.running.as_ref().unwrap().addrs.clone();
    let (a_url, kp_url) = (format!("http://{}", addrs[0]), format!("http://{}", addrs[1]));
    let mut a = kv(&a_url).await;
    let mut kp = kv(&kp_url).await;
    let put = |k: &str, v: &str| PutRequest { key: b(k), value: b(v), ..Default::default() };
    a.put(put("b/pods/x", "a-bare")).await.unwrap();
    a.put(put("/pods/y", "a-slash")).await.unwrap();
    kp.put(put("/projects/ab/pods/x", "ab")).await.unwrap();

    // Every key a key-path range returns is inside the range and names tenant a.
    for (k, e) in [("/projects/a/", "/projects/a0"), ("/projects/a/", "\0"), ("/projects/a/pods/", "\0")] {
        let got = kp.range(range(k, e)).await.unwrap().into_inner();
        assert_eq!(key_strs(&got.kvs), vec!["/projects/a/pods/y"], "{k}..{e}");
        assert_eq!(got.count, 1, "{k}..{e}");
    }
    let ab = kp.range(range("/projects/ab/", "/projects/ab0")).await.unwrap().into_inner();
    assert_eq!(key_strs(&ab.kvs), vec!["/projects/ab/pods/x"]);
    assert_eq!(ab.kvs[0].value, b("ab"));

    // A watch over project a sees a's slash key, never the bare one.
    let mut w = common::client(&kp_url).await;
    let mut events = w.watch("/projects/a/", Some(etcd_client::WatchOptions::new().with_prefix())).await.unwrap();
    assert!(events.message().await.unwrap().expect("created").created());
    a.put(put("b/pods/w", "a-bare")).await.unwrap();
    a.put(put("/pods/w", "a-slash")).await.unwrap();
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let resp = events.message().await.unwrap().expect("watch stream open");
            if let Some(ev) = resp.events().first() {
                return ev.kv().expect("kv").key_str().unwrap().to_string();
            }
        }
    })
    .await
    .expect("an event within 10 s");
    assert_eq!(first, "/projects/a/pods/w");

    // Lease answers on the key-path listener show only keys with a client form.
    let mut ac = common::client(&a_url).await;
    let lease = ac.lease_grant(60, None).await.unwrap().id();
    a.put(PutRequest { key: b("b/pods/l"), lease, ..Default::default() }).await.unwrap();
    a.put(PutRequest { key: b("/pods/l"), lease, ..Default::default() }).await.unwrap();
    assert_eq!(lease_keys(&kp_url, lease).await, vec!["/projects/a/pods/l"]);

    // Deleting project ab deletes ab's key only; deleting project a on the key-path
    // listener deletes a's keys with a client form there.
    let del = DeleteRangeRequest { key: b("/projects/ab/"), range_end: b("/projects/ab0"), prev_kv: true };
    let del = kp.delete_range(del).await.unwrap().into_inner();
    assert_eq!((del.deleted, key_strs(&del.prev_kvs)), (1, vec!["/projects/ab/pods/x".to_string()]));
    let del = DeleteRangeRequest { key: b("/projects/a/"), range_end: b("/projects/a0"), prev_kv: true };
    let del = kp.delete_range(del).await.unwrap().into_inner();
    assert_eq!(key_strs(&del.prev_kvs), vec!["/projects/a/pods/l", "/projects/a/pods/w", "/projects/a/pods/y"]);
    let left = a.range(range("\0", "\0")).await.unwrap().into_inner();
    assert_eq!(key_strs(&left.kvs), vec!["b/pods/l", "b/pods/w", "b/pods/x"], "a's bare keys are a's alone");
}

/// Puts `n` keys of project `p`, one per resource root `r0`..`r{n-1}`, through
/// etcdmux and straight into a second etcd.
async fn roots(m: &mut KvClient<Channel>, d: &mut KvClient<Channel>, p: &str, from: usize, to: usize) {
    for i in from..to {
        let put = PutRequest {
            key: b(&format!("/projects/{p}/r{i:03}/ns/k")),
            value: b(&format!("v{}", i % 7)),
            ..Default::default()
        };
        m.put(put.clone()).await.unwrap();
        d.put(put).await.unwrap();
    }
}

/// A txn with a few ranges over a tenant with many resource roots runs like in
/// etcd, atomically, however many upstream ops its ranges need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_ranges_over_many_roots() {
    let etcd = common::Etcd::start();
    let direct_etcd = common::Etcd::start();
    let mux = common::start_mux(&etcd, common::MILO_TOML).await;
    let mut m = kv(&mux.url).await;
    let mut d = kv(&direct_etcd.client_url).await;
    roots(&mut m, &mut d, "p", 0, 40).await;
    let all = || range("/projects/p/", "/projects/p0");
    let with = |f: fn(&mut RangeRequest)| {
        let mut r = all();
        f(&mut r);
        R::RequestRange(r)
    };
    let put = |k: &str| R::RequestPut(PutRequest { key: b(k), value: b("new"), prev_kv: true, ..Default::default() });
    let txns = [
        // Five tenant-wide ranges: 200 upstream ranges flat.
        txn(vec![
            with(|_| ()),
            with(|r| r.limit = 3),
            with(|r| (r.sort_order, r.sort_target) = (2, 3)),
            with(|r| r.count_only = true),
            with(|r| (r.keys_only, r.sort_target, r.limit) = (true, 4, 5)),
        ]),
        // Ranges before and after writes into the ranged roots see each state.
        TxnRequest {
            compare: vec![Compare {
                key: b("/projects/p/r001/ns/k"),
                target: compare::CompareTarget::Version as i32,
                result: compare::CompareResult::Greater as i32,
                target_union: Some(compare::TargetUnion::Version(0)),
                ..Default::default()
            }],
            success: [
                with(|r| r.limit = 2),
                put("/projects/p/r000/ns/k"),
                with(|r| r.limit = 2),
                R::RequestDeleteRange(DeleteRangeRequest {
                    key: b("/projects/p/r001/ns/k"),
                    prev_kv: true,
                    ..Default::default()
                }),
                with(|r| (r.limit, r.sort_target) = (3, 3)),
                put("/projects/p/new/ns/k"),
                with(|_| ()),
            ]
            .into_iter()
            .map(op)
            .collect(),
            failure: vec![op(with(|_| ()))],
        },
        // Nested, in both branches.
        TxnRequest {
            success: vec![
                op(R::RequestTxn(txn(vec![with(|_| ()), with(|r| r.limit = 1), with(|_| ())]))),
                op(with(|_| ())),
            ],
            failure: vec![op(with(|_| ())), op(with(|_| ()))],
            ..Default::default()
        },
    ];
    for (i, t) in txns.iter().enumerate() {
        let got = call(&mut m, &Call::Txn(t.clone())).await;
        assert_eq!(got, call(&mut d, &Call::Txn(t.clone())).await, "txn {i}");
        assert!(got.is_ok(), "txn {i}: {got:?}");
    }
    // Many more roots than max_txn_ops: still one atomic txn.
    roots(&mut m, &mut d, "p", 40, 300).await;
    let del = DeleteRangeRequest { key: b("/projects/p/r280/"), range_end: b("/projects/p/r290"), prev_kv: true };
    let t = txn(vec![
        with(|_| ()),
        put("/projects/p/r299/ns/k"),
        with(|r| r.limit = 500),
        R::RequestDeleteRange(del),
        with(|r| r.count_only = true),
    ]);
    let got = call(&mut m, &Call::Txn(t.clone())).await;
    assert_eq!(got, call(&mut d, &Call::Txn(t)).await, "txn over 300 roots");
    assert!(got.is_ok(), "{got:?}");
}

/// The innermost op of a txn nested `depth` deep.
type Leaf = fn(usize) -> request_op::Request;

/// `leaf` inside `depth` nested txns (0: the top txn holds the leaf).
fn nested(depth: usize, leaf: request_op::Request) -> TxnRequest {
    let mut t = txn(vec![leaf]);
    for _ in 0..depth {
        t = txn(vec![R::RequestTxn(t)]);
    }
    t
}

/// How deep `resp` nests txn answers, and the leaf answer.
fn unnest(resp: &TxnResponse) -> (usize, Option<&response_op::Response>) {
    match resp.responses.first().and_then(|r| r.response.as_ref()) {
        Some(response_op::Response::ResponseTxn(inner)) => {
            let (d, leaf) = unnest(inner);
            (d + 1, leaf)
        }
        leaf => (0, leaf),
    }
}

/// Nesting deeper than etcdmux can decode etcd's answer to is refused before
/// anything is sent; the deepest accepted nesting round-trips, with or without the
/// guard txn etcdmux wraps around cross-root ops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_nesting_at_the_boundary() {
    let etcd = common::Etcd::start();
    let mux = common::start_mux(&etcd, common::MILO_TOML).await;
    let mut m = kv(&mux.url).await;
    let mut raw = kv(&etcd.client_url).await;
    m.put(PutRequest { key: b("/projects/n/pods/ns/a"), value: b("a"), ..Default::default() }).await.unwrap();
    m.put(PutRequest { key: b("/projects/n/configmaps/ns/b"), value: b("b"), ..Default::default() }).await.unwrap();
    let leaves: [(&str, Leaf); 4] = [
        ("put in one root", |d| {
            R::RequestPut(PutRequest { key: b(&format!("/projects/n/pods/d{d}")), value: b("v"), ..Default::default() })
        }),
        ("range in one root", |_| R::RequestRange(range("/projects/n/pods/", "/projects/n/pods0"))),
        ("range across roots (guarded)", |_| R::RequestRange(range("/projects/n/", "/projects/n0"))),
        ("delete across roots (guarded)", |d| {
            R::RequestDeleteRange(DeleteRangeRequest {
                key: b(&format!("/projects/n/x{d}")),
                range_end: b("/projects/n0"),
                prev_kv: true,
            })
        }),
    ];
    let mut boundaries = Vec::new();
    for (what, leaf) in leaves {
        let mut accepted = None;
        for depth in 30..70 {
            let before = revision(&mut raw).await;
            match m.txn(nested(depth, leaf(depth))).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    let (d, answer) = unnest(&resp);
                    assert_eq!(d, depth, "{what}: the answer nests like the request");
                    assert!(answer.is_some(), "{what} at depth {depth}: the leaf answer is there");
                    accepted = Some(depth);
                }
                Err(s) => {
                    assert_eq!(s.code(), Code::InvalidArgument, "{what} at depth {depth}: {s:?}");
                    assert!(s.message().starts_with("etcdmux: ") && s.message().contains("nest"), "{}", s.message());
                    assert_eq!(revision(&mut raw).await, before, "{what} at depth {depth}: a refused txn wrote");
                    break;
                }
            }
        }
        let accepted = accepted.unwrap_or_else(|| panic!("{what}: no depth from 30 on accepted"));
        assert!(accepted < 69, "{what}: never refused");
        boundaries.push(accepted);
    }
    // prost decodes 100 messages below the top one: a leaf answer's header (or
    // key-values) sits at 2 * depth + 3, two more under the guard txn.
    assert_eq!(boundaries, vec![48, 48, 47, 47]);
    // The put was applied exactly at the accepted depths.
    let put = m.range(range("/projects/n/pods/d", "/projects/n/pods/e")).await.unwrap().into_inner();
    assert_eq!(key_strs(&put.kvs).len(), boundaries[0] - 29, "{:?}", key_strs(&put.kvs));
}

/// Tenant `a` on a static listener, principal `b` on a key-path listener with
/// passthrough keys, and the admin on a static listener.
const LEASE_TENANTS: &str = r#"
[[listener]]
addr = "127.0.0.1:0"
static_tenant = "a"

[[listener]]
addr = "127.0.0.1:0"

[[listener]]
addr = "127.0.0.1:0"
static_tenant = "root"

[tenancy]
rule = [ { prefix = "/projects/{tenant}/" } ]
global_keys = ["compact_rev_key"]
unmatched = "passthrough"
connection_identity = "b"
admin_identity = "root"
"#;

/// Another tenant's lease cannot be attached to a global or passthrough key, in a
/// Put or in a txn, and answers like a lease that does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_checked_on_every_put() {
    let etcd = common::Etcd::start();
    let mux = common::start_mux(&etcd, LEASE_TENANTS).await;
    let addrs = mux.running.as_ref().unwrap().addrs.clone();
    let url = |i: usize| format!("http://{}", addrs[i]);
    let a_lease = common::client(&url(0)).await.lease_grant(60, None).await.unwrap().id();
    let b_lease = common::client(&url(1)).await.lease_grant(60, None).await.unwrap().id();
    let mut bkv = kv(&url(1)).await;
    let mut admin = kv(&url(2)).await;
    let mut raw = kv(&etcd.client_url).await;
    let put = |k: &str, lease: i64| PutRequest { key: b(k), value: b("v"), lease, ..Default::default() };
    let not_found = (Code::NotFound, "etcdserver: requested lease not found".to_string());

    let before = revision(&mut raw).await;
    let missing = 0x7777_0000_0000_0001;
    for lease in [a_lease, missing] {
        let got = show(bkv.put(put("/free/x", lease)).await, |_| ());
        assert_eq!(got, Err(not_found.clone()), "put with lease {lease:x}");
        let t = txn(vec![R::RequestPut(put("/free/y", lease))]);
        assert_eq!(show(bkv.txn(t).await, |_| ()), Err(not_found.clone()), "txn put with lease {lease:x}");
        let got = show(bkv.put(put("compact_rev_key", lease)).await, |_| ());
        assert_eq!(got.map_err(|e| e.0), Err(Code::PermissionDenied), "a global key is the admin's");
    }
    assert_eq!(revision(&mut raw).await, before, "nothing was written");

    // b's own lease works; the admin may still use any lease.
    bkv.put(put("/free/own", b_lease)).await.unwrap();
    bkv.txn(txn(vec![R::RequestPut(put("/free/own2", b_lease))])).await.unwrap();
    admin.put(put("compact_rev_key", a_lease)).await.unwrap();
    let record = |l: i64| format!("/etcdmux/leases/{l:016x}");
    assert_eq!(lease_keys(&etcd.client_url, a_lease).await, vec![record(a_lease), "compact_rev_key".into()]);
    let b_keys = vec![record(b_lease), "/free/own".into(), "/free/own2".into()];
    assert_eq!(lease_keys(&etcd.client_url, b_lease).await, b_keys);
}

/// The keys attached to lease `id`, sorted, as `url` shows them.
async fn lease_keys(url: &str, id: i64) -> Vec<String> {
    let opts = etcd_client::LeaseTimeToLiveOptions::new().with_keys();
    let ttl = common::client(url).await.lease_time_to_live(id, Some(opts)).await.unwrap();
    let mut keys: Vec<String> = ttl.keys().iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    keys.sort();
    keys
}
