//! rootindex: what the per-tenant root index of earlier etcdmux versions cost etcd,
//! against this version's shared one (issue 11, goal 3).
//!
//! Earlier versions kept one index key per (tenant, resource root) in etcd, so a
//! cross-root range or delete finds every root a tenant has written: at 30,000
//! projects × 10 resources, 300,000 keys beside the data. etcd's compaction walks its
//! in-memory key index (every key, under the index lock), so the extra keys lengthen
//! the pause writes see at each compaction. This version keeps one key per resource
//! root for all tenants (`layout.write_tenant_index` still writes the old form, for
//! rolling upgrades).
//!
//! Measured side by side: two fresh etcds hold the same Milo-shaped data. One is
//! written through etcdmux with `write_tenant_index` on (data, the per-tenant index
//! keys and the shared ones, exactly as etcdmux writes them); the other is a copy of
//! it without the per-tenant keys: what this version writes. Each then takes the same
//! open-loop write load (updates of existing objects at a fixed rate, straight to
//! etcd) with a physical compaction every few seconds. Reported per etcd: keys,
//! database size, RSS, each compaction's time (the RPC, and etcd's own index and db
//! compaction pause histograms), and write latency overall and in the window of each
//! compaction.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use etcdmux::pb::etcdserverpb::{
    kv_client::KvClient, maintenance_client::MaintenanceClient, request_op, CompactionRequest, PutRequest,
    RangeRequest, RequestOp, StatusRequest, TxnRequest,
};
use etcdmux_loadtest::{
    b, bar, bounded, machine, ms, percentile, rss_kib, start_etcd, start_front, value, write_report, write_summary,
    Error, Etcd, FrontKind, Rng, MILO_CONFIG,
};
use etcdmux_testkit::MILO_RESOURCES as RESOURCES;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
struct Args {
    /// The etcdmux binary (writes the etcd with the per-tenant index).
    #[arg(long, default_value = "target/release/etcdmux")]
    etcdmux: PathBuf,
    #[arg(long, default_value_t = 30000)]
    projects: usize,
    #[arg(long, default_value_t = 10)]
    resources: usize,
    /// Objects per (project, resource): apiload's default, so each project has as
    /// many index keys as half its objects.
    #[arg(long, default_value_t = 2)]
    objects: usize,
    #[arg(long, default_value_t = 400)]
    value_bytes: usize,
    /// Updates per second during the load, both etcds alike.
    #[arg(long, default_value_t = 200)]
    write_rate: u64,
    /// Physical compactions during the load, one after another.
    #[arg(long, default_value_t = 3)]
    compactions: usize,
    /// Seconds of writes before each compaction and after the last.
    #[arg(long, default_value_t = 5)]
    gap_secs: u64,
    /// Seeding transactions in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Rounds of (both etcds' loads), the order alternating.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    #[arg(long, default_value = "rootindex")]
    name: String,
}

/// The per-tenant index keys of earlier versions, under Milo's `meta_prefix`
/// (config/milo.toml).
const INDEX_PREFIX: &[u8] = b"/etcdmux/roots/";

fn put_op(key: Bytes, value: Bytes) -> RequestOp {
    RequestOp { request: Some(request_op::Request::RequestPut(PutRequest { key, value, ..Default::default() })) }
}

/// Writes every object through etcdmux: one transaction per project.
async fn seed_through_etcdmux(url: &str, a: &Args) -> Result<(), Error> {
    let kv = KvClient::connect(url.to_string()).await?;
    let (resources, objects, len) = (a.resources, a.objects, a.value_bytes);
    let pb = bar(a.projects, "seeding through etcdmux".into());
    bounded(a.projects, a.concurrency, &pb, |p| {
        let mut kv = kv.clone();
        async move {
            let ops = RESOURCES
                .iter()
                .take(resources)
                .flat_map(|r| (0..objects).map(move |o| format!("/projects/p{p:05}/{r}/ns/obj{o}")))
                .map(|k| put_op(b(&k), value(1, len)))
                .collect();
            kv.txn(TxnRequest { success: ops, ..Default::default() }).await?;
            Ok(())
        }
    })
    .await?;
    pb.finish_and_clear();
    Ok(())
}

/// Copies every key of `from` but the root index into `to`; returns the data keys
/// copied (etcd's own keys) and the index keys left out.
async fn copy_without_index(from: &str, to: &str) -> Result<(Vec<Bytes>, usize), Error> {
    let mut src = KvClient::connect(from.to_string()).await?;
    let mut dst = KvClient::connect(to.to_string()).await?;
    let (mut data, mut index) = (Vec::new(), 0);
    let mut key = Bytes::from_static(b"\0");
    loop {
        let req = RangeRequest { key: key.clone(), range_end: b("\0"), limit: 5000, ..Default::default() };
        let resp = src.range(req).await?.into_inner();
        let mut ops = Vec::new();
        for kv in &resp.kvs {
            if kv.key.starts_with(INDEX_PREFIX) {
                index += 1;
                continue;
            }
            data.push(kv.key.clone());
            ops.push(put_op(kv.key.clone(), kv.value.clone()));
            if ops.len() == 100 {
                dst.txn(TxnRequest { success: std::mem::take(&mut ops), ..Default::default() }).await?;
            }
        }
        if !ops.is_empty() {
            dst.txn(TxnRequest { success: ops, ..Default::default() }).await?;
        }
        match resp.kvs.last() {
            Some(last) if resp.more => key = [&last.key[..], b"\0"].concat().into(),
            _ => break,
        }
    }
    Ok((data, index))
}

/// What one etcd looked like, and how its writes fared around compactions.
struct Run {
    keys: i64,
    db_mib: (f64, f64),
    rss_mib: (f64, f64),
    compact_ms: Vec<f64>,
    /// etcd's own pause histograms over the run: (sum ms, count).
    index_pause: (f64, f64),
    db_pause: (f64, f64),
    all: Vec<Duration>,
    near: Vec<Duration>,
}

async fn db_mib(m: &mut MaintenanceClient<Channel>) -> Result<f64, Error> {
    let s = m.status(StatusRequest {}).await?.into_inner();
    Ok(s.db_size_in_use as f64 / (1 << 20) as f64)
}

fn pause(etcd: &Etcd, name: &str) -> (f64, f64) {
    let sum = etcd.metric(&format!("{name}_sum")).unwrap_or(0.0);
    (sum, etcd.metric(&format!("{name}_count")).unwrap_or(0.0))
}

const INDEX_PAUSE: &str = "etcd_debugging_mvcc_index_compaction_pause_duration_milliseconds";
const DB_PAUSE: &str = "etcd_debugging_mvcc_db_compaction_pause_duration_milliseconds";

/// The write load with compactions, against one etcd.
async fn load(etcd: &Etcd, keys: Arc<Vec<Bytes>>, a: &Args) -> Result<Run, Error> {
    let url = etcd.client_url.clone();
    let mut kv = KvClient::connect(url.clone()).await?;
    let mut m = MaintenanceClient::connect(url).await?;
    let count = RangeRequest { key: b("\0"), range_end: b("\0"), count_only: true, ..Default::default() };
    let total = kv.range(count).await?.into_inner().count;
    let (db0, rss0) = (db_mib(&mut m).await?, rss_kib(etcd.pid()) as f64 / 1024.0);
    let (ip0, dp0) = (pause(etcd, INDEX_PAUSE), pause(etcd, DB_PAUSE));

    let every = Duration::from_secs_f64(1.0 / a.write_rate.max(1) as f64);
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (kv, keys, len, stop) = (kv.clone(), keys.clone(), a.value_bytes, stop.clone());
        tokio::spawn(async move {
            // Open loop: each write starts at its time, however long earlier ones take,
            // and its latency counts from that time.
            let mut set = tokio::task::JoinSet::new();
            let mut rng = Rng(7);
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let due = start + every * i;
                tokio::time::sleep_until(due.into()).await;
                let (mut kv, key) = (kv.clone(), keys[rng.below(keys.len())].clone());
                set.spawn(async move {
                    kv.put(PutRequest { key, value: value(2 + u64::from(i), len), ..Default::default() }).await?;
                    Ok::<_, tonic::Status>((due - start, due.elapsed()))
                });
                i += 1;
            }
            let mut out = Vec::new();
            while let Some(r) = set.join_next().await {
                out.push(r.map_err(|e| e.to_string())??);
            }
            Ok::<_, Error>(out)
        })
    };
    // Compactions one after another, `gap_secs` of writes before each and after the
    // last: each compacts the writes since the previous one.
    let gap = Duration::from_secs(a.gap_secs);
    let mut windows = Vec::new();
    let mut compact_ms = Vec::new();
    for c in 1..=a.compactions {
        tokio::time::sleep(gap).await;
        let r = kv.range(RangeRequest { key: b("\0"), ..Default::default() }).await?.into_inner();
        let rev = r.header.map_or(0, |h| h.revision);
        let t = Instant::now();
        kv.compact(CompactionRequest { revision: rev, physical: true }).await?;
        compact_ms.push(t.elapsed().as_secs_f64() * 1e3);
        eprintln!("rootindex: compaction {c} at revision {rev}: {:.0} ms", compact_ms[c - 1]);
        // Writes started from the compaction's start to one second after it ended.
        windows.push((t - start, t.elapsed() + Duration::from_secs(1) + (t - start)));
    }
    tokio::time::sleep(gap).await;
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await??;
    let near_compaction = |at: Duration| windows.iter().any(|(s, e)| at >= *s && at <= *e);
    let mut all: Vec<Duration> = writes.iter().map(|w| w.1).collect();
    let mut near: Vec<Duration> = writes.iter().filter(|w| near_compaction(w.0)).map(|w| w.1).collect();
    all.sort();
    near.sort();
    let (ip1, dp1) = (pause(etcd, INDEX_PAUSE), pause(etcd, DB_PAUSE));
    Ok(Run {
        keys: total,
        db_mib: (db0, db_mib(&mut m).await?),
        rss_mib: (rss0, rss_kib(etcd.pid()) as f64 / 1024.0),
        compact_ms,
        index_pause: (ip1.0 - ip0.0, ip1.1 - ip0.1),
        db_pause: (dp1.0 - dp0.0, dp1.1 - dp0.1),
        all,
        near,
    })
}

fn row(name: &str, r: &Run) -> String {
    let mean = |(sum, n): (f64, f64)| if n > 0.0 { format!("{:.1}", sum / n) } else { "-".into() };
    let compact: Vec<String> = r.compact_ms.iter().map(|c| format!("{c:.0}")).collect();
    let tail = |l: &[Duration]| {
        format!("{}/{}/{}", ms(percentile(l, 0.5)), ms(percentile(l, 0.99)), ms(l.last().copied().unwrap_or_default()))
    };
    format!(
        "| {name} | {} | {:.1} → {:.1} | {:.0} → {:.0} | {} | {} | {} | {} ({}) | {} ({}) |",
        r.keys,
        r.db_mib.0,
        r.db_mib.1,
        r.rss_mib.0,
        r.rss_mib.1,
        compact.join(", "),
        mean(r.index_pause),
        mean(r.db_pause),
        tail(&r.all),
        r.all.len(),
        tail(&r.near),
        r.near.len(),
    )
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let a = Args::parse();
    let dir = tempfile::tempdir()?;
    let with = start_etcd().await?;
    let without = start_etcd().await?;
    {
        // Milo's config, writing the per-tenant index as earlier versions did.
        let milo = std::fs::read_to_string(MILO_CONFIG)?;
        if !milo.contains("[layout]\n") {
            return Err(format!("{MILO_CONFIG} has no [layout] section to turn write_tenant_index on in").into());
        }
        let config = dir.path().join("milo-tenant-index.toml");
        std::fs::write(&config, milo.replacen("[layout]\n", "[layout]\nwrite_tenant_index = true\n", 1))?;
        let kind = FrontKind::Etcdmux { bin: a.etcdmux.clone(), config };
        let front = start_front(&with, &kind, dir.path(), "").await?;
        let t = Instant::now();
        seed_through_etcdmux(&front.url, &a).await?;
        eprintln!("rootindex: {} projects seeded through etcdmux in {:.1} s", a.projects, t.elapsed().as_secs_f64());
    }
    let (data, index) = copy_without_index(&with.client_url, &without.client_url).await?;
    eprintln!("rootindex: {} keys copied without the {index} per-tenant index keys", data.len());
    let keys_without = data.len();
    let objects: Vec<Bytes> = data.into_iter().filter(|k| !k.starts_with(b"/etcdmux/")).collect();
    // What is left of etcdmux's own keys: this version's shared index.
    let shared_index = keys_without - objects.len();
    let objects = Arc::new(objects);
    // One etcd at a time: the other sits idle, so both see the same machine. The
    // order alternates by round, so neither always runs first.
    let mut rows = Vec::new();
    let (mut withs, mut withouts) = (Vec::new(), Vec::new());
    for round in 1..=a.rounds {
        for has_index in if round % 2 == 1 { [true, false] } else { [false, true] } {
            let (etcd, name) = if has_index {
                (&with, "per-tenant index (earlier versions)")
            } else {
                (&without, "shared index (this version)")
            };
            eprintln!("rootindex: round {round}: load on the etcd {name}");
            let r = load(etcd, objects.clone(), &a).await?;
            rows.push(row(&format!("{round}: {name}"), &r));
            if has_index {
                withs.push(r)
            } else {
                withouts.push(r)
            }
        }
    }

    let mut report = String::new();
    writeln!(report, "# The root index's cost in etcd (issue 11, goal 3)\n")?;
    writeln!(report, "Machine: {}. Both etcds run on this machine; the load generator shares the cores.\n", machine())?;
    writeln!(
        report,
        "Data: {} projects × {} resources × {} objects of {} B, written through etcdmux (config/milo.toml with `layout.write_tenant_index = true`) into the first etcd, which therefore holds the per-tenant index of earlier versions, one key per (project, resource): {index} keys, beside this version's shared index (one key per resource). The second etcd holds a copy of every key but the per-tenant ones: what this version writes. Then each etcd in turn (the other idle) takes {} updates/s of random existing objects, open loop (a write's latency counts from its scheduled start), sent straight to etcd, with {} physical compactions one after another, {} s of writes before each and after the last: each compacts the writes since the one before (the first, also the seeding).\n",
        a.projects, a.resources, a.objects, a.value_bytes, a.write_rate, a.compactions, a.gap_secs
    )?;
    writeln!(report, "Columns: keys in etcd; database size in use (MiB) and etcd RSS (MiB) before → after the load; each compaction RPC (ms); etcd's own mean index-compaction pause and db-compaction pause per batch (ms; `etcd_debugging_mvcc_*_compaction_pause_duration_milliseconds`); write p50/p99/max (ms) over the whole load and for writes started from a compaction's start to 1 s after it ended (write count in parentheses).\n")?;
    writeln!(report, "| round: etcd | keys | db MiB | RSS MiB | compaction RPC ms | index pause ms | db pause ms | writes p50/p99/max | near compaction p50/p99/max |")?;
    writeln!(report, "|---|---|---|---|---|---|---|---|---|")?;
    for r in &rows {
        writeln!(report, "{r}")?;
    }
    let ratio = |x: f64, y: f64| if y > 0.0 { format!("{:.2}×", x / y) } else { "-".into() };
    let total = |runs: &[Run], f: &dyn Fn(&Run) -> f64| runs.iter().map(f).sum::<f64>();
    let pooled = |runs: &[Run]| {
        let mut near: Vec<Duration> = runs.iter().flat_map(|r| r.near.iter().copied()).collect();
        near.sort();
        percentile(&near, 0.99).as_secs_f64()
    };
    let (w, wo) = (&withs[..], &withouts[..]);
    writeln!(
        report,
        "\nPer-tenant index / shared index, over all rounds: keys {}, database in use {}, RSS {}, total compaction RPC time {}, etcd's index-compaction pause {}, write p99 near compactions (pooled) {}.",
        ratio(total(w, &|r| r.keys as f64), total(wo, &|r| r.keys as f64)),
        ratio(total(w, &|r| r.db_mib.1), total(wo, &|r| r.db_mib.1)),
        ratio(total(w, &|r| r.rss_mib.1), total(wo, &|r| r.rss_mib.1)),
        ratio(total(w, &|r| r.compact_ms.iter().sum()), total(wo, &|r| r.compact_ms.iter().sum())),
        ratio(total(w, &|r| r.index_pause.0), total(wo, &|r| r.index_pause.0)),
        ratio(pooled(w), pooled(wo)),
    )?;
    let path = write_report(&a.name, &report)?;
    let sum = |runs: &[Run], f: &dyn Fn(&Run) -> f64| total(runs, f) / runs.len().max(1) as f64;
    write_summary(
        &a.name,
        &serde_json::json!({
            "machine": machine(),
            "projects": a.projects,
            "resources": a.resources,
            "objects": objects.len(),
            "per_tenant_index_keys": index,
            "shared_index_keys": shared_index,
            "per_tenant": {
                "keys": sum(w, &|r| r.keys as f64),
                "rss_mib": sum(w, &|r| r.rss_mib.1),
                "compaction_ms": sum(w, &|r| r.compact_ms.iter().sum()),
                "index_pause_ms_sum": sum(w, &|r| r.index_pause.0),
            },
            "shared": {
                "keys": sum(wo, &|r| r.keys as f64),
                "rss_mib": sum(wo, &|r| r.rss_mib.1),
                "compaction_ms": sum(wo, &|r| r.compact_ms.iter().sum()),
                "index_pause_ms_sum": sum(wo, &|r| r.index_pause.0),
            },
        }),
    )?;
    print!("{report}");
    eprintln!("rootindex: report in {}", path.display());
    Ok(())
}
