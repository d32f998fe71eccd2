//! One etcd member: started on free loopback ports with a temp data dir, waited on
//! until healthy, killed and restarted in place, killed on drop.

use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::http::{http_get, scrape_metric, split_url};
use crate::{free_port, DEPS_HINT};

/// How long a starting etcd gets to report healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Whole-start attempts with new ports when etcd cannot bind (a port was taken between
/// picking it and etcd binding it).
const START_ATTEMPTS: usize = 5;

/// An etcd member owned by a test: a single-member cluster from [`Etcd::start`], or
/// one member of a [`Cluster`]. Killed (and its data deleted) on drop; when dropped
/// during a panic it prints the tail of its log first.
pub struct Etcd {
    /// `http://127.0.0.1:PORT` (`https://` from [`EtcdBuilder::https`]): the gRPC
    /// client endpoint.
    pub client_url: String,
    /// `http://127.0.0.1:PORT`: serves `/health` and `/metrics`.
    pub metrics_url: String,
    peer_url: String,
    name: String,
    /// `--initial-cluster`; ignored by etcd once the data dir exists.
    initial_cluster: String,
    /// Flags after the kit's own (a repeated flag's last value wins).
    args: Vec<String>,
    dir: tempfile::TempDir,
    child: Child,
    /// `false` after `kill` until `restart`.
    running: bool,
}

/// Extra etcd flags for [`Etcd`] or [`Cluster`]; from [`Etcd::builder`].
#[derive(Debug, Clone, Default)]
pub struct EtcdBuilder {
    args: Vec<String>,
    https: bool,
}

impl EtcdBuilder {
    /// Appends one flag or value to etcd's command line (kept across restarts).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends flags, e.g. `["--experimental-watch-progress-notify-interval", "1s"]`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Serves clients on an `https://` URL: pass etcd's TLS flags too (`--cert-file`,
    /// `--key-file`, and `--client-cert-auth --trusted-ca-file` for mTLS). `/health`
    /// and `/metrics` stay on the plain `metrics_url`.
    pub fn https(mut self) -> Self {
        self.https = true;
        self
    }

    fn client_scheme(&self) -> &'static str {
        if self.https {
            "https"
        } else {
            "http"
        }
    }

    /// A single-member etcd, healthy; panics (with etcd's log) if it cannot start.
    pub fn start(self) -> Etcd {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// A single-member etcd, healthy, or why not (with etcd's log).
    pub fn try_start(self) -> Result<Etcd, String> {
        let mut members = start_members(1, &self.args, &[], self.client_scheme())?;
        Ok(members.remove(0))
    }

    /// A cluster of `members` etcds (see [`Cluster::start`]), every member healthy.
    pub fn start_cluster(self, members: usize) -> Cluster {
        Cluster::from_members(
            start_members(members, &self.args, CLUSTER_FLAGS, self.client_scheme()).unwrap_or_else(|e| panic!("{e}")),
        )
    }
}

/// Fast heartbeats and elections for members on one machine, so a lost quorum shows
/// (and a new leader is elected) within a second.
const CLUSTER_FLAGS: &[&str] = &["--heartbeat-interval", "50", "--election-timeout", "500"];

impl Etcd {
    /// Starts a fresh single-member etcd and waits until it is healthy. Panics (with
    /// etcd's log) if it never gets ready, or if `etcd` is not on PATH.
    pub fn start() -> Etcd {
        Etcd::builder().start()
    }

    /// For extra flags: `Etcd::builder().args([...]).start()`.
    pub fn builder() -> EtcdBuilder {
        EtcdBuilder::default()
    }

    /// Kills etcd (SIGKILL) and waits for it; the data dir and ports are kept.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.running = false;
    }

    /// Starts etcd again with the same ports, flags and data dir (after `kill`; kills
    /// it first if still running) and waits until it is healthy. A cluster member is
    /// healthy only with a leader, so a quorum must be running with it.
    pub fn restart(&mut self) {
        if self.running {
            self.kill();
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Err(e) = self.respawn() {
                panic!("{e}");
            }
            match wait_ready(std::slice::from_mut(self)) {
                Ok(()) => return,
                // The old sockets may linger a moment; retry with the same ports.
                Err(why) if why.contains("exited") && Instant::now() < deadline => {
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

    /// Whether etcd is running (not killed) as far as this kit knows.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The process id of the current run.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The port of [`client_url`](Etcd::client_url).
    pub fn client_port(&self) -> u16 {
        port_of(&self.client_url)
    }

    /// The member's name (`--name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// etcd's stderr/stdout so far (all runs, including restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(log_path(self.dir.path())).unwrap_or_default()
    }

    /// Sum of all samples of metric `name` (with or without labels) from etcd's
    /// `/metrics`; `None` if etcd does not answer or has no such metric.
    pub fn metric(&self, name: &str) -> Option<f64> {
        scrape_metric(&self.metrics_url, name)
    }

    /// Starts the process again (not waiting); `running` until seen exited.
    pub(crate) fn respawn(&mut self) -> Result<(), String> {
        self.child = spawn(
            self.dir.path(),
            &self.name,
            [&self.client_url, &self.peer_url, &self.metrics_url],
            &self.initial_cluster,
            &self.args,
        )?;
        self.running = true;
        Ok(())
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

/// Starts `n` members that form one cluster (`extra` flags first, then `args`), each
/// on its own free ports and temp dir, and waits until all are healthy. When a member
/// exits at once (a port taken meanwhile), tries again with new ports. Client URLs
/// use `client_scheme` (`http` or `https`).
pub(crate) fn start_members(
    n: usize,
    args: &[String],
    extra: &[&str],
    client_scheme: &str,
) -> Result<Vec<Etcd>, String> {
    let mut last_log = String::new();
    for attempt in 1..=START_ATTEMPTS {
        let ports: Vec<u16> = (0..3 * n).map(|_| free_port()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() != ports.len() {
            continue;
        }
        let url = |i: usize| format!("http://127.0.0.1:{}", ports[i]);
        // (client, peer, metrics) per member.
        let names: Vec<String> =
            if n == 1 { vec!["etcdmux-test".to_string()] } else { (0..n).map(|i| format!("m{i}")).collect() };
        let initial: Vec<String> = (0..n).map(|i| format!("{}={}", names[i], url(3 * i + 1))).collect();
        let mut args_all: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if n > 1 {
            // Members of another test's cluster that got these ports must not join.
            args_all.extend(["--initial-cluster-token".to_string(), format!("etcdmux-test-{}", ports[1])]);
        }
        args_all.extend(args.iter().cloned());
        let mut members = Vec::with_capacity(n);
        for (i, name) in names.into_iter().enumerate() {
            let dir = tempfile::Builder::new()
                .prefix("etcdmux-test-etcd-")
                .tempdir()
                .map_err(|e| format!("creating temp dir: {e}"))?;
            let client_url = format!("{client_scheme}://127.0.0.1:{}", ports[3 * i]);
            let (peer_url, metrics_url) = (url(3 * i + 1), url(3 * i + 2));
            let initial_cluster = initial.join(",");
            let urls = [&client_url, &peer_url, &metrics_url];
            let child = spawn(dir.path(), &name, urls, &initial_cluster, &args_all)?;
            members.push(Etcd {
                client_url,
                metrics_url,
                peer_url,
                name,
                initial_cluster,
                args: args_all.clone(),
                dir,
                child,
                running: true,
            });
        }
        match wait_ready(&mut members) {
            Ok(()) => return Ok(members),
            Err(why) => {
                last_log = members.iter().map(|m| m.log()).collect::<Vec<_>>().join("\n");
                for m in &mut members {
                    m.kill();
                }
                eprintln!("etcd start attempt {attempt}/{START_ATTEMPTS} failed: {why}");
                // A bind failure makes etcd exit at once; anything else (slow disk,
                // broken install) will not get better with new ports.
                if !why.contains("exited") {
                    return Err(format!("etcd did not become ready: {why}\n--- etcd log ---\n{last_log}"));
                }
            }
        }
    }
    Err(format!("etcd failed to start {START_ATTEMPTS} times\n--- etcd log ---\n{last_log}"))
}

/// Waits until every member answers `/health` with `true`; fails as soon as one exits.
pub(crate) fn wait_ready(members: &mut [Etcd]) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut ready = vec![false; members.len()];
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        for (m, ready) in members.iter_mut().zip(&mut ready) {
            if *ready {
                continue;
            }
            if let Ok(Some(status)) = m.child.try_wait() {
                m.running = false;
                return Err(format!("etcd {} exited with {status}", m.name));
            }
            match health(m) {
                Ok(()) => *ready = true,
                Err(why) => last = format!("{}: {why}", m.name),
            }
        }
        if ready.iter().all(|r| *r) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("not healthy after {READY_TIMEOUT:?} ({last})"))
}

fn health(m: &Etcd) -> Result<(), String> {
    let addr: SocketAddr = split_url(&m.metrics_url).0.parse().expect("metrics addr");
    // `/health` logs a warning per call until there is a leader, so wait for the
    // (silent) leader gauge first.
    if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        return Err("no answer".to_string());
    }
    if m.metric("etcd_server_has_leader") != Some(1.0) {
        return Err("no leader".to_string());
    }
    match http_get(&format!("{}/health", m.metrics_url), Duration::from_secs(2)) {
        Ok((200, body)) if body.contains(r#""health":"true""#) => Ok(()),
        Ok((code, body)) => Err(format!("/health answered {code}: {}", body.trim())),
        Err(e) => Err(format!("/health: {e}")),
    }
}

fn port_of(url: &str) -> u16 {
    split_url(url).0.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0)
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("etcd.log")
}

/// Spawns etcd with its data in `dir/data` and its output appended to `dir/etcd.log`.
fn spawn(dir: &Path, name: &str, urls: [&String; 3], initial_cluster: &str, args: &[String]) -> Result<Child, String> {
    let [client_url, peer_url, metrics_url] = urls;
    let log: File = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(dir))
        .map_err(|e| format!("opening etcd log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| format!("cloning log handle: {e}"))?;
    let res = Command::new("etcd")
        .arg("--name")
        .arg(name)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--listen-client-urls", client_url])
        .args(["--advertise-client-urls", client_url])
        .args(["--listen-peer-urls", peer_url])
        .args(["--initial-advertise-peer-urls", peer_url])
        .args(["--initial-cluster", initial_cluster])
        .args(["--listen-metrics-urls", metrics_url])
        .args(["--logger", "zap", "--log-level", "error"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn();
    match res {
        Ok(child) => Ok(child),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!("etcd not found: {DEPS_HINT}")),
        Err(e) => Err(format!("starting etcd: {e}")),
    }
}
