//! The root index: which layout slots any tenant has keys in, kept in etcd.
//!
//! A range that spans resource roots (`get --prefix /`, deleting a whole project)
//! must find every root the tenant has written. Each slot's index key
//! (`<meta>/slots/<slot>`, one per slot for all tenants) is put in the same etcd
//! transaction as the first key any tenant writes in the slot, and never removed, so
//! the index is always a superset of the slots holding keys, for every etcdmux
//! replica, at every revision. Its size is the number of resource roots in use, not
//! tenants × roots: etcd's compaction walks every key, and a per-tenant index made it
//! 1.5× slower at 30,000 projects (loadtest/results/rootindex.md).
//!
//! Earlier versions kept one key per tenant and slot (`<meta>/roots/<tenant>/<slot>`).
//! Those keys are read too, at the same revision, and the guards cover them, so a
//! rolling upgrade loses nothing; `layout.write_tenant_index` keeps writing them for
//! old replicas, and `etcdmux migrate root-index` folds them into the shared form.
//!
//! This process only remembers which index keys it knows exist (a bounded cache);
//! forgetting one costs one idempotent index put on the slot's next write.
//!
//! A cross-root operation reads the index and then works at the revision it read
//! (a range) or guarded by compares that the index did not grow since (a delete, a
//! txn). When the index grew meanwhile, or the pinned revision was compacted, the
//! operation starts over: [`with_index_attempts`] runs those attempts, the same way
//! for every operation.

use crate::metrics::names;
use std::collections::BTreeSet;
use std::future::Future;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::keyspace::{KeyLayout, Piece, Slot, TenantName};
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{compare, request_op, Compare, PutRequest, RangeRequest, RequestOp, ResponseHeader};
use crate::upstream::CallCtx;

/// Attempts of one cross-root operation. Each attempt reads the tenant's index and
/// does its work at (or guarded by) that read: the index read is part of an
/// attempt's work, not an attempt of its own.
pub const INDEX_ATTEMPTS: usize = 5;

/// What one attempt of a cross-root operation came to.
#[derive(Debug)]
pub enum Attempt<T> {
    Done(T),
    /// The index grew, or the pinned revision was compacted, meanwhile: start over.
    Retry,
}

/// Runs `attempt` until it is done, at most [`INDEX_ATTEMPTS`] times; `attempt` is
/// told whether it is the last one (so it can pass on an error it would otherwise
/// retry). `what` names the operation in the error when every attempt had to retry.
pub async fn with_index_attempts<T, F, Fut>(what: &'static str, mut attempt: F) -> Result<T>
where
    F: FnMut(bool) -> Fut,
    Fut: Future<Output = Result<Attempt<T>>>,
{
    for i in 1..=INDEX_ATTEMPTS {
        if let Attempt::Done(v) = attempt(i == INDEX_ATTEMPTS).await? {
            return Ok(v);
        }
    }
    Err(Error::IndexKeptChanging(what))
}

pub struct RootIndex {
    known: moka::sync::Cache<Bytes, ()>,
    write_tenant_index: bool,
}

impl RootIndex {
    pub fn new(capacity: u64, write_tenant_index: bool) -> RootIndex {
        RootIndex { known: moka::sync::Cache::new(capacity), write_tenant_index }
    }

    /// The index keys a put of tenant `t` into `slot` must carry in its
    /// transaction: those this process does not know exist.
    pub fn missing(&self, layout: &KeyLayout, t: &TenantName, slot: &Slot) -> Vec<Bytes> {
        let mut keys = index_keys(layout, t, slot, self.write_tenant_index);
        keys.retain(|k| !self.known.contains_key(k));
        keys
    }

    /// Records index keys that etcd now holds (after a committed write or a read).
    pub fn learn(&self, index_key: Bytes) {
        self.known.insert(index_key, ());
        // moka settles its count in the background; the gauge may lag by a few
        // entries. Settling here (run_pending_tasks) would put eviction work on the
        // request path, for every write once the cache is full.
        metrics::gauge!(names::ROOT_INDEX_CACHED).set(self.known.entry_count() as f64);
    }

    /// The op that records `index_key` (an empty value: only its existence counts).
    pub fn put_op(index_key: Bytes) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest { key: index_key, ..Default::default() })),
        }
    }
}

/// Every index key that records tenant `t`'s keys in `slot`: the slot's root-index
/// key, and with `tenant_form` the tenant-index key of earlier versions.
pub fn index_keys(layout: &KeyLayout, t: &TenantName, slot: &Slot, tenant_form: bool) -> Vec<Bytes> {
    let mut keys = vec![layout.slot_key(slot)];
    if tenant_form {
        keys.push(layout.tenant_index_key(t, slot));
    }
    keys
}

/// The compares that hold while no index key that tenant `t` reads was created
/// after `rev`: the guard that makes a cross-root write see every slot.
pub fn index_unchanged_since(layout: &KeyLayout, t: &TenantName, rev: i64) -> Vec<Compare> {
    [layout.slot_index_range(), layout.tenant_index_range(t)]
        .into_iter()
        .map(|range| Compare {
            result: compare::CompareResult::Less as i32,
            target: compare::CompareTarget::Create as i32,
            key: range.key,
            range_end: range.range_end,
            target_union: Some(compare::TargetUnion::CreateRevision(rev + 1)),
        })
        .collect()
}

/// The index as tenant `t` sees it, read from etcd.
pub struct IndexSnapshot {
    pub header: Option<ResponseHeader>,
    /// The revision the index was read at: the revision to read data at.
    pub revision: i64,
    pub slots: BTreeSet<Slot>,
}

impl Proxy {
    /// Reads the root index, and tenant `t`'s index of earlier versions, at
    /// `revision` (0 = now; both at the revision the first read was served at).
    pub async fn read_index(&self, ctx: &CallCtx, t: &TenantName, revision: i64) -> Result<IndexSnapshot> {
        let keys_only = |range: Piece, revision: i64| RangeRequest {
            key: range.key,
            range_end: range.range_end,
            keys_only: true,
            revision,
            ..Default::default()
        };
        let shared = self.up_range(ctx, &keys_only(self.layout.slot_index_range(), revision)).await?;
        let rev = shared.header.as_ref().map_or(0, |h| h.revision);
        let at = if revision > 0 { revision } else { rev };
        let tenant = self.up_range(ctx, &keys_only(self.layout.tenant_index_range(t), at)).await?;
        let mut slots = BTreeSet::new();
        for kv in shared.kvs {
            if let Some(slot) = self.layout.slot_from_slot_key(&kv.key) {
                slots.insert(slot);
                self.index.learn(kv.key);
            }
        }
        for kv in tenant.kvs {
            if let Some(slot) = self.layout.slot_from_tenant_index_key(t, &kv.key) {
                slots.insert(slot);
                if self.index.write_tenant_index {
                    self.index.learn(kv.key);
                }
            }
        }
        Ok(IndexSnapshot { header: shared.header, revision: rev, slots })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test]
    async fn attempts_are_counted_once() {
        let calls = Cell::new(0);
        let lasts = Cell::new(0);
        let always_retry = with_index_attempts("test", |last| {
            calls.set(calls.get() + 1);
            lasts.set(lasts.get() + usize::from(last));
            async { Ok(Attempt::<()>::Retry) }
        })
        .await;
        assert_eq!(calls.get(), INDEX_ATTEMPTS);
        assert_eq!(lasts.get(), 1, "exactly one attempt is the last");
        let e = always_retry.expect_err("every attempt retried");
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert_eq!(e.to_string(), "etcdmux: the tenant's root index kept changing during a test; retry");

        calls.set(0);
        let third = with_index_attempts("test", |_| {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move { Ok(if n == 3 { Attempt::Done(n) } else { Attempt::Retry }) }
        })
        .await;
        assert_eq!((third.ok(), calls.get()), (Some(3), 3));

        calls.set(0);
        let failed: Result<()> = with_index_attempts("test", |_| {
            calls.set(calls.get() + 1);
            async { Err(Error::KeyNotFound) }
        })
        .await;
        assert!(matches!(failed, Err(Error::KeyNotFound)) && calls.get() == 1, "errors end the attempts");
    }
}
