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

#[derive(Debug, Default)]
struct Counts {
    global: usize,
    per_conn: HashMap<ConnKey, usize>,
}

/// The bounds and what is in progress, shared by every listener.
#[derive(Debug)]
pub struct Limits {
    max_global: usize,
    max_conn: usize,
    counts: Mutex<Counts>,
}

impl Limits {
    pub fn new(cfg: &LimitsConfig) -> Arc<Limits> {
        Arc::new(Limits {
            max_global: cfg.max_unary_inflight,
            max_conn: cfg.max_unary_inflight_per_connection,
            counts: Mutex::default(),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A permit for one unary call on `conn`, or the scope of the bound it would pass.
    fn try_acquire(self: &Arc<Self>, conn: Option<ConnKey>) -> Result<Permit, &'static str> {
        let mut c = self.counts();
        if c.global >= self.max_global {
            return Err("global");
        }
        if let Some(k) = conn {
            let n = c.per_conn.entry(k).or_insert(0);
            if *n >= self.max_conn {
                return Err("connection");
            }
            *n += 1;
        }
        c.global += 1;
        Ok(Permit { limits: self.clone(), conn })
    }

    /// Unary calls in progress (for tests).
    pub fn in_progress(&self) -> usize {
        self.counts().global
    }
}

/// One unary call counted until it is answered or dropped.
struct Permit {
    limits: Arc<Limits>,
    conn: Option<ConnKey>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = self.limits.counts();
        c.global = c.global.saturating_sub(1);
        if let Some(k) = self.conn {
            if let Some(n) = c.per_conn.get_mut(&k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.per_conn.remove(&k);
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
        assert!(limits.counts().per_conn.is_empty(), "no entry outlives its calls");
        assert!(matches!(svc.call(request(RANGE, 1)), Either::Left(_)));
    }
}
