//! etcd's own checks of a txn, applied to the client's request before anything is
//! sent upstream, so that errors come in etcd's order and with etcd's text.

use std::collections::BTreeSet;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::keyspace::KeyError;
use crate::pb::etcdserverpb::{request_op, RequestOp, TxnRequest};

/// Deleted `(key, range_end)` intervals of a txn branch.
type Intervals = Vec<(Bytes, Bytes)>;

/// etcd's rule that a txn never puts a key twice, or puts and deletes it, on one
/// path (a branch, its nested txns, and sibling nested txns), applied to the
/// client's keys as etcd applies it (`checkIntervals`). Checking before translation
/// matters: a whole-tenant delete becomes pieces for the slots that exist, which
/// upstream's own check would see as not overlapping a put into a new slot.
/// Returns the branch's puts and deletes for the enclosing level.
pub fn check_intervals(reqs: &[RequestOp]) -> Result<(BTreeSet<Bytes>, Intervals)> {
    use request_op::Request as R;
    let dup = || Error::DuplicateKey;
    // etcd's interval: [key, range_end), or the point [key, key+"\0") when range_end
    // is empty; an empty end elsewhere means "no end" in its affine comparison.
    let hits =
        |dels: &Intervals, k: &Bytes| dels.iter().any(|(b, e)| if e.is_empty() { b == k } else { b <= k && k < e });
    let mut dels: Intervals = reqs
        .iter()
        .filter_map(|r| match &r.request {
            Some(R::RequestDeleteRange(d)) => Some((d.key.clone(), d.range_end.clone())),
            _ => None,
        })
        .collect();
    let mut puts = BTreeSet::new();
    for r in reqs {
        let Some(R::RequestTxn(t)) = &r.request else { continue };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || hits(&dels, k) {
                return Err(dup());
            }
            puts.insert(k.clone());
        }
        for k in puts_else {
            // then and else exclude each other: the same key in both is fine.
            if (puts.contains(&k) && !puts_then.contains(&k)) || hits(&dels, &k) {
                return Err(dup());
            }
            puts.insert(k);
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for r in reqs {
        let Some(R::RequestPut(p)) = &r.request else { continue };
        if puts.contains(&p.key) || hits(&dels, &p.key) {
            return Err(dup());
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

/// etcd's per-op validation of a txn (`checkTxnRequest`), run before the overlap
/// check so that errors come in etcd's order.
pub fn check_txn_request(r: &TxnRequest, max_ops: usize) -> Result<()> {
    use request_op::Request as R;
    let opc = r.compare.len().max(r.success.len()).max(r.failure.len());
    if opc > max_ops {
        return Err(Error::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(Error::Key(KeyError::EmptyKey));
    }
    for op in r.success.iter().chain(r.failure.iter()) {
        match &op.request {
            Some(R::RequestRange(x)) if x.key.is_empty() => return Err(Error::Key(KeyError::EmptyKey)),
            Some(R::RequestDeleteRange(x)) if x.key.is_empty() => return Err(Error::Key(KeyError::EmptyKey)),
            Some(R::RequestPut(p)) => {
                if p.key.is_empty() {
                    return Err(Error::Key(KeyError::EmptyKey));
                }
                if p.ignore_value && !p.value.is_empty() {
                    return Err(Error::ValueProvided);
                }
                if p.ignore_lease && p.lease != 0 {
                    return Err(Error::LeaseProvided);
                }
            }
            Some(R::RequestTxn(t)) => check_txn_request(t, max_ops - opc)?,
            _ => {}
        }
    }
    Ok(())
}
