//! Builds the gRPC servers, one per listener, and runs them until shutdown.
//!
//! Shutdown, in this order and within one grace period (`server.shutdown_grace_ms`)
//! for all listeners together:
//! 1. every listener stops accepting and sends GOAWAY; unary calls in flight finish;
//! 2. the shutdown signal ([`Tasks`](crate::shutdown::Tasks)) ends watch and
//!    keepalive streams with `UNAVAILABLE`, so clients reconnect and resume, and
//!    tells the watch hub to stop;
//! 3. once the listeners have drained, the hub's tasks are awaited, then every other
//!    owned task (what is still running when the grace period is over is aborted
//!    and logged).
//!
//! Dropping [`Running`] signals too, so a test that panics still stops its server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tower::ServiceBuilder;

use super::accept::Backoff;
use super::cluster::ClusterService;
use super::handshake::TlsIncoming;
use super::kv::KvService;
use super::layer::GrpcMetricsLayer;
use super::lease::LeaseService;
use super::limits::{Limits, LimitsLayer};
use super::maintenance::MaintenanceService;
use super::serve::{serve, Http2};
use super::span::CallSpanLayer;
use super::tls::{ScopeSource, ServerTls};
use super::watch::{WatchFirst, WatchService};
use crate::certs::{Apply, Reloader};
use crate::config::Config;
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{
    cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer,
};
use crate::watch::Hub;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Listener = JoinHandle<()>;

/// A running etcdmux.
pub struct Running {
    /// Bound address of each configured listener, in order.
    pub addrs: Vec<SocketAddr>,
    /// Bound address of the metrics listener (`/metrics`, `/livez`, `/readyz`).
    pub metrics_addr: Option<SocketAddr>,
    proxy: Arc<Proxy>,
    /// Tells every listener to stop accepting and drain.
    stop_accepting: CancellationToken,
    listeners: Vec<Listener>,
    /// The watch hub: awaited after the listeners.
    hub: Arc<Hub>,
}

impl Running {
    /// The read replica, when `[cache] enabled`.
    pub fn replica(&self) -> Option<&Arc<crate::replica::Replica>> {
        self.proxy.replica.as_ref()
    }

    /// Shuts down gracefully (see the module docs); returns once every listener and
    /// task has ended, or the grace period is over.
    pub async fn shutdown(mut self) {
        let grace = Duration::from_millis(self.proxy.cfg.server.shutdown_grace_ms);
        let deadline = Instant::now() + grace;
        self.stop_accepting.cancel();
        self.proxy.tasks.shut_down();
        for listener in self.listeners.drain(..) {
            let abort = listener.abort_handle();
            if tokio::time::timeout_at(deadline, listener).await.is_err() {
                tracing::warn!(?grace, "a listener did not drain within the grace period; closing it");
                abort.abort();
            }
        }
        self.hub.stop();
        if tokio::time::timeout_at(deadline, self.hub.stopped()).await.is_err() {
            tracing::warn!("the watch hub did not stop within the grace period");
        }
        if tokio::time::timeout_at(deadline, self.proxy.tasks.wait()).await.is_err() {
            tracing::warn!(left = self.proxy.tasks.len(), "tasks still running after the grace period");
        }
        tracing::info!("shut down");
    }

    /// Waits until a listener stops on its own: after a shutdown began elsewhere, or
    /// an error if its task panicked.
    pub async fn wait(&mut self) -> Result<(), BoxError> {
        let Some(first) = self.listeners.first_mut() else { return Ok(()) };
        first.await?;
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_accepting.cancel();
        self.proxy.tasks.shut_down();
        self.hub.stop();
    }
}

/// Binds every listener of `cfg` (port 0 allowed) and starts serving.
pub async fn start(mut cfg: Config) -> Result<Running, BoxError> {
    let mut listeners = Vec::new();
    for l in &mut cfg.listeners {
        let listener = TcpListener::bind(l.addr).await.map_err(|e| format!("binding {}: {e}", l.addr))?;
        l.addr = listener.local_addr()?;
        listeners.push(listener);
    }
    if cfg.backend.kind == crate::config::BackendKind::Sql {
        let timeout = Duration::from_millis(cfg.backend.connect_timeout_ms);
        let tls = crate::backend::sql::tls::DbTls::from_config(&cfg.backend)?;
        crate::backend::sql::schema::verify(&cfg.backend.dsn, &tls, timeout).await?;
    }
    let proxy = Proxy::new(cfg)?;
    // Everything that can fail comes before the first task is spawned.
    let scopes =
        proxy.cfg.listeners.iter().map(|l| ScopeSource::new(&proxy.resolver, l)).collect::<Result<Vec<_>, _>>()?;
    let tls = proxy.cfg.listeners.iter().map(ServerTls::load).collect::<Result<Vec<_>, _>>()?;
    let hub = Hub::new(&proxy.cfg.watch, proxy.layout.clone());
    let health = match crate::health::Health::start(&proxy, &hub).await {
        Ok(h) => h,
        Err(e) => {
            proxy.tasks.shut_down();
            return Err(e);
        }
    };
    hub.start(proxy.clone());
    let reload_every = Duration::from_millis(proxy.cfg.server.tls_reload_interval_ms);
    if let Some((paths, serving)) = proxy.backend.etcd().and_then(|up| up.tls_files()) {
        let p = proxy.clone();
        let apply: Apply = Box::new(move |files| p.backend.etcd().map_or(Ok(()), |up| up.reload_tls(files)));
        Reloader::new("upstream", "upstream".into(), paths.clone(), serving, apply).spawn(&proxy.tasks, reload_every);
    }
    let handshake_timeout = Duration::from_millis(proxy.cfg.server.tls_handshake_timeout_ms);
    let stop_accepting = CancellationToken::new();
    let mut addrs = Vec::new();
    let mut tasks = Vec::new();
    let max_in = proxy.cfg.server.max_request_bytes;
    let max_out = proxy.cfg.server.max_response_bytes;
    // One set of unary-call bounds for all listeners together.
    let limits = Limits::new(&proxy.cfg.limits);
    // After the recorder (Health::start): the layer keeps handles into it.
    let metrics_layer = GrpcMetricsLayer::new();
    let h2 = Http2 {
        max_concurrent_streams: proxy.cfg.server.max_concurrent_streams,
        connection_window_bytes: proxy.cfg.server.connection_window_bytes,
        streams_per_turn: proxy.cfg.server.connection_streams_per_turn,
        keepalive_interval: Duration::from_millis(proxy.cfg.limits.http2_keepalive_interval_ms),
        keepalive_timeout: Duration::from_millis(proxy.cfg.limits.http2_keepalive_timeout_ms),
    };
    for (((listener, l), scope), tls) in listeners.into_iter().zip(proxy.cfg.listeners.iter()).zip(scopes).zip(tls) {
        addrs.push(l.addr);
        tracing::info!(addr = %l.addr, static_tenant = ?l.static_tenant, tls = l.is_tls(), mtls = l.client_cert_auth, "listening");
        macro_rules! svc {
            ($server:ident, $svc:expr) => {
                $server::new($svc).max_decoding_message_size(max_in).max_encoding_message_size(max_out)
            };
        }
        let routes = Routes::new(svc!(KvServer, KvService::new(proxy.clone(), scope.clone())))
            .add_service(svc!(LeaseServer, LeaseService::new(proxy.clone(), scope.clone())))
            .add_service(svc!(MaintenanceServer, MaintenanceService::new(proxy.clone(), scope.clone())))
            .add_service(svc!(ClusterServer, ClusterService::new(proxy.clone(), scope.clone())))
            .add_service(health.grpc_service())
            .prepare();
        // Outermost: a call refused by the limits has a span and a request id too.
        let stack = ServiceBuilder::new()
            .layer(CallSpanLayer)
            .layer(metrics_layer.clone())
            .layer(LimitsLayer::new(limits.clone()))
            .service(WatchFirst::new(WatchService::new(proxy.clone(), scope.clone(), hub.clone()), routes));
        let stop = stop_accepting.clone();
        // Without TCP_NODELAY, Nagle's algorithm adds ~40 ms to small responses
        // (found by apiload).
        let incoming = Backoff::new(TcpIncoming::from(listener).with_nodelay(Some(true)));
        let served = match tls {
            Some((tls, reloader)) => {
                reloader.spawn(&proxy.tasks, reload_every);
                let max = proxy.cfg.server.tls_max_handshakes;
                let incoming = TlsIncoming::new(incoming, tls, proxy.tasks.clone(), handshake_timeout, max);
                proxy.tasks.spawn(serve(incoming, stack, h2, stop))
            }
            None => proxy.tasks.spawn(serve(incoming, stack, h2, stop)),
        };
        tasks.push(served);
    }
    Ok(Running { addrs, metrics_addr: health.metrics_addr(), proxy, stop_accepting, listeners: tasks, hub })
}
