//! The etcdmux binary as an operator runs it, under resource limits.
//!
//! Out of file descriptors, tonic's accept loop retries at once and spins a core
//! (found by apiload with one connection per project). etcdmux must back off, count
//! the errors, and serve again when descriptors are free.

mod common;

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{cpu_time, free_port, scrape_metric, Etcd, Proc};

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "etcdmux did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_backs_off_and_recovers() {
    let etcd = Etcd::start();
    let (port, metrics_port) = (free_port(), free_port());
    // A low descriptor limit, set by the shell that execs etcdmux.
    let script = format!(
        "ulimit -n 64 && exec {} --listen 127.0.0.1:{port} --metrics-listen 127.0.0.1:{metrics_port} --upstream {} --static-tenant t1",
        env!("CARGO_BIN_EXE_etcdmux"),
        etcd.client_url
    );
    let mux = Proc(
        Command::new("sh")
            .args(["-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting etcdmux"),
    );
    wait_for_port(port);
    let url = format!("http://127.0.0.1:{port}");
    let metrics = format!("http://127.0.0.1:{metrics_port}");

    // More connections than descriptors: the kernel completes them (backlog); etcdmux
    // cannot accept the rest.
    let held: Vec<TcpStream> = (0..150).filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok()).collect();
    assert!(held.len() > 64, "only {} connections opened", held.len());
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_time(mux.pid());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_time(mux.pid()) - before;
    // Spinning on accept burns the whole 3 s; backing off uses almost nothing.
    assert!(used < Duration::from_millis(1500), "etcdmux used {used:?} of CPU in 3 s while out of descriptors");

    drop(held);
    // Back in service once descriptors are free (the backoff is at most 1 s).
    let mut client = common::client(&url).await;
    client.put("k", "v", None).await.expect("put after recovery");
    let got = client.get("k", None).await.expect("get after recovery");
    assert_eq!(got.kvs().first().map(|kv| kv.value().to_vec()), Some(b"v".to_vec()));
    // Scraped only now: the metrics listener was out of descriptors too.
    assert!(scrape_metric(&metrics, "etcdmux_accept_errors_total").unwrap_or(0.0) > 0.0, "accept errors not counted");
}
