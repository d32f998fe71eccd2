//! Writes: Put, DeleteRange and Compact. A put into a slot this process has not
//! seen carries the slot's root-index key in the same upstream transaction; a delete
//! that spans roots is a one-op txn (`super::txn`): one upstream transaction guarded
//! by compares that the index did not grow meanwhile.

use super::index::{index_keys, RootIndex};
use super::{delete_op, put_op, validate, Proxy};
use crate::error::{Error, Result};
use bytes::Bytes;

use crate::keyspace::{slot_of, KeyLayout, KeyRef, RangeRef, Scope, TenantName};
use crate::metrics::names;
use crate::pb::etcdserverpb::{
    response_op, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, TxnRequest, TxnResponse,
};
use crate::upstream::{CallCtx, Retry};

/// Tenant `t`'s put of its key `key` as etcdmux writes it upstream: `req` with the
/// key placed in the layout, and the index keys of the key's slot (with
/// `tenant_index`, the earlier versions' form too), which must be written in the same
/// transaction unless known to exist. `etcdmux migrate` copies keys with this too, so
/// a copied key is exactly what a put would have made.
pub fn placed_put(
    layout: &KeyLayout,
    t: &TenantName,
    key: &[u8],
    mut req: PutRequest,
    tenant_index: bool,
) -> (PutRequest, Vec<Bytes>) {
    req.key = layout.encode(t, key);
    (req, index_keys(layout, t, &slot_of(key), tenant_index))
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
        req.key = self.layout.encode(&tenant, &key);
        let missing = self.index.missing(&self.layout, &tenant, &slot_of(&key));
        let mut resp = if missing.is_empty() {
            self.up_put(ctx, &req).await?
        } else {
            // The slot's first key (as far as this process knows): record the slot
            // in the same transaction, so no replica can miss it.
            let n = missing.len();
            let mut success: Vec<_> = missing.iter().cloned().map(RootIndex::put_op).collect();
            success.push(put_op(req));
            let resp = self.up_txn(ctx, &TxnRequest { success, ..Default::default() }, Retry::OnlyUnsent).await?;
            for k in missing {
                self.index.learn(k);
            }
            match resp.responses.into_iter().nth(n).and_then(|r| r.response) {
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
        // Across roots (`req` still in client form): as a one-op txn, which reads the index, guards the delete
        // with it and nests the pieces when they exceed etcd's op limit.
        let txn = TxnRequest { success: vec![delete_op(req)], ..Default::default() };
        let resp = self.txn(scope, ctx, txn).await?;
        match resp.responses.into_iter().next().and_then(|r| r.response) {
            Some(response_op::Response::ResponseDeleteRange(mut d)) => {
                d.header = resp.header;
                Ok(d)
            }
            other => Err(Error::Internal(format!("delete txn answered {other:?}"))),
        }
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
