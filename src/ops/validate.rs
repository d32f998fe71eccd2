//! etcd's own checks of KV requests, applied to the client's request before
//! anything is resolved or sent upstream, in etcd's order and with etcd's errors
//! (`checkRangeRequest`, `checkPutRequest`, `checkDeleteRequest`, `checkTxnRequest`
//! and `checkRequestOp` in etcd's `server/etcdserver/api/v3rpc/key.go`).
//!
//! etcd 3.4 does not check the sort fields, and panics on a sort target it has no
//! sorter for (`Range(sort_target=99)` or `sort_order=ASCEND, sort_target=-7`,
//! alone or inside a txn): one request would take the shared etcd down for every
//! tenant. etcd 3.6 refuses them (`etcdserver: invalid sort option`); so does
//! etcdmux, whatever etcd it fronts.
//!
//! Every field of every KV request, and what etcd (3.4 to 3.6) does with values out
//! of the ordinary:
//!
//! | request | field | out-of-range value | etcd | etcdmux |
//! |---|---|---|---|---|
//! | Range | `key` | empty | `key is not provided` | the same, first |
//! | Range | `sort_order`, `sort_target` | not an enum value | 3.4: panic (nil sorter); 3.6: `invalid sort option` | `invalid sort option`, after the key |
//! | Range | `limit` | negative | no limit | forwarded; merges treat it as no limit |
//! | Range | `limit` | `i64::MAX` | everything (`limit+1` wraps in Go) | pieces ask for `limit+1` saturated |
//! | Range | `revision` | negative | the current revision | forwarded; cross-root reads pin the index's revision |
//! | Range | `min/max_mod/create_revision` | any | filters (negative ones prune everything or nothing) | forwarded to every piece |
//! | Range | `keys_only`, `count_only`, `serializable` | booleans | — | forwarded |
//! | Put | `key` | empty | `key is not provided` | the same |
//! | Put | `ignore_value` with a `value` | | `value is provided` | the same, before any lease check |
//! | Put | `ignore_lease` with a `lease` | | `lease is provided` | the same, before any lease check |
//! | Put | `lease` | unknown, negative, another tenant's | `requested lease not found` | the same for every lease the caller does not own |
//! | Put | `key`, `value` sizes | over `--max-request-bytes` | `request is too large` | forwarded (decoded up to `server.max_request_bytes`; the layout adds the resource path and tenant to the key) |
//! | DeleteRange | `key` | empty | `key is not provided` | the same |
//! | Txn | ops per branch, compares | more than `--max-txn-ops` (nested txns: what the levels above leave) | `too many operations in txn request` | the same, against `upstream.max_txn_ops` |
//! | Txn | compare `key` | empty | `key is not provided` | the same |
//! | Txn | compare `result`, `target` | not an enum value | evaluated (unknown result: true; unknown target: equal) | forwarded unchanged |
//! | Txn | compare `target_union` | missing or not matching `target` | compared against zero / the empty value | forwarded unchanged |
//! | Txn | op | no request | `key not found` | the same |
//! | Txn | range op `revision` | negative, compacted, future | `compacted` / `future revision` for the whole txn | forwarded to every piece |
//! | Txn | nesting | deeper than etcdmux can decode etcd's answer | applied | refused before sending (see `ops::txn`) |
//! | Compact | `revision` | negative, compacted, future | `compacted` / `future revision` | forwarded (admin only) |

use crate::error::{Error, Result};
use crate::keyspace::KeyError;
use crate::pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::pb::etcdserverpb::{request_op, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest};

/// etcd's `checkRangeRequest`: a key, and sort fields that name a sort.
pub fn range(r: &RangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::Key(KeyError::EmptyKey));
    }
    if SortOrder::try_from(r.sort_order).is_err() || SortTarget::try_from(r.sort_target).is_err() {
        return Err(Error::InvalidSortOption);
    }
    Ok(())
}

/// etcd's `checkPutRequest`.
pub fn put(r: &PutRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::Key(KeyError::EmptyKey));
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(Error::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(Error::LeaseProvided);
    }
    Ok(())
}

/// etcd's `checkDeleteRequest`.
pub fn delete(r: &DeleteRangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::Key(KeyError::EmptyKey));
    }
    Ok(())
}

/// etcd's `checkTxnRequest`: at most `max_ops` compares and ops per branch (a nested
/// txn gets what its parent leaves), keys in every compare, and every op checked as
/// the matching request is, in order: success, then failure.
pub fn txn(r: &TxnRequest, max_ops: usize) -> Result<()> {
    let opc = r.compare.len().max(r.success.len()).max(r.failure.len());
    if opc > max_ops {
        return Err(Error::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(Error::Key(KeyError::EmptyKey));
    }
    for op in r.success.iter().chain(r.failure.iter()) {
        request_op_check(op, max_ops - opc)?;
    }
    Ok(())
}

/// etcd's `checkRequestOp`.
fn request_op_check(op: &RequestOp, max_ops: usize) -> Result<()> {
    use request_op::Request as R;
    match &op.request {
        Some(R::RequestRange(x)) => range(x),
        Some(R::RequestPut(x)) => put(x),
        Some(R::RequestDeleteRange(x)) => delete(x),
        Some(R::RequestTxn(x)) => txn(x, max_ops),
        None => Err(Error::KeyNotFound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use request_op::Request as R;

    fn rr(order: i32, target: i32) -> RangeRequest {
        RangeRequest { key: Bytes::from_static(b"/k"), sort_order: order, sort_target: target, ..Default::default() }
    }

    fn op(r: R) -> RequestOp {
        RequestOp { request: Some(r) }
    }

    fn txn_of(ops: Vec<R>) -> TxnRequest {
        TxnRequest { success: ops.into_iter().map(op).collect(), ..Default::default() }
    }

    fn outcome(r: Result<()>) -> Option<(tonic::Code, String)> {
        r.err().map(|e| (e.code(), e.to_string()))
    }

    const SORT: &str = "etcdserver: invalid sort option";
    const EMPTY: &str = "etcdserver: key is not provided";

    #[test]
    fn ranges() {
        let mut cases: Vec<(RangeRequest, Option<&str>)> = Vec::new();
        for order in -1..=3 {
            for target in -7..=6 {
                let ok = (0..=2).contains(&order) && (0..=4).contains(&target);
                cases.push((rr(order, target), (!ok).then_some(SORT)));
            }
        }
        cases.extend([
            (rr(0, 99), Some(SORT)),
            (rr(i32::MAX, 0), Some(SORT)),
            (rr(i32::MIN, i32::MIN), Some(SORT)),
            (RangeRequest { sort_target: 99, ..Default::default() }, Some(EMPTY)),
            (RangeRequest { limit: i64::MAX, revision: -1, min_mod_revision: -5, ..rr(2, 4) }, None),
        ]);
        for (req, want) in cases {
            let got = outcome(range(&req));
            let want = want.map(|t| (tonic::Code::InvalidArgument, t.to_string()));
            assert_eq!(got, want, "{req:?}");
        }
    }

    #[test]
    fn puts_deletes_and_txns() {
        let mk_put = |f: fn(&mut PutRequest)| {
            let mut p = PutRequest { key: Bytes::from_static(b"/k"), ..Default::default() };
            f(&mut p);
            p
        };
        let del = |k: &'static [u8]| DeleteRangeRequest { key: Bytes::from_static(k), ..Default::default() };
        let nested = |inner: TxnRequest| txn_of(vec![R::RequestTxn(inner)]);
        let ops = |n: usize| txn_of((0..n).map(|_| R::RequestRange(rr(0, 0))).collect());
        let cases: Vec<(&str, TxnRequest, Option<&str>)> = vec![
            ("fine", txn_of(vec![R::RequestRange(rr(2, 3)), R::RequestPut(mk_put(|_| ()))]), None),
            ("bad sort", txn_of(vec![R::RequestRange(rr(0, 99))]), Some(SORT)),
            ("bad sort in failure", TxnRequest { failure: vec![op(R::RequestRange(rr(5, 0)))], ..ops(1) }, Some(SORT)),
            ("nested bad sort", nested(nested(txn_of(vec![R::RequestRange(rr(1, -7))]))), Some(SORT)),
            ("empty key first", txn_of(vec![R::RequestDeleteRange(del(b"")), R::RequestRange(rr(0, 99))]), Some(EMPTY)),
            ("bad sort first", txn_of(vec![R::RequestRange(rr(0, 99)), R::RequestDeleteRange(del(b""))]), Some(SORT)),
            (
                "no request",
                TxnRequest { success: vec![RequestOp { request: None }], ..Default::default() },
                Some("etcdserver: key not found"),
            ),
            (
                "value provided",
                txn_of(vec![R::RequestPut(mk_put(|p| (p.ignore_value, p.value) = (true, Bytes::from_static(b"v"))))]),
                Some("etcdserver: value is provided"),
            ),
            (
                "lease provided",
                txn_of(vec![R::RequestPut(mk_put(|p| (p.ignore_lease, p.lease) = (true, 7)))]),
                Some("etcdserver: lease is provided"),
            ),
            ("empty put key", txn_of(vec![R::RequestPut(mk_put(|p| p.key = Bytes::new()))]), Some(EMPTY)),
            ("max ops", ops(4), None),
            ("too many ops", ops(5), Some("etcdserver: too many operations in txn request")),
            // A nested txn gets what its parent leaves: 4 - 2 = 2.
            (
                "nested within budget",
                TxnRequest {
                    success: vec![op(R::RequestTxn(ops(2))), op(R::RequestRange(rr(0, 0)))],
                    ..Default::default()
                },
                None,
            ),
            (
                "nested over budget",
                TxnRequest {
                    success: vec![op(R::RequestTxn(ops(3))), op(R::RequestRange(rr(0, 0)))],
                    ..Default::default()
                },
                Some("etcdserver: too many operations in txn request"),
            ),
        ];
        for (what, req, want) in cases {
            let got = outcome(txn(&req, 4));
            assert_eq!(got, want.map(|t| (tonic::Code::InvalidArgument, t.to_string())), "{what}");
        }
        assert!(put(&PutRequest { lease: -5, ..put_ok() }).is_ok(), "ownership is checked later");
        assert_eq!(outcome(delete(&del(b""))).map(|o| o.1), Some(EMPTY.to_string()));
        assert_eq!(
            outcome(put(&PutRequest { ignore_lease: true, lease: 1, ..put_ok() })).map(|o| o.1).as_deref(),
            Some("etcdserver: lease is provided")
        );
    }

    fn put_ok() -> PutRequest {
        PutRequest { key: Bytes::from_static(b"/k"), ..Default::default() }
    }
}
