//! What the benchmarks share: starting etcd (from `etcdmux-testkit`) and the proxies
//! under test on loopback ports in a temp dir, reading `/metrics` and a process's RSS
//! and CPU, and describing the machine for the report.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
pub use etcdmux_testkit::{cpu_time, free_port, Etcd, Postgres, Proc};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinSet;

pub mod plot;
pub mod profile;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

pub fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

pub fn prefix_end(p: &str) -> Bytes {
    etcdmux::keyspace::prefix_end(p.as_bytes())
}

/// An object about `len` bytes long, like a Kubernetes object's JSON.
pub fn value(generation: u64, len: usize) -> Bytes {
    let mut v =
        format!(r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"generation":{generation}}},"data":{{"blob":""#);
    let fill = len.saturating_sub(v.len() + 3);
    v.extend(std::iter::repeat_n('x', fill));
    v.push_str(r#""}}"#);
    Bytes::from(v)
}

/// splitmix64: enough randomness for choosing keys, without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % n.max(1) as u64) as usize
    }
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
    /// The same etcdmux on the SQL backend: a PostgreSQL of its own ([`PG_SETTINGS`]),
    /// the schema made by `etcdmux backend init`, as an operator would.
    EtcdmuxSql { bin: PathBuf, config: PathBuf },
}

impl FrontKind {
    pub fn name(&self) -> &'static str {
        match self {
            FrontKind::Direct => "etcd direct",
            FrontKind::GrpcProxy => "etcd grpc-proxy",
            FrontKind::Etcdmux { .. } => "etcdmux",
            FrontKind::EtcdmuxSql { .. } => "etcdmux on SQL",
        }
    }

    /// The name [`FrontKind::parse`] takes, for file names.
    pub fn short(&self) -> &'static str {
        match self {
            FrontKind::Direct => "direct",
            FrontKind::GrpcProxy => "grpc-proxy",
            FrontKind::Etcdmux { .. } => "etcdmux",
            FrontKind::EtcdmuxSql { .. } => "sql",
        }
    }

    /// The kind named `short` on the command line (`direct`, `grpc-proxy`, `etcdmux`,
    /// `sql`), with etcdmux's binary and config.
    pub fn parse(short: &str, bin: &Path, config: &Path) -> Result<FrontKind, Error> {
        let (bin, config) = (bin.to_path_buf(), config.to_path_buf());
        Ok(match short {
            "direct" => FrontKind::Direct,
            "grpc-proxy" => FrontKind::GrpcProxy,
            "etcdmux" => FrontKind::Etcdmux { bin, config },
            "sql" => FrontKind::EtcdmuxSql { bin, config },
            other => return Err(format!("unknown target {other:?}: direct, grpc-proxy, etcdmux or sql").into()),
        })
    }
}

/// PostgreSQL for the SQL target. The test kit's server skips fsync; a benchmark
/// beside an etcd that syncs every commit syncs too. 128 MB is PostgreSQL's default
/// shared buffers (the kit's is 32 MB).
pub const PG_SETTINGS: &[&str] = &["fsync=on", "full_page_writes=on", "shared_buffers=128MB"];

/// A proxy in front of an etcd (none for `Direct`).
pub struct Front {
    pub proc: Option<Proc>,
    pub url: String,
    /// etcdmux's `/metrics` (`None` for the other kinds).
    pub metrics_url: Option<String>,
    /// The SQL target's database (dropped after the proxy: fields drop in order).
    pub pg: Option<Postgres>,
}

impl Front {
    /// Where this front keeps its keys: PostgreSQL's processes for the SQL target,
    /// else `etcd`.
    pub fn store(&self, etcd: &Etcd) -> Store {
        match &self.pg {
            Some(pg) => Store::Postgres(pg.pid()),
            None => Store::Etcd(etcd.pid()),
        }
    }
}

/// The processes that store the keys, for their CPU and memory.
#[derive(Debug, Clone, Copy)]
pub enum Store {
    Etcd(u32),
    /// The postmaster; its children are the backends and helpers.
    Postgres(u32),
}

impl Store {
    /// CPU time used so far: etcd's; or every PostgreSQL process's plus what the
    /// postmaster's exited children used (connections come and go).
    pub fn cpu(self) -> Duration {
        match self {
            Store::Etcd(pid) => cpu_time(pid),
            Store::Postgres(pid) => {
                let reaped = stat_fields(pid).map_or(0, |f| field(&f, 13) + field(&f, 14));
                children(pid).into_iter().chain([pid]).map(cpu_time).sum::<Duration>()
                    + Duration::from_millis(reaped * 10)
            }
        }
    }

    /// Memory in KiB: etcd's RSS; PostgreSQL's processes' proportional set size
    /// (`Pss`), so the shared buffers every backend maps count once.
    pub fn mem_kib(self) -> u64 {
        match self {
            Store::Etcd(pid) => rss_kib(pid),
            Store::Postgres(pid) => children(pid).into_iter().chain([pid]).map(pss_kib).sum(),
        }
    }
}

/// `/proc/<pid>/stat`'s fields after the command name (field 3, the state, first).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn field(f: &[String], i: usize) -> u64 {
    f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The processes whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| stat_fields(child).is_some_and(|f| field(&f, 1) == u64::from(pid)))
        .collect()
}

/// A process's proportional set size in KiB (`/proc/<pid>/smaps_rollup`); 0 if unreadable.
pub fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Pss:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// The sum of a Prometheus metric's samples (all label sets) at `url`'s `/metrics`;
/// 0 when there are none.
pub async fn metric(url: &str, name: &str) -> f64 {
    let (url, name) = (url.to_string(), name.to_string());
    let scrape = tokio::task::spawn_blocking(move || etcdmux_testkit::scrape_metric(&url, &name));
    scrape.await.ok().flatten().unwrap_or(0.0)
}

/// The whole `/metrics` text at `url` (empty when nothing answers 200), for reading
/// several metrics from one scrape with [`labeled`].
pub async fn scrape(url: &str) -> String {
    let url = format!("{url}/metrics");
    let get = tokio::task::spawn_blocking(move || etcdmux_testkit::http_get(&url, Duration::from_secs(5)));
    match get.await {
        Ok(Ok((200, body))) => body,
        _ => String::new(),
    }
}

/// The sum of metric `name`'s samples in Prometheus `text` whose labels include every
/// `label="value"` pair of `with`; 0 when none do.
pub fn labeled(text: &str, name: &str, with: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.rsplit_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None, // a longer name, or a comment
            };
            let has = |(k, v): &(&str, &str)| labels.split(',').any(|l| l == format!("{k}=\"{v}\""));
            with.iter().all(has).then(|| value.split_whitespace().next()?.parse::<f64>().ok())?
        })
        .sum()
}

/// The one-minute load average: other work on the machine during a measurement.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0.0)
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

/// Waits up to 20 s for `port` to accept connections; stops early when `proc`, the
/// process meant to listen there, has exited.
async fn wait_port(port: u16, mut proc: Option<&mut Proc>) -> Result<(), String> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        if let Some(Ok(Some(status))) = proc.as_mut().map(|p| p.0.try_wait()) {
            return Err(format!("it exited ({status})"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("still not listening after 20 s".into())
}

/// A fresh single-member etcd, healthy, with room for the largest runs.
pub async fn start_etcd() -> Result<Etcd, Error> {
    start_etcd_with(&[]).await
}

/// [`start_etcd`] with more of etcd's flags (`--metrics extensive`, ...).
pub async fn start_etcd_with(extra: &[String]) -> Result<Etcd, Error> {
    let quota = (8u64 << 30).to_string();
    let extra = extra.to_vec();
    let start = tokio::task::spawn_blocking(move || {
        Etcd::builder()
            .args(["--quota-backend-bytes", &quota])
            .args(&extra)
            .try_start()
            .map_err(|e| format!("starting etcd: {e}"))
    });
    Ok(start.await??)
}

/// The config etcdmux runs with in the benchmarks.
pub const MILO_CONFIG: &str = "config/milo.toml";

/// Starts `kind` in front of `etcd`; `extra_toml` is appended to etcdmux's config.
pub async fn start_front(etcd: &Etcd, kind: &FrontKind, dir: &Path, extra_toml: &str) -> Result<Front, Error> {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut metrics_url = None;
    let mut pg = None;
    let child = match kind {
        FrontKind::Direct => {
            return Ok(Front { proc: None, url: etcd.client_url.clone(), metrics_url: None, pg: None })
        }
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
        FrontKind::Etcdmux { bin, config } | FrontKind::EtcdmuxSql { bin, config } => {
            // The config as shipped, with this run's addresses.
            let base = std::fs::read_to_string(config)
                .map_err(|e| format!("reading {} (run from the repository root): {e}", config.display()))?;
            let config = dir.join(format!("etcdmux-{port}.toml"));
            std::fs::write(&config, format!("{base}\n{extra_toml}\n"))?;
            let metrics = format!("127.0.0.1:{}", free_port());
            metrics_url = Some(format!("http://{metrics}"));
            let mut cmd = Command::new(bin);
            cmd.arg("--config")
                .arg(&config)
                .args(["--listen", &format!("127.0.0.1:{port}"), "--upstream", &etcd.client_url])
                .args(["--metrics-listen", &metrics]);
            if matches!(kind, FrontKind::EtcdmuxSql { .. }) {
                let db = start_postgres(bin).await?;
                cmd.args(["--backend", "sql", "--backend-dsn", &db.dsn]);
                pg = Some(db);
            }
            // Its warnings go to a file, so a start that fails can say why.
            let log = std::fs::File::create(dir.join(format!("etcdmux-{port}.log")))?;
            cmd.env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| format!("starting {} (make build first): {e}", bin.display()))?
        }
    };
    let mut front = Front { proc: Some(Proc(child)), url, metrics_url, pg };
    if let Err(why) = wait_port(port, front.proc.as_mut()).await {
        let log = std::fs::read_to_string(dir.join(format!("etcdmux-{port}.log"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        let tail = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
        return Err(format!("{} did not accept connections on port {port}: {why}; its log: {tail}", kind.name()).into());
    }
    Ok(front)
}

/// A fresh PostgreSQL ([`PG_SETTINGS`]) with etcdmux's schema, made by `bin backend init`.
pub async fn start_postgres(bin: &Path) -> Result<Postgres, Error> {
    let start = tokio::task::spawn_blocking(|| Postgres::try_start_with(PG_SETTINGS));
    let pg = start.await?.map_err(|e| format!("starting PostgreSQL: {e}"))?;
    let out = tokio::process::Command::new(bin)
        .args(["backend", "init", "--backend-dsn", &pg.dsn])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("running {} backend init: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!("etcdmux backend init failed: {}", String::from_utf8_lossy(&out.stderr).trim()).into());
    }
    Ok(pg)
}

/// A progress bar on stderr.
pub fn bar(len: usize, label: String) -> ProgressBar {
    let pb = ProgressBar::new(len as u64).with_prefix(label);
    if let Ok(style) = ProgressStyle::with_template("{prefix:>36} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}") {
        pb.set_style(style);
    }
    pb
}

/// Runs `f(0..n)` with at most `limit` in flight; stops at the first error.
pub async fn bounded<T, F, Fut>(n: usize, limit: usize, pb: &ProgressBar, f: F) -> Result<Vec<T>, Error>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T, Error>> + Send + 'static,
{
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut set = JoinSet::new();
    let mut next = 0;
    while next < n || !set.is_empty() {
        while next < n && set.len() < limit.max(1) {
            let fut = f(next);
            let i = next;
            set.spawn(async move { (i, fut.await) });
            next += 1;
        }
        if let Some(done) = set.join_next().await {
            let (i, r) = done?;
            out[i] = Some(r?);
            pb.inc(1);
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// An error with its sources: tonic's "transport error" alone says little.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
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

/// Where a benchmark's outputs go: `loadtest/results/<name>.<ext>`.
pub fn results_path(name: &str, ext: &str) -> PathBuf {
    PathBuf::from("loadtest/results").join(format!("{name}.{ext}"))
}

/// Writes a report to `loadtest/results/<name>.md` and returns its path.
pub fn write_report(name: &str, report: &str) -> Result<PathBuf, Error> {
    write_result(name, "md", report)
}

/// Writes the figures of a run that `goals` reads to `loadtest/results/<name>.json`.
pub fn write_summary(name: &str, summary: &serde_json::Value) -> Result<PathBuf, Error> {
    write_result(name, "json", &serde_json::to_string_pretty(summary)?)
}

fn write_result(name: &str, ext: &str, text: &str) -> Result<PathBuf, Error> {
    let path = results_path(name, ext);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Issue 11's goals: the benchmarks judge against these and `goals` sums them up.
pub mod goal {
    /// Write and delivery p99 at the largest project count within this factor of the
    /// smallest's.
    pub const FLAT_P99: f64 = 1.5;
    /// etcdmux's RSS per client watch stream (one watch each), bytes.
    pub const STREAM_BYTES: f64 = 2048.0;
    /// etcdmux's RSS per watch when streams carry many watches, bytes.
    pub const WATCH_BYTES: f64 = 700.0;
    /// etcdmux's requests per second against etcd direct's, at equal clients.
    pub const VS_DIRECT: f64 = 0.9;
    /// etcdmux's requests per second against etcd grpc-proxy's, at equal clients.
    pub const VS_GRPC_PROXY: f64 = 1.2;
    /// A write slower than this counts as slow where apiload says, hop by hop, where
    /// goal 1's slow writes were slow (a bucket bound of etcdmux's and etcd's
    /// latency histograms).
    pub const SLOW_WRITE: std::time::Duration = std::time::Duration::from_millis(10);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labeled_sums_the_samples_with_every_label_asked_for() {
        let text = "# HELP grpc_server_handled_total x\n\
            grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Range\",grpc_type=\"unary\"} 7\n\
            grpc_server_handled_total{grpc_code=\"Unavailable\",grpc_method=\"Range\",grpc_type=\"unary\"} 2\n\
            grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"RangeX\",grpc_type=\"unary\"} 100\n\
            grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Txn\",grpc_type=\"unary\"} 3\n\
            grpc_server_handled_total_bucket{grpc_method=\"Range\"} 50\n\
            etcd_mvcc_range_total 11\n";
        assert_eq!(labeled(text, "grpc_server_handled_total", &[("grpc_method", "Range")]), 9.0);
        let ok_range = [("grpc_method", "Range"), ("grpc_code", "OK")];
        assert_eq!(labeled(text, "grpc_server_handled_total", &ok_range), 7.0);
        assert_eq!(labeled(text, "grpc_server_handled_total", &[]), 112.0);
        assert_eq!(labeled(text, "etcd_mvcc_range_total", &[]), 11.0);
        assert_eq!(labeled(text, "etcd_mvcc_range", &[]), 0.0, "a prefix of a name is not the name");
    }

    #[test]
    fn a_postgres_store_is_every_process_of_the_server() {
        let pg = Postgres::try_start_with(PG_SETTINGS).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pg.psql("SHOW fsync").trim(), "on", "the benchmark's settings override the kit's");
        let store = Store::Postgres(pg.pid());
        assert!(!children(pg.pid()).is_empty(), "the server's helpers (checkpointer, WAL writer) are its children");
        // The work is done by a backend that exits with psql: only the postmaster's
        // reaped-children time keeps it.
        let before = store.cpu();
        pg.psql("SELECT count(*) FROM generate_series(1, 5000000)");
        // psql returns before the postmaster has reaped the backend: its time joins
        // the postmaster's children's time a moment later.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut spent = store.cpu().saturating_sub(before);
        while spent < Duration::from_millis(100) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            spent = store.cpu().saturating_sub(before);
        }
        assert!(spent >= Duration::from_millis(100), "a query's CPU went uncounted: {spent:?}");
        assert!(cpu_time(pg.pid()) < spent, "the postmaster alone did not do the work");
        let rss: u64 = children(pg.pid()).into_iter().chain([pg.pid()]).map(rss_kib).sum();
        let pss = store.mem_kib();
        assert!(pss > 0 && pss <= rss, "PSS {pss} KiB against RSS {rss} KiB");
    }

    #[test]
    fn targets_are_parsed_by_their_short_names() {
        let (bin, cfg) = (Path::new("etcdmux"), Path::new(MILO_CONFIG));
        assert!(matches!(FrontKind::parse("sql", bin, cfg), Ok(FrontKind::EtcdmuxSql { .. })));
        assert!(matches!(FrontKind::parse("etcdmux", bin, cfg), Ok(FrontKind::Etcdmux { .. })));
        assert!(FrontKind::parse("postgres", bin, cfg).is_err());
        for short in ["direct", "grpc-proxy", "etcdmux", "sql"] {
            assert_eq!(FrontKind::parse(short, bin, cfg).map(|k| k.short()).ok(), Some(short));
        }
    }

    #[test]
    fn values_are_as_long_as_asked() {
        assert_eq!(value(7, 1024).len(), 1024);
        assert!(value(7, 10).len() > 10, "asked for less than the envelope: the envelope");
        assert!(value(7, 10).ends_with(b"\"}}"));
    }
}
