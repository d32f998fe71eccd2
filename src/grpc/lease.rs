//! The Lease service. Unary calls go to the [`Proxy`]; each client KeepAlive stream
//! is relayed over one upstream stream, opened on its first lease the caller owns.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::answer;
use super::tls::ScopeSource;
use crate::backend::Responses;
use crate::error::{Error, Result};
use crate::keyspace::Scope;
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{
    lease_server::Lease, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse, ResponseHeader,
};
use crate::upstream::StreamCtx;

pub struct LeaseService {
    proxy: Arc<Proxy>,
    scope: ScopeSource,
}

impl LeaseService {
    pub fn new(proxy: Arc<Proxy>, scope: impl Into<ScopeSource>) -> LeaseService {
        LeaseService { proxy, scope: scope.into() }
    }
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

/// Buffer between a client's keepalive stream and etcd's, per direction.
const KEEPALIVE_BUFFER: usize = 64;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(&self, req: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        let scope = self.scope.of(&self.proxy.resolver, &req)?;
        answer(self.proxy.lease_grant(&scope, &ctx, req.into_inner())).await
    }

    async fn lease_revoke(&self, req: Request<LeaseRevokeRequest>) -> Result<Response<LeaseRevokeResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        let scope = self.scope.of(&self.proxy.resolver, &req)?;
        answer(self.proxy.lease_revoke(&scope, &ctx, req.into_inner())).await
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    /// Each client stream gets one upstream stream, opened on its first owned lease.
    /// Keepalives for leases the principal does not own are answered here with
    /// TTL 0, which is etcd's answer for a lease that does not exist.
    ///
    /// The relay ends with the client: when the client goes away (reset, or stops
    /// reading and drops the stream) both streams are dropped at once, and the
    /// upstream one with them; when the relay fails (a message that does not decode,
    /// an upstream error, shutdown) the client's stream ends with that status, after
    /// the responses already queued.
    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let relay = Relay {
            proxy: self.proxy.clone(),
            scope: self.scope.of(&self.proxy.resolver, &req)?,
            ctx: StreamCtx::from_request(&req),
        };
        let inbound = req.into_inner();
        let (out_tx, out_rx) = mpsc::channel(KEEPALIVE_BUFFER);
        let (end_tx, end_rx) = oneshot::channel();
        let tasks = self.proxy.tasks.clone();
        // In the call's span, which lasts as long as the relay.
        self.proxy.tasks.spawn(crate::trace::in_call(async move {
            let end = tokio::select! {
                end = relay.run(inbound, &out_tx) => end,
                // The client is gone: dropping the relay drops the upstream stream.
                () = out_tx.closed() => return,
                () = tasks.cancelled() => Err(Status::unavailable("etcdmux: shutting down")),
            };
            let _ = end_tx.send(end);
        }));
        // The relay's end, after everything it queued: a oneshot never blocks, so the
        // error reaches the client even when its queue is full.
        let end = futures::stream::once(end_rx).filter_map(|end| async move {
            match end {
                Ok(Ok(())) => None,
                Ok(Err(s)) => Some(Err(s)),
                Err(_) => Some(Err(Status::unavailable("etcdmux: keepalive relay ended"))),
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx).chain(end))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        let scope = self.scope.of(&self.proxy.resolver, &req)?;
        answer(self.proxy.lease_time_to_live(&scope, &ctx, req.into_inner())).await
    }

    async fn lease_leases(&self, req: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        let scope = self.scope.of(&self.proxy.resolver, &req)?;
        answer(self.proxy.lease_leases(&scope, &ctx, req.into_inner())).await
    }
}

/// One client KeepAlive stream's relay to etcd.
struct Relay {
    proxy: Arc<Proxy>,
    scope: Scope,
    ctx: StreamCtx,
}

impl Relay {
    /// Relays until the client ends its stream (`Ok`) or something fails (the
    /// status the client's stream ends with).
    async fn run(
        self,
        mut inbound: Streaming<LeaseKeepAliveRequest>,
        out: &mpsc::Sender<Result<LeaseKeepAliveResponse, Status>>,
    ) -> Result<(), Status> {
        let proxy = &self.proxy;
        let mut up_tx: Option<mpsc::Sender<LeaseKeepAliveRequest>> = None;
        // The upstream stream and the endpoint it runs on (its failures move the
        // pool off a dead endpoint, as unary calls do).
        let mut upstream: Option<Responses<LeaseKeepAliveResponse>> = None;
        let mut last_header: Option<ResponseHeader> = None;
        loop {
            let up_next = async {
                match upstream.as_mut() {
                    Some(s) => s.message().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = inbound.message() => {
                    // A message that does not decode ends the stream with its error.
                    let Some(ka) = msg? else { return Ok(()) };
                    let ctx = self.ctx.unary(proxy.cfg.default_timeout());
                    match proxy.check_lease(&self.scope, &ctx, ka.id).await {
                        Ok(()) => {}
                        Err(Error::LeaseNotFound) => {
                            let resp = LeaseKeepAliveResponse { header: last_header, id: ka.id, ttl: 0 };
                            if out.send(Ok(resp)).await.is_err() { return Ok(()) }
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    }
                    if let Some(tx) = &up_tx {
                        if tx.send(ka).await.is_err() { return Err(upstream_ended()) }
                        continue;
                    }
                    // First owned lease: open the upstream stream with it queued,
                    // since etcd sends response headers only with its first answer.
                    let (tx, rx) = mpsc::channel(KEEPALIVE_BUFFER);
                    let _ = tx.send(ka).await;
                    up_tx = Some(tx);
                    upstream = Some(proxy.backend.lease_keep_alive(&self.ctx, rx).await?);
                }
                resp = up_next => match resp? {
                    Some(r) => {
                        last_header = r.header;
                        if out.send(Ok(r)).await.is_err() { return Ok(()) }
                    }
                    None => return Err(upstream_ended()),
                }
            }
        }
    }
}

fn upstream_ended() -> Status {
    Status::unavailable("etcdmux: upstream keepalive stream ended")
}
