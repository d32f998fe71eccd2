//! Shared integration-test harness: a private etcd per test, an in-process etcdmux in
//! front of it, clients, and `etcdctl`. Used by the test files through `mod common;`.
//!
//! Every test starts its own etcd on free 127.0.0.1 ports with a fresh temporary data
//! directory, so tests run in parallel and leave nothing behind. `etcd` and `etcdctl`
//! must be on PATH (`make deps` installs them).
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const DEPS_HINT: &str = "run `make deps` (apt-get install etcd-server etcd-client)";

/// How long a starting etcd gets to report healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Whole-start attempts with new ports when etcd cannot bind (a port was taken between
/// picking it and etcd binding it).
const START_ATTEMPTS: usize = 5;

/// A single-member etcd owned by one test. Killed (and its data deleted) on drop.
pub struct Etcd {
    /// `http://127.0.0.1:PORT`: the gRPC client endpoint.
    pub client_url: String,
    /// `http://127.0.0.1:PORT`: serves `/health` and `/metrics`.
    pub metrics_url: String,
    dir: tempfile::TempDir,
    child: Child,
    peer_url: String,
    /// `false` after `kill` until `restart`.
    running: bool,
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// `host:port` and path of an `http://host:port/path` URL.
fn split_url(url: &str) -> (&str, &str) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    }
}

/// One blocking HTTP/1.0 GET; returns (status code, body).
fn http_get(url: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let (hp, path) = split_url(url);
    let addr: SocketAddr =
        hp.parse().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{hp}: {e}")))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {hp}\r\nAccept: */*\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad HTTP status line"))?;
    Ok((status, body.to_string()))
}

/// Sum of the samples of metric `name` (any labels) in Prometheus text format; `None`
/// when no sample has exactly that name.
fn sum_metric(text: &str, name: &str) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let value_part = if let Some(labels) = rest.strip_prefix('{') {
            match labels.rfind('}') {
                Some(i) => &labels[i + 1..],
                None => continue,
            }
        } else if rest.starts_with(' ') || rest.starts_with('\t') {
            rest
        } else {
            continue; // a longer name such as `<name>_bucket`
        };
        if let Some(v) = value_part.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) {
            sum += v;
            found = true;
        }
    }
    found.then_some(sum)
}

/// Sum of the samples of metric `name` at `url`'s `/metrics` (etcd or etcdmux).
pub fn scrape_metric(url: &str, name: &str) -> Option<f64> {
    let (status, body) = http_get(&format!("{url}/metrics"), Duration::from_secs(5)).ok()?;
    (status == 200).then(|| sum_metric(&body, name))?
}

impl Etcd {
    /// Starts a fresh etcd and waits until it is healthy. Panics (with etcd's log) if it
    /// never gets ready, or if `etcd` is not on PATH.
    pub fn start() -> Etcd {
        let mut last_log = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let dir = tempfile::Builder::new().prefix("etcdmux-test-etcd-").tempdir().expect("creating temp dir");
            let (client, peer, metrics) = (free_port(), free_port(), free_port());
            if client == peer || peer == metrics || client == metrics {
                continue;
            }
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let metrics_url = format!("http://127.0.0.1:{metrics}");
            let child = spawn_etcd(dir.path(), &client_url, &peer_url, &metrics_url);
            let mut etcd = Etcd { client_url, metrics_url, dir, child, peer_url, running: true };
            match etcd.wait_ready() {
                Ok(()) => return etcd,
                Err(why) => {
                    last_log = etcd.log();
                    etcd.kill();
                    eprintln!("etcd start attempt {attempt}/{START_ATTEMPTS} failed: {why}");
                    // A bind failure makes etcd exit at once; anything else (slow disk,
                    // broken install) will not get better with new ports.
                    if !why.contains("exited") {
                        panic!("etcd did not become ready: {why}\n--- etcd log ---\n{last_log}");
                    }
                }
            }
        }
        panic!("etcd failed to start {START_ATTEMPTS} times\n--- etcd log ---\n{last_log}");
    }

    /// Kills etcd (SIGKILL) and waits for it; the data dir and ports are kept.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.running = false;
    }

    /// Starts etcd again with the same ports and data dir (after `kill`; kills it first
    /// if still running) and waits until it is healthy.
    pub fn restart(&mut self) {
        if self.running {
            self.kill();
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.child = spawn_etcd(self.dir.path(), &self.client_url, &self.peer_url, &self.metrics_url);
            self.running = true;
            match self.wait_ready() {
                Ok(()) => return,
                // The old sockets may linger a moment; retry with the same ports.
                Err(why) if why.contains("exited") && Instant::now() < deadline => {
                    self.running = false;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(why) => {
                    let log = self.log();
                    self.kill();
                    panic!("etcd did not restart: {why}\n--- etcd log ---\n{log}");
                }
            }
        }
    }

    /// Whether etcd is running (not killed) as far as this harness knows.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// etcd's stderr/stdout so far (all runs, including restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(log_path(self.dir.path())).unwrap_or_default()
    }

    /// Sum of all samples of metric `name` (with or without labels) from etcd's
    /// `/metrics`; `None` if etcd does not answer or has no such metric.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (status, body) = http_get(&format!("{}/metrics", self.metrics_url), Duration::from_secs(5)).ok()?;
        if status != 200 {
            return None;
        }
        sum_metric(&body, name)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr: SocketAddr = split_url(&self.metrics_url).0.parse().expect("metrics addr");
        let health = format!("{}/health", self.metrics_url);
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.running = false;
                return Err(format!("etcd exited with {status}"));
            }
            // `/health` logs a warning per call until there is a leader, so wait for
            // the (silent) leader gauge first.
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && self.metric("etcd_server_has_leader") == Some(1.0)
            {
                match http_get(&health, Duration::from_secs(2)) {
                    Ok((200, body)) if body.contains(r#""health":"true""#) => return Ok(()),
                    Ok((code, body)) => last = format!("/health answered {code}: {}", body.trim()),
                    Err(e) => last = format!("/health: {e}"),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("not healthy after {READY_TIMEOUT:?} ({last})"))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: String = {
                let start = log.len().saturating_sub(8_000);
                let start = (start..log.len()).find(|&i| log.is_char_boundary(i)).unwrap_or(log.len());
                log[start..].to_string()
            };
            if !tail.trim().is_empty() {
                eprintln!("--- etcd {} log (tail) ---\n{tail}", self.client_url);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_path(dir: &std::path::Path) -> PathBuf {
    dir.join("etcd.log")
}

fn spawn_etcd(dir: &std::path::Path, client_url: &str, peer_url: &str, metrics_url: &str) -> Child {
    let data = dir.join("data");
    let log: File = OpenOptions::new().create(true).append(true).open(log_path(dir)).expect("opening etcd log");
    let log2 = log.try_clone().expect("cloning log handle");
    let name = "etcdmux-test";
    let res = Command::new("etcd")
        .arg("--name")
        .arg(name)
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen-client-urls", client_url])
        .args(["--advertise-client-urls", client_url])
        .args(["--listen-peer-urls", peer_url])
        .args(["--initial-advertise-peer-urls", peer_url])
        .arg("--initial-cluster")
        .arg(format!("{name}={peer_url}"))
        .args(["--listen-metrics-urls", metrics_url])
        .args(["--logger", "zap", "--log-level", "error"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn();
    match res {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("etcd not found: {DEPS_HINT}"),
        Err(e) => panic!("starting etcd: {e}"),
    }
}

/// An in-process etcdmux serving one upstream etcd.
pub struct Mux {
    /// `None` once shut down (`take()` it to call `Running::shutdown`).
    pub running: Option<etcdmux::grpc::server::Running>,
    /// Bound address of the first listener.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT` of the first listener.
    pub url: String,
}

impl Mux {
    /// Graceful shutdown (no-op if already shut down).
    pub async fn shutdown(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// Milo-style tenancy (the `[tenancy]` section of config/milo.toml): one listener
/// without a static tenant; `/projects/{tenant}/` and `/datum-core/` (tenant root).
pub const MILO_TOML: &str = r#"
[[listener]]
addr = "127.0.0.1:0"

[tenancy]
rule = [
  { prefix = "/projects/{tenant}/" },
  { prefix = "/datum-core/", tenant = "root" },
]
global_keys = ["compact_rev_key", "health"]
unmatched = "reject"
connection_identity = "root"
admin_identity = "root"
"#;

/// Sidecar-style config: one listener whose every key belongs to `tenant`
/// (mirrors config/static.toml).
pub fn static_toml(tenant: &str) -> String {
    format!(
        r#"
[[listener]]
addr = "127.0.0.1:0"
static_tenant = "{tenant}"

[tenancy]
global_keys = ["compact_rev_key", "health"]
admin_identity = "root"
"#
    )
}

/// Starts etcdmux in-process with config `toml`, pointed at `etcd`, every listener on
/// 127.0.0.1:0 (static tenants kept) and no metrics listener.
pub async fn start_mux(etcd: &Etcd, toml: &str) -> Mux {
    let mut cfg = etcdmux::config::Config::parse(toml, "test config").unwrap_or_else(|e| panic!("{e}\n{toml}"));
    cfg.upstream.endpoints = vec![etcd.client_url.clone()];
    for l in &mut cfg.listeners {
        l.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    }
    cfg.server.metrics_listen = None;
    cfg.validate().unwrap_or_else(|e| panic!("{e}\n{toml}"));
    let running = etcdmux::grpc::server::start(cfg).await.unwrap_or_else(|e| panic!("starting etcdmux: {e}"));
    let addr = running.addrs[0];
    Mux { running: Some(running), addr, url: format!("http://127.0.0.1:{}", addr.port()) }
}

/// An etcd-client connected to `url` (etcd or etcdmux).
pub async fn client(url: &str) -> etcd_client::Client {
    etcd_client::Client::connect([url], None).await.unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// Runs `etcdctl --endpoints <endpoint> <args>` (API v3).
pub fn etcdctl(endpoint: &str, args: &[&str]) -> Output {
    match Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint])
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("etcdctl not found: {DEPS_HINT}"),
        Err(e) => panic!("running etcdctl: {e}"),
    }
}

/// Like [`etcdctl`], but asserts success and returns stdout.
pub fn etcdctl_ok(endpoint: &str, args: &[&str]) -> String {
    let out = etcdctl(endpoint, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        panic!(
            "etcdctl --endpoints {endpoint} {} failed ({}):\nstderr: {}\nstdout: {stdout}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
}

/// Installs a fmt subscriber (filter from RUST_LOG) writing through the test harness;
/// later calls are no-ops.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
