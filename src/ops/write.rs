//! Writes: Put, DeleteRange and Compact. A put into a slot this process has not
//! seen carries the slot's root-index key in the same upstream transaction; a delete
//! that spans roots is one upstream transaction guarded by a compare that the
//! tenant's index did not grow meanwhile.

use super::index::{with_index_attempts, Attempt, RootIndex};
use super::{delete_op, index_unchanged_since, put_op, validate, Proxy};
use crate::error::{Error, Result};
use bytes::Bytes;

use crate::keyspace::{slot_of, ClientPrefix, End, KeyLayout, KeyRef, RangeRef, Scope, TenantName};
use crate::metrics::names;
use crate::pb::etcdserverpb::{
    response_op, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, TxnRequest, TxnResponse,
};
use crate::upstream::{CallCtx, Retry};

/// Tenant `t`'s put of its key `key` as etcdmux writes it upstream: `req` with the
/// key placed in the layout, and the root-index key of the key's slot, which must be
/// written in the same transaction unless it is known to exist. `etcdmux migrate`
/// copies keys with this too, so a copied key is exactly what a put would have made.
pub fn placed_put(layout: &KeyLayout, t: &TenantName, key: &[u8], mut req: PutRequest) -> (PutRequest, Bytes) {
    req.key = layout.encode(t, key);
    (req, layout.index_key(t, &slot_of(key)))
}

impl Proxy {
    pub async fn put(&self, scope: &Scope, ctx: &CallCtx, mut req: PutRequest) -> Result<PutResponse> {
        validate::put(&req)?;
        let (tenant, key) = match self.resolver.resolve_key(scope, &req.key)? {
            KeyRef::Raw { key, global } => {
                if global {
                    self.resolver.require_admin(scope, "writing a global key")?;
                }
                // Every put with a lease, global and passthrough keys too: another
                // principal's lease answers like a lease that does not exist.
                if req.lease != 0 {
                    self.check_lease(scope, ctx, req.lease).await?;
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
        let (req, index_key) = placed_put(&self.layout, &tenant, &key, req);
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
        Ok(self.backend.put(ctx, req).await?)
    }

    pub async fn up_txn(&self, ctx: &CallCtx, req: &TxnRequest, retry: Retry) -> Result<TxnResponse> {
        Ok(self.backend.txn(ctx, retry, req).await?)
    }

    pub async fn delete_range(
        &self,
        scope: &Scope,
        ctx: &CallCtx,
        mut req: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse> {
        validate::delete(&req)?;
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
        metrics::counter!(names::CROSS_ROOT_DELETES).increment(1);
        let prev_kv = req.prev_kv;
        with_index_attempts("delete", |_| self.delete_attempt(ctx, &tenant, &cp, &start, &end, prev_kv)).await
    }

    /// One attempt of a cross-root delete: read the index, delete every piece in
    /// one upstream txn guarded by the index not having grown since.
    async fn delete_attempt(
        &self,
        ctx: &CallCtx,
        tenant: &TenantName,
        cp: &ClientPrefix,
        start: &Bytes,
        end: &End,
        prev_kv: bool,
    ) -> Result<Attempt<DeleteRangeResponse>> {
        let snap = self.read_index(ctx, tenant, 0).await?;
        let pieces = self.layout.plan(tenant, start, end, &snap.slots);
        if pieces.is_empty() {
            return Ok(Attempt::Done(DeleteRangeResponse { header: snap.header, ..Default::default() }));
        }
        if pieces.len() > self.cfg.upstream.max_txn_ops {
            // One atomic delete cannot be split; etcd's own limit applies.
            return Err(Error::TooManyOps);
        }
        let txn = TxnRequest {
            compare: vec![index_unchanged_since(self.layout.index_range(tenant), snap.revision)],
            success: pieces
                .into_iter()
                .map(|p| delete_op(DeleteRangeRequest { key: p.key, range_end: p.range_end, prev_kv }))
                .collect(),
            failure: vec![],
        };
        let resp = self.up_txn(ctx, &txn, Retry::OnlyUnsent).await?;
        if !resp.succeeded {
            return Ok(Attempt::Retry); // the tenant wrote a new slot meanwhile: plan again
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
            self.render_kv(tenant, cp, kv)?;
        }
        out.prev_kvs.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Attempt::Done(out))
    }

    async fn up_delete(&self, ctx: &CallCtx, req: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        Ok(self.backend.delete_range(ctx, req).await?)
    }

    pub async fn compact(&self, scope: &Scope, ctx: &CallCtx, req: CompactionRequest) -> Result<CompactionResponse> {
        // History is shared by every tenant: only the admin may drop it.
        self.resolver.require_admin(scope, "Compact")?;
        let resp = self.backend.compact(ctx, &req).await?;
        if let Some(replica) = &self.replica {
            replica.on_compacted(req.revision);
        }
        Ok(resp)
    }
}
