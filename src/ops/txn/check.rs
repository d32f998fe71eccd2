//! etcd's duplicate-key check of a txn, applied to the client's keys before anything
//! is sent upstream (the per-op checks are in `ops::validate`).

use std::collections::BTreeSet;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::pb::etcdserverpb::{request_op, RequestOp};

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
