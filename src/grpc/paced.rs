//! A client connection's socket, read a slice per turn of its task.
//!
//! hyper's task for a connection reads frames for as long as the socket has them
//! (up to tokio's budget, about a megabyte) before the tasks of its streams run.
//! Until they run, every frame read for them waits in h2's per-connection tables,
//! and so does every response they queue until the connection's task writes it;
//! those tables grow to the largest such pile and keep that size for the
//! connection's life. A burst of 1,000 Watch streams opened at once on one
//! connection left ~370 B a stream there. Reading a slice
//! (`server.connection_read_slice_bytes`) per turn lets the streams take their
//! frames between slices; it also keeps one connection sending a flood from
//! holding a worker thread while others wait.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::names;

/// Counts the turns of a connection's task (the polls of its future).
#[derive(Clone, Default)]
pub struct Turns(Arc<AtomicU64>);

impl Turns {
    fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pin_project! {
    /// A connection's future, counting its turns for its [`Paced`] socket.
    pub struct Turning<F> {
        turns: Turns,
        #[pin]
        conn: F,
    }
}

impl<F> Turning<F> {
    pub fn new(turns: Turns, conn: F) -> Turning<F> {
        Turning { turns, conn }
    }

    /// The connection itself (for its graceful shutdown).
    pub fn conn(self: Pin<&mut Self>) -> Pin<&mut F> {
        self.project().conn
    }
}

impl<F: Future> Future for Turning<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.turns.0.fetch_add(1, Ordering::Relaxed);
        this.conn.poll(cx)
    }
}

/// A connection's socket, read at most `slice` bytes per turn.
pub struct Paced<IO> {
    io: IO,
    turns: Turns,
    slice: usize,
    /// The turn `read` counts in.
    turn: u64,
    read: usize,
}

impl<IO> Paced<IO> {
    pub fn new(io: IO, turns: Turns, slice: usize) -> Paced<IO> {
        Paced { io, turns, slice, turn: 0, read: 0 }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Paced<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let now = this.turns.now();
        if now != this.turn {
            this.turn = now;
            this.read = 0;
        }
        if this.read >= this.slice {
            // Back after the tasks woken meanwhile (the streams the frames are for).
            metrics::counter!(names::CONNECTION_READ_YIELDS).increment(1);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let limit = this.slice - this.read;
        let polled = if buf.remaining() <= limit {
            let before = buf.filled().len();
            let polled = Pin::new(&mut this.io).poll_read(cx, buf);
            polled.map_ok(|()| buf.filled().len() - before)
        } else {
            // No more than the slice's rest: read into that much of `buf`.
            let mut part = ReadBuf::new(buf.initialize_unfilled_to(limit));
            let polled = Pin::new(&mut this.io).poll_read(cx, &mut part);
            let n = part.filled().len();
            buf.advance(n);
            polled.map_ok(|()| n)
        };
        polled.map_ok(|n| this.read += n)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Paced<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::{Paced, Turning, Turns};
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream, ReadBuf};

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    const SLICE: usize = 8 * 1024;

    /// Reads once with a 64 KiB buffer: the bytes read, or pending.
    fn read_now(r: &mut Paced<DuplexStream>, cx: &mut Context<'_>) -> Poll<usize> {
        let mut chunk = vec![0u8; 64 * 1024];
        let mut buf = ReadBuf::new(&mut chunk);
        Pin::new(r).poll_read(cx, &mut buf).map(|res| res.map(|()| buf.filled().len()).expect("read"))
    }

    /// One slice per turn, however large the reader's buffer; past it the reader is
    /// pending and has woken its task, and the next turn reads on.
    #[tokio::test]
    async fn one_slice_per_turn() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        tx.write_all(&vec![1u8; 3 * SLICE]).await.expect("write");
        let turns = Turns::default();
        let mut r = Paced::new(rx, turns.clone(), SLICE);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut turn = Box::pin(Turning::new(turns, std::future::pending::<()>()));

        assert!(turn.as_mut().poll(&mut cx).is_pending());
        assert_eq!(read_now(&mut r, &mut cx), Poll::Ready(SLICE));
        assert!(read_now(&mut r, &mut cx).is_pending(), "a slice per turn");
        assert!(read_now(&mut r, &mut cx).is_pending(), "however often it is asked");
        assert!(count.0.load(Ordering::SeqCst) >= 1, "the task is woken for its next turn");
        assert!(turn.as_mut().poll(&mut cx).is_pending());
        assert_eq!(read_now(&mut r, &mut cx), Poll::Ready(SLICE), "the next turn reads on");
    }

    /// Nothing is lost or reordered, and a task reading it to the end finishes.
    #[tokio::test]
    async fn every_byte_in_order() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        tx.write_all(&sent).await.expect("write");
        drop(tx);
        let turns = Turns::default();
        let mut r = Paced::new(rx, turns.clone(), SLICE);
        let mut got = Vec::new();
        let read = Turning::new(turns, async {
            r.read_to_end(&mut got).await.expect("read");
        });
        read.await;
        assert!(got == sent);
    }
}
