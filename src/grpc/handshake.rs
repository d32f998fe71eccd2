//! TLS handshakes of a listener's accepted connections, off the accept loop.
//!
//! Each handshake runs as its own task (owned by [`Tasks`]) with the listener's
//! current config ([`ServerTls::current`], so a rotated certificate applies from the
//! next handshake), bounded in time by `server.tls_handshake_timeout_ms`: a client
//! that opens a connection and sends nothing is dropped then. At most
//! `server.tls_max_handshakes` run at once per listener; beyond that no connection
//! is accepted until one ends (they wait in the kernel's backlog). A failed
//! handshake is counted and logged at debug level, and accepting goes on.
//!
//! The stream yields `tokio_rustls`'s `TlsStream`, for which tonic provides the
//! connect info that `Request::peer_certs` reads (identity from the client
//! certificate) and that `grpc::limits` knows connections by.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::tls::ServerTls;
use crate::metrics::names;
use crate::shutdown::Tasks;

/// Handshakes in progress on every listener (the gauge's value).
static IN_PROGRESS: AtomicUsize = AtomicUsize::new(0);

type Handshake = JoinHandle<Option<Result<TlsStream<TcpStream>, &'static str>>>;

/// Accepted TCP connections in, connections after a good TLS handshake out.
pub struct TlsIncoming<S> {
    tcp: S,
    tcp_done: bool,
    tls: ServerTls,
    tasks: Tasks,
    timeout: Duration,
    max: usize,
    handshakes: FuturesUnordered<Handshake>,
}

impl<S> TlsIncoming<S> {
    pub fn new(tcp: S, tls: ServerTls, tasks: Tasks, timeout: Duration, max: usize) -> TlsIncoming<S> {
        TlsIncoming { tcp, tcp_done: false, tls, tasks, timeout, max, handshakes: FuturesUnordered::new() }
    }

    fn start(&mut self, tcp: TcpStream) {
        let acceptor = TlsAcceptor::from(self.tls.current());
        let timeout = self.timeout;
        let gauge = InProgress::new();
        self.handshakes.push(self.tasks.spawn_until_shutdown(async move {
            let _gauge = gauge;
            match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => Ok(tls),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake with a client failed");
                    Err("tls")
                }
                Err(_) => {
                    tracing::debug!(?timeout, "TLS handshake with a client timed out");
                    Err("timeout")
                }
            }
        }));
    }
}

impl<S> Stream for TlsIncoming<S>
where
    S: Stream<Item = std::io::Result<TcpStream>> + Unpin,
{
    type Item = std::io::Result<TlsStream<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            // Finished handshakes first: they free room for more.
            while let Poll::Ready(Some(done)) = self.handshakes.poll_next_unpin(cx) {
                match done {
                    Ok(Some(Ok(tls))) => return Poll::Ready(Some(Ok(tls))),
                    Ok(Some(Err(reason))) => {
                        metrics::counter!(names::TLS_HANDSHAKE_FAILURES, "reason" => reason).increment(1);
                    }
                    // Shutdown dropped it, or it panicked: nothing to hand on.
                    Ok(None) | Err(_) => {}
                }
            }
            if self.tcp_done {
                return if self.handshakes.is_empty() { Poll::Ready(None) } else { Poll::Pending };
            }
            // Full: the handshakes' wakers (registered above) wake this stream.
            if self.handshakes.len() >= self.max {
                return Poll::Pending;
            }
            match self.tcp.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(tcp))) => self.start(tcp),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => self.tcp_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// One handshake counted in `etcdmux_tls_handshakes` while it lives.
struct InProgress;

impl InProgress {
    fn new() -> InProgress {
        let n = IN_PROGRESS.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(names::TLS_HANDSHAKES).set(n as f64);
        InProgress
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        let n = IN_PROGRESS.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        metrics::gauge!(names::TLS_HANDSHAKES).set(n as f64);
    }
}
