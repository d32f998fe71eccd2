//! The sending side of one client Watch stream: one ordered queue with one budget.
//!
//! Every response queued on a stream counts against its budget until the client
//! takes it: events, progress answers and notifications, `created` and cancels
//! alike; so does every progress request still waiting for its answer (a [`Slot`]
//! reserved when the request is read). Two bounds, one counter:
//!
//! - *data* (events, periodic notifications) is queued only while the total stays
//!   at or below `stream_buffer`; a watcher whose events do not fit is cancelled as
//!   slow (`Sent::Full`);
//! - *control* (created, cancels, progress answers) must not be dropped, and may use
//!   a small reserve above it, up to `stream_buffer + stream_control_reserve`.
//!   Control responses answer requests, which the stream's reader reads only while
//!   the total is below `stream_buffer`, or cancel watchers as slow (one each). A
//!   stream whose control responses would pass the reserve ends with `UNAVAILABLE`
//!   (its client reconnects and resumes; nothing is silently lost).
//!
//! Reservation is one compare-and-swap on the counter, so producers racing on
//! different tasks (dispatch, catch-up, passthrough, the reader) never pass a bound.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, Notify};
use tonic::Status;

use crate::metrics::names;
use crate::pb::etcdserverpb::WatchResponse;

/// A queued message of one client stream.
/// Boxed, so that a queue's preallocated block of slots stays small for the many
/// idle streams an apiserver keeps open.
pub enum Outgoing {
    /// A response; counted in the stream's budget until the client takes it.
    Response(Box<WatchResponse>),
    /// Ends the stream with an error.
    End(Box<Status>),
}

/// The count of one stream's queued (and reserved) responses, and its bounds.
pub(super) struct Budget {
    queued: AtomicUsize,
    /// Data responses are queued only up to this total.
    limit: usize,
    /// Control responses may go up to this total.
    cap: usize,
    /// Signalled when the client takes a response.
    room: Notify,
    /// Every stream's queued responses, process-wide.
    gauge: metrics::Gauge,
}

impl Budget {
    fn new(limit: usize, reserve: usize) -> Budget {
        Budget {
            queued: AtomicUsize::new(0),
            limit,
            cap: limit + reserve,
            room: Notify::new(),
            gauge: metrics::gauge!(names::WATCH_QUEUED_RESPONSES),
        }
    }

    /// Takes `n` units if the total stays at or below `bound`: check and increment
    /// in one atomic step.
    fn take(&self, n: usize, bound: usize) -> bool {
        let ok = self.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| (q + n <= bound).then_some(q + n));
        if ok.is_ok() {
            self.gauge.increment(n as f64);
        }
        ok.is_ok()
    }

    fn give_back(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::AcqRel);
        self.gauge.decrement(n as f64);
        self.room.notify_waiters();
    }
}

/// The sending side of one client Watch stream: one ordered queue, so a watcher's
/// `created` always precedes its events and a cancel follows them.
pub struct StreamSink {
    pub(super) queue: mpsc::UnboundedSender<Outgoing>,
    budget: Arc<Budget>,
    pub require_leader: bool,
    /// Watchers of this stream still catching up: progress waits for them.
    pub(super) catching_up: AtomicUsize,
    /// An `End` was queued: nothing after it would ever be delivered.
    ended: AtomicBool,
}

/// Outcome of queueing a response on a stream.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Sent {
    Ok,
    Full,
    Gone,
}

/// The receiving side, for the response stream. Dropping it gives back the budget
/// of whatever was still queued.
pub struct SinkReceiver {
    queue: mpsc::UnboundedReceiver<Outgoing>,
    budget: Arc<Budget>,
}

impl SinkReceiver {
    /// The next message; a response taken frees its place in the budget.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Outgoing>> {
        let m = self.queue.poll_recv(cx);
        if let Poll::Ready(Some(Outgoing::Response(_))) = &m {
            self.budget.give_back(1);
        }
        m
    }
}

impl Drop for SinkReceiver {
    fn drop(&mut self) {
        // After close, sends fail (and their senders give back what they took); what
        // was queued before is given back here.
        self.queue.close();
        while let Ok(m) = self.queue.try_recv() {
            if let Outgoing::Response(_) = m {
                self.budget.give_back(1);
            }
        }
    }
}

/// One unit of a stream's budget held for a response to come (a progress answer):
/// filled once, or given back when dropped unfilled.
pub(super) struct Slot {
    sink: Arc<StreamSink>,
    filled: bool,
}

impl Slot {
    pub(super) fn sink(&self) -> &Arc<StreamSink> {
        &self.sink
    }

    /// Queues `r` in the place this slot holds.
    pub(super) fn fill(mut self, r: WatchResponse) {
        self.filled = true;
        if !self.sink.push(r) {
            self.sink.budget.give_back(1);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.filled {
            self.sink.budget.give_back(1);
        }
    }
}

impl StreamSink {
    /// A stream whose data responses are bounded by `buffer`, and control responses
    /// by `buffer + reserve`.
    pub fn new(buffer: usize, reserve: usize, require_leader: bool) -> (Arc<StreamSink>, SinkReceiver) {
        let (queue, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Budget::new(buffer, reserve));
        let sink = StreamSink {
            queue,
            budget: budget.clone(),
            require_leader,
            catching_up: AtomicUsize::new(0),
            ended: AtomicBool::new(false),
        };
        (Arc::new(sink), SinkReceiver { queue: rx, budget })
    }

    /// Queues a response whose unit was already taken; false if the stream is gone.
    fn push(&self, r: WatchResponse) -> bool {
        !self.ended.load(Ordering::Acquire) && self.queue.send(Outgoing::Response(Box::new(r))).is_ok()
    }

    pub(super) fn send(&self, r: WatchResponse) -> Sent {
        self.send_all(std::iter::once(r))
    }

    /// Queues data responses that belong together (the fragments of one response):
    /// all of them, or none when the stream has no room for all.
    pub(super) fn send_all<I>(&self, rs: I) -> Sent
    where
        I: IntoIterator<Item = WatchResponse>,
        I::IntoIter: ExactSizeIterator,
    {
        let rs = rs.into_iter();
        if self.is_closed() {
            return Sent::Gone;
        }
        let n = rs.len();
        if !self.budget.take(n, self.budget.limit) {
            return Sent::Full;
        }
        let mut sent = 0;
        for r in rs {
            if !self.push(r) {
                break;
            }
            sent += 1;
        }
        if sent < n {
            self.budget.give_back(n - sent);
            return Sent::Gone;
        }
        Sent::Ok
    }

    /// Queues an events response; false when the stream has no room (or is gone).
    pub fn send_events(&self, r: WatchResponse) -> bool {
        self.send(r) == Sent::Ok
    }

    /// Queues a response that must not be dropped (created, cancels), in the
    /// reserve if need be. A stream whose reserve is used up too ends with
    /// `UNAVAILABLE`; false then, or when the stream is gone.
    pub fn send_control(&self, r: WatchResponse) -> bool {
        if self.is_closed() {
            return false;
        }
        if !self.budget.take(1, self.budget.cap) {
            self.overflow();
            return false;
        }
        if !self.push(r) {
            self.budget.give_back(1);
            return false;
        }
        true
    }

    /// Reserves the place of a response to come (a progress answer), in the reserve
    /// if need be; `None` when the stream is gone or just ended for overflowing.
    pub(super) fn reserve(self: &Arc<Self>) -> Option<Slot> {
        if self.is_closed() {
            return None;
        }
        if !self.budget.take(1, self.budget.cap) {
            self.overflow();
            return None;
        }
        Some(Slot { sink: self.clone(), filled: false })
    }

    fn overflow(&self) {
        metrics::counter!(names::WATCH_STREAM_OVERFLOWS).increment(1);
        self.end(Status::unavailable(format!(
            "etcdmux: watch stream fell behind ({} responses queued and not read); reconnect and resume",
            self.budget.cap
        )));
    }

    /// Whether the client is behind by a full buffer: the stream's reader waits.
    pub fn is_full(&self) -> bool {
        self.queued() >= self.budget.limit
    }

    /// Responses queued or reserved and not yet taken by the client.
    pub fn queued(&self) -> usize {
        self.budget.queued.load(Ordering::Acquire)
    }

    /// Signalled whenever the client takes a response.
    pub fn room(&self) -> &Notify {
        &self.budget.room
    }

    /// Resolves when the client's response stream is gone.
    pub async fn closed(&self) {
        self.queue.closed().await
    }

    /// Whether the stream is gone or ended: nothing queued now would be delivered.
    pub fn is_closed(&self) -> bool {
        self.ended.load(Ordering::Acquire) || self.queue.is_closed()
    }

    /// Ends the stream with `status` after what is already queued; later responses
    /// are refused. Only the first end counts.
    pub fn end(&self, status: Status) {
        if !self.ended.swap(true, Ordering::AcqRel) {
            let _ = self.queue.send(Outgoing::End(Box::new(status)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    fn resp(id: i64) -> WatchResponse {
        WatchResponse { watch_id: id, ..Default::default() }
    }

    fn drain(rx: &mut SinkReceiver) -> Vec<Outgoing> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut out = Vec::new();
        while let Poll::Ready(Some(m)) = rx.poll_recv(&mut cx) {
            out.push(m);
        }
        out
    }

    #[test]
    fn data_stops_at_the_buffer_and_control_at_the_reserve_then_the_stream_ends() {
        let (sink, mut rx) = StreamSink::new(4, 2, false);
        for i in 0..4 {
            assert_eq!(sink.send(resp(i)), Sent::Ok);
        }
        assert!(sink.is_full());
        assert_eq!(sink.send(resp(9)), Sent::Full);
        assert!(sink.send_control(resp(10)));
        let slot = sink.reserve().expect("the reserve has one more place");
        assert_eq!(sink.queued(), 6);
        assert!(!sink.send_control(resp(11)), "past the reserve");
        assert!(sink.is_closed(), "the stream ended instead of growing");
        slot.fill(resp(12));
        let got = drain(&mut rx);
        assert_eq!(got.len(), 6, "4 data, 1 control, then the end");
        assert!(matches!(got.last(), Some(Outgoing::End(s)) if s.code() == tonic::Code::Unavailable));
        assert_eq!(sink.queued(), 0, "every unit given back: taken, refused, or filled after the end");
    }

    #[test]
    fn fragments_fit_whole_or_not_at_all() {
        let (sink, _rx) = StreamSink::new(3, 0, false);
        assert_eq!(sink.send(resp(0)), Sent::Ok);
        assert_eq!(sink.send_all([resp(1), resp(2), resp(3)]), Sent::Full);
        assert_eq!(sink.queued(), 1);
        assert_eq!(sink.send_all([resp(1), resp(2)]), Sent::Ok);
        assert_eq!(sink.queued(), 3);
    }

    #[test]
    fn unfilled_slots_and_undelivered_responses_give_their_units_back() {
        let (sink, rx) = StreamSink::new(8, 0, false);
        let a = sink.reserve().unwrap();
        let _b = sink.reserve().unwrap();
        assert_eq!(sink.send(resp(1)), Sent::Ok);
        assert_eq!(sink.queued(), 3);
        drop(a);
        assert_eq!(sink.queued(), 2);
        drop(rx);
        assert_eq!(sink.queued(), 1, "the queued response is given back with the receiver");
        assert_eq!(sink.send(resp(2)), Sent::Gone);
        assert!(!sink.send_control(resp(3)));
        assert!(sink.reserve().is_none());
        assert_eq!(sink.queued(), 1, "only the outstanding slot");
    }

    /// Producers on several threads race for the last places: the total never
    /// passes the bound (the check and the increment are one step).
    #[test]
    fn racing_producers_never_pass_the_bound() {
        const THREADS: usize = 4;
        const ROUNDS: usize = 20_000;
        const LIMIT: usize = 2;
        let (sink, mut rx) = StreamSink::new(LIMIT, 1, false);
        let barrier = Arc::new(Barrier::new(THREADS + 1));
        let accepted = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for t in 0..THREADS {
            let (sink, barrier, accepted) = (sink.clone(), barrier.clone(), accepted.clone());
            threads.push(std::thread::spawn(move || {
                for round in 0..ROUNDS {
                    barrier.wait();
                    // Single responses and fragments race for the same places.
                    let ok = if (t + round) % 3 == 0 {
                        sink.send_all([resp(0), resp(1)]) == Sent::Ok
                    } else {
                        sink.send(resp(t as i64)) == Sent::Ok
                    };
                    if ok {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    barrier.wait();
                }
            }));
        }
        let mut max_seen = 0;
        for _ in 0..ROUNDS {
            barrier.wait();
            barrier.wait();
            let q = sink.queued();
            max_seen = max_seen.max(q);
            assert!(q <= LIMIT, "queued {q} responses with a buffer of {LIMIT}");
            let got = drain(&mut rx);
            assert_eq!(got.len(), q, "the count matches what is queued");
        }
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(max_seen, LIMIT, "the races did fill the buffer");
        assert!(accepted.load(Ordering::Relaxed) >= ROUNDS);
        assert_eq!(sink.queued(), 0);
    }
}
