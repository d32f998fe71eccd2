//! The upstream txn built from a translated client txn, within etcd's limits and
//! within what etcdmux can decode of etcd's answer.
//!
//! **Ops per level.** etcd's `--max-txn-ops` bounds the compares and ops of each
//! txn level, and a nested txn may have what its parent level leaves
//! (`checkTxnRequest`: the parent's largest count is subtracted). A range or delete
//! that spans resource roots becomes one upstream op per slot, so a txn with a few
//! of them over a tenant with many roots would exceed the limit although the
//! client's txn is well within it. When the flat txn does not fit, it is built
//! again with every multi-piece op as one nested txn without compares (so always
//! taken) that holds the op's pieces, split over a second level of nested txns when
//! they are too many for one. etcd applies a nested txn's ops in place, in order,
//! inside the same transaction: every piece still reads or deletes exactly the state
//! at the client op's position, and its answers are taken apart again in `answer`.
//! A txn that fits in neither form is refused, naming the limit.
//!
//! **Nesting.** etcd's answer nests like the request (a `TxnResponse` holds
//! `ResponseOp`s that hold `TxnResponse`s), and prost refuses to decode messages
//! nested deeper than its recursion limit. etcd would apply such a txn and etcdmux
//! lose its answer, so a txn whose answer could be too deep (on either branch, with
//! the guard txn etcdmux may wrap around it and the nesting added here) is refused
//! before it is sent.

use std::cmp::max;

use super::translate::{Branch, OpPlan};
use crate::ops::index::RootIndex;
use crate::pb::etcdserverpb::{request_op, Compare, RequestOp, TxnRequest};

/// The deepest message prost decodes, counting the top-level message as level 0:
/// prost's recursion limit is 100 nested messages below it (checked by a test).
pub(super) const MAX_DECODE_LEVEL: usize = 100;

/// The upstream txn for `compare` and the two branches, where each branch may have
/// `budget` upstream ops (`max_txn_ops`, less what enclosing levels use): flat when
/// that fits, else with multi-piece ops nested; `None` when neither fits.
pub(super) fn build(
    compare: &[Compare],
    success: &mut Branch,
    failure: &mut Branch,
    budget: usize,
) -> Option<TxnRequest> {
    let flat = TxnRequest { compare: compare.to_vec(), success: success.build_flat(), failure: failure.build_flat() };
    if fits(&flat, budget) || !(success.packable() || failure.packable()) {
        // Nothing to gain by nesting: etcd judges it, as it would without etcdmux.
        return Some(flat);
    }
    build_packed(compare, success, failure, budget)
}

/// etcd's op limit (`checkTxnRequest`): at most `budget` compares and ops per
/// branch, nested txns within what their level leaves.
pub(super) fn fits(t: &TxnRequest, budget: usize) -> bool {
    let opc = t.compare.len().max(t.success.len()).max(t.failure.len());
    opc <= budget
        && t.success.iter().chain(&t.failure).all(|op| match &op.request {
            Some(request_op::Request::RequestTxn(inner)) => fits(inner, budget - opc),
            _ => true,
        })
}

/// The level of the deepest message etcd's answer to `t` may hold (either branch;
/// the `TxnResponse` is level 0): its header is one level down, a range, put or
/// delete answer holds key-values or a header three levels down, a nested txn's
/// answer is two levels down.
pub(super) fn answer_depth(t: &TxnRequest) -> usize {
    let mut deepest = 1;
    for op in t.success.iter().chain(&t.failure) {
        let d = match &op.request {
            Some(request_op::Request::RequestTxn(inner)) => 2 + answer_depth(inner),
            Some(_) => 3,
            None => 1,
        };
        deepest = max(deepest, d);
    }
    deepest
}

fn txn_op(success: Vec<RequestOp>) -> RequestOp {
    RequestOp { request: Some(request_op::Request::RequestTxn(TxnRequest { success, ..Default::default() })) }
}

/// `ops` as one nested txn at a level that allows `budget` ops per branch: directly
/// when they fit, else in `c` nested txns of at most `budget - c` ops each.
fn group(ops: Vec<RequestOp>, budget: usize) -> Option<RequestOp> {
    if ops.len() <= budget {
        return Some(txn_op(ops));
    }
    let c = (2..budget).find(|&c| ops.len().div_ceil(c) <= budget - c)?;
    let per = ops.len().div_ceil(c);
    let mut chunks = Vec::with_capacity(c);
    let mut rest = ops.into_iter();
    loop {
        let chunk: Vec<RequestOp> = rest.by_ref().take(per).collect();
        if chunk.is_empty() {
            break;
        }
        chunks.push(txn_op(chunk));
    }
    Some(txn_op(chunks))
}

/// Like [`build`], with every multi-piece op of every level nested; `None` when
/// that does not fit either.
fn build_packed(compare: &[Compare], success: &mut Branch, failure: &mut Branch, budget: usize) -> Option<TxnRequest> {
    let opc = compare.len().max(success.packed_len()).max(failure.packed_len());
    if opc > budget {
        return None;
    }
    let inner = budget - opc;
    Some(TxnRequest {
        compare: compare.to_vec(),
        success: success.build_packed(inner)?,
        failure: failure.build_packed(inner)?,
    })
}

impl Branch {
    /// Whether any op in this subtree has several pieces.
    fn packable(&self) -> bool {
        self.ops.iter().any(|op| match op {
            OpPlan::Range { pieces, .. } => pieces.len() > 1,
            OpPlan::Delete { pieces, .. } => pieces.len() > 1,
            OpPlan::Put { .. } => false,
            OpPlan::Txn { success, failure, .. } => success.packable() || failure.packable(),
        })
    }

    /// Upstream ops of this branch with every client op as one.
    fn packed_len(&self) -> usize {
        self.ops.len() + self.index_puts.len()
    }

    /// The upstream ops of this branch, every piece an op of its own.
    pub(super) fn build_flat(&mut self) -> Vec<RequestOp> {
        use request_op::Request as R;
        let mut out = Vec::new();
        for op in &mut self.ops {
            match op {
                OpPlan::Range { pieces, packed, .. } => {
                    *packed = false;
                    out.extend(pieces.iter().map(|p| R::RequestRange(p.clone())));
                }
                OpPlan::Delete { pieces, packed } => {
                    *packed = false;
                    out.extend(pieces.iter().map(|p| R::RequestDeleteRange(p.clone())));
                }
                OpPlan::Put { req, .. } => out.push(R::RequestPut(req.clone())),
                OpPlan::Txn { compare, success, failure } => out.push(R::RequestTxn(TxnRequest {
                    compare: compare.clone(),
                    success: success.build_flat(),
                    failure: failure.build_flat(),
                })),
            }
        }
        let mut ops: Vec<RequestOp> = out.into_iter().map(|r| RequestOp { request: Some(r) }).collect();
        ops.extend(self.index_puts.iter().cloned().map(RootIndex::put_op));
        ops
    }

    /// The upstream ops of this branch with multi-piece ops nested; nested txns get
    /// `budget` ops per branch.
    fn build_packed(&mut self, budget: usize) -> Option<Vec<RequestOp>> {
        use request_op::Request as R;
        let op = |r: R| RequestOp { request: Some(r) };
        let mut out = Vec::with_capacity(self.packed_len());
        for plan in &mut self.ops {
            match plan {
                OpPlan::Range { pieces, packed, .. } => {
                    let mut ops: Vec<RequestOp> = pieces.iter().map(|p| op(R::RequestRange(p.clone()))).collect();
                    *packed = ops.len() > 1;
                    out.push(if *packed { group(ops, budget)? } else { ops.pop()? });
                }
                OpPlan::Delete { pieces, packed } => {
                    let mut ops: Vec<RequestOp> = pieces.iter().map(|p| op(R::RequestDeleteRange(p.clone()))).collect();
                    *packed = ops.len() > 1;
                    out.push(if *packed { group(ops, budget)? } else { ops.pop()? });
                }
                OpPlan::Put { req, .. } => out.push(op(R::RequestPut(req.clone()))),
                OpPlan::Txn { compare, success, failure } => {
                    out.push(op(R::RequestTxn(build_packed(compare, success, failure, budget)?)))
                }
            }
        }
        out.extend(self.index_puts.iter().cloned().map(RootIndex::put_op));
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::etcdserverpb::{
        response_op, PutRequest, PutResponse, RangeRequest, ResponseHeader, ResponseOp, TxnResponse,
    };
    use bytes::Bytes;
    use prost::Message;

    fn put() -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: Bytes::from_static(b"k"),
                ..Default::default()
            })),
        }
    }

    fn nested(depth: usize, leaf: RequestOp) -> TxnRequest {
        let mut t = TxnRequest { success: vec![leaf], ..Default::default() };
        for _ in 0..depth {
            t = TxnRequest { success: vec![txn_op_of(t)], ..Default::default() };
        }
        t
    }

    fn txn_op_of(t: TxnRequest) -> RequestOp {
        RequestOp { request: Some(request_op::Request::RequestTxn(t)) }
    }

    /// etcd's answer to `nested(depth, put())`: every message present.
    fn answer(depth: usize) -> TxnResponse {
        let header = || Some(ResponseHeader::default());
        let leaf = response_op::Response::ResponsePut(PutResponse { header: header(), prev_kv: None });
        let mut t =
            TxnResponse { header: header(), succeeded: true, responses: vec![ResponseOp { response: Some(leaf) }] };
        for _ in 0..depth {
            let inner = response_op::Response::ResponseTxn(t);
            t = TxnResponse {
                header: header(),
                succeeded: true,
                responses: vec![ResponseOp { response: Some(inner) }],
            };
        }
        t
    }

    #[test]
    fn the_decode_limit_is_prosts() {
        // The put answer's header is the deepest message: level 2 * depth + 3.
        let deepest_ok = (MAX_DECODE_LEVEL - 3) / 2;
        for depth in [0, 10, deepest_ok] {
            assert!(answer_depth(&nested(depth, put())) <= MAX_DECODE_LEVEL);
            let bytes = answer(depth).encode_to_vec();
            assert!(TxnResponse::decode(bytes.as_slice()).is_ok(), "depth {depth}");
        }
        let too_deep = deepest_ok + 1;
        assert!(answer_depth(&nested(too_deep, put())) > MAX_DECODE_LEVEL);
        // Exactly at the limit: one message deeper than the deepest accepted answer.
        assert_eq!(answer_depth(&nested(too_deep, put())), MAX_DECODE_LEVEL + 1);
        let bytes = answer(too_deep).encode_to_vec();
        assert!(TxnResponse::decode(bytes.as_slice()).is_err(), "prost's limit moved: update MAX_DECODE_LEVEL");
    }

    #[test]
    fn answer_depths() {
        let empty = TxnRequest::default();
        assert_eq!(answer_depth(&empty), 1);
        assert_eq!(answer_depth(&nested(0, put())), 3);
        assert_eq!(answer_depth(&nested(1, put())), 5);
        let deep_failure =
            TxnRequest { success: vec![put()], failure: vec![txn_op_of(nested(2, put()))], ..Default::default() };
        assert_eq!(answer_depth(&deep_failure), 9, "either branch may be taken");
    }

    #[test]
    fn limits_per_level_as_etcd_counts_them() {
        let ops = |n: usize| (0..n).map(|_| put()).collect::<Vec<_>>();
        let flat = |n: usize| TxnRequest { success: ops(n), ..Default::default() };
        assert!(fits(&flat(4), 4) && !fits(&flat(5), 4));
        let with_child = |child: usize, siblings: usize| {
            let mut success = ops(siblings);
            success.push(txn_op_of(flat(child)));
            TxnRequest { success, ..Default::default() }
        };
        assert!(fits(&with_child(2, 1), 4), "2 ops at the top leave 2 for the child");
        assert!(!fits(&with_child(3, 1), 4));
        assert!(!fits(&TxnRequest { compare: vec![Compare::default(); 5], ..Default::default() }, 4));
    }

    #[test]
    fn groups_fit_their_level() {
        let pieces = |n: usize| {
            (0..n)
                .map(|i| RequestOp {
                    request: Some(request_op::Request::RequestRange(RangeRequest {
                        key: Bytes::from(format!("k{i:05}")),
                        ..Default::default()
                    })),
                })
                .collect::<Vec<_>>()
        };
        for (n, budget) in [(2, 2), (40, 123), (123, 123), (124, 123), (300, 123), (3000, 123), (6, 5)] {
            let g = group(pieces(n), budget).unwrap_or_else(|| panic!("{n} pieces in {budget}"));
            let Some(request_op::Request::RequestTxn(t)) = &g.request else { panic!("a txn") };
            assert!(fits(t, budget), "{n} pieces in {budget}");
            // Every piece once, in order.
            let mut keys = Vec::new();
            collect(&g, &mut keys);
            assert_eq!(keys, pieces(n).iter().map(key_of).collect::<Vec<_>>());
            assert!(answer_depth(t) <= 5, "at most two levels of nesting");
        }
        assert!(group(pieces(5000), 123).is_none(), "more than two levels would need");
        assert!(group(pieces(3), 2).is_none());
        assert!(group(pieces(7), 5).is_none(), "2 x 3 or 3 x 2 at most");
    }

    fn key_of(op: &RequestOp) -> Bytes {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => r.key.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn collect(op: &RequestOp, out: &mut Vec<Bytes>) {
        match &op.request {
            Some(request_op::Request::RequestTxn(t)) => t.success.iter().for_each(|o| collect(o, out)),
            _ => out.push(key_of(op)),
        }
    }
}
