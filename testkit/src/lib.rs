//! Real etcd processes and the plumbing around them, for etcdmux's integration tests
//! (`tests/`) and benchmarks (`loadtest/`).
//!
//! Nothing here is mocked: an [`Etcd`] is the `etcd` binary from PATH, a [`Relay`] is a
//! real TCP relay on loopback, and [`etcdctl`] runs the real `etcdctl`. Everything
//! binds free 127.0.0.1 ports and keeps its data in a fresh temporary directory, so
//! tests run in parallel and leave nothing behind. `etcd` and `etcdctl` must be on
//! PATH (`make deps` installs them).
//!
//! The kit does not depend on the `etcdmux` crate, so it never changes when the
//! proxy's source does; what needs etcdmux itself (starting it in-process, its
//! configs) lives next to the tests, in `tests/common/mod.rs`.
//!
//! # Layout
//!
//! The major components are:
//!
//! * [`Etcd`]: one etcd member owned by a test: started healthy on free ports, killed
//!   and restarted on the same ports and data, its log and its `/metrics`. Killed on
//!   drop. [`Etcd::builder`] passes extra flags (quota, progress-notify interval, ...).
//!
//! * [`Cluster`]: N etcd members on loopback that form one cluster; kill members to
//!   make it lose quorum, restart them to get it back.
//!
//! * [`Postgres`]: a PostgreSQL server owned by a test (`initdb` in a temp dir, a
//!   free port; run as `nobody` when the tests run as root), killed and restarted
//!   in place, its client connections dropped; killed on drop. No fsync by default;
//!   [`Postgres::try_start_with`] overrides settings (the benchmarks turn it on).
//!
//! * [`Relay`]: a TCP relay in front of an address, for an upstream that goes away:
//!   [`Relay::cut`] drops every connection, [`Relay::pause`] / [`Relay::resume`]
//!   refuse new ones for a while, [`Relay::stop`] closes the port for good.
//!
//! * Helpers: [`free_port`], [`http_get`], [`scrape_metric`] / [`sum_metric`]
//!   (Prometheus text), [`etcdctl`] / [`etcdctl_ok`], [`init_tracing`], and [`Proc`] /
//!   [`cpu_time`] for other child processes.
//!
//! # Using it
//!
//! In an integration test (a `dev-dependency` of the root package):
//!
//! ```no_run
//! use etcdmux_testkit::{etcdctl_ok, Etcd, Relay};
//!
//! # async fn example() {
//! let mut etcd = Etcd::start(); // healthy when this returns
//! assert_eq!(etcdctl_ok(&etcd.client_url, &["put", "k", "v"]), "OK\n");
//! let relay = Relay::start(&etcd.client_url).await;
//! // ... point the code under test at `relay.url`, then:
//! relay.cut(); // every connection through the relay drops at once
//! etcd.kill();
//! etcd.restart(); // same ports, same data
//! assert_eq!(etcd.metric("etcd_server_has_leader"), Some(1.0));
//! # }
//! ```
//!
//! With extra etcd flags, or as several members:
//!
//! ```no_run
//! use etcdmux_testkit::{Cluster, Etcd};
//!
//! let etcd = Etcd::builder().args(["--quota-backend-bytes", "8589934592"]).start();
//! let mut cluster = Cluster::start(3);
//! cluster.kill(1);
//! cluster.kill(2); // no quorum: member 0 has no leader
//! ```
//!
//! Blocking calls ([`Etcd::start`], [`Etcd::restart`], [`http_get`], [`etcdctl`])
//! block the calling thread; from async code run them on a multi-threaded runtime
//! (as the tests do) or in `tokio::task::spawn_blocking` (as the benchmarks do).

mod cluster;
mod etcd;
mod http;
mod postgres;
mod relay;

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub use cluster::Cluster;

/// Ten resources of a Milo project, Kubernetes' and API-group ones, as the
/// migration tests and benchmarks seed them.
pub const MILO_RESOURCES: [&str; 10] = [
    "pods",
    "configmaps",
    "secrets",
    "services",
    "serviceaccounts",
    "events",
    "apps.k8s.io/deployments",
    "apps.k8s.io/replicasets",
    "rbac.authorization.k8s.io/roles",
    "resourcemanager.miloapis.com/projects",
];
pub use etcd::{Etcd, EtcdBuilder};
pub use http::{http_get, scrape_metric, sum_metric};
pub use postgres::{postgres_bin, Postgres};
pub use relay::Relay;

const DEPS_HINT: &str = "run `make deps` (apt-get install etcd-server etcd-client)";

/// A port on 127.0.0.1 that was free a moment ago (bound to port 0 and released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Runs `etcdctl --endpoints <endpoint> <args>` (API v3).
pub fn etcdctl(endpoint: &str, args: &[&str]) -> Output {
    match Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint])
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("etcdctl not found: {DEPS_HINT}"),
        Err(e) => panic!("running etcdctl: {e}"),
    }
}

/// Like [`etcdctl`], but asserts success and returns stdout.
pub fn etcdctl_ok(endpoint: &str, args: &[&str]) -> String {
    let out = etcdctl(endpoint, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        panic!(
            "etcdctl --endpoints {endpoint} {} failed ({}):\nstderr: {}\nstdout: {stdout}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
}

/// Installs a fmt subscriber (filter from RUST_LOG) writing through the test harness;
/// later calls are no-ops.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time (user + system) process `pid` has used so far, from `/proc/<pid>/stat`;
/// zero if it cannot be read.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}
