//! listbench: the read traffic of an apiserver running without its watch cache, side
//! by side in one run: etcd direct, etcdmux, and etcdmux with its read replica
//! (`[cache] enabled = true`).
//!
//! Per scale point: a fresh etcd; P projects × R resources × N objects (values about
//! 1 KiB, like a Kubernetes object) written through a loader etcdmux with Milo's
//! rules; then each target in turn against that same etcd, a fresh etcdmux process
//! for each. Readers (closed loop, `--readers` in flight) do, by weight: paged
//! LISTs of one (project, resource) like the apiserver's (limit 500, each page from
//! the last key + "\0", later pages pinned at the first page's revision), linearizable
//! GETs of one object, and LISTs at an exact recent revision. One writer updates
//! random objects at a fixed rate throughout, and reads each write back.
//!
//! Every read is checked: it must not miss a write that finished before it began
//! (the writer publishes each write's revision once etcd answered it), and lists
//! must hold every object at or below their revision. `--check` turns a failed or
//! stale read into a non-zero exit.
//!
//! Upstream cost is read from etcd's own `/metrics` (`grpc_server_handled_total` by
//! method, `etcd_mvcc_range_total`, bytes sent) and etcd's CPU from `/proc`.

// A crate root's modules live beside it; these are listbench's own.
#[path = "listbench/reads.rs"]
mod reads;
#[path = "listbench/report.rs"]
mod report;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use etcdmux::pb::etcdserverpb::{kv_client::KvClient, request_op, PutRequest, RangeRequest, RequestOp, TxnRequest};
use etcdmux_loadtest::{
    b, bar, bounded, chain, cpu_time, labeled, loadavg, rss_kib, scrape, start_etcd, start_front, value, write_report,
    Error, Etcd, Front, FrontKind, Rng, MILO_CONFIG,
};
use reads::{reader, writer, Ctx, Tally};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

/// etcdmux without its read replica (on by default).
const NO_CACHE: &str = "[cache]\nenabled = false\n";

#[derive(Parser, Debug)]
#[command(about = "LIST/GET load without a watch cache: etcd direct vs etcdmux vs etcdmux with its read replica")]
struct Args {
    #[arg(long, default_value = "target/release/etcdmux")]
    etcdmux: PathBuf,
    /// etcdmux's config; listener, upstream and metrics addresses are set per run.
    #[arg(long, default_value = MILO_CONFIG)]
    etcdmux_config: PathBuf,
    /// Project counts (scale points), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    projects: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    resources: usize,
    /// Objects per (project, resource).
    #[arg(long, default_value_t = 5)]
    objects: usize,
    #[arg(long, default_value_t = 1024)]
    value_bytes: usize,
    /// Readers: reads in flight at most.
    #[arg(long, default_value_t = 32)]
    readers: usize,
    /// Reads per second offered, all readers together (each reader paced; a late one
    /// skips the turns it missed). 0: closed loop, each reader reads again as soon as
    /// it is answered.
    #[arg(long, default_value_t = 0)]
    read_rate: u64,
    /// Client connections the reads and writes are spread over.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Weights of the three reads: paged LIST, GET, LIST at an exact revision.
    #[arg(long, default_value_t = 4)]
    list_weight: usize,
    #[arg(long, default_value_t = 5)]
    get_weight: usize,
    #[arg(long, default_value_t = 1)]
    exact_weight: usize,
    /// Page size of the LISTs (the apiserver's is 500).
    #[arg(long, default_value_t = 500)]
    page_limit: i64,
    /// An exact-revision LIST reads at up to this many revisions before the newest a
    /// read has seen.
    #[arg(long, default_value_t = 100)]
    exact_lag: i64,
    /// Object updates per second during the measurement, each read back once done.
    #[arg(long, default_value_t = 50)]
    write_rate: u64,
    /// Load before each measurement, not measured.
    #[arg(long, default_value_t = 5)]
    warmup_secs: u64,
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Transactions in flight while the data is written.
    #[arg(long, default_value_t = 32)]
    load_concurrency: usize,
    /// `cache.max_bytes` of the replica target, in MiB (large enough for the data).
    #[arg(long, default_value_t = 8192)]
    cache_max_mib: u64,
    /// Targets, comma-separated: direct, etcdmux, cache.
    #[arg(long, value_delimiter = ',', default_value = "direct,etcdmux,cache")]
    targets: Vec<String>,
    #[arg(long, default_value = "list")]
    name: String,
    /// Exit non-zero when a read failed or missed a write that finished before it began.
    #[arg(long)]
    check: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Direct,
    Mux,
    Cache,
}

impl Target {
    fn parse(s: &str) -> Result<Target, Error> {
        match s {
            "direct" => Ok(Target::Direct),
            "etcdmux" => Ok(Target::Mux),
            "cache" => Ok(Target::Cache),
            other => Err(format!("unknown target {other:?} (direct, etcdmux, cache)").into()),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Target::Direct => "etcd direct",
            Target::Mux => "etcdmux",
            Target::Cache => "etcdmux + replica",
        }
    }

    /// Clients of etcdmux use Milo's tenant keys; straight on etcd, the same objects
    /// are read at the layout's upstream keys.
    fn prefix(self, p: usize, r: usize) -> String {
        match self {
            Target::Direct => format!("/registry/res{r}/clusters/p{p}/"),
            _ => format!("/projects/p{p}/res{r}/"),
        }
    }

    fn key(self, p: usize, r: usize, o: usize) -> String {
        format!("{}default/obj{o}", self.prefix(p, r))
    }
}

/// The data: projects × resources × objects.
#[derive(Debug, Clone, Copy)]
struct Shape {
    projects: usize,
    resources: usize,
    objects: usize,
    value_bytes: usize,
}

impl Shape {
    fn len(&self) -> usize {
        self.projects * self.resources * self.objects
    }

    fn index(&self, p: usize, r: usize, o: usize) -> usize {
        (p * self.resources + r) * self.objects + o
    }

    /// Key and value bytes of the data as etcd (and the replica) holds it.
    fn raw_bytes(&self) -> u64 {
        let keys: usize = (0..self.projects)
            .flat_map(|p| (0..self.resources).map(move |r| Target::Direct.prefix(p, r).len()))
            .map(|prefix| (0..self.objects).map(|o| prefix + format!("default/obj{o}").len()).sum::<usize>())
            .sum();
        (keys + self.len() * self.value_bytes) as u64
    }
}

async fn connect(url: &str, n: usize) -> Result<Vec<Channel>, Error> {
    let mut out = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        out.push(Endpoint::from_shared(url.to_string())?.tcp_nodelay(true).connect().await?);
    }
    Ok(out)
}

/// Writes the data through `url` (an etcdmux with Milo's rules), a transaction of at
/// most 100 puts at a time, and notes each object's revision.
async fn load_data(url: &str, shape: Shape, known: &Arc<Vec<AtomicI64>>, limit: usize) -> Result<(), Error> {
    let ch = connect(url, 1).await?.remove(0);
    let pb = bar(shape.projects, format!("load {} projects", shape.projects));
    bounded(shape.projects, limit, &pb, |p| {
        let (ch, known) = (ch.clone(), known.clone());
        async move {
            let objects: Vec<(usize, usize)> =
                (0..shape.resources).flat_map(|r| (0..shape.objects).map(move |o| (r, o))).collect();
            for chunk in objects.chunks(100) {
                let success = chunk
                    .iter()
                    .map(|&(r, o)| RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest {
                            key: b(&Target::Mux.key(p, r, o)),
                            value: value(0, shape.value_bytes),
                            ..Default::default()
                        })),
                    })
                    .collect();
                let resp = KvClient::new(ch.clone()).txn(TxnRequest { success, ..Default::default() }).await?;
                let rev = resp.into_inner().header.map_or(0, |h| h.revision);
                for &(r, o) in chunk {
                    known[shape.index(p, r, o)].store(rev, Ordering::Release);
                }
            }
            Ok(())
        }
    })
    .await?;
    pb.finish_and_clear();
    Ok(())
}

/// One target measured at one scale point.
#[derive(Default)]
struct Row {
    t: Tally,
    secs: f64,
    /// Deltas of etcd's counters over the measurement: Range, Txn and all unary calls,
    /// ranges executed (also inside txns), bytes sent to clients.
    range: f64,
    txn: f64,
    unary: f64,
    mvcc_ranges: f64,
    sent: f64,
    /// CPU seconds per second.
    etcd_cpu: f64,
    front_cpu: f64,
    loadgen_cpu: f64,
    /// Peak RSS in MiB.
    etcd_rss: f64,
    front_rss: f64,
    /// The replica's own metrics at the end, and deltas over the measurement.
    cache_bytes: f64,
    cache_keys: f64,
    hits: f64,
    forwarded: Vec<(&'static str, f64)>,
    read_index_calls: f64,
    /// Linearizable reads that waited for the replica to apply etcd's revision, and
    /// their total wait in seconds.
    waits: f64,
    waited: f64,
    /// Ranges answered locally as linearizable reads.
    linearizable: f64,
    /// Time from the etcdmux start to a live replica.
    cache_ready: Option<Duration>,
    loadavg: f64,
}

const FORWARD_REASONS: [&str; 10] = [
    "outside",
    "excluded",
    "not_loaded",
    "lagging",
    "before_window",
    "after_applied",
    "compacted",
    "sort",
    "read_index_failed",
    "require_leader",
];

/// etcd's counters in one scrape.
fn etcd_counters(text: &str) -> [f64; 5] {
    let calls = |m| labeled(text, "grpc_server_handled_total", &[("grpc_method", m)]);
    [
        calls("Range"),
        calls("Txn"),
        labeled(text, "grpc_server_handled_total", &[("grpc_type", "unary")]),
        labeled(text, "etcd_mvcc_range_total", &[]),
        labeled(text, "etcd_network_client_grpc_sent_bytes_total", &[]),
    ]
}

/// Waits until the replica of the etcdmux at `metrics` is loaded with every object.
async fn replica_live(metrics: &str, keys: usize) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(900);
    while Instant::now() < deadline {
        let text = scrape(metrics).await;
        if labeled(&text, "etcdmux_cache_loads_total", &[("result", "ok")]) >= 1.0
            && labeled(&text, "etcdmux_cache_keys", &[]) >= keys as f64
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err("the replica did not load within 900 s".into())
}

/// Readers and the writer, for `secs` seconds.
async fn run_load(args: &Args, ctx: Ctx, secs: u64, seed: u64) -> Tally {
    let ctx = Arc::new(Ctx { stop: Instant::now() + Duration::from_secs(secs), ..ctx });
    let mut set = JoinSet::new();
    for i in 0..args.readers.max(1) {
        // Paced readers take turns evenly spread over the period.
        let offset = ctx.pace.map_or(Duration::ZERO, |p| p * i as u32 / args.readers.max(1) as u32);
        set.spawn(reader(ctx.clone(), Rng(seed ^ (i as u64 + 1) << 20), offset));
    }
    set.spawn(writer(ctx.clone(), args.write_rate, Rng(seed ^ 0xabcdef)));
    let mut all = Tally::default();
    while let Some(t) = set.join_next().await {
        match t {
            Ok(t) => all.merge(t),
            Err(e) => all.error(format!("a load task failed: {e}")),
        }
    }
    all
}

async fn measure(
    args: &Args,
    etcd: &Etcd,
    front: &Front,
    target: Target,
    shape: Shape,
    known: &Arc<Vec<AtomicI64>>,
) -> Result<Row, Error> {
    let chans = connect(&front.url, args.connections).await?;
    // Exact-revision lists start from the revision etcd is at now.
    let mut kv = KvClient::new(chans[0].clone());
    let first = kv.range(RangeRequest { key: b(&target.key(0, 0, 0)), ..Default::default() }).await?;
    let newest = first.into_inner().header.map_or(1, |h| h.revision);
    let ctx = |stop| Ctx {
        target,
        shape,
        chans: chans.clone(),
        known: known.clone(),
        newest: AtomicI64::new(newest),
        page_limit: args.page_limit,
        exact_lag: args.exact_lag,
        pace: (args.read_rate > 0).then(|| Duration::from_secs_f64(args.readers.max(1) as f64 / args.read_rate as f64)),
        loaded_at: known.iter().map(|k| k.load(Ordering::Acquire)).max().unwrap_or(1),
        weights: [args.list_weight, args.get_weight, args.exact_weight],
        stop,
    };
    let mut row = Row::default();
    // Warm-up: not timed, but its failures count.
    let warm = run_load(args, ctx(Instant::now()), args.warmup_secs, 1).await;
    row.t.merge(Tally { errors: warm.errors, stale: warm.stale, failures: warm.failures, ..Default::default() });

    let front_pid = front.proc.as_ref().map_or(etcd.pid(), |p| p.pid());
    let mux = front.metrics_url.clone().unwrap_or_default();
    let (e0, m0) = (etcd_counters(&scrape(&etcd.metrics_url).await), scrape(&mux).await);
    let cpu = || [cpu_time(etcd.pid()), cpu_time(front_pid), cpu_time(std::process::id())];
    let (c0, t0) = (cpu(), Instant::now());
    row.loadavg = loadavg();
    let (done, etcd_peak, front_peak) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sampler = tokio::spawn({
        let (done, ep, fp, etcd_pid) = (done.clone(), etcd_peak.clone(), front_peak.clone(), etcd.pid());
        let front_pid = front.proc.as_ref().map(|p| p.pid());
        async move {
            while !done.load(Ordering::Relaxed) {
                ep.fetch_max(rss_kib(etcd_pid), Ordering::Relaxed);
                fp.fetch_max(front_pid.map_or(0, rss_kib), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });
    let t = run_load(args, ctx(Instant::now()), args.duration_secs, 2).await;
    row.secs = t0.elapsed().as_secs_f64();
    let c1 = cpu();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let (e1, m1) = (etcd_counters(&scrape(&etcd.metrics_url).await), scrape(&mux).await);
    let per_sec = |i: usize| (c1[i].saturating_sub(c0[i])).as_secs_f64() / row.secs;
    (row.etcd_cpu, row.front_cpu, row.loadgen_cpu) =
        (per_sec(0), if front.proc.is_some() { per_sec(1) } else { 0.0 }, per_sec(2));
    [row.range, row.txn, row.unary, row.mvcc_ranges, row.sent] = std::array::from_fn(|i| e1[i] - e0[i]);
    row.etcd_rss = etcd_peak.load(Ordering::Relaxed) as f64 / 1024.0;
    row.front_rss = front_peak.load(Ordering::Relaxed) as f64 / 1024.0;
    let delta = |name, with: &[(&str, &str)]| labeled(&m1, name, with) - labeled(&m0, name, with);
    row.hits = delta("etcdmux_cache_hits_total", &[]);
    row.forwarded =
        FORWARD_REASONS.iter().map(|&r| (r, delta("etcdmux_cache_forwarded_total", &[("reason", r)]))).collect();
    row.read_index_calls = delta("etcdmux_cache_read_index_calls_total", &[]);
    row.linearizable = delta("etcdmux_cache_hits_total", &[("consistency", "linearizable")]);
    row.waits = delta("etcdmux_cache_read_wait_seconds_count", &[]);
    row.waited = delta("etcdmux_cache_read_wait_seconds_sum", &[]);
    row.cache_bytes = labeled(&m1, "etcdmux_cache_bytes", &[]);
    row.cache_keys = labeled(&m1, "etcdmux_cache_keys", &[]);
    row.t.merge(t);
    for v in [&mut row.t.list, &mut row.t.get, &mut row.t.exact] {
        v.sort();
    }
    Ok(row)
}

/// One scale point: the data written once, then every target against that etcd.
struct Point {
    shape: Shape,
    raw: u64,
    load: Duration,
    etcd_db: f64,
    rows: Vec<(Target, Result<Row, String>)>,
}

async fn run_point(args: &Args, targets: &[Target], shape: Shape) -> Result<Point, Error> {
    let dir = tempfile::tempdir()?;
    let etcd = start_etcd().await?;
    let mux = FrontKind::Etcdmux { bin: args.etcdmux.clone(), config: args.etcdmux_config.clone() };
    let known: Arc<Vec<AtomicI64>> = Arc::new((0..shape.len()).map(|_| AtomicI64::new(0)).collect());
    let started = Instant::now();
    {
        let loader = start_front(&etcd, &mux, dir.path(), NO_CACHE).await?;
        load_data(&loader.url, shape, &known, args.load_concurrency).await?;
    }
    let load = started.elapsed();
    let mut rows = Vec::new();
    for &target in targets {
        eprintln!("listbench: {} projects, {}", shape.projects, target.name());
        let row = async {
            let extra = format!("[cache]\nenabled = true\nmax_bytes = {}\n", args.cache_max_mib << 20);
            let (kind, extra) = match target {
                Target::Direct => (FrontKind::Direct, String::new()),
                Target::Mux => (mux.clone(), NO_CACHE.to_string()),
                Target::Cache => (mux.clone(), extra),
            };
            let t0 = Instant::now();
            let front = start_front(&etcd, &kind, dir.path(), &extra).await?;
            let ready = match (&front.metrics_url, target) {
                (Some(m), Target::Cache) => Some(replica_live(m, shape.len()).await.map(|()| t0.elapsed())?),
                _ => None,
            };
            let mut row = measure(args, &etcd, &front, target, shape, &known).await?;
            row.cache_ready = ready;
            Ok::<Row, Error>(row)
        }
        .await
        .map_err(|e| chain(&*e));
        match &row {
            Ok(r) => eprintln!(
                "listbench:   {:.0} reads/s, {} errors, {} stale",
                r.t.reads() as f64 / r.secs,
                r.t.errors,
                r.t.stale
            ),
            Err(e) => eprintln!("listbench:   failed: {e}"),
        }
        rows.push((target, row));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let etcd_db = labeled(&scrape(&etcd.metrics_url).await, "etcd_mvcc_db_total_size_in_bytes", &[]) / 1048576.0;
    Ok(Point { shape, raw: shape.raw_bytes(), load, etcd_db, rows })
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let targets = args.targets.iter().map(|t| Target::parse(t)).collect::<Result<Vec<_>, _>>()?;
    let (mut points, mut failed) = (Vec::new(), Vec::new());
    for &projects in &args.projects {
        let shape = Shape { projects, resources: args.resources, objects: args.objects, value_bytes: args.value_bytes };
        // Give the previous point's memory back.
        // SAFETY: malloc_trim only releases free heap pages.
        unsafe { libc::malloc_trim(0) };
        match run_point(&args, &targets, shape).await {
            Ok(p) => points.push(p),
            Err(e) => failed.push(format!("{projects} projects: {}", chain(&*e))),
        }
    }
    let r = report::report(&args, &points, &failed)?;
    let path = write_report(&args.name, &r)?;
    println!("{r}");
    eprintln!("listbench: report written to {}", path.display());
    let bad: Vec<String> = points
        .iter()
        .flat_map(|pt| pt.rows.iter().map(move |(t, row)| (pt.shape.projects, t, row)))
        .filter_map(|(p, t, row)| match row {
            Err(e) => Some(format!("{} at {p} projects: {e}", t.name())),
            Ok(r) if r.t.errors + r.t.stale > 0 => {
                Some(format!("{} at {p} projects: {} failed, {} stale reads", t.name(), r.t.errors, r.t.stale))
            }
            Ok(_) => None,
        })
        .chain(failed)
        .collect();
    if args.check && !bad.is_empty() {
        return Err(format!("listbench --check: {}", bad.join("; ")).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_is_what_the_report_says() {
        let s = Shape { projects: 2, resources: 2, objects: 3, value_bytes: 1024 };
        let keys: usize =
            (0..2).flat_map(|p| (0..2).flat_map(move |r| (0..3).map(move |o| Target::Direct.key(p, r, o).len()))).sum();
        assert_eq!(s.raw_bytes(), (keys + 12 * 1024) as u64);
        let mut seen: Vec<usize> =
            (0..2).flat_map(|p| (0..2).flat_map(move |r| (0..3).map(move |o| s.index(p, r, o)))).collect();
        seen.sort();
        assert_eq!(seen, (0..12).collect::<Vec<_>>(), "one slot per object");
    }
}
