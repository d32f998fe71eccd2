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
