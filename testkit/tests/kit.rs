//! The kit against the real etcd and etcdctl it wraps.

use std::time::{Duration, Instant};

use etcdmux_testkit::{cpu_time, etcdctl, etcdctl_ok, http_get, Cluster, Etcd, Proc, Relay};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[test]
fn etcd_restarts_in_place_with_its_flags_and_data() {
    let mut etcd = Etcd::builder().args(["--quota-backend-bytes", "1073741824"]).start();
    assert!(etcd.is_running());
    assert_eq!(etcd.metric("etcd_server_quota_backend_bytes"), Some(1073741824.0));
    let (status, body) = http_get(&format!("{}/health", etcd.metrics_url), Duration::from_secs(5)).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(etcdctl_ok(&etcd.client_url, &["put", "k", "v"]), "OK\n");
    let (url, pid) = (etcd.client_url.clone(), etcd.pid());

    etcd.kill();
    assert!(!etcd.is_running());
    assert!(!etcdctl(&url, &["get", "k", "--command-timeout", "1s"]).status.success());

    etcd.restart();
    assert!(etcd.is_running());
    assert_ne!(etcd.pid(), pid);
    assert_eq!(etcd.client_url, url, "same ports");
    assert_eq!(etcd.client_port().to_string(), url.rsplit(':').next().unwrap());
    assert_eq!(etcdctl_ok(&url, &["get", "k", "--print-value-only"]), "v\n", "same data");
    assert_eq!(etcd.metric("etcd_server_quota_backend_bytes"), Some(1073741824.0), "same flags");
    assert_eq!(etcd.metric("etcd_no_such_metric"), None);
}

#[test]
fn etcd_that_cannot_start_says_why() {
    let err = Etcd::builder().arg("--no-such-flag").try_start().err().expect("etcd started with a bad flag");
    assert!(err.contains("no-such-flag"), "{err}");
}

#[test]
fn cluster_loses_and_regains_its_leader() {
    let mut cluster = Cluster::start(3);
    assert_eq!(cluster.client_urls().len(), 3);
    for m in cluster.members() {
        assert_eq!(m.metric("etcd_server_has_leader"), Some(1.0), "{}", m.name());
    }
    cluster.kill(1);
    cluster.kill(2);
    wait_leader(cluster.member(0), 0.0, "member 0 still has a leader without a quorum");
    cluster.restart(1);
    wait_leader(cluster.member(0), 1.0, "member 0 has no leader with members 0 and 1 running");
    etcdctl_ok(&cluster.client_urls()[1], &["put", "k", "v"]);
    cluster.kill(0);
    cluster.kill(1);
    cluster.restart_all();
    for m in cluster.members() {
        assert!(m.is_running());
        assert_eq!(etcdctl_ok(&m.client_url, &["get", "k", "--print-value-only"]), "v\n", "{}", m.name());
    }
}

fn wait_leader(m: &Etcd, has_leader: f64, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.metric("etcd_server_has_leader") != Some(has_leader) {
        assert!(Instant::now() < deadline, "{why}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A target that answers every line with the same line.
async fn echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `msg` and reads the echo; `None` when the connection closes instead.
async fn echo(s: &mut TcpStream, msg: &[u8]) -> Option<Vec<u8>> {
    s.write_all(msg).await.ok()?;
    let mut got = vec![0u8; msg.len()];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await.expect("echo timed out") {
        Ok(_) => Some(got),
        Err(_) => None,
    }
}

/// Whether the connection is closed from the other side (EOF or reset) within 5 s.
async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_cuts_pauses_resumes_and_stops() {
    let target = echo_server().await;
    let relay = Relay::start(&format!("http://{target}")).await;
    assert_eq!(relay.url, format!("http://{}", relay.addr));

    let mut a = TcpStream::connect(relay.addr).await.unwrap();
    assert_eq!(echo(&mut a, b"one").await.as_deref(), Some(&b"one"[..]));
    relay.cut();
    assert!(closed(&mut a).await, "a cut drops open connections");
    let mut b = TcpStream::connect(relay.addr).await.unwrap();
    assert_eq!(echo(&mut b, b"two").await.as_deref(), Some(&b"two"[..]), "and relays new ones");

    relay.pause();
    assert!(closed(&mut b).await, "a pause drops open connections");
    let mut c = TcpStream::connect(relay.addr).await.expect("paused: still listening");
    assert!(closed(&mut c).await, "and closes new ones");
    relay.resume();
    let mut d = TcpStream::connect(relay.addr).await.unwrap();
    assert_eq!(echo(&mut d, b"three").await.as_deref(), Some(&b"three"[..]));

    relay.stop();
    assert!(closed(&mut d).await, "a stop drops open connections");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(relay.addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => assert!(Instant::now() < deadline, "a stopped relay still accepts connections"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.resume();
    assert!(TcpStream::connect(relay.addr).await.is_err(), "resume does not undo stop");
}

#[test]
fn proc_is_killed_on_drop_and_its_cpu_time_is_read() {
    let child = std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
    let p = Proc(child);
    let pid = p.pid();
    std::thread::sleep(Duration::from_millis(300));
    assert!(cpu_time(pid) > Duration::ZERO, "a busy loop uses CPU");
    drop(p);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "killed and reaped on drop");
}
