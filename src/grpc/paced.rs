//! A client connection is read until it has opened a few streams in one turn of
//! its task, then the task lets others run.
//!
//! hyper's task for a connection reads frames for as long as the socket has them
//! (up to tokio's budget, about a megabyte) before the tasks of the streams it
//! accepted run. Until they run, every frame read for them waits in h2's
//! per-connection tables, and so does every response they queue until the
//! connection's task writes it; those tables grow to the largest such pile and
//! keep that size for the connection's life. A burst of 1,000 Watch streams opened
//! at once on one connection left ~370 B a stream there. Here the reader counts
//! the HTTP/2 HEADERS frames it reads (each opens a stream: gRPC clients send no
//! trailers), and after `server.connection_streams_per_turn` of them in one turn
//! it yields: the new streams take their frames first, and one connection opening
//! calls in a flood cannot hold a worker thread while others wait. A large
//! request body (DATA frames) is read at full speed.

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

/// A connection's socket, yielding after `per_turn` streams opened in one turn.
pub struct Paced<IO> {
    io: IO,
    turns: Turns,
    per_turn: usize,
    frames: Frames,
    /// The turn `opened` counts in.
    turn: u64,
    opened: usize,
    /// Whether this turn's yield has been counted (hyper asks to read again for
    /// each stream it accepts in a turn).
    counted: bool,
}

impl<IO> Paced<IO> {
    pub fn new(io: IO, turns: Turns, per_turn: usize) -> Paced<IO> {
        Paced { io, turns, per_turn, frames: Frames::default(), turn: 0, opened: 0, counted: false }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Paced<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let now = this.turns.now();
        if now != this.turn {
            this.turn = now;
            this.opened = 0;
            this.counted = false;
        }
        if this.opened >= this.per_turn {
            if !this.counted {
                this.counted = true;
                metrics::counter!(names::CONNECTION_READ_YIELDS).increment(1);
            }
            // Back after the tasks woken meanwhile (the streams just opened).
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.opened += this.frames.headers_in(&buf.filled()[before..]);
        }
        polled
    }
}

/// The client's connection preface, before its first frame (RFC 9113, 3.4).
const PREFACE: usize = 24;
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;

/// Where a reader is in a client connection's bytes: the preface, then frames,
/// each a 9-byte header (24-bit length, type, flags, stream id) and its payload.
/// The bytes are only looked at; h2 parses them and answers what is malformed.
struct Frames {
    /// Bytes still to pass over: the preface or a frame's payload.
    skip: usize,
    header: [u8; FRAME_HEADER],
    /// Bytes of `header` read so far.
    have: usize,
}

impl Default for Frames {
    fn default() -> Frames {
        Frames { skip: PREFACE, header: [0; FRAME_HEADER], have: 0 }
    }
}

impl Frames {
    /// Takes the next bytes of the connection; the HEADERS frames whose header
    /// ends in them.
    fn headers_in(&mut self, mut data: &[u8]) -> usize {
        let mut headers = 0;
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (FRAME_HEADER - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == FRAME_HEADER {
                self.have = 0;
                let [a, b, c, kind, ..] = self.header;
                self.skip = u32::from_be_bytes([0, a, b, c]) as usize;
                if kind == HEADERS {
                    headers += 1;
                }
            }
        }
        headers
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
    use super::{Frames, Paced, Turning, Turns, FRAME_HEADER, HEADERS, PREFACE};
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream, ReadBuf};

    /// A frame of `kind` with a payload of `len` bytes.
    fn frame(kind: u8, len: usize) -> Vec<u8> {
        let l = (len as u32).to_be_bytes();
        let mut f = vec![l[1], l[2], l[3], kind, 0x4, 0, 0, 0, 1];
        f.resize(FRAME_HEADER + len, 0xab);
        f
    }

    /// The preface and frames of `kinds` (payloads of assorted sizes, 16 KiB among them).
    fn connection_bytes(kinds: &[u8]) -> Vec<u8> {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        assert_eq!(bytes.len(), PREFACE);
        for (i, &kind) in kinds.iter().enumerate() {
            bytes.extend(frame(kind, [0, 1, 9, 40, 16_384][i % 5]));
        }
        bytes
    }

    #[test]
    fn headers_frames_are_counted_however_the_bytes_are_cut() {
        // DATA, HEADERS, SETTINGS, WINDOW_UPDATE, CONTINUATION, RST_STREAM, PING.
        let kinds = [0x0, HEADERS, 0x4, 0x8, HEADERS, 0x9, HEADERS, 0x3, 0x6, 0x0, HEADERS];
        let bytes = connection_bytes(&kinds);
        for chunk in [1, 2, 8, 9, 10, 23, 24, 25, 100, 4096, bytes.len()] {
            let mut frames = Frames::default();
            let counted: usize = bytes.chunks(chunk).map(|c| frames.headers_in(c)).sum();
            assert_eq!(counted, 4, "read {chunk} bytes at a time");
            assert_eq!((frames.skip, frames.have), (0, 0), "between frames at the end");
        }
    }

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Reads once: the bytes read, or pending.
    fn read_now(r: &mut Paced<DuplexStream>, cx: &mut Context<'_>, max: usize) -> Poll<usize> {
        let mut chunk = vec![0u8; max];
        let mut buf = ReadBuf::new(&mut chunk);
        Pin::new(r).poll_read(cx, &mut buf).map(|res| res.map(|()| buf.filled().len()).expect("read"))
    }

    /// After `per_turn` streams opened the reader is pending, however often it is
    /// asked in that turn, and has woken its task; the next turn reads on. Request
    /// bodies do not count.
    #[tokio::test]
    async fn a_turn_ends_after_its_streams() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let bytes = connection_bytes(&[0x4, HEADERS, 0x0, 0x0, 0x0, 0x0, 0x0, HEADERS, HEADERS]);
        tx.write_all(&bytes).await.expect("write");
        let turns = Turns::default();
        let mut r = Paced::new(rx, turns.clone(), 2);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut turn = Box::pin(Turning::new(turns, std::future::pending::<()>()));
        assert!(turn.as_mut().poll(&mut cx).is_pending());

        // The preface, SETTINGS, one HEADERS and five DATA frames: one stream.
        let first = connection_bytes(&[0x4, HEADERS, 0x0, 0x0, 0x0, 0x0, 0x0]).len();
        assert_eq!(read_now(&mut r, &mut cx, first), Poll::Ready(first));
        assert_eq!(read_now(&mut r, &mut cx, FRAME_HEADER), Poll::Ready(FRAME_HEADER), "a second stream");
        assert!(read_now(&mut r, &mut cx, 1024).is_pending(), "two streams: the turn ends");
        assert!(read_now(&mut r, &mut cx, 1024).is_pending(), "however often it is asked");
        assert!(count.0.load(Ordering::SeqCst) >= 1, "the task is woken for its next turn");
        assert!(turn.as_mut().poll(&mut cx).is_pending());
        assert!(read_now(&mut r, &mut cx, 1024).is_ready(), "the next turn reads on");
    }

    /// Nothing is lost or reordered, and a task reading it to the end finishes.
    #[tokio::test]
    async fn every_byte_in_order() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let sent = connection_bytes(&[HEADERS; 100]);
        tx.write_all(&sent).await.expect("write");
        drop(tx);
        let turns = Turns::default();
        let mut r = Paced::new(rx, turns.clone(), 1);
        let mut got = Vec::new();
        Turning::new(turns, async {
            r.read_to_end(&mut got).await.expect("read");
        })
        .await;
        assert!(got == sent);
    }
}
