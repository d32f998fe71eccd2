//! One client Watch stream: a task that reads the client's requests (create,
//! cancel, progress) and a [`StreamSink`] the hub fills without ever waiting; the
//! [`ResponseStream`] handed to tonic drains the sink and keeps header revisions
//! from going backwards. A stream costs no upstream watch, connection or task
//! beyond its own request reader.

use crate::metrics::names;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Status, Streaming};

use super::hub::Hub;
use super::passthrough::passthrough;
use super::sink::{Outgoing, SinkReceiver, StreamSink};
use super::watcher::{Render, Watcher};
use crate::error::Error;
use crate::keyspace::{End, RangeRef, Scope, TenantName};
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{watch_request, WatchCreateRequest, WatchRequest, WatchResponse};

/// Starts one client stream: the future that reads its requests (spawn it, as a
/// task of `proxy.tasks`) and the stream of its responses (hand it to tonic). Both
/// end when the hub stops (shutdown): the responses with `UNAVAILABLE`, so clients
/// reconnect and resume.
pub fn start(
    proxy: Arc<Proxy>,
    scope: Scope,
    hub: Arc<Hub>,
    require_leader: bool,
    mut inbound: Streaming<WatchRequest>,
) -> (impl Future<Output = ()> + Send, ResponseStream) {
    let cfg = &proxy.cfg.watch;
    let (sink, rx) = StreamSink::new(cfg.stream_buffer, cfg.stream_control_reserve, require_leader);
    let stop = hub.stop_token();
    let responses = ResponseStream { rx, last_rev: 0, done: false, stop: Box::pin(stop.clone().cancelled_owned()) };
    let mut state =
        StreamState { proxy, scope, hub, sink, watchers: HashMap::new(), passthrough: HashMap::new(), next_id: 0 };
    metrics::gauge!(names::WATCH_STREAMS).increment(1.0);
    let reader = async move {
        loop {
            // Like etcd, stop reading requests while the client is not reading
            // responses: whatever a request costs (created, cancel, a progress answer
            // owed) counts against the stream's budget, so a client cannot queue
            // responses or waiting requests without bound.
            while state.sink.is_full() {
                let sink = state.sink.clone();
                let room = sink.room().notified();
                if !state.sink.is_full() {
                    break;
                }
                tokio::select! {
                    _ = room => {}
                    _ = state.sink.closed() => return state.close(),
                    _ = stop.cancelled() => return state.close(),
                }
            }
            let msg = tokio::select! {
                m = inbound.message() => m,
                _ = state.sink.closed() => break,
                _ = stop.cancelled() => break,
            };
            let req = match msg {
                Ok(Some(req)) => req,
                // The client closed its side: its watches keep running until it
                // goes away, as in etcd.
                Ok(None) => {
                    tokio::select! {
                        _ = state.sink.closed() => {}
                        _ = stop.cancelled() => {}
                    }
                    break;
                }
                // A request that does not decode (or a broken stream) ends the stream
                // with that error, as etcd does; never with OK.
                Err(status) => {
                    let message = format!("etcdmux: reading the watch stream: {}", status.message());
                    state.sink.end(Status::new(status.code(), message));
                    break;
                }
            };
            match req.request_union {
                Some(watch_request::RequestUnion::CreateRequest(c)) => {
                    let sink = state.sink.clone();
                    tokio::select! {
                        _ = state.create(c) => {}
                        _ = sink.closed() => break,
                        _ = stop.cancelled() => break,
                    }
                }
                Some(watch_request::RequestUnion::CancelRequest(c)) => state.cancel(c.watch_id),
                Some(watch_request::RequestUnion::ProgressRequest(_)) => state.hub.request_progress(&state.sink),
                None => {}
            }
        }
        state.close();
    };
    (reader, responses)
}

/// The responses of one client stream, in the order they were queued.
pub struct ResponseStream {
    rx: SinkReceiver,
    last_rev: i64,
    done: bool,
    /// The hub stopped: end with `UNAVAILABLE` at once.
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Stream for ResponseStream {
    type Item = Result<WatchResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.stop.as_mut().poll(cx).is_ready() {
            // What is still queued is dropped: the client resumes from the last
            // revision it got.
            self.done = true;
            return Poll::Ready(Some(Err(Status::unavailable("etcdmux: shutting down"))));
        }
        let mut r = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(Outgoing::End(status))) => {
                self.done = true;
                return Poll::Ready(Some(Err(*status)));
            }
            Poll::Ready(Some(Outgoing::Response(r))) => *r,
        };
        // Header revisions never go backwards on a stream.
        if let Some(h) = r.header.as_mut() {
            h.revision = h.revision.max(self.last_rev);
            self.last_rev = h.revision;
        }
        Poll::Ready(Some(Ok(r)))
    }
}

/// What one client stream's task keeps.
struct StreamState {
    proxy: Arc<Proxy>,
    scope: Scope,
    hub: Arc<Hub>,
    sink: Arc<StreamSink>,
    watchers: HashMap<i64, Arc<Watcher>>,
    /// Watches of global or passthrough keys, each served by its own upstream watch.
    passthrough: HashMap<i64, tokio::task::JoinHandle<()>>,
    next_id: i64,
}

impl StreamState {
    async fn create(&mut self, c: WatchCreateRequest) {
        // Watchers the hub cancelled (slow, compacted, no leader) are gone for good.
        self.watchers.retain(|_, w| !w.is_canceled());
        self.passthrough.retain(|_, t| !t.is_finished());
        let id = if c.watch_id != 0 {
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) || self.passthrough.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id
        };
        if self.watchers.contains_key(&id) || self.passthrough.contains_key(&id) {
            self.refuse(id, "mvcc: duplicate watch ID provided on the WatchStream".to_string());
            return;
        }
        if c.watch_id == 0 {
            self.next_id += 1;
        }
        let max = self.proxy.cfg.limits.max_watchers_per_stream;
        if self.watchers.len() + self.passthrough.len() >= max {
            metrics::counter!(names::OVERLOAD_REJECTIONS, "scope" => "watchers_per_stream").increment(1);
            return self.refuse(id, Error::TooManyWatchers { max }.to_string());
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
                self.passthrough.insert(id, task);
                return;
            }
            Err(e) => return self.refuse(id, Error::from(e).to_string()),
        };
        match self.watcher(id, &c, tenant, start, end).await {
            Ok(w) => {
                let w = Arc::new(w);
                self.watchers.insert(id, w.clone());
                let created = WatchResponse { watch_id: id, created: true, ..Default::default() };
                self.hub.add(&self.proxy, w, created);
            }
            Err(e) => self.refuse(id, Status::from(e).message().to_string()),
        }
    }

    async fn watcher(
        &self,
        id: i64,
        c: &WatchCreateRequest,
        tenant: TenantName,
        start: Bytes,
        end: End,
    ) -> Result<Watcher, Error> {
        let cp = self.proxy.tenant_view(&self.scope, &tenant)?;
        let render = if self.scope.static_tenant.is_some() { Render::Tenant } else { Render::Prefixed(cp) };
        self.hub.ready().await;
        let from = if c.start_revision > 0 { c.start_revision } else { self.hub.now(&self.proxy).await? };
        let mut w = Watcher::new(id, self.sink.clone(), tenant, start, end, from, c, render);
        if c.start_revision > 0 {
            // etcd fills an event's prev_kv from a range at the revision before it: a
            // watch from exactly the compact revision gets that revision's events
            // without prev_kv. Asking about `from - 1` first costs one range in the
            // usual case (not compacted, so neither is `from`), and none while the hub
            // has not seen `from` (which, like `is_compacted`, it takes as not
            // compacted yet).
            let seen = from <= self.hub.last_rev();
            let before = c.prev_kv && seen && self.hub.is_compacted(&self.proxy, from - 1).await?;
            if before {
                w.prev_kv_from = from + 1;
            }
            w.compacted = (before || !c.prev_kv) && self.hub.is_compacted(&self.proxy, from).await?;
        }
        Ok(w)
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
        if let Some(task) = self.passthrough.remove(&id) {
            if !task.is_finished() {
                task.abort();
                self.sink.send_control(WatchResponse { watch_id: id, canceled: true, ..Default::default() });
            }
            return;
        }
        // etcd answers nothing for a watch it no longer has.
        if let Some(w) = self.watchers.remove(&id).filter(|w| !w.is_canceled()) {
            self.hub.remove(&w);
            self.sink.send_control(WatchResponse { watch_id: id, canceled: true, ..Default::default() });
            metrics::counter!(names::WATCH_CANCELLED).increment(1);
        }
    }

    fn close(&mut self) {
        for (_, w) in self.watchers.drain() {
            self.hub.remove(&w);
        }
        for (_, t) in self.passthrough.drain() {
            t.abort();
        }
        metrics::gauge!(names::WATCH_STREAMS).decrement(1.0);
    }
}
