//! The etcd backend: every call goes to the etcd cluster through the [`Upstream`]
//! pool, unchanged — retries and failover as [`crate::upstream::classify`] decides,
//! the client's deadline and `hasleader`, the call's trace context, and channels
//! rebuilt when the TLS files change. Streams report their failures to the pool, so
//! a dead endpoint is left for the next one as after a unary call.

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Backend, Call, Open, Responses};
use crate::config::Config;
use crate::pb::etcdserverpb::{
    AlarmRequest, AlarmResponse, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
    MemberListRequest, MemberListResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, StatusRequest,
    StatusResponse, TxnRequest, TxnResponse, WatchRequest, WatchResponse,
};
use crate::upstream::{CallCtx, Retry, StreamCtx, Upstream};

pub struct EtcdBackend {
    up: Arc<Upstream>,
}

impl EtcdBackend {
    pub fn new(cfg: &Config) -> Result<EtcdBackend, crate::certs::BoxError> {
        Ok(EtcdBackend { up: Arc::new(Upstream::new(cfg)?) })
    }

    /// Answers of an upstream stream on endpoint `ep`, each failure reported to the pool.
    fn reporting<T: Send + 'static>(&self, ep: usize, s: tonic::Streaming<T>) -> Responses<T> {
        let up = self.up.clone();
        Responses::new(s.map(move |r| r.inspect_err(|e| up.report(ep, e))))
    }
}

impl Backend for EtcdBackend {
    fn range<'a>(&'a self, ctx: &'a CallCtx, req: &'a RangeRequest) -> Call<'a, RangeResponse> {
        Box::pin(self.up.kv_call(ctx, Retry::Safe, req, |mut c, r| async move { c.range(r).await }))
    }

    fn put<'a>(&'a self, ctx: &'a CallCtx, req: &'a PutRequest) -> Call<'a, PutResponse> {
        Box::pin(self.up.kv_call(ctx, Retry::OnlyUnsent, req, |mut c, r| async move { c.put(r).await }))
    }

    fn delete_range<'a>(&'a self, ctx: &'a CallCtx, req: &'a DeleteRangeRequest) -> Call<'a, DeleteRangeResponse> {
        Box::pin(self.up.kv_call(ctx, Retry::OnlyUnsent, req, |mut c, r| async move { c.delete_range(r).await }))
    }

    fn txn<'a>(&'a self, ctx: &'a CallCtx, retry: Retry, req: &'a TxnRequest) -> Call<'a, TxnResponse> {
        Box::pin(self.up.kv_call(ctx, retry, req, |mut c, r| async move { c.txn(r).await }))
    }

    fn compact<'a>(&'a self, ctx: &'a CallCtx, req: &'a CompactionRequest) -> Call<'a, CompactionResponse> {
        Box::pin(self.up.kv_call(ctx, Retry::OnlyUnsent, req, |mut c, r| async move { c.compact(r).await }))
    }

    fn lease_grant<'a>(&'a self, ctx: &'a CallCtx, req: &'a LeaseGrantRequest) -> Call<'a, LeaseGrantResponse> {
        Box::pin(self.up.lease_call(ctx, Retry::OnlyUnsent, req, |mut c, r| async move { c.lease_grant(r).await }))
    }

    fn lease_revoke<'a>(&'a self, ctx: &'a CallCtx, req: &'a LeaseRevokeRequest) -> Call<'a, LeaseRevokeResponse> {
        // Revoking twice answers "not found" the second time, never revokes another lease.
        Box::pin(self.up.lease_call(ctx, Retry::Safe, req, |mut c, r| async move { c.lease_revoke(r).await }))
    }

    fn lease_time_to_live<'a>(
        &'a self,
        ctx: &'a CallCtx,
        req: &'a LeaseTimeToLiveRequest,
    ) -> Call<'a, LeaseTimeToLiveResponse> {
        Box::pin(self.up.lease_call(ctx, Retry::Safe, req, |mut c, r| async move { c.lease_time_to_live(r).await }))
    }

    fn lease_leases<'a>(&'a self, ctx: &'a CallCtx, req: &'a LeaseLeasesRequest) -> Call<'a, LeaseLeasesResponse> {
        Box::pin(self.up.lease_call(ctx, Retry::Safe, req, |mut c, r| async move { c.lease_leases(r).await }))
    }

    fn lease_keep_alive<'a>(
        &'a self,
        ctx: &'a StreamCtx,
        requests: mpsc::Receiver<LeaseKeepAliveRequest>,
    ) -> Open<'a, LeaseKeepAliveResponse> {
        Box::pin(async move {
            let (ep, ch) = self.up.stream_channel();
            match self.up.lease(ch).lease_keep_alive(ctx.request(ReceiverStream::new(requests))).await {
                Ok(s) => Ok(self.reporting(ep, s.into_inner())),
                Err(s) => {
                    self.up.report(ep, &s);
                    Err(s)
                }
            }
        })
    }

    fn watch<'a>(&'a self, ctx: &'a StreamCtx, requests: mpsc::Receiver<WatchRequest>) -> Open<'a, WatchResponse> {
        Box::pin(async move {
            let (ep, ch) = self.up.stream_channel();
            match self.up.watch(ch).watch(ctx.request(ReceiverStream::new(requests))).await {
                Ok(s) => Ok(self.reporting(ep, s.into_inner())),
                Err(s) => {
                    self.up.report(ep, &s);
                    Err(s)
                }
            }
        })
    }

    fn status<'a>(&'a self, ctx: &'a CallCtx, req: &'a StatusRequest) -> Call<'a, StatusResponse> {
        Box::pin(self.up.maintenance_call(ctx, Retry::Safe, req, |mut c, r| async move { c.status(r).await }))
    }

    fn alarm<'a>(&'a self, ctx: &'a CallCtx, req: &'a AlarmRequest) -> Call<'a, AlarmResponse> {
        Box::pin(self.up.maintenance_call(ctx, Retry::Safe, req, |mut c, r| async move { c.alarm(r).await }))
    }

    fn member_list<'a>(&'a self, ctx: &'a CallCtx, req: &'a MemberListRequest) -> Call<'a, MemberListResponse> {
        Box::pin(self.up.cluster_call(ctx, Retry::Safe, req, |mut c, r| async move { c.member_list(r).await }))
    }

    fn etcd(&self) -> Option<&Upstream> {
        Some(&self.up)
    }
}
