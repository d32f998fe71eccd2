//! The sending side of one client Watch stream: one ordered, bounded queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, Notify};
use tonic::Status;

use crate::pb::etcdserverpb::WatchResponse;

/// A queued message of one client stream.
/// Boxed, so that a queue's preallocated block of slots stays small for the many
/// idle streams an apiserver keeps open.
pub enum Outgoing {
    /// Counts against the stream's buffer (events, progress).
    Data(Box<WatchResponse>),
    /// Must not be dropped (created, cancels): bounded by the watcher count, and by
    /// the request reader waiting while the stream is full.
    Control(Box<WatchResponse>),
    /// Ends the stream with an error.
    End(Box<Status>),
}

/// The sending side of one client Watch stream: one ordered queue, so a watcher's
/// `created` always precedes its events and a cancel follows them, with the number
/// of queued data responses bounded by `stream_buffer`.
pub struct StreamSink {
    pub(super) queue: mpsc::UnboundedSender<Outgoing>,
    /// Data responses queued and not yet taken by the client.
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) limit: usize,
    /// Signalled when the client takes a response.
    pub room: Arc<Notify>,
    pub require_leader: bool,
    /// Watchers of this stream still catching up: progress waits for them.
    pub(super) catching_up: AtomicUsize,
}

/// Outcome of queueing a response on a stream.
pub(super) enum Sent {
    Ok,
    Full,
    Gone,
}

/// The receiving side, for the response stream.
pub struct SinkReceiver {
    pub queue: mpsc::UnboundedReceiver<Outgoing>,
    pub queued: Arc<AtomicUsize>,
    pub room: Arc<Notify>,
}

impl StreamSink {
    pub fn new(buffer: usize, require_leader: bool) -> (Arc<StreamSink>, SinkReceiver) {
        let (queue, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let room = Arc::new(Notify::new());
        let sink = StreamSink {
            queue,
            queued: queued.clone(),
            limit: buffer,
            room: room.clone(),
            require_leader,
            catching_up: AtomicUsize::new(0),
        };
        (Arc::new(sink), SinkReceiver { queue: rx, queued, room })
    }

    pub(super) fn send(&self, r: WatchResponse) -> Sent {
        self.send_all(std::iter::once(r))
    }

    /// Queues responses that belong together (the fragments of one response): all
    /// of them, or none when the stream has no room for all.
    pub(super) fn send_all<I>(&self, rs: I) -> Sent
    where
        I: IntoIterator<Item = WatchResponse>,
        I::IntoIter: ExactSizeIterator,
    {
        let rs = rs.into_iter();
        if self.queue.is_closed() {
            return Sent::Gone;
        }
        if self.queued.load(Ordering::Relaxed) + rs.len() > self.limit {
            return Sent::Full;
        }
        self.queued.fetch_add(rs.len(), Ordering::Relaxed);
        for r in rs {
            if self.queue.send(Outgoing::Data(Box::new(r))).is_err() {
                return Sent::Gone;
            }
        }
        Sent::Ok
    }

    /// Queues an events response; false when the stream has no room (or is gone).
    pub fn send_events(&self, r: WatchResponse) -> bool {
        matches!(self.send(r), Sent::Ok)
    }

    /// Whether the client is behind by a full buffer.
    pub fn is_full(&self) -> bool {
        self.queued.load(Ordering::Relaxed) >= self.limit
    }

    /// Resolves when the client's response stream is gone.
    pub async fn closed(&self) {
        self.queue.closed().await
    }

    /// Queues a response that must not be dropped (created, cancels).
    pub fn send_reliable(&self, r: WatchResponse) {
        let _ = self.queue.send(Outgoing::Control(Box::new(r)));
    }

    /// Ends the stream with `status` after what is already queued.
    pub fn end(&self, status: Status) {
        let _ = self.queue.send(Outgoing::End(Box::new(status)));
    }
}
