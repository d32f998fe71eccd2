//! The KV service: Range, Put, DeleteRange, Txn (in `txn.rs`) and Compact.
//!
//! Every key is resolved to its tenant, placed with the key layout, sent upstream,
//! and every key in the answer is rendered back into client form. A range inside one
//! resource root is one upstream request with etcd's own limit/count/more. A range
//! that spans roots is read as one upstream range per slot of the tenant's root
//! index, all at the revision the index was read at, and merged in etcd's order; a
//! delete that spans roots is one upstream transaction, guarded by a compare that
//! the index did not grow meanwhile.

use std::sync::Arc;

use bytes::Bytes;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::index::RootIndex;
use crate::keylayout::{slot_of, Piece};
use crate::pb::etcdserverpb::{
    compare, kv_server::Kv, range_request::SortOrder, range_request::SortTarget, request_op, response_op,
    CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, RequestOp, TxnRequest, TxnResponse,
};
use crate::pb::mvccpb::KeyValue;
use crate::proxy::Proxy;
use crate::tenant::{ClientPrefix, End, KeyRef, RangeRef, Scope, TenantName};
use crate::txn::piece_request;
use crate::upstream::{CallCtx, Retry};

/// Retries of a cross-root operation whose index changed under it.
const INDEX_RETRIES: usize = 5;

pub struct KvService {
    proxy: Arc<Proxy>,
    scope: Scope,
}

impl KvService {
    pub fn new(proxy: Arc<Proxy>, scope: Scope) -> KvService {
        KvService { proxy, scope }
    }
}

/// The tracing span of one request; `tenant` is filled in once resolved.
pub fn request_span(service: &'static str, op: &'static str) -> tracing::Span {
    tracing::debug_span!("request", service, op, tenant = tracing::field::Empty)
}

/// Runs one unary call's work in its span and turns the result into the gRPC answer:
/// the one place where etcdmux's errors become statuses.
pub async fn answer<T>(
    service: &'static str,
    op: &'static str,
    work: impl std::future::Future<Output = Result<T>>,
) -> std::result::Result<Response<T>, Status> {
    Ok(Response::new(work.instrument(request_span(service, op)).await?))
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        answer("kv", "range", self.proxy.range(&self.scope, &ctx, req.into_inner())).await
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        answer("kv", "put", self.proxy.put(&self.scope, &ctx, req.into_inner())).await
    }

    async fn delete_range(&self, req: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        answer("kv", "delete_range", self.proxy.delete_range(&self.scope, &ctx, req.into_inner())).await
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        answer("kv", "txn", self.proxy.txn(&self.scope, &ctx, req.into_inner())).await
    }

    async fn compact(&self, req: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        answer("kv", "compact", self.proxy.compact(&self.scope, &ctx, req.into_inner())).await
    }
}

fn range_op(r: RangeRequest) -> RequestOp {
    RequestOp { request: Some(request_op::Request::RequestRange(r)) }
}

fn delete_op(r: DeleteRangeRequest) -> RequestOp {
    RequestOp { request: Some(request_op::Request::RequestDeleteRange(r)) }
}

fn put_op(r: PutRequest) -> RequestOp {
    RequestOp { request: Some(request_op::Request::RequestPut(r)) }
}

/// A compare that holds while no index key of the tenant was created after `rev`:
/// the guard that makes a cross-root write see every slot.
pub fn index_unchanged_since(range: Piece, rev: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Less as i32,
        target: compare::CompareTarget::Create as i32,
        key: range.key,
        range_end: range.range_end,
        target_union: Some(compare::TargetUnion::CreateRevision(rev + 1)),
    }
}

/// Sorts merged key-values the way etcd orders one range's answer: by the sort
/// target (ascending by default when the target is not the key), reversed for
/// DESCEND; etcd reverses only the target comparison, so ties stay in ascending
/// key order.
pub fn sort_kvs(kvs: &mut [KeyValue], req: &RangeRequest) {
    let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    let descend = SortOrder::try_from(req.sort_order) == Ok(SortOrder::Descend);
    kvs.sort_by(|a, b| {
        let primary = match target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        };
        let primary = if descend { primary.reverse() } else { primary };
        primary.then_with(|| a.key.cmp(&b.key))
    });
}

impl Proxy {
    pub async fn range(&self, scope: &Scope, ctx: &CallCtx, mut req: RangeRequest) -> Result<RangeResponse> {
        match self.resolver.resolve_range(scope, &req.key, &req.range_end)? {
            RangeRef::Raw { key, range_end, .. } => {
                req.key = key;
                req.range_end = range_end;
                self.up_range(ctx, &req).await
            }
            RangeRef::Tenant { tenant, start, end } => {
                let cp = self.tenant_view(scope, &tenant)?;
                if let Some(p) = self.layout.plan_fast(&tenant, &start, &end) {
                    req.key = p.key;
                    req.range_end = p.range_end;
                    let mut resp = self.up_range(ctx, &req).await?;
                    for kv in &mut resp.kvs {
                        self.render_kv(&tenant, &cp, kv)?;
                    }
                    return Ok(resp);
                }
                self.range_across(ctx, &tenant, &cp, &start, &end, req).await
            }
        }
    }

    async fn up_range(&self, ctx: &CallCtx, req: &RangeRequest) -> Result<RangeResponse> {
        Ok(self.upstream.kv_call(ctx, Retry::Safe, req, |mut c, r| async move { c.range(r).await }).await?)
    }

    /// A range over several slots: read the index, then every piece at the index's
    /// revision (in transactions of at most `max_txn_ops` ranges), then merge.
    async fn range_across(
        &self,
        ctx: &CallCtx,
        t: &TenantName,
        cp: &ClientPrefix,
        start: &Bytes,
        end: &End,
        req: RangeRequest,
    ) -> Result<RangeResponse> {
        metrics::counter!("etcdmux_cross_root_ranges_total").increment(1);
        let mut attempt = 0;
        loop {
            let snap = self.read_index(ctx, t, req.revision).await?;
            let pieces = self.layout.plan(t, start, end, &snap.slots);
            // A fresh read is pinned to the index's revision, and reported at it: the
            // apiserver starts its watch right after the revision a list reports.
            let pin = if req.revision > 0 { req.revision } else { snap.revision };
            let mut header = snap.header;
            let mut parts = Vec::with_capacity(pieces.len());
            let mut compacted_meanwhile = false;
            for chunk in pieces.chunks(self.cfg.upstream.max_txn_ops) {
                let txn = TxnRequest {
                    success: chunk
                        .iter()
                        .map(|p| {
                            let mut r = piece_request(&req, p.key.clone(), p.range_end.clone(), pieces.len() > 1);
                            r.revision = pin;
                            range_op(r)
                        })
                        .collect(),
                    ..Default::default()
                };
                match self.up_txn(ctx, &txn, Retry::Safe).await {
                    Ok(resp) => {
                        if req.revision > 0 && header.is_none() {
                            header = resp.header;
                        }
                        for r in resp.responses {
                            match r.response {
                                Some(response_op::Response::ResponseRange(rr)) => parts.push(rr),
                                other => return Err(Error::Internal(format!("range txn answered {other:?}"))),
                            }
                        }
                    }
                    // The pinned revision was compacted between the index read and
                    // this read: read again at a newer revision.
                    Err(Error::Upstream(s))
                        if req.revision == 0 && attempt < INDEX_RETRIES && s.message().contains("compacted") =>
                    {
                        compacted_meanwhile = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if compacted_meanwhile {
                attempt += 1;
                continue;
            }
            let view = (t.clone(), cp.clone());
            let mut resp = self.merge_ranges(Some(&view), &req, parts)?;
            resp.header = header;
            return Ok(resp);
        }
    }

    pub async fn put(&self, scope: &Scope, ctx: &CallCtx, mut req: PutRequest) -> Result<PutResponse> {
        let (tenant, key) = match self.resolver.resolve_key(scope, &req.key)? {
            KeyRef::Raw { key, global } => {
                if global {
                    self.resolver.require_admin(scope, "writing a global key")?;
                }
                req.key = key;
                return self.up_put(ctx, &req).await;
            }
            KeyRef::Tenant { tenant, key } => (tenant, key),
        };
        let cp = self.tenant_view(scope, &tenant)?;
        if req.lease != 0 {
            self.check_lease(scope, ctx, req.lease).await?;
        }
        req.key = self.layout.encode(&tenant, &key);
        let index_key = self.layout.index_key(&tenant, &slot_of(&key));
        let mut resp = if self.index.is_known(&index_key) {
            self.up_put(ctx, &req).await?
        } else {
            // The slot's first key (as far as this process knows): record the slot
            // in the same transaction, so no replica can miss it.
            let txn =
                TxnRequest { success: vec![RootIndex::put_op(index_key.clone()), put_op(req)], ..Default::default() };
            let resp = self.up_txn(ctx, &txn, Retry::OnlyUnsent).await?;
            self.index.learn(index_key);
            match resp.responses.into_iter().nth(1).and_then(|r| r.response) {
                Some(response_op::Response::ResponsePut(mut p)) => {
                    p.header = resp.header;
                    p
                }
                other => return Err(Error::Internal(format!("put txn answered {other:?}"))),
            }
        };
        if let Some(prev) = &mut resp.prev_kv {
            self.render_kv(&tenant, &cp, prev)?;
        }
        Ok(resp)
    }

    async fn up_put(&self, ctx: &CallCtx, req: &PutRequest) -> Result<PutResponse> {
        Ok(self.upstream.kv_call(ctx, Retry::OnlyUnsent, req, |mut c, r| async move { c.put(r).await }).await?)
    }

    pub async fn up_txn(&self, ctx: &CallCtx, req: &TxnRequest, retry: Retry) -> Result<TxnResponse> {
        Ok(self.upstream.kv_call(ctx, retry, req, |mut c, r| async move { c.txn(r).await }).await?)
    }

    pub async fn delete_range(
        &self,
        scope: &Scope,
        ctx: &CallCtx,
        mut req: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse> {
        let (tenant, start, end) = match self.resolver.resolve_range(scope, &req.key, &req.range_end)? {
            RangeRef::Raw { key, range_end, global } => {
                if global {
                    self.resolver.require_admin(scope, "deleting a global key")?;
                }
                req.key = key;
                req.range_end = range_end;
                return self.up_delete(ctx, &req).await;
            }
            RangeRef::Tenant { tenant, start, end } => (tenant, start, end),
        };
        let cp = self.tenant_view(scope, &tenant)?;
        if let Some(p) = self.layout.plan_fast(&tenant, &start, &end) {
            req.key = p.key;
            req.range_end = p.range_end;
            let mut resp = self.up_delete(ctx, &req).await?;
            for kv in &mut resp.prev_kvs {
                self.render_kv(&tenant, &cp, kv)?;
            }
            return Ok(resp);
        }
        metrics::counter!("etcdmux_cross_root_deletes_total").increment(1);
        for _ in 0..INDEX_RETRIES {
            let snap = self.read_index(ctx, &tenant, 0).await?;
            let pieces = self.layout.plan(&tenant, &start, &end, &snap.slots);
            if pieces.is_empty() {
                return Ok(DeleteRangeResponse { header: snap.header, ..Default::default() });
            }
            if pieces.len() > self.cfg.upstream.max_txn_ops {
                // One atomic delete cannot be split; etcd's own limit applies.
                return Err(Error::TooManyOps);
            }
            let txn = TxnRequest {
                compare: vec![index_unchanged_since(self.layout.index_range(&tenant), snap.revision)],
                success: pieces
                    .into_iter()
                    .map(|p| delete_op(DeleteRangeRequest { key: p.key, range_end: p.range_end, prev_kv: req.prev_kv }))
                    .collect(),
                failure: vec![],
            };
            let resp = self.up_txn(ctx, &txn, Retry::OnlyUnsent).await?;
            if !resp.succeeded {
                continue; // the tenant wrote a new slot meanwhile: plan again
            }
            let mut out = DeleteRangeResponse { header: resp.header, ..Default::default() };
            for r in resp.responses {
                match r.response {
                    Some(response_op::Response::ResponseDeleteRange(mut d)) => {
                        out.deleted += d.deleted;
                        out.prev_kvs.append(&mut d.prev_kvs);
                    }
                    other => return Err(Error::Internal(format!("delete txn answered {other:?}"))),
                }
            }
            for kv in &mut out.prev_kvs {
                self.render_kv(&tenant, &cp, kv)?;
            }
            out.prev_kvs.sort_by(|a, b| a.key.cmp(&b.key));
            return Ok(out);
        }
        Err(Error::Unavailable("the tenant's root index kept changing during a delete; retry".to_string()))
    }

    async fn up_delete(&self, ctx: &CallCtx, req: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        Ok(self
            .upstream
            .kv_call(ctx, Retry::OnlyUnsent, req, |mut c, r| async move { c.delete_range(r).await })
            .await?)
    }

    pub async fn compact(&self, scope: &Scope, ctx: &CallCtx, req: CompactionRequest) -> Result<CompactionResponse> {
        // History is shared by every tenant: only the admin may drop it.
        self.resolver.require_admin(scope, "Compact")?;
        Ok(self.upstream.kv_call(ctx, Retry::OnlyUnsent, &req, |mut c, r| async move { c.compact(r).await }).await?)
    }
}
