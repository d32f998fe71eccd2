//! Txn: etcd transactions with any compare, nested txns and range/put/delete ops,
//! translated into one upstream transaction.
//!
//! Translation builds a [`Branch`] tree mirroring the request: every key resolved
//! to the txn's single tenant (or to raw keys, never both), compares and ops placed
//! with the key layout. A range or delete that spans resource roots becomes several
//! upstream ops whose answers are merged back into one; that needs the tenant's root
//! index, so such a txn is sent nested inside a guard transaction that commits only
//! if the index did not grow since it was read (etcd evaluates every compare of a
//! nested txn before applying any op, so the nesting changes nothing else).
//!
//! Puts into a slot this process has not seen carry the slot's index put in the same
//! branch. etcd refuses a txn that puts one key twice on a path (a branch and its
//! nested txns, or two sibling nested txns), so an index key is placed once: in the
//! branch whose own put needs it, or in the nearest branch above two nested txns that
//! both need it.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::index::{IndexSnapshot, RootIndex};
use crate::keylayout::{slot_of, Slot};
use crate::kv::{index_unchanged_since, sort_kvs};
use crate::pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::pb::etcdserverpb::{
    request_op, response_op, Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, RangeRequest, RangeResponse,
    RequestOp, ResponseOp, TxnRequest, TxnResponse,
};
use crate::proxy::Proxy;
use crate::tenant::{ClientPrefix, KeyRef, RangeRef, Scope, TenantName};
use crate::upstream::{CallCtx, Retry};

/// One client op and the upstream ops it became.
enum OpPlan {
    /// Upstream ranges whose answers merge into the client's one.
    Range {
        pieces: Vec<RangeRequest>,
        orig: RangeRequest,
    },
    /// `index_key` is the slot's index key when this process does not know it exists.
    Put {
        req: PutRequest,
        index_key: Option<Bytes>,
    },
    Delete {
        pieces: Vec<DeleteRangeRequest>,
    },
    Txn {
        compare: Vec<Compare>,
        success: Branch,
        failure: Branch,
    },
}

#[derive(Default)]
struct Branch {
    ops: Vec<OpPlan>,
    /// Index puts appended after the branch's ops.
    index_puts: Vec<Bytes>,
}

/// Whose keys the txn touches: one tenant, or raw keys.
#[derive(Clone, PartialEq)]
enum Owner {
    Tenant(TenantName),
    Raw,
}

/// Translation state for one txn.
struct Translate<'a> {
    proxy: &'a Proxy,
    scope: &'a Scope,
    owner: Option<Owner>,
    writes_global: bool,
    leases: BTreeSet<i64>,
    /// The tenant's index, once a cross-root op asked for it.
    index: Option<&'a IndexSnapshot>,
    needs_index: bool,
    /// Slots the txn's own puts write: its ranges must see them too.
    put_slots: BTreeSet<Slot>,
}

impl<'a> Translate<'a> {
    fn claim(&mut self, owner: Owner) -> Result<()> {
        match &self.owner {
            None => {
                if let Owner::Tenant(t) = &owner {
                    self.proxy.tenant_view(self.scope, t)?;
                }
                self.owner = Some(owner);
                Ok(())
            }
            Some(o) if *o == owner => Ok(()),
            Some(o) => {
                let name = |o: &Owner| match o {
                    Owner::Tenant(t) => t.to_string(),
                    Owner::Raw => "global or unmatched keys".to_string(),
                };
                Err(Error::CrossTenantTxn { first: name(o), second: name(&owner) })
            }
        }
    }

    /// Upstream `(key, range_end)` pairs of a client range; `None` when the tenant's
    /// index is needed first.
    /// `write` marks a delete, for the global-write check.
    fn pieces(&mut self, key: &Bytes, range_end: &Bytes, write: bool) -> Result<Option<Vec<(Bytes, Bytes)>>> {
        match self.proxy.resolver.resolve_range(self.scope, key, range_end)? {
            RangeRef::Raw { key, range_end, global } => {
                self.claim(Owner::Raw)?;
                self.writes_global |= global && write;
                Ok(Some(vec![(key, range_end)]))
            }
            RangeRef::Tenant { tenant, start, end } => {
                self.claim(Owner::Tenant(tenant.clone()))?;
                let layout = &self.proxy.layout;
                if let Some(p) = layout.plan_fast(&tenant, &start, &end) {
                    return Ok(Some(vec![(p.key, p.range_end)]));
                }
                let Some(index) = self.index else {
                    self.needs_index = true;
                    return Ok(None);
                };
                let pieces = layout.plan(&tenant, &start, &end, &index.slots);
                Ok(Some(pieces.into_iter().map(|p| (p.key, p.range_end)).collect()))
            }
        }
    }

    /// Like `pieces`, but never empty: a range with nothing of the tenant's in it is
    /// sent as the same op on the void key, so that etcd itself produces the answer
    /// (and the header revision at that point of the txn).
    fn pieces_or_void(&mut self, key: &Bytes, range_end: &Bytes, write: bool) -> Result<Vec<(Bytes, Bytes)>> {
        let pieces = self.pieces(key, range_end, write)?.unwrap_or_default();
        if pieces.is_empty() && !self.needs_index {
            return Ok(vec![(self.proxy.layout.void_key(), Bytes::new())]);
        }
        Ok(pieces)
    }

    fn compare(&mut self, mut c: Compare) -> Result<Compare> {
        let Some(mut pieces) = self.pieces(&c.key, &c.range_end, false)? else { return Ok(c) };
        match pieces.len() {
            0 => {
                // Nothing of the tenant's can be in this range: compare against a key
                // that never exists, which etcd evaluates exactly like an empty range.
                c.key = self.proxy.layout.void_key();
                c.range_end = Bytes::new();
            }
            1 => {
                let (k, e) = pieces.remove(0);
                c.key = k;
                c.range_end = e;
            }
            _ => {
                return Err(Error::Unsupported(
                    "a txn compare whose range spans several resource roots cannot be evaluated \
                     atomically; compare each resource's range separately"
                        .to_string(),
                ))
            }
        }
        Ok(c)
    }

    fn branch(&mut self, ops: Vec<RequestOp>) -> Result<Branch> {
        let mut b = Branch::default();
        for op in ops {
            let Some(req) = op.request else {
                return Err(Error::InvalidArgument("txn op without a request".to_string()));
            };
            b.ops.push(self.op(req)?);
        }
        Ok(b)
    }

    fn op(&mut self, req: request_op::Request) -> Result<OpPlan> {
        use request_op::Request as R;
        Ok(match req {
            R::RequestRange(r) => {
                let pieces = self.pieces_or_void(&r.key, &r.range_end, false)?;
                let several = pieces.len() > 1;
                let pieces = pieces.into_iter().map(|(k, e)| piece_request(&r, k, e, several)).collect();
                OpPlan::Range { pieces, orig: r }
            }
            R::RequestDeleteRange(d) => {
                let pieces = self.pieces_or_void(&d.key, &d.range_end, true)?;
                let pieces = pieces
                    .into_iter()
                    .map(|(key, range_end)| DeleteRangeRequest { key, range_end, prev_kv: d.prev_kv })
                    .collect();
                OpPlan::Delete { pieces }
            }
            R::RequestPut(mut p) => match self.proxy.resolver.resolve_key(self.scope, &p.key)? {
                KeyRef::Raw { key, global } => {
                    self.claim(Owner::Raw)?;
                    self.writes_global |= global;
                    p.key = key;
                    OpPlan::Put { req: p, index_key: None }
                }
                KeyRef::Tenant { tenant, key } => {
                    self.claim(Owner::Tenant(tenant.clone()))?;
                    if p.lease != 0 {
                        self.leases.insert(p.lease);
                    }
                    let layout = &self.proxy.layout;
                    p.key = layout.encode(&tenant, &key);
                    let slot = slot_of(&key);
                    let ik = layout.index_key(&tenant, &slot);
                    self.put_slots.insert(slot);
                    let index_key = (!self.proxy.index.is_known(&ik)).then_some(ik);
                    OpPlan::Put { req: p, index_key }
                }
            },
            R::RequestTxn(t) => {
                let compare = t.compare.into_iter().map(|c| self.compare(c)).collect::<Result<_>>()?;
                OpPlan::Txn { compare, success: self.branch(t.success)?, failure: self.branch(t.failure)? }
            }
        })
    }
}

impl Branch {
    /// Index keys needed anywhere in this branch's subtree.
    fn needed(&self, out: &mut BTreeSet<Bytes>) {
        for op in &self.ops {
            match op {
                OpPlan::Put { index_key: Some(k), .. } => {
                    out.insert(k.clone());
                }
                OpPlan::Txn { success, failure, .. } => {
                    success.needed(out);
                    failure.needed(out);
                }
                _ => {}
            }
        }
    }

    /// Decides where index puts go (see the module docs); `covered` are the keys an
    /// enclosing branch already puts.
    fn place(&mut self, covered: &BTreeSet<Bytes>) {
        let mut here: BTreeSet<Bytes> = BTreeSet::new();
        for op in &self.ops {
            if let OpPlan::Put { index_key: Some(k), .. } = op {
                if !covered.contains(k) {
                    here.insert(k.clone());
                }
            }
        }
        let mut in_children: BTreeMap<Bytes, usize> = BTreeMap::new();
        for op in &self.ops {
            if let OpPlan::Txn { success, failure, .. } = op {
                let mut need = BTreeSet::new();
                success.needed(&mut need);
                failure.needed(&mut need);
                for k in need {
                    if !covered.contains(&k) && !here.contains(&k) {
                        *in_children.entry(k).or_default() += 1;
                    }
                }
            }
        }
        here.extend(in_children.into_iter().filter(|(_, n)| *n > 1).map(|(k, _)| k));
        let mut below = covered.clone();
        below.extend(here.iter().cloned());
        for op in &mut self.ops {
            if let OpPlan::Txn { success, failure, .. } = op {
                success.place(&below);
                failure.place(&below);
            }
        }
        self.index_puts = here.into_iter().collect();
    }

    /// The upstream ops of this branch.
    fn build(&self) -> Vec<RequestOp> {
        use request_op::Request as R;
        let mut out = Vec::new();
        for op in &self.ops {
            match op {
                OpPlan::Range { pieces, .. } => out.extend(pieces.iter().map(|p| R::RequestRange(p.clone()))),
                OpPlan::Delete { pieces } => out.extend(pieces.iter().map(|p| R::RequestDeleteRange(p.clone()))),
                OpPlan::Put { req, .. } => out.push(R::RequestPut(req.clone())),
                OpPlan::Txn { compare, success, failure } => out.push(R::RequestTxn(TxnRequest {
                    compare: compare.clone(),
                    success: success.build(),
                    failure: failure.build(),
                })),
            }
        }
        let mut ops: Vec<RequestOp> = out.into_iter().map(|r| RequestOp { request: Some(r) }).collect();
        ops.extend(self.index_puts.iter().cloned().map(RootIndex::put_op));
        ops
    }
}

/// Maps upstream answers back to client answers.
struct Answer<'a> {
    proxy: &'a Proxy,
    /// The tenant and its client prefix; `None` for raw-key txns.
    view: Option<(TenantName, ClientPrefix)>,
    learned: Vec<Bytes>,
}

impl Answer<'_> {
    fn branch(&mut self, plan: &Branch, resps: Vec<ResponseOp>) -> Result<Vec<ResponseOp>> {
        let mut it = resps.into_iter();
        let mut out = Vec::with_capacity(plan.ops.len());
        for op in &plan.ops {
            use response_op::Response as P;
            let resp = match op {
                OpPlan::Range { pieces, orig } => {
                    let mut parts = Vec::with_capacity(pieces.len());
                    for _ in pieces {
                        match it.next().and_then(|r| r.response) {
                            Some(P::ResponseRange(r)) => parts.push(r),
                            other => return Err(Error::Internal(format!("txn range answered {other:?}"))),
                        }
                    }
                    P::ResponseRange(self.proxy.merge_ranges(self.view.as_ref(), orig, parts)?)
                }
                OpPlan::Delete { pieces } => {
                    let mut d = DeleteRangeResponse::default();
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

/// Deleted `(key, range_end)` intervals of a txn branch.
type Intervals = Vec<(Bytes, Bytes)>;

/// etcd's rule that a txn never puts a key twice, or puts and deletes it, on one
/// path (a branch, its nested txns, and sibling nested txns), applied to the
/// client's keys as etcd applies it (`checkIntervals`). Checking before translation
/// matters: a whole-tenant delete becomes pieces for the slots that exist, which
/// upstream's own check would see as not overlapping a put into a new slot.
/// Returns the branch's puts and deletes for the enclosing level.
fn check_intervals(reqs: &[RequestOp]) -> Result<(BTreeSet<Bytes>, Intervals)> {
    use request_op::Request as R;
    let dup = || Error::Upstream(tonic::Status::invalid_argument("etcdserver: duplicate key given in txn request"));
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
fn check_txn_request(r: &TxnRequest, max_ops: usize) -> Result<()> {
    use request_op::Request as R;
    let etcd = |m: &'static str| Err(Error::Upstream(tonic::Status::invalid_argument(m)));
    let opc = r.compare.len().max(r.success.len()).max(r.failure.len());
    if opc > max_ops {
        return Err(Error::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(Error::EmptyKey);
    }
    for op in r.success.iter().chain(r.failure.iter()) {
        match &op.request {
            Some(R::RequestRange(x)) if x.key.is_empty() => return Err(Error::EmptyKey),
            Some(R::RequestDeleteRange(x)) if x.key.is_empty() => return Err(Error::EmptyKey),
            Some(R::RequestPut(p)) => {
                if p.key.is_empty() {
                    return Err(Error::EmptyKey);
                }
                if p.ignore_value && !p.value.is_empty() {
                    return etcd("etcdserver: value is provided");
                }
                if p.ignore_lease && p.lease != 0 {
                    return etcd("etcdserver: lease is provided");
                }
            }
            Some(R::RequestTxn(t)) => check_txn_request(t, max_ops - opc)?,
            _ => {}
        }
    }
    Ok(())
}

impl Proxy {
    pub async fn txn(&self, scope: &Scope, ctx: &CallCtx, req: TxnRequest) -> Result<TxnResponse> {
        check_txn_request(&req, self.cfg.upstream.max_txn_ops)?;
        check_intervals(&req.success)?;
        check_intervals(&req.failure)?;
        let mut index: Option<IndexSnapshot> = None;
        for _ in 0..5 {
            let mut tr = Translate {
                proxy: self,
                scope,
                owner: None,
                writes_global: false,
                leases: BTreeSet::new(),
                index: index.as_ref(),
                needs_index: false,
                put_slots: BTreeSet::new(),
            };
            let compare: Vec<Compare> = req.compare.iter().cloned().map(|c| tr.compare(c)).collect::<Result<_>>()?;
            let mut success = tr.branch(req.success.clone())?;
            let mut failure = tr.branch(req.failure.clone())?;
            if tr.needs_index {
                let Some(Owner::Tenant(t)) = &tr.owner else {
                    return Err(Error::Internal("cross-root op without a tenant".to_string()));
                };
                let mut snap = self.read_index(ctx, t, 0).await?;
                snap.slots.extend(tr.put_slots);
                index = Some(snap);
                continue;
            }
            if tr.writes_global {
                // The compactor's txn on compact_rev_key, or any global write.
                self.resolver.require_admin(scope, "writing a global key")?;
            }
            for lease in &tr.leases {
                self.check_lease(scope, ctx, *lease).await?;
            }
            let view = match &tr.owner {
                Some(Owner::Tenant(t)) => Some((t.clone(), self.resolver.client_prefix(scope, t)?)),
                _ => None,
            };
            let none = BTreeSet::new();
            success.place(&none);
            failure.place(&none);
            let user = TxnRequest { compare, success: success.build(), failure: failure.build() };
            let resp = match (&index, &view) {
                (Some(snap), Some((t, _))) => {
                    let guard = TxnRequest {
                        compare: vec![index_unchanged_since(self.layout.index_range(t), snap.revision)],
                        success: vec![RequestOp { request: Some(request_op::Request::RequestTxn(user)) }],
                        failure: vec![],
                    };
                    let outer = self.up_txn(ctx, &guard, Retry::OnlyUnsent).await?;
                    if !outer.succeeded {
                        index = None; // the tenant wrote a new slot meanwhile: plan again
                        continue;
                    }
                    match outer.responses.into_iter().next().and_then(|r| r.response) {
                        Some(response_op::Response::ResponseTxn(mut inner)) => {
                            inner.header = outer.header;
                            inner
                        }
                        other => return Err(Error::Internal(format!("guard txn answered {other:?}"))),
                    }
                }
                _ => self.up_txn(ctx, &user, Retry::OnlyUnsent).await?,
            };
            let mut answer = Answer { proxy: self, view, learned: Vec::new() };
            let taken = if resp.succeeded { &success } else { &failure };
            let responses = answer.branch(taken, resp.responses)?;
            for k in answer.learned {
                self.index.learn(k);
            }
            return Ok(TxnResponse { header: resp.header, succeeded: resp.succeeded, responses });
        }
        Err(Error::Unavailable("the tenant's root index kept changing during a txn; retry".to_string()))
    }

    /// Merges the answers of the upstream pieces of one client range into etcd's
    /// answer for the whole range: keys in client form, etcd's order, `count` summed,
    /// `limit` and `more` applied to the union. Pieces must have been requested with
    /// [`piece_request`].
    pub fn merge_ranges(
        &self,
        view: Option<&(TenantName, ClientPrefix)>,
        req: &RangeRequest,
        parts: Vec<RangeResponse>,
    ) -> Result<RangeResponse> {
        let several = parts.len() > 1;
        let mut out = RangeResponse::default();
        for mut part in parts {
            out.header = part.header.or(out.header);
            out.count += part.count;
            out.more |= part.more;
            if let Some((t, cp)) = view {
                for kv in &mut part.kvs {
                    self.render_kv(t, cp, kv)?;
                }
            }
            out.kvs.append(&mut part.kvs);
        }
        if !several {
            return Ok(out);
        }
        let limit = req.limit.max(0) as usize;
        if reads_first_keys(req) {
            // etcd's own order of work: the first limit+1 keys, then the sort.
            out.kvs.sort_by(|a, b| a.key.cmp(&b.key));
            out.more = out.kvs.len() > limit;
            out.kvs.truncate(limit + 1);
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
        Ok(out)
    }
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
        r.limit = orig.limit + 1;
    }
    if several && orig.keys_only && orig.sort_target == SortTarget::Value as i32 {
        // etcd sorts by value before dropping values: the merge needs them.
        r.keys_only = false;
    }
    r
}
