//! Range: a tenant range inside one resource root is one upstream range; a range
//! that spans roots is read as one upstream range per slot of the tenant's root
//! index, all at the revision the index was read at, and merged in etcd's order.

use crate::metrics::names;
use bytes::Bytes;

use super::index::{with_index_attempts, Attempt};
use super::merge::piece_request;
use super::{range_op, validate, Proxy};
use crate::error::{Error, Result};
use crate::keyspace::{ClientPrefix, End, RangeRef, Scope, TenantName};
use crate::pb::etcdserverpb::{response_op, RangeRequest, RangeResponse, TxnRequest};
use crate::upstream::classify::EtcdError;
use crate::upstream::{CallCtx, Retry};

/// A tenant range across roots, as the client asked for it.
struct Across<'a> {
    t: &'a TenantName,
    cp: &'a ClientPrefix,
    start: &'a Bytes,
    end: &'a End,
    req: &'a RangeRequest,
}

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

    /// One upstream range: from the read replica when it can answer, else from etcd.
    pub(super) async fn up_range(&self, ctx: &CallCtx, req: &RangeRequest) -> Result<RangeResponse> {
        if let Some(replica) = &self.replica {
            if let Some(resp) = replica.range(&*self.backend, ctx, req).await {
                return Ok(resp);
            }
        }
        Ok(self.backend.range(ctx, req).await?)
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
        let q = Across { t, cp, start, end, req: &req };
        with_index_attempts("range", |last| self.range_attempt(ctx, &q, last)).await
    }

    /// Pieces read at one pinned revision from the read replica, if it can answer
    /// them all (else they go to etcd in one txn).
    async fn replica_ranges(&self, ctx: &CallCtx, reqs: &[RangeRequest]) -> Option<Vec<RangeResponse>> {
        let replica = self.replica.as_ref()?;
        let mut out = Vec::with_capacity(reqs.len());
        for r in reqs {
            out.push(replica.range(&*self.backend, ctx, r).await?);
        }
        Some(out)
    }

    /// One attempt of [`Self::range_across`].
    async fn range_attempt(&self, ctx: &CallCtx, q: &Across<'_>, last: bool) -> Result<Attempt<RangeResponse>> {
        let Across { t, cp, start, end, req } = *q;
        let snap = self.read_index(ctx, t, req.revision).await?;
        let pieces = self.layout.plan(t, start, end, &snap.slots);
        // A fresh read (revision 0, or negative: etcd reads those as "now") is pinned
        // to the index's revision, and reported at it: the apiserver starts its watch
        // right after the revision a list reports.
        let fresh = req.revision <= 0;
        let pin = if fresh { snap.revision } else { req.revision };
        let mut header = snap.header;
        let mut parts = Vec::with_capacity(pieces.len());
        for chunk in pieces.chunks(self.cfg.upstream.max_txn_ops) {
            let reqs: Vec<RangeRequest> = chunk
                .iter()
                .map(|p| {
                    let mut r = piece_request(req, p.key.clone(), p.range_end.clone(), pieces.len() > 1);
                    r.revision = pin;
                    r
                })
                .collect();
            if let Some(local) = self.replica_ranges(ctx, &reqs).await {
                parts.extend(local);
                continue;
            }
            let txn = TxnRequest { success: reqs.into_iter().map(range_op).collect(), ..Default::default() };
            match self.up_txn(ctx, &txn, Retry::Safe).await {
                Ok(resp) => {
                    if !fresh && header.is_none() {
                        header = resp.header;
                    }
                    for r in resp.responses {
                        match r.response {
                            Some(response_op::Response::ResponseRange(rr)) => parts.push(rr),
                            other => return Err(Error::Internal(format!("range txn answered {other:?}"))),
                        }
                    }
                }
                // The pinned revision was compacted between the index read and this
                // read: read again at a newer revision.
                Err(Error::Upstream(s)) if fresh && !last && s.etcd() == Some(EtcdError::Compacted) => {
                    return Ok(Attempt::Retry)
                }
                Err(e) => return Err(e),
            }
        }
        let view = (t.clone(), cp.clone());
        let mut resp = self.merge_ranges(Some(&view), req, parts)?;
        resp.header = header;
        Ok(Attempt::Done(resp))
    }
}
