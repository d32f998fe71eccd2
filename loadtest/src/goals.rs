//! goals: issue 11's goals (flat cost as projects grow) judged from the outputs of one
//! benchmark run, side by side in `loadtest/results/<name>.md`.
//!
//! It runs nothing itself: `make bench` (or `make bench-goals`) runs `apiload`,
//! `streammem`, `rootindex` and `throughput`, each of which writes its figures next to
//! its report (`apiload` a CSV, the others a JSON summary), and then this, which reads
//! them and says per goal what was asked, what was measured and whether it was met,
//! by how much it was missed where it was. The *why* of a miss is in the reports and
//! the README; this only refuses to round a miss into a pass.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use clap::Parser;
use etcdmux_loadtest::goal::{FLAT_P99, SLOW_WRITE, STREAM_BYTES, VS_DIRECT, VS_GRPC_PROXY, WATCH_BYTES};
use etcdmux_loadtest::{machine, results_path, write_report, Error};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(about = "Issue 11's goals judged from one benchmark run's outputs in loadtest/results")]
struct Args {
    /// apiload's run (`<name>.csv`): goal 1 from its shared model, goal 5 from its
    /// milo-pool and go-client models.
    #[arg(long, default_value = "api")]
    api: String,
    /// streammem's runs (`<name>.json`): with a watch per stream (the worst of them is
    /// judged), and with many.
    #[arg(long, value_delimiter = ',', default_value = "streammem-stream,streammem-stream-paced,streammem-watch")]
    streammem: Vec<String>,
    /// rootindex's run (`<name>.json`).
    #[arg(long, default_value = "rootindex")]
    rootindex: String,
    /// throughput's runs (`<name>.json`).
    #[arg(long, value_delimiter = ',', default_value = "throughput,throughput-watch")]
    throughput: Vec<String>,
    /// Project counts goal 5 asks every model to be reported at.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000,30000")]
    model_points: Vec<u64>,
    #[arg(long, default_value = "goals")]
    name: String,
    /// Exit with an error when a goal could not be judged (an input missing or
    /// unreadable): for CI, where every input is produced just before.
    #[arg(long)]
    check: bool,
}

const G1: &str = "1. latency flat in project count";
const G2: &str = "2. memory per watch stream";
const G3: &str = "3. etcd's key count independent of projects × resources";
const G4: &str = "4. throughput per core";
const G5: &str = "5. Milo's pool and the Go client in apiload";

const ETCDMUX: &str = "etcdmux";
const GRPC_PROXY: &str = "etcd grpc-proxy";

/// One goal's line in the summary table.
struct Verdict {
    goal: &'static str,
    asked: String,
    measured: String,
    /// What was missed; empty when the goal was met.
    missed: Vec<String>,
    /// Its inputs were missing or unreadable.
    unmeasured: bool,
}

impl Verdict {
    /// A goal whose run is missing or unreadable: not measured. The others are still
    /// judged.
    fn unmeasured(goal: &'static str, e: &Error) -> Verdict {
        Verdict {
            goal,
            asked: "–".into(),
            measured: format!("not measured: {e}"),
            missed: vec!["not measured".into()],
            unmeasured: true,
        }
    }

    fn state(&self) -> String {
        if self.missed.is_empty() {
            "met".to_string()
        } else {
            format!("**not met**: {}", self.missed.join("; "))
        }
    }
}

/// One row of apiload's CSV; `None` where the point failed before it was measured.
#[derive(Debug)]
struct ApiRow {
    model: String,
    projects: u64,
    target: String,
    status: String,
    list_p99: Option<f64>,
    write_p99: Option<f64>,
    delivery_p99: Option<f64>,
    etcd_watchers: Option<f64>,
    store_mib: Option<f64>,
    proxy_mib: Option<f64>,
    /// Writes over apiload's slow bound at each hop: as the load generator saw them,
    /// inside etcdmux, in etcd's answers to etcdmux, in etcd's handler (columns of
    /// later runs; `None` when not measured).
    slow_writes: [Option<f64>; 4],
}

impl ApiRow {
    fn ok(&self) -> bool {
        self.status == "ok" && self.write_p99.is_some()
    }
}

/// Runs one goal's judgement: its detail section is kept only if it could be judged.
fn judge(goal: &'static str, detail: &mut String, f: impl FnOnce(&mut String) -> Result<Verdict, Error>) -> Verdict {
    let mut section = String::new();
    match f(&mut section) {
        Ok(v) => {
            detail.push_str(&section);
            v
        }
        Err(e) => Verdict::unmeasured(goal, &e),
    }
}

fn read_api(name: &str) -> Result<Vec<ApiRow>, Error> {
    let path = results_path(name, "csv");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next().ok_or_else(|| format!("{}: empty", path.display()))?.split(',').collect();
    let col = |name: &str| {
        head.iter().position(|h| *h == name).ok_or_else(|| format!("{}: no column {name}", path.display()))
    };
    let [model, projects, target, status, list, write, delivery, watchers, store, proxy] = [
        "model",
        "projects",
        "target",
        "status",
        "list_p99_ms",
        "write_p99_ms",
        "delivery_p99_ms",
        "etcd_watchers",
        "store_peak_mib",
        "proxy_peak_rss_mib",
    ]
    .map(col);
    let (model, projects, target, status) = (model?, projects?, target?, status?);
    let (list, write, delivery, watchers, store, proxy) = (list?, write?, delivery?, watchers?, store?, proxy?);
    // Runs before these columns existed have none.
    let slow = ["slow_writes_client", "slow_writes_etcdmux", "slow_writes_upstream", "slow_writes_etcd"]
        .map(|name| head.iter().position(|h| *h == name));
    let mut rows = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        let text = |i: usize| f.get(i).copied().unwrap_or("").to_string();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        rows.push(ApiRow {
            model: text(model),
            projects: text(projects).parse().map_err(|e| format!("{}: projects in {line:?}: {e}", path.display()))?,
            target: text(target),
            status: text(status),
            list_p99: num(list),
            write_p99: num(write),
            delivery_p99: num(delivery),
            etcd_watchers: num(watchers),
            store_mib: num(store),
            proxy_mib: num(proxy),
            slow_writes: slow.map(|c| c.and_then(num)),
        });
    }
    Ok(rows)
}

/// The JSON summary of the run `name`, with its name.
fn read_one(name: &str) -> Result<(String, Value), Error> {
    let path = results_path(name, "json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((name.to_string(), serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?))
}

/// The JSON summaries of the runs `names`, each with its name.
fn read_json(names: &[String]) -> Result<Vec<(String, Value)>, Error> {
    names.iter().map(|n| read_one(n)).collect()
}

fn num(v: &Value, field: &str) -> Result<f64, Error> {
    v[field].as_f64().ok_or_else(|| format!("no number {field} in {v}").into())
}

fn find<'a>(rows: &'a [ApiRow], model: &str, projects: u64, target: &str) -> Option<&'a ApiRow> {
    rows.iter().find(|r| r.model == model && r.projects == projects && r.target == target)
}

fn ms(v: Option<f64>) -> String {
    v.map_or("–".to_string(), |v| format!("{v:.2}"))
}

/// How far `value` is above `limit`, in percent.
fn above(value: f64, limit: f64) -> String {
    format!("{:.0} % above", (value / limit.max(1e-9) - 1.0) * 100.0)
}

/// The slow writes hop by hop, as a sentence; `None` for a run without the counts.
fn slow_hops(slow: &[Option<f64>; 4]) -> Option<String> {
    let [Some(client), Some(whole), Some(upstream), etcd] = *slow else { return None };
    let mut s = format!(
        "{client} as the load generator saw them, {whole} inside etcdmux from request to answer, \
         {upstream} of them in etcd's answers to etcdmux"
    );
    if let Some(etcd) = etcd {
        s += &format!(", {etcd} in etcd's own handler");
    }
    Some(s)
}

/// Goal 1: write and delivery p99 at the largest point ≤ 1.5× the smallest's, and at
/// or below grpc-proxy's at every point; list p99 at or below grpc-proxy's.
fn flat_latency(rows: &[ApiRow], detail: &mut String) -> Result<Verdict, Error> {
    let model = "Shared";
    let points: BTreeSet<u64> = rows.iter().filter(|r| r.model == model).map(|r| r.projects).collect();
    let mut v = Verdict {
        goal: G1,
        asked: format!("one shared connection: write and delivery p99 at the largest point ≤ {FLAT_P99}× the smallest's and ≤ grpc-proxy's at every point; list p99 ≤ grpc-proxy's"),
        measured: String::new(),
        missed: Vec::new(),
        unmeasured: false,
    };
    let (Some(&lo), Some(&hi)) = (points.first(), points.last()) else {
        return Err("no point of the shared model in the run".into());
    };
    writeln!(detail, "## 1. Latency flat in project count (apiload, one shared connection)\n")?;
    writeln!(detail, "| projects | write p99 ms: etcdmux / grpc-proxy | delivery p99 ms | list p99 ms | etcdmux at or below grpc-proxy |")?;
    writeln!(detail, "|---|---|---|---|---|")?;
    for &p in &points {
        let (m, g) = (find(rows, model, p, ETCDMUX), find(rows, model, p, GRPC_PROXY));
        let mut worse = Vec::new();
        match (m.filter(|r| r.ok()), g.filter(|r| r.ok())) {
            (Some(m), Some(g)) => {
                for (what, a, b) in [
                    ("write", m.write_p99, g.write_p99),
                    ("delivery", m.delivery_p99, g.delivery_p99),
                    ("list", m.list_p99, g.list_p99),
                ] {
                    if let (Some(a), Some(b)) = (a, b) {
                        if a > b {
                            worse.push(format!("{what} {}", above(a, b)));
                        }
                    }
                }
            }
            (None, _) => worse.push(format!("etcdmux {}", m.map_or("not run", |r| r.status.as_str()))),
            (_, None) => worse.push(format!("grpc-proxy {}", g.map_or("not run", |r| r.status.as_str()))),
        }
        let pair = |f: fn(&ApiRow) -> Option<f64>| format!("{} / {}", ms(m.and_then(f)), ms(g.and_then(f)));
        writeln!(
            detail,
            "| {p} | {} | {} | {} | {} |",
            pair(|r| r.write_p99),
            pair(|r| r.delivery_p99),
            pair(|r| r.list_p99),
            if worse.is_empty() { "yes".to_string() } else { format!("no: {}", worse.join(", ")) }
        )?;
        for w in worse {
            v.missed.push(format!("at {p} projects {w} grpc-proxy's"));
        }
    }
    let mut growth = Vec::new();
    for target in [ETCDMUX, GRPC_PROXY] {
        let (a, b) = (find(rows, model, lo, target), find(rows, model, hi, target));
        for (what, f) in
            [("write", (|r: &ApiRow| r.write_p99) as fn(&ApiRow) -> Option<f64>), ("delivery", |r| r.delivery_p99)]
        {
            let Some((x, y)) = a.and_then(f).zip(b.and_then(f)) else { continue };
            let ratio = y / x.max(1e-9);
            growth.push(format!("{target} {what} {ratio:.2}×"));
            if target == ETCDMUX && ratio > FLAT_P99 {
                v.missed.push(format!(
                    "{what} p99 grew {ratio:.2}× from {lo} to {hi} projects ({} {FLAT_P99}×)",
                    above(ratio, FLAT_P99)
                ));
            }
        }
    }
    writeln!(detail, "\np99 at {hi} projects over p99 at {lo}: {}.\n", growth.join(", "))?;
    if let Some(hops) = find(rows, model, hi, ETCDMUX).and_then(|r| slow_hops(&r.slow_writes)) {
        let bound = SLOW_WRITE.as_millis();
        writeln!(detail, "Where etcdmux's slow writes were slow at {hi} projects (over {bound} ms): {hops}.\n")?;
    }
    let at = |p| find(rows, model, p, ETCDMUX).and_then(|r| r.write_p99);
    let proxy_hi = find(rows, model, hi, GRPC_PROXY).and_then(|r| r.write_p99);
    v.measured = format!(
        "write p99 {} ms at {lo}, {} ms at {hi} projects (grpc-proxy {} ms); {}",
        ms(at(lo)),
        ms(at(hi)),
        ms(proxy_hi),
        growth.join(", ")
    );
    Ok(v)
}

/// Goal 2: RSS per watch stream and per watch (streammem).
fn memory(runs: &[(String, Value)], detail: &mut String) -> Result<Verdict, Error> {
    let mut v = Verdict {
        goal: G2,
        asked: format!(
            "≤ {STREAM_BYTES:.0} B per stream of one watch; ≤ {WATCH_BYTES:.0} B per watch with many per stream"
        ),
        measured: String::new(),
        missed: Vec::new(),
        unmeasured: false,
    };
    writeln!(detail, "## 2. Memory per watch stream (streammem, etcdmux's RSS)\n")?;
    writeln!(
        detail,
        "| run | streams | watches | streams opened at a time | per stream | per watch |\n|---|---|---|---|---|---|"
    )?;
    // With several runs of a kind, the worst one is judged.
    let worst = |seen: Option<f64>, b: f64| Some(seen.map_or(b, |s| s.max(b)));
    let (mut per_stream, mut per_watch) = (None, None);
    for (name, s) in runs {
        let (streams, watches) = (num(s, "streams")?, num(s, "watches")?);
        let (bs, bw) = (num(s, "per_stream_bytes")?, num(s, "per_watch_bytes")?);
        // Runs from before the option opened every stream at once.
        let opened = match s.get("open_concurrency").and_then(Value::as_u64) {
            Some(n) if n > 0 => n.to_string(),
            _ => "all".to_string(),
        };
        writeln!(detail, "| [{name}]({name}.md) | {streams} | {watches} | {opened} | {bs:.0} B | {bw:.0} B |")?;
        if watches <= streams {
            per_stream = worst(per_stream, bs);
        } else {
            per_watch = worst(per_watch, bw);
        }
    }
    writeln!(detail)?;
    match per_stream {
        Some(b) if b > STREAM_BYTES => v.missed.push(format!("{b:.0} B per stream, {}", above(b, STREAM_BYTES))),
        Some(_) => {}
        None => v.missed.push("no run with one watch per stream".into()),
    }
    match per_watch {
        Some(b) if b > WATCH_BYTES => v.missed.push(format!("{b:.0} B per watch, {}", above(b, WATCH_BYTES))),
        Some(_) => {}
        None => v.missed.push("no run with many watches per stream".into()),
    }
    let b = |x: Option<f64>| x.map_or("–".to_string(), |x| format!("{x:.0} B"));
    v.measured = format!("{} per stream, {} per watch", b(per_stream), b(per_watch));
    Ok(v)
}

/// Goal 3: etcdmux's own keys in etcd do not grow with projects × resources.
fn key_count((name, s): &(String, Value), detail: &mut String) -> Result<Verdict, Error> {
    let (projects, resources) = (num(s, "projects")?, num(s, "resources")?);
    let (shared, per_tenant) = (num(s, "shared_index_keys")?, num(s, "per_tenant_index_keys")?);
    let ratio = |field: &str| -> Result<String, Error> {
        let (a, b) = (num(&s["per_tenant"], field)?, num(&s["shared"], field)?);
        Ok(format!("{:.2}×", a / b.max(1e-9)))
    };
    writeln!(detail, "## 3. Upstream key count ([{name}]({name}.md))\n")?;
    writeln!(
        detail,
        "{projects} projects × {resources} resources: this version keeps {shared} index keys in etcd; the per-project form of earlier versions kept {per_tenant}, which cost etcd (per-project form / this version) {} the compaction time, {} the index-compaction pause and {} the RSS.\n",
        ratio("compaction_ms")?,
        ratio("index_pause_ms_sum")?,
        ratio("rss_mib")?
    )?;
    let mut missed = Vec::new();
    if shared > resources {
        missed.push(format!("{shared} index keys for {resources} resource roots"));
    }
    Ok(Verdict {
        goal: G3,
        asked: "index keys independent of projects × resources".into(),
        measured: format!(
            "{shared} index keys at {projects} projects × {resources} resources (per-project form: {per_tenant})"
        ),
        missed,
        unmeasured: false,
    })
}

/// Goal 4: requests per second against etcd direct and grpc-proxy at equal clients,
/// and the lower CPU per request of the two proxies.
fn throughput(runs: &[(String, Value)], detail: &mut String) -> Result<Verdict, Error> {
    writeln!(detail, "## 4. Throughput per core (throughput, median rounds)\n")?;
    writeln!(detail, "| run | clients | workload | etcdmux / direct | etcdmux / grpc-proxy | proxy CPU ms per 1,000: etcdmux / grpc-proxy |")?;
    writeln!(detail, "|---|---|---|---|---|---|")?;
    let (mut cells, mut short_direct, mut short_proxy, mut dearer) = (0, Vec::new(), Vec::new(), Vec::new());
    for (name, s) in runs {
        let closed = num(s, "rate")? == 0.0;
        let all = s["cells"].as_array().cloned().unwrap_or_default();
        let cell = |clients: &Value, workload: &Value, target: &str| {
            all.iter().find(|c| &c["clients"] == clients && &c["workload"] == workload && c["target"] == target)
        };
        for mux in all.iter().filter(|c| c["target"] == ETCDMUX) {
            let (clients, workload) = (&mux["clients"], &mux["workload"]);
            let ops = |c: &Value| num(c, "ops_per_sec");
            let cpu = |c: &Value| num(c, "proxy_cpu_ms_per_kop");
            let direct = cell(clients, workload, "etcd direct").map(ops).transpose()?;
            let proxy = cell(clients, workload, GRPC_PROXY);
            let at = format!("{name} {workload} ×{clients}").replace('"', "");
            cells += 1;
            let vs_direct = direct.map(|d| ops(mux).map(|m| m / d.max(1e-9))).transpose()?;
            let vs_proxy = proxy.map(|p| Ok::<_, Error>(ops(mux)? / ops(p)?.max(1e-9))).transpose()?;
            let cpus = proxy.map(|p| Ok::<_, Error>((cpu(mux)?, cpu(p)?))).transpose()?;
            if let Some(x) = vs_direct.filter(|&x| closed && x < VS_DIRECT) {
                short_direct.push(format!("{at} {x:.2}×"));
            }
            if let Some(x) = vs_proxy.filter(|&x| closed && x < VS_GRPC_PROXY) {
                short_proxy.push(format!("{at} {x:.2}×"));
            }
            if let Some((m, p)) = cpus.filter(|(m, p)| m >= p) {
                dearer.push(format!("{at} {}", above(m, p)));
            }
            let x = |r: Option<f64>| r.map_or("–".to_string(), |r| format!("{r:.2}×"));
            writeln!(
                detail,
                "| [{name}]({name}.md){} | {clients} | {} | {} | {} | {} |",
                if closed { "" } else { " (fixed rate: CPU only)" },
                workload.as_str().unwrap_or("?"),
                x(vs_direct.filter(|_| closed)),
                x(vs_proxy.filter(|_| closed)),
                cpus.map_or("–".to_string(), |(m, p)| format!("{m:.1} / {p:.1}"))
            )?;
        }
    }
    writeln!(detail)?;
    let mut missed = Vec::new();
    if cells == 0 {
        missed.push("no etcdmux cell measured".to_string());
    }
    for (what, list) in [
        (format!("below {VS_DIRECT}× direct"), &short_direct),
        (format!("below {VS_GRPC_PROXY}× grpc-proxy"), &short_proxy),
        ("CPU per request not below grpc-proxy's".to_string(), &dearer),
    ] {
        if !list.is_empty() {
            missed.push(format!("{} of {cells} cells {what}", list.len()));
        }
    }
    Ok(Verdict {
        goal: G4,
        asked: format!("≥ {VS_DIRECT}× etcd direct, ≥ {VS_GRPC_PROXY}× grpc-proxy, lower CPU per request than grpc-proxy"),
        measured: format!(
            "{cells} cells: {} below {VS_DIRECT}× direct, {} below {VS_GRPC_PROXY}× grpc-proxy, {} with CPU per request not below grpc-proxy's",
            short_direct.len(),
            short_proxy.len(),
            dearer.len()
        ),
        missed,
        unmeasured: false,
    })
}

/// Goal 5: Milo's pool and the Go client's model at every asked project count.
fn models(rows: &[ApiRow], points: &[u64], detail: &mut String) -> Result<Verdict, Error> {
    writeln!(detail, "## 5. Client models (apiload)\n")?;
    writeln!(detail, "| model | projects | write p99 ms: etcdmux / grpc-proxy | delivery p99 ms | watchers in etcd | proxy RSS MiB | etcd RSS MiB |")?;
    writeln!(detail, "|---|---|---|---|---|---|---|")?;
    let mut missing = Vec::new();
    for model in ["MiloPool", "GoClient"] {
        for &p in points {
            let (m, g) = (find(rows, model, p, ETCDMUX), find(rows, model, p, GRPC_PROXY));
            for (target, r) in [(ETCDMUX, m), (GRPC_PROXY, g)] {
                if !r.is_some_and(ApiRow::ok) {
                    missing.push(format!("{model} {p} {target} {}", r.map_or("not run", |r| r.status.as_str())));
                }
            }
            let pair = |f: fn(&ApiRow) -> Option<f64>, d: usize| {
                let show = |r: Option<&ApiRow>| r.and_then(f).map_or("–".to_string(), |v| format!("{v:.d$}"));
                format!("{} / {}", show(m), show(g))
            };
            writeln!(
                detail,
                "| {model} | {p} | {} | {} | {} | {} | {} |",
                pair(|r| r.write_p99, 2),
                pair(|r| r.delivery_p99, 2),
                pair(|r| r.etcd_watchers, 0),
                pair(|r| r.proxy_mib, 0),
                pair(|r| r.store_mib, 0),
            )?;
        }
    }
    writeln!(detail)?;
    let asked = points.iter().map(u64::to_string).collect::<Vec<_>>().join(" / ");
    Ok(Verdict {
        goal: G5,
        asked: format!("both models at {asked} projects"),
        measured: format!("{} of {} points measured", points.len() * 4 - missing.len(), points.len() * 4),
        missed: missing,
        unmeasured: false,
    })
}

fn main() -> Result<(), Error> {
    let a = Args::parse();
    let mut detail = String::new();
    let api = read_api(&a.api).map_err(|e| e.to_string());
    let rows = || -> Result<&[ApiRow], Error> { api.as_deref().map_err(|e| e.clone().into()) };
    let verdicts = [
        judge(G1, &mut detail, |d| flat_latency(rows()?, d)),
        judge(G2, &mut detail, |d| memory(&read_json(&a.streammem)?, d)),
        judge(G3, &mut detail, |d| key_count(&read_one(&a.rootindex)?, d)),
        judge(G4, &mut detail, |d| throughput(&read_json(&a.throughput)?, d)),
        judge(G5, &mut detail, |d| models(rows()?, &a.model_points, d)),
    ];
    let mut r = String::new();
    writeln!(r, "# Issue 11's goals, judged from one run\n")?;
    writeln!(r, "Machine: {}\n", machine())?;
    let sources = [&a.api].into_iter().chain(&a.streammem).chain([&a.rootindex]).chain(&a.throughput);
    let links: Vec<String> = sources.map(|n| format!("[{n}]({n}.md)")).collect();
    writeln!(r, "Reports: {}. Why a goal is missed is in those reports and the README.\n", links.join(", "))?;
    writeln!(r, "| goal | asked | measured | state |\n|---|---|---|---|")?;
    for v in &verdicts {
        writeln!(r, "| {} | {} | {} | {} |", v.goal, v.asked, v.measured, v.state())?;
    }
    writeln!(r, "\n{detail}")?;
    let path = write_report(&a.name, &r)?;
    print!("{r}");
    eprintln!("goals: report written to {}", path.display());
    let unjudged: Vec<&str> = verdicts.iter().filter(|v| v.unmeasured).map(|v| v.goal).collect();
    if a.check && !unjudged.is_empty() {
        return Err(format!("not judged: {}", unjudged.join("; ")).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(model: &str, projects: u64, target: &str, write: f64, delivery: f64, list: f64) -> ApiRow {
        ApiRow {
            model: model.into(),
            projects,
            target: target.into(),
            status: "ok".into(),
            list_p99: Some(list),
            write_p99: Some(write),
            delivery_p99: Some(delivery),
            etcd_watchers: Some(1.0),
            store_mib: Some(10.0),
            proxy_mib: Some(20.0),
            slow_writes: [None; 4],
        }
    }

    #[test]
    fn latency_is_met_only_when_flat_and_at_or_below_grpc_proxy() {
        let flat = [
            row("Shared", 100, ETCDMUX, 4.0, 4.0, 10.0),
            row("Shared", 100, GRPC_PROXY, 5.0, 5.0, 10.0),
            row("Shared", 30000, ETCDMUX, 6.0, 5.9, 9.0),
            row("Shared", 30000, GRPC_PROXY, 6.0, 6.0, 9.5),
        ];
        assert!(flat_latency(&flat, &mut String::new()).unwrap().missed.is_empty());

        let mut grown = flat;
        grown[2].write_p99 = Some(6.1); // 1.525× and above grpc-proxy's 6.0
        let v = flat_latency(&grown, &mut String::new()).unwrap();
        assert_eq!(v.missed.len(), 2, "{:?}", v.missed);
        assert!(v.missed.iter().any(|m| m.contains("grew 1.52×")), "{:?}", v.missed);
        assert!(v.missed.iter().any(|m| m.starts_with("at 30000 projects write 2 % above")), "{:?}", v.missed);
    }

    #[test]
    fn a_failed_point_is_a_miss_not_a_pass() {
        let mut rows = [
            row("Shared", 100, ETCDMUX, 4.0, 4.0, 10.0),
            row("Shared", 100, GRPC_PROXY, 5.0, 5.0, 10.0),
            row("Shared", 30000, ETCDMUX, 5.0, 5.0, 9.0),
            row("Shared", 30000, GRPC_PROXY, 6.0, 6.0, 9.5),
        ];
        rows[2].status = "out of memory".into();
        let v = flat_latency(&rows, &mut String::new()).unwrap();
        assert!(v.missed.iter().any(|m| m.contains("etcdmux out of memory")), "{:?}", v.missed);
        assert!(flat_latency(&rows[..0], &mut String::new()).is_err(), "no point: not judged");
    }

    #[test]
    fn goal_one_says_where_the_slow_writes_were_slow_when_the_run_counted_them() {
        let mut rows = vec![
            row("Shared", 100, ETCDMUX, 3.0, 3.0, 9.0),
            row("Shared", 100, GRPC_PROXY, 4.0, 4.0, 9.5),
            row("Shared", 30000, ETCDMUX, 5.0, 5.0, 9.0),
            row("Shared", 30000, GRPC_PROXY, 6.0, 6.0, 9.5),
        ];
        let mut detail = String::new();
        flat_latency(&rows, &mut detail).unwrap();
        assert!(!detail.contains("Where etcdmux's slow writes"), "an older run has no counts: {detail}");
        rows[2].slow_writes = [Some(195.0), Some(169.0), Some(167.0), None];
        let mut detail = String::new();
        flat_latency(&rows, &mut detail).unwrap();
        assert!(
            detail.contains("at 30000 projects (over 10 ms): 195 as the load generator saw them, 169 inside etcdmux from request to answer, 167 of them in etcd's answers to etcdmux."),
            "{detail}"
        );
        rows[2].slow_writes[3] = Some(109.0);
        let mut detail = String::new();
        flat_latency(&rows, &mut detail).unwrap();
        assert!(detail.contains("167 of them in etcd's answers to etcdmux, 109 in etcd's own handler."), "{detail}");
    }

    #[test]
    fn memory_is_judged_per_stream_and_per_watch() {
        let run = |streams: u64, watches: u64, bs: f64, bw: f64| {
            (
                "r".to_string(),
                json!({"streams": streams, "watches": watches, "per_stream_bytes": bs, "per_watch_bytes": bw}),
            )
        };
        let v = memory(&[run(20000, 20000, 2000.0, 2000.0), run(300, 300000, 9e5, 690.0)], &mut String::new()).unwrap();
        assert!(v.missed.is_empty(), "{:?}", v.missed);
        let v = memory(&[run(20000, 20000, 4096.0, 4096.0)], &mut String::new()).unwrap();
        assert_eq!(v.missed, ["4096 B per stream, 100 % above", "no run with many watches per stream"]);
        // A paced run under the bound does not hide a burst above it, whatever the order.
        let burst = run(20000, 20000, 3072.0, 3072.0);
        let mut paced = run(20000, 20000, 1900.0, 1900.0);
        paced.1["open_concurrency"] = json!(64);
        let many = run(300, 300000, 9e5, 690.0);
        for runs in [[burst.clone(), paced.clone(), many.clone()], [paced, burst, many]] {
            let mut detail = String::new();
            let v = memory(&runs, &mut detail).unwrap();
            assert_eq!(v.missed, ["3072 B per stream, 50 % above"]);
            assert!(detail.contains("| 64 | 1900 B |") && detail.contains("| all | 3072 B |"), "{detail}");
        }
    }

    #[test]
    fn throughput_counts_every_cell_short_of_a_goal() {
        let cell = |target: &str, ops: f64, cpu: f64| json!({"clients": 16, "workload": "put", "target": target, "ops_per_sec": ops, "proxy_cpu_ms_per_kop": cpu});
        let run = |rate: u64, cells: Vec<Value>| ("t".to_string(), json!({"rate": rate, "cells": cells}));
        let good =
            run(0, vec![cell("etcd direct", 1000.0, 0.0), cell(GRPC_PROXY, 700.0, 200.0), cell(ETCDMUX, 950.0, 100.0)]);
        assert!(throughput(&[good], &mut String::new()).unwrap().missed.is_empty());
        let short =
            run(0, vec![cell("etcd direct", 1000.0, 0.0), cell(GRPC_PROXY, 800.0, 90.0), cell(ETCDMUX, 850.0, 100.0)]);
        let v = throughput(&[short], &mut String::new()).unwrap();
        assert_eq!(v.missed.len(), 3, "{:?}", v.missed);
        // At a fixed rate only CPU per request is judged.
        let paced = run(
            2000,
            vec![cell("etcd direct", 1000.0, 0.0), cell(GRPC_PROXY, 1000.0, 200.0), cell(ETCDMUX, 500.0, 100.0)],
        );
        assert!(throughput(&[paced], &mut String::new()).unwrap().missed.is_empty());
    }

    #[test]
    fn every_model_point_must_be_measured() {
        let mut rows = Vec::new();
        for model in ["MiloPool", "GoClient"] {
            for target in [ETCDMUX, GRPC_PROXY] {
                rows.push(row(model, 100, target, 1.0, 1.0, 1.0));
            }
        }
        assert!(models(&rows, &[100], &mut String::new()).unwrap().missed.is_empty());
        let v = models(&rows, &[100, 1000], &mut String::new()).unwrap();
        assert_eq!(v.missed.len(), 4, "{:?}", v.missed);
    }

    #[test]
    fn the_shared_index_must_not_outgrow_the_resource_roots() {
        let sides = json!({"keys": 1.0, "rss_mib": 1.0, "compaction_ms": 1.0, "index_pause_ms_sum": 1.0});
        let run = |shared: u64| {
            let s = json!({"projects": 30000, "resources": 10, "shared_index_keys": shared,
                "per_tenant_index_keys": 300000, "per_tenant": sides, "shared": sides});
            ("r".to_string(), s)
        };
        assert!(key_count(&run(10), &mut String::new()).unwrap().missed.is_empty());
        assert_eq!(key_count(&run(11), &mut String::new()).unwrap().missed.len(), 1);
    }
}
