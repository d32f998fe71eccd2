//! The watch path against hostile or broken clients and a broken etcd: progress
//! floods, clients that never read, garbage on the stream, etcd refusing writes,
//! and shutdown. Each test runs etcdmux in-process (Watch and KV services) so it can
//! look at the process's tasks, and scrapes etcdmux's `/metrics`; the tests share
//! the process's metrics, so they run one at a time.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcdmux::grpc::kv::KvService;
use etcdmux::grpc::watch::WatchService;
use etcdmux::metrics::names;
use etcdmux::ops::Proxy;
use etcdmux::pb::etcdserverpb::{
    alarm_request::AlarmAction, kv_client::KvClient, kv_server::KvServer, maintenance_client::MaintenanceClient,
    watch_client::WatchClient, watch_request, AlarmRequest, AlarmType, PutRequest, RangeRequest, StatusRequest,
    WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use etcdmux::watch::Hub;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Streaming};

/// The tests read process-wide metrics: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Installs etcdmux's metrics recorder for this test process (once; later calls
/// share it) and renders its `/metrics` text.
fn metrics_text() -> String {
    etcdmux::metrics::install().expect("metrics recorder").render()
}

async fn metric(name: &'static str) -> f64 {
    common::sum_metric(&metrics_text(), name).unwrap_or(0.0)
}

/// An in-process etcdmux (Watch and KV) whose proxy and hub the test can reach.
struct Served {
    proxy: Arc<Proxy>,
    hub: Arc<Hub>,
    url: String,
    server: tokio::task::JoinHandle<()>,
}

async fn serve(etcd: &common::Etcd, watch: &str) -> Served {
    metrics_text();
    let toml = format!("{}\n[watch]\nreconnect_backoff_ms = 50\n{watch}\n", common::MILO_TOML);
    let mut cfg = etcdmux::config::Config::parse(&toml, "test").unwrap();
    cfg.upstream.endpoints = vec![etcd.client_url.clone()];
    cfg.validate().unwrap();
    let proxy = Proxy::new(cfg).unwrap();
    let hub = Hub::new(&proxy.cfg.watch, proxy.layout.clone());
    hub.start(proxy.clone());
    let scope = proxy.resolver.scope(None).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = Server::builder()
        .add_service(WatchService::new(proxy.clone(), scope.clone(), hub.clone()))
        .add_service(KvServer::new(KvService::new(proxy.clone(), scope)));
    let tasks = proxy.tasks.clone();
    let server = tokio::spawn(async move {
        let _ = router.serve_with_incoming_shutdown(TcpIncoming::from(listener), tasks.cancelled()).await;
    });
    hub.ready().await;
    Served { proxy, hub, url, server }
}

impl Served {
    async fn stop(self) {
        self.proxy.tasks.shut_down();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.proxy.tasks.wait()).await;
        self.server.abort();
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn progress() -> WatchRequest {
    WatchRequest { request_union: Some(watch_request::RequestUnion::ProgressRequest(WatchProgressRequest {})) }
}

fn create(id: i64, key: &str) -> WatchRequest {
    let c = WatchCreateRequest {
        key: b(key),
        range_end: etcdmux::keyspace::prefix_end(key.as_bytes()),
        watch_id: id,
        ..Default::default()
    };
    WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(c)) }
}

fn cancel(id: i64) -> WatchRequest {
    WatchRequest {
        request_union: Some(watch_request::RequestUnion::CancelRequest(WatchCancelRequest { watch_id: id })),
    }
}

fn is_progress(r: &WatchResponse) -> bool {
    r.watch_id == -1 && r.events.is_empty() && !r.created && !r.canceled
}

/// A watch stream whose requests the test sends; its responses are not read until
/// the test reads them. Its stream's HTTP/2 window is small, so a client that does
/// not read stops taking responses after a few dozen (and h2's guard against many
/// small unread DATA frames, sized by the connection window, stays quiet).
async fn open(url: &str) -> (mpsc::Sender<WatchRequest>, Streaming<WatchResponse>) {
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .initial_stream_window_size(4096)
        .initial_connection_window_size(1 << 20)
        .connect()
        .await
        .unwrap();
    let mut client = WatchClient::new(channel);
    let (tx, rx) = mpsc::channel(1024);
    let stream = client.watch(ReceiverStream::new(rx)).await.unwrap().into_inner();
    (tx, stream)
}

async fn etcd_rev(direct: &mut KvClient<Channel>) -> i64 {
    direct
        .range(RangeRequest { key: b("\0"), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision
}

/// A client floods progress requests and never reads. Probes are shared by every
/// stream, one at a time: a handful of fence writes (etcd 3.4.23 has no reliable
/// progress answers), another tenant's writes keep working, and what etcdmux holds
/// for the stream stays within its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_flood_costs_a_few_fences_and_a_bounded_queue() {
    let _serial = SERIAL.lock().await;
    common::init_tracing();
    let etcd = common::Etcd::start();
    let mux = serve(&etcd, "stream_buffer = 1024\nstream_control_reserve = 64").await;
    let mut direct = KvClient::connect(etcd.client_url.clone()).await.unwrap();
    let fences_before = metric(names::WATCH_PROGRESS_FENCES).await;
    let rev_before = etcd_rev(&mut direct).await;

    let (tx, _unread) = open(&mux.url).await;
    tx.send(create(1, "/projects/flood/pods/")).await.unwrap();
    let flood = tokio::spawn(async move {
        for _ in 0..40_000 {
            if tx.send(progress()).await.is_err() {
                break;
            }
        }
        tx
    });

    // Another tenant writes meanwhile: every put succeeds.
    let mut kv = KvClient::connect(mux.url.clone()).await.unwrap();
    let puts = 200;
    for i in 0..puts {
        let put = PutRequest { key: b(&format!("/projects/other/pods/ns/k{i}")), value: b("v"), ..Default::default() };
        kv.put(put).await.unwrap_or_else(|e| panic!("put {i} of the other tenant failed: {e}"));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let fences = metric(names::WATCH_PROGRESS_FENCES).await - fences_before;
    let grew = etcd_rev(&mut direct).await - rev_before - puts;
    let queued = metric(names::WATCH_QUEUED_RESPONSES).await;
    let waiters = metric(names::WATCH_PROGRESS_WAITERS).await;
    eprintln!("fences {fences}, revisions beyond the puts {grew}, queued {queued}, waiting {waiters}");
    assert!(fences >= 1.0, "the flood was answered through fences");
    assert!(grew <= 10 && fences <= 10.0, "a flood of progress requests wrote {grew} fences");
    assert!(queued <= 1024.0 + 64.0, "{queued} responses queued on a stream with a budget of 1024 + 64");
    assert!(waiters <= 1024.0 + 64.0, "{waiters} progress requests waiting");
    flood.abort();
    mux.stop().await;
}

/// A client sends thousands of create/cancel/progress requests with
/// `stream_buffer = 4` and never reads: etcdmux stops reading its requests once the
/// responses they cost fill the budget, and the stream still works once the client
/// reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_responses_count_against_the_stream_budget() {
    let _serial = SERIAL.lock().await;
    common::init_tracing();
    let etcd = common::Etcd::start();
    let mux = serve(&etcd, "stream_buffer = 4\nstream_control_reserve = 4").await;
    let (tx, mut stream) = open(&mux.url).await;
    let created_before = metric(names::WATCH_CREATED).await;
    let requests = 3000;
    let sender = tokio::spawn(async move {
        for i in 1..=requests {
            for r in [create(i, "/projects/ctl/pods/"), cancel(i), progress()] {
                if tx.send(r).await.is_err() {
                    return tx;
                }
            }
        }
        tx
    });
    let mut max_queued: f64 = 0.0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        max_queued = max_queued.max(metric(names::WATCH_QUEUED_RESPONSES).await);
    }
    // Requests read while the client did not read: a budget's worth, plus what its
    // connection took before its window filled.
    let created = metric(names::WATCH_CREATED).await - created_before;
    eprintln!("queued at most {max_queued}, {created} watchers created while the client did not read");
    assert!(created < 200.0, "{created} of {requests} creates served to a client that does not read");
    assert!(max_queued <= 8.0, "{max_queued} responses queued with stream_buffer = 4 (+ 4 reserve)");

    // The client reads now: every request gets its answer, in order, and the stream
    // works.
    let mut created = 0;
    let mut cancelled = 0;
    let mut answers = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while answers < requests {
        assert!(Instant::now() < deadline, "only {created} created, {cancelled} cancelled, {answers} progress");
        let r = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a response")
            .expect("the stream still works")
            .expect("the stream is open");
        if r.created {
            created += 1;
        } else if r.canceled {
            cancelled += 1;
        } else if is_progress(&r) {
            answers += 1;
        }
    }
    assert_eq!((created, cancelled), (requests, requests));
    let tx = sender.await.unwrap();
    tx.send(create(requests + 1, "/projects/ctl/pods/")).await.unwrap();
    let created = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
    assert!(created.created && created.watch_id == requests + 1);
    let mut kv = KvClient::connect(mux.url.clone()).await.unwrap();
    kv.put(PutRequest { key: b("/projects/ctl/pods/ns/x"), value: b("v"), ..Default::default() }).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
    assert_eq!((ev.watch_id, ev.events.len()), (requests + 1, 1), "{ev:?}");
    drop(stream);
    mux.stop().await;
    assert_eq!(metric(names::WATCH_QUEUED_RESPONSES).await, 0.0, "every queued response was accounted for");
}

/// etcd refuses writes (NOSPACE) while progress requests pour in: one fence writer
/// at a time, a bounded number of attempts, the failures counted; the streams whose
/// requests cannot be proved end with UNAVAILABLE (never a guessed revision), and
/// once the alarm is cleared progress answers resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_fence_writes_are_bounded_and_progress_resumes() {
    let _serial = SERIAL.lock().await;
    common::init_tracing();
    let etcd = common::Etcd::start();
    let mux = serve(&etcd, "progress_probe_timeout_ms = 1500\nprogress_fence_attempts = 3").await;
    let mut direct = KvClient::connect(etcd.client_url.clone()).await.unwrap();
    let mut maint = MaintenanceClient::connect(etcd.client_url.clone()).await.unwrap();
    let member = maint.status(StatusRequest {}).await.unwrap().into_inner().header.unwrap().member_id;
    let alarm = |action: AlarmAction| AlarmRequest {
        action: action as i32,
        member_id: member,
        alarm: AlarmType::Nospace as i32,
    };
    let failures_before = metric(names::WATCH_PROGRESS_FENCE_FAILURES).await;

    // A write outside etcdmux's layout: the hub cannot prove it reached etcd's
    // revision by a read alone, only by a fence.
    direct.put(PutRequest { key: b("outside/key"), value: b("v"), ..Default::default() }).await.unwrap();
    maint.alarm(alarm(AlarmAction::Activate)).await.unwrap();
    let refused = direct.put(PutRequest { key: b("outside/key2"), value: b("v"), ..Default::default() }).await;
    assert!(refused.is_err(), "etcd refuses writes under the NOSPACE alarm");
    let etcd_rev_now = etcd_rev(&mut direct).await;

    let mut streams = Vec::new();
    for s in 0..3 {
        let (tx, mut stream) = open(&mux.url).await;
        tx.send(create(1, &format!("/projects/s{s}/pods/"))).await.unwrap();
        let reader = tokio::spawn(async move {
            // Every response until the stream ends: (progress revisions, end status).
            let mut revs = Vec::new();
            loop {
                match stream.message().await {
                    Ok(Some(r)) if is_progress(&r) => revs.push(r.header.map_or(0, |h| h.revision)),
                    Ok(Some(_)) => {}
                    Ok(None) => return (revs, None),
                    Err(s) => return (revs, Some(s)),
                }
            }
        });
        let flood = tokio::spawn(async move {
            for _ in 0..2000 {
                if tx.send(progress()).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        streams.push((reader, flood));
    }
    let mut max_writers: f64 = 0.0;
    let mut max_tasks = 0;
    // Every fence write is a proposal etcd commits (and refuses when applied).
    let proposals = || etcd.metric("etcd_server_proposals_committed_total").unwrap_or(0.0);
    let proposals_before = proposals();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        max_writers = max_writers.max(metric(names::WATCH_PROGRESS_FENCE_WRITERS).await);
        max_tasks = max_tasks.max(mux.proxy.tasks.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let attempts = proposals() - proposals_before;
    let failures = metric(names::WATCH_PROGRESS_FENCE_FAILURES).await - failures_before;
    eprintln!(
        "fence writers at most {max_writers}, tasks at most {max_tasks}, {failures} failed fence writes, {attempts} proposals"
    );
    // 3 attempts per probe of at least ~150 ms (backoff 50 + 100 ms): a bounded rate.
    let bound = 3.0 * (4.0 / 0.15 + 2.0);
    assert!(attempts <= bound, "{attempts} writes reached etcd in 4 s");
    assert!(max_writers <= 1.0, "{max_writers} fence writers at once");
    // The hub's upstream, ticker and link, plus the fence writer: streams have no task.
    assert!(max_tasks <= 4 + 1, "{max_tasks} tasks alive");
    assert!(failures >= 3.0 && failures <= bound, "{failures} failed fence writes in 4 s");
    for (reader, flood) in streams {
        flood.abort();
        let (revs, end) =
            tokio::time::timeout(Duration::from_secs(10), reader).await.expect("the stream ended").unwrap();
        assert!(revs.iter().all(|&r| r >= etcd_rev_now), "a progress answer {revs:?} behind etcd's {etcd_rev_now}");
        let end = end.expect("the stream ended with an error, not OK");
        assert_eq!(end.code(), Code::Unavailable, "{end:?}");
        assert!(end.message().starts_with("etcdmux: cannot prove watch progress"), "{end:?}");
    }

    maint.alarm(alarm(AlarmAction::Deactivate)).await.unwrap();
    let (tx, mut stream) = open(&mux.url).await;
    tx.send(progress()).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("progress answered once etcd takes writes again")
        .unwrap()
        .unwrap();
    assert!(is_progress(&answer), "{answer:?}");
    assert!(answer.header.unwrap().revision >= etcd_rev_now);
    mux.stop().await;
}

/// Bytes on the stream that are not a WatchRequest: the stream ends with an error
/// status, as etcd's does, never with OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_watch_stream_ends_it_with_an_error() {
    let _serial = SERIAL.lock().await;
    let etcd = common::Etcd::start();
    let mux = serve(&etcd, "").await;
    let channel = Channel::from_shared(mux.url.clone()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    // Field 1 with wire type 7: not protobuf.
    let garbage = tokio_stream::iter([Bytes::from_static(&[0x0f, 0x01, 0x02])]).chain(tokio_stream::pending::<Bytes>());
    let path = http::uri::PathAndQuery::from_static("/etcdserverpb.Watch/Watch");
    let mut stream = grpc.streaming(tonic::Request::new(garbage), path, common::RawCodec).await.unwrap().into_inner();
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("the stream ended");
    match end {
        Err(s) => {
            assert_ne!(s.code(), Code::Ok);
            assert!(s.message().starts_with("etcdmux:"), "{s:?}");
        }
        Ok(r) => panic!("a garbage request got {r:?} instead of an error status"),
    }
    mux.stop().await;
}

/// etcdmux frames Watch streams itself (not tonic's codec): what the codec refused is
/// refused the same way, with its texts. A compressed stream is refused before it
/// opens; a request over `max_request_bytes` and a response over
/// `max_response_bytes` end the stream with OUT_OF_RANGE, never with OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_framing_refuses_compression_and_oversized_messages() {
    let _serial = SERIAL.lock().await;
    let etcd = common::Etcd::start();
    let mux = serve(&etcd, "\n[server]\nmax_response_bytes = 4096\n").await;
    let channel = Channel::from_shared(mux.url.clone()).unwrap().connect().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/etcdserverpb.Watch/Watch");
    let mut grpc = tonic::client::Grpc::new(channel);

    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(tokio_stream::pending::<Bytes>());
    req.metadata_mut().insert("grpc-encoding", "gzip".parse().unwrap());
    let refused = grpc.streaming(req, path.clone(), common::RawCodec).await.expect_err("a gzip stream");
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    assert!(refused.message().contains("`gzip`"), "{refused:?}");

    grpc.ready().await.unwrap();
    let huge = Bytes::from(vec![0u8; 3 << 20]);
    let msgs = tokio_stream::iter([huge]).chain(tokio_stream::pending::<Bytes>());
    let mut stream = grpc.streaming(tonic::Request::new(msgs), path, common::RawCodec).await.unwrap().into_inner();
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("the stream ended");
    let s = end.expect_err("a request over the limit");
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    assert!(s.message().contains("decoded message length too large"), "{s:?}");

    let (tx, mut stream) = open(&mux.url).await;
    tx.send(create(1, "/projects/big/pods/")).await.unwrap();
    let created = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
    assert!(created.created && !created.canceled, "{created:?}");
    let mut kv = KvClient::connect(mux.url.clone()).await.unwrap();
    let put =
        PutRequest { key: b("/projects/big/pods/ns/a"), value: Bytes::from(vec![b'x'; 8192]), ..Default::default() };
    kv.put(put).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("the stream ended");
    let s = end.expect_err("an event over the response limit");
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    assert!(s.message().contains("encoded message length too large"), "{s:?}");
    mux.stop().await;
}

/// A watch stream is served by hyper's task for its HTTP/2 stream alone: opening
/// streams adds no task of etcdmux's, and a client that goes away takes its
/// watchers out of the hub (nothing but the stream's own state held them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_have_no_task_of_their_own_and_leave_nothing_behind() {
    let _serial = SERIAL.lock().await;
    common::init_tracing();
    let etcd = common::Etcd::start();
    let mux = serve(&etcd, "").await;
    let tasks_before = mux.proxy.tasks.len();
    let streams_before = metric(names::WATCH_STREAMS).await;
    let mut streams = Vec::new();
    for s in 0..20 {
        let (tx, mut stream) = open(&mux.url).await;
        tx.send(create(1, &format!("/projects/t{s}/pods/"))).await.unwrap();
        tx.send(create(2, &format!("/projects/t{s}/configmaps/"))).await.unwrap();
        for id in [1, 2] {
            let r = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
            assert!(r.created && !r.canceled && r.watch_id == id, "{r:?}");
        }
        streams.push((tx, stream));
    }
    assert_eq!(metric(names::WATCH_WATCHERS).await, 40.0);
    assert_eq!(metric(names::WATCH_STREAMS).await - streams_before, 20.0);
    assert_eq!(mux.proxy.tasks.len(), tasks_before, "20 streams started no task");

    // Half the clients close their side only: their watches keep running.
    let mut half: Vec<_> = streams.drain(..10).map(|(_tx, stream)| stream).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(metric(names::WATCH_WATCHERS).await, 40.0, "a half-closed stream keeps its watches");
    let mut kv = KvClient::connect(mux.url.clone()).await.unwrap();
    let put = PutRequest { key: b("/projects/t3/pods/ns/x"), value: b("v"), ..Default::default() };
    kv.put(put).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), half[3].message()).await.unwrap().unwrap().unwrap();
    assert_eq!((r.watch_id, r.events.len()), (1, 1), "{r:?}");

    // Every client goes away: every watcher leaves the hub.
    drop((half, streams));
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(names::WATCH_WATCHERS).await > 0.0 || metric(names::WATCH_STREAMS).await > streams_before {
        assert!(Instant::now() < deadline, "watchers of clients that went away are still in the hub");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(mux.proxy.tasks.len(), tasks_before);
    mux.stop().await;
}

/// Shutdown: every watch stream ends with UNAVAILABLE (hub watchers, passthrough
/// watches, a stream waiting for progress, a stream whose client does not read), the
/// hub's tasks end, and nothing the watch path spawned is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_every_watch_stream_with_unavailable() {
    let _serial = SERIAL.lock().await;
    common::init_tracing();
    let etcd = common::Etcd::start();
    let mux = serve(&etcd, "stream_buffer = 4").await;
    let mut kv = KvClient::connect(mux.url.clone()).await.unwrap();

    let (hub_tx, hub_stream) = open(&mux.url).await;
    hub_tx.send(create(1, "/projects/a/pods/")).await.unwrap();
    let (pt_tx, pt_stream) = open(&mux.url).await;
    let global = WatchCreateRequest { key: b("health"), watch_id: 1, ..Default::default() };
    pt_tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(global)) }).await.unwrap();
    let (pr_tx, pr_stream) = open(&mux.url).await;
    pr_tx.send(progress()).await.unwrap();
    let (full_tx, mut full_stream) = open(&mux.url).await;
    full_tx.send(create(1, "/projects/full/pods/")).await.unwrap();
    for i in 0..50 {
        let put = PutRequest { key: b(&format!("/projects/full/pods/ns/k{i}")), value: b("v"), ..Default::default() };
        kv.put(put).await.unwrap();
    }
    let mut readers = Vec::new();
    for mut s in [hub_stream, pt_stream, pr_stream] {
        readers.push(tokio::spawn(async move {
            loop {
                match s.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return None,
                    Err(st) => return Some(st),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    mux.proxy.tasks.shut_down();
    for r in readers {
        let end = tokio::time::timeout(Duration::from_secs(5), r).await.expect("the stream ended").unwrap();
        let end = end.expect("ended with a status, not OK");
        assert_eq!(end.code(), Code::Unavailable, "{end:?}");
        assert!(end.message().starts_with("etcdmux:"), "{end:?}");
    }
    // The client that did not read gets what was already sent, then UNAVAILABLE.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match full_stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(s) => return Some(s),
            }
        }
    })
    .await
    .expect("the unread stream ended");
    assert_eq!(end.map(|s| s.code()), Some(Code::Unavailable));
    tokio::time::timeout(Duration::from_secs(5), mux.hub.stopped()).await.expect("the hub's tasks ended");
    tokio::time::timeout(Duration::from_secs(10), mux.proxy.tasks.wait()).await.expect("every task ended");
    assert!(mux.proxy.tasks.is_empty());
    drop((hub_tx, pt_tx, pr_tx, full_tx));
    mux.server.abort();
}
