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

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use etcdmux::pb::etcdserverpb::{
    compare, kv_client::KvClient, request_op, response_op, Compare, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use etcdmux::pb::mvccpb::KeyValue;
use etcdmux_loadtest::{
    b, bar, bounded, chain, cpu_time, labeled, loadavg, machine, ms, percentile, prefix_end, rss_kib, scrape,
    start_etcd, start_front, write_report, Error, Etcd, Front, FrontKind, MILO_CONFIG,
};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

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
    /// Reads in flight (closed loop).
    #[arg(long, default_value_t = 32)]
    readers: usize,
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

/// An object about `len` bytes long, like a Kubernetes object's JSON.
fn value(generation: u64, len: usize) -> Bytes {
    let mut v =
        format!(r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"generation":{generation}}},"data":{{"blob":""#);
    let fill = len.saturating_sub(v.len() + 3);
    v.extend(std::iter::repeat_n('x', fill));
    v.push_str(r#""}}"#);
    Bytes::from(v)
}

/// splitmix64: enough randomness for choosing keys, without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % n.max(1) as u64) as usize
    }
}

/// What readers and the writer saw.
#[derive(Default)]
struct Tally {
    list: Vec<Duration>,
    get: Vec<Duration>,
    exact: Vec<Duration>,
    errors: u64,
    stale: u64,
    /// The first few failures, for the report.
    failures: Vec<String>,
    writes: u64,
    conflicts: u64,
    read_backs: u64,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.list.extend(o.list);
        self.get.extend(o.get);
        self.exact.extend(o.exact);
        (self.errors, self.stale) = (self.errors + o.errors, self.stale + o.stale);
        (self.writes, self.conflicts, self.read_backs) =
            (self.writes + o.writes, self.conflicts + o.conflicts, self.read_backs + o.read_backs);
        let room = 10usize.saturating_sub(self.failures.len());
        self.failures.extend(o.failures.into_iter().take(room));
    }

    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.failures.len() < 10 {
            self.failures.push(what);
        }
    }

    fn stale(&mut self, what: String) {
        self.stale += 1;
        if self.failures.len() < 10 {
            self.failures.push(what);
        }
    }

    fn reads(&self) -> usize {
        self.list.len() + self.get.len() + self.exact.len()
    }
}

/// Why a read's answer is wrong: `want` keys expected; `before[o]` is the revision of
/// the newest write to object `o` that finished before the read began (0: none
/// known), `at` the revision read at; `exact` when that revision was asked for (older
/// writes than `before` are not known then: only writes at or below `at` are checked).
fn check_read(kvs: &[KeyValue], want: usize, before: &[i64], at: i64, exact: bool) -> Option<String> {
    if kvs.len() != want {
        return Some(format!("{} keys at revision {at}, want {want}", kvs.len()));
    }
    for kv in kvs {
        let key = String::from_utf8_lossy(&kv.key);
        let Some(o) = key.rsplit_once("/obj").and_then(|(_, o)| o.parse::<usize>().ok()).filter(|&o| o < before.len())
        else {
            return Some(format!("unexpected key {key}"));
        };
        let done = before[o];
        if kv.mod_revision > at {
            return Some(format!("{key} at mod_revision {} in a read at revision {at}", kv.mod_revision));
        }
        if !exact && done > at {
            return Some(format!("read at revision {at}, before a write to {key} at {done} that had finished"));
        }
        if done <= at && kv.mod_revision < done {
            return Some(format!("{key} at mod_revision {}, a finished write made it {done}", kv.mod_revision));
        }
    }
    None
}

/// A paged list of `prefix`, as the apiserver does it: `limit` per page, each page
/// from the last key + "\0", later pages at the first page's revision (`rev` > 0:
/// every page at `rev`). Returns the keys and the revision read at.
async fn list(kv: &mut KvClient<Channel>, prefix: &str, limit: i64, rev: i64) -> Result<(Vec<KeyValue>, i64), Error> {
    let (mut from, end) = (b(prefix), prefix_end(prefix));
    let mut at = rev;
    let mut out = Vec::new();
    loop {
        let req = RangeRequest { key: from, range_end: end.clone(), limit, revision: at, ..Default::default() };
        let page = kv.range(req).await?.into_inner();
        if at == 0 {
            at = page.header.map_or(0, |h| h.revision);
        }
        let next = page.kvs.last().map(|kv| Bytes::from([&kv.key[..], b"\0"].concat()));
        out.extend(page.kvs);
        match next {
            Some(k) if page.more => from = k,
            _ => return Ok((out, at)),
        }
    }
}

/// What readers and the writer share.
struct Ctx {
    target: Target,
    shape: Shape,
    chans: Vec<Channel>,
    /// Per object: the revision of its newest write that etcd answered.
    known: Arc<Vec<AtomicI64>>,
    /// The newest revision a read was answered at.
    newest: AtomicI64,
    page_limit: i64,
    exact_lag: i64,
    weights: [usize; 3],
    stop: Instant,
}

impl Ctx {
    fn kv(&self, rng: &mut Rng) -> KvClient<Channel> {
        KvClient::new(self.chans[rng.below(self.chans.len())].clone())
    }
}

async fn reader(ctx: Arc<Ctx>, mut rng: Rng) -> Tally {
    let (mut t, s) = (Tally::default(), ctx.shape);
    let [lw, gw, ew] = ctx.weights;
    while Instant::now() < ctx.stop {
        let mut kv = ctx.kv(&mut rng);
        let (p, r, pick) = (rng.below(s.projects), rng.below(s.resources), rng.below(lw + gw + ew));
        let before: Vec<i64> = (0..s.objects).map(|o| ctx.known[s.index(p, r, o)].load(Ordering::Acquire)).collect();
        let prefix = ctx.target.prefix(p, r);
        let started = Instant::now();
        if pick < gw {
            let o = rng.below(s.objects);
            let key = ctx.target.key(p, r, o);
            match kv.range(RangeRequest { key: b(&key), ..Default::default() }).await {
                Ok(resp) => {
                    t.get.push(started.elapsed());
                    let resp = resp.into_inner();
                    let at = resp.header.map_or(0, |h| h.revision);
                    ctx.newest.fetch_max(at, Ordering::Relaxed);
                    if let Some(why) = check_read(&resp.kvs, 1, &before, at, false) {
                        t.stale(format!("GET {key}: {why}"));
                    }
                }
                Err(e) => t.error(format!("GET {key}: {e}")),
            }
        } else {
            let exact = pick >= gw + lw;
            let rev = if exact {
                (ctx.newest.load(Ordering::Relaxed) - rng.below(ctx.exact_lag as usize + 1) as i64).max(1)
            } else {
                0
            };
            match list(&mut kv, &prefix, ctx.page_limit, rev).await {
                Ok((kvs, at)) => {
                    let took = started.elapsed();
                    if exact {
                        t.exact.push(took);
                    } else {
                        t.list.push(took);
                        ctx.newest.fetch_max(at, Ordering::Relaxed);
                    }
                    if let Some(why) = check_read(&kvs, s.objects, &before, at, exact) {
                        t.stale(format!("LIST {prefix} (revision {rev}): {why}"));
                    }
                }
                Err(e) => t.error(format!("LIST {prefix} (revision {rev}): {}", chain(&*e))),
            }
        }
    }
    t
}

/// Updates random objects at `rate` per second until `ctx.stop` (the apiserver's
/// optimistic txn), then reads each one back through the same target: it must see
/// the write.
async fn writer(ctx: Arc<Ctx>, rate: u64, mut rng: Rng) -> Tally {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
    let mut set = JoinSet::new();
    while Instant::now() < ctx.stop {
        tick.tick().await;
        let s = ctx.shape;
        let (p, r, o) = (rng.below(s.projects), rng.below(s.resources), rng.below(s.objects));
        let (i, key, mut kv) = (s.index(p, r, o), b(&ctx.target.key(p, r, o)), ctx.kv(&mut rng));
        let (ctx, tally) = (ctx.clone(), tally.clone());
        while set.len() >= 64 {
            set.join_next().await;
        }
        set.spawn(async move {
            let rev = ctx.known[i].load(Ordering::Acquire);
            let txn = TxnRequest {
                compare: vec![Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Mod as i32,
                    key: key.clone(),
                    target_union: Some(compare::TargetUnion::ModRevision(rev)),
                    ..Default::default()
                }],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key.clone(),
                        value: value(rev as u64, s.value_bytes),
                        ..Default::default()
                    })),
                }],
                failure: vec![RequestOp {
                    request: Some(request_op::Request::RequestRange(RangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    })),
                }],
            };
            let name = String::from_utf8_lossy(&key).into_owned();
            let done = match kv.txn(txn).await {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    let current = match resp.responses.first().and_then(|r| r.response.as_ref()) {
                        Some(response_op::Response::ResponseRange(rr)) => {
                            rr.kvs.first().map_or(0, |kv| kv.mod_revision)
                        }
                        _ => resp.header.map_or(0, |h| h.revision),
                    };
                    ctx.known[i].fetch_max(current, Ordering::AcqRel);
                    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                    t.writes += 1;
                    t.conflicts += u64::from(!resp.succeeded);
                    current
                }
                Err(e) => {
                    tally.lock().unwrap_or_else(|e| e.into_inner()).error(format!("write {name}: {e}"));
                    return;
                }
            };
            let read = kv.range(RangeRequest { key: key.clone(), ..Default::default() }).await;
            let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
            t.read_backs += 1;
            match read {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    let at = resp.header.map_or(0, |h| h.revision);
                    let mut before = vec![0; s.objects];
                    before[o] = done;
                    if let Some(why) = check_read(&resp.kvs, 1, &before, at, false) {
                        t.stale(format!("read-back of {name}: {why}"));
                    }
                }
                Err(e) => t.error(format!("read-back of {name}: {e}")),
            }
        });
    }
    while set.join_next().await.is_some() {}
    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *t)
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
        set.spawn(reader(ctx.clone(), Rng(seed ^ (i as u64 + 1) << 20)));
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
        let loader = start_front(&etcd, &mux, dir.path(), "").await?;
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
                Target::Mux => (mux.clone(), String::new()),
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

fn mib(bytes: f64) -> f64 {
    bytes / 1048576.0
}

fn lat(v: &[Duration]) -> String {
    format!("{} / {}", ms(percentile(v, 0.5)), ms(percentile(v, 0.99)))
}

fn point_report(pt: &Point, out: &mut String) -> std::fmt::Result {
    let s = pt.shape;
    writeln!(
        out,
        "## {} projects: {} objects, {:.0} MiB of keys and values (etcd's db {:.0} MiB at the end), written through etcdmux in {:.0?}\n",
        s.projects, s.len(), mib(pt.raw as f64), pt.etcd_db, pt.load
    )?;
    writeln!(out, "| target | reads/s | LIST p50 / p99 ms | GET p50 / p99 ms | exact-revision LIST p50 / p99 ms | reads failed / stale | writes (conflicts) | load avg |\n|---|---|---|---|---|---|---|---|")?;
    for (target, row) in &pt.rows {
        match row {
            Err(e) => writeln!(out, "| {} | failed: {e} | | | | | | |", target.name())?,
            Ok(r) => writeln!(
                out,
                "| {} | {:.0} | {} | {} | {} | {} / {} | {} ({}) | {:.1} |",
                target.name(),
                r.t.reads() as f64 / r.secs,
                lat(&r.t.list),
                lat(&r.t.get),
                lat(&r.t.exact),
                r.t.errors,
                r.t.stale,
                r.t.writes,
                r.t.conflicts,
                r.loadavg
            )?,
        }
    }
    writeln!(out, "\n| target | etcd Range/s | etcd Txn/s | etcd unary calls/s | etcd Range per read | etcd ranges executed/s | etcd sent MiB/s | etcd CPU s/s | proxy CPU s/s | loadgen CPU s/s | etcd RSS MiB | proxy RSS MiB | replica MiB (× raw) | replica hit ratio | read-index calls/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for (target, row) in &pt.rows {
        let Ok(r) = row else { continue };
        let reads = r.t.reads().max(1) as f64;
        let forwarded: f64 = r.forwarded.iter().map(|(_, n)| n).sum();
        let (cache, hit, ri) = if *target == Target::Cache {
            (
                format!("{:.0} ({:.2}×)", mib(r.cache_bytes), r.cache_bytes / pt.raw.max(1) as f64),
                format!("{:.1}%", 100.0 * r.hits / (r.hits + forwarded).max(1.0)),
                format!("{:.0}", r.read_index_calls / r.secs),
            )
        } else {
            ("".into(), "".into(), "".into())
        };
        let proxy = |v: f64| if *target == Target::Direct { "".to_string() } else { format!("{v:.2}") };
        writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.0} | {:.3} | {:.0} | {:.1} | {:.2} | {} | {:.2} | {:.0} | {} | {cache} | {hit} | {ri} |",
            target.name(),
            r.range / r.secs,
            r.txn / r.secs,
            r.unary / r.secs,
            r.range / reads,
            r.mvcc_ranges / r.secs,
            mib(r.sent) / r.secs,
            r.etcd_cpu,
            proxy(r.front_cpu),
            r.loadgen_cpu,
            r.etcd_rss,
            proxy(r.front_rss)
        )?;
    }
    writeln!(out)?;
    for (target, row) in &pt.rows {
        let Ok(r) = row else { continue };
        if *target == Target::Cache {
            let fwd: Vec<String> =
                r.forwarded.iter().filter(|(_, n)| *n > 0.0).map(|(w, n)| format!("{w} {n:.0}")).collect();
            writeln!(
                out,
                "- replica: live {:.1?} after etcdmux started (holding {:.0} keys at the end); ranges answered locally {:.0}, sent to etcd {} during the measurement.",
                r.cache_ready.unwrap_or_default(),
                r.cache_keys,
                r.hits,
                if fwd.is_empty() { "none".to_string() } else { fwd.join(", ") }
            )?;
        }
        if !r.t.failures.is_empty() {
            writeln!(out, "- {} failures (first {}): {}", target.name(), r.t.failures.len(), r.t.failures.join("; "))?;
        }
    }
    writeln!(out)
}

/// The issue's goals, judged at the largest point where both targets ran.
fn goals(points: &[Point]) -> String {
    fn pick(pt: &Point, t: Target) -> Option<&Row> {
        pt.rows.iter().find(|(x, _)| *x == t).and_then(|(_, r)| r.as_ref().ok())
    }
    let Some((pt, direct, cache)) =
        points.iter().rev().find_map(|pt| Some((pt, pick(pt, Target::Direct)?, pick(pt, Target::Cache)?)))
    else {
        return "No scale point has both etcd direct and the replica measured.\n".into();
    };
    let (dp, cp) = (percentile(&direct.t.list, 0.99), percentile(&cache.t.list, 0.99));
    let (dr, cr) = (direct.range / direct.secs, cache.range / cache.secs);
    let per = |r: &Row| r.range / r.t.reads().max(1) as f64;
    let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
    format!(
        "At {} projects: LIST p99 {} ms with the replica vs {} ms on etcd direct: {}. etcd Range calls {:.0}/s with the replica vs {:.0}/s direct ({:.1}× fewer), {:.4} vs {:.3} per client read ({:.0}× fewer): goal ≥ 10×: {}.\n",
        pt.shape.projects,
        ms(cp),
        ms(dp),
        verdict(cp < dp),
        cr,
        dr,
        dr / cr.max(f64::MIN_POSITIVE),
        per(cache),
        per(direct),
        per(direct) / per(cache).max(f64::MIN_POSITIVE),
        verdict(dr >= 10.0 * cr && per(direct) >= 10.0 * per(cache)),
    )
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let targets = args.targets.iter().map(|t| Target::parse(t)).collect::<Result<Vec<_>, _>>()?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
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
    let mut r = String::new();
    writeln!(r, "# LIST traffic without a watch cache: etcd direct vs etcdmux vs etcdmux with its read replica\n")?;
    writeln!(r, "Machine: {}.\n\nCommand: `{command}`\n", machine())?;
    writeln!(
        r,
        "Per project: {} resources × {} objects of {} bytes. Readers: {} in flight (closed loop) on {} connection(s), by weight {} paged LIST of one (project, resource) (limit {}, each page from the last key + \"\\0\", later pages at the first page's revision) : {} GET of one object (linearizable) : {} LIST at an exact revision (up to {} revisions before the newest a read saw). One writer updates random objects at {}/s (optimistic txn) and reads each back. {} s warm-up, then {} s measured, per target.\n",
        args.resources, args.objects, args.value_bytes, args.readers, args.connections, args.list_weight, args.page_limit,
        args.get_weight, args.exact_weight, args.exact_lag, args.write_rate, args.warmup_secs, args.duration_secs
    )?;
    writeln!(r, "Each scale point: a fresh etcd; the data written once through an etcdmux with Milo's rules (`{}`); then the targets **one after another against that same etcd**, each through a fresh etcdmux process (etcd direct reads the layout's upstream keys, `/registry/<resource>/clusters/<project>/...`). The replica target runs with `[cache] enabled = true, max_bytes = {} MiB`, other keys at their defaults, and is measured once its load finished. Every read is checked against the writes that finished before it began.\n", args.etcdmux_config.display(), args.cache_max_mib)?;
    writeln!(r, "## Goals\n\n{}", goals(&points))?;
    for pt in &points {
        point_report(pt, &mut r)?;
    }
    for f in &failed {
        writeln!(r, "- **failed**: {f}")?;
    }
    writeln!(r, "## Reading these numbers\n\n- The machine's cores are shared by etcd, the proxy and the load generator (its CPU is in the table), and by whatever else ran (the load average column); latencies include queueing for them. A target that needs less CPU leaves more to the others.\n- Reads are a closed loop: a faster target is asked more per second, so compare rates and latencies together, and upstream calls per read.\n- Targets run one after another on one etcd: later ones find etcd's pages warm, and the writer's updates add versions (etcd is not compacted).\n- \"etcd Range per read\" counts every Range call etcd answered (etcdmux's own probes, read-index calls and compaction checks included) per client read; \"ranges executed\" also counts ranges inside txns. The replica's hit ratio is over upstream-form ranges (a paged LIST is one per page; the writer's read-backs included).\n")?;
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

    fn kv(o: usize, rev: i64) -> KeyValue {
        KeyValue { key: b(&Target::Mux.key(3, 1, o)), mod_revision: rev, ..Default::default() }
    }

    #[test]
    fn a_read_that_holds_every_finished_write_passes() {
        assert_eq!(check_read(&[kv(0, 5), kv(1, 9)], 2, &[5, 7], 10, false), None);
        assert_eq!(check_read(&[kv(1, 9)], 1, &[0, 9], 9, false), None, "a GET of one object");
    }

    #[test]
    fn a_read_missing_a_finished_write_is_stale() {
        let stale = check_read(&[kv(0, 5), kv(1, 6)], 2, &[5, 7], 10, false);
        assert!(stale.is_some_and(|s| s.contains("a finished write made it 7")));
        let behind = check_read(&[kv(0, 5), kv(1, 6)], 2, &[5, 7], 6, false);
        assert!(behind.is_some_and(|s| s.contains("before a write")), "read at a revision older than a finished write");
    }

    #[test]
    fn lists_must_hold_every_object_at_or_below_their_revision() {
        assert!(check_read(&[kv(0, 5)], 2, &[5, 5], 10, false).is_some_and(|s| s.contains("want 2")));
        assert!(check_read(&[kv(0, 5), kv(1, 12)], 2, &[0, 0], 10, true).is_some_and(|s| s.contains("mod_revision 12")));
        let other = KeyValue { key: b("/projects/p3/res1/default/x"), ..Default::default() };
        assert!(check_read(&[other], 1, &[0], 10, false).is_some_and(|s| s.contains("unexpected key")));
    }

    #[test]
    fn exact_reads_check_only_writes_at_or_below_their_revision() {
        assert_eq!(check_read(&[kv(0, 5), kv(1, 6)], 2, &[5, 20], 10, true), None, "a write after the revision");
        assert!(check_read(&[kv(0, 5), kv(1, 6)], 2, &[5, 8], 10, true).is_some(), "a write before it");
    }

    #[test]
    fn the_data_is_what_the_report_says() {
        let s = Shape { projects: 2, resources: 2, objects: 3, value_bytes: 1024 };
        assert_eq!(value(7, 1024).len(), 1024);
        let keys: usize =
            (0..2).flat_map(|p| (0..2).flat_map(move |r| (0..3).map(move |o| Target::Direct.key(p, r, o).len()))).sum();
        assert_eq!(s.raw_bytes(), (keys + 12 * 1024) as u64);
        let mut seen: Vec<usize> =
            (0..2).flat_map(|p| (0..2).flat_map(move |r| (0..3).map(move |o| s.index(p, r, o)))).collect();
        seen.sort();
        assert_eq!(seen, (0..12).collect::<Vec<_>>(), "one slot per object");
    }
}
