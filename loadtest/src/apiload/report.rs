//! The apiload report: the table row of a point, where each target degrades, the
//! plots and the CSV.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use etcdmux_loadtest::plot::{self, Chart, Series};
use etcdmux_loadtest::{ms, percentile, Error};
use plotters::style::RGBColor;

use etcdmux_loadtest::machine;

use super::{Args, Model, Outcome};

pub fn table_row(o: &Outcome) -> String {
    let status = match (o.degraded.is_empty(), o.not_run()) {
        (true, _) => "ok".to_string(),
        (false, true) => o.degraded.join("; "),
        (false, false) => format!("**degraded**: {}", o.degraded.join("; ")),
    };
    let mem = format!("{:.0} | {:.0} | {:.0}", o.store_mib, o.front_mib, o.loadgen_mib);
    // etcdmux on SQL leaves the (idle) etcd of its point alone.
    let etcd = match &o.result {
        Ok(r) if o.target != "etcdmux on SQL" => format!("{} / {} / {}", r.etcd_watchers, r.etcd_streams, r.etcd_conns),
        _ => "–".to_string(),
    };
    match &o.result {
        Err(_) => format!("| {} | {status} | | | | | | | | | | {mem} | | | |", o.target),
        Ok(r) => format!(
            "| {} | {status} | {:.1?} | {} | {}/{}/{} ({:.0}/s) | {}/{} | {}/{} | {} / {} | {etcd} | {} | {mem} | {:.0} | {:.0} | {:.0} |",
            o.target,
            r.setup,
            ms(percentile(&r.list, 0.99)),
            ms(percentile(&r.write, 0.5)),
            ms(percentile(&r.write, 0.99)),
            ms(percentile(&r.write, 0.999)),
            r.write_throughput,
            ms(percentile(&r.delivery, 0.5)),
            ms(percentile(&r.delivery, 0.99)),
            r.delivered,
            r.expected,
            r.conns,
            r.streams,
            r.progress_replies,
            r.front_cpu,
            r.store_cpu,
            r.loadgen_cpu,
        ),
    }
}

/// Per (model, target): the largest scale point that held and the first that did not.
pub fn ceilings(outcomes: &[Outcome], models: &[Model], targets: &[&'static str]) -> String {
    let mut s = String::new();
    for &model in models {
        for &target in targets {
            let (mut points, skipped): (Vec<&Outcome>, Vec<&Outcome>) =
                outcomes.iter().filter(|o| o.model == model && o.target == target).partition(|o| !o.not_run());
            points.sort_by_key(|o| o.projects);
            let first_bad = points.iter().find(|o| !o.degraded.is_empty());
            let last_ok = points.iter().take_while(|o| o.degraded.is_empty()).last();
            let line = match (last_ok, first_bad) {
                (_, None) => {
                    format!("held at every point measured, up to {} projects", points.last().map_or(0, |o| o.projects))
                }
                (Some(ok), Some(bad)) => format!(
                    "held up to {} projects; degraded at {}: {}",
                    ok.projects,
                    bad.projects,
                    bad.degraded.join("; ")
                ),
                (None, Some(bad)) => {
                    format!("degraded already at {} projects: {}", bad.projects, bad.degraded.join("; "))
                }
            };
            let skipped: Vec<String> = skipped.iter().map(|o| o.projects.to_string()).collect();
            let skipped = if skipped.is_empty() {
                String::new()
            } else {
                format!(" (not measurable here at {} projects: see the table)", skipped.join(", "))
            };
            let _ = writeln!(s, "- {target}, {}: {line}{skipped}", model.name());
        }
    }
    s
}

fn color(target: &str) -> RGBColor {
    match target {
        "etcd direct" => RGBColor(200, 40, 40),
        "etcd grpc-proxy" => RGBColor(40, 80, 200),
        "etcdmux on SQL" => RGBColor(150, 60, 170),
        _ => RGBColor(20, 150, 60),
    }
}

/// `c` lightened for the `nth` model, so the models of one target stay apart.
fn lighter(c: RGBColor, nth: usize) -> RGBColor {
    let share = [0.0, 0.35, 0.55, 0.7][nth.min(3)];
    let mix = |v: u8| (f64::from(v) + (255.0 - f64::from(v)) * share) as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

/// The four charts: one line per (target, model), failed points left out except
/// from the memory chart, where the peak before the failure is what it shows.
pub fn plots(
    name: &str,
    outcomes: &[Outcome],
    models: &[Model],
    targets: &[&'static str],
) -> Result<Vec<(String, PathBuf)>, Error> {
    type Value = fn(&Outcome) -> Option<f64>;
    let charts: [(&str, &str, &str, Value); 4] = [
        ("rss", "Memory: store (etcd or PostgreSQL) + proxy peak", "MiB", |o| Some(o.store_mib + o.front_mib)),
        ("watchers", "Watchers in etcd", "etcd_debugging_mvcc_watcher_total", |o| {
            o.result.as_ref().ok().filter(|_| o.target != "etcdmux on SQL").map(|r| r.etcd_watchers)
        }),
        ("write-p99", "Write (optimistic txn) p99", "ms", |o| {
            o.result.as_ref().ok().map(|r| percentile(&r.write, 0.99).as_secs_f64() * 1000.0)
        }),
        ("delivery-p99", "Watch event delivery p99", "ms", |o| {
            o.result.as_ref().ok().map(|r| percentile(&r.delivery, 0.99).as_secs_f64() * 1000.0)
        }),
    ];
    let mut written = Vec::new();
    for (file, title, y_label, value) in charts {
        let mut series = Vec::new();
        for &model in models {
            for &target in targets {
                let mut points: Vec<(f64, f64)> = outcomes
                    .iter()
                    .filter(|o| o.model == model && o.target == target)
                    .filter_map(|o| Some((o.projects as f64, value(o)?)))
                    .collect();
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                let label = if models.len() > 1 { format!("{target} ({})", model.name()) } else { target.to_string() };
                let nth = models.iter().position(|m| *m == model).unwrap_or(0);
                let dashed = matches!(model, Model::PerProject | Model::MiloPool | Model::GoClient);
                series.push(Series { label, color: lighter(color(target), nth), dashed, points });
            }
        }
        let stem = Path::new("loadtest/results").join(format!("{name}-{file}"));
        let chart = Chart { title, x_label: "projects", y_label, series };
        for path in plot::write(&stem, &chart)? {
            written.push((title.to_string(), path));
        }
    }
    Ok(written)
}

/// A CSV field: empty when not measured.
fn opt(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| v.to_string())
}

pub fn csv(outcomes: &[Outcome]) -> String {
    let mut s = String::from("model,projects,target,status,setup_s,list_p99_ms,write_p50_ms,write_p99_ms,write_p999_ms,delivery_p50_ms,delivery_p99_ms,delivered,expected,duplicates,errors,client_conns,client_streams,etcd_watchers,etcd_watch_streams,etcd_conns,store_peak_mib,proxy_peak_rss_mib,loadgen_peak_rss_mib,proxy_cpu_pct,loadgen_cpu_pct,store_cpu_pct,slow_writes_client,slow_writes_etcdmux,slow_writes_upstream,slow_writes_etcd\n");
    for o in outcomes {
        let status = if o.degraded.is_empty() { "ok".to_string() } else { o.degraded.join("; ").replace(',', " ") };
        let head = format!("{:?},{},{},{status}", o.model, o.projects, o.target);
        let mem = format!("{:.0},{:.0},{:.0}", o.store_mib, o.front_mib, o.loadgen_mib);
        let _ = match &o.result {
            Err(_) => writeln!(s, "{head},,,,,,,,,,,,,,,,,{mem},,,,,,,"),
            Ok(r) => {
                let p = |v: &[Duration], q| percentile(v, q).as_secs_f64() * 1000.0;
                writeln!(
                    s,
                    "{head},{:.1},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{},{},{},{},{},{},{},{},{},{mem},{:.0},{:.0},{:.0},{},{},{},{}",
                    r.setup.as_secs_f64(),
                    p(&r.list, 0.99),
                    p(&r.write, 0.5),
                    p(&r.write, 0.99),
                    p(&r.write, 0.999),
                    p(&r.delivery, 0.5),
                    p(&r.delivery, 0.99),
                    r.delivered,
                    r.expected,
                    r.duplicates,
                    r.errors,
                    r.conns,
                    r.streams,
                    r.etcd_watchers,
                    r.etcd_streams,
                    r.etcd_conns,
                    r.front_cpu,
                    r.loadgen_cpu,
                    r.store_cpu,
                    r.slow_writes.client,
                    opt(r.slow_writes.etcdmux),
                    opt(r.slow_writes.upstream),
                    opt(r.slow_writes.etcd)
                )
            }
        };
    }
    s
}

/// The whole markdown report: the setup, where each target degrades, the plots and a
/// table per (model, scale point).
pub fn markdown(
    args: &Args,
    outcomes: &[Outcome],
    target_names: &[&'static str],
    fd_limit: u64,
) -> Result<String, std::fmt::Error> {
    let mut report = String::new();
    writeln!(report, "# Apiserver-shaped load: {}\n", target_names.join(" vs "))?;
    writeln!(report, "Machine: {}. Open-file limit {fd_limit}. The load generator runs on the same cores (its CPU and RSS are in the tables).\n", machine())?;
    writeln!(
        report,
        "Per project: {} resources × {} objects; one paged list + one watch (prev_kv, progress_notify) per (project, resource); {} optimistic txn writes/s for {} s, leases on the first resource, progress requests on a tenth of the streams every 200 writes, the compactor half way. Each target runs on a fresh etcd (etcdmux on SQL: on a fresh PostgreSQL, {}, its schema made by `etcdmux backend init`). A target **degrades** at a point when its write or delivery p99 exceeds {} ms, a request fails, an event is lost or duplicated, or the machine runs out of memory (less than {} MiB available).\n",
        args.resources,
        args.objects,
        args.write_rate,
        args.duration_secs,
        etcdmux_loadtest::PG_SETTINGS.join(", "),
        args.p99_bound_ms,
        args.min_available_mib
    )?;
    writeln!(report, "## Where each target degrades\n\n{}", ceilings(outcomes, &args.models, target_names))?;
    match plots(&args.name, outcomes, &args.models, target_names) {
        Ok(paths) => {
            writeln!(report, "## Plots\n\nOne colour per target, lighter for each model after the first; dashed: the models with one connection per project or per pool member ({}).\n", args.models.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "))?;
            for (title, path) in paths.iter().filter(|(_, p)| p.extension().is_some_and(|e| e == "svg")) {
                let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
                writeln!(report, "![{title}]({file})")?;
            }
            writeln!(report)?;
        }
        Err(e) => {
            eprintln!("apiload: plots not written: {e}");
            writeln!(report, "Plots were not written: {e}\n")?;
        }
    }
    writeln!(report, "Columns: write p50/p99/p999 with the achieved write rate; client connections / watch streams the load generator opened; etcd watchers / watch streams / client connections as etcd counts them at the end of the load; peak memory of the store (etcd's RSS; for etcdmux on SQL the PSS of PostgreSQL's processes, so shared buffers count once), peak RSS of the proxy and of the load generator; proxy CPU (etcd's for the direct target), store CPU (etcd's, or every PostgreSQL process's) and load generator CPU during the write load, in % of one core. etcdmux on SQL uses no etcd (–).\n")?;
    for &model in &args.models {
        for &projects in &args.projects {
            writeln!(report, "## {projects} projects ({} watches), {}\n", projects * args.resources, model.name())?;
            writeln!(report, "| target | status | setup | list p99 ms | write p50/p99/p999 ms | delivery p50/p99 ms | events delivered | client conns / streams | etcd watchers / streams / conns | progress replies | store MiB | proxy MiB | loadgen MiB | proxy CPU % | store CPU % | loadgen CPU % |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
            let point: Vec<&Outcome> = outcomes.iter().filter(|o| o.model == model && o.projects == projects).collect();
            for o in &point {
                writeln!(report, "{}", table_row(o))?;
            }
            writeln!(report, "\nSlowest writes (start time into the write load):\n")?;
            for o in &point {
                if let Ok(r) = &o.result {
                    writeln!(report, "- {}: {}", o.target, r.slowest)?;
                }
            }
            writeln!(report)?;
            for o in &point {
                if let Ok(r) = &o.result {
                    if !r.details.is_empty() {
                        writeln!(
                            report,
                            "### Where the time went: {}, {projects} projects\n\n{}",
                            o.target, r.details
                        )?;
                    }
                }
            }
        }
    }
    Ok(report)
}
