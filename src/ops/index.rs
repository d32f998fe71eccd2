//! The per-tenant root index: which layout slots a tenant has keys in, kept in etcd.
//!
//! A range that spans resource roots (`get --prefix /`, deleting a whole project)
//! must find every root the tenant has written. Each slot's index key
//! (`<meta>/roots/<tenant>/<slot>`) is put in the same etcd transaction as the
//! slot's first key and never removed, so the index is always a superset of the
//! slots holding keys, for every etcdmux replica, at every revision.
//!
//! This process only remembers which index keys it knows exist (a bounded cache);
//! forgetting one costs one idempotent index put on the slot's next write.
//!
//! A cross-root operation reads the index and then works at the revision it read
//! (a range) or guarded by a compare that the index did not grow since (a delete, a
//! txn). When the index grew meanwhile, or the pinned revision was compacted, the
//! operation starts over: [`with_index_attempts`] runs those attempts, the same way
//! for every operation.

use crate::metrics::names;
use std::collections::BTreeSet;
use std::future::Future;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::keyspace::Slot;
use crate::keyspace::TenantName;
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{request_op, PutRequest, RangeRequest, RequestOp, ResponseHeader};
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
}

impl RootIndex {
    pub fn new(capacity: u64) -> RootIndex {
        RootIndex { known: moka::sync::Cache::new(capacity) }
    }

    pub fn is_known(&self, index_key: &Bytes) -> bool {
        self.known.contains_key(index_key)
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

/// A tenant's index as read from etcd.
pub struct IndexSnapshot {
    pub header: Option<ResponseHeader>,
    /// The revision the index was read at: the revision to read data at.
    pub revision: i64,
    pub slots: BTreeSet<Slot>,
}

impl Proxy {
    /// Reads tenant `t`'s index at `revision` (0 = now).
    pub async fn read_index(&self, ctx: &CallCtx, t: &TenantName, revision: i64) -> Result<IndexSnapshot> {
        let range = self.layout.index_range(t);
        let req = RangeRequest {
            key: range.key,
            range_end: range.range_end,
            keys_only: true,
            revision,
            ..Default::default()
        };
        let resp = self.up_range(ctx, &req).await?;
        let mut slots = BTreeSet::new();
        for kv in resp.kvs {
            if let Some(slot) = self.layout.slot_from_index_key(t, &kv.key) {
                slots.insert(slot);
                self.index.learn(kv.key);
            }
        }
        let rev = resp.header.as_ref().map_or(0, |h| h.revision);
        Ok(IndexSnapshot { header: resp.header, revision: rev, slots })
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
