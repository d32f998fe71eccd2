//! The upstream etcd: a small, fixed pool of HTTP/2 connections, whatever the tenant
//! or client count, with failover across endpoints and deadline propagation.
//!
//! Each endpoint gets `connections` lazily connected channels; requests go
//! round-robin over the channels of the *current* endpoint. When an endpoint cannot
//! be reached the pool moves to the next one. Reads (and anything else that is safe
//! to repeat) are retried on `UNAVAILABLE` until the deadline; writes are retried
//! only when the connection was never made, since etcd may have applied a write
//! whose answer was lost.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::config::Config;
use crate::pb::etcdserverpb::{
    cluster_client::ClusterClient, kv_client::KvClient, lease_client::LeaseClient,
    maintenance_client::MaintenanceClient, watch_client::WatchClient,
};

/// etcd's metadata key asking that a request fail when the cluster has no leader.
pub const REQUIRE_LEADER: &str = "hasleader";

/// Whether a call may be sent again after an ambiguous failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Reads, status, keepalive-free calls: repeat on any `UNAVAILABLE`.
    Safe,
    /// Writes: repeat only when the connection was never established.
    OnlyUnsent,
}

/// What travels with one client request to etcd: its deadline and the metadata
/// etcd acts on.
#[derive(Debug, Clone)]
pub struct CallCtx {
    pub deadline: Instant,
    pub require_leader: bool,
}

impl CallCtx {
    /// Takes the client's `grpc-timeout` (or the configured default) and
    /// `hasleader` from an incoming request.
    pub fn from_request<T>(req: &Request<T>, default_timeout: Duration) -> CallCtx {
        Self::from_metadata(req.metadata(), default_timeout)
    }

    pub fn from_metadata(md: &tonic::metadata::MetadataMap, default_timeout: Duration) -> CallCtx {
        let timeout = md
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .unwrap_or(default_timeout);
        let require_leader = md.get(REQUIRE_LEADER).is_some();
        CallCtx { deadline: Instant::now() + timeout, require_leader }
    }

    /// An outgoing request carrying the remaining deadline and `hasleader`.
    pub fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.set_timeout(self.deadline.saturating_duration_since(Instant::now()));
        if self.require_leader {
            req.metadata_mut().insert(REQUIRE_LEADER, MetadataValue::from_static("true"));
        }
        req
    }
}

/// Parses gRPC's `grpc-timeout` header: up to 8 digits and a unit (H M S m u n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Defines `$name(ctx, retry, req, f)`: one call on a `$client` with retries, where
/// `f` gets the client and the outgoing request (deadline and metadata set).
macro_rules! unary_calls {
    ($($(#[$doc:meta])* $name:ident => $make:ident, $client:ident;)*) => {$(
        $(#[$doc])*
        pub async fn $name<Req, Resp, F, Fut>(&self, ctx: &CallCtx, retry: Retry, req: &Req, f: F) -> Result<Resp, Status>
        where
            Req: Clone,
            F: Fn($client<Channel>, Request<Req>) -> Fut,
            Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
        {
            self.call(ctx, retry, |ch| f(self.$make(ch), ctx.request(req.clone()))).await
        }
    )*};
}

/// The pool of upstream connections.
pub struct Upstream {
    /// `endpoints[i]` holds the channels to endpoint `i`.
    endpoints: Vec<Vec<Channel>>,
    urls: Vec<String>,
    current: AtomicUsize,
    next: AtomicUsize,
    max_message: usize,
}

impl Upstream {
    pub fn new(cfg: &Config) -> Result<Upstream, tonic::transport::Error> {
        let mut endpoints = Vec::new();
        for url in &cfg.upstream.endpoints {
            let ep = Endpoint::from_shared(url.clone())?
                .connect_timeout(cfg.connect_timeout())
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_millis(cfg.upstream.keepalive_interval_ms))
                .keep_alive_timeout(Duration::from_millis(cfg.upstream.keepalive_interval_ms))
                .keep_alive_while_idle(true)
                .initial_stream_window_size(Some(4 * 1024 * 1024))
                .initial_connection_window_size(Some(16 * 1024 * 1024));
            // Separate Endpoint::connect_lazy calls give separate HTTP/2 connections.
            endpoints.push((0..cfg.upstream.connections).map(|_| ep.connect_lazy()).collect());
        }
        metrics::gauge!("etcdmux_upstream_connections").set((cfg.upstream.connections) as f64);
        Ok(Upstream {
            endpoints,
            urls: cfg.upstream.endpoints.clone(),
            current: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            max_message: cfg.server.max_response_bytes.max(cfg.server.max_request_bytes),
        })
    }

    /// A channel for a streaming call, and its endpoint: report the stream's errors
    /// with [`Upstream::report`] so that a dead endpoint is left for the next one.
    pub fn stream_channel(&self) -> (usize, Channel) {
        self.channel_at(self.current.load(Ordering::Relaxed))
    }

    /// Tells the pool that a call on endpoint `ep` failed with `status`.
    pub fn report(&self, ep: usize, status: &Status) {
        if is_connect_error(status) || is_transport_error(status) {
            self.fail_over(ep);
        }
    }

    fn channel_at(&self, endpoint: usize) -> (usize, Channel) {
        let ep = endpoint % self.endpoints.len();
        let conns = &self.endpoints[ep];
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
        kv_call => kv, KvClient;
        /// One Lease call with retries.
        lease_call => lease, LeaseClient;
        /// One Maintenance call with retries.
        maintenance_call => maintenance, MaintenanceClient;
        /// One Cluster call with retries.
        cluster_call => cluster, ClusterClient;
    }

    /// Runs `f` against a channel, with the deadline of `ctx`, retrying as `retry`
    /// allows and failing over to the next endpoint when one is unreachable.
    pub async fn call<T, F, Fut>(&self, ctx: &CallCtx, retry: Retry, mut f: F) -> Result<T, Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut attempt = 0u32;
        loop {
            let (ep, ch) = self.channel_at(self.current.load(Ordering::Relaxed));
            let res = match tokio::time::timeout_at(ctx.deadline, f(ch)).await {
                Ok(r) => r,
                Err(_) => return Err(deadline_exceeded()),
            };
            let status = match res {
                Ok(resp) => return Ok(resp.into_inner()),
                // tonic's own timer (from the propagated grpc-timeout) can fire first.
                Err(s) if s.code() == Code::Cancelled && Instant::now() >= ctx.deadline => {
                    return Err(deadline_exceeded())
                }
                Err(s) => s,
            };
            let unsent = is_connect_error(&status);
            let dropped = is_transport_error(&status);
            if unsent || dropped {
                self.fail_over(ep);
            }
            let retryable = match retry {
                Retry::Safe => status.code() == Code::Unavailable || dropped,
                Retry::OnlyUnsent => unsent,
            };
            attempt += 1;
            if !retryable || attempt > 2 * self.endpoints.len() as u32 + 2 {
                metrics::counter!("etcdmux_upstream_errors_total", "code" => format!("{:?}", status.code()))
                    .increment(1);
                return Err(status);
            }
            metrics::counter!("etcdmux_upstream_retries_total").increment(1);
            let backoff = Duration::from_millis(25u64 << attempt.min(5));
            if Instant::now() + backoff >= ctx.deadline {
                return Err(status);
            }
            tokio::time::sleep(backoff).await;
        }
    }

    /// Moves the pool off endpoint `failed` (unless another caller already did).
    fn fail_over(&self, failed: usize) {
        let n = self.endpoints.len();
        if n > 1
            && self.current.compare_exchange(failed, (failed + 1) % n, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            tracing::warn!(from = %self.urls[failed], to = %self.urls[(failed + 1) % n], "upstream endpoint unreachable, failing over");
            metrics::counter!("etcdmux_upstream_failovers_total").increment(1);
        }
    }
}

/// etcd's answer to a missed deadline, as its clients see it.
fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("context deadline exceeded")
}

/// A connection that broke under a call (tonic reports UNKNOWN or CANCELLED): the
/// request may or may not have reached etcd.
fn is_transport_error(s: &Status) -> bool {
    match s.code() {
        Code::Unknown | Code::Unavailable => s.message().contains("transport error"),
        // hyper cancels calls in flight on a connection that closed.
        Code::Cancelled => s.message().contains("operation was canceled"),
        _ => false,
    }
}

/// A transport failure before the request reached etcd (refused, unreachable).
fn is_connect_error(s: &Status) -> bool {
    if s.code() != Code::Unavailable {
        return false;
    }
    let mut text = s.message().to_ascii_lowercase();
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        text.push(' ');
        text.push_str(&e.to_string().to_ascii_lowercase());
        src = e.source();
    }
    text.contains("connect") || text.contains("connection refused")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
    }
}
