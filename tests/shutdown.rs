//! The etcdmux binary's shutdown, as an operator (or Kubernetes) triggers it.
//!
//! SIGTERM: stop accepting, let unary calls in flight finish, end watch and
//! keepalive streams with UNAVAILABLE (clients reconnect and resume), stop the hub
//! last, exit 0 — well within `server.shutdown_grace_ms`. A second SIGTERM exits at
//! once.

mod common;

use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use etcdmux::pb::etcdserverpb::{
    kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient, watch_request, LeaseGrantRequest,
    LeaseKeepAliveRequest, PutRequest, RangeRequest, WatchCreateRequest, WatchRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

use common::{free_port, Etcd};

/// Long enough that a test which waits for it would notice.
const GRACE_MS: u64 = 20_000;

/// The etcdmux process, killed on drop.
struct Mux {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Mux {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mux {
    fn start(etcd: &Etcd) -> Mux {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let config = format!(
            "{}\n[server]\nshutdown_grace_ms = {GRACE_MS}\n\n[watch]\nring_events = 8\n",
            common::MILO_TOML.replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
        );
        let path = dir.path().join("etcdmux.toml");
        std::fs::write(&path, config).expect("writing config");
        let child = Command::new(env!("CARGO_BIN_EXE_etcdmux"))
            .arg("--config")
            .arg(&path)
            .args(["--upstream", &etcd.client_url])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting etcdmux");
        wait_for_port(port);
        Mux { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }

    fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    /// Waits for the process to exit, at most `limit`.
    fn wait_exit(&mut self, limit: Duration) -> Option<(ExitStatus, Duration)> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some((status, start.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("kill").success();
    assert!(ok, "kill -{sig} {pid}");
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "etcdmux did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string()).expect("url").connect().await.expect("connecting to etcdmux")
}

fn create(key: &str, start_revision: i64) -> WatchRequest {
    let key = key.as_bytes().to_vec();
    let mut end = key.clone();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.into(),
            range_end: end.into(),
            start_revision,
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_streams_with_unavailable_and_exits_zero() {
    let etcd = Etcd::start();
    let mut mux = Mux::start(&etcd);
    let ch = channel(&mux.url).await;
    let mut kv = KvClient::new(ch.clone());
    for i in 0..40 {
        let key = format!("/projects/a/pods/ns/p{i}");
        kv.put(PutRequest { key: key.into(), value: "v".into(), ..Default::default() }).await.expect("put");
    }

    // Live watch streams, a keepalive stream, and a watcher catching up from etcd
    // (its start is older than the ring of 8 events).
    let mut streams = Vec::new();
    let mut senders = Vec::new();
    for (key, start) in [("/projects/a/pods/", 0), ("/projects/b/pods/", 0), ("/projects/a/pods/", 1)] {
        let (tx, rx) = mpsc::channel(4);
        tx.send(create(key, start)).await.expect("queue create");
        let mut s = WatchClient::new(ch.clone()).watch(ReceiverStream::new(rx)).await.expect("watch").into_inner();
        let first = s.next().await.expect("a response").expect("created");
        assert!(first.created, "{first:?}");
        streams.push(s);
        senders.push(tx);
    }
    let mut lease = LeaseClient::new(ch.clone());
    let id = lease.lease_grant(LeaseGrantRequest { ttl: 60, id: 0 }).await.expect("grant").into_inner().id;
    let (ka_tx, ka_rx) = mpsc::channel(4);
    ka_tx.send(LeaseKeepAliveRequest { id }).await.expect("queue keepalive");
    let mut keepalive = lease.lease_keep_alive(ReceiverStream::new(ka_rx)).await.expect("keepalive").into_inner();
    let ka = keepalive.next().await.expect("a keepalive answer").expect("keepalive ok");
    assert!(ka.ttl > 0, "{ka:?}");

    mux.signal("TERM");
    for (i, mut s) in streams.into_iter().enumerate() {
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.next().await {
                    Some(Ok(_)) => continue, // events or the catch-up's replay
                    Some(Err(status)) => return Some(status),
                    None => return None,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("watch stream {i} still open 5 s after SIGTERM"));
        let status = end.unwrap_or_else(|| panic!("watch stream {i} ended with OK; clients would not resume"));
        assert_eq!(status.code(), Code::Unavailable, "watch stream {i}: {status:?}");
    }
    let ka_end = tokio::time::timeout(Duration::from_secs(5), keepalive.next())
        .await
        .expect("keepalive stream still open 5 s after SIGTERM");
    match ka_end {
        Some(Err(status)) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        other => panic!("keepalive stream did not end with UNAVAILABLE: {other:?}"),
    }
    let (status, took) = mux.wait_exit(Duration::from_millis(GRACE_MS + 5_000)).expect("etcdmux did not exit");
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_millis(GRACE_MS / 2), "shutdown took {took:?}: it waited for the grace period");
    drop(senders);
}

/// A unary call in flight when SIGTERM arrives still gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_unary_calls_in_flight_finish() {
    let etcd = Etcd::start();
    let mut mux = Mux::start(&etcd);
    let mut kv = KvClient::new(channel(&mux.url).await);
    kv.put(PutRequest { key: "/projects/a/pods/x".into(), value: "v".into(), ..Default::default() })
        .await
        .expect("put");
    // etcd stops answering: the next read hangs in etcdmux.
    signal(etcd.pid(), "STOP");
    let read =
        tokio::spawn(
            async move { kv.range(RangeRequest { key: "/projects/a/pods/x".into(), ..Default::default() }).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    mux.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(mux.child.try_wait().expect("try_wait").is_none(), "etcdmux exited with a call in flight");
    signal(etcd.pid(), "CONT");
    let resp = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the read never finished")
        .expect("read task")
        .expect("the read in flight failed");
    assert_eq!(resp.into_inner().kvs.len(), 1);
    let (status, _) = mux.wait_exit(Duration::from_millis(GRACE_MS + 5_000)).expect("etcdmux did not exit");
    assert!(status.success(), "exit status {status}");
}

/// A second SIGTERM during a graceful shutdown exits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_exits_at_once() {
    let etcd = Etcd::start();
    let mut mux = Mux::start(&etcd);
    let mut kv = KvClient::new(channel(&mux.url).await);
    signal(etcd.pid(), "STOP");
    // A read that etcd will not answer keeps the graceful shutdown waiting.
    let _read =
        tokio::spawn(async move { kv.range(RangeRequest { key: "/projects/a/x".into(), ..Default::default() }).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    mux.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(mux.child.try_wait().expect("try_wait").is_none(), "etcdmux exited with a call in flight");
    mux.signal("TERM");
    let exited = mux.wait_exit(Duration::from_secs(2));
    signal(etcd.pid(), "CONT");
    let (status, _) = exited.expect("etcdmux still running 2 s after a second SIGTERM");
    assert!(!status.success(), "an interrupted shutdown exits non-zero: {status}");
}
