//! The upstream pool: failover across endpoints, deadlines, and a fixed number of
//! connections to etcd whatever the client count.
//!
//! These tests build the etcdmux config themselves (the harness's `start_mux` points
//! at exactly one etcd). A "dead" endpoint is a 127.0.0.1 port where nothing listens,
//! so connecting to it is refused at once (see `dead_urls`).

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Keys a fake server saw, with the grpc-timeout each request carried.
type Seen = Arc<Mutex<Vec<(Bytes, Option<String>)>>>;

use bytes::Bytes;
use common::{Etcd, Relay, MILO_TOML};
use etcdmux::pb::etcdserverpb::{
    kv_client::KvClient, kv_server, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

/// `n` distinct `http://127.0.0.1:PORT` URLs where nothing listens.
///
/// A port bound to 127.0.0.1:0 and released can be handed out again at once to a
/// listener of a test running in parallel (an etcd, a fake server), which would make
/// the "dead" endpoint alive. So the ports come from just below the kernel's
/// ephemeral range, which port-0 binds never use, and each is checked to refuse.
fn dead_urls(n: usize) -> Vec<String> {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768);
    let mut out = Vec::new();
    let mut port = low.saturating_sub(1);
    while out.len() < n && port > 1024 {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if let Err(e) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                out.push(format!("http://127.0.0.1:{port}"));
            }
        }
        port -= 1;
    }
    assert_eq!(out.len(), n, "no free ports below the ephemeral range {low}");
    out
}

fn dead_url() -> String {
    dead_urls(1).remove(0)
}

use common::start_mux_with as start_with;

async fn kv(url: &str) -> KvClient<Channel> {
    KvClient::connect(url.to_string()).await.unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

fn with_timeout<T>(msg: T, t: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(t);
    r
}

fn put_req(k: &str, v: &str) -> PutRequest {
    PutRequest {
        key: Bytes::copy_from_slice(k.as_bytes()),
        value: Bytes::copy_from_slice(v.as_bytes()),
        ..Default::default()
    }
}

fn get_req(k: &str) -> RangeRequest {
    RangeRequest { key: Bytes::copy_from_slice(k.as_bytes()), ..Default::default() }
}

/// An outer bound for a call that must not hang.
async fn bounded<F: std::future::Future>(limit: Duration, what: &str, f: F) -> F::Output {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_from_a_dead_first_endpoint() {
    common::init_tracing();
    let etcd = Etcd::start();
    let (_mux, url) = start_with(MILO_TOML, vec![dead_url(), etcd.client_url.clone()]).await;
    let mut c = kv(&url).await;
    for i in 0..20 {
        let key = format!("/projects/p/pods/ns/pod{i}");
        let put = c.put(with_timeout(put_req(&key, &format!("v{i}")), Duration::from_secs(5)));
        bounded(Duration::from_secs(10), "put", put).await.unwrap_or_else(|s| panic!("put {i}: {s:?}"));
        let get = c.range(with_timeout(get_req(&key), Duration::from_secs(5)));
        let r = bounded(Duration::from_secs(10), "get", get)
            .await
            .unwrap_or_else(|s| panic!("get {i}: {s:?}"))
            .into_inner();
        assert_eq!(r.kvs.len(), 1, "get {i}");
        assert_eq!(r.kvs[0].value, format!("v{i}").as_bytes());
        assert_eq!(r.kvs[0].key, key.as_bytes());
    }
    // Everything landed in the live etcd, in the layout.
    let mut direct = kv(&etcd.client_url).await;
    let all = direct
        .range(RangeRequest {
            key: Bytes::from_static(b"/registry/pods/clusters/p/"),
            range_end: Bytes::from_static(b"/registry/pods/clusters/p0"),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.count, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fail_over_when_the_current_endpoint_dies() {
    common::init_tracing();
    let mut x = Etcd::start();
    let y = Etcd::start();
    let (_mux, url) = start_with(MILO_TOML, vec![x.client_url.clone(), y.client_url.clone()]).await;
    let mut c = kv(&url).await;
    let key = "/projects/p/configmaps/ns/k";
    c.put(with_timeout(put_req(key, "v1"), Duration::from_secs(5))).await.expect("put through etcdmux");
    let r = c.range(with_timeout(get_req(key), Duration::from_secs(5))).await.unwrap().into_inner();
    assert_eq!(r.kvs.len(), 1);
    assert_eq!(r.kvs[0].value, b"v1".as_slice(), "the write went to X");

    x.kill();
    // Let etcdmux see the connections close (a read caught in flight on a dying
    // connection is the subject of `read_in_flight_when_etcd_dies_is_retried`).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    let get = c.range(with_timeout(get_req(key), Duration::from_secs(5)));
    let r = bounded(Duration::from_secs(10), "get after X died", get).await;
    let r = r.unwrap_or_else(|s| panic!("get after X died failed after {:?}: {s:?}", start.elapsed())).into_inner();
    // The read replica (on by default) still holds X's key: Y's read index is below
    // what it applied, so the read must go to Y (src/replica/mod.rs, "etcd_behind").
    assert!(r.kvs.is_empty(), "Y never saw the key: {:?}", r.kvs);
    assert_eq!(r.count, 0);
    assert!(start.elapsed() < Duration::from_secs(5));

    // Writes now go to Y as well.
    c.put(with_timeout(put_req(key, "v2"), Duration::from_secs(5))).await.expect("put after failover");
    let mut direct_y = kv(&y.client_url).await;
    let r = direct_y.range(get_req("/registry/configmaps/clusters/p/ns/k")).await.unwrap().into_inner();
    assert_eq!(r.kvs.len(), 1);
    assert_eq!(r.kvs[0].value, b"v2".as_slice());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_endpoints_dead_fails_quickly() {
    common::init_tracing();
    let (_mux, url) = start_with(MILO_TOML, dead_urls(2)).await;
    let mut c = kv(&url).await;

    // With a client deadline.
    let start = Instant::now();
    let get = c.range(with_timeout(get_req("/projects/p/pods/ns/a"), Duration::from_secs(2)));
    let err = bounded(Duration::from_secs(10), "get with all endpoints dead", get).await.expect_err("no etcd answered");
    let took = start.elapsed();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "code {:?}: {}",
        err.code(),
        err.message()
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");

    // Without one (etcdmux's default is 30s): the retries give up on their own.
    for req in [
        Request::new(get_req("/projects/p/pods/ns/a")),
        Request::new(RangeRequest {
            key: Bytes::from_static(b"/projects/p/"),
            range_end: Bytes::from_static(b"/projects/p0"),
            ..Default::default()
        }),
    ] {
        let start = Instant::now();
        let err =
            bounded(Duration::from_secs(15), "get without deadline", c.range(req)).await.expect_err("no etcd answered");
        assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
        assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    }
    // Writes too.
    let start = Instant::now();
    let err =
        bounded(Duration::from_secs(15), "put", c.put(put_req("/projects/p/pods/ns/a", "v"))).await.expect_err("put");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_client_deadline_never_hangs() {
    common::init_tracing();
    let etcd = Etcd::start();
    let (_mux, url) = start_with(MILO_TOML, vec![etcd.client_url.clone()]).await;
    let mut c = kv(&url).await;
    c.put(put_req("/projects/p/pods/ns/a", "v")).await.unwrap();
    for i in 0..20 {
        let get = c.range(with_timeout(get_req("/projects/p/pods/ns/a"), Duration::from_millis(1)));
        match bounded(Duration::from_secs(3), "get with a 1ms deadline", get).await {
            // A 1ms deadline may occasionally be met.
            Ok(_) => {}
            Err(s) => assert!(
                matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled),
                "attempt {i}: {:?}: {}",
                s.code(),
                s.message()
            ),
        }
        let put = c.put(with_timeout(put_req("/projects/p/pods/ns/b", "v"), Duration::from_millis(1)));
        if let Err(s) = bounded(Duration::from_secs(3), "put with a 1ms deadline", put).await {
            // etcd itself answers a write whose (propagated) deadline expires while
            // it waits for raft with "etcdserver: request timed out" (UNAVAILABLE).
            let etcd_timeout = s.code() == Code::Unavailable && s.message() == "etcdserver: request timed out";
            assert!(
                matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled) || etcd_timeout,
                "{:?}: {}",
                s.code(),
                s.message()
            );
        }
    }
    // etcdmux still serves normally afterwards.
    let r = c.range(get_req("/projects/p/pods/ns/a")).await.unwrap().into_inner();
    assert_eq!(r.kvs.len(), 1);
}

/// A fake etcd KV service that records the key and `grpc-timeout` of every Range
/// and never answers one.
#[derive(Clone, Default)]
struct StalledKv {
    seen: Seen,
}

impl StalledKv {
    /// The `grpc-timeout`s of the Ranges of upstream key `key` (etcdmux's watch hub
    /// reads its own key at start as well).
    fn timeouts_for(&self, key: &[u8]) -> Vec<Option<String>> {
        self.seen.lock().unwrap().iter().filter(|(k, _)| k.as_ref() == key).map(|(_, t)| t.clone()).collect()
    }
}

#[tonic::async_trait]
impl kv_server::Kv for StalledKv {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let t = req.metadata().get("grpc-timeout").and_then(|v| v.to_str().ok()).map(str::to_string);
        self.seen.lock().unwrap().push((req.get_ref().key.clone(), t));
        tokio::time::sleep(Duration::from_secs(60)).await;
        Err(Status::internal("stalled upstream answered"))
    }
    async fn put(&self, _: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn delete_range(&self, _: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn txn(&self, _: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn compact(&self, _: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

fn grpc_timeout_ms(v: &str) -> f64 {
    let (n, unit) = v.split_at(v.len() - 1);
    let n: f64 = n.parse().unwrap();
    match unit {
        "H" => n * 3_600_000.0,
        "M" => n * 60_000.0,
        "S" => n * 1000.0,
        "m" => n,
        "u" => n / 1000.0,
        "n" => n / 1_000_000.0,
        _ => panic!("bad grpc-timeout {v}"),
    }
}

/// The client's deadline travels to etcd, shortened by the time already spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_deadline_is_propagated_upstream() {
    common::init_tracing();
    let fake = StalledKv::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(kv_server::KvServer::new(fake.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let (_mux, url) = start_with(MILO_TOML, vec![fake_url]).await;
    let mut c = kv(&url).await;

    let start = Instant::now();
    let get = c.range(with_timeout(get_req("/projects/p/pods/ns/a"), Duration::from_millis(800)));
    let err = bounded(Duration::from_secs(5), "get against a stalled etcd", get).await.expect_err("stalled etcd");
    let took = start.elapsed();
    assert!(matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled), "{:?}: {}", err.code(), err.message());
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let seen = fake.timeouts_for(b"/registry/pods/clusters/p/ns/a");
    assert_eq!(seen.len(), 1, "one upstream attempt: {seen:?}");
    let t = seen[0].as_deref().expect("etcdmux sent no grpc-timeout upstream");
    let ms = grpc_timeout_ms(t);
    assert!(ms > 0.0 && ms <= 800.0, "upstream grpc-timeout {t} is not within the client's 800ms");
    server.abort();
}

/// An upstream that accepts connections and never says anything: etcdmux's own
/// deadline (here the configured default, as the client sent none) must end the call
/// with etcd's DEADLINE_EXCEEDED "context deadline exceeded", every time.
///
/// Regression test (was a bug in src/upstream.rs `Upstream::call` with `CallCtx::request`): the outgoing
/// request carries `set_timeout(remaining)`, so tonic's client-side timeout layer on
/// the upstream `Channel` expires at the same instant as `timeout_at(ctx.deadline)`.
/// `timeout_at` polls the inner future first, so whichever timer the runtime sees
/// first decides the answer: often (about 2 in 5 calls here) the client gets tonic's
/// CANCELLED "Timeout expired" instead of DEADLINE_EXCEEDED "context deadline
/// exceeded" (etcd's answer for an expired deadline). Twenty concurrent calls make
/// the race show on practically every run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_deadline_ends_calls_to_a_silent_upstream() {
    common::init_tracing();
    let hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_url = format!("http://{}", hole.local_addr().unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    hole.set_nonblocking(true).unwrap();
    let holder = std::thread::spawn(move || {
        let mut conns = Vec::new();
        let mut buf = [0u8; 4096];
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((s, _)) = hole.accept() {
                s.set_nonblocking(true).unwrap();
                conns.push(s);
            }
            for s in &mut conns {
                let _ = s.read(&mut buf); // swallow whatever etcdmux sends
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let toml = format!("{MILO_TOML}\n[upstream]\ndefault_timeout_ms = 700\n");
    let (_mux, url) = start_with(&toml, vec![hole_url]).await;
    let c = kv(&url).await;
    let mut answers = Vec::new();
    // Four rounds of ten concurrent calls, started a little apart.
    for round in 0..4 {
        let start = Instant::now();
        let calls: Vec<_> = (0..10)
            .map(|i| {
                let mut c = c.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_micros(i * 370)).await;
                    c.range(get_req(&format!("/projects/p/pods/ns/a{i}"))).await
                })
            })
            .collect();
        for call in calls {
            let r = bounded(Duration::from_secs(5), "get against a silent etcd", call).await.unwrap();
            let err = r.expect_err("silent etcd answered");
            answers.push(format!("{:?}: {}", err.code(), err.message()));
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(600) && took < Duration::from_secs(3), "round {round} took {took:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    holder.join().unwrap();
    let wrong: Vec<&String> = answers.iter().filter(|a| *a != "DeadlineExceeded: context deadline exceeded").collect();
    assert!(
        wrong.is_empty(),
        "{} of {} calls did not end with DEADLINE_EXCEEDED: {wrong:?}",
        wrong.len(),
        answers.len()
    );
}

/// A read that is in flight when its etcd dies is safe to repeat: etcdmux must retry
/// it on the next endpoint, as it does for a refused connection.
///
/// Regression test (was a bug in src/upstream.rs `Upstream::call`): only `Code::Unavailable` is retried, but a
/// request whose HTTP/2 connection closes under it fails in tonic with
/// `Code::Unknown` "transport error", so the read is not retried or failed over and
/// the client gets UNKNOWN "transport error". (Also seen with a real etcd killed
/// just before a read: `reads_fail_over_when_the_current_endpoint_dies` without its
/// short pause fails now and then with the same status.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_in_flight_when_etcd_dies_is_retried() {
    common::init_tracing();
    // X: an etcd stand-in that never answers a Range, behind a relay we can cut.
    let fake = StalledKv::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(kv_server::KvServer::new(fake.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let x = Relay::start(&fake_addr.to_string()).await;
    let y = Etcd::start();
    let (_mux, url) = start_with(MILO_TOML, vec![x.url.clone(), y.client_url.clone()]).await;
    let mut c = kv(&url).await;

    let get =
        tokio::spawn(
            async move { c.range(with_timeout(get_req("/projects/p/pods/ns/a"), Duration::from_secs(8))).await },
        );
    // Wait until the read is stuck in X, then X dies.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.timeouts_for(b"/registry/pods/clusters/p/ns/a").is_empty() {
        assert!(Instant::now() < deadline, "the read never reached X");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    x.stop();
    let r = bounded(Duration::from_secs(10), "read in flight when X died", get).await.unwrap();
    let r = r.unwrap_or_else(|s| panic!("the read was not retried on Y: {:?}: {}", s.code(), s.message()));
    assert!(r.into_inner().kvs.is_empty());
    server.abort();
}

/// Socket inodes of this process (`/proc/self/fd/* -> socket:[N]`).
fn own_socket_inodes() -> HashSet<u64> {
    let mut out = HashSet::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if let Ok(target) = std::fs::read_link(e.path()) {
            let t = target.to_string_lossy();
            if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                out.insert(n.parse().unwrap());
            }
        }
    }
    out
}

/// Established TCP connections from this process to `port` on the local host
/// (from /proc/net/tcp and tcp6: remote port column, state 01, inode column).
fn established_to(port: u16) -> usize {
    let mine = own_socket_inodes();
    let mut n = 0;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 {
                continue;
            }
            let remote_port = cols[2].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            let inode: u64 = cols[9].parse().unwrap_or(0);
            if remote_port == Some(port) && cols[3] == "01" && mine.contains(&inode) {
                n += 1;
            }
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_a_few_upstream_connections() {
    common::init_tracing();
    let etcd = Etcd::start();
    let port: u16 = etcd.client_url.rsplit(':').next().unwrap().parse().unwrap();
    let (_mux, url) = start_with(MILO_TOML, vec![etcd.client_url.clone()]).await;
    // (The watch hub opens its upstream watch at start, on a pooled connection.)
    assert!(established_to(port) <= 2);

    let mut tasks = Vec::new();
    for client in 0..50 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            // Each client has its own connection to etcdmux.
            let mut c = kv(&url).await;
            for i in 0..4 {
                let key = format!("/projects/t{}/pods/ns/c{client}-{i}", client % 7);
                c.put(with_timeout(put_req(&key, "v"), Duration::from_secs(10))).await.unwrap();
                let r = c.range(with_timeout(get_req(&key), Duration::from_secs(10))).await.unwrap().into_inner();
                assert_eq!(r.kvs.len(), 1);
            }
            c
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(bounded(Duration::from_secs(60), "client", t).await.unwrap());
    }
    let mux_port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(established_to(mux_port), 50, "each client holds its own connection to etcdmux");
    let n = established_to(port);
    // The default pool is `connections = 2` per endpoint.
    assert!((1..=2).contains(&n), "{n} connections from etcdmux to etcd for 50 clients");
    drop(clients);
}

/// Snapshot (a server stream) must fail over like every unary call: once the
/// current endpoint has died, a snapshot must be served by the next one.
///
/// Regression test (was a bug in src/maintenance.rs `MaintenanceService::snapshot`): it takes
/// `upstream.channel()` of the current endpoint and calls etcd once, outside
/// `Upstream::call`, so it never retries and never moves the pool. After X dies,
/// every Snapshot answers UNAVAILABLE "tcp connect error" until some unary request
/// happens to fail over (here none does; the same holds for LeaseKeepAlive,
/// src/lease.rs, and the watch hub, see the next test). With [dead, live] at start
/// the watch hub's first unary read moves the pool, which hides the bug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_fails_over_when_the_current_endpoint_dies() {
    common::init_tracing();
    let mut x = Etcd::start();
    let y = Etcd::start();
    let (_mux, url) = start_with(MILO_TOML, vec![x.client_url.clone(), y.client_url.clone()]).await;
    let mut c = common::client(&url).await;
    c.put("/projects/p/pods/ns/a", "v", None).await.expect("put through etcdmux");
    x.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut last = None;
    for _ in 0..5 {
        let attempt = async {
            let mut s = c.snapshot().await?;
            let mut n = 0;
            while let Some(m) = s.message().await? {
                n += m.blob().len();
            }
            Ok::<usize, etcd_client::Error>(n)
        };
        match bounded(Duration::from_secs(10), "snapshot", attempt).await {
            Ok(n) => {
                assert!(n > 0);
                return;
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("Snapshot never succeeded after the current endpoint died (Y is alive): {last:?}");
}

/// The watch hub's upstream watch must move to the next endpoint when its etcd dies,
/// as unary calls do.
///
/// Y is a separate etcd here, prepared so that its history covers the revisions the
/// hub resumes from: the hub re-opens at its last revision + 1, and Y replays the
/// tenant events it holds from there on.
///
/// Regression test (was a bug in src/watch/hub.rs `Hub::watch_upstream`): it opens the upstream watch on
/// `upstream.channel()` and, when it breaks, re-opens on the same channel forever
/// (`run_upstream` backs off up to 5s); nothing calls the pool's failover, so after X
/// dies no watcher gets another event until some unary request moves the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_hub_fails_over_when_the_current_endpoint_dies() {
    common::init_tracing();
    let mut x = Etcd::start();
    let y = Etcd::start();
    // Y's history: tenant p's keys in the layout, well past X's revision.
    let mut direct_y = kv(&y.client_url).await;
    for i in 0..10 {
        direct_y.put(put_req(&format!("/registry/pods/clusters/p/ns/y{i}"), "from-y")).await.unwrap();
    }
    let (_mux, url) = start_with(MILO_TOML, vec![x.client_url.clone(), y.client_url.clone()]).await;
    let mut c = common::client(&url).await;
    c.put("/projects/p/pods/ns/a", "v", None).await.expect("put through etcdmux");
    let mut w = c
        .watch("/projects/p/", Some(etcd_client::WatchOptions::new().with_prefix()))
        .await
        .expect("watch through etcdmux");
    let created = bounded(Duration::from_secs(5), "watch created", w.message()).await.unwrap().unwrap();
    assert!(created.created());

    x.kill();
    // New writes on Y while the hub should be moving there.
    for i in 0..3 {
        direct_y.put(put_req(&format!("/registry/pods/clusters/p/ns/after{i}"), "from-y")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match w.message().await {
                Ok(Some(r)) if !r.events().is_empty() => return Ok(r),
                Ok(Some(_)) => continue,
                Ok(None) => return Err("watch stream ended".to_string()),
                Err(e) => return Err(format!("{e:?}")),
            }
        }
    })
    .await;
    match got {
        Ok(Ok(r)) => {
            let kv = r.events()[0].kv().unwrap();
            assert!(kv.key_str().unwrap().starts_with("/projects/p/pods/ns/"), "{:?}", kv.key_str());
            assert_eq!(kv.value(), b"from-y");
        }
        Ok(Err(e)) => panic!("watch failed after X died: {e}"),
        Err(_) => panic!("no watch event in 10s after X died: the hub never moved to Y"),
    }
}

/// After `Running::shutdown` etcdmux holds no connection to etcd any more.
///
/// Regression test (was a low-severity bug in src/server.rs `start` / src/watch/hub.rs `Hub::start`): the watch hub's
/// tasks (upstream watch, progress ticker) are spawned outside the shutdown signal
/// and hold the `Proxy`, so after `shutdown()` returns the hub keeps its upstream
/// watch and connection open (and re-opens them, forever) for as long as the runtime
/// lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_upstream_connections() {
    common::init_tracing();
    let etcd = Etcd::start();
    let port: u16 = etcd.client_url.rsplit(':').next().unwrap().parse().unwrap();
    let (mux, url) = start_with(MILO_TOML, vec![etcd.client_url.clone()]).await;
    {
        let mut c = kv(&url).await;
        c.put(put_req("/projects/p/pods/ns/a", "v")).await.unwrap();
    }
    assert!(established_to(port) >= 1);
    bounded(Duration::from_secs(15), "shutdown", mux.shutdown()).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while established_to(port) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = established_to(port);
    let watchers = etcd.metric("etcd_debugging_mvcc_watcher_total");
    assert_eq!(left, 0, "{left} connection(s) to etcd still open 5s after shutdown; etcd watchers: {watchers:?}");
}
