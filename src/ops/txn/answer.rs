//! Upstream txn answers mapped back to the client's txn: pieces merged, keys in
//! client form, nested txns followed down the branch etcd took.

use bytes::Bytes;

use super::translate::{Branch, OpPlan};
use crate::error::{Error, Result};
use crate::keyspace::{ClientPrefix, TenantName};
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{response_op, DeleteRangeResponse, ResponseOp};

/// Maps upstream answers back to client answers.
pub(super) struct Answer<'a> {
    pub(super) proxy: &'a Proxy,
    /// The tenant and its client prefix; `None` for raw-key txns.
    pub(super) view: Option<(TenantName, ClientPrefix)>,
    pub(super) learned: Vec<Bytes>,
}

impl Answer<'_> {
    pub(super) fn branch(&mut self, plan: &Branch, resps: Vec<ResponseOp>) -> Result<Vec<ResponseOp>> {
        let mut it = resps.into_iter();
        let mut out = Vec::with_capacity(plan.ops.len());
        for op in &plan.ops {
            use response_op::Response as P;
            let resp = match op {
                OpPlan::Range { pieces, orig, packed } => {
                    let mut parts = Vec::with_capacity(pieces.len());
                    let mut it = pieces_of(&mut it, *packed)?;
                    for _ in pieces {
                        match it.next().and_then(|r| r.response) {
                            Some(P::ResponseRange(r)) => parts.push(r),
                            other => return Err(Error::Internal(format!("txn range answered {other:?}"))),
                        }
                    }
                    P::ResponseRange(self.proxy.merge_ranges(self.view.as_ref(), orig, parts)?)
                }
                OpPlan::Delete { pieces, packed } => {
                    let mut d = DeleteRangeResponse::default();
                    let mut it = pieces_of(&mut it, *packed)?;
                    for _ in pieces {
                        match it.next().and_then(|r| r.response) {
                            Some(P::ResponseDeleteRange(mut part)) => {
                                // Inside a txn a header holds the revision after the op:
                                // the last piece's is the whole delete's.
                                d.header = part.header.or(d.header);
                                d.deleted += part.deleted;
                                d.prev_kvs.append(&mut part.prev_kvs);
                            }
                            other => return Err(Error::Internal(format!("txn delete answered {other:?}"))),
                        }
                    }
                    if let Some((t, cp)) = &self.view {
                        for kv in &mut d.prev_kvs {
                            self.proxy.render_kv(t, cp, kv)?;
                        }
                    }
                    if pieces.len() > 1 {
                        d.prev_kvs.sort_by(|a, b| a.key.cmp(&b.key));
                    }
                    P::ResponseDeleteRange(d)
                }
                OpPlan::Put { .. } => match it.next().and_then(|r| r.response) {
                    Some(P::ResponsePut(mut p)) => {
                        if let (Some(prev), Some((t, cp))) = (&mut p.prev_kv, &self.view) {
                            self.proxy.render_kv(t, cp, prev)?;
                        }
                        P::ResponsePut(p)
                    }
                    other => return Err(Error::Internal(format!("txn put answered {other:?}"))),
                },
                OpPlan::Txn { success, failure, .. } => match it.next().and_then(|r| r.response) {
                    Some(P::ResponseTxn(mut t)) => {
                        let taken = if t.succeeded { success } else { failure };
                        t.responses = self.branch(taken, std::mem::take(&mut t.responses))?;
                        P::ResponseTxn(t)
                    }
                    other => return Err(Error::Internal(format!("nested txn answered {other:?}"))),
                },
            };
            out.push(ResponseOp { response: Some(resp) });
        }
        // The remaining answers are this branch's index puts, now committed.
        self.learned.extend(plan.index_puts.iter().cloned());
        Ok(out)
    }
}

/// The answers to one op's pieces: the next answers of the branch, or, for a packed
/// op, the answers inside the one nested txn answer it was sent as (see `fit`), in
/// order.
fn pieces_of<'a>(
    it: &'a mut std::vec::IntoIter<ResponseOp>,
    packed: bool,
) -> Result<Box<dyn Iterator<Item = ResponseOp> + 'a>> {
    if !packed {
        return Ok(Box::new(it));
    }
    let mut leaves = Vec::new();
    match it.next().and_then(|r| r.response) {
        Some(response_op::Response::ResponseTxn(t)) => flatten(t.responses, &mut leaves),
        other => return Err(Error::Internal(format!("packed pieces answered {other:?}"))),
    }
    Ok(Box::new(leaves.into_iter()))
}

/// The non-txn answers in nested txn answers, in order.
fn flatten(resps: Vec<ResponseOp>, out: &mut Vec<ResponseOp>) {
    for r in resps {
        match r.response {
            Some(response_op::Response::ResponseTxn(t)) => flatten(t.responses, out),
            _ => out.push(r),
        }
    }
}
