//! The throughput report: the goals judged per (clients, workload), then one table per
//! client count with every target's median round.

use std::fmt::Write as _;

use etcdmux_loadtest::goal::{VS_DIRECT, VS_GRPC_PROXY};
use etcdmux_loadtest::{machine, ms, percentile};

use super::{Args, Measured, Row, Target, Workload, OPS};

/// The median round of a cell (by requests per second) and the spread of all its
/// rounds; `None` when no round measured.
pub fn median(rows: &[Row], clients: usize, workload: Workload, target: Target) -> Option<(&Measured, f64, f64)> {
    let mut ok: Vec<&Measured> = rows
        .iter()
        .filter(|r| r.clients == clients && r.workload == workload && r.target == target)
        .filter_map(|r| r.result.as_ref().ok())
        .collect();
    ok.sort_by(|a, b| a.ops_per_sec().total_cmp(&b.ops_per_sec()));
    let (lo, hi) = (ok.first()?.ops_per_sec(), ok.last()?.ops_per_sec());
    Some((ok[(ok.len() - 1) / 2], lo, hi))
}

pub fn report(args: &Args, rows: &[Row], commit: &str) -> Result<String, std::fmt::Error> {
    let mut r = String::new();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let keys = args.projects * args.resources * args.objects;
    let names: Vec<&str> = args.targets.iter().map(|t| t.name()).collect();
    writeln!(r, "# Throughput with fixed clients: {}\n", names.join(" vs "))?;
    writeln!(
        r,
        "Machine: {}.\n\nCommit: {}. Command: `{command}`\n",
        machine(),
        if commit.is_empty() { "unknown" } else { commit }
    )?;
    writeln!(
        r,
        "Keys: {} projects × {} resources × {} objects = {keys} Milo keys (`/projects/<p>/<resource>/default/<obj>`, the same for every target), values of {} bytes. {}; the clients are spread over {} gRPC connection(s) and send each request in two HTTP/2 frames, as Go's gRPC clients (the apiserver's) do. Workloads: **range** a linearizable GET of a random key; **put** a random key of the client's own; **txn** the apiserver's optimistic update of one of its keys (`mod_revision == rev` → put, else range); **mixed** range : put : txn = {} : {} : {} drawn at random per request. Every cell runs on a fresh etcd and a fresh proxy: the keys are written through it, {} s warm-up, then {} s measured; requests answered after the window are not counted. {} round(s), the targets' order rotated each round; tables show the median round by requests per second and the spread of all rounds.\n",
        args.projects, args.resources, args.objects, args.value_bytes, pacing(args), args.connections, args.range_weight,
        args.put_weight, args.txn_weight, args.warmup_secs, args.duration_secs, args.rounds.max(1)
    )?;
    if args.watch {
        writeln!(r, "**With watches**: during every cell a client stream holds one watch (prev_kv) per (project, resource), {} in all, as an apiserver's watch caches do; the events it receives are counted (each put or successful txn is one event).\n", args.projects * args.resources)?;
    } else {
        writeln!(r, "**Without client watches**: etcdmux still keeps its own upstream watch (with prev_kv) for its watch hub, so each write through it costs etcd one watch event and one prev_kv read that the other targets do not pay here; run with `--watch` for the apiserver's case, where every target carries the watches.\n")?;
    }
    writeln!(r, "CPU per 1,000 requests: CPU time (user + system, `/proc/<pid>/stat`) over the measured window divided by the requests answered in it, in milliseconds. The store is etcd, or for etcdmux on SQL every PostgreSQL process (the server and its backends, plus what exited backends used). The store, the proxy and the load generator share the machine's cores, and other work on the machine shows in the load average column (the highest one-minute load average seen at the window's start or end). Memory at the window's end: etcd's and the proxy's RSS; PostgreSQL's as the sum of its processes' PSS, so its shared buffers count once.\n")?;
    if args.targets.contains(&Target::EtcdmuxSql) {
        writeln!(r, "**etcdmux on SQL** is the same etcdmux binary and config with `--backend sql`, on a fresh PostgreSQL per cell ({}; `{}`) whose schema `etcdmux backend init` made, on the same machine. etcd's counters do not apply to it (–).\n", postgres_version(), etcdmux_loadtest::PG_SETTINGS.join(" "))?;
    }
    if let Some(b) = &args.baseline {
        writeln!(
            r,
            "**etcdmux baseline** is `{}`, measured beside `{}` (etcdmux) with the same config.\n",
            b.display(),
            args.etcdmux.display()
        )?;
    }
    let judged = if args.rate == 0 {
        ""
    } else {
        " At a fixed offered rate the request rates only say whether a target kept up: here only CPU per request is judged."
    };
    writeln!(r, "## Goals\n\netcdmux ≥ {VS_DIRECT}× etcd direct and ≥ {VS_GRPC_PROXY}× grpc-proxy in requests per second at equal clients, and the lower CPU per request of the two proxies (median rounds).{judged}\n")?;
    writeln!(r, "{}", goals(args, rows))?;
    if args.baseline.is_some() {
        writeln!(r, "## etcdmux against the baseline\n\n{}", against_baseline(args, rows))?;
    }
    if args.targets.contains(&Target::EtcdmuxSql) && args.targets.contains(&Target::Etcdmux) {
        writeln!(r, "## etcdmux on SQL against etcdmux on etcd\n\n{}", sql_against_etcd(args, rows))?;
    }
    for &clients in &args.clients {
        writeln!(r, "## {clients} clients\n")?;
        writeln!(r, "| workload | target | requests/s | spread over rounds | × direct | p50 / p99 ms | p99 range / put / txn ms | proxy CPU ms per 1,000 | store CPU ms per 1,000 | load generator CPU ms per 1,000 | store MiB | proxy MiB | etcd calls / puts / ranges / watch events per request | events received per request | errors | txn conflicts | load avg |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
        for &workload in &args.workloads {
            let direct = median(rows, clients, workload, Target::Direct).map(|(m, _, _)| m.ops_per_sec());
            for &target in &args.targets {
                let Some((m, lo, hi)) = median(rows, clients, workload, target) else {
                    writeln!(r, "| {workload:?} | {} | failed | | | | | | | | | | | | | | |", target.name())?;
                    continue;
                };
                let all = m.t.all();
                let by_op: Vec<String> = OPS
                    .iter()
                    .map(|&op| {
                        let v = &m.t.lat[op as usize];
                        if v.is_empty() {
                            "–".to_string()
                        } else {
                            ms(percentile(v, 0.99))
                        }
                    })
                    .collect();
                let ratio = direct.map_or(String::new(), |d| format!("{:.2}", m.ops_per_sec() / d.max(1e-9)));
                let received = if args.watch {
                    format!("{:.2}", m.events as f64 / m.t.ops().max(1) as f64)
                } else {
                    "–".to_string()
                };
                let proxy =
                    if target == Target::Direct { "–".to_string() } else { format!("{:.1}", m.cpu_per_kop(1)) };
                let proxy_mib = if target == Target::Direct { "–".to_string() } else { format!("{:.0}", m.mem[1]) };
                let etcd_work = if target == Target::EtcdmuxSql { "–".to_string() } else { per_op(m) };
                writeln!(
                    r,
                    "| {workload:?} | {} | {:.0} | {lo:.0}–{hi:.0} | {ratio} | {} / {} | {} | {proxy} | {:.1} | {:.1} | {:.0} | {proxy_mib} | {etcd_work} | {received} | {} | {} | {:.1} |",
                    target.name(),
                    m.ops_per_sec(),
                    ms(percentile(&all, 0.5)),
                    ms(percentile(&all, 0.99)),
                    by_op.join(" / "),
                    m.cpu_per_kop(0),
                    m.cpu_per_kop(2),
                    m.mem[0],
                    m.t.errors,
                    m.t.conflicts,
                    m.loadavg
                )?;
            }
        }
        writeln!(r)?;
    }
    let failures: Vec<String> = rows
        .iter()
        .filter_map(|row| {
            let what =
                format!("round {}, {} clients, {:?}, {}", row.round + 1, row.clients, row.workload, row.target.name());
            match &row.result {
                Err(e) => Some(format!("- {what}: **failed**: {e}")),
                Ok(m) if !m.t.failures.is_empty() => Some(format!("- {what}: {}", m.t.failures.join("; "))),
                Ok(_) => None,
            }
        })
        .collect();
    if !failures.is_empty() {
        writeln!(r, "## Failures\n\n{}\n", failures.join("\n"))?;
    }
    Ok(r)
}

fn pacing(args: &Args) -> String {
    match args.rate {
        0 => "Each client sends its next request as soon as the last is answered".to_string(),
        n => format!("**{n} requests/s offered** in all, each client paced (a late one skips its missed turns; latency counts from the send)"),
    }
}

/// etcd's work per client request: calls, puts, ranges, watch events.
fn per_op(m: &Measured) -> String {
    let n = m.t.ops().max(1) as f64;
    m.etcd.iter().map(|v| format!("{:.2}", v / n)).collect::<Vec<_>>().join(" / ")
}

/// `psql --version`, for the report (the server is the same install).
fn postgres_version() -> String {
    std::process::Command::new("psql")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "PostgreSQL".to_string())
}

/// etcdmux on SQL beside etcdmux on etcd, per (clients, workload): rate, latency, CPU
/// of the proxy and of the store per request, the store's memory.
fn sql_against_etcd(args: &Args, rows: &[Row]) -> String {
    let mut s = String::from("| clients | workload | requests/s: SQL / etcd | p50 ms: SQL / etcd | p99 ms: SQL / etcd | proxy CPU ms per 1,000: SQL / etcd | store CPU ms per 1,000: PostgreSQL / etcd | store MiB: PostgreSQL / etcd |\n|---|---|---|---|---|---|---|---|\n");
    for &clients in &args.clients {
        for &workload in &args.workloads {
            let (Some((q, ..)), Some((e, ..))) =
                (median(rows, clients, workload, Target::EtcdmuxSql), median(rows, clients, workload, Target::Etcdmux))
            else {
                continue;
            };
            let (qa, ea) = (q.t.all(), e.t.all());
            let _ = writeln!(
                s,
                "| {clients} | {workload:?} | {:.0} / {:.0} ({:.2}×) | {} / {} | {} / {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.0} / {:.0} |",
                q.ops_per_sec(),
                e.ops_per_sec(),
                q.ops_per_sec() / e.ops_per_sec().max(1e-9),
                ms(percentile(&qa, 0.5)),
                ms(percentile(&ea, 0.5)),
                ms(percentile(&qa, 0.99)),
                ms(percentile(&ea, 0.99)),
                q.cpu_per_kop(1),
                e.cpu_per_kop(1),
                q.cpu_per_kop(0),
                e.cpu_per_kop(0),
                q.mem[0],
                e.mem[0],
            );
        }
    }
    s
}

/// Requests per second and CPU per request of etcdmux against the baseline build.
fn against_baseline(args: &Args, rows: &[Row]) -> String {
    let mut s = String::from("| clients | workload | requests/s: etcdmux / baseline | proxy CPU ms per 1,000: etcdmux / baseline | etcd CPU ms per 1,000: etcdmux / baseline |\n|---|---|---|---|---|\n");
    for &clients in &args.clients {
        for &workload in &args.workloads {
            let (Some((m, ..)), Some((b, ..))) =
                (median(rows, clients, workload, Target::Etcdmux), median(rows, clients, workload, Target::Baseline))
            else {
                continue;
            };
            let _ = writeln!(
                s,
                "| {clients} | {workload:?} | {:.0} / {:.0} ({:+.0}%) | {:.1} / {:.1} ({:+.0}%) | {:.1} / {:.1} ({:+.0}%) |",
                m.ops_per_sec(),
                b.ops_per_sec(),
                (m.ops_per_sec() / b.ops_per_sec().max(1e-9) - 1.0) * 100.0,
                m.cpu_per_kop(1),
                b.cpu_per_kop(1),
                (m.cpu_per_kop(1) / b.cpu_per_kop(1).max(1e-9) - 1.0) * 100.0,
                m.cpu_per_kop(0),
                b.cpu_per_kop(0),
                (m.cpu_per_kop(0) / b.cpu_per_kop(0).max(1e-9) - 1.0) * 100.0,
            );
        }
    }
    s
}

/// One line per (clients, workload) where etcdmux and another target were measured.
fn goals(args: &Args, rows: &[Row]) -> String {
    let mut s = String::from("| clients | workload | etcdmux / direct | etcdmux / grpc-proxy | proxy CPU ms per 1,000: etcdmux / grpc-proxy | verdict |\n|---|---|---|---|---|---|\n");
    let mut any = false;
    for &clients in &args.clients {
        for &workload in &args.workloads {
            let Some((mux, _, _)) = median(rows, clients, workload, Target::Etcdmux) else { continue };
            let direct = median(rows, clients, workload, Target::Direct).map(|(m, _, _)| m);
            let proxy = median(rows, clients, workload, Target::GrpcProxy).map(|(m, _, _)| m);
            if direct.is_none() && proxy.is_none() {
                continue;
            }
            any = true;
            let mut missed = Vec::new();
            let vs_direct = direct.map(|d| mux.ops_per_sec() / d.ops_per_sec().max(1e-9));
            let vs_proxy = proxy.map(|p| mux.ops_per_sec() / p.ops_per_sec().max(1e-9));
            // At a fixed offered rate every target that keeps up answers the same:
            // only CPU per request is judged.
            let closed = args.rate == 0;
            if let Some(x) = vs_direct.filter(|&x| closed && x < VS_DIRECT) {
                missed.push(format!("{:.0}% short of {VS_DIRECT}× direct", (VS_DIRECT - x) / VS_DIRECT * 100.0));
            }
            if let Some(x) = vs_proxy.filter(|&x| closed && x < VS_GRPC_PROXY) {
                missed.push(format!(
                    "{:.0}% short of {VS_GRPC_PROXY}× grpc-proxy",
                    (VS_GRPC_PROXY - x) / VS_GRPC_PROXY * 100.0
                ));
            }
            let cpu = proxy.map(|p| (mux.cpu_per_kop(1), p.cpu_per_kop(1)));
            if let Some((m, p)) = cpu.filter(|(m, p)| m >= p) {
                missed.push(format!("CPU per request {:.0}% above grpc-proxy's", (m / p.max(1e-9) - 1.0) * 100.0));
            }
            let x = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.2}×"));
            let verdict =
                if missed.is_empty() { "met".to_string() } else { format!("**not met**: {}", missed.join("; ")) };
            let _ = writeln!(
                s,
                "| {clients} | {workload:?} | {} | {} | {} | {verdict} |",
                x(vs_direct),
                x(vs_proxy),
                cpu.map_or("–".to_string(), |(m, p)| format!("{m:.1} / {p:.1}")),
            );
        }
    }
    if any {
        s
    } else {
        "No cell has etcdmux and another target measured.\n".to_string()
    }
}

/// The median round of every cell, for `goals`: requests per second (and the spread of
/// the rounds) and the proxy's CPU milliseconds per 1,000 requests.
pub fn summary(args: &Args, rows: &[Row]) -> serde_json::Value {
    let mut cells = Vec::new();
    for &clients in &args.clients {
        for &workload in &args.workloads {
            for &target in &args.targets {
                if let Some((m, lo, hi)) = median(rows, clients, workload, target) {
                    cells.push(serde_json::json!({
                        "clients": clients,
                        "workload": format!("{workload:?}").to_lowercase(),
                        "target": target.name(),
                        "ops_per_sec": m.ops_per_sec(),
                        "ops_per_sec_spread": [lo, hi],
                        "proxy_cpu_ms_per_kop": m.cpu_per_kop(1),
                    }));
                }
            }
        }
    }
    serde_json::json!({
        "machine": machine(),
        "watch": args.watch,
        "rate": args.rate,
        "rounds": args.rounds,
        "cells": cells,
    })
}
