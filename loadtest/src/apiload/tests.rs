//! apiload's unit tests: how points are judged and reported.

use super::report::ceilings;
use super::*;

fn ms_list(v: &[u64]) -> Vec<Duration> {
    v.iter().map(|&m| Duration::from_millis(m)).collect()
}

fn row(write: &[u64], expected: u64, delivered: u64, duplicates: u64) -> Row {
    Row { write: ms_list(write), delivery: ms_list(&[1, 1, 1]), expected, delivered, duplicates, ..Default::default() }
}

fn outcome(target: &'static str, projects: usize, result: Result<Row, String>) -> Outcome {
    let degraded = match &result {
        Ok(r) => degraded(r, Duration::from_millis(100)),
        Err(e) => vec![e.clone()],
    };
    Outcome {
        model: Model::Shared,
        projects,
        target,
        result,
        degraded,
        store_mib: 0.0,
        front_mib: 0.0,
        loadgen_mib: 0.0,
    }
}

#[test]
fn a_point_degrades_on_tail_latency_loss_and_duplicates() {
    assert!(degraded(&row(&[1, 2, 3], 5, 5, 0), Duration::from_millis(100)).is_empty());
    let slow = degraded(&row(&[1, 2, 300], 5, 5, 0), Duration::from_millis(100));
    assert_eq!(slow, vec!["write p99 300.00 ms > 100 ms".to_string()]);
    assert_eq!(degraded(&row(&[1], 5, 4, 0), Duration::from_millis(100)), vec!["1 events lost".to_string()]);
    assert_eq!(degraded(&row(&[1], 5, 5, 2), Duration::from_millis(100)), vec!["2 events duplicated".to_string()]);
}

#[test]
fn the_p99_is_judged_on_sorted_samples() {
    assert!(!degraded(&row(&[300, 1, 2], 1, 1, 0), Duration::from_millis(100)).is_empty());
}

#[test]
fn ceilings_name_the_first_failing_point_and_skip_what_could_not_run() {
    let outcomes = vec![
        outcome("etcdmux", 100, Ok(row(&[1], 1, 1, 0))),
        outcome("etcdmux", 1000, Ok(row(&[1], 1, 1, 0))),
        outcome("etcd direct", 100, Ok(row(&[1], 1, 1, 0))),
        outcome("etcd direct", 1000, Err("out of memory: 900 MiB left".into())),
        outcome("etcdmux", 30000, Err(format!("{NOT_RUN}: open files"))),
    ];
    let text = ceilings(&outcomes, &[Model::Shared], &["etcd direct", "etcdmux"]);
    assert!(
        text.contains(
            "- etcd direct, shared connection: held up to 100 projects; degraded at 1000: out of memory: 900 MiB left"
        ),
        "{text}"
    );
    assert!(text.contains("- etcdmux, shared connection: held at every point measured, up to 1000 projects (not measurable here at 30000 projects"), "{text}");
}

#[test]
fn check_fails_only_on_correctness() {
    assert!(correctness_failures(&outcome("etcdmux", 10, Ok(row(&[500], 3, 3, 0)))).is_none(), "slow is not a bug");
    assert!(correctness_failures(&outcome("etcdmux", 10, Err("out of memory".into()))).is_none());
    assert!(correctness_failures(&outcome("etcdmux", 10, Ok(row(&[1], 3, 2, 0)))).is_some());
}

#[test]
fn pool_models_round_robin_the_storages_over_the_pool() {
    for m in [Model::MiloPool, Model::GoClient] {
        assert_eq!(m.connections(30_000, 32), 32);
        let mut per = vec![0; 32];
        for p in 0..100 {
            for r in 0..10 {
                per[m.connection_of(p, r, 10, 32)] += 1;
            }
        }
        assert!(per.iter().all(|&n| n == 31 || n == 32), "{per:?}");
    }
    assert_eq!(Model::Shared.connections(30_000, 32), 1);
    assert_eq!(Model::PerProject.connections(300, 32), 300);
    assert_eq!(Model::PerProject.connection_of(7, 3, 10, 300), 7, "a project's storages share its connection");
}

#[test]
fn error_chains_keep_the_cause() {
    let io = std::io::Error::other("Too many open files");
    let e: Error = Box::new(tonic::Status::from_error(Box::new(io)));
    assert!(chain(&*e).contains("Too many open files"), "{}", chain(&*e));
}

#[test]
fn histograms_are_read_as_etcd_and_etcdmux_write_them_and_subtracted() {
    use observe::Histogram;
    let etcd = |n: [u32; 3], sum: f64| {
        format!(
            "# TYPE etcd_debugging_mvcc_index_compaction_pause_duration_milliseconds histogram\n\
             etcd_debugging_mvcc_index_compaction_pause_duration_milliseconds_bucket{{le=\"0.5\"}} {}\n\
             etcd_debugging_mvcc_index_compaction_pause_duration_milliseconds_bucket{{le=\"1000\"}} {}\n\
             etcd_debugging_mvcc_index_compaction_pause_duration_milliseconds_bucket{{le=\"+Inf\"}} {}\n\
             etcd_debugging_mvcc_index_compaction_pause_duration_milliseconds_sum {sum}\n\
             etcd_debugging_mvcc_index_compaction_pause_duration_milliseconds_count {}\n\
             etcd_debugging_mvcc_index_compaction_pause_duration_milliseconds_bucket_x{{le=\"0.5\"}} 99\n",
            n[0], n[1], n[2], n[2]
        )
    };
    let name = observe::ETCD_HISTOGRAMS[0].0;
    let before = Histogram::parse(&etcd([1, 1, 1], 0.2), name);
    assert_eq!(before.buckets, vec![(0.5, 1.0), (1000.0, 1.0)], "+Inf and longer names left out");
    let after = Histogram::parse(&etcd([1, 2, 3], 2500.2), name);
    let d = after.since(&before);
    assert_eq!((d.count, d.sum), (2.0, 2500.0));
    assert_eq!(d.quantile_bound(0.5), Some(1000.0));
    assert_eq!(d.quantile_bound(1.0), None, "one pause was above the last bound");
    assert_eq!(d.render(1.0), "n 2, sum 2500, mean 1250, p99 > 1000, max > 1000");
    // etcdmux's exporter: bounds like 0.0005, labels besides le.
    let mux = "etcdmux_watch_hub_lock_hold_seconds_bucket{a=\"x\",le=\"0.0005\"} 7\n\
               etcdmux_watch_hub_lock_hold_seconds_bucket{a=\"y\",le=\"0.0005\"} 1\n\
               etcdmux_watch_hub_lock_hold_seconds_bucket{a=\"x\",le=\"0.001\"} 9\n\
               etcdmux_watch_hub_lock_hold_seconds_sum 0.004\n\
               etcdmux_watch_hub_lock_hold_seconds_count 9\n";
    let h = Histogram::parse(mux, observe::HUB_HISTOGRAMS[0].0);
    assert_eq!(h.buckets, vec![(0.0005, 8.0), (0.001, 9.0)]);
    assert_eq!(h.quantile_bound(0.5), Some(0.0005));
    assert_eq!(Histogram::default().render(1.0), "none observed");
    // One method's series of a histogram labelled by method.
    let by_method = "etcdmux_upstream_request_duration_seconds_bucket{method=\"/etcdserverpb.KV/Txn\",le=\"0.005\"} 90\n\
                     etcdmux_upstream_request_duration_seconds_bucket{method=\"/etcdserverpb.KV/Txn\",le=\"0.01\"} 96\n\
                     etcdmux_upstream_request_duration_seconds_bucket{method=\"/etcdserverpb.KV/Txn\",le=\"+Inf\"} 100\n\
                     etcdmux_upstream_request_duration_seconds_sum{method=\"/etcdserverpb.KV/Txn\"} 0.4\n\
                     etcdmux_upstream_request_duration_seconds_count{method=\"/etcdserverpb.KV/Txn\"} 100\n\
                     etcdmux_upstream_request_duration_seconds_bucket{method=\"/etcdserverpb.KV/Range\",le=\"0.005\"} 5\n\
                     etcdmux_upstream_request_duration_seconds_bucket{method=\"/etcdserverpb.KV/Range\",le=\"0.01\"} 5\n\
                     etcdmux_upstream_request_duration_seconds_sum{method=\"/etcdserverpb.KV/Range\"} 0.01\n\
                     etcdmux_upstream_request_duration_seconds_count{method=\"/etcdserverpb.KV/Range\"} 5\n";
    let txn = observe::select(by_method, observe::HUB_HISTOGRAMS[3].0);
    assert_eq!((txn.count, txn.buckets.clone()), (100.0, vec![(0.005, 90.0), (0.01, 96.0)]), "Range left out");
    assert_eq!((txn.over(0.01), txn.over(0.005), txn.over(0.02)), (Some(4.0), Some(10.0), None));
    assert_eq!(observe::select(by_method, "etcdmux_upstream_request_duration_seconds").count, 105.0, "all methods");
}

#[test]
fn the_load_by_second_splits_writes_by_start_and_cpu_by_samples() {
    let s = |at: u64, cpu_ms: u64| observe::Sample {
        at: Duration::from_millis(at),
        cpu: [
            Duration::from_millis(cpu_ms),
            Duration::from_millis(cpu_ms / 2),
            Duration::ZERO,
            Duration::from_millis(2 * cpu_ms),
        ],
        compactions: [0.0, if at >= 1500 { 1.0 } else { 0.0 }],
    };
    let samples = [s(0, 0), s(1000, 500), s(2000, 1500)];
    let writes = [
        (Duration::from_millis(100), Duration::from_millis(3)),
        (Duration::from_millis(1100), Duration::from_millis(40)),
    ];
    let table = observe::by_second(&writes, &samples, 2);
    assert!(table.contains("| 0–1 | 1 | 3.00/3.00/3.00 | 50 | 25 | 0 | 25 |"), "{table}");
    assert!(table.contains("| 1–2 | 1 | 40.00/40.00/40.00 | 100 | 50 | 0 | 50 |"), "{table}");
    assert!(observe::machine_busy() > Duration::ZERO);
    assert_eq!(observe::compaction_ends(&samples), [None, Some(2.0)]);
}
