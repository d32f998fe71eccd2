//! The KV service: Range, Put, DeleteRange, Txn and Compact, each handed to the
//! [`Proxy`] in the caller's scope.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::answer;
use super::tls::ScopeSource;
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{
    kv_server::Kv, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};

pub struct KvService {
    proxy: Arc<Proxy>,
    scope: ScopeSource,
}

impl KvService {
    pub fn new(proxy: Arc<Proxy>, scope: impl Into<ScopeSource>) -> KvService {
        KvService { proxy, scope: scope.into() }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        let scope = self.scope.of(&self.proxy.resolver, &req)?;
        answer(self.proxy.range(&scope, &ctx, req.into_inner())).await
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        let scope = self.scope.of(&self.proxy.resolver, &req)?;
        answer(self.proxy.put(&scope, &ctx, req.into_inner())).await
    }

    async fn delete_range(&self, req: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        let scope = self.scope.of(&self.proxy.resolver, &req)?;
        answer(self.proxy.delete_range(&scope, &ctx, req.into_inner())).await
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        let scope = self.scope.of(&self.proxy.resolver, &req)?;
        answer(self.proxy.txn(&scope, &ctx, req.into_inner())).await
    }

    async fn compact(&self, req: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        let scope = self.scope.of(&self.proxy.resolver, &req)?;
        answer(self.proxy.compact(&scope, &ctx, req.into_inner())).await
    }
}
