//! The Lease service. Unary calls go to the [`Proxy`]; each client KeepAlive stream
//! is relayed over one upstream stream, opened on its first lease the caller owns.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::{answer, request_span};
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
    scope: Scope,
}

impl LeaseService {
    pub fn new(proxy: Arc<Proxy>, scope: Scope) -> LeaseService {
        LeaseService { proxy, scope }
    }
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

/// Buffer between a client's keepalive stream and etcd's, per direction.
const KEEPALIVE_BUFFER: usize = 64;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(&self, req: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        answer("lease", "grant", self.proxy.lease_grant(&self.scope, &ctx, req.into_inner())).await
    }

    async fn lease_revoke(&self, req: Request<LeaseRevokeRequest>) -> Result<Response<LeaseRevokeResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        answer("lease", "revoke", self.proxy.lease_revoke(&self.scope, &ctx, req.into_inner())).await
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    /// Each client stream gets one upstream stream, opened on its first owned lease.
    /// Keepalives for leases the principal does not own are answered here with
    /// TTL 0, which is etcd's answer for a lease that does not exist.
    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let proxy = self.proxy.clone();
        let scope = self.scope.clone();
        // A stream: no deadline unless the client sent one; lease checks get the default.
        let sctx = StreamCtx::from_request(&req);
        let mut inbound = req.into_inner();
        let (out_tx, out_rx) = mpsc::channel(KEEPALIVE_BUFFER);
        tokio::spawn(
            async move {
                let mut up_tx: Option<mpsc::Sender<LeaseKeepAliveRequest>> = None;
                let mut upstream: Option<Streaming<LeaseKeepAliveResponse>> = None;
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
                            let Ok(Some(ka)) = msg else { break };
                            let ctx = sctx.unary(proxy.cfg.default_timeout());
                            match proxy.check_lease(&scope, &ctx, ka.id).await {
                                Ok(()) => {}
                                Err(Error::LeaseNotFound) => {
                                    let resp = LeaseKeepAliveResponse { header: last_header, id: ka.id, ttl: 0 };
                                    if out_tx.send(Ok(resp)).await.is_err() { break }
                                    continue;
                                }
                                Err(e) => { let _ = out_tx.send(Err(e.into())).await; break }
                            }
                            if let Some(tx) = &up_tx {
                                if tx.send(ka).await.is_err() { break }
                                continue;
                            }
                            // First owned lease: open the upstream stream with it queued,
                            // since etcd sends response headers only with its first answer.
                            let (tx, rx) = mpsc::channel(KEEPALIVE_BUFFER);
                            let _ = tx.send(ka).await;
                            up_tx = Some(tx);
                            let (ep, ch) = proxy.upstream.stream_channel();
                            let mut client = proxy.upstream.lease(ch);
                            match client.lease_keep_alive(sctx.request(ReceiverStream::new(rx))).await {
                                Ok(s) => upstream = Some(s.into_inner()),
                                Err(s) => {
                                    proxy.upstream.report(ep, &s);
                                    let _ = out_tx.send(Err(s)).await;
                                    break
                                }
                            }
                        }
                        resp = up_next => match resp {
                            Ok(Some(r)) => {
                                last_header = r.header;
                                if out_tx.send(Ok(r)).await.is_err() { break }
                            }
                            Ok(None) => { let _ = out_tx.send(Err(Status::unavailable("etcdmux: upstream keepalive stream ended"))).await; break }
                            Err(s) => { let _ = out_tx.send(Err(s)).await; break }
                        }
                    }
                }
            }
            .instrument(request_span("lease", "keep_alive")),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        answer("lease", "time_to_live", self.proxy.lease_time_to_live(&self.scope, &ctx, req.into_inner())).await
    }

    async fn lease_leases(&self, req: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        answer("lease", "leases", self.proxy.lease_leases(&self.scope, &ctx, req.into_inner())).await
    }
}
