//! sqlsize: how much disk a key costs on each of etcdmux's backends, scaled to a
//! million keys.
//!
//! Writes `--keys` keys of the apiserver's shape (Milo's
//! `/projects/<p>/<resource>/default/<obj>`, values of `--value-min`..`--value-max`
//! bytes of random content, as big and as incompressible as Kubernetes' protobuf
//! objects roughly are), each `--versions` times, through etcdmux on etcd and through
//! etcdmux on PostgreSQL, on a fresh store each. Then reads the store's size as
//! written, compacts at the newest revision (physical) and reads it again after
//! etcd's defragmentation or PostgreSQL's `VACUUM FULL`:
//!
//! - etcd: `Status`'s `db_size` (the bbolt file) and `db_size_in_use`, asked of etcd
//!   itself;
//! - PostgreSQL: `pg_total_relation_size` of each `etcdmux_*` table (heap, indexes,
//!   TOAST) and `pg_database_size` of the database.
//!
//! Neither counts its write-ahead log (etcd's `wal/`, PostgreSQL's `pg_wal/`), which
//! both keep bounded apart from the data. The per-million figures are the measured
//! ones scaled linearly.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use etcdmux::pb::etcdserverpb::{
    kv_client::KvClient, maintenance_client::MaintenanceClient, request_op, CompactionRequest, DefragmentRequest,
    PutRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest,
};
use etcdmux_loadtest::{
    b, bar, bounded, chain, machine, start_etcd, start_front, write_report, Error, Etcd, Front, FrontKind, Rng,
    MILO_CONFIG,
};
use etcdmux_testkit::MILO_RESOURCES;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Debug)]
#[command(about = "Store size per million keys: etcdmux on etcd vs etcdmux on SQL (PostgreSQL)")]
struct Args {
    #[arg(long, default_value = "target/release/etcdmux")]
    etcdmux: PathBuf,
    /// etcdmux's config; listener, upstream and metrics addresses are set per run.
    #[arg(long, default_value = MILO_CONFIG)]
    etcdmux_config: PathBuf,
    /// Keys written (each `--versions` times).
    #[arg(long, default_value_t = 200_000)]
    keys: usize,
    /// Keys per project (spread over Milo's ten resources); one txn writes one
    /// project's keys, up to `--batch` at a time.
    #[arg(long, default_value_t = 100)]
    per_project: usize,
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Smallest and largest value in bytes (uniform between).
    #[arg(long, default_value_t = 1024)]
    value_min: usize,
    #[arg(long, default_value_t = 2048)]
    value_max: usize,
    /// Times each key is written (versions kept until the compaction).
    #[arg(long, default_value_t = 1)]
    versions: usize,
    /// Txns in flight while writing.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Targets, comma-separated: etcdmux (on etcd), sql (etcdmux on PostgreSQL).
    #[arg(long, value_delimiter = ',', default_value = "etcdmux,sql")]
    targets: Vec<String>,
    #[arg(long, default_value = "sqlsize")]
    name: String,
    /// Exit non-zero when a target could not be measured.
    #[arg(long)]
    check: bool,
}

/// A store's size: the whole file or database, and the part holding data.
#[derive(Debug, Clone, Copy, Default)]
struct Size {
    total: u64,
    in_use: u64,
}

struct Measured {
    write_secs: f64,
    written: Size,
    compacted: Size,
    /// PostgreSQL: each `etcdmux_*` table's total size after the compaction.
    tables: Vec<(String, u64)>,
    store_mib: f64,
    revision: i64,
}

fn key(i: usize, per_project: usize) -> String {
    let (p, o) = (i / per_project.max(1), i % per_project.max(1));
    let resource = MILO_RESOURCES[o % MILO_RESOURCES.len()];
    format!("/projects/p{p}/{resource}/default/obj-{o:05}")
}

/// A value of key `i`'s `version`: a protobuf-like header, then random bytes.
fn value(i: usize, version: usize, min: usize, max: usize) -> Bytes {
    let mut rng = Rng(((i as u64) << 16) | version as u64);
    let len = min + rng.below(max.saturating_sub(min) + 1);
    let mut v = b"k8s\0\n\x0c\n\x02v1\x12\x06Secret".to_vec();
    while v.len() < len {
        v.push(rng.below(256) as u8);
    }
    v.truncate(len.max(1));
    Bytes::from(v)
}

async fn connect(url: &str) -> Result<Channel, Error> {
    Ok(Endpoint::from_shared(url.to_string())?.tcp_nodelay(true).connect().await?)
}

/// Every key, `versions` times, one project's batch per txn.
async fn write(args: &Args, ch: &Channel, label: &str) -> Result<(), Error> {
    let per_project = args.per_project.max(1);
    let batch = args.batch.clamp(1, per_project);
    // Batches never span two projects: a txn stays in one tenant.
    let starts: Vec<usize> = (0..args.keys)
        .step_by(per_project)
        .flat_map(|p| (p..(p + per_project).min(args.keys)).step_by(batch))
        .collect();
    for version in 0..args.versions.max(1) {
        let pb = bar(starts.len(), format!("{label} write v{}", version + 1));
        let starts = std::sync::Arc::new(starts.clone());
        let (keys, min, max) = (args.keys, args.value_min, args.value_max);
        bounded(starts.len(), args.concurrency, &pb, |n| {
            let (ch, starts) = (ch.clone(), starts.clone());
            async move {
                let first = starts[n];
                let end = (first + batch).min(keys).min((first / per_project + 1) * per_project);
                let success = (first..end)
                    .map(|i| RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest {
                            key: b(&key(i, per_project)),
                            value: value(i, version, min, max),
                            ..Default::default()
                        })),
                    })
                    .collect();
                KvClient::new(ch).txn(TxnRequest { success, ..Default::default() }).await?;
                Ok(())
            }
        })
        .await?;
        pb.finish_and_clear();
    }
    Ok(())
}

async fn etcd_size(etcd: &Etcd) -> Result<Size, Error> {
    let status = MaintenanceClient::new(connect(&etcd.client_url).await?).status(StatusRequest {}).await?.into_inner();
    Ok(Size { total: status.db_size as u64, in_use: status.db_size_in_use as u64 })
}

/// `pg_database_size`, and the `etcdmux_*` tables together (and each).
fn pg_size(front: &Front) -> Result<(Size, Vec<(String, u64)>), Error> {
    let pg = front.pg.as_ref().ok_or("the SQL target has no PostgreSQL")?;
    let num = |s: &str| s.trim().parse::<u64>().map_err(|e| format!("reading a size from psql ({s:?}): {e}"));
    let total = num(&pg.psql("SELECT pg_database_size(current_database())"))?;
    let rows = pg.psql(
        "SELECT relname, pg_total_relation_size(oid) FROM pg_class \
         WHERE relkind = 'r' AND relname LIKE 'etcdmux\\_%' ORDER BY 2 DESC",
    );
    let mut tables = Vec::new();
    for line in rows.lines().filter(|l| !l.is_empty()) {
        let (name, size) = line.split_once('|').ok_or_else(|| format!("psql printed {line:?}"))?;
        tables.push((name.to_string(), num(size)?));
    }
    Ok((Size { total, in_use: tables.iter().map(|t| t.1).sum() }, tables))
}

async fn measure(args: &Args, kind: &FrontKind) -> Result<Measured, Error> {
    let dir = tempfile::tempdir()?;
    let etcd = start_etcd().await?;
    let front = start_front(&etcd, kind, dir.path(), "").await?;
    let ch = connect(&front.url).await?;
    let t0 = Instant::now();
    write(args, &ch, kind.name()).await?;
    let write_secs = t0.elapsed().as_secs_f64();
    let sql = front.pg.is_some();
    let written = if sql { pg_size(&front)?.0 } else { etcd_size(&etcd).await? };
    // The apiserver's compactor compacts at a revision some minutes old; at the
    // newest one here, so only each key's newest version is left.
    let mut kv = KvClient::new(ch.clone());
    let probe = RangeRequest { key: b(&key(0, args.per_project)), ..Default::default() };
    let revision = kv.range(probe).await?.into_inner().header.map_or(0, |h| h.revision);
    kv.compact(CompactionRequest { revision, physical: true }).await?;
    let (compacted, tables) = if sql {
        let pg = front.pg.as_ref().ok_or("the SQL target has no PostgreSQL")?;
        pg.psql("VACUUM FULL");
        pg_size(&front)?
    } else {
        let mut m = MaintenanceClient::new(connect(&etcd.client_url).await?);
        let mut defrag = tonic::Request::new(DefragmentRequest {});
        defrag.set_timeout(Duration::from_secs(600));
        m.defragment(defrag).await?;
        (etcd_size(&etcd).await?, Vec::new())
    };
    let store = front.store(&etcd);
    let store_mib = store.mem_kib() as f64 / 1024.0;
    Ok(Measured { write_secs, written, compacted, tables, store_mib, revision })
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}

/// GiB per million keys from `bytes` for `keys` keys.
fn per_million(bytes: u64, keys: usize) -> f64 {
    bytes as f64 / keys.max(1) as f64 * 1e6 / (1u64 << 30) as f64
}

fn report(args: &Args, results: &[(FrontKind, Result<Measured, String>)]) -> Result<String, std::fmt::Error> {
    let mut r = String::new();
    let keys = args.keys;
    let raw: u64 = (0..keys)
        .map(|i| {
            (key(i, args.per_project).len() + value(i, args.versions.max(1) - 1, args.value_min, args.value_max).len())
                as u64
        })
        .sum();
    writeln!(r, "# Store size per million keys: etcdmux on etcd vs etcdmux on SQL\n")?;
    writeln!(r, "Machine: {}.\n\nCommand: `{}`\n", machine(), std::env::args().collect::<Vec<_>>().join(" "))?;
    writeln!(
        r,
        "{keys} keys of Milo's shape (`/projects/<p>/<resource>/default/<obj>`, {} per project), values of {}–{} random bytes (incompressible, as big as Kubernetes' protobuf objects roughly are), each written {} time(s) in txns of up to {} puts of one project, {} in flight, through etcdmux on a fresh store: {} bytes of keys and values as the client sent them ({} MiB). Then a physical compaction at the newest revision, and etcd's defragmentation or PostgreSQL's `VACUUM FULL`. etcd: `Status` `db_size` / `db_size_in_use`; PostgreSQL: `pg_database_size` / the `etcdmux_*` tables' `pg_total_relation_size` (heap, indexes, TOAST). Neither counts its write-ahead log. Per million keys, bytes per key and the keys that fit in etcd's recommended 8 GiB: from the size in use after the compaction (PostgreSQL's database size adds its catalogs, a few MiB whatever the keys), scaled linearly.\n",
        args.per_project, args.value_min, args.value_max, args.versions.max(1), args.batch, args.concurrency, raw, mib(raw)
    )?;
    writeln!(r, "| target | write time s (keys/s) | as written: total / in use MiB | after compaction + defrag / VACUUM FULL: total / in use MiB | per million keys: in use GiB | bytes per key in use | × the raw keys and values | keys in etcd's 8 GiB at this size | store memory MiB at the end |\n|---|---|---|---|---|---|---|---|---|")?;
    for (kind, res) in results {
        match res {
            Err(e) => writeln!(r, "| {} | **failed**: {e} | | | | | | | |", kind.name())?,
            Ok(m) => {
                // In use: etcd's defragmented file is all data; PostgreSQL's database
                // also holds its catalogs (a few MiB, whatever the keys).
                let in_use = m.compacted.in_use;
                writeln!(
                    r,
                    "| {} | {:.1} ({:.0}) | {} / {} | {} / {} | {:.2} | {:.0} | {:.2} | {:.1} million | {:.0} |",
                    kind.name(),
                    m.write_secs,
                    (keys * args.versions.max(1)) as f64 / m.write_secs.max(1e-9),
                    mib(m.written.total),
                    mib(m.written.in_use),
                    mib(m.compacted.total),
                    mib(m.compacted.in_use),
                    per_million(in_use, keys),
                    in_use as f64 / keys.max(1) as f64,
                    in_use as f64 / raw.max(1) as f64,
                    (8u64 << 30) as f64 / (in_use as f64 / keys.max(1) as f64).max(1.0) / 1e6,
                    m.store_mib,
                )?;
            }
        }
    }
    for (kind, res) in results {
        if let Some(m) = res.as_ref().ok().filter(|m| !m.tables.is_empty()) {
            writeln!(
                r,
                "\n{} tables after the compaction (revision {}):\n\n| table | MiB | bytes per key |\n|---|---|---|",
                kind.name(),
                m.revision
            )?;
            for (name, size) in &m.tables {
                writeln!(r, "| {name} | {} | {:.0} |", mib(*size), *size as f64 / keys.max(1) as f64)?;
            }
        }
    }
    writeln!(
        r,
        "\nStore memory: etcd's RSS (it maps its whole file), PostgreSQL's processes' PSS (`{}`).",
        etcdmux_loadtest::PG_SETTINGS.join(" ")
    )?;
    Ok(r)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    if args.value_min > args.value_max || args.value_max == 0 || args.keys == 0 {
        return Err("need --keys > 0 and 0 < --value-min <= --value-max".into());
    }
    let mut results = Vec::new();
    for t in &args.targets {
        let kind = FrontKind::parse(t, &args.etcdmux, &args.etcdmux_config)?;
        if !matches!(kind, FrontKind::Etcdmux { .. } | FrontKind::EtcdmuxSql { .. }) {
            return Err(format!("sqlsize measures etcdmux's stores: etcdmux or sql, not {t}").into());
        }
        eprintln!("sqlsize: {} keys through {}", args.keys, kind.name());
        let res = measure(&args, &kind).await.map_err(|e| chain(&*e));
        match &res {
            Ok(m) => eprintln!("sqlsize:   {} MiB after compaction", mib(m.compacted.total)),
            Err(e) => eprintln!("sqlsize:   failed: {e}"),
        }
        results.push((kind, res));
    }
    let r = report(&args, &results)?;
    let path = write_report(&args.name, &r)?;
    println!("{r}");
    eprintln!("sqlsize: report written to {}", path.display());
    let failed: Vec<String> =
        results.iter().filter_map(|(k, r)| r.as_ref().err().map(|e| format!("{}: {e}", k.name()))).collect();
    if args.check && !failed.is_empty() {
        return Err(format!("sqlsize --check: {}", failed.join("; ")).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_in_range_and_differ() {
        for i in 0..200 {
            let v = value(i, 0, 1024, 2048);
            assert!((1024..=2048).contains(&v.len()), "{}", v.len());
        }
        assert_ne!(value(1, 0, 1500, 1500), value(2, 0, 1500, 1500));
        assert_ne!(value(1, 0, 1500, 1500), value(1, 1, 1500, 1500), "a new version is a new value");
    }

    #[test]
    fn keys_are_milos_and_unique() {
        let keys: std::collections::HashSet<String> = (0..1000).map(|i| key(i, 100)).collect();
        assert_eq!(keys.len(), 1000);
        assert!(key(250, 100).starts_with("/projects/p2/"), "{}", key(250, 100));
    }

    #[test]
    fn per_million_scales_linearly() {
        assert!((per_million(1 << 30, 1_000_000) - 1.0).abs() < 1e-9);
        assert!((per_million(1 << 29, 500_000) - 1.0).abs() < 1e-9);
    }
}
