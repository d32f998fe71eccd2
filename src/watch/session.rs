//! One client Watch stream, served by one future: the [`ResponseStream`] that the
//! response body (`grpc::watch`) polls drains the stream's [`StreamSink`] (which
//! the hub fills without ever waiting), keeps header revisions from going
//! backwards, and reads the client's requests (create, cancel, progress) when
//! something it waits on wakes it. A
//! stream costs no task, upstream watch or connection of its own: hyper's task for
//! the HTTP/2 stream polls it, and an idle stream's queue holds no memory.

use crate::metrics::names;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use pin_project_lite::pin_project;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::Status;

use super::hub::Hub;
use super::passthrough::passthrough;
use super::sink::{Outgoing, SinkReceiver, StreamSink};
use super::watcher::{Render, Watcher};
use crate::codec::frame::Decoder;
use crate::error::Error;
use crate::keyspace::{End, RangeRef, Scope, TenantName};
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{watch_request, WatchCreateRequest, WatchRequest, WatchResponse};
use crate::trace::call::{self, Call};

/// Starts one client stream: the stream of its responses, to hand to the response
/// body, which reads the requests too. It ends when the hub stops (shutdown) with
/// `UNAVAILABLE`, so clients reconnect and resume. Call it in the call's scope: the
/// requests are then read in the call's span.
pub fn start(
    proxy: Arc<Proxy>,
    scope: Scope,
    hub: Arc<Hub>,
    require_leader: bool,
    inbound: Decoder<WatchRequest>,
) -> ResponseStream {
    let cfg = &proxy.cfg.watch;
    let (sink, rx) = StreamSink::new(cfg.stream_buffer, cfg.stream_control_reserve, require_leader, hub.queued_gauge());
    let stop = hub.stop_token().cancelled_owned();
    metrics::gauge!(names::WATCH_STREAMS).increment(1.0);
    let state = StreamState { proxy, scope, hub, sink, watches: Watches::None, next_id: 0 };
    let requests = Requests { state, inbound: Some(inbound), creating: None, blocked: false, call: call::current() };
    ResponseStream { rx, requests, last_rev: 0, done: false, stop }
}

pin_project! {
    /// The responses of one client stream, in the order they were queued; polling
    /// it also reads the stream's requests.
    pub struct ResponseStream {
        rx: SinkReceiver,
        requests: Requests,
        last_rev: i64,
        done: bool,
        // The hub stopped: end with `UNAVAILABLE` at once.
        #[pin]
        stop: WaitForCancellationFutureOwned,
    }
}

impl Stream for ResponseStream {
    type Item = Result<WatchResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if this.stop.poll(cx).is_ready() {
            // What is still queued is dropped: the client resumes from the last
            // revision it got.
            *this.done = true;
            this.requests.finish();
            return Poll::Ready(Some(Err(Status::unavailable("etcdmux: shutting down"))));
        }
        loop {
            let sink = this.rx.sink();
            if sink.take_reader_wake() || this.requests.room_made() {
                this.requests.poll();
            }
            let mut r = match this.rx.poll_recv(cx) {
                // Woken before the receiver's waker was in place: poll the reader again.
                Poll::Pending if this.rx.sink().reader_woken() || this.requests.room_made() => continue,
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Outgoing::End(status)) => {
                    *this.done = true;
                    this.requests.finish();
                    return Poll::Ready(Some(Err(*status)));
                }
                Poll::Ready(Outgoing::Response(r)) => *r,
            };
            // Header revisions never go backwards on a stream.
            if let Some(h) = r.header.as_mut() {
                h.revision = h.revision.max(*this.last_rev);
                *this.last_rev = h.revision;
            }
            return Poll::Ready(Some(Ok(r)));
        }
    }
}

/// A create waiting for the hub (its readiness, etcd's revision, compaction):
/// boxed, so that a stream not creating a watch does not carry its size.
type Creating = Pin<Box<dyn Future<Output = (i64, Result<Watcher, Error>)> + Send>>;

/// The reading side of one client stream.
struct Requests {
    state: StreamState,
    /// `None` once the client closed its side (its watches keep running until it
    /// goes away, as in etcd) or sent what does not decode.
    inbound: Option<Decoder<WatchRequest>>,
    /// The create in progress: requests are handled one at a time, in order.
    creating: Option<Creating>,
    /// Reading stopped because the stream was full.
    blocked: bool,
    /// The call this stream is, for its span and trace context.
    call: Option<Arc<Call>>,
}

impl Requests {
    /// Whether reading stopped at a full stream that has room again.
    fn room_made(&self) -> bool {
        self.blocked && !self.state.sink.is_full()
    }

    /// Handles requests until one is pending, the stream is full, or the client
    /// closed its side. Everything it waits on wakes the sink's reader waker.
    fn poll(&mut self) {
        let call = self.call.clone();
        call::within(call.as_ref(), || self.poll_in_call());
    }

    fn poll_in_call(&mut self) {
        let waker = self.state.sink.reader_waker();
        let mut cx = Context::from_waker(&waker);
        loop {
            if let Some(c) = self.creating.as_mut() {
                let Poll::Ready((id, built)) = c.as_mut().poll(&mut cx) else { return };
                self.creating = None;
                self.state.created(id, built);
            }
            // Like etcd, stop reading requests while the client is not reading
            // responses: whatever a request costs (created, cancel, a progress answer
            // owed) counts against the stream's budget, so a client cannot queue
            // responses or waiting requests without bound.
            self.blocked = self.state.sink.is_full();
            if self.blocked {
                return;
            }
            let Some(inbound) = self.inbound.as_mut() else { return };
            let req = match Pin::new(inbound).poll_next(&mut cx) {
                Poll::Pending => return,
                Poll::Ready(Some(Ok(req))) => req,
                Poll::Ready(None) => {
                    self.inbound = None;
                    return;
                }
                // A request that does not decode (or a broken stream) ends the stream
                // with that error, as etcd does; never with OK.
                Poll::Ready(Some(Err(status))) => {
                    let message = format!("etcdmux: reading the watch stream: {}", status.message());
                    self.state.sink.end(Status::new(status.code(), message));
                    self.inbound = None;
                    self.state.close();
                    return;
                }
            };
            match req.request_union {
                Some(watch_request::RequestUnion::CreateRequest(c)) => self.creating = self.state.create(c),
                Some(watch_request::RequestUnion::CancelRequest(c)) => self.state.cancel(c.watch_id),
                Some(watch_request::RequestUnion::ProgressRequest(_)) => {
                    self.state.hub.request_progress(&self.state.sink)
                }
                None => {}
            }
        }
    }

    /// The stream ended: no more requests, and its watchers leave the hub now.
    fn finish(&mut self) {
        self.creating = None;
        self.inbound = None;
        self.state.close();
    }
}

/// One watch of a stream.
enum Watch {
    /// Served by the hub.
    Hub(Arc<Watcher>),
    /// Of global or passthrough keys: relayed from its own upstream watch.
    Relayed(tokio::task::JoinHandle<()>),
}

impl Watch {
    /// Ended without the client asking (the hub cancelled it: slow, compacted, no
    /// leader; or its relay ended): gone for good.
    fn is_over(&self) -> bool {
        match self {
            Watch::Hub(w) => w.is_canceled(),
            Watch::Relayed(t) => t.is_finished(),
        }
    }
}

/// What one client stream keeps.
struct StreamState {
    proxy: Arc<Proxy>,
    scope: Scope,
    hub: Arc<Hub>,
    sink: Arc<StreamSink>,
    /// Its watches by id, both kinds.
    watches: Watches,
    next_id: i64,
}

impl StreamState {
    /// Starts a create: what can be decided at once is answered here; what needs the
    /// hub is returned as a future, finished by [`StreamState::created`].
    fn create(&mut self, c: WatchCreateRequest) -> Option<Creating> {
        self.watches.retain(|w| !w.is_over());
        let id = if c.watch_id != 0 {
            c.watch_id
        } else {
            while self.watches.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id
        };
        if self.watches.contains_key(&id) {
            self.refuse(id, "mvcc: duplicate watch ID provided on the WatchStream".to_string());
            return None;
        }
        if c.watch_id == 0 {
            self.next_id += 1;
        }
        let max = self.proxy.cfg.limits.max_watchers_per_stream;
        if self.watches.len() >= max {
            metrics::counter!(names::OVERLOAD_REJECTIONS, "scope" => "watchers_per_stream").increment(1);
            self.refuse(id, Error::TooManyWatchers { max }.to_string());
            return None;
        }
        // Resolve once: tenant ranges go to the hub, raw keys to a relayed watch.
        let (tenant, start, end) = match self.proxy.resolver.resolve_range(&self.scope, &c.key, &c.range_end) {
            Ok(RangeRef::Tenant { tenant, start, end }) => (tenant, start, end),
            Ok(RangeRef::Raw { key, range_end, .. }) => {
                let create = WatchCreateRequest { key, range_end, watch_id: 0, ..c };
                let watch = passthrough(self.proxy.clone(), self.sink.clone(), id, create);
                let stop = self.hub.stop_token();
                let task = self.proxy.tasks.spawn(async move {
                    tokio::select! {
                        _ = watch => {}
                        _ = stop.cancelled() => {}
                    }
                });
                self.watches.insert(id, Watch::Relayed(task));
                return None;
            }
            Err(e) => {
                self.refuse(id, Error::from(e).to_string());
                return None;
            }
        };
        let render = match self.proxy.tenant_view(&self.scope, &tenant) {
            Ok(_) if self.scope.static_tenant.is_some() => Render::Tenant,
            Ok(cp) => Render::Prefixed(cp),
            Err(e) => {
                self.refuse(id, Status::from(e).message().to_string());
                return None;
            }
        };
        let (proxy, hub, sink) = (self.proxy.clone(), self.hub.clone(), self.sink.clone());
        let build = async move {
            let w = watcher(&proxy, &hub, sink, id, &c, tenant, start, end, render).await;
            (id, w)
        };
        // In the call's span (the caller runs this in it), like the rest of the stream.
        Some(Box::pin(crate::trace::in_call(build)))
    }

    /// Finishes a create the hub had to answer first.
    fn created(&mut self, id: i64, built: Result<Watcher, Error>) {
        match built {
            Ok(w) => {
                let w = Arc::new(w);
                self.watches.insert(id, Watch::Hub(w.clone()));
                let created = WatchResponse { watch_id: id, created: true, ..Default::default() };
                self.hub.add(&self.proxy, w, created);
            }
            Err(e) => self.refuse(id, Status::from(e).message().to_string()),
        }
    }

    /// Answers a create that cannot be served: created and cancelled at once, with
    /// the reason, as etcd answers a watch it refuses.
    fn refuse(&self, id: i64, reason: String) {
        self.sink.send_control(WatchResponse {
            watch_id: id,
            created: true,
            canceled: true,
            cancel_reason: reason,
            ..Default::default()
        });
    }

    fn cancel(&mut self, id: i64) {
        // etcd answers nothing for a watch it no longer has.
        match self.watches.remove(&id) {
            Some(Watch::Relayed(task)) if !task.is_finished() => {
                task.abort();
                self.sink.send_control(WatchResponse { watch_id: id, canceled: true, ..Default::default() });
            }
            Some(Watch::Hub(w)) if !w.is_canceled() => {
                self.hub.remove(&w);
                self.sink.send_control(WatchResponse { watch_id: id, canceled: true, ..Default::default() });
                metrics::counter!(names::WATCH_CANCELLED).increment(1);
            }
            _ => {}
        }
    }

    /// Takes the stream's watchers out of the hub; again, it does nothing.
    fn close(&mut self) {
        for w in self.watches.take() {
            match w {
                Watch::Hub(w) => self.hub.remove(&w),
                Watch::Relayed(t) => t.abort(),
            }
        }
    }
}

/// A stream's watches by id. Most streams carry one (the apiserver opens a stream
/// per watch cache, one watch each), so the first is kept inline and a map is
/// allocated only for a second: the map's smallest table is ~120 bytes a stream,
/// and the map itself, boxed, takes 8 of this enum's 32 instead of 48.
enum Watches {
    None,
    One(i64, Watch),
    // The extra allocation is the point: only streams with a second watch pay it.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<i64, Watch>>),
}

impl Watches {
    fn len(&self) -> usize {
        match self {
            Watches::None => 0,
            Watches::One(..) => 1,
            Watches::Many(m) => m.len(),
        }
    }

    fn contains_key(&self, id: &i64) -> bool {
        match self {
            Watches::None => false,
            Watches::One(k, _) => k == id,
            Watches::Many(m) => m.contains_key(id),
        }
    }

    /// Adds watch `id`, which must not be present yet (the caller checked).
    fn insert(&mut self, id: i64, w: Watch) {
        *self = match std::mem::replace(self, Watches::None) {
            Watches::None => Watches::One(id, w),
            Watches::One(k, first) => Watches::Many(Box::new(HashMap::from([(k, first), (id, w)]))),
            Watches::Many(mut m) => {
                m.insert(id, w);
                Watches::Many(m)
            }
        };
    }

    fn remove(&mut self, id: &i64) -> Option<Watch> {
        match self {
            Watches::One(k, _) if k == id => match std::mem::replace(self, Watches::None) {
                Watches::One(_, w) => Some(w),
                _ => None,
            },
            Watches::Many(m) => m.remove(id),
            _ => None,
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&Watch) -> bool) {
        match self {
            Watches::One(_, w) if !keep(w) => *self = Watches::None,
            Watches::Many(m) => m.retain(|_, w| keep(w)),
            _ => {}
        }
    }

    /// Every watch, leaving none.
    fn take(&mut self) -> impl Iterator<Item = Watch> {
        let (one, many) = match std::mem::replace(self, Watches::None) {
            Watches::None => (None, None),
            Watches::One(_, w) => (Some(w), None),
            Watches::Many(m) => (None, Some(m)),
        };
        one.into_iter().chain(many.into_iter().flat_map(|m| m.into_values()))
    }
}

impl Drop for StreamState {
    /// The client went away (or the stream ended): its watchers go too.
    fn drop(&mut self) {
        self.close();
        metrics::gauge!(names::WATCH_STREAMS).decrement(1.0);
    }
}

/// The watcher a create asks for, once the hub can say where it starts.
#[allow(clippy::too_many_arguments)]
async fn watcher(
    proxy: &Proxy,
    hub: &Hub,
    sink: Arc<StreamSink>,
    id: i64,
    c: &WatchCreateRequest,
    tenant: TenantName,
    start: Bytes,
    end: End,
    render: Render,
) -> Result<Watcher, Error> {
    hub.ready().await;
    let from = if c.start_revision > 0 { c.start_revision } else { hub.now(proxy).await? };
    let mut w = Watcher::new(id, sink, tenant, start, end, from, c, render);
    if c.start_revision > 0 {
        // etcd fills an event's prev_kv from a range at the revision before it: a
        // watch from exactly the compact revision gets that revision's events
        // without prev_kv. Asking about `from - 1` first costs one range in the
        // usual case (not compacted, so neither is `from`), and none while the hub
        // has not seen `from` (which, like `is_compacted`, it takes as not
        // compacted yet).
        let seen = from <= hub.last_rev();
        let before = c.prev_kv && seen && hub.is_compacted(proxy, from - 1).await?;
        if before {
            w.prev_kv_from = from + 1;
        }
        w.compacted = (before || !c.prev_kv) && hub.is_compacted(proxy, from).await?;
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::{Watch, Watches};

    /// A relayed watch whose task never ends, or one already ended.
    async fn relayed(ended: bool) -> Watch {
        let task = tokio::spawn(async move {
            if !ended {
                std::future::pending::<()>().await;
            }
        });
        if ended {
            while !task.is_finished() {
                tokio::task::yield_now().await;
            }
        }
        Watch::Relayed(task)
    }

    fn ids(w: &Watches, candidates: &[i64]) -> Vec<i64> {
        candidates.iter().copied().filter(|id| w.contains_key(id)).collect()
    }

    #[tokio::test]
    async fn one_watch_inline_then_a_map_for_more() {
        let mut w = Watches::None;
        w.insert(7, relayed(false).await);
        assert!(matches!(w, Watches::One(7, _)));
        assert_eq!((w.len(), ids(&w, &[0, 7, 8])), (1, vec![7]));
        w.insert(8, relayed(false).await);
        w.insert(9, relayed(false).await);
        assert!(matches!(w, Watches::Many(_)));
        assert_eq!((w.len(), ids(&w, &[7, 8, 9])), (3, vec![7, 8, 9]));
        assert!(w.remove(&8).is_some());
        assert!(w.remove(&8).is_none(), "removed twice");
        assert_eq!((w.len(), ids(&w, &[7, 8, 9])), (2, vec![7, 9]));
        assert_eq!(w.take().count(), 2);
        assert_eq!(w.len(), 0);
    }

    #[tokio::test]
    async fn remove_and_retain_of_the_inline_watch() {
        let mut w = Watches::None;
        w.insert(1, relayed(false).await);
        assert!(w.remove(&2).is_none(), "another id leaves it");
        assert!(w.remove(&1).is_some());
        assert!(matches!(w, Watches::None));
        w.insert(1, relayed(true).await);
        w.retain(|x| !x.is_over());
        assert!(matches!(w, Watches::None), "an ended watch is dropped");
        w.insert(1, relayed(false).await);
        w.retain(|x| !x.is_over());
        assert_eq!(ids(&w, &[1]), vec![1], "a running one stays");
    }

    #[tokio::test]
    async fn retain_in_the_map_drops_only_ended_watches() {
        let mut w = Watches::None;
        w.insert(1, relayed(true).await);
        w.insert(2, relayed(false).await);
        w.insert(3, relayed(true).await);
        w.retain(|x| !x.is_over());
        assert_eq!((w.len(), ids(&w, &[1, 2, 3])), (1, vec![2]));
    }
}
