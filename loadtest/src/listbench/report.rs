//! The listbench report: per scale point, latency and rate, then upstream cost and
//! memory, per target; the goals judged at the largest point.

use std::fmt::Write as _;
use std::time::Duration;

use etcdmux_loadtest::{machine, ms, percentile};

use super::{Args, Point, Row, Target};

/// The whole report.
pub fn report(args: &Args, points: &[Point], failed: &[String]) -> Result<String, std::fmt::Error> {
    let mut r = String::new();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let loop_note = if args.read_rate == 0 {
        "Reads are a closed loop: a faster target is asked more per second, so compare rates and latencies together, and upstream calls per read."
    } else {
        "Reads are offered at a fixed rate: a target that keeps up is asked the same as the others; one that does not shows a lower rate achieved."
    };
    let pacing = match args.read_rate {
        0 => "closed loop (each reads again once answered)".to_string(),
        n => format!("**{n} reads/s offered** (each reader paced, a late one skips its missed turns; latency is from when a read was sent)"),
    };
    writeln!(r, "# LIST traffic without a watch cache: etcd direct vs etcdmux vs etcdmux with its read replica\n")?;
    writeln!(r, "Machine: {}.\n\nCommand: `{command}`\n", machine())?;
    writeln!(
        r,
        "Per project: {} resources × {} objects of {} bytes. Readers: {} in flight at most, {}, on {} connection(s), by weight {} paged LIST of one (project, resource) (limit {}, each page from the last key + \"\\0\", later pages at the first page's revision) : {} GET of one object (linearizable) : {} LIST at an exact revision (up to {} revisions before the newest a read saw). One writer updates random objects at {}/s (optimistic txn) and reads each back. {} s warm-up, then {} s measured, per target.\n",
        args.resources, args.objects, args.value_bytes, args.readers, pacing, args.connections, args.list_weight, args.page_limit,
        args.get_weight, args.exact_weight, args.exact_lag, args.write_rate, args.warmup_secs, args.duration_secs
    )?;
    writeln!(r, "Each scale point: a fresh etcd; the data written once through an etcdmux with Milo's rules (`{}`); then the targets **one after another against that same etcd**, each through a fresh etcdmux process (etcd direct reads the layout's upstream keys, `/registry/<resource>/clusters/<project>/...`). The replica target runs with `[cache] enabled = true, max_bytes = {} MiB`, other keys at their defaults, and is measured once its load finished. Every read is checked against the writes that finished before it began.\n", args.etcdmux_config.display(), args.cache_max_mib)?;
    writeln!(r, "## Goals\n\n{}", goals(points))?;
    for pt in points {
        point_report(pt, &mut r)?;
    }
    for f in failed {
        writeln!(r, "- **failed**: {f}")?;
    }
    writeln!(r, "## Reading these numbers\n\n- The machine's cores are shared by etcd, the proxy and the load generator (its CPU is in the table), and by whatever else ran (the load average column); latencies include queueing for them. A target that needs less CPU leaves more to the others.\n- {}\n- Targets run one after another on one etcd: later ones find etcd's pages warm, and the writer's updates add versions (etcd is not compacted).\n- \"etcd Range per read\" counts every Range call etcd answered (etcdmux's own probes, read-index calls and compaction checks included) per client read; \"ranges executed\" also counts ranges inside txns. The replica's hit ratio is over upstream-form ranges (a paged LIST is one per page; the writer's read-backs included).\n", loop_note)?;
    Ok(r)
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
                "- replica: live {:.1?} after etcdmux started (holding {:.0} keys at the end); during the measurement, ranges answered locally {:.0}, sent to etcd {}; {:.0} linearizable reads ({:.0} per read-index call) of which {:.0} waited for the replica to reach etcd's revision (mean wait {:.2} ms).",
                r.cache_ready.unwrap_or_default(),
                r.cache_keys,
                r.hits,
                if fwd.is_empty() { "none".to_string() } else { fwd.join(", ") },
                r.linearizable,
                r.linearizable / r.read_index_calls.max(1.0),
                r.waits,
                1000.0 * r.waited / r.waits.max(1.0)
            )?;
        }
        if !r.t.failures.is_empty() {
            writeln!(out, "- {} failures (first {}): {}", target.name(), r.t.failures.len(), r.t.failures.join("; "))?;
        }
    }
    writeln!(out)
}

/// The goals, judged at the largest point where both targets ran.
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
