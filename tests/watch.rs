//! The watch path checked against etcd's own history.
//!
//! A randomized multi-tenant workload (puts, deletes, multi-key txns, expiring
//! leases, compactions) runs against etcd through etcdmux while watchers are created
//! on several streams at random times, with random ranges, start revisions, prev_kv
//! and filters. The ring is kept tiny, so starts fall both inside it (ring replay)
//! and before it (catch-up from etcd, then hand-over). Ground truth is a watch opened
//! straight on etcd from revision 1. After the run every watcher's stream must be
//! exactly etcd's history for its tenant and range: ordered, unique, gap-free,
//! revisions never split across responses, prev_kv and filters right, progress
//! answers never ahead of what was delivered and never behind etcd at request time,
//! header revisions never going backwards. Fault variants cut the upstream
//! connection (a loopback relay) and restart etcd in the middle of the run.
//!
//! The same checker runs with etcdmux on the SQL backend (PostgreSQL): the truth is
//! then read from the history table itself, revision by revision, and the faults are
//! the database's connections dropped and the database restarted.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use etcdmux::keyspace::KeyLayout;
use etcdmux::pb::etcdserverpb::{
    kv_client::KvClient, lease_client::LeaseClient, request_op, watch_client::WatchClient,
    watch_create_request::FilterType, watch_request, CompactionRequest, DeleteRangeRequest, LeaseGrantRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest,
    WatchResponse,
};
use etcdmux::pb::mvccpb::{event::EventType, Event};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch as tokio_watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use common::{Cluster, Relay};

const TENANTS: usize = 4;
const RESOURCES: &[&str] = &["pods", "configmaps", "apps.k8s.io/deployments"];

fn mux_toml(ring_events: usize, stream_buffer: usize) -> String {
    format!(
        "{}\n[watch]\nring_events = {ring_events}\nstream_buffer = {stream_buffer}\nreconnect_backoff_ms = 20\n",
        common::MILO_TOML
    )
}

/// An in-process etcdmux whose upstream is `relay` (so tests can cut it), with the
/// watch settings of [`mux_toml`]; returns it and its client URL.
async fn start_mux_via(
    relay: &Relay,
    ring_events: usize,
    stream_buffer: usize,
) -> (etcdmux::grpc::server::Running, String) {
    common::start_mux_with(&mux_toml(ring_events, stream_buffer), vec![relay.url.clone()]).await
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn prefix_end(p: &[u8]) -> Bytes {
    etcdmux::keyspace::prefix_end(p)
}

/// An event as the checker compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ev {
    rev: i64,
    delete: bool,
    key: Bytes,
    value: Bytes,
    prev: Option<(Bytes, i64)>,
}

fn ev_of(e: &Event) -> Ev {
    let kv = e.kv.clone().unwrap_or_default();
    Ev {
        rev: kv.mod_revision,
        delete: e.r#type == EventType::Delete as i32,
        key: kv.key,
        value: kv.value,
        prev: e.prev_kv.as_ref().map(|p| (p.value.clone(), p.mod_revision)),
    }
}

/// etcd's history, in client form, from a direct watch from revision 1.
#[derive(Default)]
struct Truth {
    events: Vec<Ev>,
    last_rev: i64,
}

async fn record_truth(url: String, truth: Arc<Mutex<Truth>>, stop: tokio_watch::Receiver<bool>) {
    let layout = KeyLayout::new("/registry", "/etcdmux");
    loop {
        if *stop.borrow() {
            return;
        }
        let from = truth.lock().unwrap().last_rev + 1;
        let Ok(mut client) = WatchClient::connect(url.clone()).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (tx, rx) = mpsc::channel(4);
        let create = WatchCreateRequest {
            key: b("\0"),
            range_end: b("\0"),
            start_revision: from,
            prev_kv: true,
            progress_notify: true,
            ..Default::default()
        };
        tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) })
            .await
            .unwrap();
        let Ok(resp) = client.watch(ReceiverStream::new(rx)).await else { continue };
        let mut stream = resp.into_inner();
        let mut stop = stop.clone();
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = stop.changed() => return,
            };
            let Ok(Some(r)) = msg else { break };
            assert_eq!(r.compact_revision, 0, "the truth watch must never be compacted");
            let mut t = truth.lock().unwrap();
            for e in &r.events {
                let mut ev = ev_of(e);
                t.last_rev = t.last_rev.max(ev.rev);
                let Some((tenant, key)) = layout.decode(&ev.key) else { continue };
                ev.key = Bytes::from([format!("/projects/{tenant}").as_bytes(), &key].concat());
                t.events.push(ev);
            }
        }
        let _ = tx;
    }
}

/// The SQL store's history, in client form, read straight from its table (not
/// through the change feed under test): every row up to the head's revision, in
/// revision order; prev_kv is the key's value before the revision.
async fn record_truth_sql(dsn: String, truth: Arc<Mutex<Truth>>, stop: tokio_watch::Receiver<bool>) {
    let layout = KeyLayout::new("/registry", "/etcdmux");
    let mut live: HashMap<Bytes, (Bytes, i64)> = HashMap::new();
    loop {
        if *stop.borrow() {
            return;
        }
        let Ok((client, conn)) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let driver = tokio::spawn(conn);
        loop {
            if *stop.borrow() {
                driver.abort();
                return;
            }
            let from = truth.lock().unwrap().last_rev;
            let rows = client
                .query(
                    "SELECT key, mod_revision, value, deleted FROM etcdmux_kv
                     WHERE mod_revision > $1 AND mod_revision <= (SELECT revision FROM etcdmux_head WHERE id = 1)
                     ORDER BY mod_revision, seq",
                    &[&from],
                )
                .await;
            let Ok(rows) = rows else { break };
            {
                let mut t = truth.lock().unwrap();
                let mut pending: Vec<(Bytes, Option<(Bytes, i64)>)> = Vec::new();
                let mut cur_rev = 0;
                for row in rows {
                    let key = Bytes::from(row.get::<_, Vec<u8>>(0));
                    let rev: i64 = row.get(1);
                    let value = Bytes::from(row.get::<_, Vec<u8>>(2));
                    let delete: bool = row.get(3);
                    if rev != cur_rev {
                        for (k, v) in pending.drain(..) {
                            match v {
                                Some(v) => live.insert(k, v),
                                None => live.remove(&k),
                            };
                        }
                        cur_rev = rev;
                    }
                    let prev = live.get(&key).cloned();
                    pending.push((key.clone(), if delete { None } else { Some((value.clone(), rev)) }));
                    t.last_rev = t.last_rev.max(rev);
                    let Some((tenant, k)) = layout.decode(&key) else { continue };
                    let key = Bytes::from([format!("/projects/{tenant}").as_bytes(), &k].concat());
                    t.events.push(Ev { rev, delete, key, value: if delete { Bytes::new() } else { value }, prev });
                }
                for (k, v) in pending.drain(..) {
                    match v {
                        Some(v) => live.insert(k, v),
                        None => live.remove(&k),
                    };
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        driver.abort();
    }
}

/// A watcher as the test asked for it.
#[derive(Debug, Clone)]
struct Spec {
    id: i64,
    key: Bytes,
    range_end: Bytes,
    start: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
}

impl Spec {
    fn wants(&self, e: &Ev) -> bool {
        let in_range =
            if self.range_end.is_empty() { e.key == self.key } else { e.key >= self.key && e.key < self.range_end };
        in_range && e.rev >= self.start && !(if e.delete { self.no_delete } else { self.no_put })
    }

    fn shape(&self, e: &Ev) -> Ev {
        let mut e = e.clone();
        if !self.prev_kv {
            e.prev = None;
        }
        e
    }
}

/// One client stream: what was sent and everything received, in order.
struct TestStream {
    tx: mpsc::Sender<WatchRequest>,
    log: Arc<Mutex<Vec<WatchResponse>>>,
    specs: Vec<Spec>,
    /// (position in log when sent, etcd revision just before sending)
    progress_asks: Vec<(usize, i64)>,
}

impl TestStream {
    async fn open(url: &str) -> TestStream {
        let mut client = WatchClient::connect(url.to_string()).await.expect("connect etcdmux");
        let (tx, rx) = mpsc::channel(64);
        let mut stream = client.watch(ReceiverStream::new(rx)).await.expect("watch").into_inner();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = stream.message().await {
                l.lock().unwrap().push(r);
            }
        });
        TestStream { tx, log, specs: Vec::new(), progress_asks: Vec::new() }
    }

    async fn create(&mut self, spec: Spec) {
        let mut filters = Vec::new();
        if spec.no_put {
            filters.push(FilterType::Noput as i32);
        }
        if spec.no_delete {
            filters.push(FilterType::Nodelete as i32);
        }
        let c = WatchCreateRequest {
            key: spec.key.clone(),
            range_end: spec.range_end.clone(),
            start_revision: spec.start,
            prev_kv: spec.prev_kv,
            filters,
            watch_id: spec.id,
            ..Default::default()
        };
        self.tx
            .send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(c)) })
            .await
            .unwrap();
        self.specs.push(spec);
    }

    /// Asks for progress and waits for the answer; returns its revision.
    async fn progress(&mut self, etcd_rev: i64) -> i64 {
        let pos = self.log.lock().unwrap().len();
        self.progress_asks.push((pos, etcd_rev));
        let p =
            WatchRequest { request_union: Some(watch_request::RequestUnion::ProgressRequest(WatchProgressRequest {})) };
        self.tx.send(p).await.unwrap();
        for _ in 0..600 {
            {
                let log = self.log.lock().unwrap();
                if let Some(r) = log[pos..].iter().find(|r| is_progress(r)) {
                    return r.header.as_ref().map_or(0, |h| h.revision);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no progress answer within 12 s");
    }
}

fn is_progress(r: &WatchResponse) -> bool {
    r.watch_id == -1 && r.events.is_empty() && !r.created && !r.canceled && r.compact_revision == 0
}

/// etcd's current revision (`kv` a direct etcd client, or etcdmux: the global key
/// `health` is read there, a key both answer).
async fn current_rev(kv: &mut KvClient<Channel>) -> i64 {
    loop {
        if let Ok(r) = kv.range(RangeRequest { key: b("health"), ..Default::default() }).await {
            return r.into_inner().header.unwrap().revision;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks one stream's log against the truth.
/// `compacted_to`: the highest revision the workload compacted at.
fn check_stream(s: &TestStream, truth: &[Ev], final_rev: i64, compacted_to: i64) {
    let log = s.log.lock().unwrap();
    let mut last_header = 0;
    for r in log.iter() {
        let h = r.header.as_ref().map_or(0, |h| h.revision);
        assert!(h >= last_header || r.header.is_none(), "header revision went back: {h} after {last_header}");
        last_header = last_header.max(h);
    }
    for spec in &s.specs {
        let mut expected: Vec<Ev> =
            truth.iter().filter(|e| e.rev <= final_rev && spec.wants(e)).map(|e| spec.shape(e)).collect();
        let mut got: Vec<Ev> = Vec::new();
        let mut seen_revs: BTreeMap<i64, usize> = BTreeMap::new();
        let mut created = false;
        let mut cancel: Option<&WatchResponse> = None;
        for (i, r) in log.iter().enumerate() {
            if r.watch_id != spec.id {
                continue;
            }
            if r.created {
                assert!(!created, "watcher {} created twice", spec.id);
                assert!(!r.canceled, "watcher {} refused: {}", spec.id, r.cancel_reason);
                created = true;
                continue;
            }
            assert!(created, "watcher {}: events before created", spec.id);
            assert!(cancel.is_none(), "watcher {}: response after its cancel", spec.id);
            if r.canceled {
                cancel = Some(r);
                continue;
            }
            for e in &r.events {
                let ev = ev_of(e);
                // Atomic: a revision's events all come in one response.
                if let Some(&j) = seen_revs.get(&ev.rev) {
                    assert_eq!(j, i, "watcher {}: revision {} split across responses", spec.id, ev.rev);
                }
                seen_revs.insert(ev.rev, i);
                got.push(ev);
            }
        }
        assert!(created, "watcher {} never created", spec.id);
        // etcd reads an event's prev_kv at the revision before it: a watch from exactly
        // the compact revision (at creation, which the test does not know exactly) gets
        // that revision's events without prev_kv.
        if spec.prev_kv && spec.start <= compacted_to {
            for (g, x) in got.iter().zip(expected.iter_mut()) {
                if g.rev == spec.start && g.prev.is_none() {
                    x.prev = None;
                }
            }
        }
        match cancel {
            None => assert_eq!(got, expected, "watcher {} ({:?}): stream differs from etcd's history", spec.id, spec),
            Some(c) => {
                assert!(
                    c.compact_revision > 0,
                    "watcher {} cancelled without compaction: {:?}",
                    spec.id,
                    c.cancel_reason
                );
                assert!(
                    got.len() <= expected.len() && got[..] == expected[..got.len()],
                    "watcher {}: not a prefix before its compacted cancel",
                    spec.id
                );
                let next = got.last().map_or(spec.start, |e| e.rev + 1);
                assert!(
                    next <= c.compact_revision,
                    "watcher {}: compacted at {} but had reached {}",
                    spec.id,
                    c.compact_revision,
                    next
                );
            }
        }
    }
    // Progress answers: never ahead of what was delivered, never behind etcd.
    for &(pos, etcd_rev) in &s.progress_asks {
        let Some((i, r)) = log.iter().enumerate().skip(pos).find(|(_, r)| is_progress(r)) else { continue };
        let rev = r.header.as_ref().map_or(0, |h| h.revision);
        assert!(rev >= etcd_rev, "progress answered {rev}, but etcd was at {etcd_rev} when asked");
        for spec in &s.specs {
            let created_at = log.iter().position(|x| x.watch_id == spec.id && x.created);
            let Some(created_at) = created_at.filter(|&c| c < i) else { continue };
            if log[..i].iter().any(|x| x.watch_id == spec.id && x.canceled) {
                continue;
            }
            let before: usize =
                log[created_at..i].iter().filter(|x| x.watch_id == spec.id).map(|x| x.events.len()).sum();
            let due = truth.iter().filter(|e| e.rev <= rev && spec.wants(e)).count();
            assert_eq!(before, due, "watcher {}: progress {rev} sent before all its events up to {rev}", spec.id);
        }
    }
}

enum Fault {
    None,
    /// etcd: the relay cuts every connection; SQL: the database ends them.
    CutUpstream,
    /// etcd or the database killed and started again.
    RestartEtcd,
}

async fn run_checker(seed: u64, fault: Fault) {
    run_checker_with(seed, fault, "").await
}

/// What the checker runs etcdmux on.
enum Backing {
    Etcd { etcd: common::Etcd, relay: Relay },
    Sql(common::Postgres),
}

impl Backing {
    async fn fault(&mut self, fault: &Fault) {
        match (self, fault) {
            (_, Fault::None) => {}
            (Backing::Etcd { relay, .. }, Fault::CutUpstream) => relay.cut(),
            (Backing::Etcd { etcd, .. }, Fault::RestartEtcd) => {
                etcd.kill();
                tokio::time::sleep(Duration::from_millis(300)).await;
                etcd.restart();
            }
            (Backing::Sql(pg), Fault::CutUpstream) => pg.drop_connections(),
            (Backing::Sql(pg), Fault::RestartEtcd) => {
                pg.kill();
                tokio::time::sleep(Duration::from_millis(300)).await;
                pg.restart();
            }
        }
    }
}

/// [`run_checker`] with more etcdmux config (`extra` TOML appended).
async fn run_checker_with(seed: u64, fault: Fault, extra: &str) {
    run_checker_on(common::Store::Etcd, seed, fault, extra).await
}

/// The checker with etcdmux on `store`.
async fn run_checker_on(store: common::Store, seed: u64, fault: Fault, extra: &str) {
    common::init_tracing();
    let toml = format!("{}{extra}", mux_toml(12, 4096));
    let truth = Arc::new(Mutex::new(Truth::default()));
    let (stop_tx, stop_rx) = tokio_watch::channel(false);
    let (mut backing, running, mux_url, truth_task) = match store {
        common::Store::Etcd => {
            let etcd = common::Etcd::start();
            let relay = Relay::start(&etcd.client_url).await;
            let (running, mux_url) = common::start_mux_with(&toml, vec![relay.url.clone()]).await;
            let truth_task = tokio::spawn(record_truth(etcd.client_url.clone(), truth.clone(), stop_rx));
            (Backing::Etcd { etcd, relay }, running, mux_url, truth_task)
        }
        common::Store::Sql => {
            let pg = common::Postgres::start();
            let mut mux = common::start_mux_sql(&pg, &toml).await;
            let running = mux.running.take().expect("running");
            let truth_task = tokio::spawn(record_truth_sql(pg.dsn.clone(), truth.clone(), stop_rx));
            (Backing::Sql(pg), running, mux.url.clone(), truth_task)
        }
    };

    let mut rng = StdRng::seed_from_u64(seed);
    let mut kv = KvClient::connect(mux_url.clone()).await.unwrap();
    // Revisions are read, and compactions made, straight on etcd; on SQL through
    // etcdmux (a global key's header; the admin's Compact).
    let direct_url = match &backing {
        Backing::Etcd { etcd, .. } => etcd.client_url.clone(),
        Backing::Sql(_) => mux_url.clone(),
    };
    let mut direct = KvClient::connect(direct_url).await.unwrap();
    let mut lease = LeaseClient::connect(mux_url.clone()).await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(TestStream::open(&mux_url).await);
    }
    let key = |rng: &mut StdRng| {
        let t = rng.random_range(0..TENANTS);
        let r = RESOURCES[rng.random_range(0..RESOURCES.len())];
        format!("/projects/t{t}/{r}/ns/k{}", rng.random_range(0..6))
    };
    let mut next_id = 1;
    let mut compacted_to = 0;
    let steps = 400;
    for step in 0..steps {
        if step == steps / 2 {
            backing.fault(&fault).await;
        }
        let op = rng.random_range(0..100);
        // Writes may fail while etcd restarts; the history is whatever etcd applied.
        let _ = match op {
            0..=49 => kv
                .put(PutRequest { key: b(&key(&mut rng)), value: b(&format!("v{step}")), ..Default::default() })
                .await
                .map(|_| ()),
            50..=64 => {
                kv.delete_range(DeleteRangeRequest { key: b(&key(&mut rng)), ..Default::default() }).await.map(|_| ())
            }
            65..=79 => {
                // A multi-key txn inside one tenant: one revision, several events.
                let t = rng.random_range(0..TENANTS);
                let mut ops = Vec::new();
                for (i, r) in RESOURCES.iter().enumerate().take(rng.random_range(2..=3)) {
                    let k = format!("/projects/t{t}/{r}/ns/txn{i}");
                    let req = if rng.random_bool(0.7) {
                        request_op::Request::RequestPut(PutRequest {
                            key: b(&k),
                            value: b(&format!("x{step}")),
                            ..Default::default()
                        })
                    } else {
                        request_op::Request::RequestDeleteRange(DeleteRangeRequest { key: b(&k), ..Default::default() })
                    };
                    ops.push(RequestOp { request: Some(req) });
                }
                kv.txn(TxnRequest { success: ops, ..Default::default() }).await.map(|_| ())
            }
            80..=84 => {
                // A short lease: its keys' deletes arrive later, from etcd itself.
                match lease.lease_grant(LeaseGrantRequest { ttl: 1, id: 0 }).await {
                    Ok(l) => {
                        let id = l.into_inner().id;
                        kv.put(PutRequest {
                            key: b(&key(&mut rng)),
                            value: b("leased"),
                            lease: id,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ())
                    }
                    Err(e) => Err(e),
                }
            }
            85..=86 => {
                let now = current_rev(&mut direct).await;
                let target = now - rng.random_range(5..40);
                if target > 1 && direct.compact(CompactionRequest { revision: target, physical: false }).await.is_ok() {
                    compacted_to = compacted_to.max(target);
                }
                Ok(())
            }
            _ => {
                // A new watcher on a random stream.
                let t = rng.random_range(0..TENANTS);
                let (k, e) = match rng.random_range(0..3) {
                    0 => {
                        let p = format!("/projects/t{t}/");
                        (b(&p), prefix_end(p.as_bytes()))
                    }
                    1 => {
                        let p = format!("/projects/t{t}/{}/", RESOURCES[rng.random_range(0..RESOURCES.len())]);
                        (b(&p), prefix_end(p.as_bytes()))
                    }
                    _ => (b(&format!("/projects/t{t}/pods/ns/k{}", rng.random_range(0..6))), Bytes::new()),
                };
                let now = current_rev(&mut direct).await;
                let start = match rng.random_range(0..4) {
                    0 => now + 1,
                    1 => (now - rng.random_range(0..10)).max(1),
                    _ => rng.random_range(1..=now.max(1)),
                };
                let filter = rng.random_range(0..10);
                let spec = Spec {
                    id: next_id,
                    key: k,
                    range_end: e,
                    start,
                    prev_kv: rng.random_bool(0.5),
                    no_put: filter == 0,
                    no_delete: filter == 1,
                };
                next_id += 1;
                let i = rng.random_range(0..streams.len());
                streams[i].create(spec).await;
                Ok(())
            }
        };
        if step % 50 == 25 {
            let i = rng.random_range(0..streams.len());
            let now = current_rev(&mut direct).await;
            streams[i].progress(now).await;
        }
    }
    // Let leases expire, then bring every stream up to etcd's final revision.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let final_rev = current_rev(&mut direct).await;
    for s in &mut streams {
        let got = s.progress(final_rev).await;
        assert!(got >= final_rev);
    }
    for _ in 0..200 {
        if truth.lock().unwrap().last_rev >= final_rev {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    let _ = truth_task.await;
    running.shutdown().await;
    let truth = truth.lock().unwrap();
    let created: usize = streams.iter().map(|s| s.specs.len()).sum();
    assert!(created > 10, "the workload created too few watchers ({created})");
    for s in &streams {
        check_stream(s, &truth.events, final_rev, compacted_to);
    }
}

/// Seeds to run: `ETCDMUX_WATCH_SEEDS=N` runs N seeds from `base` (for `make soak`);
/// CI runs `default`.
fn seeds(base: u64, default: u64) -> impl Iterator<Item = u64> {
    let n = std::env::var("ETCDMUX_WATCH_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    base..base + n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_guarantees_hold() {
    for seed in seeds(1, 2) {
        run_checker(seed, Fault::None).await;
    }
}

/// The read replica (on by default) is fed by the hub's upstream watch, under the
/// hub's lock: the checks above run with it. Here the hub alone, through an
/// upstream cut and compactions made straight on etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_guarantees_hold_without_the_read_replica() {
    for seed in seeds(7, 1) {
        run_checker_with(seed, Fault::CutUpstream, "\n[cache]\nenabled = false\n").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_guarantees_hold_when_the_upstream_connection_drops() {
    for seed in seeds(3, 1) {
        run_checker(seed, Fault::CutUpstream).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_sql_backend_watch_guarantees_hold() {
    for seed in seeds(101, 1) {
        run_checker_on(common::Store::Sql, seed, Fault::None, "").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_sql_backend_watch_guarantees_hold_when_database_connections_drop() {
    for seed in seeds(103, 1) {
        run_checker_on(common::Store::Sql, seed, Fault::CutUpstream, "").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_sql_backend_watch_guarantees_hold_across_a_database_restart() {
    for seed in seeds(104, 1) {
        run_checker_on(common::Store::Sql, seed, Fault::RestartEtcd, "").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_guarantees_hold_across_an_etcd_restart() {
    for seed in seeds(4, 1) {
        run_checker(seed, Fault::RestartEtcd).await;
    }
}

/// A stalled client is cancelled alone; the others keep receiving, and nothing
/// grows without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_watcher_is_cancelled_alone() {
    let etcd = common::Etcd::start();
    let mux = common::start_mux(&etcd, &mux_toml(1000, 8)).await;
    let mut kv = KvClient::connect(mux.url.clone()).await.unwrap();

    let create = |id: i64| WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
            key: b("/projects/p/pods/"),
            range_end: b("/projects/p/pods0"),
            watch_id: id,
            ..Default::default()
        })),
    };
    // The stalled stream: created, never read.
    let mut stalled_client = WatchClient::connect(mux.url.clone()).await.unwrap();
    let (stx, srx) = mpsc::channel(4);
    stx.send(create(1)).await.unwrap();
    let mut stalled = stalled_client.watch(ReceiverStream::new(srx)).await.unwrap().into_inner();
    // The healthy stream, read continuously.
    let healthy = TestStream::open(&mux.url).await;
    healthy.tx.send(create(2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let n = 300;
    for i in 0..n {
        // Values big enough that HTTP/2 flow control fills up and the queue backs up.
        kv.put(PutRequest {
            key: b(&format!("/projects/p/pods/ns/k{}", i % 10)),
            value: Bytes::from(vec![b'x'; 16 * 1024]),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for _ in 0..500 {
        let got: usize = healthy.log.lock().unwrap().iter().map(|r| r.events.len()).sum();
        if got == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got: usize = healthy.log.lock().unwrap().iter().map(|r| r.events.len()).sum();
    assert_eq!(got, n, "the healthy watcher must get every event");

    // Now read the stalled stream: some events, then a cancel with a reason.
    let mut events = 0;
    let mut cancel = None;
    while let Ok(Ok(Some(r))) = tokio::time::timeout(Duration::from_secs(5), stalled.message()).await {
        if r.canceled {
            cancel = Some(r);
            break;
        }
        events += r.events.len();
    }
    let cancel = cancel.expect("the stalled watcher must be cancelled");
    assert!(events < n, "a stalled watcher cannot have received everything ({events})");
    assert!(cancel.cancel_reason.contains("fell behind"), "{}", cancel.cancel_reason);
    assert_eq!(cancel.compact_revision, 0);
}

/// A watch from a compacted revision gets etcd's answer: created, then cancelled
/// with the compact revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_start_matches_etcd() {
    let etcd = common::Etcd::start();
    let mux = common::start_mux(&etcd, &mux_toml(100, 64)).await;
    let mut kv = KvClient::connect(mux.url.clone()).await.unwrap();
    for i in 0..10 {
        kv.put(PutRequest { key: b("/projects/p/pods/ns/a"), value: b(&i.to_string()), ..Default::default() })
            .await
            .unwrap();
    }
    kv.compact(CompactionRequest { revision: 8, physical: true }).await.unwrap();
    let mut answers = Vec::new();
    for (url, key) in
        [(mux.url.clone(), "/projects/p/pods/ns/a"), (etcd.client_url.clone(), "/registry/pods/clusters/p/ns/a")]
    {
        let mut client = WatchClient::connect(url).await.unwrap();
        let (tx, rx) = mpsc::channel(4);
        let c = WatchCreateRequest { key: b(key), start_revision: 3, ..Default::default() };
        tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(c)) }).await.unwrap();
        let mut s = client.watch(ReceiverStream::new(rx)).await.unwrap().into_inner();
        let mut got = Vec::new();
        while let Ok(Ok(Some(r))) = tokio::time::timeout(Duration::from_secs(3), s.message()).await {
            got.push((r.created, r.canceled, r.compact_revision, r.events.len()));
            if r.canceled {
                break;
            }
        }
        answers.push(got);
        drop(tx);
    }
    assert_eq!(answers[0], answers[1], "etcdmux vs etcd");
    assert!(answers[0].iter().any(|a| a.2 == 8), "{:?}", answers[0]);
}

/// Many tenants, few upstream watchers: 1,000 tenants × 10 resource prefixes, each
/// listed and watched like the apiserver's cacher, on 20 client streams. etcd's own
/// metrics must show a constant number of watchers, and every write must reach
/// exactly its tenant's watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_tenants_share_one_upstream_watch() {
    let etcd = common::Etcd::start();
    let mux = common::start_mux(&etcd, &mux_toml(100_000, 65_536)).await;
    let mut kv = KvClient::connect(mux.url.clone()).await.unwrap();
    let tenants: usize = std::env::var("ETCDMUX_SCALE_TENANTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let resources = 10;
    let t0 = std::time::Instant::now();
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(TestStream::open(&mux.url).await);
    }
    let mut direct = KvClient::connect(etcd.client_url.clone()).await.unwrap();
    let rev = current_rev(&mut direct).await;
    let mut id = 1;
    let mut owner: HashMap<(usize, usize), (usize, i64)> = HashMap::new();
    for t in 0..tenants {
        for r in 0..resources {
            let prefix = format!("/projects/p{t}/res{r}/");
            // The cacher's list, then its watch from the list's revision + 1.
            let list = kv
                .range(RangeRequest {
                    key: b(&prefix),
                    range_end: prefix_end(prefix.as_bytes()),
                    limit: 500,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let from = list.header.map_or(rev, |h| h.revision) + 1;
            let s = id as usize % streams.len();
            streams[s]
                .create(Spec {
                    id,
                    key: b(&prefix),
                    range_end: prefix_end(prefix.as_bytes()),
                    start: from,
                    prev_kv: true,
                    no_put: false,
                    no_delete: false,
                })
                .await;
            owner.insert((t, r), (s, id));
            id += 1;
        }
        if t % 100 == 99 {
            eprintln!("scale: {} tenants listed and watched after {:?}", t + 1, t0.elapsed());
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let upstream_watchers = etcd.metric("etcd_debugging_mvcc_watcher_total").unwrap_or(f64::NAN);
    assert!(
        upstream_watchers <= 3.0,
        "etcd holds {upstream_watchers} watchers for {} client watches",
        tenants * resources
    );

    // One write per tenant, into a random resource.
    let mut rng = StdRng::seed_from_u64(7);
    let mut expected: HashMap<i64, usize> = HashMap::new();
    for t in 0..tenants {
        let r = rng.random_range(0..resources);
        kv.put(PutRequest { key: b(&format!("/projects/p{t}/res{r}/ns/obj")), value: b("v"), ..Default::default() })
            .await
            .unwrap();
        *expected.entry(owner[&(t, r)].1).or_default() += 1;
    }
    let mut got: HashMap<i64, usize> = HashMap::new();
    for _ in 0..500 {
        got.clear();
        for s in &streams {
            for r in s.log.lock().unwrap().iter() {
                if !r.events.is_empty() {
                    *got.entry(r.watch_id).or_default() += r.events.len();
                }
            }
        }
        if got.values().sum::<usize>() >= tenants {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got, expected, "every write reaches exactly its tenant's watcher");
}

/// Responses over etcd's request limit are split into fragments for watchers that
/// ask for them, and reassemble to exactly etcd's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_responses_are_fragmented_like_etcd() {
    let etcd = common::Etcd::start();
    let mux = common::start_mux(&etcd, &mux_toml(1000, 64)).await;
    let mut kv = KvClient::connect(mux.url.clone()).await.unwrap();
    for i in 0..8 {
        let value = Bytes::from(vec![b'a' + i as u8; 500 * 1024]);
        kv.put(PutRequest { key: b(&format!("/projects/p/pods/ns/big{i}")), value, ..Default::default() })
            .await
            .unwrap();
    }
    let mut results = Vec::new();
    for (url, key) in [(mux.url.clone(), "/projects/p/pods/"), (etcd.client_url.clone(), "/registry/pods/clusters/p/")]
    {
        let mut client = WatchClient::connect(url).await.unwrap().max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(4);
        let c = WatchCreateRequest {
            key: b(key),
            range_end: prefix_end(key.as_bytes()),
            start_revision: 1,
            fragment: true,
            ..Default::default()
        };
        tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(c)) }).await.unwrap();
        let mut s = client.watch(ReceiverStream::new(rx)).await.unwrap().into_inner();
        let (mut values, mut fragments, mut largest) = (Vec::new(), 0, 0);
        while values.len() < 8 {
            let r = tokio::time::timeout(Duration::from_secs(10), s.message()).await.unwrap().unwrap().unwrap();
            use prost::Message;
            largest = largest.max(r.encoded_len());
            fragments += r.fragment as usize;
            values.extend(r.events.iter().map(|e| e.kv.as_ref().unwrap().value.clone()));
        }
        results.push((values, fragments, largest));
        drop(tx);
    }
    assert_eq!(results[0].0, results[1].0, "same events, same order");
    assert!(results[0].1 > 0, "etcdmux fragmented the replay");
    assert!(results[0].2 <= 1536 * 1024 + 600 * 1024, "fragments stay near the limit: {}", results[0].2);
}

/// Global keys (the apiserver compactor's `compact_rev_key`) can be watched like in
/// etcd: the events are etcd's own, under the client's watch id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_keys_can_be_watched() {
    let etcd = common::Etcd::start();
    let mux = common::start_mux(&etcd, &mux_toml(100, 64)).await;
    let mut kv = KvClient::connect(mux.url.clone()).await.unwrap();
    let s = TestStream::open(&mux.url).await;
    let c = WatchCreateRequest { key: b("compact_rev_key"), watch_id: 7, prev_kv: true, ..Default::default() };
    s.tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(c)) }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for v in ["1", "2"] {
        kv.put(PutRequest { key: b("compact_rev_key"), value: b(v), ..Default::default() }).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..100 {
        got = s
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.watch_id == 7)
            .flat_map(|r| r.events.clone())
            .map(|e| ev_of(&e))
            .collect();
        if got.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let values: Vec<Bytes> = got.iter().map(|e| e.value.clone()).collect();
    assert_eq!(values, vec![b("1"), b("2")]);
    assert_eq!(got[1].prev.as_ref().map(|p| p.0.clone()), Some(b("1")));
    assert!(s.log.lock().unwrap().iter().any(|r| r.watch_id == 7 && r.created && !r.canceled));
}

/// Streams opened with etcd's `hasleader` metadata end with etcd's "no leader"
/// error when the upstream loses its leader; other streams stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_leader_streams_end_when_etcd_has_no_leader() {
    let mut cluster = Cluster::start(3);
    let mut cfg = etcdmux::config::Config::parse(&mux_toml(100, 64), "leader test").unwrap();
    cfg.upstream.endpoints = cluster.client_urls();
    cfg.listeners[0].addr = "127.0.0.1:0".parse().unwrap();
    cfg.validate().unwrap();
    // Wait for the cluster to elect a leader.
    let mut kv = loop {
        if let Ok(mut c) = KvClient::connect(cluster.member(0).client_url.clone()).await {
            if c.put(PutRequest { key: b("/ready"), value: b("1"), ..Default::default() }).await.is_ok() {
                break c;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let running = etcdmux::grpc::server::start(cfg).await.unwrap();
    let url = format!("http://{}", running.addrs[0]);

    let open = |require_leader: bool| {
        let url = url.clone();
        async move {
            let mut client = WatchClient::connect(url).await.unwrap();
            let (tx, rx) = mpsc::channel(4);
            let c = WatchCreateRequest {
                key: b("/projects/p/pods/"),
                range_end: prefix_end(b"/projects/p/pods/"),
                ..Default::default()
            };
            tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(c)) }).await.unwrap();
            let mut req = tonic::Request::new(ReceiverStream::new(rx));
            if require_leader {
                req.metadata_mut().insert("hasleader", tonic::metadata::MetadataValue::from_static("true"));
            }
            let stream = client.watch(req).await.unwrap().into_inner();
            (tx, stream)
        }
    };
    let (_tx1, mut strict) = open(true).await;
    let (_tx2, mut relaxed) = open(false).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    kv.put(PutRequest { key: b("/registry/pods/clusters/p/ns/a"), value: b("v"), ..Default::default() }).await.unwrap();
    for s in [&mut strict, &mut relaxed] {
        loop {
            let r = tokio::time::timeout(Duration::from_secs(10), s.message()).await.unwrap().unwrap().unwrap();
            if !r.events.is_empty() {
                break;
            }
        }
    }
    // Two of three members gone: no quorum, no leader.
    cluster.kill(1);
    cluster.kill(2);
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match strict.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(s) => return Some(s),
            }
        }
    })
    .await
    .expect("the hasleader stream must end within 30 s");
    let status = ended.expect("ended with an error");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(status.message(), "etcdserver: no leader");
    // The stream that did not ask is still open.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), relaxed.message()).await.is_err(),
        "the other stream stays open"
    );
    running.shutdown().await;
}

/// The hub loses etcd, history it had not seen yet is compacted meanwhile, and it
/// comes back: watchers that needed the lost revisions get etcd's compacted cancel;
/// a watcher that starts after them keeps running and gets the events after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_resume_at_a_compacted_revision_cancels_only_affected_watchers() {
    let etcd = common::Etcd::start();
    let relay = Relay::start(&etcd.client_url).await;
    let (running, url) = start_mux_via(&relay, 100, 64).await;
    let mut direct = KvClient::connect(etcd.client_url.clone()).await.unwrap();
    let mut s = TestStream::open(&url).await;
    let now = current_rev(&mut direct).await;
    let spec = |id, start| Spec {
        id,
        key: b("/projects/p/pods/"),
        range_end: prefix_end(b"/projects/p/pods/"),
        start,
        prev_kv: false,
        no_put: false,
        no_delete: false,
    };
    s.create(spec(1, now + 1)).await;
    // A watcher far in the future: it needs nothing that will be lost.
    s.create(spec(2, now + 200)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    relay.pause();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..5 {
        direct
            .put(PutRequest {
                key: b("/registry/pods/clusters/p/ns/a"),
                value: b(&i.to_string()),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let compact_to = current_rev(&mut direct).await;
    direct.compact(CompactionRequest { revision: compact_to, physical: true }).await.unwrap();
    relay.resume();

    // Watcher 1 lost the five puts: etcd's compacted cancel.
    let mut cancel = None;
    for _ in 0..300 {
        cancel = s.log.lock().unwrap().iter().find(|r| r.watch_id == 1 && r.canceled).cloned();
        if cancel.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancel = cancel.expect("watcher 1 must be cancelled as compacted");
    assert_eq!(cancel.compact_revision, compact_to);
    // Watcher 2 is untouched and still served: bring it its first event.
    let mut kv = KvClient::connect(url.clone()).await.unwrap();
    loop {
        let rev = current_rev(&mut direct).await;
        if rev >= now + 200 {
            break;
        }
        kv.put(PutRequest { key: b("/projects/p/pods/ns/fill"), value: b("x"), ..Default::default() }).await.unwrap();
    }
    let mut got = 0;
    for _ in 0..100 {
        got = s.log.lock().unwrap().iter().filter(|r| r.watch_id == 2).map(|r| r.events.len()).sum();
        if got > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(got > 0, "watcher 2 keeps receiving");
    assert!(!s.log.lock().unwrap().iter().any(|r| r.watch_id == 2 && r.canceled), "watcher 2 was not cancelled");
    running.shutdown().await;
}

/// etcd's Range calls answered so far (from its `/metrics`).
fn etcd_ranges(etcd: &common::Etcd) -> f64 {
    let (_, text) =
        common::http_get(&format!("{}/metrics", etcd.metrics_url), Duration::from_secs(5)).expect("metrics");
    text.lines()
        .filter(|l| l.starts_with("grpc_server_handled_total{") && l.contains("grpc_method=\"Range\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Regression test (src/watch/upstream.rs, `Hub::now`): every watch created with
/// start_revision 0 asked etcd for its revision with a Range of its own; creates
/// that arrive together now share one call, and still start after every write that
/// finished before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_created_together_share_one_revision_call() {
    common::init_tracing();
    let etcd = common::Etcd::start();
    let mux = common::start_mux(&etcd, &common::without_cache(common::MILO_TOML)).await;
    let mut kv = KvClient::connect(mux.url.clone()).await.unwrap();
    let n = 200;
    let mut streams = Vec::new();
    for _ in 0..n {
        streams.push(TestStream::open(&mux.url).await);
    }
    kv.put(PutRequest { key: b("/projects/p0/res/before"), value: b("v"), ..Default::default() }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = etcd_ranges(&etcd);
    for (i, s) in streams.iter_mut().enumerate() {
        let prefix = format!("/projects/p{i}/res/");
        let spec = Spec {
            id: 1,
            key: b(&prefix),
            range_end: prefix_end(prefix.as_bytes()),
            start: 0,
            prev_kv: false,
            no_put: false,
            no_delete: false,
        };
        s.create(spec).await;
    }
    let created = |s: &TestStream| s.log.lock().unwrap().iter().any(|r| r.created);
    for _ in 0..300 {
        if streams.iter().all(created) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(streams.iter().all(created), "every watch was created");
    let calls = etcd_ranges(&etcd) - before;
    assert!(calls < (n / 2) as f64, "{calls} Range calls to etcd for {n} watches created together");
    // They start after the write that came before them, and see the next one.
    kv.put(PutRequest { key: b("/projects/p0/res/after"), value: b("v"), ..Default::default() }).await.unwrap();
    for _ in 0..100 {
        let keys: Vec<Vec<u8>> = streams[0]
            .log
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| r.events.iter().filter_map(|e| e.kv.as_ref().map(|kv| kv.key.to_vec())))
            .collect();
        if !keys.is_empty() {
            assert_eq!(keys, vec![b"/projects/p0/res/after".to_vec()], "events of stream 0");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("stream 0 never saw the write after its create");
}
