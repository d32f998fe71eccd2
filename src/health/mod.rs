//! Health for Kubernetes probes: readiness, the standard `grpc.health.v1.Health`
//! service on the client listeners, and the HTTP endpoints of the metrics listener
//! (`/livez`, `/readyz`, `/metrics`; see [`http`]).
//!
//! One task probes etcd every `health.probe_interval_ms` (a range on the layout's
//! void key, which also reads etcd's revision), keeps what it saw, and publishes the
//! decision ([`ready::decide`]) to the gRPC health service (`""` and
//! `etcdserverpb.KV`: `SERVING` or `NOT_SERVING`) and the `etcdmux_ready` gauge.
//! `/readyz` decides afresh on each request from the same observations. Both tasks
//! are owned by `proxy.tasks`; at the shutdown signal the services report
//! `NOT_SERVING`, health `Watch` streams end (then `Check` answers `NOT_FOUND`), and
//! the tasks end.

pub mod http;
pub mod ready;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use crate::config::HealthConfig;
use crate::metrics::names;
use crate::ops::Proxy;
use crate::pb::etcdserverpb::RangeRequest;
use crate::upstream::CallCtx;
use crate::watch::Hub;
use ready::{Bounds, Lag, Observed, Readiness};

/// The gRPC health service names etcdmux reports: the whole server, and KV.
pub const SERVICES: [&str; 2] = ["", "etcdserverpb.KV"];

/// What the probes saw.
#[derive(Default)]
struct Probes {
    last_ok: Option<Instant>,
    last_error: Option<String>,
    lag: Lag,
    /// When the hub was last asked for a progress probe.
    nudged: Option<Instant>,
}

/// Readiness of one etcdmux.
pub struct Health {
    cfg: HealthConfig,
    hub: Arc<Hub>,
    probes: Mutex<Probes>,
    reporter: HealthReporter,
    service: HealthServer<HealthService>,
    metrics_addr: Option<SocketAddr>,
}

impl Health {
    /// Starts the probe task and, when `server.metrics_listen` is set, the HTTP
    /// listener (port 0 allowed; see [`Health::metrics_addr`]), both owned by
    /// `proxy.tasks`.
    pub async fn start(
        proxy: &Arc<Proxy>,
        hub: &Arc<Hub>,
    ) -> Result<Arc<Health>, Box<dyn std::error::Error + Send + Sync>> {
        // The recorder first: metrics set before it would be lost.
        let listener = match proxy.cfg.server.metrics_listen {
            Some(addr) => {
                let l = TcpListener::bind(addr).await.map_err(|e| format!("binding metrics listener {addr}: {e}"))?;
                let handle = crate::metrics::install().map_err(|e| format!("metrics recorder: {e}"))?;
                Some((l, handle))
            }
            None => None,
        };
        let reporter = HealthReporter::new();
        for name in SERVICES {
            reporter.set_service_status(name, ServingStatus::NotServing).await;
        }
        let service = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
        let metrics_addr = listener.as_ref().map(|(l, _)| l.local_addr()).transpose()?;
        metrics::gauge!(names::READY).set(0.0);
        // The series exists from the start (at 0), so that rates and alerts see it.
        metrics::counter!(names::UPSTREAM_PROBE_FAILURES).increment(0);
        let health = Arc::new(Health {
            cfg: proxy.cfg.health.clone(),
            hub: hub.clone(),
            probes: Mutex::new(Probes::default()),
            reporter,
            service,
            metrics_addr,
        });
        if let Some((listener, handle)) = listener {
            tracing::info!(addr = ?metrics_addr, "serving /livez, /readyz and /metrics");
            proxy.tasks.spawn(http::serve(listener, health.clone(), handle, proxy.tasks.clone()));
        }
        proxy.tasks.spawn(health.clone().run(proxy.clone()));
        Ok(health)
    }

    /// The `grpc.health.v1.Health` service, for every client listener.
    pub fn grpc_service(&self) -> HealthServer<HealthService> {
        self.service.clone()
    }

    /// The bound address of the metrics listener, if there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    fn probes(&self) -> MutexGuard<'_, Probes> {
        self.probes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bounds(&self) -> Bounds {
        Bounds {
            max_probe_age: Duration::from_millis(self.cfg.max_probe_age_ms),
            max_watch_lag: Duration::from_millis(self.cfg.max_watch_lag_ms),
        }
    }

    /// Readiness now.
    pub fn readiness(&self) -> Readiness {
        let hub = self.hub.sync();
        let mut p = self.probes();
        let behind_since = p.lag.behind_since(hub.last_rev);
        let obs = Observed { probe_ok: p.last_ok, probe_error: p.last_error.as_deref(), hub, behind_since };
        ready::decide(self.bounds(), Instant::now(), &obs)
    }

    /// Probes etcd every interval and publishes readiness, until the shutdown signal.
    async fn run(self: Arc<Self>, proxy: Arc<Proxy>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.probe_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut serving = None;
        loop {
            tokio::select! {
                _ = proxy.tasks.cancelled() => break,
                _ = tick.tick() => {}
            }
            tokio::select! {
                _ = proxy.tasks.cancelled() => break,
                _ = self.probe(&proxy) => {}
            }
            self.publish(&self.readiness(), &mut serving).await;
        }
        let stopping = Readiness { upstream: Ok(()), watch: Err("shutting down".to_string()) };
        self.publish(&stopping, &mut serving).await;
        // Health `Watch` streams end once they have sent NOT_SERVING (their channel
        // closes), so they do not hold the listeners open through the grace period.
        let mut reporter = self.reporter.clone();
        for name in SERVICES {
            reporter.clear_service_status(name).await;
        }
    }

    /// One probe: reads etcd's revision, and notes how far behind it the hub is.
    async fn probe(&self, proxy: &Proxy) {
        let ctx = CallCtx::from_metadata(&Default::default(), Duration::from_millis(self.cfg.probe_timeout_ms));
        let req = RangeRequest { key: proxy.layout.void_key(), ..Default::default() };
        let res = proxy.backend.range(&ctx, &req).await;
        let now = Instant::now();
        let hub_rev = self.hub.sync().last_rev;
        let mut p = self.probes();
        match res {
            Ok(resp) => {
                p.last_ok = Some(now);
                p.last_error = None;
                p.lag.observe(resp.header.map_or(0, |h| h.revision), now, hub_rev);
            }
            Err(e) => {
                metrics::counter!(names::UPSTREAM_PROBE_FAILURES).increment(1);
                p.last_error = Some(e.to_string());
                return;
            }
        }
        // Behind for half the bound: revisions without events (outside the watched
        // range) are proved with a progress probe, at most once per half bound.
        let half = Duration::from_millis(self.cfg.max_watch_lag_ms / 2);
        let behind = p.lag.behind_since(hub_rev).is_some_and(|t| now.saturating_duration_since(t) >= half);
        let recently = p.nudged.is_some_and(|t| now.saturating_duration_since(t) < half);
        if behind && !recently {
            p.nudged = Some(now);
            drop(p);
            self.hub.nudge_progress();
        }
    }

    /// Sets the gauge and, when readiness changed, the gRPC health statuses.
    async fn publish(&self, r: &Readiness, serving: &mut Option<bool>) {
        let ready = r.is_ready();
        metrics::gauge!(names::READY).set(if ready { 1.0 } else { 0.0 });
        if *serving == Some(ready) {
            return;
        }
        match ready {
            true => tracing::info!("ready"),
            false if serving.is_some() => tracing::warn!(report = %r.report(), "not ready"),
            false => {}
        }
        *serving = Some(ready);
        let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
        for name in SERVICES {
            self.reporter.set_service_status(name, status).await;
        }
    }
}
