//! What the benchmarks share: starting etcd (from `etcdmux-testkit`) and the proxies
//! under test on loopback ports in a temp dir, reading `/metrics` and a process's RSS
//! and CPU, and describing the machine for the report.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
pub use etcdmux_testkit::{cpu_time, free_port, Etcd, Proc};

pub mod plot;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

pub fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

pub fn prefix_end(p: &str) -> Bytes {
    etcdmux::keyspace::prefix_end(p.as_bytes())
}

/// What sits between the load and etcd.
#[derive(Debug, Clone)]
pub enum FrontKind {
    /// Clients talk to etcd itself.
    Direct,
    /// etcd's own `grpc-proxy start`.
    GrpcProxy,
    /// The etcdmux binary (`bin`) with a config file (Milo's: [`MILO_CONFIG`]).
    Etcdmux { bin: PathBuf, config: PathBuf },
}

impl FrontKind {
    pub fn name(&self) -> &'static str {
        match self {
            FrontKind::Direct => "etcd direct",
            FrontKind::GrpcProxy => "etcd grpc-proxy",
            FrontKind::Etcdmux { .. } => "etcdmux",
        }
    }
}

/// A proxy in front of an etcd (none for `Direct`).
pub struct Front {
    pub proc: Option<Proc>,
    pub url: String,
}

/// The sum of a Prometheus metric's samples (all label sets) at `url`'s `/metrics`;
/// 0 when there are none.
pub async fn metric(url: &str, name: &str) -> f64 {
    let (url, name) = (url.to_string(), name.to_string());
    let scrape = tokio::task::spawn_blocking(move || etcdmux_testkit::scrape_metric(&url, &name));
    scrape.await.ok().flatten().unwrap_or(0.0)
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The machine's `MemAvailable`, in MiB.
pub fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kib| kib / 1024)
}

/// Established TCP connections whose local end is `port` on this machine: for an
/// etcd on loopback, the connections into it.
pub fn established_conns(port: u16) -> usize {
    let local = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|s| {
            s.lines()
                .skip(1)
                .filter(|l| {
                    let mut f = l.split_whitespace().skip(1);
                    let (local_addr, state) = (f.next().unwrap_or(""), f.nth(1).unwrap_or(""));
                    format!("{local_addr} ").ends_with(&local) && state == "01"
                })
                .count()
        })
        .sum()
}

/// Raises this process's open-file limit to `want` (or as far as allowed); children
/// (etcd, the proxies) inherit it. One connection per project needs one descriptor
/// per project on both ends.
pub fn raise_fd_limit(want: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        let raised = libc::rlimit { rlim_cur: want.max(lim.rlim_cur), rlim_max: want.max(lim.rlim_max) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return raised.rlim_cur;
        }
        // Not privileged: go as far as the hard limit.
        let capped = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &capped) == 0 {
            return capped.rlim_cur;
        }
        lim.rlim_cur
    }
}

async fn wait_port(port: u16) -> bool {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A fresh single-member etcd, healthy, with room for the largest runs.
pub async fn start_etcd() -> Result<Etcd, Error> {
    let quota = (8u64 << 30).to_string();
    let start = tokio::task::spawn_blocking(move || {
        Etcd::builder().args(["--quota-backend-bytes", &quota]).try_start().map_err(|e| format!("starting etcd: {e}"))
    });
    Ok(start.await??)
}

/// The config etcdmux runs with in the benchmarks.
pub const MILO_CONFIG: &str = "config/milo.toml";

/// Starts `kind` in front of `etcd`; `extra_toml` is appended to etcdmux's config.
pub async fn start_front(etcd: &Etcd, kind: &FrontKind, dir: &Path, extra_toml: &str) -> Result<Front, Error> {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let child = match kind {
        FrontKind::Direct => return Ok(Front { proc: None, url: etcd.client_url.clone() }),
        FrontKind::GrpcProxy => Command::new("etcd")
            .args([
                "grpc-proxy",
                "start",
                "--endpoints",
                &etcd.client_url,
                "--listen-addr",
                &format!("127.0.0.1:{port}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting etcd grpc-proxy: {e}"))?,
        FrontKind::Etcdmux { bin, config } => {
            // The config as shipped, with this run's addresses.
            let base = std::fs::read_to_string(config)
                .map_err(|e| format!("reading {} (run from the repository root): {e}", config.display()))?;
            let config = dir.join(format!("etcdmux-{port}.toml"));
            std::fs::write(&config, format!("{base}\n{extra_toml}\n"))?;
            Command::new(bin)
                .arg("--config")
                .arg(&config)
                .args(["--listen", &format!("127.0.0.1:{port}"), "--upstream", &etcd.client_url])
                .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("starting {} (make build first): {e}", bin.display()))?
        }
    };
    let front = Front { proc: Some(Proc(child)), url };
    if !wait_port(port).await {
        return Err(format!("{} did not accept connections", kind.name()).into());
    }
    Ok(front)
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// The machine, for the report header.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .unwrap_or(0);
    let etcd = Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string())
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {:.1} GiB memory; {etcd}", mem as f64 / 1024.0 / 1024.0)
}

/// Writes a report to `loadtest/results/<name>.md` and returns its path.
pub fn write_report(name: &str, report: &str) -> Result<PathBuf, Error> {
    let dir = PathBuf::from("loadtest/results");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.md"));
    std::fs::write(&path, report)?;
    Ok(path)
}
