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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

use tonic::Status;

use crate::metrics::names;
use crate::pb::etcdserverpb::WatchResponse;

/// A queued message of one client stream. Boxed, so that the queue of a stream with
/// a burst behind it stays small (16 bytes a place).
pub enum Outgoing {
    /// A response; counted in the stream's budget until the client takes it.
    Response(Box<WatchResponse>),
    /// Ends the stream with an error.
    End(Box<Status>),
}

/// The count of one stream's queued (and reserved) responses, and its bounds.
struct Budget {
    queued: AtomicUsize,
    /// Data responses are queued only up to this total.
    limit: usize,
    /// Control responses may go up to this total.
    cap: usize,
    /// Every stream's queued responses, process-wide.
    gauge: metrics::Gauge,
}

impl Budget {
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
    }
}

/// The queue itself, under the sink's lock. It allocates nothing until a response
/// is queued, and nothing for a stream that is idle again: an apiserver keeps many
/// streams open that carry one quiet watch each.
#[derive(Default)]
struct Queue {
    items: VecDeque<Outgoing>,
    /// The receiver's task, woken when something is queued or room is made.
    waker: Option<Waker>,
}

/// The sending side of one client Watch stream: one ordered queue, so a watcher's
/// `created` always precedes its events and a cancel follows them.
pub struct StreamSink {
    queue: Mutex<Queue>,
    budget: Budget,
    pub require_leader: bool,
    /// Watchers of this stream still catching up: progress waits for them.
    pub(super) catching_up: AtomicUsize,
    /// An `End` was queued: nothing after it would ever be delivered.
    ended: AtomicBool,
    /// The receiver is gone: nothing queued would ever be delivered.
    closed: AtomicBool,
    /// Something the stream's request reader waits on is ready (see [`StreamSink::reader_waker`]).
    reader_woken: AtomicBool,
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
    sink: Arc<StreamSink>,
}

impl SinkReceiver {
    /// The next message; a response taken frees its place in the budget. Pending
    /// registers `cx` to be woken by the next message, room, or reader wake-up.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Outgoing> {
        let mut q = self.sink.lock();
        match q.items.pop_front() {
            Some(m) => {
                // An emptied queue gives its places back: most streams are idle
                // between rare events, and an allocation per burst is cheap.
                if q.items.is_empty() {
                    q.items = VecDeque::new();
                }
                drop(q);
                if let Outgoing::Response(_) = &m {
                    self.sink.budget.give_back(1);
                }
                Poll::Ready(m)
            }
            None => {
                if !q.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    q.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    pub fn sink(&self) -> &Arc<StreamSink> {
        &self.sink
    }

    /// Places the queue holds now (allocated, used or not).
    #[cfg(test)]
    fn places(&self) -> usize {
        self.sink.lock().items.capacity()
    }
}

impl Drop for SinkReceiver {
    fn drop(&mut self) {
        // After this, pushes fail (and their senders give back what they took); what
        // was queued before is given back here.
        let items = {
            let mut q = self.sink.lock();
            self.sink.closed.store(true, Ordering::Release);
            q.waker = None;
            std::mem::take(&mut q.items)
        };
        let n = items.iter().filter(|m| matches!(m, Outgoing::Response(_))).count();
        if n > 0 {
            self.sink.budget.give_back(n);
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
        if !self.sink.push(Outgoing::Response(Box::new(r))) {
            self.sink.give_back_from_afar(1);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.filled {
            self.sink.give_back_from_afar(1);
        }
    }
}

/// Wakes the stream's request reader: marks it woken, then wakes the receiver's
/// task, which polls the reader (one task serves both sides of a stream).
impl Wake for StreamSink {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.reader_woken.store(true, Ordering::Release);
        self.wake_receiver();
    }
}

impl StreamSink {
    /// A stream whose data responses are bounded by `buffer`, and control responses
    /// by `buffer + reserve`. `gauge` counts every stream's queued responses.
    pub fn new(
        buffer: usize,
        reserve: usize,
        require_leader: bool,
        gauge: metrics::Gauge,
    ) -> (Arc<StreamSink>, SinkReceiver) {
        let sink = StreamSink {
            queue: Mutex::new(Queue::default()),
            budget: Budget { queued: AtomicUsize::new(0), limit: buffer, cap: buffer + reserve, gauge },
            require_leader,
            catching_up: AtomicUsize::new(0),
            ended: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            reader_woken: AtomicBool::new(true),
        };
        let sink = Arc::new(sink);
        (sink.clone(), SinkReceiver { sink })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding it; the queue is still usable if it did.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the receiver's task, outside the lock.
    fn wake_receiver(&self) {
        let w = self.lock().waker.take();
        if let Some(w) = w {
            w.wake();
        }
    }

    /// A waker for what the stream's request reader waits on (the client's
    /// requests, a create in progress): it wakes the receiver's task and marks the
    /// reader woken, so the task polls the reader only when it has something to do.
    pub fn reader_waker(self: &Arc<Self>) -> Waker {
        Waker::from(self.clone())
    }

    /// Whether the reader was woken since the last call (and clears the mark).
    pub fn take_reader_wake(&self) -> bool {
        self.reader_woken.swap(false, Ordering::AcqRel)
    }

    /// Whether the reader was woken (without clearing the mark).
    pub fn reader_woken(&self) -> bool {
        self.reader_woken.load(Ordering::Acquire)
    }

    /// Gives back units taken by another task than the receiver's, and wakes the
    /// receiver: a reader waiting for room may go on.
    fn give_back_from_afar(&self, n: usize) {
        self.budget.give_back(n);
        self.wake_receiver();
    }

    /// Queues `m` and wakes the receiver; false if the stream is gone.
    fn push(&self, m: Outgoing) -> bool {
        let waker = {
            let mut q = self.lock();
            // Both are set under this lock: nothing is queued after an end.
            if self.is_closed() {
                return false;
            }
            q.items.push_back(m);
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        true
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
            if !self.push(Outgoing::Response(Box::new(r))) {
                break;
            }
            sent += 1;
        }
        if sent < n {
            self.give_back_from_afar(n - sent);
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
        if !self.push(Outgoing::Response(Box::new(r))) {
            self.give_back_from_afar(1);
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

    /// Whether the stream is gone or ended: nothing queued now would be delivered.
    pub fn is_closed(&self) -> bool {
        self.ended.load(Ordering::Acquire) || self.closed.load(Ordering::Acquire)
    }

    /// Whether the receiver is gone.
    pub fn is_gone(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Ends the stream with `status` after what is already queued; later responses
    /// are refused. Only the first end counts.
    pub fn end(&self, status: Status) {
        if self.ended.load(Ordering::Acquire) {
            return;
        }
        // Queued before `ended` is set, so that the end itself is not refused.
        let waker = {
            let mut q = self.lock();
            if self.ended.swap(true, Ordering::AcqRel) || self.closed.load(Ordering::Acquire) {
                return;
            }
            q.items.push_back(Outgoing::End(Box::new(status)));
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
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
        while let Poll::Ready(m) = rx.poll_recv(&mut cx) {
            out.push(m);
        }
        out
    }

    #[test]
    fn data_stops_at_the_buffer_and_control_at_the_reserve_then_the_stream_ends() {
        let (sink, mut rx) = StreamSink::new(4, 2, false, metrics::Gauge::noop());
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

    /// Counts its wakes.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    #[test]
    fn an_idle_stream_holds_no_queue_and_a_burst_gives_its_places_back() {
        let (sink, mut rx) = StreamSink::new(1024, 8, false, metrics::Gauge::noop());
        assert_eq!(rx.places(), 0, "nothing allocated before the first response");
        for i in 0..500 {
            assert_eq!(sink.send(resp(i)), Sent::Ok);
        }
        assert!(rx.places() >= 500);
        let got = drain(&mut rx);
        assert_eq!(got.len(), 500);
        assert_eq!(rx.places(), 0, "an emptied queue gives its places back");
        assert_eq!(sink.send(resp(1)), Sent::Ok);
        drain(&mut rx);
        assert_eq!(rx.places(), 0);
    }

    #[test]
    fn queued_responses_and_the_reader_wake_the_receiver() {
        let (sink, mut rx) = StreamSink::new(4, 1, false, metrics::Gauge::noop());
        let (count, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        assert!(sink.take_reader_wake(), "a new stream's reader has requests to read");
        assert!(rx.poll_recv(&mut cx).is_pending());
        assert_eq!(sink.send(resp(1)), Sent::Ok);
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "a response wakes the receiver");
        assert!(rx.poll_recv(&mut cx).is_ready());
        assert!(rx.poll_recv(&mut cx).is_pending());
        sink.reader_waker().wake_by_ref();
        assert_eq!(count.0.load(Ordering::SeqCst), 2, "the reader's waker wakes the receiver's task");
        assert!(sink.reader_woken());
        assert!(sink.take_reader_wake());
        assert!(!sink.take_reader_wake(), "the mark is taken once");
    }

    /// A reader stopped at a full stream waits for room; room made by another task
    /// (an answer that will not come) must wake it.
    #[test]
    fn room_made_elsewhere_wakes_the_receiver() {
        let (sink, mut rx) = StreamSink::new(1, 1, false, metrics::Gauge::noop());
        let slot = sink.reserve().unwrap();
        assert!(sink.is_full());
        let (count, waker) = counting();
        assert!(rx.poll_recv(&mut Context::from_waker(&waker)).is_pending());
        drop(slot);
        assert!(!sink.is_full());
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn fragments_fit_whole_or_not_at_all() {
        let (sink, _rx) = StreamSink::new(3, 0, false, metrics::Gauge::noop());
        assert_eq!(sink.send(resp(0)), Sent::Ok);
        assert_eq!(sink.send_all([resp(1), resp(2), resp(3)]), Sent::Full);
        assert_eq!(sink.queued(), 1);
        assert_eq!(sink.send_all([resp(1), resp(2)]), Sent::Ok);
        assert_eq!(sink.queued(), 3);
    }

    #[test]
    fn unfilled_slots_and_undelivered_responses_give_their_units_back() {
        let (sink, rx) = StreamSink::new(8, 0, false, metrics::Gauge::noop());
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
        let (sink, mut rx) = StreamSink::new(LIMIT, 1, false, metrics::Gauge::noop());
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
