//! apiload: Milo's apiserver storage layer for P projects × R resources, run against
//! etcd direct, etcd's `grpc-proxy` and etcdmux, one after the other on a fresh etcd
//! each, with the same load.
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
//! Two connection models: one shared connection carrying one watch stream per
//! (project, resource) (Milo after its shared-client change), or one connection per
//! project (before it).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use etcdmux::pb::etcdserverpb::{
    compare, kv_client::KvClient, lease_client::LeaseClient, request_op, response_op, watch_client::WatchClient,
    watch_request, CompactionRequest, Compare, LeaseGrantRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
    WatchCreateRequest, WatchProgressRequest, WatchRequest,
};
use etcdmux_loadtest::{
    b, cpu_time, machine, metric, ms, percentile, prefix_end, rss_kib, start_etcd, start_front, write_report, Error,
    FrontKind,
};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Model {
    /// One connection, one watch stream per (project, resource).
    Shared,
    /// One connection per project.
    PerProject,
}

#[derive(Parser, Debug)]
#[command(about = "Apiserver-shaped load: etcd direct vs etcd grpc-proxy vs etcdmux")]
struct Args {
    #[arg(long, default_value = "target/release/etcdmux")]
    etcdmux: PathBuf,
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
    #[arg(long, value_enum, default_value = "shared")]
    model: Model,
    /// A target degrades at a scale point when its write p99 exceeds this bound.
    #[arg(long, default_value_t = 100)]
    p99_bound_ms: u64,
    #[arg(long, default_value = "api")]
    name: String,
    /// Targets to run, comma-separated: direct, grpc-proxy, etcdmux.
    #[arg(long, value_delimiter = ',', default_value = "direct,grpc-proxy,etcdmux")]
    targets: Vec<String>,
}

/// What one (target, scale point) run measured.
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
    etcd_watchers: f64,
    etcd_rss_mib: f64,
    front_rss_mib: f64,
    front_cpu: f64,
    loadgen_cpu: f64,
    setup: Duration,
}

fn key(p: usize, r: usize, o: usize) -> String {
    format!("/projects/p{p}/res{r}/default/obj{o}")
}

fn prefix(p: usize, r: usize) -> String {
    format!("/projects/p{p}/res{r}/")
}

/// Per (project, resource) delivery bookkeeping, shared with the watch readers.
#[derive(Default)]
struct Delivery {
    revisions: HashMap<(usize, usize), Vec<i64>>,
    latencies: Vec<Duration>,
}

async fn run_point(args: &Args, kind: &FrontKind, projects: usize) -> Result<Row, Error> {
    let dir = tempfile::tempdir()?;
    let etcd = start_etcd().await?;
    let front = start_front(&etcd, kind, dir.path(), "[watch]\nstream_buffer = 100000\n").await?;
    let mut row = Row::default();
    let t_setup = Instant::now();
    let connect = |url: String| async move {
        Endpoint::from_shared(url)?.tcp_nodelay(true).connect().await.map_err(Error::from)
    };
    let channels: Vec<Channel> = match args.model {
        Model::Shared => vec![connect(front.url.clone()).await?],
        Model::PerProject => {
            let mut v = Vec::with_capacity(projects);
            for _ in 0..projects {
                v.push(connect(front.url.clone()).await?);
            }
            v
        }
    };
    let chan = |p: usize| channels[p % channels.len()].clone();

    // Seed: one txn of puts per project.
    for p in 0..projects {
        let ops = (0..args.resources)
            .flat_map(|r| (0..args.objects).map(move |o| (r, o)))
            .map(|(r, o)| RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest { key: b(&key(p, r, o)), value: b("seed"), ..Default::default() })),
            })
            .collect();
        KvClient::new(chan(p)).txn(TxnRequest { success: ops, ..Default::default() }).await?;
    }
    // Lists, then watches from each list's revision + 1.
    let t0 = Instant::now();
    let delivery = Arc::new(Mutex::new(Delivery::default()));
    let created = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(AtomicU64::new(0));
    let mut streams = Vec::new();
    let mut known: HashMap<String, i64> = HashMap::new();
    for p in 0..projects {
        for r in 0..args.resources {
            let mut kv = KvClient::new(chan(p));
            let (mut from, end) = (b(&prefix(p, r)), prefix_end(&prefix(p, r)));
            let started = Instant::now();
            let mut rev = 0;
            loop {
                let page = kv.range(RangeRequest { key: from.clone(), range_end: end.clone(), limit: 500, revision: rev, ..Default::default() }).await?.into_inner();
                if rev == 0 {
                    rev = page.header.map_or(0, |h| h.revision);
                }
                for kvp in &page.kvs {
                    known.insert(String::from_utf8_lossy(&kvp.key).into_owned(), kvp.mod_revision);
                }
                match (page.more, page.kvs.last()) {
                    (true, Some(last)) => from = Bytes::from([&last.key[..], b"\0"].concat()),
                    _ => break,
                }
            }
            row.list.push(started.elapsed());
            let (tx, rx) = mpsc::channel(16);
            let create = WatchCreateRequest { key: b(&prefix(p, r)), range_end: end, start_revision: rev + 1, prev_kv: true, progress_notify: true, ..Default::default() };
            tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) }).await?;
            let mut client = WatchClient::new(chan(p));
            let (delivery, created, progress) = (delivery.clone(), created.clone(), progress.clone());
            // The call is not awaited before the create is queued: etcd sends the
            // response headers with its first answer.
            let task = tokio::spawn(async move {
                let Ok(resp) = client.watch(ReceiverStream::new(rx)).await else { return };
                let mut s = resp.into_inner();
                while let Ok(Some(w)) = s.message().await {
                    if w.created {
                        created.fetch_add(1, Ordering::Relaxed);
                    }
                    if w.events.is_empty() && !w.created {
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                    let now = t0.elapsed();
                    let mut d = delivery.lock().unwrap_or_else(|e| e.into_inner());
                    for e in &w.events {
                        let Some(kv) = &e.kv else { continue };
                        d.revisions.entry((p, r)).or_default().push(kv.mod_revision);
                        let sent = std::str::from_utf8(&kv.value)
                            .ok()
                            .and_then(|v| v.strip_prefix("t="))
                            .and_then(|v| v.parse::<u64>().ok());
                        if let Some(sent) = sent {
                            d.latencies.push(now.saturating_sub(Duration::from_nanos(sent)));
                        }
                    }
                }
            });
            streams.push((tx, task));
        }
    }
    let watches = projects * args.resources;
    let wait_until = Instant::now() + Duration::from_secs(120);
    while created.load(Ordering::Relaxed) < watches && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    row.setup = t_setup.elapsed();

    // The write load.
    let known = Arc::new(Mutex::new(known));
    let expected: Arc<Mutex<HashMap<(usize, usize), u64>>> = Arc::default();
    let results: Arc<Mutex<(Vec<Duration>, u64, u64, u64)>> = Arc::default();
    let inflight = Arc::new(Semaphore::new(64));
    let front_pid = front.proc.as_ref().map_or(etcd.proc.pid(), |p| p.pid());
    let (front_cpu0, self_cpu0) = (cpu_time(front_pid), cpu_time(std::process::id()));
    let load_start = Instant::now();
    let total = args.write_rate * args.duration_secs;
    let mut lease_id = 0i64;
    let mut next_lease = Instant::now();
    let mut compacted = false;
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / args.write_rate.max(1)));
    for i in 0..total {
        tick.tick().await;
        if next_lease <= Instant::now() {
            if let Ok(l) = LeaseClient::new(chan(0)).lease_grant(LeaseGrantRequest { ttl: 60, id: 0 }).await {
                lease_id = l.into_inner().id;
            }
            next_lease = Instant::now() + Duration::from_secs(5);
        }
        if !compacted && i >= total / 2 {
            compacted = true;
            compact(&chan(0)).await;
        }
        if i % 200 == 0 {
            // The apiserver's consistent reads ask for progress on its streams.
            for (tx, _) in streams.iter().step_by((streams.len() / 10).max(1)) {
                let _ = tx.try_send(WatchRequest { request_union: Some(watch_request::RequestUnion::ProgressRequest(WatchProgressRequest {})) });
            }
        }
        let p = (i as usize * 7919) % projects;
        let r = (i as usize / projects) % args.resources;
        let o = (i as usize) % (args.objects + 3);
        let k = key(p, r, o);
        let permit = inflight.clone().acquire_owned().await?;
        let (known, expected, results, ch) = (known.clone(), expected.clone(), results.clone(), chan(p));
        let lease = if r == 0 { lease_id } else { 0 };
        tokio::spawn(async move {
            let rev = known.lock().unwrap_or_else(|e| e.into_inner()).get(&k).copied().unwrap_or(0);
            let value = b(&format!("t={}", t0.elapsed().as_nanos()));
            let txn = TxnRequest {
                compare: vec![Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Mod as i32,
                    key: b(&k),
                    target_union: Some(compare::TargetUnion::ModRevision(rev)),
                    ..Default::default()
                }],
                success: vec![RequestOp { request: Some(request_op::Request::RequestPut(PutRequest { key: b(&k), value, lease, ..Default::default() })) }],
                failure: vec![RequestOp { request: Some(request_op::Request::RequestRange(RangeRequest { key: b(&k), ..Default::default() })) }],
            };
            let started = Instant::now();
            let out = KvClient::new(ch).txn(txn).await;
            let took = started.elapsed();
            let mut res = results.lock().unwrap_or_else(|e| e.into_inner());
            match out {
                Ok(t) => {
                    let t = t.into_inner();
                    res.0.push(took);
                    if t.succeeded {
                        res.1 += 1;
                        *expected.lock().unwrap_or_else(|e| e.into_inner()).entry((p, r)).or_default() += 1;
                        known.lock().unwrap_or_else(|e| e.into_inner()).insert(k, t.header.map_or(0, |h| h.revision));
                    } else {
                        res.2 += 1;
                        let current = t.responses.first().and_then(|r| match &r.response {
                            Some(response_op::Response::ResponseRange(rr)) => rr.kvs.first().map(|kv| kv.mod_revision),
                            _ => None,
                        });
                        known.lock().unwrap_or_else(|e| e.into_inner()).insert(k, current.unwrap_or(0));
                    }
                }
                Err(_) => res.3 += 1,
            }
            drop(permit);
        });
    }
    let _ = inflight.acquire_many(64).await?;
    let load_time = load_start.elapsed();
    row.front_cpu = cpu_time(front_pid).saturating_sub(front_cpu0).as_secs_f64() / load_time.as_secs_f64() * 100.0;
    row.loadgen_cpu = cpu_time(std::process::id()).saturating_sub(self_cpu0).as_secs_f64() / load_time.as_secs_f64() * 100.0;
    // Every event delivered, exactly once.
    let expected = expected.lock().unwrap_or_else(|e| e.into_inner()).clone();
    row.expected = expected.values().sum();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let d = delivery.lock().unwrap_or_else(|e| e.into_inner());
        let got: u64 = d.revisions.values().map(|v| v.len() as u64).sum();
        if got >= row.expected || Instant::now() > deadline {
            break;
        }
        drop(d);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = delivery.lock().unwrap_or_else(|e| e.into_inner());
    for revs in d.revisions.values() {
        let mut sorted = revs.clone();
        sorted.sort();
        sorted.dedup();
        row.duplicates += (revs.len() - sorted.len()) as u64;
        row.delivered += sorted.len() as u64;
    }
    row.delivery = d.latencies.clone();
    drop(d);
    let res = results.lock().unwrap_or_else(|e| e.into_inner());
    row.write = res.0.clone();
    row.writes_ok = res.1;
    row.conflicts = res.2;
    row.errors = res.3;
    drop(res);
    row.etcd_watchers = metric(&etcd.metrics, "etcd_debugging_mvcc_watcher_total").await;
    row.etcd_rss_mib = rss_kib(etcd.proc.pid()) as f64 / 1024.0;
    row.front_rss_mib = front.proc.as_ref().map_or(0.0, |p| rss_kib(p.pid()) as f64 / 1024.0);
    for (_, task) in streams {
        task.abort();
    }
    Ok(row)
}

/// The apiserver compactor: bump `compact_rev_key` in a txn, then compact.
async fn compact(ch: &Channel) {
    let mut kv = KvClient::new(ch.clone());
    let Ok(cur) = kv.range(RangeRequest { key: b("compact_rev_key"), ..Default::default() }).await else { return };
    let cur = cur.into_inner();
    let version = cur.kvs.first().map_or(0, |kv| kv.version);
    let rev = cur.header.map_or(0, |h| h.revision);
    let txn = TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Version as i32,
            key: b("compact_rev_key"),
            target_union: Some(compare::TargetUnion::Version(version)),
            ..Default::default()
        }],
        success: vec![RequestOp { request: Some(request_op::Request::RequestPut(PutRequest { key: b("compact_rev_key"), value: b(&rev.to_string()), ..Default::default() })) }],
        failure: vec![RequestOp { request: Some(request_op::Request::RequestRange(RangeRequest { key: b("compact_rev_key"), ..Default::default() })) }],
    };
    if kv.txn(txn).await.is_ok() && rev > 1 {
        let _ = kv.compact(CompactionRequest { revision: rev - 1, physical: false }).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let targets: Vec<FrontKind> = [FrontKind::Direct, FrontKind::GrpcProxy, FrontKind::Etcdmux(args.etcdmux.clone())]
        .into_iter()
        .filter(|k| {
            let short = match k {
                FrontKind::Direct => "direct",
                FrontKind::GrpcProxy => "grpc-proxy",
                FrontKind::Etcdmux(_) => "etcdmux",
            };
            args.targets.iter().any(|t| t == short)
        })
        .collect();
    let mut report = String::new();
    writeln!(report, "# Apiserver-shaped load: etcd direct vs etcd grpc-proxy vs etcdmux\n")?;
    writeln!(report, "Machine: {}. Load generator on the same cores (its CPU is in the table).\n", machine())?;
    writeln!(
        report,
        "Per project: {} resources × {} objects; one paged list + one watch (prev_kv, progress_notify) per (project, resource); {} optimistic txn writes/s for {} s, leases on the first resource, the compactor half way; connection model: {:?}. A target **degrades** when a write p99 exceeds {} ms, an error occurs, or an event is lost or duplicated.\n",
        args.resources, args.objects, args.write_rate, args.duration_secs, args.model, args.p99_bound_ms
    )?;
    for &projects in &args.projects {
        writeln!(report, "## {projects} projects ({} watches)\n", projects * args.resources)?;
        writeln!(report, "| target | status | setup | list p99 ms | write p50/p99/p999 ms | delivery p50/p99 ms | events delivered | etcd watchers | etcd RSS MiB | proxy RSS MiB | proxy CPU % | loadgen CPU % |\n|---|---|---|---|---|---|---|---|---|---|---|---|")?;
        for kind in &targets {
            eprintln!("apiload: {projects} projects, {}", kind.name());
            match run_point(&args, kind, projects).await {
                Ok(mut r) => {
                    for v in [&mut r.list, &mut r.write, &mut r.delivery] {
                        v.sort();
                    }
                    let lost = r.expected.saturating_sub(r.delivered);
                    let degraded = percentile(&r.write, 0.99) > Duration::from_millis(args.p99_bound_ms)
                        || r.errors > 0
                        || lost > 0
                        || r.duplicates > 0;
                    let status = if degraded {
                        format!("degraded ({} errors, {lost} lost, {} duplicated)", r.errors, r.duplicates)
                    } else {
                        "ok".to_string()
                    };
                    writeln!(
                        report,
                        "| {} | {status} | {:.1?} | {} | {}/{}/{} | {}/{} | {}/{} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
                        kind.name(),
                        r.setup,
                        ms(percentile(&r.list, 0.99)),
                        ms(percentile(&r.write, 0.5)),
                        ms(percentile(&r.write, 0.99)),
                        ms(percentile(&r.write, 0.999)),
                        ms(percentile(&r.delivery, 0.5)),
                        ms(percentile(&r.delivery, 0.99)),
                        r.delivered,
                        r.expected,
                        r.etcd_watchers,
                        r.etcd_rss_mib,
                        r.front_rss_mib,
                        r.front_cpu,
                        r.loadgen_cpu,
                    )?;
                }
                Err(e) => writeln!(report, "| {} | failed: {e} | | | | | | | | | | |", kind.name())?,
            }
        }
        writeln!(report)?;
    }
    let path = write_report(&args.name, &report)?;
    println!("{report}");
    eprintln!("apiload: report written to {}", path.display());
    Ok(())
}
