//! The Watch service: client watch streams served by the shared [`hub::Hub`].
//!
//! Each client stream gets a task that reads its requests (create, cancel,
//! progress) and a [`StreamSink`]: a bounded queue of responses the hub fills
//! without ever waiting, plus a small control queue for cancels and stream errors.
//! The response stream handed to tonic drains both and keeps header revisions from
//! going backwards. A stream costs no upstream watch, connection or task beyond its
//! own request reader.

pub mod hub;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::error::Error;
use crate::kv::request_span;
use crate::pb::etcdserverpb::{watch_request, watch_server::Watch, WatchCreateRequest, WatchRequest, WatchResponse};
use crate::proxy::Proxy;
use crate::tenant::{End, RangeRef, Scope, TenantName};
use bytes::Bytes;
use hub::{Hub, Outgoing, Render, SinkReceiver, StreamSink, Watcher};

pub struct WatchService {
    proxy: Arc<Proxy>,
    scope: Scope,
    hub: Arc<Hub>,
}

impl WatchService {
    pub fn new(proxy: Arc<Proxy>, scope: Scope, hub: Arc<Hub>) -> WatchService {
        WatchService { proxy, scope, hub }
    }
}

/// The responses of one client stream, in the order they were queued.
pub struct ResponseStream {
    rx: SinkReceiver,
    last_rev: i64,
    done: bool,
}

impl Stream for ResponseStream {
    type Item = Result<WatchResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut r = match self.rx.queue.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(Outgoing::End(status))) => {
                self.done = true;
                return Poll::Ready(Some(Err(*status)));
            }
            Poll::Ready(Some(Outgoing::Control(r))) => *r,
            Poll::Ready(Some(Outgoing::Data(r))) => {
                self.rx.queued.fetch_sub(1, Ordering::Relaxed);
                *r
            }
        };
        self.rx.room.notify_waiters();
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
        // Resolve once: tenant ranges go to the hub, raw keys to a relayed watch.
        let (tenant, start, end) = match self.proxy.resolver.resolve_range(&self.scope, &c.key, &c.range_end) {
            Ok(RangeRef::Tenant { tenant, start, end }) => (tenant, start, end),
            Ok(RangeRef::Raw { key, range_end, .. }) => {
                let create = WatchCreateRequest { key, range_end, watch_id: 0, ..c };
                let task = tokio::spawn(passthrough(self.proxy.clone(), self.sink.clone(), id, create));
                self.passthrough.insert(id, task);
                return;
            }
            Err(e) => return self.refuse(id, Status::from(e).message().to_string()),
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
        w.compacted = c.start_revision > 0 && self.hub.is_compacted(&self.proxy, from).await?;
        Ok(w)
    }

    /// Answers a create that cannot be served: created and cancelled at once, with
    /// the reason, as etcd answers a watch it refuses.
    fn refuse(&self, id: i64, reason: String) {
        self.sink.send_reliable(WatchResponse {
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
                self.sink.send_reliable(WatchResponse { watch_id: id, canceled: true, ..Default::default() });
            }
            return;
        }
        // etcd answers nothing for a watch it no longer has.
        if let Some(w) = self.watchers.remove(&id).filter(|w| !w.is_canceled()) {
            self.hub.remove(&w);
            self.sink.send_reliable(WatchResponse { watch_id: id, canceled: true, ..Default::default() });
            metrics::counter!("etcdmux_watch_cancelled_total").increment(1);
        }
    }

    fn close(&mut self) {
        for (_, w) in self.watchers.drain() {
            self.hub.remove(&w);
        }
        for (_, t) in self.passthrough.drain() {
            t.abort();
        }
        metrics::gauge!("etcdmux_watch_streams").decrement(1.0);
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ResponseStream;

    async fn watch(&self, req: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let require_leader = req.metadata().get(crate::upstream::REQUIRE_LEADER).is_some();
        let (sink, rx) = StreamSink::new(self.proxy.cfg.watch.stream_buffer, require_leader);
        let mut inbound = req.into_inner();
        let mut state = StreamState {
            proxy: self.proxy.clone(),
            scope: self.scope.clone(),
            hub: self.hub.clone(),
            sink,
            watchers: HashMap::new(),
            passthrough: HashMap::new(),
            next_id: 0,
        };
        metrics::gauge!("etcdmux_watch_streams").increment(1.0);
        tokio::spawn(
            async move {
                loop {
                    // Like etcd, stop reading requests while the client is not reading
                    // responses: a client cannot queue creates without bound.
                    while state.sink.is_full() {
                        let room = state.sink.room.clone();
                        let notified = room.notified();
                        if !state.sink.is_full() {
                            break;
                        }
                        tokio::select! {
                            _ = notified => {}
                            _ = state.sink_closed() => return state.close(),
                        }
                    }
                    let msg = tokio::select! {
                        m = inbound.message() => m,
                        _ = state.sink_closed() => break,
                    };
                    let req = match msg {
                        Ok(Some(req)) => req,
                        // The client closed its side: its watches keep running until it
                        // goes away, as in etcd.
                        Ok(None) => {
                            state.sink_closed().await;
                            break;
                        }
                        Err(_) => break,
                    };
                    match req.request_union {
                        Some(watch_request::RequestUnion::CreateRequest(c)) => {
                            let sink = state.sink.clone();
                            tokio::select! {
                                _ = state.create(c) => {}
                                _ = closed(&sink) => break,
                            }
                        }
                        Some(watch_request::RequestUnion::CancelRequest(c)) => state.cancel(c.watch_id),
                        Some(watch_request::RequestUnion::ProgressRequest(_)) => {
                            state.hub.request_progress(&state.sink)
                        }
                        None => {}
                    }
                }
                state.close();
            }
            .instrument(request_span("watch", "watch")),
        );
        Ok(Response::new(ResponseStream { rx, last_rev: 0, done: false }))
    }
}

/// A watch on global or passthrough keys: those keys are the same upstream and for
/// every client, so the watch is etcd's own, relayed under the client's watch id and
/// resumed after upstream errors from the revision after the last event relayed.
/// (Progress answers on the stream do not wait for it: it is not in the hub.)
async fn passthrough(proxy: Arc<Proxy>, sink: Arc<StreamSink>, id: i64, mut create: WatchCreateRequest) {
    let mut created = false;
    let mut backoff = std::time::Duration::from_millis(proxy.cfg.watch.reconnect_backoff_ms.max(1));
    loop {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let req = WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create.clone())) };
        let _ = tx.send(req).await;
        let mut call = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if sink.require_leader {
            call.metadata_mut()
                .insert(crate::upstream::REQUIRE_LEADER, tonic::metadata::MetadataValue::from_static("true"));
        }
        let (ep, ch) = proxy.upstream.stream_channel();
        let mut stream = match proxy.upstream.watch(ch).watch(call).await {
            Ok(s) => s.into_inner(),
            Err(s) => {
                proxy.upstream.report(ep, &s);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                continue;
            }
        };
        loop {
            let mut r = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(s) => {
                    proxy.upstream.report(ep, &s);
                    if s.message().contains("no leader") && sink.require_leader {
                        sink.end(s);
                        return;
                    }
                    break;
                }
            };
            if r.created {
                if created {
                    continue; // a resumed watch: the client saw its creation already
                }
                created = true;
                if create.start_revision == 0 {
                    // "From now" means from after the creation's revision, also on resume.
                    create.start_revision = r.header.as_ref().map_or(0, |h| h.revision) + 1;
                }
            }
            r.watch_id = id;
            if let Some(last) = r.events.iter().filter_map(|e| e.kv.as_ref()).map(|kv| kv.mod_revision).max() {
                create.start_revision = last + 1;
            }
            let ends = r.canceled;
            if r.events.is_empty() {
                sink.send_reliable(r);
            } else if !sink.send_events(r) {
                sink.send_reliable(WatchResponse {
                    watch_id: id,
                    canceled: true,
                    cancel_reason:
                        "etcdmux: watcher fell behind; re-watch from the revision after the last event received"
                            .to_string(),
                    ..Default::default()
                });
                return;
            }
            if ends {
                return;
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

async fn closed(sink: &Arc<StreamSink>) {
    sink.closed().await
}

impl StreamState {
    /// Resolves when the client has gone (its response stream was dropped).
    async fn sink_closed(&self) {
        self.sink.closed().await
    }
}
