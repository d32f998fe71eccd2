//! throughput: requests per second with a fixed number of clients, each sending its
//! next request as soon as the last is answered, against etcd direct, etcd's
//! `grpc-proxy` and etcdmux in one run; and what each proxy spends per request.
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
//! `--duration-secs` measured. Requests answered after the measured window are not
//! counted. CPU is read from `/proc/<pid>/stat` of etcd, the proxy and this process
//! at the window's start and end. With `--rounds` > 1 every cell runs again, the
//! targets' order rotated each round, and the report shows the median round.

#[path = "throughput/report.rs"]
mod report;

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use etcdmux::pb::etcdserverpb::{
    compare, kv_client::KvClient, request_op, response_op, watch_client::WatchClient, watch_request, Compare,
    PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
};
use etcdmux::upstream::body::WholeBody;
use etcdmux_loadtest::{
    b, chain, cpu_time, labeled, loadavg, prefix_end, scrape, start_etcd, start_front, value, write_report, Error,
    FrontKind, Rng, MILO_CONFIG,
};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
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
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "etcd direct",
            Target::GrpcProxy => "etcd grpc-proxy",
            Target::Etcdmux => "etcdmux",
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
#[command(about = "Throughput with fixed clients: etcd direct vs etcd grpc-proxy vs etcdmux")]
pub struct Args {
    #[arg(long, default_value = "target/release/etcdmux")]
    etcdmux: PathBuf,
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
    /// Targets, comma-separated: direct, grpc-proxy, etcdmux.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "direct,grpc-proxy,etcdmux")]
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
    /// `loadtest/results/<name>-<clients>c-<workload>.{svg,txt}`. The profiler's cost
    /// shows in that run's figures.
    #[arg(long)]
    profile: bool,
    /// Exit non-zero when a request failed or a cell could not run.
    #[arg(long)]
    check: bool,
}

/// What the clients of one cell saw.
#[derive(Default)]
pub struct Tally {
    /// Latencies of the requests answered inside the window, per [`Op`].
    pub lat: [Vec<Duration>; 3],
    pub errors: u64,
    pub conflicts: u64,
    pub failures: Vec<String>,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        for (mine, theirs) in self.lat.iter_mut().zip(o.lat) {
            mine.extend(theirs);
        }
        (self.errors, self.conflicts) = (self.errors + o.errors, self.conflicts + o.conflicts);
        let room = 5usize.saturating_sub(self.failures.len());
        self.failures.extend(o.failures.into_iter().take(room));
    }

    pub fn ops(&self) -> usize {
        self.lat.iter().map(Vec::len).sum()
    }

    /// Every latency, sorted.
    pub fn all(&self) -> Vec<Duration> {
        let mut v: Vec<Duration> = self.lat.iter().flatten().copied().collect();
        v.sort();
        v
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
    /// CPU seconds over the window: etcd, the proxy (none for direct), this process.
    pub cpu: [f64; 3],
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

    /// CPU milliseconds per 1,000 requests of process `i` (0 etcd, 1 proxy, 2 load generator).
    pub fn cpu_per_kop(&self, i: usize) -> f64 {
        self.cpu[i] * 1e6 / self.t.ops().max(1) as f64
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What every client of a cell shares.
struct Ctx {
    chans: Vec<Channel>,
    keys: Vec<Bytes>,
    /// The mod revision each key was last written at, as its writer saw it.
    revs: Arc<Vec<AtomicI64>>,
    value: Bytes,
    clients: usize,
    /// Cumulative weights of range, put, txn.
    mix: [usize; 3],
    timeout: Option<Duration>,
    /// Each client's interval between requests (`--rate`); `None`: back to back.
    pace: Option<Duration>,
    stop: Instant,
}

impl Ctx {
    /// A request with the configured deadline.
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = self.timeout {
            r.set_timeout(t);
        }
        r
    }

    fn pick(&self, rng: &mut Rng) -> Op {
        let n = rng.below(self.mix[2]);
        OPS.into_iter().zip(self.mix).find(|(_, w)| n < *w).map_or(Op::Range, |(op, _)| op)
    }
}

fn key(p: usize, r: usize, o: usize) -> String {
    format!("/projects/p{p}/res{r}/default/obj{o}")
}

fn put_req(key: &Bytes, value: &Bytes) -> PutRequest {
    PutRequest { key: key.clone(), value: value.clone(), ..Default::default() }
}

/// The apiserver's update of `key` last seen at `rev`.
fn update_txn(key: &Bytes, value: &Bytes, rev: i64) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Mod as i32,
            key: key.clone(),
            target_union: Some(compare::TargetUnion::ModRevision(rev)),
            ..Default::default()
        }],
        success: vec![RequestOp { request: Some(request_op::Request::RequestPut(put_req(key, value))) }],
        failure: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest { key: key.clone(), ..Default::default() })),
        }],
    }
}

/// One client: requests back to back until the window closes.
async fn client(ctx: Arc<Ctx>, c: usize, mut rng: Rng) -> Tally {
    let mut t = Tally::default();
    // Each request in two HTTP/2 frames, as Go's gRPC clients (the apiserver's) send
    // them; tonic alone adds an empty frame to end every request.
    let mut kv = KvClient::new(WholeBody::new(ctx.chans[c % ctx.chans.len()].clone()));
    let own: Vec<usize> = (c..ctx.keys.len()).step_by(ctx.clients).collect();
    // Paced clients take turns evenly spread over the interval; a late one skips the
    // turns it missed.
    let mut turns = ctx.pace.map(|p| {
        let offset = p * c as u32 / ctx.clients as u32;
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + offset, p);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        i
    });
    loop {
        if let Some(t) = &mut turns {
            t.tick().await;
        }
        let op = ctx.pick(&mut rng);
        let i = match op {
            Op::Range => rng.below(ctx.keys.len()),
            Op::Put | Op::Txn => own[rng.below(own.len())],
        };
        let k = &ctx.keys[i];
        let started = Instant::now();
        if started >= ctx.stop {
            break;
        }
        let out: Result<(), tonic::Status> = match op {
            Op::Range => kv.range(ctx.req(RangeRequest { key: k.clone(), ..Default::default() })).await.map(drop),
            Op::Put => kv.put(ctx.req(put_req(k, &ctx.value))).await.map(|r| {
                ctx.revs[i].store(r.into_inner().header.map_or(0, |h| h.revision), Ordering::Relaxed);
            }),
            Op::Txn => {
                let rev = ctx.revs[i].load(Ordering::Relaxed);
                kv.txn(ctx.req(update_txn(k, &ctx.value, rev))).await.map(|r| {
                    let r = r.into_inner();
                    let now = if r.succeeded {
                        r.header.map_or(0, |h| h.revision)
                    } else {
                        t.conflicts += 1;
                        match r.responses.first().and_then(|x| x.response.as_ref()) {
                            Some(response_op::Response::ResponseRange(rr)) => {
                                rr.kvs.first().map_or(0, |kv| kv.mod_revision)
                            }
                            _ => 0,
                        }
                    };
                    ctx.revs[i].store(now, Ordering::Relaxed);
                })
            }
        };
        let done = Instant::now();
        if done > ctx.stop {
            break;
        }
        match out {
            Ok(()) => t.lat[op as usize].push(done - started),
            Err(e) => {
                t.errors += 1;
                if t.failures.len() < 5 {
                    t.failures.push(format!("{op:?}: {}", chain(&e)));
                }
                // A target that fails every request must not spin the cores.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    t
}

/// Every client, until `ctx.stop`.
async fn run_clients(ctx: Ctx, seed: u64) -> Tally {
    let ctx = Arc::new(ctx);
    let mut set = JoinSet::new();
    for c in 0..ctx.clients {
        set.spawn(client(ctx.clone(), c, Rng(seed ^ ((c as u64 + 1) << 24))));
    }
    let mut all = Tally::default();
    while let Some(t) = set.join_next().await {
        match t {
            Ok(t) => all.merge(t),
            Err(e) => {
                all.errors += 1;
                all.failures.push(format!("a client task failed: {e}"));
            }
        }
    }
    all
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
    let cpu = || [cpu_time(etcd.pid()), front_pid.map_or(Duration::ZERO, cpu_time), cpu_time(std::process::id())];
    let e0 = etcd_counters(&etcd.metrics_url).await;
    let load0 = loadavg();
    let (t0, c0, ev0) = (Instant::now(), cpu(), events.load(Ordering::Relaxed));
    let stop = t0 + Duration::from_secs(args.duration_secs);
    let perf = match (args.profile, target, front_pid) {
        (true, Target::Etcdmux, Some(pid)) => Some(Profile::start(pid, args.duration_secs)?),
        _ => None,
    };
    let load = tokio::spawn(run_clients(ctx(stop), 2));
    tokio::time::sleep_until(stop.into()).await;
    let (c1, ev1) = (cpu(), events.load(Ordering::Relaxed));
    drop(watch);
    if let Some(p) = perf {
        let out = format!("loadtest/results/{}-{clients}c-{}", args.name, format!("{workload:?}").to_lowercase());
        p.finish(&out, &format!("etcdmux, {clients} clients, {workload:?}")).await?;
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
        events: ev1 - ev0,
        loadavg: load0.max(loadavg()),
    })
}

/// `perf record` of one process over the measured window.
struct Profile {
    child: std::process::Child,
    data: tempfile::NamedTempFile,
}

impl Profile {
    fn start(pid: u32, secs: u64) -> Result<Profile, Error> {
        let data = tempfile::NamedTempFile::new()?;
        let child = std::process::Command::new("perf")
            .args(["record", "-F", "499", "-g", "--call-graph", "dwarf,16384", "-p", &pid.to_string(), "-o"])
            .arg(data.path())
            .args(["--", "sleep", &secs.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("starting perf (Debian: linux-perf): {e}"))?;
        Ok(Profile { child, data })
    }

    /// Waits for the recording, then folds and draws it into `out`.{svg,folded,txt}.
    async fn finish(mut self, out: &str, title: &str) -> Result<(), Error> {
        let (out, title) = (out.to_string(), title.to_string());
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            self.child.wait()?;
            let script = std::process::Command::new("perf")
                .args(["script", "-i"])
                .arg(self.data.path())
                .stderr(std::process::Stdio::null())
                .output()?;
            let mut draw = std::process::Command::new("python3")
                .args(["scripts/flamegraph.py", "--title", &title, &out])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()?;
            if let Some(mut stdin) = draw.stdin.take() {
                std::io::Write::write_all(&mut stdin, &script.stdout)?;
            }
            if !draw.wait()?.success() {
                return Err(format!("scripts/flamegraph.py failed for {out}").into());
            }
            Ok(())
        })
        .await?
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(mix: [usize; 3]) -> Ctx {
        Ctx {
            chans: Vec::new(),
            keys: Vec::new(),
            revs: Arc::default(),
            value: Bytes::new(),
            clients: 1,
            mix,
            timeout: None,
            pace: None,
            stop: Instant::now(),
        }
    }

    #[test]
    fn the_mix_follows_the_weights() {
        let mut rng = Rng(7);
        let mut seen = [0usize; 3];
        let c = ctx([2, 3, 6]); // range 2, put 1, txn 3
        for _ in 0..60_000 {
            seen[c.pick(&mut rng) as usize] += 1;
        }
        for (got, want) in seen.iter().zip([20_000, 10_000, 30_000]) {
            assert!(got.abs_diff(want) < 1_000, "{seen:?}");
        }
        let only_txn = ctx([0, 0, 1]);
        assert!((0..100).all(|_| only_txn.pick(&mut rng) == Op::Txn));
    }

    #[test]
    fn the_update_is_the_apiservers() {
        let t = update_txn(&b("/k"), &b("v"), 42);
        assert_eq!(t.compare[0].target_union, Some(compare::TargetUnion::ModRevision(42)));
        assert_eq!(t.compare[0].target, compare::CompareTarget::Mod as i32);
        assert!(matches!(t.success[0].request, Some(request_op::Request::RequestPut(_))));
        assert!(matches!(t.failure[0].request, Some(request_op::Request::RequestRange(_))));
    }
}
