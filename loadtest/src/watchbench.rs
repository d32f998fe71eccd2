//! watchbench: the watch path measured side by side with direct etcd, in one run.
//!
//! It starts its own etcd (loopback, temp dir) and, in front of that same etcd, the
//! etcdmux binary with Milo's rules and etcd's own `grpc-proxy`, then measures:
//! 1. event delivery latency: one writer, and one watcher each through etcdmux,
//!    through grpc-proxy and straight on etcd on the same keys, so every event is
//!    timed on all three paths;
//! 2. at each tenant count, for etcdmux and for grpc-proxy: client watchers created
//!    through the proxy (one per tenant and resource, like the apiserver's cacher),
//!    the watchers that adds in etcd (`etcd_debugging_mvcc_watcher_total`) and the
//!    proxy's RSS growth per watcher, plus one write per tenant that must reach
//!    exactly its watcher;
//! 3. idle tenants: tenants that wrote a key and have no watcher, and etcdmux's RSS
//!    growth per tenant.
//!
//! The report goes to `loadtest/results/<name>.md` with the machine it ran on.
//! Figures are for this machine only; the ratios are what carries over.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use etcdmux::pb::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request, PutRequest, RangeRequest, WatchCreateRequest,
    WatchRequest, WatchResponse,
};
use etcdmux_loadtest::{
    b, machine, metric, ms, percentile, prefix_end, rss_kib, start_etcd, start_front, write_report, Error, Etcd, Front,
    FrontKind, MILO_CONFIG,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(about = "Watch benchmark: etcdmux vs direct etcd")]
struct Args {
    /// The etcdmux binary to run.
    #[arg(long, default_value = "target/release/etcdmux")]
    etcdmux: PathBuf,
    /// Tenant counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    tenants: Vec<usize>,
    /// Resource prefixes watched per tenant.
    #[arg(long, default_value_t = 10)]
    resources: usize,
    /// Client watch streams the watchers are spread over.
    #[arg(long, default_value_t = 100)]
    streams: usize,
    /// Events timed for the latency comparison.
    #[arg(long, default_value_t = 2000)]
    events: usize,
    /// Idle tenants written for the per-tenant memory figure.
    #[arg(long, default_value_t = 10000)]
    idle_tenants: usize,
    /// Report name: loadtest/results/<name>.md
    #[arg(long, default_value = "watch")]
    name: String,
}

/// A client watch stream whose responses go to a channel. Dropping it cancels the
/// call (a half-close alone would leave its watches running, as in etcd).
struct Stream {
    tx: mpsc::Sender<WatchRequest>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn open_stream(url: &str, out: mpsc::UnboundedSender<(Instant, WatchResponse)>) -> Result<Stream, Error> {
    let mut client = WatchClient::connect(url.to_string()).await?;
    let (tx, rx) = mpsc::channel(1024);
    // etcd sends the response headers with its first answer, so the call must not be
    // awaited before the first create is queued.
    let task = tokio::spawn(async move {
        let Ok(resp) = client.watch(ReceiverStream::new(rx)).await else { return };
        let mut s = resp.into_inner();
        while let Ok(Some(r)) = s.message().await {
            if out.send((Instant::now(), r)).is_err() {
                return;
            }
        }
    });
    Ok(Stream { tx, task })
}

async fn create(s: &Stream, key: &str, end: Bytes, start: i64, id: i64) -> Result<(), Error> {
    let c =
        WatchCreateRequest { key: b(key), range_end: end, start_revision: start, watch_id: id, ..Default::default() };
    s.tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(c)) }).await?;
    Ok(())
}

async fn revision(kv: &mut KvClient<Channel>) -> Result<i64, Error> {
    let r = kv.range(RangeRequest { key: b("/bench/rev"), ..Default::default() }).await?.into_inner();
    Ok(r.header.map_or(0, |h| h.revision))
}

/// etcd with etcdmux and grpc-proxy in front of it.
struct Procs {
    etcd: Etcd,
    mux: Front,
    proxy: Front,
    _dir: tempfile::TempDir,
}

impl Procs {
    async fn start(args: &Args) -> Result<Procs, Error> {
        let dir = tempfile::tempdir()?;
        let etcd = start_etcd().await?;
        let mux = start_front(
            &etcd,
            &FrontKind::Etcdmux { bin: args.etcdmux.clone(), config: MILO_CONFIG.into() },
            dir.path(),
            "[watch]\nstream_buffer = 100000\n",
        )
        .await?;
        let proxy = start_front(&etcd, &FrontKind::GrpcProxy, dir.path(), "").await?;
        Ok(Procs { etcd, mux, proxy, _dir: dir })
    }
}

fn pid(f: &Front) -> u32 {
    f.proc.as_ref().map_or(0, |p| p.pid())
}

/// Phase 1: the same events timed through etcdmux and straight from etcd.
async fn latency(p: &Procs, events: usize, report: &mut String) -> Result<(), Error> {
    let mut direct = KvClient::connect(p.etcd.client_url.clone()).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let via_mux = open_stream(&p.mux.url, tx.clone()).await?;
    let via_etcd = open_stream(&p.etcd.client_url, tx.clone()).await?;
    let via_proxy = open_stream(&p.proxy.url, tx).await?;
    let start = revision(&mut direct).await? + 1;
    let raw = "/registry/pods/clusters/lat/";
    create(&via_mux, "/projects/lat/pods/", prefix_end("/projects/lat/pods/"), start, 1).await?;
    create(&via_etcd, raw, prefix_end(raw), start, 2).await?;
    create(&via_proxy, raw, prefix_end(raw), start, 3).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let mut sent = HashMap::new();
    for i in 0..events {
        // Writes go straight to etcd, in the layout, so both watchers see one event.
        let key = format!("/registry/pods/clusters/lat/ns/e{i}");
        sent.insert(format!("e{i}"), Instant::now());
        direct.put(PutRequest { key: b(&key), value: b("x"), ..Default::default() }).await?;
        // ~1000 events/s: latency, not throughput.
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let (mut mux_lat, mut etcd_lat, mut proxy_lat) = (Vec::new(), Vec::new(), Vec::new());
    while mux_lat.len() < events || etcd_lat.len() < events || proxy_lat.len() < events {
        let Ok(Some((at, r))) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await else { break };
        for e in &r.events {
            let key = String::from_utf8_lossy(&e.kv.as_ref().map(|kv| kv.key.clone()).unwrap_or_default()).into_owned();
            let name = key.rsplit('/').next().unwrap_or_default().to_string();
            if let Some(s) = sent.get(&name) {
                match r.watch_id {
                    1 => mux_lat.push(at - *s),
                    2 => etcd_lat.push(at - *s),
                    _ => proxy_lat.push(at - *s),
                }
            }
        }
    }
    let elapsed = t0.elapsed();
    mux_lat.sort();
    etcd_lat.sort();
    proxy_lat.sort();
    writeln!(report, "## Event delivery latency\n")?;
    writeln!(report, "{events} puts at ~1,000/s over {elapsed:.1?}, each event timed through etcdmux, through etcd's grpc-proxy and straight from etcd.\n")?;
    writeln!(report, "| path | events received | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|")?;
    for (name, l) in [("etcd direct", &etcd_lat), ("etcd grpc-proxy", &proxy_lat), ("etcdmux", &mux_lat)] {
        writeln!(
            report,
            "| {name} | {} | {} | {} | {} |",
            l.len(),
            ms(percentile(l, 0.5)),
            ms(percentile(l, 0.99)),
            ms(l.last().copied().unwrap_or_default())
        )?;
    }
    writeln!(report)?;
    Ok(())
}

/// A proxy under test in the scale phase.
struct Target<'a> {
    name: &'a str,
    url: &'a str,
    pid: u32,
    /// The key prefix clients use for tenant `t`'s resource `r`.
    key: fn(usize, usize, usize) -> String,
}

/// Phase 2: watchers at one tenant count, through one proxy.
async fn scale(
    p: &Procs,
    target: &Target<'_>,
    tenants: usize,
    resources: usize,
    streams: usize,
    report: &mut String,
) -> Result<(), Error> {
    let mut kv = KvClient::connect(target.url.to_string()).await?;
    let mut direct = KvClient::connect(p.etcd.client_url.clone()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib(target.pid);
    let etcd_before = metric(&p.etcd.metrics_url, "etcd_debugging_mvcc_watcher_total").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut ss = Vec::new();
    for _ in 0..streams {
        ss.push(open_stream(target.url, tx.clone()).await?);
    }
    drop(tx);
    let rev = revision(&mut direct).await?;
    let t0 = Instant::now();
    let mut id = 0i64;
    for t in 0..tenants {
        for r in 0..resources {
            let prefix = (target.key)(tenants, t, r);
            create(&ss[id as usize % streams], &prefix, prefix_end(&prefix), rev + 1, id).await?;
            id += 1;
        }
    }
    let watchers = tenants * resources;
    let mut created = 0;
    while created < watchers {
        let Ok(Some((_, r))) = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await else { break };
        created += r.created as usize;
    }
    let create_time = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(target.pid);
    let upstream = metric(&p.etcd.metrics_url, "etcd_debugging_mvcc_watcher_total").await - etcd_before;
    // One write per tenant must reach exactly its one watcher.
    let t1 = Instant::now();
    for t in 0..tenants {
        let key = format!("{}ns/obj", (target.key)(tenants, t, t % resources));
        kv.put(PutRequest { key: b(&key), value: b("v"), ..Default::default() }).await?;
    }
    let mut delivered = 0;
    while delivered < tenants {
        let Ok(Some((_, r))) = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await else { break };
        delivered += r.events.len();
    }
    let fanout_time = t1.elapsed();
    let per_watcher = (rss_after.saturating_sub(rss_before) as f64 * 1024.0) / watchers.max(1) as f64;
    writeln!(
        report,
        "| {} | {tenants} | {watchers} | {streams} | {upstream} | {created} in {create_time:.1?} | {:.0} | {:.0} B | {delivered}/{tenants} in {fanout_time:.1?} |",
        target.name,
        rss_after as f64 / 1024.0,
        per_watcher
    )?;
    drop(ss);
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(())
}

/// Phase 3: tenants with data and no watcher.
async fn idle(p: &Procs, n: usize, report: &mut String) -> Result<(), Error> {
    let mut kv = KvClient::connect(p.mux.url.clone()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid(&p.mux));
    for t in 0..n {
        kv.put(PutRequest {
            key: b(&format!("/projects/idle-{t}/configmaps/ns/c")),
            value: b("v"),
            ..Default::default()
        })
        .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid(&p.mux));
    writeln!(report, "## Idle tenants\n")?;
    writeln!(report, "{n} tenants each wrote one key through etcdmux and hold no watcher.\n")?;
    writeln!(report, "| etcdmux RSS before | after | per idle tenant |\n|---|---|---|")?;
    writeln!(
        report,
        "| {:.1} MiB | {:.1} MiB | {:.0} B |\n",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        after.saturating_sub(before) as f64 * 1024.0 / n.max(1) as f64
    )?;
    writeln!(report, "etcdmux keeps no structure per tenant; what an idle tenant can cost is an entry in the bounded root-index cache (`layout.root_cache_capacity`, one entry per tenant and resource root written through this process), which the figure above includes.\n")?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let procs = Procs::start(&args).await?;
    let mut report = String::new();
    writeln!(report, "# Watch benchmark: etcdmux vs etcd grpc-proxy vs direct etcd\n")?;
    writeln!(report, "Machine: {}. All paths measured in the same run against the same etcd; the load generator runs on the same cores.\n", machine())?;
    eprintln!("watchbench: latency");
    latency(&procs, args.events, &mut report).await?;
    writeln!(report, "## Watchers per tenant count\n")?;
    writeln!(report, "Each tenant watches {} resource prefixes (list revision + 1, like the apiserver's cacher). RSS per watcher = the proxy's RSS growth / watchers.\n", args.resources)?;
    writeln!(report, "etcdmux holds one shared upstream watch in all (opened at start), so the watchers it adds in etcd are 0; grpc-proxy coalesces only identical ranges.\n")?;
    writeln!(report, "| proxy | tenants | client watchers | client streams | etcd watchers added | created | proxy RSS MiB | proxy RSS per watcher | one write per tenant delivered |\n|---|---|---|---|---|---|---|---|---|")?;
    let targets = [
        Target {
            name: "etcdmux",
            url: &procs.mux.url,
            pid: pid(&procs.mux),
            key: |n, t, r| format!("/projects/m{n}-{t}/res{r}/"),
        },
        // grpc-proxy has no tenants: clients use Milo's raw key paths.
        Target {
            name: "etcd grpc-proxy",
            url: &procs.proxy.url,
            pid: pid(&procs.proxy),
            key: |n, t, r| format!("/projects/g{n}-{t}/res{r}/"),
        },
    ];
    for &t in &args.tenants {
        for target in &targets {
            eprintln!("watchbench: {t} tenants through {}", target.name);
            scale(&procs, target, t, args.resources, args.streams, &mut report).await?;
        }
    }
    writeln!(report)?;
    eprintln!("watchbench: idle tenants");
    idle(&procs, args.idle_tenants, &mut report).await?;
    let path = write_report(&args.name, &report)?;
    println!("{report}");
    eprintln!("watchbench: report written to {}", path.display());
    Ok(())
}
