//! One client range answered by several upstream ranges (one per slot): the
//! answers merged into the answer etcd would give for the whole range — keys in
//! client form, etcd's order and sort ties, `count` summed, `limit` and `more`
//! applied to the union, and etcd's "first `limit+1` keys, then sort" quirk.

use bytes::Bytes;

use super::Proxy;
use crate::error::Result;
use crate::keyspace::{ClientPrefix, TenantName};
use crate::pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::pb::etcdserverpb::{RangeRequest, RangeResponse};
use crate::pb::mvccpb::KeyValue;

/// Sorts merged key-values the way etcd orders one range's answer: by the sort
/// target (ascending by default when the target is not the key), reversed for
/// DESCEND; etcd reverses only the target comparison, so ties stay in ascending
/// key order.
pub fn sort_kvs(kvs: &mut [KeyValue], req: &RangeRequest) {
    let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    let descend = SortOrder::try_from(req.sort_order) == Ok(SortOrder::Descend);
    kvs.sort_by(|a, b| {
        let primary = match target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        };
        let primary = if descend { primary.reverse() } else { primary };
        primary.then_with(|| a.key.cmp(&b.key))
    });
}

impl Proxy {
    /// Merges the answers of the upstream pieces of one client range into etcd's
    /// answer for the whole range: keys in client form, etcd's order, `count` summed,
    /// `limit` and `more` applied to the union. Pieces must have been requested with
    /// [`piece_request`].
    pub fn merge_ranges(
        &self,
        view: Option<&(TenantName, ClientPrefix)>,
        req: &RangeRequest,
        mut parts: Vec<RangeResponse>,
    ) -> Result<RangeResponse> {
        if let Some((t, cp)) = view {
            for kv in parts.iter_mut().flat_map(|p| p.kvs.iter_mut()) {
                self.render_kv(t, cp, kv)?;
            }
        }
        Ok(merge(req, parts))
    }
}

/// The answers of the pieces of one client range (keys already in client form)
/// merged into etcd's answer for the whole range.
pub fn merge(req: &RangeRequest, parts: Vec<RangeResponse>) -> RangeResponse {
    let several = parts.len() > 1;
    let mut out = RangeResponse::default();
    for mut part in parts {
        out.header = part.header.or(out.header);
        out.count += part.count;
        out.more |= part.more;
        out.kvs.append(&mut part.kvs);
    }
    if !several {
        return out;
    }
    // Any limit past the address space is no limit (etcd's own `limit+1` wraps).
    let limit = usize::try_from(req.limit.max(0)).unwrap_or(usize::MAX);
    if reads_first_keys(req) {
        // etcd's own order of work: the first limit+1 keys, then the sort.
        out.kvs.sort_by(|a, b| a.key.cmp(&b.key));
        out.more = out.kvs.len() > limit;
        out.kvs.truncate(limit.saturating_add(1));
        sort_kvs(&mut out.kvs, req);
        out.kvs.truncate(limit);
    } else {
        sort_kvs(&mut out.kvs, req);
        if limit > 0 && out.kvs.len() > limit {
            out.kvs.truncate(limit);
            out.more = true;
        }
    }
    if req.keys_only {
        for kv in &mut out.kvs {
            kv.value = Bytes::new();
        }
    }
    out
}

/// Whether etcd answers `r` from the first `limit+1` keys in key order, sorting
/// only those by the sort target (etcd 3.4/3.5 do this for a limited range with no
/// sort order and no revision filters), rather than from the whole range.
fn reads_first_keys(r: &RangeRequest) -> bool {
    r.limit > 0
        && r.sort_order == SortOrder::None as i32
        && r.min_mod_revision == 0
        && r.max_mod_revision == 0
        && r.min_create_revision == 0
        && r.max_create_revision == 0
}

/// The request for one piece of a client range. With several pieces and etcd's
/// first-keys rule, each piece is read in key order with one extra key, so the merge
/// can find the union's first `limit+1` keys; a keys-only range sorted by value is
/// read with values, which the merge drops after sorting.
pub fn piece_request(orig: &RangeRequest, key: Bytes, range_end: Bytes, several: bool) -> RangeRequest {
    let mut r = RangeRequest { key, range_end, ..orig.clone() };
    if several && reads_first_keys(orig) {
        r.sort_target = SortTarget::Key as i32;
        // Saturating: a client may send `i64::MAX`, which etcd reads as no limit.
        r.limit = orig.limit.saturating_add(1);
    }
    if several && orig.keys_only && orig.sort_target == SortTarget::Value as i32 {
        // etcd sorts by value before dropping values: the merge needs them.
        r.keys_only = false;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, m: i64) -> KeyValue {
        KeyValue { key: Bytes::copy_from_slice(key.as_bytes()), mod_revision: m, ..Default::default() }
    }

    fn part(kvs: Vec<KeyValue>) -> RangeResponse {
        RangeResponse { count: kvs.len() as i64, kvs, ..Default::default() }
    }

    #[test]
    fn huge_limits_are_no_limits() {
        for (limit, order) in [(i64::MAX, 0), (i64::MAX, 2), (i64::MAX - 1, 0), (-1, 0), (i64::MIN, 2)] {
            let req =
                RangeRequest { limit, sort_order: order, sort_target: SortTarget::Mod as i32, ..Default::default() };
            let piece = piece_request(&req, Bytes::new(), Bytes::new(), true);
            assert!(piece.limit >= req.limit, "{limit}: the piece asks for no fewer keys");
            let out = merge(&req, vec![part(vec![kv("/a/1", 3), kv("/a/2", 1)]), part(vec![kv("/b/1", 2)])]);
            assert_eq!(out.kvs.len(), 3, "{limit}");
            assert!(!out.more, "{limit}");
            assert_eq!(out.count, 3);
        }
    }

    #[test]
    fn limits_cut_the_union() {
        let req = RangeRequest { limit: 2, ..Default::default() };
        assert_eq!(piece_request(&req, Bytes::new(), Bytes::new(), true).limit, 3);
        let out = merge(&req, vec![part(vec![kv("/b/1", 1), kv("/b/2", 1)]), part(vec![kv("/a/1", 1)])]);
        let keys: Vec<_> = out.kvs.iter().map(|k| k.key.clone()).collect();
        assert_eq!(keys, vec![Bytes::from_static(b"/a/1"), Bytes::from_static(b"/b/1")]);
        assert!(out.more);
    }
}
