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
//! A txn whose ranges and deletes span many roots is kept within etcd's op limit by
//! nesting their pieces, and a txn whose answer would nest deeper than etcdmux can
//! decode is refused before it is sent ([`fit`]).
//!
//! Puts into a slot this process has not seen carry the slot's index put in the same
//! branch. etcd refuses a txn that puts one key twice on a path (a branch and its
//! nested txns, or two sibling nested txns), so an index key is placed once: in the
//! branch whose own put needs it, or in the nearest branch above two nested txns that
//! both need it.

mod answer;
mod check;
mod fit;
mod translate;

use std::collections::BTreeSet;

use answer::Answer;
use check::check_intervals;
use translate::{Branch, Owner, Translate};

use crate::error::{Error, Result};
use crate::keyspace::Scope;
use crate::ops::index::{index_unchanged_since, with_index_attempts, Attempt, IndexSnapshot};
use crate::ops::{validate, Proxy};
use crate::pb::etcdserverpb::{request_op, response_op, Compare, RequestOp, TxnRequest, TxnResponse};
use crate::upstream::{CallCtx, Retry};

impl Proxy {
    pub async fn txn(&self, scope: &Scope, ctx: &CallCtx, req: TxnRequest) -> Result<TxnResponse> {
        validate::txn(&req, self.cfg.upstream.max_txn_ops)?;
        check_intervals(&req.success)?;
        check_intervals(&req.failure)?;
        let req = &req;
        with_index_attempts("txn", |_| self.txn_attempt(scope, ctx, req)).await
    }

    /// The client's txn as a tree of upstream ops, planned with the tenant's index
    /// when one is given.
    fn translate<'a>(
        &'a self,
        scope: &'a Scope,
        req: &TxnRequest,
        index: Option<&'a IndexSnapshot>,
    ) -> Result<(Translate<'a>, Vec<Compare>, Branch, Branch)> {
        let mut tr = Translate {
            proxy: self,
            scope,
            owner: None,
            writes_global: false,
            leases: BTreeSet::new(),
            index,
            needs_index: false,
            put_slots: BTreeSet::new(),
        };
        let compare: Vec<Compare> = req.compare.iter().cloned().map(|c| tr.compare(c)).collect::<Result<_>>()?;
        let success = tr.branch(req.success.clone())?;
        let failure = tr.branch(req.failure.clone())?;
        Ok((tr, compare, success, failure))
    }

    /// One attempt: translate (after reading the tenant's index when a range or
    /// delete spans roots), check, send, answer.
    async fn txn_attempt(&self, scope: &Scope, ctx: &CallCtx, req: &TxnRequest) -> Result<Attempt<TxnResponse>> {
        let first = self.translate(scope, req, None)?;
        let index = match (&first.0.owner, first.0.needs_index) {
            (_, false) => None,
            (Some(Owner::Tenant(t)), true) => {
                let mut snap = self.read_index(ctx, t, 0).await?;
                snap.slots.extend(first.0.put_slots.iter().cloned());
                Some(snap)
            }
            (_, true) => return Err(Error::Internal("cross-root op without a tenant".to_string())),
        };
        // Without a cross-root op the first translation is the plan: planned again
        // only with the index it asked for.
        let (tr, compare, mut success, mut failure) = match &index {
            None => first,
            Some(_) => self.translate(scope, req, index.as_ref())?,
        };
        if tr.needs_index {
            return Err(Error::Internal("txn planned with the index still needs it".to_string()));
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
        let max_ops = self.cfg.upstream.max_txn_ops;
        let guard = match (&index, &view) {
            (Some(snap), Some((t, _))) => Some(index_unchanged_since(&self.layout, t, snap.revision)),
            _ => None,
        };
        // The guard txn has two compares and one op: etcd leaves the client's txn
        // what the guard's largest count leaves.
        let budget = max_ops.saturating_sub(guard.as_ref().map_or(0, |g| g.len()));
        let user = fit::build(&compare, &mut success, &mut failure, budget).ok_or(Error::TxnTooLarge { max_ops })?;
        let guarded = guard.is_some();
        let outer = match guard {
            Some(g) => TxnRequest {
                compare: g,
                success: vec![RequestOp { request: Some(request_op::Request::RequestTxn(user)) }],
                failure: vec![],
            },
            None => user,
        };
        let depth = fit::answer_depth(&outer);
        if depth > fit::MAX_DECODE_LEVEL {
            return Err(Error::TxnTooDeep { depth, max: fit::MAX_DECODE_LEVEL });
        }
        let resp = self.up_txn(ctx, &outer, Retry::OnlyUnsent).await?;
        let resp = if !guarded {
            resp
        } else if !resp.succeeded {
            return Ok(Attempt::Retry); // the tenant wrote a new slot meanwhile: plan again
        } else {
            match resp.responses.into_iter().next().and_then(|r| r.response) {
                Some(response_op::Response::ResponseTxn(mut inner)) => {
                    inner.header = resp.header;
                    inner
                }
                other => return Err(Error::Internal(format!("guard txn answered {other:?}"))),
            }
        };
        let mut answer = Answer { proxy: self, view, learned: Vec::new() };
        let taken = if resp.succeeded { &success } else { &failure };
        let responses = answer.branch(taken, resp.responses)?;
        for k in answer.learned {
            self.index.learn(k);
        }
        Ok(Attempt::Done(TxnResponse { header: resp.header, succeeded: resp.succeeded, responses }))
    }
}
