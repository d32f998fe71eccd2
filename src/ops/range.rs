//! Range: a tenant range inside one resource root is one upstream range; a range
//! that spans roots is read as one upstream range per slot of the tenant's root
//! index, all at the revision the index was read at, and merged in etcd's order.

use crate::metrics::names;
use bytes::Bytes;

use super::merge::piece_request;
use super::{range_op, validate, Proxy, INDEX_RETRIES};
use crate::error::{Error, Result};
use crate::keyspace::{ClientPrefix, End, RangeRef, Scope, TenantName};
use crate::pb::etcdserverpb::{response_op, RangeRequest, RangeResponse, TxnRequest};
use crate::upstream::classify::EtcdError;
use crate::upstream::{CallCtx, Retry};

impl Proxy {
    pub async fn range(&self, scope: &Scope, ctx: &CallCtx, mut req: RangeRequest) -> Result<RangeResponse> {
        validate::range(&req)?;
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
        metrics::counter!(names::CROSS_ROOT_RANGES).increment(1);
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
                        if req.revision == 0 && attempt < INDEX_RETRIES && s.etcd() == Some(EtcdError::Compacted) =>
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
}
