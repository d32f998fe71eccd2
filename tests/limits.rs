//! `[limits]` against a real etcd: unary calls beyond the global or per-connection
//! bound are refused at once with etcd's RESOURCE_EXHAUSTED "etcdserver: too many
//! requests" (etcd is SIGSTOPped so that calls stay in progress), watch streams are
//! not counted, and a watch create beyond `max_watchers_per_stream` is refused with
//! the reason; a connection opens a few streams per turn of its task. The tests read
//! process-wide metrics, so they run one at a time.

mod common;

use std::time::Duration;

use etcdmux::metrics::names;
use etcdmux::pb::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request, PutRequest, RangeRequest, WatchCreateRequest,
    WatchRequest, WatchResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The sum of `name`'s series whose labels contain `label`.
fn counter(name: &str, label: &str) -> f64 {
    let text = etcdmux::metrics::install().expect("metrics recorder").render();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

fn rejections(scope: &str) -> f64 {
    counter(names::OVERLOAD_REJECTIONS, &format!("scope=\"{scope}\""))
}

fn signal(etcd: &common::Etcd, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &etcd.pid().to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig}");
}

/// A new HTTP/2 connection to `url`.
async fn kv(url: &str) -> KvClient<Channel> {
    KvClient::new(Channel::from_shared(url.to_string()).expect("url").connect().await.expect("connect"))
}

fn range() -> RangeRequest {
    RangeRequest { key: bytes::Bytes::from_static(b"/projects/p1/a"), ..Default::default() }
}

/// A range on `client` that stays in progress while etcd is stopped.
fn hanging(client: &KvClient<Channel>) -> tokio::task::JoinHandle<Result<(), tonic::Status>> {
    let mut c = client.clone();
    tokio::spawn(async move { c.range(range()).await.map(|_| ()) })
}

/// Waits until `n` ranges are in progress in etcdmux (the in-flight gauge), so the
/// next one meets the bound whatever the machine's load: a fixed sleep let a slow CI
/// runner send the "refused" call before the held one and hold it instead.
async fn until_ranges_in_progress(n: f64) {
    let label = "method=\"/etcdserverpb.KV/Range\"";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = etcdmux::metrics::install().expect("metrics recorder").render();
        let now = text
            .lines()
            .filter(|l| l.starts_with(names::GRPC_INFLIGHT) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum::<f64>();
        if now >= n {
            // The gauge counts a call just before the limits layer takes its permit.
            tokio::time::sleep(Duration::from_millis(50)).await;
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{n} ranges in progress in time (now {now})");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A range that must be refused at once with etcd's overload answer.
async fn refused(client: &mut KvClient<Channel>) {
    let answer = tokio::time::timeout(Duration::from_secs(10), client.range(range())).await;
    let status = answer.expect("refused at once, not queued").expect_err("refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), "etcdserver: too many requests");
}

async fn start(etcd: &common::Etcd, limits: &str) -> common::Mux {
    etcdmux::metrics::install().expect("metrics recorder");
    common::start_mux(etcd, &format!("{}\n[limits]\n{limits}\n", common::MILO_TOML)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_bound_sheds_at_once_and_recovers() {
    let _serial = SERIAL.lock().await;
    let etcd = common::Etcd::start();
    let mut mux = start(&etcd, "max_unary_inflight = 2").await;
    let mut a = kv(&mux.url).await;
    let mut b = kv(&mux.url).await;
    a.range(range()).await.expect("a range while etcd runs");
    let before = rejections("global");

    signal(&etcd, "-STOP");
    let held = [hanging(&a), hanging(&b)];
    until_ranges_in_progress(2.0).await;
    refused(&mut a).await;
    refused(&mut b).await;
    signal(&etcd, "-CONT");
    for h in held {
        h.await.expect("task").expect("the held ranges are answered once etcd runs again");
    }
    a.range(range()).await.expect("ranges work again");
    assert_eq!(rejections("global") - before, 2.0);
    mux.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_connection_bound_leaves_other_connections_alone() {
    let _serial = SERIAL.lock().await;
    let etcd = common::Etcd::start();
    let mut mux = start(&etcd, "max_unary_inflight_per_connection = 1").await;
    let mut a = kv(&mux.url).await;
    let b = kv(&mux.url).await;
    let before = rejections("connection");

    signal(&etcd, "-STOP");
    let held_a = hanging(&a);
    until_ranges_in_progress(1.0).await;
    refused(&mut a).await;
    let held_b = hanging(&b);
    until_ranges_in_progress(2.0).await;
    assert!(!held_b.is_finished(), "another connection's call is not refused");
    signal(&etcd, "-CONT");
    held_a.await.expect("task").expect("answered");
    held_b.await.expect("task").expect("the other connection got through");
    a.range(range()).await.expect("the connection works again");
    assert_eq!(rejections("connection") - before, 1.0);
    mux.shutdown().await;
}

/// A connection that opens more than `server.connection_streams_per_turn` streams
/// at once is read over several turns of its task (counted), and every call is
/// answered; a large request body is one stream, read at full speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_opens_a_few_streams_per_turn() {
    let _serial = SERIAL.lock().await;
    let etcd = common::Etcd::start();
    let mut mux = start(&etcd, "max_unary_inflight = 1000\n[server]\nconnection_streams_per_turn = 1").await;
    let a = kv(&mux.url).await;
    let key = bytes::Bytes::from_static(b"/projects/p1/big");
    let value = bytes::Bytes::from((0..1024 * 1024).map(|i| (i % 251) as u8).collect::<Vec<u8>>());

    let before = counter(names::CONNECTION_READ_YIELDS, "");
    let mut c = a.clone();
    c.put(PutRequest { key: key.clone(), value: value.clone(), ..Default::default() }).await.expect("put");
    let big = counter(names::CONNECTION_READ_YIELDS, "") - before;
    // One stream: its 1 MiB body does not end turns (a turn per 8 KiB read would
    // be 128).
    assert!(big <= 4.0, "{big} turns ended for one large put");

    let before = counter(names::CONNECTION_READ_YIELDS, "");
    let calls: Vec<_> = (0..64).map(|_| hanging(&a)).collect();
    for call in calls {
        call.await.expect("task").expect("answered");
    }
    let many = counter(names::CONNECTION_READ_YIELDS, "") - before;
    assert!(many >= 1.0, "64 calls at once on one connection, one stream per turn: {many} turns ended");
    let mut c = a.clone();
    let got = c.range(RangeRequest { key, ..Default::default() }).await.expect("range").into_inner();
    assert_eq!(got.kvs.first().map(|kv| &kv.value), Some(&value), "the value, whole");
    mux.shutdown().await;
}

async fn open_watch(url: &str) -> (mpsc::Sender<WatchRequest>, Streaming<WatchResponse>) {
    let channel = Channel::from_shared(url.to_string()).expect("url").connect().await.expect("connect");
    let (tx, rx) = mpsc::channel(16);
    let stream = WatchClient::new(channel).watch(ReceiverStream::new(rx)).await.expect("watch").into_inner();
    (tx, stream)
}

fn create(key: &str) -> WatchRequest {
    WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
            key: bytes::Bytes::copy_from_slice(key.as_bytes()),
            ..Default::default()
        })),
    }
}

async fn next(stream: &mut Streaming<WatchResponse>) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a response in time")
        .expect("stream open")
        .expect("no error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_are_not_unary_calls() {
    let _serial = SERIAL.lock().await;
    let etcd = common::Etcd::start();
    let mut mux = start(&etcd, "max_unary_inflight = 1\nmax_unary_inflight_per_connection = 1").await;
    let mut streams = Vec::new();
    for i in 0..3 {
        let (tx, mut rx) = open_watch(&mux.url).await;
        tx.send(create(&format!("/projects/p1/w{i}"))).await.expect("send");
        assert!(next(&mut rx).await.created);
        streams.push((tx, rx));
    }
    let mut a = kv(&mux.url).await;
    a.range(range()).await.expect("open watch streams take no unary slot");
    mux.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_beyond_max_watchers_per_stream_is_refused_with_the_reason() {
    let _serial = SERIAL.lock().await;
    let etcd = common::Etcd::start();
    let mut mux = start(&etcd, "max_watchers_per_stream = 2").await;
    let before = rejections("watchers_per_stream");
    let (tx, mut rx) = open_watch(&mux.url).await;
    for i in 0..2 {
        tx.send(create(&format!("/projects/p1/w{i}"))).await.expect("send");
        let r = next(&mut rx).await;
        assert!(r.created && !r.canceled, "{r:?}");
    }
    tx.send(create("/projects/p1/w2")).await.expect("send");
    let r = next(&mut rx).await;
    assert!(r.created && r.canceled, "{r:?}");
    assert!(r.cancel_reason.starts_with("etcdmux:"), "{}", r.cancel_reason);
    assert!(r.cancel_reason.contains("max_watchers_per_stream"), "{}", r.cancel_reason);
    assert_eq!(rejections("watchers_per_stream") - before, 1.0);
    // Another stream still has room.
    let (tx2, mut rx2) = open_watch(&mux.url).await;
    tx2.send(create("/projects/p1/w3")).await.expect("send");
    let r = next(&mut rx2).await;
    assert!(r.created && !r.canceled, "{r:?}");
    mux.shutdown().await;
}

/// An apiserver starting its cachers opens thousands of watch streams at once on one
/// connection, each with one small request that etcdmux has not read yet. h2 ends a
/// connection holding too many such frames (every stream on it with it); the
/// connection window (`server.connection_window_bytes`) sets that allowance. With
/// hyper's default window this burst ended the connection at about 2,500 streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_watch_streams_on_one_connection_is_served() {
    const STREAMS: usize = 9000;
    let _serial = SERIAL.lock().await;
    let etcd = common::Etcd::start();
    let mux = common::start_mux(&etcd, common::MILO_TOML).await;
    let channel = Channel::from_shared(mux.url.clone()).expect("url").connect().await.expect("connecting");
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let mut held = Vec::with_capacity(STREAMS);
    for s in 0..STREAMS {
        let (tx, rx) = mpsc::channel(1);
        let prefix = format!("/projects/p{s}/pods/");
        let range_end = etcdmux::keyspace::prefix_end(prefix.as_bytes());
        let c = WatchCreateRequest { key: prefix.into_bytes().into(), range_end, ..Default::default() };
        tx.try_send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(c)) })
            .expect("room for the create");
        held.push(tx);
        let (mut client, done) = (WatchClient::new(channel.clone()), done_tx.clone());
        tokio::spawn(async move {
            let outcome = match client.watch(ReceiverStream::new(rx)).await {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    let first = stream.message().await;
                    let ok = matches!(&first, Ok(Some(r)) if r.created && !r.canceled);
                    let outcome = if ok { Ok(()) } else { Err(format!("{first:?}")) };
                    // The stream stays open until the test ends.
                    let _ = done.send(outcome);
                    std::future::pending::<()>().await;
                    return;
                }
                Err(e) => Err(e.to_string()),
            };
            let _ = done.send(outcome);
        });
    }
    let mut created = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while created < STREAMS {
        let next = tokio::time::timeout_at(deadline, done_rx.recv()).await;
        match next.expect("every stream answered within 120 s").expect("senders alive") {
            Ok(()) => created += 1,
            Err(e) => panic!("stream {created} of a burst of {STREAMS} on one connection failed: {e}"),
        }
    }
    drop(held);
}
