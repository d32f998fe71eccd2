//! Builds the gRPC servers, one per listener, and runs them until shutdown.
//!
//! Shutdown follows mini-redis: one broadcast signal that every listener task
//! watches; [`Running::shutdown`] sends it and waits, and dropping [`Running`] sends
//! it too, so a test that panics still stops its server.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use super::accept::Backoff;
use super::cluster::ClusterService;
use super::kv::KvService;
use super::layer::GrpcMetricsLayer;
use super::lease::LeaseService;
use super::maintenance::MaintenanceService;
use super::watch::WatchService;
use crate::config::Config;
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{
    cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use crate::watch::Hub;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long shutdown waits for open streams before closing them.
const DRAIN: Duration = Duration::from_secs(5);

/// A running etcdmux.
pub struct Running {
    /// Bound address of each configured listener, in order.
    pub addrs: Vec<SocketAddr>,
    shutdown: broadcast::Sender<()>,
    tasks: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
    /// The watch hub's tasks: stopped with the server.
    background: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets open calls finish (up to a few seconds), and waits.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(());
        for t in &self.background {
            t.abort();
        }
        for task in self.tasks.drain(..) {
            let abort = task.abort_handle();
            if tokio::time::timeout(DRAIN, task).await.is_err() {
                abort.abort();
            }
        }
    }

    /// Waits until every listener stops (after a shutdown, or on a fatal error).
    pub async fn wait(&mut self) -> Result<(), BoxError> {
        for task in self.tasks.drain(..) {
            task.await??;
        }
        Ok(())
    }

    /// A handle that triggers shutdown from elsewhere (a signal handler).
    pub fn shutdown_handle(&self) -> broadcast::Sender<()> {
        self.shutdown.clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.shutdown.send(());
        for t in &self.background {
            t.abort();
        }
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
    let proxy = Proxy::new(cfg)?;
    let hub = Hub::new(&proxy.cfg.watch, proxy.layout.clone());
    let background = hub.start(proxy.clone());
    let (shutdown, _) = broadcast::channel(1);
    let mut addrs = Vec::new();
    let mut tasks = Vec::new();
    let max_in = proxy.cfg.server.max_request_bytes;
    let max_out = proxy.cfg.server.max_response_bytes;
    for (listener, l) in listeners.into_iter().zip(proxy.cfg.listeners.iter()) {
        let scope = proxy.resolver.scope(l.static_tenant.as_deref())?;
        addrs.push(l.addr);
        tracing::info!(addr = %l.addr, static_tenant = ?l.static_tenant, "listening");
        macro_rules! svc {
            ($server:ident, $svc:expr) => {
                $server::new($svc).max_decoding_message_size(max_in).max_encoding_message_size(max_out)
            };
        }
        let router = Server::builder()
            .layer(GrpcMetricsLayer)
            .max_concurrent_streams(proxy.cfg.server.max_concurrent_streams)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .tcp_nodelay(true)
            .add_service(svc!(KvServer, KvService::new(proxy.clone(), scope.clone())))
            .add_service(svc!(LeaseServer, LeaseService::new(proxy.clone(), scope.clone())))
            .add_service(svc!(WatchServer, WatchService::new(proxy.clone(), scope.clone(), hub.clone())))
            .add_service(svc!(MaintenanceServer, MaintenanceService::new(proxy.clone(), scope.clone())))
            .add_service(svc!(ClusterServer, ClusterService::new(proxy.clone(), scope.clone())));
        let mut stop = shutdown.subscribe();
        // Server::tcp_nodelay applies only to sockets tonic binds itself: without it
        // here, Nagle's algorithm adds ~40 ms to small responses (found by apiload).
        let incoming = Backoff::new(TcpIncoming::from(listener).with_nodelay(Some(true)));
        tasks.push(tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.recv().await;
        })));
    }
    Ok(Running { addrs, shutdown, tasks, background })
}
