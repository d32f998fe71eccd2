//! Health for Kubernetes probes, against a real etcd: `/livez`, `/readyz` and
//! `/metrics` on the metrics listener, and `grpc.health.v1.Health` on the client
//! listener, as etcd goes away and comes back.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{etcdctl_ok, http_get, start_mux_with_metrics, sum_metric, Etcd, MILO_TOML};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Metrics are process-wide (one recorder; `etcdmux_ready` is one gauge for every
/// etcdmux in this process): one test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Fast probes, so that the tests take a few seconds.
fn toml() -> String {
    format!("{MILO_TOML}\n[health]\nprobe_interval_ms = 100\nprobe_timeout_ms = 200\nmax_probe_age_ms = 500\nmax_watch_lag_ms = 1000\n")
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let url = format!("http://{addr}{path}");
    tokio::task::spawn_blocking(move || http_get(&url, Duration::from_secs(5)))
        .await
        .expect("blocking task")
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Polls `path` until it answers `code`; returns the body, or panics after `within`.
async fn wait_for(addr: SocketAddr, path: &str, code: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (c, body) = get(addr, path).await;
        if c == code {
            return body;
        }
        assert!(Instant::now() < deadline, "{path} still {c} after {within:?}, not {code}:\n{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn health_client(url: &str) -> HealthClient<tonic::transport::Channel> {
    let ch = tonic::transport::Channel::from_shared(url.to_string()).expect("url").connect().await.expect("connect");
    HealthClient::new(ch)
}

async fn check(client: &mut HealthClient<tonic::transport::Channel>, service: &str) -> ServingStatus {
    let resp = client.check(HealthCheckRequest { service: service.to_string() }).await.expect("health check");
    resp.into_inner().status()
}

async fn wait_status(url: &str, want: ServingStatus, within: Duration) {
    let mut client = health_client(url).await;
    let deadline = Instant::now() + within;
    loop {
        let (all, kv) = (check(&mut client, "").await, check(&mut client, "etcdserverpb.KV").await);
        if all == want && kv == want {
            return;
        }
        assert!(Instant::now() < deadline, "gRPC health is {all:?} / {kv:?}, not {want:?}, after {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_and_metrics_still_serve() {
    let _serial = SERIAL.lock().await;
    let etcd = Etcd::start();
    let (mut mux, metrics) = start_mux_with_metrics(&etcd, &toml()).await;

    let (code, body) = get(metrics, "/livez").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let body = wait_for(metrics, "/readyz", 200, Duration::from_secs(10)).await;
    assert_eq!(body, "upstream: ok\nwatch: ok\nready\n");
    wait_status(&mux.url, ServingStatus::Serving, Duration::from_secs(5)).await;

    let mut health = health_client(&mux.url).await;
    let unknown = health.check(HealthCheckRequest { service: "nope".into() }).await;
    assert_eq!(unknown.map(|_| ()).unwrap_err().code(), tonic::Code::NotFound);

    let mut kv = common::client(&mux.url).await;
    kv.put("/projects/p1/configmaps/a", "v", None).await.expect("put");
    let (code, text) = get(metrics, "/metrics").await;
    assert_eq!(code, 200);
    assert!(sum_metric(&text, "etcdmux_grpc_requests_total").unwrap_or(0.0) >= 1.0, "{text}");
    assert_eq!(sum_metric(&text, "etcdmux_ready"), Some(1.0), "{text}");
    assert!(text.contains("# HELP etcdmux_ready "), "described: {text}");
    assert!(text.contains("# HELP etcdmux_upstream_probe_failures_total"), "described: {text}");
    // etcd's share of the put: the upstream write(s) it made (a put, or a txn that
    // also writes the root index) took no longer than the client's whole call.
    let of = |methods: &[&str]| -> String {
        let labels: Vec<String> = methods.iter().map(|m| format!("method=\"/etcdserverpb.KV/{m}\"")).collect();
        text.lines().filter(|l| labels.iter().any(|m| l.contains(m.as_str()))).collect::<Vec<_>>().join("\n")
    };
    let upstream = of(&["Put", "Txn"]);
    let calls = sum_metric(&upstream, "etcdmux_upstream_request_duration_seconds_count");
    assert!(calls.is_some_and(|n| n >= 1.0), "{text}");
    let etcd_time = sum_metric(&upstream, "etcdmux_upstream_request_duration_seconds_sum").unwrap_or(f64::MAX);
    let whole = sum_metric(&of(&["Put"]), "etcdmux_grpc_request_duration_seconds_sum").unwrap_or(0.0);
    assert!(etcd_time > 0.0 && etcd_time <= whole, "etcd {etcd_time} s of a {whole} s put: {text}");
    assert!(text.contains("# HELP etcdmux_upstream_request_duration_seconds"), "described: {text}");

    let (code, _) = get(metrics, "/nope").await;
    assert_eq!(code, 404);
    let (code, _) = get(metrics, "/readyz/extra").await;
    assert_eq!(code, 404);
    mux.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_etcd_away_and_back() {
    let _serial = SERIAL.lock().await;
    let mut etcd = Etcd::start();
    let (mut mux, metrics) = start_mux_with_metrics(&etcd, &toml()).await;
    wait_for(metrics, "/readyz", 200, Duration::from_secs(10)).await;
    wait_status(&mux.url, ServingStatus::Serving, Duration::from_secs(5)).await;

    // A gRPC health Watch streams the changes.
    let mut watcher = health_client(&mux.url).await;
    let mut changes =
        watcher.watch(HealthCheckRequest { service: String::new() }).await.expect("health watch").into_inner();
    let first = changes.message().await.expect("watch message").expect("a status");
    assert_eq!(first.status(), ServingStatus::Serving);

    etcd.kill();
    let body = wait_for(metrics, "/readyz", 503, Duration::from_secs(3)).await;
    assert!(body.ends_with("not ready\n"), "{body}");
    assert!(
        body.contains("upstream: no successful probe") || body.contains("watch: the upstream watch is not open"),
        "{body}"
    );
    wait_status(&mux.url, ServingStatus::NotServing, Duration::from_secs(3)).await;
    let next = tokio::time::timeout(Duration::from_secs(3), changes.message()).await;
    assert_eq!(next.expect("in time").expect("watch message").expect("a status").status(), ServingStatus::NotServing);
    // Within a few probe intervals both checks say why.
    let body = wait_for(metrics, "/readyz", 503, Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (_, body2) = get(metrics, "/readyz").await;
    assert!(body2.contains("upstream: no successful probe of etcd for"), "{body}\n{body2}");
    assert!((get(metrics, "/livez").await.0) == 200, "alive without etcd");
    let (_, text) = get(metrics, "/metrics").await;
    assert!(sum_metric(&text, "etcdmux_upstream_probe_failures_total").unwrap_or(0.0) >= 1.0, "{text}");
    assert_eq!(sum_metric(&text, "etcdmux_ready"), Some(0.0), "{text}");

    etcd.restart();
    // The hub re-opens its watch with a backoff of at most 5 s.
    wait_for(metrics, "/readyz", 200, Duration::from_secs(10)).await;
    wait_status(&mux.url, ServingStatus::Serving, Duration::from_secs(3)).await;
    let next = tokio::time::timeout(Duration::from_secs(3), changes.message()).await;
    assert_eq!(next.expect("in time").expect("watch message").expect("a status").status(), ServingStatus::Serving);
    mux.shutdown().await;
}

/// Writes outside the hub's watched range (global keys) move etcd's revision without
/// an event for the hub; readiness must not flap for that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_the_hub_does_not_watch_do_not_flap_readiness() {
    let _serial = SERIAL.lock().await;
    let etcd = Etcd::start();
    let (mut mux, metrics) = start_mux_with_metrics(&etcd, &toml()).await;
    wait_for(metrics, "/readyz", 200, Duration::from_secs(10)).await;
    let url = etcd.client_url.clone();
    tokio::task::spawn_blocking(move || etcdctl_ok(&url, &["put", "compact_rev_key", "x"])).await.expect("etcdctl");
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let (code, body) = get(metrics, "/readyz").await;
        assert_eq!(code, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mux.shutdown().await;
}

/// At shutdown the gRPC health reports NOT_SERVING and its Watch streams end, so an
/// open one does not hold the listener through the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_health_watches_promptly() {
    let _serial = SERIAL.lock().await;
    let etcd = Etcd::start();
    let toml = format!("{}\n[server]\nshutdown_grace_ms = 5000\n", toml());
    let (mut mux, metrics) = start_mux_with_metrics(&etcd, &toml).await;
    wait_for(metrics, "/readyz", 200, Duration::from_secs(10)).await;
    wait_status(&mux.url, ServingStatus::Serving, Duration::from_secs(5)).await;
    let mut watcher = health_client(&mux.url).await;
    let mut changes =
        watcher.watch(HealthCheckRequest { service: String::new() }).await.expect("health watch").into_inner();
    assert_eq!(changes.message().await.expect("message").expect("a status").status(), ServingStatus::Serving);

    let started = Instant::now();
    mux.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(3), "shutdown took {:?}", started.elapsed());
    let mut seen = Vec::new();
    while let Ok(Some(m)) = changes.message().await {
        seen.push(m.status());
    }
    assert_eq!(seen, [ServingStatus::NotServing], "the stream says NOT_SERVING, then ends");
}
