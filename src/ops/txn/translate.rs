//! A client txn as a tree of upstream ops: every key resolved to the txn's single
//! tenant (or to raw keys, never both), compares and ops placed with the key layout,
//! and root-index puts placed where etcd's duplicate-key rule allows.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::keyspace::{slot_of, KeyRef, RangeRef, Scope, Slot, TenantName};
use crate::ops::index::IndexSnapshot;
use crate::ops::merge::piece_request;
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{request_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp};

/// One client op and the upstream ops it became.
pub(super) enum OpPlan {
    /// Upstream ranges whose answers merge into the client's one; `packed` when
    /// they were sent as one nested txn (see `fit`).
    Range {
        pieces: Vec<RangeRequest>,
        orig: RangeRequest,
        packed: bool,
    },
    /// `index_keys` are the slot's index keys this process does not know exist.
    Put {
        req: PutRequest,
        index_keys: Vec<Bytes>,
    },
    Delete {
        pieces: Vec<DeleteRangeRequest>,
        packed: bool,
    },
    Txn {
        compare: Vec<Compare>,
        success: Branch,
        failure: Branch,
    },
}

#[derive(Default)]
pub(super) struct Branch {
    pub(super) ops: Vec<OpPlan>,
    /// Index puts appended after the branch's ops.
    pub(super) index_puts: Vec<Bytes>,
}

/// Whose keys the txn touches: one tenant, or raw keys.
#[derive(Clone, PartialEq)]
pub(super) enum Owner {
    Tenant(TenantName),
    Raw,
}

/// Translation state for one txn.
pub(super) struct Translate<'a> {
    pub(super) proxy: &'a Proxy,
    pub(super) scope: &'a Scope,
    pub(super) owner: Option<Owner>,
    pub(super) writes_global: bool,
    pub(super) leases: BTreeSet<i64>,
    /// The tenant's index, once a cross-root op asked for it.
    pub(super) index: Option<&'a IndexSnapshot>,
    pub(super) needs_index: bool,
    /// Slots the txn's own puts write: its ranges must see them too.
    pub(super) put_slots: BTreeSet<Slot>,
}

impl<'a> Translate<'a> {
    pub(super) fn claim(&mut self, owner: Owner) -> Result<()> {
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
    pub(super) fn pieces(
        &mut self,
        key: &Bytes,
        range_end: &Bytes,
        write: bool,
    ) -> Result<Option<Vec<(Bytes, Bytes)>>> {
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
    pub(super) fn pieces_or_void(
        &mut self,
        key: &Bytes,
        range_end: &Bytes,
        write: bool,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        let pieces = self.pieces(key, range_end, write)?.unwrap_or_default();
        if pieces.is_empty() && !self.needs_index {
            return Ok(vec![(self.proxy.layout.void_key(), Bytes::new())]);
        }
        Ok(pieces)
    }

    pub(super) fn compare(&mut self, mut c: Compare) -> Result<Compare> {
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

    pub(super) fn branch(&mut self, ops: Vec<RequestOp>) -> Result<Branch> {
        let mut b = Branch::default();
        for op in ops {
            // `validate::txn` refused ops without a request already.
            let Some(req) = op.request else { return Err(Error::KeyNotFound) };
            b.ops.push(self.op(req)?);
        }
        Ok(b)
    }

    pub(super) fn op(&mut self, req: request_op::Request) -> Result<OpPlan> {
        use request_op::Request as R;
        Ok(match req {
            R::RequestRange(r) => {
                let pieces = self.pieces_or_void(&r.key, &r.range_end, false)?;
                let several = pieces.len() > 1;
                let pieces = pieces.into_iter().map(|(k, e)| piece_request(&r, k, e, several)).collect();
                OpPlan::Range { pieces, orig: r, packed: false }
            }
            R::RequestDeleteRange(d) => {
                let pieces = self.pieces_or_void(&d.key, &d.range_end, true)?;
                let pieces = pieces
                    .into_iter()
                    .map(|(key, range_end)| DeleteRangeRequest { key, range_end, prev_kv: d.prev_kv })
                    .collect();
                OpPlan::Delete { pieces, packed: false }
            }
            R::RequestPut(mut p) => {
                // Every lease is checked, whatever the key (global, passthrough or a
                // tenant's).
                if p.lease != 0 {
                    self.leases.insert(p.lease);
                }
                match self.proxy.resolver.resolve_key(self.scope, &p.key)? {
                    KeyRef::Raw { key, global } => {
                        self.claim(Owner::Raw)?;
                        self.writes_global |= global;
                        p.key = key;
                        OpPlan::Put { req: p, index_keys: Vec::new() }
                    }
                    KeyRef::Tenant { tenant, key } => {
                        self.claim(Owner::Tenant(tenant.clone()))?;
                        p.key = self.proxy.layout.encode(&tenant, &key);
                        let slot = slot_of(&key);
                        let index_keys = self.proxy.index.missing(&self.proxy.layout, &tenant, &slot);
                        self.put_slots.insert(slot);
                        OpPlan::Put { req: p, index_keys }
                    }
                }
            }
            R::RequestTxn(t) => {
                let compare = t.compare.into_iter().map(|c| self.compare(c)).collect::<Result<_>>()?;
                OpPlan::Txn { compare, success: self.branch(t.success)?, failure: self.branch(t.failure)? }
            }
        })
    }
}

impl Branch {
    /// Index keys needed anywhere in this branch's subtree.
    pub(super) fn needed(&self, out: &mut BTreeSet<Bytes>) {
        for op in &self.ops {
            match op {
                OpPlan::Put { index_keys, .. } => out.extend(index_keys.iter().cloned()),
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
    pub(super) fn place(&mut self, covered: &BTreeSet<Bytes>) {
        let mut here: BTreeSet<Bytes> = BTreeSet::new();
        for op in &self.ops {
            if let OpPlan::Put { index_keys, .. } = op {
                here.extend(index_keys.iter().filter(|k| !covered.contains(*k)).cloned());
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
}
