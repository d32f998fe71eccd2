//! What apiload watches besides latencies, to say where a tail comes from: etcd's
//! and etcdmux's histograms (compaction, disk, the hub's lock) read before and after
//! the write load, a timeline of CPU and of compaction sampled during it, and the
//! write latencies by second.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

pub use etcdmux_loadtest::goal::SLOW_WRITE;
use etcdmux_loadtest::{cpu_time, labeled, ms, percentile, scrape, Store};
use tokio::task::JoinHandle;

/// etcd's histograms that tell whether a compaction or the disk held writes up.
/// The last, etcd's own time per Txn, only with `--metrics extensive`.
pub const ETCD_HISTOGRAMS: [(&str, &str); 6] = [
    ("etcd_debugging_mvcc_index_compaction_pause_duration_milliseconds", "index compaction (ms)"),
    ("etcd_debugging_mvcc_db_compaction_total_duration_milliseconds", "db compaction, whole (ms)"),
    ("etcd_debugging_mvcc_db_compaction_pause_duration_milliseconds", "db compaction, per batch (ms)"),
    ("etcd_disk_wal_fsync_duration_seconds", "WAL fsync (s)"),
    ("etcd_disk_backend_commit_duration_seconds", "backend commit (s)"),
    (ETCD_TXN, "Txn calls handled in etcd, with `--etcd-extensive-metrics` (s)"),
];
const ETCD_TXN: &str = "grpc_server_handling_seconds{grpc_method=\"Txn\"}";

/// etcdmux's hub lock, per batch of upstream events (`src/watch/upstream.rs`), and
/// its writes (the apiserver's txns) whole against etcd's part of them: a name may
/// carry one label selector, `name{label="value"}`.
pub const HUB_HISTOGRAMS: [(&str, &str); 4] = [
    ("etcdmux_watch_hub_lock_hold_seconds", "hub lock held per event batch (s)"),
    ("etcdmux_watch_hub_lock_wait_seconds", "hub lock waited for per event batch (s)"),
    (WRITES_WHOLE, "writes (Txn) from request to answer in etcdmux (s)"),
    (WRITES_UPSTREAM, "etcd's answers to etcdmux's Txn calls (s)"),
];
const WRITES_WHOLE: &str = "etcdmux_grpc_request_duration_seconds{method=\"/etcdserverpb.KV/Txn\"}";
const WRITES_UPSTREAM: &str = "etcdmux_upstream_request_duration_seconds{method=\"/etcdserverpb.KV/Txn\"}";

/// One Prometheus histogram: cumulative bucket counts by upper bound, sum, count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Histogram {
    /// Metric `name`'s histogram in Prometheus `text` (every label set summed).
    pub fn parse(text: &str, name: &str) -> Histogram {
        let bucket = format!("{name}_bucket{{");
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&bucket) else { continue };
            let le = rest.split("le=\"").nth(1).and_then(|r| r.split('"').next()).and_then(|v| v.parse::<f64>().ok());
            let n = rest.rsplit_once('}').and_then(|(_, v)| v.split_whitespace().next()?.parse::<f64>().ok());
            let (Some(le), Some(n)) = (le, n) else { continue };
            if !le.is_finite() {
                continue;
            }
            match buckets.iter_mut().find(|b| b.0 == le) {
                Some(b) => b.1 += n,
                None => buckets.push((le, n)),
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Histogram {
            buckets,
            sum: labeled(text, &format!("{name}_sum"), &[]),
            count: labeled(text, &format!("{name}_count"), &[]),
        }
    }

    /// What was observed between `before` and `self`.
    pub fn since(&self, before: &Histogram) -> Histogram {
        let at = |le: f64| before.buckets.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
        Histogram {
            buckets: self.buckets.iter().map(|&(le, n)| (le, n - at(le))).collect(),
            sum: self.sum - before.sum,
            count: self.count - before.count,
        }
    }

    /// The upper bound of the bucket holding quantile `q` (`None`: above the last
    /// bound, or nothing observed).
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let want = self.count * q;
        self.buckets.iter().find(|&&(_, n)| n >= want).map(|&(le, _)| le)
    }

    /// How many observations exceeded `bound`, which must be one of the bucket bounds
    /// (`None` otherwise).
    pub fn over(&self, bound: f64) -> Option<f64> {
        self.buckets.iter().find(|b| b.0 == bound).map(|b| self.count - b.1)
    }

    /// `n 12, mean 3.1, p99 ≤ 5, max ≤ 10` (in the metric's unit; `scale` multiplies).
    pub fn render(&self, scale: f64) -> String {
        if self.count <= 0.0 {
            return "none observed".to_string();
        }
        let bound = |q| match self.quantile_bound(q) {
            Some(b) => format!("≤ {}", trim(b * scale)),
            None => format!("> {}", self.buckets.last().map_or("?".to_string(), |b| trim(b.0 * scale))),
        };
        format!(
            "n {}, sum {}, mean {}, p99 {}, max {}",
            self.count,
            trim(self.sum * scale),
            trim(self.sum * scale / self.count),
            bound(0.99),
            bound(1.0)
        )
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Every histogram of `names` at `url`'s `/metrics`.
async fn histograms(url: &str, names: &[(&str, &str)]) -> Vec<Histogram> {
    let text = scrape(url).await;
    names.iter().map(|(n, _)| select(&text, n)).collect()
}

/// Histogram `name` in `text`; `name{label="value"}` takes only that label's series.
pub fn select(text: &str, name: &str) -> Histogram {
    match name.split_once('{') {
        Some((base, selector)) => {
            let selector = selector.trim_end_matches('}');
            let only: Vec<&str> = text.lines().filter(|l| l.contains(selector)).collect();
            Histogram::parse(&only.join("\n"), base)
        }
        None => Histogram::parse(text, name),
    }
}

/// `- what: delta` lines for `names`, `after` against `before`; times in seconds
/// shown in ms.
fn render_deltas(names: &[(&str, &str)], before: &[Histogram], after: &[Histogram]) -> String {
    let mut s = String::new();
    for (i, (name, what)) in names.iter().enumerate() {
        let (Some(b), Some(a)) = (before.get(i), after.get(i)) else { continue };
        let (scale, what) = match what.strip_suffix(" (s)") {
            Some(w) => (1000.0, format!("{w} (ms)")),
            None => (1.0, what.to_string()),
        };
        let _ = writeln!(s, "  - {what}, `{name}`: {}", a.since(b).render(scale));
    }
    s
}

/// One sample of the timeline, `at` since the load's start.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Duration,
    /// CPU time so far: the store, the proxy, this process, and the whole machine
    /// (every core's busy time, /proc/stat), for the work of others beside them.
    pub cpu: [Duration; 4],
    /// etcd's compactions finished so far: index compactions, db compactions.
    pub compactions: [f64; 2],
}

/// Samples CPU and etcd's compaction counts every 250 ms until aborted.
fn sampler(
    etcd_metrics: String,
    store: Store,
    front: u32,
    start: Instant,
) -> (JoinHandle<()>, std::sync::Arc<std::sync::Mutex<Vec<Sample>>>) {
    let out: std::sync::Arc<std::sync::Mutex<Vec<Sample>>> = Default::default();
    let samples = out.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let text = scrape(&etcd_metrics).await;
            let count = |n: &str| labeled(&text, &format!("{n}_count"), &[]);
            let sample = Sample {
                at: start.elapsed(),
                cpu: [store.cpu(), cpu_time(front), cpu_time(std::process::id()), machine_busy()],
                compactions: [count(ETCD_HISTOGRAMS[0].0), count(ETCD_HISTOGRAMS[1].0)],
            };
            samples.lock().unwrap_or_else(|e| e.into_inner()).push(sample);
        }
    });
    (task, out)
}

/// The machine's busy CPU time so far, all cores (`/proc/stat`: all but idle and
/// iowait).
pub fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| l.split_whitespace().filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: u64 = ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(busy * 1000 / hz)
}

/// When etcd's index compaction and its db compaction finished (seconds into the
/// load), from the samples: the first sample with a higher count than the first.
pub fn compaction_ends(samples: &[Sample]) -> [Option<f64>; 2] {
    let Some(first) = samples.first() else { return [None, None] };
    std::array::from_fn(|i| {
        samples.iter().find(|s| s.compactions[i] > first.compactions[i]).map(|s| s.at.as_secs_f64())
    })
}

/// One line per second of the load: writes started in it (count, p50, p99, max) and
/// the CPU of the store, the proxy, the load generator and everything else on the
/// machine (profilers included) over it, in % of a core.
pub fn by_second(writes: &[(Duration, Duration)], samples: &[Sample], secs: u64) -> String {
    let mut s = String::from(
        "| second | writes | write p50/p99/max ms | store CPU % | proxy CPU % | loadgen CPU % | others' CPU % |\n|---|---|---|---|---|---|---|\n",
    );
    for sec in 0..secs {
        let (from, to) = (Duration::from_secs(sec), Duration::from_secs(sec + 1));
        let mut lat: Vec<Duration> = writes.iter().filter(|(at, _)| *at >= from && *at < to).map(|w| w.1).collect();
        lat.sort();
        let cpu = cpu_between(samples, from, to);
        let _ = writeln!(
            s,
            "| {sec}–{} | {} | {}/{}/{} | {} |",
            sec + 1,
            lat.len(),
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
            ms(lat.last().copied().unwrap_or_default()),
            cpu.map_or("– | – | – | –".to_string(), |c| {
                let others = (c[3] - c[0] - c[1] - c[2]).max(0.0);
                format!("{:.0} | {:.0} | {:.0} | {others:.0}", c[0], c[1], c[2])
            }),
        );
    }
    s
}

/// CPU % of a core of each process between the samples nearest `from` and `to`.
fn cpu_between(samples: &[Sample], from: Duration, to: Duration) -> Option<[f64; 4]> {
    let a = samples.iter().rev().find(|s| s.at <= from).or(samples.first())?;
    let b = samples.iter().find(|s| s.at >= to).or(samples.last())?;
    let secs = b.at.saturating_sub(a.at).as_secs_f64();
    (secs > 0.0).then(|| std::array::from_fn(|i| b.cpu[i].saturating_sub(a.cpu[i]).as_secs_f64() / secs * 100.0))
}

/// Writes slower than [`SLOW_WRITE`] at each hop that measures them (`None`: that
/// hop is not measured for this target).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SlowWrites {
    /// As the load generator saw them.
    pub client: f64,
    /// Inside etcdmux, from request to answer.
    pub etcdmux: Option<f64>,
    /// In etcd's answers to etcdmux's calls.
    pub upstream: Option<f64>,
    /// In etcd's own handler (etcd with `--metrics extensive`).
    pub etcd: Option<f64>,
}

/// What [`Watch::finish`] found: the report's lines, the timeline, the slow writes.
pub struct Finished {
    pub report: String,
    pub samples: Vec<Sample>,
    pub slow_writes: SlowWrites,
}

/// What is watched over one write load: etcd's (and etcdmux's) histograms before it,
/// and the timeline sampled during it.
pub struct Watch {
    etcd_metrics: String,
    /// Empty for targets other than etcdmux.
    front_metrics: String,
    before: [Vec<Histogram>; 2],
    sampler: JoinHandle<()>,
    samples: std::sync::Arc<std::sync::Mutex<Vec<Sample>>>,
    /// When the load started: the timeline's zero.
    pub start: Instant,
}

impl Watch {
    /// Reads the histograms, then starts the timeline at the load's start (now).
    pub async fn start(etcd_metrics: &str, front_metrics: Option<&str>, store: Store, front: u32) -> Watch {
        let front_metrics = front_metrics.unwrap_or_default().to_string();
        let before =
            [histograms(etcd_metrics, &ETCD_HISTOGRAMS).await, histograms(&front_metrics, &HUB_HISTOGRAMS).await];
        let start = Instant::now();
        let (sampler, samples) = sampler(etcd_metrics.to_string(), store, front, start);
        Watch { etcd_metrics: etcd_metrics.to_string(), front_metrics, before, sampler, samples, start }
    }

    /// Waits up to `wait` for etcd's db compaction (asked at `compact_at`) to end,
    /// reads the histograms again; the report's lines and the timeline.
    /// `client_slow`: the writes slower than [`SLOW_WRITE`] as the load generator saw
    /// them, set beside the same count at each hop.
    pub async fn finish(self, wait: Duration, compact_at: Duration, client_slow: usize) -> Finished {
        let deadline = Instant::now() + wait;
        let mut ends = compaction_ends(&self.samples.lock().unwrap_or_else(|e| e.into_inner()));
        while ends[1].is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            ends = compaction_ends(&self.samples.lock().unwrap_or_else(|e| e.into_inner()));
        }
        self.sampler.abort();
        let etcd = histograms(&self.etcd_metrics, &ETCD_HISTOGRAMS).await;
        let missing = if wait.is_zero() {
            "not waited for".to_string()
        } else {
            format!("not within {wait:?} of the load's end")
        };
        let end = |e: Option<f64>| e.map_or(missing.clone(), |s| format!("by {s:.2} s"));
        let mut s = format!(
            "- etcd's compaction: asked at {:.2} s; index compaction ended {}, db compaction ended {} (sampled every 250 ms, seconds into the write load)\n\
             - etcd over the write load and until its compaction ended:\n{}",
            compact_at.as_secs_f64(),
            end(ends[0]),
            end(ends[1]),
            render_deltas(&ETCD_HISTOGRAMS, &self.before[0], &etcd),
        );
        // Writes slower than SLOW_WRITE at each hop that measures them.
        let slow = |after: &[Histogram], before: &[Histogram], i: usize| match (after.get(i), before.get(i)) {
            (Some(a), Some(b)) if a.count > 0.0 => a.since(b).over(SLOW_WRITE.as_secs_f64()),
            _ => None,
        };
        let mut slow_writes = SlowWrites { client: client_slow as f64, ..SlowWrites::default() };
        let mut hops = vec![format!("{client_slow} as the load generator saw them")];
        let shown = |n: Option<f64>| n.map_or("?".to_string(), |n| n.to_string());
        if !self.front_metrics.is_empty() {
            let hub = histograms(&self.front_metrics, &HUB_HISTOGRAMS).await;
            s += &format!("- etcdmux over the same time:\n{}", render_deltas(&HUB_HISTOGRAMS, &self.before[1], &hub));
            slow_writes.etcdmux = slow(&hub, &self.before[1], 2);
            hops.push(format!("{} in etcdmux from request to answer", shown(slow_writes.etcdmux)));
            slow_writes.upstream = slow(&hub, &self.before[1], 3);
            hops.push(format!("{} of etcd's answers to etcdmux", shown(slow_writes.upstream)));
        }
        slow_writes.etcd = slow(&etcd, &self.before[0], 5);
        if let Some(n) = slow_writes.etcd {
            hops.push(format!("{n} in etcd's own handling of Txn calls"));
        }
        s += &format!("- writes over {} ms: {}\n", SLOW_WRITE.as_millis(), hops.join(", "));
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Finished { report: s, samples, slow_writes }
    }
}
