//! The replica's store against a real etcd: random writes, deletes, multi-key txns
//! and compactions go to etcd; the store is fed etcd's own watch of them; random
//! ranges (any key span, revision, limit, order, filter, count/keys only) are sent
//! to etcd and answered by the store, and every answer the store gives must equal
//! etcd's, field for field (the header aside: the caller of the store adds it).
//!
//! `ETCDMUX_REPLICA_SEEDS` sets how many seeds run (default 3).

use std::time::Duration;

use bytes::Bytes;
use etcdmux::pb::etcdserverpb::kv_client::KvClient;
use etcdmux::pb::etcdserverpb::range_request::SortTarget;
use etcdmux::pb::etcdserverpb::request_op::Request;
use etcdmux::pb::etcdserverpb::watch_client::WatchClient;
use etcdmux::pb::etcdserverpb::watch_request::RequestUnion;
use etcdmux::pb::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest,
    WatchRequest,
};
use etcdmux::pb::mvccpb::Event;
use etcdmux::replica::{Answer, Store, Why};
use etcdmux_testkit::Etcd;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tonic::transport::Channel;

const PREFIX: &str = "/r/";

fn key(rng: &mut StdRng) -> Bytes {
    Bytes::from(format!("{PREFIX}{:02}", rng.random_range(0..24)))
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// A random write: a put, a single or range delete, or a txn of several puts (one
/// revision, several events).
fn write(rng: &mut StdRng, n: usize) -> TxnRequest {
    let put = |rng: &mut StdRng| RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: key(rng),
            value: Bytes::from(format!("v{n}-{}", rng.random_range(0..1000))),
            ..Default::default()
        })),
    };
    let ops = match rng.random_range(0..10) {
        0..=5 => vec![put(rng)],
        6 => {
            let (a, z) = (key(rng), key(rng));
            let (a, z) = if a <= z { (a, z) } else { (z, a) };
            vec![RequestOp {
                request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                    key: a,
                    range_end: z,
                    ..Default::default()
                })),
            }]
        }
        7 => vec![RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest { key: key(rng), ..Default::default() })),
        }],
        _ => {
            let mut keys: Vec<Bytes> = (0..rng.random_range(2..5)).map(|_| key(rng)).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .map(|k| RequestOp {
                    request: Some(Request::RequestPut(PutRequest {
                        key: k,
                        value: Bytes::from(format!("t{n}")),
                        ..Default::default()
                    })),
                })
                .collect()
        }
    };
    TxnRequest { success: ops, ..Default::default() }
}

/// A random range over the prefix at a revision around the window.
fn range(rng: &mut StdRng, floor: i64, head: i64) -> RangeRequest {
    let (a, z) = (key(rng), key(rng));
    let (key, range_end) = match rng.random_range(0..5) {
        0 => (a, Bytes::new()),
        1 => (a, b("\0")),
        2 => (b(PREFIX), b("/r0")),
        _ => (a, z),
    };
    let revision = match rng.random_range(0..4) {
        0 => 0,
        _ => rng.random_range((floor - 2).max(1)..=head + 1),
    };
    let target = if rng.random_range(0..8) == 0 { rng.random_range(1..5) } else { SortTarget::Key as i32 };
    let mut req = RangeRequest {
        key,
        range_end,
        revision,
        limit: [0, 0, 1, 2, 5][rng.random_range(0..5)],
        sort_order: rng.random_range(0..3),
        sort_target: target,
        keys_only: rng.random_range(0..6) == 0,
        count_only: rng.random_range(0..8) == 0,
        ..Default::default()
    };
    match rng.random_range(0..8) {
        0 => req.min_mod_revision = rng.random_range(1..=head),
        1 => req.max_mod_revision = rng.random_range(1..=head),
        2 => req.min_create_revision = rng.random_range(1..=head),
        3 => req.max_create_revision = rng.random_range(1..=head),
        _ => {}
    }
    req
}

/// etcd's watch of the prefix from `start`, as (revision, events) per response.
async fn watch(channel: Channel, start: i64) -> mpsc::Receiver<(i64, Vec<Event>)> {
    let (req_tx, req_rx) = mpsc::channel(1);
    let create =
        WatchCreateRequest { key: b(PREFIX), range_end: b("/r0"), start_revision: start, ..Default::default() };
    req_tx.send(WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) }).await.expect("send");
    let mut stream = WatchClient::new(channel)
        .watch(tokio_stream::wrappers::ReceiverStream::new(req_rx))
        .await
        .expect("watch")
        .into_inner();
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        let _keep = req_tx;
        while let Ok(Some(resp)) = stream.message().await {
            // Events of one revision may come in one response; split by revision.
            let mut by_rev: Vec<(i64, Vec<Event>)> = Vec::new();
            for ev in resp.events {
                let rev = ev.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                match by_rev.last_mut() {
                    Some((r, evs)) if *r == rev => evs.push(ev),
                    _ => by_rev.push((rev, vec![ev])),
                }
            }
            for item in by_rev {
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        }
    });
    rx
}

async fn check_seed(etcd: &Etcd, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let channel = Channel::from_shared(etcd.client_url.clone()).expect("url").connect().await.expect("connect");
    let mut kv = KvClient::new(channel.clone());
    // Start from what the prefix holds now (earlier seeds' keys) at one revision.
    let snap = kv
        .range(RangeRequest { key: b(PREFIX), range_end: b("/r0"), ..Default::default() })
        .await
        .expect("snapshot")
        .into_inner();
    let mut head = snap.header.as_ref().map_or(0, |h| h.revision);
    let mut store = Store::new();
    store.load(head, snap.kvs);
    let mut events = watch(channel.clone(), head + 1).await;
    let (mut served, mut forwarded) = (0, 0);
    for round in 0..40 {
        for n in 0..rng.random_range(1..6) {
            let resp = kv.txn(write(&mut rng, round * 10 + n)).await.expect("txn").into_inner();
            head = resp.header.map_or(head, |h| h.revision);
        }
        // Feed the store until it has every revision up to etcd's head (a delete of
        // nothing makes no revision and no event, so head is what etcd reports).
        while store.applied() < head {
            let (rev, evs) = tokio::time::timeout(Duration::from_secs(10), events.recv())
                .await
                .expect("etcd's watch keeps up")
                .expect("watch open");
            assert!(store.apply(rev, &evs), "revision {rev} applied once, in order");
        }
        if rng.random_range(0..8) == 0 && head > store.floor() + 2 {
            let at = rng.random_range(store.floor() + 1..head);
            kv.compact(CompactionRequest { revision: at, physical: false }).await.expect("compact");
            // Ranges below the compaction must never be answered from the store.
            store.raise_floor(at);
        }
        for _ in 0..25 {
            let req = range(&mut rng, store.floor(), head);
            let from_etcd = kv.range(req.clone()).await.map(|r| r.into_inner());
            match (store.range(&req), from_etcd) {
                (Answer::Served(mut mine), Ok(mut theirs)) => {
                    theirs.header = None;
                    mine.header = None;
                    assert_eq!(mine, theirs, "seed {seed} round {round}: {req:?}");
                    served += 1;
                }
                (Answer::Served(mine), Err(e)) => {
                    panic!("seed {seed}: the store answered {mine:?} where etcd refused {req:?}: {e}")
                }
                (Answer::Forward(why), _) => {
                    let sorted = req.sort_target != SortTarget::Key as i32;
                    let outside = req.revision > 0 && (req.revision < store.floor() || req.revision > store.applied());
                    assert!(
                        (why == Why::Sort && sorted) || (why != Why::Sort && outside),
                        "seed {seed}: forwarded for {why:?}: {req:?}"
                    );
                    forwarded += 1;
                }
            }
        }
        // Sometimes slide the window up, as a byte or revision bound would.
        if rng.random_range(0..6) == 0 {
            store.raise_floor(head - rng.random_range(0..5));
        }
    }
    assert!(served > 2 * forwarded, "seed {seed}: most ranges served locally ({served} vs {forwarded})");
}

#[tokio::test]
async fn store_answers_as_etcd_does() {
    let etcd = Etcd::start();
    let seeds: u64 = std::env::var("ETCDMUX_REPLICA_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    for seed in 0..seeds {
        check_seed(&etcd, seed).await;
    }
}
