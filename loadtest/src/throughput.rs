//! throughput: requests per second with a fixed number of clients, each sending its
//! next request as soon as the last is answered, against etcd direct, etcd's
//! `grpc-proxy`, etcdmux and etcdmux on the SQL backend (PostgreSQL) in one run; and
//! what each proxy and each store spends per request.
//!
//! Workloads: `range` (a linearizable GET of one key, as the apiserver reads without
//! its watch cache), `put` (one key, a value of `--value-bytes`), `txn` (the
//! apiserver's optimistic update: `mod_revision == rev` → put, else get the key) and
//! `mixed` (the three by weight, each client drawing its next one at random). Keys
//! are Milo's (`/projects/<p>/<resource>/default/<obj>`), the same for every target;
//! reads go to any key, writes only to the client's own keys, so a txn conflicts only
//! if something else wrote its key (counted).
//!
//! Every (clients, workload, target) cell runs on a fresh etcd with a fresh proxy:
//! the keys are written through the target, then `--warmup-secs` unmeasured and
//! `--duration-secs` measured (the SQL target on a fresh PostgreSQL instead). Requests
//! answered after the measured window are not counted. CPU is read from
//! `/proc/<pid>/stat` of the store (etcd, or every PostgreSQL process), the proxy and
//! this process at the window's start and end; memory at the window's end. With `--rounds` > 1 every cell runs again, the
//! targets' order rotated each round, and the report shows the median round.

#[path = "throughput/load.rs"]
mod load;
#[path = "throughput/report.rs"]
mod report;

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use etcdmux::pb::etcdserverpb::{
    kv_client::KvClient, request_op, watch_client::WatchClient, watch_request, RequestOp, TxnRequest,
    WatchCreateRequest, WatchRequest,
};
use etcdmux_loadtest::profile::{folded_dir, Profile, Unwind};
use etcdmux_loadtest::{
    b, chain, cpu_time, labeled, loadavg, prefix_end, rss_kib, scrape, start_etcd, start_front, value, write_report,
    write_summary, Error, FrontKind, MILO_CONFIG,
};
use load::{key, put_req, run_clients, Ctx, Tally};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    Range,
    Put,
    Txn,
    Mixed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    Direct,
    GrpcProxy,
    Etcdmux,
    /// Another etcdmux binary (`--baseline`), e.g. a build before a change.
    Baseline,
    /// etcdmux on the SQL backend, on a PostgreSQL of its own.
    #[value(name = "sql")]
    EtcdmuxSql,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "etcd direct",
            Target::GrpcProxy => "etcd grpc-proxy",
            Target::Etcdmux => "etcdmux",
            Target::Baseline => "etcdmux baseline",
            Target::EtcdmuxSql => "etcdmux on SQL",
        }
    }
}

/// The three requests; their index is their slot in [`Tally::lat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Range = 0,
    Put = 1,
    Txn = 2,
}

pub const OPS: [Op; 3] = [Op::Range, Op::Put, Op::Txn];

#[derive(Parser, Debug)]
#[command(about = "Throughput with fixed clients: etcd direct vs etcd grpc-proxy vs etcdmux (on etcd and on SQL)")]
pub struct Args {
    #[arg(long, default_value = "target/release/etcdmux")]
    pub etcdmux: PathBuf,
    /// Another etcdmux binary measured as the target `baseline` (same config), to
    /// compare two builds in one run.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// etcdmux's config; listener, upstream and metrics addresses are set per run.
    #[arg(long, default_value = MILO_CONFIG)]
    etcdmux_config: PathBuf,
    /// Client counts (each one request in flight at a time), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    pub clients: Vec<usize>,
    /// gRPC connections the clients are spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Workloads, comma-separated: range, put, txn, mixed.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "range,put,txn,mixed")]
    pub workloads: Vec<Workload>,
    /// Targets, comma-separated: direct, grpc-proxy, etcdmux, sql (etcdmux on
    /// PostgreSQL), baseline.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "direct,grpc-proxy,etcdmux,sql")]
    pub targets: Vec<Target>,
    /// Requests per second offered, all clients together (each client paced, a late
    /// one skips its missed turns); 0: as fast as they go. At a fixed rate every
    /// target gets the same work, so CPU per request compares without the batching a
    /// faster target gets in a closed loop.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Keys: projects × resources × objects. Projects are etcdmux's tenants: with more
    /// of them than `server.tenant_metrics_top` (100), most share the `other` label.
    #[arg(long, default_value_t = 1000)]
    pub projects: usize,
    #[arg(long, default_value_t = 10)]
    pub resources: usize,
    #[arg(long, default_value_t = 1)]
    pub objects: usize,
    /// Bytes per value written.
    #[arg(long, default_value_t = 1024)]
    pub value_bytes: usize,
    /// Weights of range, put and txn in the mixed workload.
    #[arg(long, default_value_t = 1)]
    pub range_weight: usize,
    #[arg(long, default_value_t = 1)]
    pub put_weight: usize,
    #[arg(long, default_value_t = 1)]
    pub txn_weight: usize,
    /// Also hold one watch (prev_kv) per (project, resource) on one stream during the
    /// load, as an apiserver's watch cache does, and count the events it receives.
    #[arg(long)]
    pub watch: bool,
    /// The deadline each request carries (`grpc-timeout`), as the apiserver's requests
    /// carry theirs (its default request timeout is 60 s); 0: none.
    #[arg(long, default_value_t = 60_000)]
    pub request_timeout_ms: u64,
    #[arg(long, default_value_t = 3)]
    pub warmup_secs: u64,
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Times every cell is run (the report shows the median round and the spread).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    #[arg(long, default_value = "throughput")]
    name: String,
    /// Record a CPU profile of etcdmux during each of its measured windows (`perf
    /// record -g --call-graph dwarf`) and draw it with `scripts/flamegraph.py` into
    /// `loadtest/results/<name>-<clients>c-<workload>.{svg,txt}` (a flamegraph and
    /// the heaviest functions). The profiler's cost shows in that run's figures.
    #[arg(long)]
    profile: bool,
    /// Exit non-zero when a request failed or a cell could not run.
    #[arg(long)]
    check: bool,
}

/// A task aborted when this is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One measured cell.
pub struct Row {
    pub round: usize,
    pub clients: usize,
    pub workload: Workload,
    pub target: Target,
    pub result: Result<Measured, String>,
}

#[derive(Default)]
pub struct Measured {
    pub t: Tally,
    pub secs: f64,
    /// CPU seconds over the window: the store (etcd, or PostgreSQL's processes), the
    /// proxy (none for direct), this process.
    pub cpu: [f64; 3],
    /// MiB at the window's end: the store (etcd's RSS, or PostgreSQL's processes'
    /// PSS), the proxy's RSS.
    pub mem: [f64; 2],
    /// etcd's counters over the window: unary calls answered, keys put, ranges
    /// executed, watch events sent (see [`ETCD_COUNTERS`]).
    pub etcd: [f64; 4],
    /// Watch events received over the window (with `--watch`).
    pub events: u64,
    pub loadavg: f64,
}

impl Measured {
    pub fn ops_per_sec(&self) -> f64 {
        self.t.ops() as f64 / self.secs.max(1e-9)
    }

    /// CPU milliseconds per 1,000 requests of process `i` (0 store, 1 proxy, 2 load generator).
    pub fn cpu_per_kop(&self, i: usize) -> f64 {
        self.cpu[i] * 1e6 / self.t.ops().max(1) as f64
    }
}

async fn connect(url: &str, n: usize) -> Result<Vec<Channel>, Error> {
    let mut out = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        out.push(Endpoint::from_shared(url.to_string())?.tcp_nodelay(true).connect().await?);
    }
    Ok(out)
}

/// Writes every key once (one transaction per project: a txn stays in one tenant;
/// `per_project` keys each) and notes its revision.
async fn seed(
    ch: &Channel,
    keys: &[Bytes],
    per_project: usize,
    value: &Bytes,
    revs: &[AtomicI64],
) -> Result<(), Error> {
    let mut kv = KvClient::new(ch.clone());
    let mut at = 0;
    for chunk in keys.chunks(per_project.max(1)).flat_map(|project| project.chunks(100)) {
        let success = chunk
            .iter()
            .map(|k| RequestOp { request: Some(request_op::Request::RequestPut(put_req(k, value))) })
            .collect();
        let rev =
            kv.txn(TxnRequest { success, ..Default::default() }).await?.into_inner().header.map_or(0, |h| h.revision);
        for r in &revs[at..at + chunk.len()] {
            r.store(rev, Ordering::Relaxed);
        }
        at += chunk.len();
    }
    Ok(())
}

/// What etcd did, from its `/metrics`: unary calls answered, keys put (also inside
/// txns), ranges executed (likewise), events sent to watchers.
pub const ETCD_COUNTERS: [&str; 4] =
    ["grpc_server_handled_total", "etcd_mvcc_put_total", "etcd_mvcc_range_total", "etcd_debugging_mvcc_events_total"];

async fn etcd_counters(metrics: &str) -> [f64; 4] {
    let text = scrape(metrics).await;
    let unary = labeled(&text, ETCD_COUNTERS[0], &[("grpc_type", "unary")]);
    [
        unary,
        labeled(&text, ETCD_COUNTERS[1], &[]),
        labeled(&text, ETCD_COUNTERS[2], &[]),
        labeled(&text, ETCD_COUNTERS[3], &[]),
    ]
}

/// One stream with a watch (prev_kv) per prefix, from the current revision, once
/// every watch is created; the events it receives are counted in `events`.
async fn watch_all(ch: &Channel, prefixes: &[String], events: Arc<AtomicU64>) -> Result<JoinHandle<()>, Error> {
    let (tx, rx) = mpsc::channel(prefixes.len().max(1));
    for p in prefixes {
        let create = WatchCreateRequest { key: b(p), range_end: prefix_end(p), prev_kv: true, ..Default::default() };
        tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) }).await?;
    }
    let mut stream = WatchClient::new(ch.clone()).watch(ReceiverStream::new(rx)).await?.into_inner();
    let mut created = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while created < prefixes.len() {
        let next = tokio::time::timeout_at(deadline.into(), stream.message()).await;
        match next {
            Ok(Ok(Some(w))) if w.canceled => return Err(format!("watch canceled: {}", w.cancel_reason).into()),
            Ok(Ok(Some(w))) => created += usize::from(w.created),
            Ok(Ok(None)) => return Err("the watch stream ended".into()),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(format!("{created} of {} watches created within 60 s", prefixes.len()).into()),
        }
    }
    Ok(tokio::spawn(async move {
        let _keep_open = tx;
        while let Ok(Some(w)) = stream.message().await {
            events.fetch_add(w.events.len() as u64, Ordering::Relaxed);
        }
    }))
}

/// One cell: a fresh etcd and proxy, the keys, the warm-up, the measured window.
async fn measure(args: &Args, target: Target, workload: Workload, clients: usize) -> Result<Measured, Error> {
    let dir = tempfile::tempdir()?;
    let etcd = start_etcd().await?;
    let kind = match target {
        Target::Direct => FrontKind::Direct,
        Target::GrpcProxy => FrontKind::GrpcProxy,
        Target::Etcdmux => FrontKind::Etcdmux { bin: args.etcdmux.clone(), config: args.etcdmux_config.clone() },
        Target::EtcdmuxSql => FrontKind::EtcdmuxSql { bin: args.etcdmux.clone(), config: args.etcdmux_config.clone() },
        Target::Baseline => {
            let bin = args.baseline.clone().ok_or("the baseline target needs --baseline <etcdmux binary>")?;
            FrontKind::Etcdmux { bin, config: args.etcdmux_config.clone() }
        }
    };
    let front = start_front(&etcd, &kind, dir.path(), "").await?;
    let chans = connect(&front.url, args.connections).await?;
    let keys: Vec<Bytes> = (0..args.projects)
        .flat_map(|p| (0..args.resources).flat_map(move |r| (0..args.objects).map(move |o| b(&key(p, r, o)))))
        .collect();
    let value = value(0, args.value_bytes);
    let revs: Arc<Vec<AtomicI64>> = Arc::new(keys.iter().map(|_| AtomicI64::new(0)).collect());
    seed(&chans[0], &keys, args.resources * args.objects, &value, &revs).await?;
    let events = Arc::new(AtomicU64::new(0));
    let watch = if args.watch {
        let prefixes: Vec<String> = (0..args.projects)
            .flat_map(|p| (0..args.resources).map(move |r| format!("/projects/p{p}/res{r}/")))
            .collect();
        Some(AbortOnDrop(watch_all(&chans[0], &prefixes, events.clone()).await?))
    } else {
        None
    };
    let weights = match workload {
        Workload::Range => [1, 0, 0],
        Workload::Put => [0, 1, 0],
        Workload::Txn => [0, 0, 1],
        Workload::Mixed => [args.range_weight, args.put_weight, args.txn_weight],
    };
    let mix = [weights[0], weights[0] + weights[1], weights[0] + weights[1] + weights[2]];
    if mix[2] == 0 {
        return Err("the mixed workload needs a weight above 0".into());
    }
    let ctx = |stop| Ctx {
        chans: chans.clone(),
        keys: keys.clone(),
        revs: revs.clone(),
        value: value.clone(),
        clients,
        mix,
        timeout: (args.request_timeout_ms > 0).then(|| Duration::from_millis(args.request_timeout_ms)),
        pace: (args.rate > 0).then(|| Duration::from_secs_f64(clients as f64 / args.rate as f64)),
        stop,
    };
    // Warm-up: connections, the proxy's caches, etcd's pages; its failures count.
    let warm = run_clients(ctx(Instant::now() + Duration::from_secs(args.warmup_secs)), 1).await;
    let front_pid = front.proc.as_ref().map(|p| p.pid());
    let store = front.store(&etcd);
    let cpu = || [store.cpu(), front_pid.map_or(Duration::ZERO, cpu_time), cpu_time(std::process::id())];
    let e0 = etcd_counters(&etcd.metrics_url).await;
    let load0 = loadavg();
    let (t0, c0, ev0) = (Instant::now(), cpu(), events.load(Ordering::Relaxed));
    let stop = t0 + Duration::from_secs(args.duration_secs);
    let perf = match (args.profile, target, front_pid) {
        (true, Target::Etcdmux, Some(pid)) => Some(Profile::start(pid, args.duration_secs, Unwind::Dwarf)?),
        _ => None,
    };
    let load = tokio::spawn(run_clients(ctx(stop), 2));
    tokio::time::sleep_until(stop.into()).await;
    let (c1, ev1) = (cpu(), events.load(Ordering::Relaxed));
    let mem = [store.mem_kib() as f64 / 1024.0, front_pid.map_or(0, rss_kib) as f64 / 1024.0];
    drop(watch);
    if let Some(p) = perf {
        let out = format!("loadtest/results/{}-{clients}c-{}", args.name, format!("{workload:?}").to_lowercase());
        let folded = folded_dir("throughput").join(format!("{}.folded", out.rsplit('/').next().unwrap_or(&out)));
        p.finish(&out, &format!("etcdmux, {clients} clients, {workload:?}"), Some(&folded)).await?;
    }
    let mut t = load.await?;
    let e1 = etcd_counters(&etcd.metrics_url).await;
    t.errors += warm.errors;
    t.failures.extend(warm.failures.into_iter().take(5usize.saturating_sub(t.failures.len())));
    for v in &mut t.lat {
        v.sort();
    }
    Ok(Measured {
        t,
        secs: (stop - t0).as_secs_f64(),
        cpu: std::array::from_fn(|i| c1[i].saturating_sub(c0[i]).as_secs_f64()),
        etcd: std::array::from_fn(|i| e1[i] - e0[i]),
        mem,
        events: ev1 - ev0,
        loadavg: load0.max(loadavg()),
    })
}

/// The commit this binary was run from, for the report (empty outside a git checkout).
fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let keys = args.projects * args.resources * args.objects;
    if let Some(&c) = args.clients.iter().find(|&&c| c == 0 || c > keys) {
        return Err(format!("{c} clients: every client needs a key of its own to write (1 to {keys})").into());
    }
    let mut rows = Vec::new();
    for round in 0..args.rounds.max(1) {
        for &clients in &args.clients {
            for &workload in &args.workloads {
                let n = args.targets.len();
                for k in 0..n {
                    let target = args.targets[(k + round) % n];
                    eprintln!("throughput: round {}, {clients} clients, {workload:?}, {}", round + 1, target.name());
                    let result = measure(&args, target, workload, clients).await.map_err(|e| chain(&*e));
                    match &result {
                        Ok(m) => eprintln!(
                            "throughput:   {:.0} ops/s, proxy CPU {:.1} ms per 1,000, {} errors",
                            m.ops_per_sec(),
                            m.cpu_per_kop(1),
                            m.t.errors
                        ),
                        Err(e) => eprintln!("throughput:   failed: {e}"),
                    }
                    rows.push(Row { round, clients, workload, target, result });
                }
            }
        }
    }
    let r = report::report(&args, &rows, &commit())?;
    let path = write_report(&args.name, &r)?;
    write_summary(&args.name, &report::summary(&args, &rows))?;
    println!("{r}");
    eprintln!("throughput: report written to {}", path.display());
    let bad: Vec<String> = rows
        .iter()
        .filter_map(|row| {
            let what = format!("{} {:?} with {} clients", row.target.name(), row.workload, row.clients);
            match &row.result {
                Err(e) => Some(format!("{what}: {e}")),
                Ok(m) if m.t.errors > 0 => Some(format!("{what}: {} errors ({})", m.t.errors, m.t.failures.join("; "))),
                Ok(m) if m.t.ops() == 0 => Some(format!("{what}: no request answered")),
                Ok(_) => None,
            }
        })
        .collect();
    if args.check && !bad.is_empty() {
        return Err(format!("throughput --check: {}", bad.join("; ")).into());
    }
    Ok(())
}
