//! Load shedding for unary calls (`[limits]`): at most `max_unary_inflight` in
//! progress over all listeners and `max_unary_inflight_per_connection` on one client
//! connection. A call beyond either bound is answered at once with etcd's
//! `RESOURCE_EXHAUSTED` "etcdserver: too many requests", never queued. Streams
//! (Watch, LeaseKeepAlive, Snapshot, health Watch) are not counted.
//!
//! tonic builds the layered service once per listener and clones it per connection
//! and per request, so a layer instance cannot tell connections apart: a connection
//! is known by its addresses (tonic's connect-info extension), counted in one
//! shared table whose entries live only while that connection has calls in progress.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::future::{Either, Ready};
use pin_project_lite::pin_project;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use crate::config::LimitsConfig;
use crate::metrics::names;

/// etcd's answer when it is overloaded (`ErrGRPCTooManyRequests`).
pub const TOO_MANY_REQUESTS: &str = "etcdserver: too many requests";

/// Streaming methods: long-lived, so not unary calls in progress.
fn is_stream(path: &str) -> bool {
    matches!(
        path,
        "/etcdserverpb.Watch/Watch"
            | "/etcdserverpb.Lease/LeaseKeepAlive"
            | "/etcdserverpb.Maintenance/Snapshot"
            | "/grpc.health.v1.Health/Watch"
    )
}

/// One client connection: (local, remote) address.
type ConnKey = (Option<SocketAddr>, Option<SocketAddr>);

/// Shards of the per-connection table: calls on different connections rarely take
/// the same lock (one process-wide lock per call was the alternative).
const SHARDS: usize = 16;

/// The bounds and what is in progress, shared by every listener. The global count is
/// an atomic; the per-connection counts live in [`SHARDS`] tables by remote port.
#[derive(Debug)]
pub struct Limits {
    max_global: usize,
    max_conn: usize,
    global: AtomicUsize,
    per_conn: [Mutex<HashMap<ConnKey, usize>>; SHARDS],
}

impl Limits {
    pub fn new(cfg: &LimitsConfig) -> Arc<Limits> {
        Arc::new(Limits {
            max_global: cfg.max_unary_inflight,
            max_conn: cfg.max_unary_inflight_per_connection,
            global: AtomicUsize::new(0),
            per_conn: std::array::from_fn(|_| Mutex::default()),
        })
    }

    fn shard(&self, k: &ConnKey) -> std::sync::MutexGuard<'_, HashMap<ConnKey, usize>> {
        let port = k.1.map_or(0, |a| a.port()) as usize;
        self.per_conn[port % SHARDS].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A permit for one unary call on `conn`, or the scope of the bound it would pass.
    fn try_acquire(self: &Arc<Self>, conn: Option<ConnKey>) -> Result<Permit, &'static str> {
        // Taken first and given back on refusal: the bound is never passed, though a
        // call racing a refused one may see the count one too high for a moment.
        if self.global.fetch_add(1, Ordering::AcqRel) >= self.max_global {
            self.global.fetch_sub(1, Ordering::AcqRel);
            return Err("global");
        }
        if let Some(k) = conn {
            let mut shard = self.shard(&k);
            let n = shard.entry(k).or_insert(0);
            if *n >= self.max_conn {
                drop(shard);
                self.global.fetch_sub(1, Ordering::AcqRel);
                return Err("connection");
            }
            *n += 1;
        }
        Ok(Permit { limits: self.clone(), conn })
    }

    /// Unary calls in progress (for tests).
    pub fn in_progress(&self) -> usize {
        self.global.load(Ordering::Acquire)
    }

    /// Connections with calls in progress (for tests).
    #[cfg(test)]
    fn connections(&self) -> usize {
        self.per_conn.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len()).sum()
    }
}

/// One unary call counted until it is answered or dropped.
struct Permit {
    limits: Arc<Limits>,
    conn: Option<ConnKey>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limits.global.fetch_sub(1, Ordering::AcqRel);
        if let Some(k) = self.conn {
            let mut shard = self.limits.shard(&k);
            if let Some(n) = shard.get_mut(&k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    shard.remove(&k);
                }
            }
        }
    }
}

/// The connection a request came on, from tonic's connect info (plain or TLS).
fn conn_key<B>(req: &http::Request<B>) -> Option<ConnKey> {
    let ext = req.extensions();
    let tcp =
        ext.get::<TcpConnectInfo>().or_else(|| ext.get::<TlsConnectInfo<TcpConnectInfo>>().map(|t| t.get_ref()))?;
    Some((tcp.local_addr, tcp.remote_addr))
}

#[derive(Debug, Clone)]
pub struct LimitsLayer {
    limits: Arc<Limits>,
}

impl LimitsLayer {
    pub fn new(limits: Arc<Limits>) -> LimitsLayer {
        LimitsLayer { limits }
    }
}

impl<S> Layer<S> for LimitsLayer {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Limited { inner, limits: self.limits.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct Limited<S> {
    inner: S,
    limits: Arc<Limits>,
}

impl<S, B, RB> Service<http::Request<B>> for Limited<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Held<S::Future>, Ready<Result<http::Response<RB>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if is_stream(req.uri().path()) {
            return Either::Left(Held { inner: self.inner.call(req), permit: None });
        }
        match self.limits.try_acquire(conn_key(&req)) {
            Ok(permit) => Either::Left(Held { inner: self.inner.call(req), permit: Some(permit) }),
            Err(scope) => {
                metrics::counter!(names::OVERLOAD_REJECTIONS, "scope" => scope).increment(1);
                let answer = tonic::Status::resource_exhausted(TOO_MANY_REQUESTS).into_http();
                Either::Right(futures::future::ready(Ok(answer)))
            }
        }
    }
}

pin_project! {
    /// A call's future holding its permit until it is answered.
    pub struct Held<F> {
        #[pin]
        inner: F,
        permit: Option<Permit>,
    }
}

impl<F: Future> Future for Held<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        this.permit.take();
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    use tower::service_fn;

    fn request(path: &'static str, remote: u16) -> http::Request<()> {
        let mut req = http::Request::new(());
        *req.uri_mut() = http::Uri::from_static(path);
        let info = TcpConnectInfo {
            local_addr: Some(SocketAddr::from(([127, 0, 0, 1], 2379))),
            remote_addr: Some(SocketAddr::from(([127, 0, 0, 1], remote))),
        };
        req.extensions_mut().insert(info);
        req
    }

    fn code(resp: &http::Response<()>) -> Option<&str> {
        resp.headers().get("grpc-status").and_then(|v| v.to_str().ok())
    }

    #[test]
    fn sheds_beyond_the_bounds_at_once_and_recovers() {
        let cfg = LimitsConfig { max_unary_inflight: 3, max_unary_inflight_per_connection: 2, ..Default::default() };
        let limits = Limits::new(&cfg);
        let never = service_fn(|_: http::Request<()>| std::future::pending::<Result<http::Response<()>, Infallible>>());
        let mut svc = LimitsLayer::new(limits.clone()).layer(never);
        const RANGE: &str = "/etcdserverpb.KV/Range";
        let a1 = svc.call(request(RANGE, 1));
        let a2 = svc.call(request(RANGE, 1));
        // The third on connection 1 is refused; connection 2 still gets through.
        let Either::Right(refused) = svc.call(request(RANGE, 1)) else { panic!("not shed per connection") };
        let resp = futures::executor::block_on(refused).expect("an answer");
        assert_eq!(code(&resp), Some("8"));
        let message = resp.headers().get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(message.contains("too") && message.contains("requests"), "{message}");
        let b1 = svc.call(request(RANGE, 2));
        assert_eq!(limits.in_progress(), 3);
        // The global bound now refuses connection 3; streams are not counted.
        assert!(matches!(svc.call(request(RANGE, 3)), Either::Right(_)), "not shed globally");
        assert!(matches!(svc.call(request("/etcdserverpb.Watch/Watch", 3)), Either::Left(_)));
        drop((a1, a2, b1));
        assert_eq!(limits.in_progress(), 0);
        assert_eq!(limits.connections(), 0, "no entry outlives its calls");
        assert!(matches!(svc.call(request(RANGE, 1)), Either::Left(_)));
    }

    /// Calls on many threads at once: the global bound is never passed, and every
    /// count goes back to zero.
    #[test]
    fn concurrent_calls_never_pass_the_bounds_and_leave_nothing_behind() {
        let cfg = LimitsConfig { max_unary_inflight: 8, max_unary_inflight_per_connection: 3, ..Default::default() };
        let limits = Limits::new(&cfg);
        let threads: Vec<_> = (0..8u16)
            .map(|t| {
                let limits = limits.clone();
                std::thread::spawn(move || {
                    let (mut granted, mut most) = (0, 0);
                    for i in 0..20_000u16 {
                        let remote = SocketAddr::from(([127, 0, 0, 1], 1000 + (t * 7 + i) % 5));
                        if let Ok(p) = limits.try_acquire(Some((None, Some(remote)))) {
                            granted += 1;
                            most = most.max(limits.in_progress());
                            drop(p);
                        }
                    }
                    (granted, most)
                })
            })
            .collect();
        for t in threads {
            let (granted, most) = t.join().expect("a thread");
            assert!(granted > 0);
            assert!(most <= 8, "{most} calls in progress with a bound of 8");
        }
        assert_eq!(limits.in_progress(), 0);
        assert_eq!(limits.connections(), 0);
    }
}
