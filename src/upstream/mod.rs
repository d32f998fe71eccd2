//! The upstream etcd: a small, fixed pool of HTTP/2 connections, whatever the tenant
//! or client count, with failover across endpoints and deadline propagation.
//!
//! Each endpoint gets `connections` lazily connected channels; requests go
//! round-robin over the channels of the *current* endpoint. When an endpoint cannot
//! be reached the pool moves to the next one. Reads (and anything else that is safe
//! to repeat) are retried on `UNAVAILABLE` until the deadline; writes are retried
//! only when the connection was never made, since etcd may have applied a write
//! whose answer was lost.
//!
//! When the TLS files change ([`Upstream::reload_tls`]) the pool gets new channels;
//! calls and streams already running keep the channel they were given (a clone), so
//! the hub's upstream watch and keepalive streams are not broken by a rotation.

pub mod body;
pub mod call;
pub mod classify;
pub mod latency;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::metrics::names;
use body::WholeBody;
pub use call::{parse_grpc_timeout, CallCtx, Retry, StreamCtx, REQUIRE_LEADER};
use classify::{Failure, UpstreamError};
use latency::Latency;
pub use latency::Method;

/// Attempts of one call per configured endpoint (plus two), when its failures may be retried.
const MAX_ATTEMPTS_PER_ENDPOINT: u32 = 2;

use crate::certs::{BoxError, Checked, TlsPaths};
use crate::config::{Config, UpstreamConfig};
use crate::pb::etcdserverpb::{
    cluster_client::ClusterClient, kv_client::KvClient, lease_client::LeaseClient,
    maintenance_client::MaintenanceClient, watch_client::WatchClient,
};

/// Defines `$name(ctx, retry, req, f)`: one call on a `$client` with retries, where
/// `f` gets the client and the outgoing request (deadline and metadata set).
macro_rules! unary_calls {
    ($($(#[$doc:meta])* $name:ident => $client:ident;)*) => {$(
        $(#[$doc])*
        pub async fn $name<Req, Resp, F, Fut>(&self, ctx: &CallCtx, retry: Retry, req: &Req, f: F) -> Result<Resp, UpstreamError>
        where
            Req: Clone + Method,
            F: Fn($client<Unary>, Request<Req>) -> Fut,
            Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
        {
            let start = std::time::Instant::now();
            let out = self.call(ctx, retry, |ch| {
                let client = $client::new(WholeBody::new(ch))
                    .max_decoding_message_size(self.max_message)
                    .max_encoding_message_size(self.max_message);
                f(client, ctx.request(req.clone()))
            })
            .await;
            self.latency.record::<Req>(start.elapsed());
            out
        }
    )*};
}

/// The channel unary calls go through: each request in two HTTP/2 frames ([`body`]).
pub type Unary = WholeBody<Channel>;

/// The files of TLS towards etcd from `[upstream]` (validated: a CA whenever TLS is
/// used, cert and key together); `None` without a CA.
fn tls_paths(u: &UpstreamConfig) -> Option<TlsPaths> {
    let ca = u.cacert.clone()?;
    Some(TlsPaths { cert: u.cert.clone(), key: u.key.clone(), ca: Some(ca) })
}

/// tonic's TLS settings from checked files.
fn client_tls(u: &UpstreamConfig, c: &Checked) -> ClientTlsConfig {
    let mut tls = ClientTlsConfig::new();
    if let Some(ca) = &c.files.ca {
        tls = tls.ca_certificate(Certificate::from_pem(&ca.data));
    }
    if let (Some(cert), Some(key), Some(_)) = (&c.files.cert, &c.files.key, &c.identity) {
        tls = tls.identity(Identity::from_pem(&cert.data, &key.data));
    }
    if let Some(name) = &u.server_name {
        tls = tls.domain_name(name.clone());
    }
    tls
}

/// `connections` channels to each endpoint of `u`, with `tls` for https:// ones.
fn channels(cfg: &Config, tls: Option<&ClientTlsConfig>) -> Result<Vec<Vec<Channel>>, BoxError> {
    let u = &cfg.upstream;
    let mut endpoints = Vec::new();
    for url in &u.endpoints {
        let mut ep = Endpoint::from_shared(url.clone())?
            .connect_timeout(cfg.connect_timeout())
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_millis(u.keepalive_interval_ms))
            .keep_alive_timeout(Duration::from_millis(u.keepalive_interval_ms))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(Some(4 * 1024 * 1024))
            .initial_connection_window_size(Some(16 * 1024 * 1024));
        if let (true, Some(tls)) = (url.starts_with("https://"), tls) {
            ep = ep.tls_config(tls.clone())?;
        }
        // Separate Endpoint::connect_lazy calls give separate HTTP/2 connections.
        endpoints.push((0..u.connections).map(|_| ep.connect_lazy()).collect());
    }
    Ok(endpoints)
}

/// The pool's TLS: where its files are, and those its channels were built from.
struct Tls {
    paths: TlsPaths,
    serving: Checked,
}

/// The pool of upstream connections.
pub struct Upstream {
    /// `endpoints[i]` holds the channels to endpoint `i`; replaced whole when the
    /// TLS files change (callers hold clones of the channels they use).
    endpoints: RwLock<Vec<Vec<Channel>>>,
    urls: Vec<String>,
    /// What new channels are built from: `[upstream]` and the connect timeout.
    cfg: Config,
    tls: Option<Tls>,
    current: AtomicUsize,
    next: AtomicUsize,
    max_message: usize,
    latency: Latency,
}

impl Upstream {
    pub fn new(cfg: &Config) -> Result<Upstream, BoxError> {
        let tls = match tls_paths(&cfg.upstream) {
            Some(paths) => Some(Tls { serving: paths.read()?.check()?, paths }),
            None => None,
        };
        let endpoints = channels(cfg, tls.as_ref().map(|t| client_tls(&cfg.upstream, &t.serving)).as_ref())?;
        metrics::gauge!(names::UPSTREAM_CONNECTIONS).set((cfg.upstream.connections) as f64);
        Ok(Upstream {
            endpoints: RwLock::new(endpoints),
            urls: cfg.upstream.endpoints.clone(),
            cfg: cfg.clone(),
            tls,
            current: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            max_message: cfg.server.max_response_bytes.max(cfg.server.max_request_bytes),
            latency: Latency::default(),
        })
    }

    /// The TLS files towards etcd and the checked contents the pool was built from
    /// at start (for the reloader); `None` without TLS.
    pub fn tls_files(&self) -> Option<(&TlsPaths, &Checked)> {
        self.tls.as_ref().map(|t| (&t.paths, &t.serving))
    }

    /// New channels with the TLS of `files` for every call from now on. Calls and
    /// streams in progress keep theirs; an old connection closes when the last of
    /// them ends. Failover state (the current endpoint) is kept.
    pub fn reload_tls(&self, files: &Checked) -> Result<(), BoxError> {
        let endpoints = channels(&self.cfg, Some(&client_tls(&self.cfg.upstream, files)))?;
        *self.endpoints.write().unwrap_or_else(|p| p.into_inner()) = endpoints;
        Ok(())
    }

    /// A channel for a streaming call, and its endpoint: report the stream's errors
    /// with [`Upstream::report`] so that a dead endpoint is left for the next one.
    pub fn stream_channel(&self) -> (usize, Channel) {
        self.channel_at(self.current.load(Ordering::Relaxed))
    }

    /// Tells the pool that a call on endpoint `ep` failed with `status`.
    pub fn report(&self, ep: usize, status: &Status) {
        if Failure::of(status).fails_over() {
            self.fail_over(ep);
        }
    }

    fn channel_at(&self, endpoint: usize) -> (usize, Channel) {
        let endpoints = self.endpoints.read().unwrap_or_else(|p| p.into_inner());
        let ep = endpoint % endpoints.len();
        let conns = &endpoints[ep];
        let i = self.next.fetch_add(1, Ordering::Relaxed) % conns.len();
        (ep, conns[i].clone())
    }

    pub fn kv(&self, ch: Channel) -> KvClient<Channel> {
        KvClient::new(ch).max_decoding_message_size(self.max_message).max_encoding_message_size(self.max_message)
    }

    pub fn lease(&self, ch: Channel) -> LeaseClient<Channel> {
        LeaseClient::new(ch).max_decoding_message_size(self.max_message).max_encoding_message_size(self.max_message)
    }

    pub fn maintenance(&self, ch: Channel) -> MaintenanceClient<Channel> {
        MaintenanceClient::new(ch)
            .max_decoding_message_size(self.max_message)
            .max_encoding_message_size(self.max_message)
    }

    pub fn cluster(&self, ch: Channel) -> ClusterClient<Channel> {
        ClusterClient::new(ch).max_decoding_message_size(self.max_message).max_encoding_message_size(self.max_message)
    }

    pub fn watch(&self, ch: Channel) -> WatchClient<Channel> {
        WatchClient::new(ch).max_decoding_message_size(self.max_message).max_encoding_message_size(self.max_message)
    }

    unary_calls! {
        /// One KV call with retries: `f` gets a client and the outgoing request.
        kv_call => KvClient;
        /// One Lease call with retries.
        lease_call => LeaseClient;
        /// One Maintenance call with retries.
        maintenance_call => MaintenanceClient;
        /// One Cluster call with retries.
        cluster_call => ClusterClient;
    }

    /// Runs `f` against a channel, with the deadline of `ctx`, retrying as `retry`
    /// allows and failing over to the next endpoint when one is unreachable.
    pub async fn call<T, F, Fut>(&self, ctx: &CallCtx, retry: Retry, mut f: F) -> Result<T, UpstreamError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut attempt = 0u32;
        loop {
            let (ep, ch) = self.channel_at(self.current.load(Ordering::Relaxed));
            let res = match tokio::time::timeout_at(ctx.deadline, f(ch)).await {
                Ok(r) => r,
                Err(_) => return Err(UpstreamError::deadline()),
            };
            let err = match res {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(s) => UpstreamError::new(s),
            };
            let failure = err.failure();
            // tonic's own timer (from the propagated grpc-timeout) can fire first: its
            // CANCELLED "Timeout expired" is answered as etcd answers a missed deadline.
            if failure == Failure::Deadline {
                return Err(UpstreamError::deadline());
            }
            if failure.fails_over() {
                self.fail_over(ep);
            }
            attempt += 1;
            if !failure.may_retry(retry) || attempt >= MAX_ATTEMPTS_PER_ENDPOINT * self.urls.len() as u32 + 2 {
                metrics::counter!(names::UPSTREAM_ERRORS, "code" => format!("{:?}", err.status().code())).increment(1);
                return Err(err);
            }
            metrics::counter!(names::UPSTREAM_RETRIES).increment(1);
            let backoff = Duration::from_millis(25u64 << attempt.min(5));
            if Instant::now() + backoff >= ctx.deadline {
                return Err(err);
            }
            tokio::time::sleep(backoff).await;
        }
    }

    /// Moves the pool off endpoint `failed` (unless another caller already did).
    fn fail_over(&self, failed: usize) {
        let n = self.urls.len();
        if n > 1
            && self.current.compare_exchange(failed, (failed + 1) % n, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            tracing::warn!(from = %self.urls[failed], to = %self.urls[(failed + 1) % n], "upstream endpoint unreachable, failing over");
            metrics::counter!(names::UPSTREAM_FAILOVERS).increment(1);
        }
    }
}
