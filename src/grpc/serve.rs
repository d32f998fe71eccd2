//! One listener's accept loop and its HTTP/2 connections, on hyper directly.
//!
//! tonic's own server keeps, in the task hyper spawns for every HTTP/2 stream, room
//! for the whole request and the per-connection service until the handler is
//! called (~515 B a stream, most of it for as long as a Watch stream lives). Here the
//! service future is boxed and freed once the response headers are out, so a
//! long-lived stream's task holds little more than its body: with one Watch stream
//! per (project, resource), that is memory per stream times hundreds of thousands.
//!
//! What tonic's server did around the service is kept: HTTP/2 only, the listener's
//! HTTP/2 settings, the connect info that `Request::peer_certs` and the limits read,
//! GOAWAY and drain on shutdown. tonic's server-side timer on `grpc-timeout` is not:
//! every handler bounds its work by the call's deadline itself and answers as etcd
//! does ([`CallCtx`](crate::upstream::CallCtx)), and a client gone past its deadline
//! resets the stream, which drops the call.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::transport::server::Connected;
use tower::{Service, ServiceExt};

use super::paced::{Paced, Turning, Turns};

/// The HTTP/2 settings of a listener's connections.
#[derive(Debug, Clone, Copy)]
pub struct Http2 {
    pub max_concurrent_streams: u32,
    pub connection_window_bytes: u32,
    /// Streams a connection may open per turn of its task ([`Paced`]).
    pub streams_per_turn: usize,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Http2 {
    /// tonic's settings, but for hyper's bound on streams reset for errors of the
    /// client's making (1,024 per connection), which tonic turned off.
    fn builder(&self) -> http2::Builder<TokioExecutor> {
        let mut b = http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .initial_connection_window_size(self.connection_window_bytes)
            .max_concurrent_streams(self.max_concurrent_streams)
            .keep_alive_interval(Some(self.keepalive_interval))
            .keep_alive_timeout(self.keepalive_timeout);
        b
    }
}

/// The gRPC service every connection of a listener serves (the tower stack over the
/// etcd services).
pub trait Grpc:
    Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<S> Grpc for S where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible, Future: Send + 'static>
        + Clone
        + Send
        + 'static
{
}

/// Serves the connections of `incoming` with `svc` until `stop` is cancelled; then
/// stops accepting (the listening socket closes with `incoming`), sends GOAWAY on
/// every connection and returns once they have all closed. Dropping the future
/// (the grace period is over) closes the connections still open.
pub async fn serve<I, IO, E, S>(incoming: I, svc: S, h2: Http2, stop: CancellationToken)
where
    I: Stream<Item = Result<IO, E>>,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    S: Grpc,
{
    let builder = h2.builder();
    let mut conns = JoinSet::new();
    {
        let mut incoming = std::pin::pin!(incoming);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(done) = conns.join_next(), if !conns.is_empty() => log_end(done),
                io = incoming.next() => match io {
                    Some(Ok(io)) => {
                        let conn = connection(io, svc.clone(), builder.clone(), h2.streams_per_turn, stop.clone());
                        conns.spawn(conn);
                    }
                    // Counted and logged where they happen (accept backoff, TLS handshakes).
                    Some(Err(_)) => {}
                    None => break,
                },
            }
        }
    }
    while let Some(done) = conns.join_next().await {
        log_end(done);
    }
}

fn log_end(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(error = %e, "a client connection's task panicked");
        }
    }
}

/// One client connection, until it closes; GOAWAY and drain when `stop` is cancelled.
async fn connection<IO, S>(
    io: IO,
    svc: S,
    builder: http2::Builder<TokioExecutor>,
    streams_per_turn: usize,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    S: Grpc,
{
    let svc = PerConnection { svc, info: io.connect_info() };
    let turns = Turns::default();
    let conn = builder.serve_connection(TokioIo::new(Paced::new(io, turns.clone(), streams_per_turn)), svc);
    let mut conn = std::pin::pin!(Turning::new(turns, conn));
    let end = tokio::select! {
        end = conn.as_mut() => end,
        _ = stop.cancelled() => {
            conn.as_mut().conn().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = end {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

/// A connection's service: the listener's stack, with the connection's info in
/// every request's extensions. Its future is boxed, so that hyper's task for each
/// HTTP/2 stream holds a pointer to it (freed with the answer's headers) instead of
/// room for the whole call.
#[derive(Clone)]
struct PerConnection<S, C> {
    svc: S,
    info: C,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S, C> hyper::service::Service<http::Request<Incoming>> for PerConnection<S, C>
where
    S: Grpc,
    C: Clone + Send + Sync + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn call(&self, req: http::Request<Incoming>) -> BoxFuture {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(self.info.clone());
        Box::pin(self.svc.clone().oneshot(req))
    }
}
