//! `etcdmux migrate` benchmark: copy and verify throughput (keys/s, MB/s) for a
//! Milo-shaped installation (projects × resources × objects, events on leases)
//! from one etcd into another, and the latency other clients of the source see
//! while the copy runs, against the same client's latency before it.
//!
//! Each copy limit in `--rates` gets a fresh target etcd; the source is seeded
//! once. The etcdmux binary runs as the operator runs it (`migrate copy
//! --until-caught-up`, then `migrate verify`).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use etcdmux::pb::etcdserverpb::{
    kv_client::KvClient, lease_client::LeaseClient, request_op, LeaseGrantRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest,
};
use etcdmux_loadtest::{machine, ms, percentile, start_etcd, write_report, Error};
use tonic::transport::Channel;

#[derive(Parser, Debug)]
struct Args {
    /// The etcdmux binary.
    #[arg(long, default_value = "target/release/etcdmux")]
    etcdmux: PathBuf,
    #[arg(long, default_value_t = 1000)]
    projects: usize,
    #[arg(long, default_value_t = 10)]
    resources: usize,
    #[arg(long, default_value_t = 3)]
    objects: usize,
    /// Bytes per object value (a small Kubernetes object is a few hundred bytes).
    #[arg(long, default_value_t = 400)]
    value_bytes: usize,
    /// Copy limits (migrate.keys_per_sec) to measure, comma-separated; 0 = no limit.
    #[arg(long, value_delimiter = ',', default_value = "0,10000,2000")]
    rates: Vec<u64>,
    /// How long the source's latency is sampled before any copy.
    #[arg(long, default_value_t = 5)]
    baseline_secs: u64,
    /// Source keys per page (migrate.page_keys) for copy and verify.
    #[arg(long, default_value_t = 10000)]
    page_keys: u64,
    #[arg(long, default_value = "migrate")]
    name: String,
}

use etcdmux_testkit::MILO_RESOURCES as RESOURCES;

fn put_op(key: String, value: Bytes, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: Bytes::from(key),
            value,
            lease,
            ..Default::default()
        })),
    }
}

/// Seeds the source; returns (keys, bytes of keys and values).
async fn seed(url: &str, a: &Args) -> Result<(u64, u64), Error> {
    let mut kv = KvClient::connect(url.to_string()).await?;
    let mut lease = LeaseClient::connect(url.to_string()).await?;
    let mut leases = Vec::new();
    for _ in 0..50 {
        leases.push(lease.lease_grant(LeaseGrantRequest { ttl: 3600, id: 0 }).await?.into_inner().id);
    }
    let value = Bytes::from("x".repeat(a.value_bytes));
    let (mut keys, mut bytes) = (0u64, 0u64);
    let mut ops = Vec::new();
    let names: Vec<String> =
        (0..a.projects).map(|p| format!("/projects/p{p:05}")).chain(["/datum-core".into()]).collect();
    for (pi, prefix) in names.iter().enumerate() {
        for r in RESOURCES.iter().take(a.resources) {
            for i in 0..a.objects {
                let key = format!("{prefix}/{r}/ns/obj{i}");
                let l = if *r == "events" { leases[pi % leases.len()] } else { 0 };
                keys += 1;
                bytes += (key.len() + value.len()) as u64;
                ops.push(put_op(key, value.clone(), l));
                if ops.len() == 100 {
                    kv.txn(TxnRequest { success: std::mem::take(&mut ops), ..Default::default() }).await?;
                }
            }
        }
    }
    if !ops.is_empty() {
        kv.txn(TxnRequest { success: ops, ..Default::default() }).await?;
    }
    Ok((keys, bytes))
}

/// Another client of the source: a put and a get every 10 ms until stopped; the
/// latency of each.
fn probe(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Result<Vec<Duration>, Error>> {
    tokio::spawn(async move {
        let mut kv: KvClient<Channel> = KvClient::connect(url).await?;
        let mut out = Vec::new();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            kv.put(PutRequest {
                key: Bytes::from_static(b"/other-client/probe"),
                value: Bytes::from(n.to_string()),
                ..Default::default()
            })
            .await?;
            out.push(t.elapsed());
            let t = Instant::now();
            kv.range(RangeRequest { key: Bytes::from_static(b"/other-client/probe"), ..Default::default() }).await?;
            out.push(t.elapsed());
            n += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        out.sort();
        Ok(out)
    })
}

fn latency_row(l: &[Duration]) -> String {
    format!(
        "{} | {} | {} | {}",
        l.len(),
        ms(percentile(l, 0.5)),
        ms(percentile(l, 0.99)),
        ms(l.last().copied().unwrap_or_default())
    )
}

/// Runs `etcdmux migrate <args>`; its stdout, and the wall time.
async fn migrate(bin: &std::path::Path, args: Vec<String>) -> Result<(String, Duration), Error> {
    let bin = bin.to_path_buf();
    let t = Instant::now();
    let out =
        tokio::task::spawn_blocking(move || Command::new(bin).arg("migrate").args(args).stdin(Stdio::null()).output())
            .await??;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(
            format!("migrate failed ({}): {stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr)).into()
        );
    }
    Ok((stdout, t.elapsed()))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let a = Args::parse();
    let dir = tempfile::tempdir()?;
    let source = start_etcd().await?;
    eprintln!("migratebench: seeding {} projects", a.projects);
    let (keys, bytes) = seed(&source.client_url, &a).await?;
    let mut report = String::new();
    writeln!(report, "# Migration benchmark: `etcdmux migrate` copy and verify\n")?;
    writeln!(report, "Machine: {}. Source and target are two etcds on this machine, with the load generator and the migrate process on the same cores.\n", machine())?;
    writeln!(
        report,
        "Dataset: {} projects + the root tenant × {} resources × {} objects = {keys} keys, {:.1} MB of keys and values; events on 50 leases (TTL 1 h). The copy runs `etcdmux migrate copy --until-caught-up --page-keys {}` (snapshot, then the tail up to a fence) into a fresh target etcd, `--bytes-per-sec 0`; verify then compares both sides at one pair of revisions.\n",
        a.projects, a.resources, a.objects, bytes as f64 / 1e6, a.page_keys
    )?;
    eprintln!("migratebench: baseline latency of the source");
    let stop = Arc::new(AtomicBool::new(false));
    let p = probe(source.client_url.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(a.baseline_secs)).await;
    stop.store(true, Ordering::Relaxed);
    let baseline = p.await??;
    let mut copy_rows = Vec::new();
    let mut lat_rows = vec![format!("| before any copy | {} |", latency_row(&baseline))];
    for &rate in &a.rates {
        let target = start_etcd().await?;
        let config = dir.path().join(format!("migrate-{rate}.toml"));
        let base = std::fs::read_to_string("config/milo.toml")
            .map_err(|e| format!("config/milo.toml (run from the repository root): {e}"))?;
        std::fs::write(&config, format!("{base}\n"))?;
        let common = |step: &str| {
            vec![
                step.to_string(),
                "--config".into(),
                config.display().to_string(),
                "--source".into(),
                source.client_url.clone(),
                "--target".into(),
                target.client_url.clone(),
                "--page-keys".into(),
                a.page_keys.to_string(),
            ]
        };
        eprintln!("migratebench: copy at {rate} keys/s (0: no limit)");
        let stop = Arc::new(AtomicBool::new(false));
        let p = probe(source.client_url.clone(), stop.clone());
        let mut args = common("copy");
        args.extend([
            "--until-caught-up".into(),
            "--keys-per-sec".into(),
            rate.to_string(),
            "--bytes-per-sec".into(),
            "0".into(),
        ]);
        let (out, wall) = migrate(&a.etcdmux, args).await?;
        stop.store(true, Ordering::Relaxed);
        let during = p.await??;
        let snapshot = out.lines().find(|l| l.starts_with("snapshot at")).unwrap_or("").to_string();
        eprintln!("migratebench: {snapshot}");
        let (vout, vwall) = migrate(&a.etcdmux, common("verify")).await?;
        if !vout.contains("passed") {
            return Err(format!("verify did not pass: {vout}").into());
        }
        let secs = wall.as_secs_f64();
        let vsecs = vwall.as_secs_f64();
        let limit = if rate == 0 { "none".to_string() } else { format!("{rate} keys/s") };
        copy_rows.push(format!(
            "| {limit} | {secs:.1} | {:.0} | {:.2} | {vsecs:.1} | {:.0} | {:.2} |",
            keys as f64 / secs,
            bytes as f64 / secs / 1e6,
            keys as f64 / vsecs,
            2.0 * bytes as f64 / vsecs / 1e6
        ));
        lat_rows.push(format!("| during a copy limited to {limit} | {} |", latency_row(&during)));
    }
    writeln!(report, "## Throughput\n")?;
    writeln!(report, "Wall time of the whole command (connecting, the keys-only pre-scan, advancing the new target's revision past the source's, the snapshot, the tail to a fence). Verify reads both sides: its MB/s counts the bytes of both.\n")?;
    writeln!(report, "| copy limit | copy s | copy keys/s | copy MB/s | verify s | verify keys/s | verify MB/s (both sides) |\n|---|---|---|---|---|---|---|")?;
    for r in &copy_rows {
        writeln!(report, "{r}")?;
    }
    writeln!(report, "\n## The source's latency for other clients\n")?;
    writeln!(report, "Another client puts and reads one key of the source every 10 ms (sequentially), before and during each copy.\n")?;
    writeln!(report, "| when | requests | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|")?;
    for r in &lat_rows {
        writeln!(report, "{r}")?;
    }
    let path = write_report(&a.name, &report)?;
    println!("{report}");
    eprintln!("migratebench: report written to {}", path.display());
    Ok(())
}
