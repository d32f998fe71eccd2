//! apiload: Milo's apiserver storage layer for P projects × R resources, run against
//! etcd direct, etcd's `grpc-proxy`, etcdmux and etcdmux on the SQL backend
//! (PostgreSQL), one after the other on a fresh store each, with the same load.
//!
//! Per (project, resource), like the apiserver's cacher: a paged initial list
//! (limit 500, continuing at `lastKey + "\0"`), then a watch from the list's
//! revision + 1 with prev_kv and progress_notify. Writers do the apiserver's
//! optimistic txns at a fixed rate: create (`mod_revision == 0` → put, else range),
//! update (`mod_revision == rev` → put, else range); writes to the first resource
//! carry a lease, granted every few seconds; half way through, the compactor's txn
//! on `compact_rev_key` and a `Compact`. Every write's event must reach its watcher
//! exactly once.
//!
//! Four client models (`--models`): one shared connection carrying one watch stream
//! per (project, resource) (`shared`); one connection per project (`per-project`);
//! Milo's apiserver today, a pool of 32 connections with the (project, resource)
//! storages round-robined over it and one watch stream per storage (`milo-pool`);
//! and the stock Go client on that pool, every watch of a connection on one stream,
//! created one at a time as etcd's Go client does (`go-client`).
//!
//! A watchdog samples the memory of the store (etcd's RSS, or PostgreSQL's processes'
//! PSS), the proxy's and this process's RSS; when the machine
//! runs out of memory the point stops and is reported as failing, with the peaks.
//! The report (`loadtest/results/<name>.md`), a CSV of every row and the plots
//! (`<name>-{rss,watchers,write-p99,delivery-p99}.{svg,png}`) are written at the end.

// A crate root's modules live beside it; these are apiload's own.
#[path = "apiload/load.rs"]
mod load;
#[path = "apiload/observe.rs"]
mod observe;
#[path = "apiload/report.rs"]
mod report;
#[path = "apiload/watches.rs"]
mod watches;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use etcdmux::pb::etcdserverpb::{
    compare, kv_client::KvClient, lease_client::LeaseClient, request_op, response_op, CompactionRequest, Compare,
    LeaseGrantRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use etcdmux_loadtest::profile::Profiles;
use etcdmux_loadtest::{
    b, bar, bounded, chain, cpu_time, established_conns, mem_available_mib, metric, ms, percentile, raise_fd_limit,
    rss_kib, start_etcd_with, start_front, write_report, Error, Etcd, Front, FrontKind, Store, MILO_CONFIG,
};
use load::load;
use report::csv;
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Model {
    /// One connection, one watch stream per (project, resource).
    Shared,
    /// One connection per project, one watch stream per (project, resource).
    PerProject,
    /// Milo's apiserver today: a pool of `--pool-size` connections, the (project,
    /// resource) storages round-robined over it, one watch stream per storage.
    MiloPool,
    /// The stock Go client on the same pool: every watch of a connection on one
    /// stream (watches with equal context metadata share a stream in etcd's client).
    GoClient,
}

impl Model {
    fn name(self) -> &'static str {
        match self {
            Model::Shared => "shared connection",
            Model::PerProject => "connection per project",
            Model::MiloPool => "Milo's pool, a stream per storage",
            Model::GoClient => "Go client's pool, a stream per connection",
        }
    }

    /// Client connections at `projects` projects.
    fn connections(self, projects: usize, pool: usize) -> usize {
        match self {
            Model::Shared => 1,
            Model::PerProject => projects,
            Model::MiloPool | Model::GoClient => pool.max(1),
        }
    }

    /// The connection of storage (p, r) among `conns`.
    fn connection_of(self, p: usize, r: usize, resources: usize, conns: usize) -> usize {
        match self {
            Model::Shared | Model::PerProject => p % conns,
            Model::MiloPool | Model::GoClient => (p * resources + r) % conns,
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Apiserver-shaped load: etcd direct vs etcd grpc-proxy vs etcdmux (on etcd and on SQL)")]
struct Args {
    #[arg(long, default_value = "target/release/etcdmux")]
    etcdmux: PathBuf,
    /// etcdmux's config; listener, upstream and metrics addresses are set per run.
    #[arg(long, default_value = MILO_CONFIG)]
    etcdmux_config: PathBuf,
    /// Project counts (scale points), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    projects: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    resources: usize,
    /// Objects per (project, resource) before the lists.
    #[arg(long, default_value_t = 2)]
    objects: usize,
    /// Writes per second, all projects together.
    #[arg(long, default_value_t = 200)]
    write_rate: u64,
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Connection models to run, comma-separated: shared, per-project, milo-pool, go-client.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "shared")]
    models: Vec<Model>,
    /// Connections of the pool models (Milo's apiserver keeps 32 etcd clients).
    #[arg(long, default_value_t = 32)]
    pool_size: usize,
    /// A target degrades at a scale point when its write or delivery p99 exceeds this.
    #[arg(long, default_value_t = 100)]
    p99_bound_ms: u64,
    /// Lists and watch creates in flight during setup (the apiserver starts its
    /// cachers concurrently too).
    #[arg(long, default_value_t = 64)]
    setup_concurrency: usize,
    /// etcd with `--metrics extensive`: its own time per Txn
    /// (`grpc_server_handling_seconds`) goes into the report beside etcdmux's, at the
    /// cost of a histogram per request in etcd.
    #[arg(long)]
    etcd_extensive_metrics: bool,
    /// A point stops, as failing, when the machine's available memory drops below this.
    #[arg(long, default_value_t = 1024)]
    min_available_mib: u64,
    #[arg(long, default_value = "api")]
    name: String,
    /// Exit non-zero when a request failed or an event was lost or duplicated (CI's
    /// smoke run; latency and memory limits are reported, not checked).
    #[arg(long)]
    check: bool,
    /// Targets to run, comma-separated: direct, grpc-proxy, etcdmux, sql (etcdmux on
    /// PostgreSQL).
    #[arg(long, value_delimiter = ',', default_value = "direct,grpc-proxy,etcdmux,sql")]
    targets: Vec<String>,
    /// Record CPU profiles (`perf record`) of the proxy and of etcd during each
    /// point's write load, and during its list+watch setup (at most
    /// `--duration-secs` of it), and draw them with `scripts/flamegraph.py` into
    /// `loadtest/results/<name>-<projects>p-<target>-{proxy,etcd}.{svg,txt}` (setup:
    /// `...-setup-{proxy,etcd}`); folded stacks go to `$TMPDIR/apiload-profiles/`.
    /// The profiler's own CPU shows in that run's figures.
    #[arg(long)]
    profile: bool,
}

/// What one (target, model, scale point) run measured.
#[derive(Default)]
struct Row {
    list: Vec<Duration>,
    write: Vec<Duration>,
    delivery: Vec<Duration>,
    writes_ok: u64,
    conflicts: u64,
    expected: u64,
    delivered: u64,
    duplicates: u64,
    errors: u64,
    progress_replies: u64,
    etcd_watchers: f64,
    etcd_streams: f64,
    etcd_conns: usize,
    front_cpu: f64,
    /// The store's CPU (etcd, or PostgreSQL's processes), % of one core.
    store_cpu: f64,
    loadgen_cpu: f64,
    setup: Duration,
    /// Client connections and watch streams open during the load.
    conns: usize,
    streams: usize,
    write_throughput: f64,
    /// The slowest writes and when they started, relative to the compactor.
    slowest: String,
    /// Writes slower than `observe::SLOW_WRITE`, hop by hop.
    slow_writes: observe::SlowWrites,
    /// Lists running at once, as each list saw it when it started: max, mean.
    lists_in_flight: (usize, f64),
    /// Where the time went: etcd's compaction and disk histograms and etcdmux's hub
    /// lock over the write load, when the compactions ended, the slowest
    /// deliveries, the profiles, the load by second (markdown).
    details: String,
}

/// Highest memory seen, in KiB, sampled by the watchdog.
#[derive(Default)]
struct Peaks {
    store: AtomicU64,
    front: AtomicU64,
    loadgen: AtomicU64,
}

impl Peaks {
    fn sample(&self, store: Store, front: Option<u32>) {
        self.store.fetch_max(store.mem_kib(), Ordering::Relaxed);
        if let Some(f) = front {
            self.front.fetch_max(rss_kib(f), Ordering::Relaxed);
        }
        self.loadgen.fetch_max(rss_kib(std::process::id()), Ordering::Relaxed);
    }

    fn mib(v: &AtomicU64) -> f64 {
        v.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

/// One cell of the report: a target at a scale point, measured or failed.
struct Outcome {
    model: Model,
    projects: usize,
    target: &'static str,
    result: Result<Row, String>,
    /// Why the target degraded here (empty when it did not).
    degraded: Vec<String>,
    /// The store's peak: etcd's RSS, or PostgreSQL's processes' PSS.
    store_mib: f64,
    front_mib: f64,
    loadgen_mib: f64,
}

impl Outcome {
    /// The harness could not run this point on this machine (not the target's fault).
    fn not_run(&self) -> bool {
        self.result.as_ref().is_err_and(|e| e.starts_with(NOT_RUN))
    }
}

const NOT_RUN: &str = "not run";

fn key(p: usize, r: usize, o: usize) -> String {
    format!("/projects/p{p}/res{r}/default/obj{o}")
}

fn prefix(p: usize, r: usize) -> String {
    format!("/projects/p{p}/res{r}/")
}

async fn connect(url: &str, source: Option<IpAddr>) -> Result<Channel, Error> {
    Ok(Endpoint::from_shared(url.to_string())?.tcp_nodelay(true).local_address(source).connect().await?)
}

/// Open files a process needs besides one per project connection.
const FD_MARGIN: u64 = 1000;

/// Samples RSS every half second; returns why the point must stop when the machine
/// is about to run out of memory.
async fn watchdog(store: Store, front: Option<u32>, peaks: &Peaks, min_available_mib: u64) -> String {
    loop {
        peaks.sample(store, front);
        let available = mem_available_mib();
        if available < min_available_mib {
            return format!(
                "out of memory: {available} MiB left on the machine (store {:.0} MiB, proxy {:.0} MiB, load generator {:.0} MiB)",
                Peaks::mib(&peaks.store),
                Peaks::mib(&peaks.front),
                Peaks::mib(&peaks.loadgen)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One target at one scale point, on a fresh etcd.
async fn run_point(args: &Args, kind: &FrontKind, model: Model, projects: usize, fd_limit: u64) -> Outcome {
    // Give the previous point's memory back, so this point's peak is its own.
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe { libc::malloc_trim(0) };
    let peaks = Peaks::default();
    let label = format!("{} {projects}p", kind.name());
    let result = async {
        let needed = match model.connections(projects, args.pool_size) {
            1 => 0,
            n => n as u64 + FD_MARGIN,
        };
        if needed > fd_limit {
            return Err(format!(
                "{NOT_RUN}: {projects} connections need about {needed} open files in the load generator and in the server, and this machine's per-process limit is {fd_limit} (it could not be raised)"
            )
            .into());
        }
        let dir = tempfile::tempdir()?;
        let etcd_flags = if args.etcd_extensive_metrics { vec!["--metrics".into(), "extensive".into()] } else { vec![] };
        let etcd = start_etcd_with(&etcd_flags).await?;
        let front = start_front(&etcd, kind, dir.path(), "").await?;
        let front_pid = front.proc.as_ref().map(|p| p.pid());
        let stem = format!("loadtest/results/{}-{projects}p-{}", args.name, kind.short());
        let profile = args.profile.then_some(stem.as_str());
        tokio::select! {
            row = load(args, &etcd, &front, model, projects, &label, profile) => row,
            reason = watchdog(front.store(&etcd), front_pid, &peaks, args.min_available_mib) => Err(reason.into()),
        }
    }
    .await
    .map(|mut r: Row| {
        for v in [&mut r.list, &mut r.write, &mut r.delivery] {
            v.sort();
        }
        r
    })
    .map_err(|e: Error| chain(&*e));
    let degraded = match &result {
        Err(e) => vec![e.clone()],
        Ok(r) => degraded(r, Duration::from_millis(args.p99_bound_ms)),
    };
    Outcome {
        model,
        projects,
        target: kind.name(),
        result,
        degraded,
        store_mib: Peaks::mib(&peaks.store),
        front_mib: Peaks::mib(&peaks.front),
        loadgen_mib: Peaks::mib(&peaks.loadgen),
    }
}

/// Why a measured point counts as degraded (empty: it held).
fn degraded(r: &Row, bound: Duration) -> Vec<String> {
    let mut why = Vec::new();
    for (what, v) in [("write", &r.write), ("delivery", &r.delivery)] {
        // On a sorted copy: the first run of this benchmark judged unsorted samples
        // and called a 102 ms p99 "ok".
        let mut sorted = v.clone();
        sorted.sort();
        let p99 = percentile(&sorted, 0.99);
        if p99 > bound {
            why.push(format!("{what} p99 {} ms > {} ms", ms(p99), bound.as_millis()));
        }
    }
    for (n, what) in [
        (r.errors, "errors"),
        (r.expected.saturating_sub(r.delivered), "events lost"),
        (r.duplicates, "events duplicated"),
    ] {
        if n > 0 {
            why.push(format!("{n} {what}"));
        }
    }
    why
}

/// Failures that are bugs, not load: what `--check` turns into a non-zero exit.
fn correctness_failures(o: &Outcome) -> Option<String> {
    let r = o.result.as_ref().ok()?;
    let lost = r.expected.saturating_sub(r.delivered);
    (r.errors > 0 || lost > 0 || r.duplicates > 0).then(|| {
        format!(
            "{} at {} projects ({}): {} errors, {lost} events lost, {} duplicated",
            o.target,
            o.projects,
            o.model.name(),
            r.errors,
            r.duplicates
        )
    })
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let max_projects = args.projects.iter().copied().max().unwrap_or(0) as u64;
    let fd_limit = raise_fd_limit((max_projects + FD_MARGIN).max(65_536));
    let targets: Vec<FrontKind> = args
        .targets
        .iter()
        .map(|t| FrontKind::parse(t, &args.etcdmux, &args.etcdmux_config))
        .collect::<Result<_, _>>()?;
    let target_names: Vec<&'static str> = targets.iter().map(|k| k.name()).collect();
    let mut outcomes = Vec::new();
    for &model in &args.models {
        for &projects in &args.projects {
            for kind in &targets {
                eprintln!("apiload: {} projects, {}, {}", projects, model.name(), kind.name());
                let o = run_point(&args, kind, model, projects, fd_limit).await;
                eprintln!(
                    "apiload:   {}",
                    if o.degraded.is_empty() { "ok".to_string() } else { o.degraded.join("; ") }
                );
                outcomes.push(o);
            }
        }
    }

    let report = report::markdown(&args, &outcomes, &target_names, fd_limit)?;
    let path = write_report(&args.name, &report)?;
    std::fs::write(path.with_extension("csv"), csv(&outcomes))?;
    println!("{report}");
    eprintln!("apiload: report written to {}", path.display());
    let failures: Vec<String> = outcomes.iter().filter_map(correctness_failures).collect();
    if args.check && !failures.is_empty() {
        return Err(format!("apiload --check: {}", failures.join("; ")).into());
    }
    Ok(())
}

#[cfg(test)]
#[path = "apiload/tests.rs"]
mod tests;
