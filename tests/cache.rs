//! The shared read replica (`[cache] enabled`) against a real etcd, with a second
//! etcdmux without it (or etcd itself) as the reference:
//! - data present before start is loaded, later writes made through *another*
//!   etcdmux are seen by the next linearizable read, answers equal etcd's;
//! - reads racing a writer never miss a write that finished before they began;
//! - with etcd unreachable, serializable reads are still answered (from memory),
//!   except for excluded resources, and linearizable ones are not;
//! - after a gap in the feed (the hub resumes past a compaction) the replica loads
//!   again and answers correctly;
//! - over its byte budget it answers nothing itself, and reads stay correct.
//!
//! The differential test (`tests/differential.rs`) also runs with the replica on.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use etcdmux::pb::etcdserverpb::kv_client::KvClient;
use etcdmux::pb::etcdserverpb::{CompactionRequest, PutRequest, RangeRequest, RangeResponse};
use tonic::transport::Channel;

const CACHE: &str = "\n[cache]\nenabled = true\n";

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn kv(url: &str) -> KvClient<Channel> {
    KvClient::connect(url.to_string()).await.unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

async fn put(c: &mut KvClient<Channel>, key: &str, value: &str) -> i64 {
    let r = c.put(PutRequest { key: b(key), value: b(value), ..Default::default() }).await.expect("put");
    r.into_inner().header.map_or(0, |h| h.revision)
}

fn prefix(p: &str) -> RangeRequest {
    let mut end = p.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    RangeRequest { key: b(p), range_end: Bytes::from(end), ..Default::default() }
}

fn get(key: &str) -> RangeRequest {
    RangeRequest { key: b(key), ..Default::default() }
}

/// `mine` (through the replica, read first) and `theirs` (through etcd, read
/// right after) hold the same keys, and `mine` is at a revision no older than the
/// write it must see (`rev`) and no newer than `theirs` (a progress fence written
/// in between may make etcd's newer).
fn same(mine: RangeResponse, theirs: RangeResponse, rev: i64, what: &str) {
    let (m, t) = (mine.header.map_or(0, |h| h.revision), theirs.header.map_or(0, |h| h.revision));
    assert!(rev <= m && m <= t, "{what}: answered at {m}, after the write at {rev} and before etcd's {t}");
    let strip = |r: RangeResponse| RangeResponse { header: None, ..r };
    assert_eq!(strip(mine), strip(theirs), "{what}");
}

fn comparable(mut r: RangeResponse) -> RangeResponse {
    norm_header(&mut r.header);
    r
}

/// A serializable read, with a deadline (it fails when it goes to an unreachable etcd).
async fn serializable(c: &mut KvClient<Channel>, req: RangeRequest) -> Result<RangeResponse, tonic::Status> {
    let mut req = tonic::Request::new(RangeRequest { serializable: true, ..req });
    req.set_timeout(Duration::from_millis(1500));
    c.range(req).await.map(|r| r.into_inner())
}

/// A relay in front of `etcd` and etcdmux (with the replica, `extra` config) behind it.
async fn mux_behind_relay(etcd: &Etcd, extra: &str) -> (Relay, etcdmux::grpc::server::Running, String) {
    let relay = Relay::start(&etcd.client_url).await;
    let (running, url) = start_mux_with(&format!("{MILO_TOML}{CACHE}{extra}"), vec![relay.url.clone()]).await;
    (relay, running, url)
}

/// Waits until the replica of `running` is loaded and answering.
async fn wait_loaded(running: &etcdmux::grpc::server::Running) {
    let replica = running.replica().expect("the replica is on");
    for _ in 0..300 {
        if replica.is_live() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the replica never loaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_reads_see_writes_made_elsewhere_and_match_etcd() {
    let etcd = Etcd::start();
    let other = start_mux(&etcd, MILO_TOML).await;
    let mut w = kv(&other.url).await;
    // Data before the replica starts: loaded, over several pages.
    for i in 0..60 {
        put(&mut w, &format!("/projects/p{}/pods/ns/x{i:02}", i % 4), &format!("before-{i}")).await;
    }
    let (_relay, running, url) = mux_behind_relay(&etcd, "load_page_keys = 7\n").await;
    let mut r = kv(&url).await;
    wait_loaded(&running).await;

    for i in 0..150 {
        let key = format!("/projects/p{}/{}/ns/k{}", i % 3, ["pods", "configmaps"][i % 2], i % 7);
        let rev = if i % 5 == 4 {
            w.delete_range(etcdmux::pb::etcdserverpb::DeleteRangeRequest { key: b(&key), ..Default::default() })
                .await
                .expect("delete")
                .into_inner()
                .header
                .map_or(0, |h| h.revision)
        } else {
            put(&mut w, &key, &format!("v{i}")).await
        };
        // The next linearizable read through the replica sees it, at once.
        let mine = r.range(get(&key)).await.expect("get via replica").into_inner();
        let theirs = w.range(get(&key)).await.expect("get via other").into_inner();
        same(mine, theirs, rev, &format!("step {i}: {key}"));
        // Lists: one root, and the whole tenant (across roots).
        for p in [format!("/projects/p{}/pods/", i % 3), format!("/projects/p{}/", i % 3)] {
            let mut req = prefix(&p);
            req.limit = (i % 4) as i64 * 3;
            let mine = r.range(req.clone()).await.expect("list via replica").into_inner();
            let theirs = w.range(req).await.expect("list via other").into_inner();
            same(mine, theirs, rev, &format!("step {i}: list {p}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_racing_a_writer_never_miss_a_finished_write() {
    let etcd = Etcd::start();
    let other = start_mux(&etcd, MILO_TOML).await;
    let (_relay, running, url) = mux_behind_relay(&etcd, "").await;
    let mut w = kv(&other.url).await;
    put(&mut w, "/projects/race/pods/ns/counter", "0").await;
    wait_loaded(&running).await;

    let done = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn({
        let done = done.clone();
        async move {
            for n in 1..=300u64 {
                put(&mut w, "/projects/race/pods/ns/counter", &n.to_string()).await;
                done.store(n, Ordering::SeqCst);
            }
        }
    });
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (done, url) = (done.clone(), url.clone());
        readers.push(tokio::spawn(async move {
            let mut c = kv(&url).await;
            let mut last_rev = 0;
            let mut reads = 0;
            while done.load(Ordering::SeqCst) < 300 {
                let finished = done.load(Ordering::SeqCst);
                let resp = c.range(get("/projects/race/pods/ns/counter")).await.expect("read").into_inner();
                let seen: u64 = std::str::from_utf8(&resp.kvs[0].value).expect("utf8").parse().expect("a number");
                assert!(seen >= finished, "a read that began after write {finished} saw {seen}");
                let rev = resp.header.map_or(0, |h| h.revision);
                assert!(rev >= last_rev, "revisions go forward for one reader ({last_rev} then {rev})");
                last_rev = rev;
                reads += 1;
            }
            reads
        }));
    }
    writer.await.expect("writer");
    for r in readers {
        assert!(r.await.expect("reader") > 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_serializable_reads_come_from_memory_except_excluded_resources() {
    let etcd = Etcd::start();
    let (relay, running, url) = mux_behind_relay(&etcd, "exclude_resources = [\"secrets\"]\n").await;
    let mut c = kv(&url).await;
    put(&mut c, "/projects/a/pods/ns/web", "pod").await;
    put(&mut c, "/projects/a/secrets/ns/token", "secret").await;
    wait_loaded(&running).await;

    relay.pause();
    let pods = serializable(&mut c, prefix("/projects/a/pods/")).await.expect("served from memory");
    assert_eq!(pods.kvs.len(), 1);
    assert_eq!(pods.kvs[0].value, b("pod"));
    assert!(serializable(&mut c, prefix("/projects/a/secrets/")).await.is_err(), "excluded: goes to etcd");
    let mut linearizable = tonic::Request::new(get("/projects/a/pods/ns/web"));
    linearizable.set_timeout(Duration::from_millis(1500));
    assert!(c.range(linearizable).await.is_err(), "a linearizable read needs etcd's revision");
    relay.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_gap_in_the_feed_the_replica_loads_again() {
    let etcd = Etcd::start();
    let (relay, running, url) = mux_behind_relay(&etcd, "").await;
    let mut c = kv(&url).await;
    put(&mut c, "/projects/g/pods/ns/a", "1").await;
    wait_loaded(&running).await;

    // etcdmux cut off while etcd moves on and compacts the history it missed.
    relay.pause();
    let mut direct = kv(&etcd.client_url).await;
    let mut rev = 0;
    for i in 0..20 {
        rev = put(&mut direct, "/registry/pods/clusters/g/ns/a", &format!("direct-{i}")).await;
        put(&mut direct, "/registry/pods/clusters/g/ns/gone", "x").await;
        direct
            .delete_range(etcdmux::pb::etcdserverpb::DeleteRangeRequest {
                key: b("/registry/pods/clusters/g/ns/gone"),
                ..Default::default()
            })
            .await
            .expect("delete");
    }
    direct.compact(CompactionRequest { revision: rev, physical: true }).await.expect("compact");
    relay.resume();

    // The hub resumes past the compaction; the replica must not answer from before
    // the gap: the value etcd holds, once loaded again.
    let want = comparable(direct.range(get("/registry/pods/clusters/g/ns/a")).await.expect("direct").into_inner());
    for attempt in 0.. {
        let got = c.range(get("/projects/g/pods/ns/a")).await.expect("read").into_inner();
        assert_eq!(got.kvs[0].value, want.kvs[0].value, "attempt {attempt}: a linearizable read is never stale");
        relay.pause();
        let fresh = serializable(&mut c, get("/projects/g/pods/ns/a")).await;
        relay.resume();
        match fresh {
            Ok(r) if r.kvs.first().map(|kv| kv.value.clone()) == Some(b("direct-19")) => break,
            // Until the hub sees the gap a serializable read may be stale, as on a
            // lagging etcd member; then the replica empties and loads again.
            _ if attempt < 100 => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("the replica never caught up after the gap: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_its_budget_the_replica_answers_nothing_and_reads_stay_right() {
    let etcd = Etcd::start();
    let (relay, _running, url) = mux_behind_relay(&etcd, "max_bytes = 4096\n").await;
    let mut c = kv(&url).await;
    for i in 0..40 {
        put(&mut c, &format!("/projects/big/pods/ns/{i}"), &"x".repeat(200)).await;
    }
    let list = c.range(prefix("/projects/big/pods/")).await.expect("list").into_inner();
    assert_eq!(list.count, 40, "reads go to etcd");
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.pause();
    assert!(
        serializable(&mut c, prefix("/projects/big/pods/")).await.is_err(),
        "over budget, nothing is answered from memory"
    );
    relay.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_made_elsewhere_is_learnt() {
    let etcd = Etcd::start();
    let (_relay, running, url) = mux_behind_relay(&etcd, "compaction_check_ms = 200\n").await;
    let mut c = kv(&url).await;
    wait_loaded(&running).await;
    let first = put(&mut c, "/projects/k/pods/ns/a", "0").await;
    let mut last = first;
    for i in 1..20 {
        last = put(&mut c, "/projects/k/pods/ns/a", &i.to_string()).await;
    }
    let old = RangeRequest { revision: first, ..get("/projects/k/pods/ns/a") };
    let before = c.range(old.clone()).await.expect("an old revision, from the window").into_inner();
    assert_eq!(before.kvs[0].value, b("0"));
    // Compacted straight on etcd: etcdmux does not see the Compact.
    let mut direct = kv(&etcd.client_url).await;
    direct.compact(CompactionRequest { revision: last - 5, physical: true }).await.expect("compact");
    let want = direct
        .range(RangeRequest { revision: first, ..get("/registry/pods/clusters/k/ns/a") })
        .await
        .expect_err("etcd refuses a compacted revision");
    for attempt in 0.. {
        match c.range(old.clone()).await {
            Err(e) => {
                assert_eq!((e.code(), e.message()), (want.code(), want.message()), "etcd's own answer");
                break;
            }
            Ok(_) if attempt < 50 => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(r) => panic!("still answered from the window after 5 s: {r:?}"),
        }
    }
    // Revisions after the compaction are still answered.
    let kept = RangeRequest { revision: last - 2, ..get("/projects/k/pods/ns/a") };
    assert_eq!(c.range(kept).await.expect("inside the window").into_inner().kvs[0].value, b("17"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_budget_cold_pieces_are_evicted_and_loaded_again_when_read() {
    let etcd = Etcd::start();
    let other = start_mux(&etcd, MILO_TOML).await;
    let mut w = kv(&other.url).await;
    // About 30 KB of keys and values, a budget of about a third of it.
    let (relay, running, url) = mux_behind_relay(&etcd, "max_bytes = 16000\n").await;
    let mut c = kv(&url).await;
    wait_loaded(&running).await;
    let mut early = 0;
    for t in 0..20 {
        for i in 0..3 {
            early = put(&mut w, &format!("/projects/e{t}/pods/ns/{i}"), &"v".repeat(400)).await;
        }
    }
    // Changes after `early`, so that reads at it differ from reads now.
    for t in 0..20 {
        w.delete_range(etcdmux::pb::etcdserverpb::DeleteRangeRequest {
            key: b(&format!("/projects/e{t}/pods/ns/2")),
            ..Default::default()
        })
        .await
        .expect("delete");
    }
    // Every tenant's list is right, whether its piece is held, evicted or loading.
    for round in 0..3 {
        for t in 0..20 {
            let p = format!("/projects/e{t}/pods/");
            let mine = c.range(prefix(&p)).await.expect("list").into_inner();
            let theirs = w.range(prefix(&p)).await.expect("list").into_inner();
            same(mine, theirs, 0, &format!("round {round}: {p}"));
        }
    }
    // A hot tenant, read again and again, is loaded and then answered from memory.
    let hot = "/projects/e3/pods/";
    let mut from_memory = false;
    for _ in 0..50 {
        let _ = c.range(prefix(hot)).await.expect("list");
        tokio::time::sleep(Duration::from_millis(50)).await;
        relay.pause();
        let r = serializable(&mut c, prefix(hot)).await;
        relay.resume();
        if let Ok(r) = r {
            assert_eq!(r.kvs.len(), 2);
            from_memory = true;
            break;
        }
    }
    assert!(from_memory, "an evicted piece that is read is loaded again");
    // Reads at a revision before a piece was loaded again are etcd's (the piece has
    // no versions from before its load).
    for t in 0..20 {
        // A read first, so that an evicted piece is loaded (after the deletes).
        let _ = c.range(prefix(&format!("/projects/e{t}/pods/"))).await.expect("list");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let at = RangeRequest { revision: early, ..prefix(&format!("/projects/e{t}/pods/")) };
        let mine = c.range(at.clone()).await.expect("list at a revision").into_inner();
        let theirs = w.range(at).await.expect("list at a revision").into_inner();
        assert_eq!(mine.kvs, theirs.kvs, "tenant e{t} at revision {early}");
        assert_eq!(mine.kvs.len(), 3, "tenant e{t} at revision {early}");
    }
    // Writes to pieces evicted meanwhile are never lost: they are read again from etcd.
    for t in 0..20 {
        put(&mut w, &format!("/projects/e{t}/pods/ns/0"), &format!("new-{t}")).await;
    }
    for t in 0..20 {
        let got = c.range(get(&format!("/projects/e{t}/pods/ns/0"))).await.expect("get").into_inner();
        assert_eq!(got.kvs[0].value, b(&format!("new-{t}")), "tenant e{t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_outside_the_watched_keys_is_reflected_in_the_next_read() {
    let etcd = Etcd::start();
    let (_relay, running, url) = mux_behind_relay(&etcd, "").await;
    let mut c = kv(&url).await;
    wait_loaded(&running).await;
    let rev = put(&mut c, "/projects/o/pods/ns/a", "1").await;
    let first = c.range(prefix("/projects/o/pods/")).await.expect("list").into_inner();
    assert_eq!(first.header.map(|h| h.revision), Some(rev));
    // A global key: no event reaches the hub's watch.
    let global = put(&mut c, "compact_rev_key", "x").await;
    assert_eq!(global, rev + 1);
    let after = c.range(prefix("/projects/o/pods/")).await.expect("list").into_inner();
    let seen = after.header.map_or(0, |h| h.revision);
    assert!(seen >= global, "the read after a write at {global} answered at {seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_over_budget_at_start_loads_what_fits_and_the_rest_on_demand() {
    let etcd = Etcd::start();
    let other = start_mux(&etcd, MILO_TOML).await;
    let mut w = kv(&other.url).await;
    for t in 0..20 {
        for i in 0..3 {
            put(&mut w, &format!("/projects/s{t}/pods/ns/{i}"), &"v".repeat(400)).await;
        }
    }
    // About 30 KB of data, a budget of about half.
    let (relay, running, url) = mux_behind_relay(&etcd, "max_bytes = 16000\n").await;
    wait_loaded(&running).await;
    let mut c = kv(&url).await;
    for t in 0..20 {
        let p = format!("/projects/s{t}/pods/");
        let mine = c.range(prefix(&p)).await.expect("list").into_inner();
        let theirs = w.range(prefix(&p)).await.expect("list").into_inner();
        same(mine, theirs, 0, &p);
    }
    // Some pieces were loaded at start and are answered without etcd.
    relay.pause();
    let mut from_memory = 0;
    for t in 0..20 {
        if serializable(&mut c, prefix(&format!("/projects/s{t}/pods/"))).await.is_ok() {
            from_memory += 1;
        }
    }
    relay.resume();
    assert!((1..20).contains(&from_memory), "part of the data is held ({from_memory} of 20 pieces)");
}
