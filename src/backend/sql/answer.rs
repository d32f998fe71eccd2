//! etcd's answers computed from rows, as etcd's `applierV3backend` computes them
//! (pure: no I/O). The SQL reads fetch the live keys of a range at a revision in
//! key order, and the total; what etcd then does with them — revision filters,
//! sort, limit and `more`, `keys_only`, compares — happens here.

use std::cmp::Ordering;

use bytes::Bytes;

use crate::pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::pb::etcdserverpb::{compare, Compare, RangeRequest, RangeResponse};
use crate::pb::mvccpb::KeyValue;

/// Whether the SQL read must fetch every live key of the range (the answer is
/// sorted or filtered before its limit applies), or only `limit + 1`.
pub fn fetch_all(req: &RangeRequest) -> bool {
    req.sort_order != SortOrder::None as i32
        || req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0
}

/// Rows to fetch for `req`: `None` for all of them.
pub fn fetch_limit(req: &RangeRequest) -> Option<i64> {
    if req.count_only {
        // One row carries the total.
        return Some(1);
    }
    if fetch_all(req) || req.limit <= 0 {
        return None;
    }
    Some(req.limit.saturating_add(1))
}

/// etcd's `executeRange` after its read: `kvs` the live keys in key order (as many
/// as [`fetch_limit`] asked for), `count` every live key in the range.
pub fn range_answer(req: &RangeRequest, mut kvs: Vec<KeyValue>, count: i64) -> RangeResponse {
    let mut resp = RangeResponse { count, ..Default::default() };
    if req.count_only {
        return resp;
    }
    kvs.retain(|kv| keep(req, kv));
    let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    let mut order = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None);
    if target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    } else if target == SortTarget::Key && order == SortOrder::Ascend {
        order = SortOrder::None; // already in key order
    }
    if order != SortOrder::None {
        // Stable, as Go's sort.Sort is for the small answers it sorts by insertion
        // (ties keep key order); etcd's order of ties in larger answers is unspecified.
        let by = |a: &KeyValue, b: &KeyValue| -> Ordering {
            match target {
                SortTarget::Key => a.key.cmp(&b.key),
                SortTarget::Version => a.version.cmp(&b.version),
                SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                SortTarget::Value => a.value.cmp(&b.value),
            }
        };
        if order == SortOrder::Descend {
            kvs.sort_by(|a, b| by(b, a));
        } else {
            kvs.sort_by(by);
        }
    }
    if req.limit > 0 && kvs.len() as i64 > req.limit {
        kvs.truncate(req.limit as usize);
        resp.more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value = Bytes::new();
        }
    }
    resp.kvs = kvs;
    resp
}

/// etcd's revision filters (`pruneKVs`): whether `kv` stays in the answer.
fn keep(req: &RangeRequest, kv: &KeyValue) -> bool {
    !((req.max_mod_revision != 0 && kv.mod_revision > req.max_mod_revision)
        || (req.min_mod_revision != 0 && kv.mod_revision < req.min_mod_revision)
        || (req.max_create_revision != 0 && kv.create_revision > req.max_create_revision)
        || (req.min_create_revision != 0 && kv.create_revision < req.min_create_revision))
}

/// etcd's `applyCompare`: `kvs` are the live keys of the compare's range. A value
/// compare on no key fails; any other compares the zero key-value.
pub fn compare_holds(c: &Compare, kvs: &[KeyValue]) -> bool {
    let target = compare::CompareTarget::try_from(c.target);
    if kvs.is_empty() {
        if target == Ok(compare::CompareTarget::Value) {
            return false;
        }
        return compare_kv(c, &KeyValue::default());
    }
    kvs.iter().all(|kv| compare_kv(c, kv))
}

/// etcd's `compareKV`. A target union that does not match the target compares
/// against zero (or the empty value), as etcd's does.
fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    use compare::TargetUnion as U;
    let int = |have: i64, want: Option<i64>| have.cmp(&want.unwrap_or(0));
    let result = match compare::CompareTarget::try_from(c.target) {
        Ok(compare::CompareTarget::Value) => {
            let want: &[u8] = match &c.target_union {
                Some(U::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_ref().cmp(want)
        }
        Ok(compare::CompareTarget::Create) => int(
            kv.create_revision,
            match c.target_union {
                Some(U::CreateRevision(r)) => Some(r),
                _ => None,
            },
        ),
        Ok(compare::CompareTarget::Mod) => int(
            kv.mod_revision,
            match c.target_union {
                Some(U::ModRevision(r)) => Some(r),
                _ => None,
            },
        ),
        Ok(compare::CompareTarget::Version) => int(
            kv.version,
            match c.target_union {
                Some(U::Version(r)) => Some(r),
                _ => None,
            },
        ),
        Ok(compare::CompareTarget::Lease) => int(
            kv.lease,
            match c.target_union {
                Some(U::Lease(r)) => Some(r),
                _ => None,
            },
        ),
        // etcd compares nothing for an unknown target (result 0).
        Err(_) => Ordering::Equal,
    };
    match compare::CompareResult::try_from(c.result) {
        Ok(compare::CompareResult::Equal) => result == Ordering::Equal,
        Ok(compare::CompareResult::NotEqual) => result != Ordering::Equal,
        Ok(compare::CompareResult::Greater) => result == Ordering::Greater,
        Ok(compare::CompareResult::Less) => result == Ordering::Less,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, create: i64, rev: i64, version: i64) -> KeyValue {
        KeyValue {
            key: Bytes::from(key.to_string()),
            value: Bytes::from(value.to_string()),
            create_revision: create,
            mod_revision: rev,
            version,
            lease: 0,
        }
    }

    fn keys(r: &RangeResponse) -> Vec<&[u8]> {
        r.kvs.iter().map(|k| k.key.as_ref()).collect()
    }

    #[test]
    fn limit_more_sort_and_filters_as_etcd() {
        let all = vec![kv("a", "3", 2, 5, 2), kv("b", "1", 3, 3, 1), kv("c", "2", 4, 6, 3)];
        let mut req = RangeRequest { limit: 2, ..Default::default() };
        assert_eq!(fetch_limit(&req), Some(3));
        let r = range_answer(&req, all.clone(), 3);
        assert_eq!((keys(&r), r.more, r.count), (vec![&b"a"[..], b"b"], true, 3));
        // By value, descending, limit 2: sorted before the limit.
        req.sort_target = SortTarget::Value as i32;
        req.sort_order = SortOrder::Descend as i32;
        assert_eq!(fetch_limit(&req), None);
        let r = range_answer(&req, all.clone(), 3);
        assert_eq!(keys(&r), vec![&b"a"[..], b"c"]);
        // A target other than the key without an order: ascending.
        req.sort_order = SortOrder::None as i32;
        req.sort_target = SortTarget::Mod as i32;
        req.limit = 0;
        assert_eq!(keys(&range_answer(&req, all.clone(), 3)), vec![&b"b"[..], b"a", b"c"]);
        // Filters prune after the count.
        let req = RangeRequest { min_mod_revision: 5, keys_only: true, ..Default::default() };
        let r = range_answer(&req, all.clone(), 3);
        assert_eq!((keys(&r), r.count), (vec![&b"a"[..], b"c"], 3));
        assert!(r.kvs.iter().all(|k| k.value.is_empty()));
        let r = range_answer(&RangeRequest { count_only: true, ..Default::default() }, Vec::new(), 3);
        assert_eq!((r.kvs.len(), r.count, r.more), (0, 3, false));
    }

    #[test]
    fn compares_as_etcd() {
        use compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
        let c = |t: T, r: R, u: U| Compare {
            target: t as i32,
            result: r as i32,
            key: Bytes::from_static(b"a"),
            range_end: Bytes::new(),
            target_union: Some(u),
        };
        let a = [kv("a", "x", 2, 5, 2)];
        assert!(compare_holds(&c(T::Version, R::Equal, U::Version(2)), &a));
        assert!(compare_holds(&c(T::Mod, R::Greater, U::ModRevision(4)), &a));
        assert!(compare_holds(&c(T::Create, R::Less, U::CreateRevision(3)), &a));
        assert!(compare_holds(&c(T::Value, R::NotEqual, U::Value(Bytes::from_static(b"y"))), &a));
        // A missing key: version 0 equals 0, a value compare always fails.
        assert!(compare_holds(&c(T::Version, R::Equal, U::Version(0)), &[]));
        assert!(!compare_holds(&c(T::Value, R::NotEqual, U::Value(Bytes::from_static(b"y"))), &[]));
        // A range compare holds only if it holds for every key.
        let two = [kv("a", "x", 2, 5, 2), kv("ab", "x", 3, 7, 1)];
        assert!(!compare_holds(&c(T::Mod, R::Less, U::ModRevision(6)), &two));
        assert!(compare_holds(&c(T::Lease, R::Equal, U::Lease(0)), &two));
    }
}
