//! Writing migrated changes to the target: each source change becomes exactly what
//! etcdmux writes for the same client request ([`placed_put`]: the key in the layout
//! and its slot's root-index key in the same transaction), batched into
//! transactions that also advance the checkpoint ([`Store::commit`]).
//!
//! A batch never holds one key twice (etcd refuses a txn that writes a key twice),
//! stays within `migrate.batch_ops` / `batch_bytes`, and records the position after
//! its last change, so a crash resumes exactly after the last committed batch.

use std::collections::HashSet;

use bytes::Bytes;

use super::checkpoint::{hex, Checkpoint, Phase, Store};
use super::error::{MigrateError, Result};
use super::etcd::Etcd;
use super::leases::Leases;
use crate::keyspace::{slot_of, KeyLayout, TenantName};
use crate::ops::index::{index_keys, RootIndex};
use crate::ops::write::placed_put;
use crate::pb::etcdserverpb::{request_op, DeleteRangeRequest, PutRequest, RequestOp};
use crate::upstream::classify::EtcdError;

/// One migrated change, in tenant form.
#[derive(Debug, Clone)]
pub enum Item {
    /// `lease` is the source's lease id (0: none).
    Put {
        tenant: TenantName,
        key: Bytes,
        value: Bytes,
        lease: i64,
    },
    Delete {
        tenant: TenantName,
        key: Bytes,
    },
}

/// Where the copy is once an item is applied.
#[derive(Debug, Clone)]
pub enum Pos {
    /// The snapshot's next key to read, in range `range`.
    Snapshot { range: usize, next_key: Bytes },
    /// Event `event` (counted in the watched range) of source revision `rev`.
    Tail { rev: i64, event: u64 },
}

/// An item with its target lease resolved.
struct Pending {
    item: Item,
    pos: Pos,
    lease: i64,
}

pub struct Writer<'a> {
    pub source: &'a Etcd,
    pub target: &'a Etcd,
    pub layout: &'a KeyLayout,
    pub store: Store,
    pub cp: Checkpoint,
    pub leases: Leases,
    max_ops: usize,
    max_bytes: usize,
    /// Root-index keys and tenant markers written (or seen) in this run.
    known: HashSet<Bytes>,
    pending: Vec<Pending>,
    /// Keys the pending batch writes (data, index, markers).
    pending_keys: HashSet<Bytes>,
    pending_ops: usize,
    pending_bytes: usize,
    /// The checkpoint in memory differs from the one written.
    dirty: bool,
}

/// What one committed batch moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    pub items: u64,
    pub bytes: u64,
}

impl<'a> Writer<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        source: &'a Etcd,
        target: &'a Etcd,
        layout: &'a KeyLayout,
        store: Store,
        cp: Checkpoint,
        leases: Leases,
        max_ops: usize,
        max_bytes: usize,
    ) -> Writer<'a> {
        Writer {
            source,
            target,
            layout,
            store,
            cp,
            leases,
            max_ops,
            max_bytes,
            known: HashSet::new(),
            pending: Vec::new(),
            pending_keys: HashSet::new(),
            pending_ops: 0,
            pending_bytes: 0,
            dirty: false,
        }
    }

    /// The tenant's marker: which tenants this migration wrote (verify and a
    /// restart's wipe read them).
    pub fn marker_key(&self, t: &TenantName) -> Bytes {
        self.layout.migrate_key(&self.store.id, &format!("tenant/{t}"))
    }

    fn extra_keys(&self, item: &Item) -> Vec<Bytes> {
        match item {
            Item::Put { tenant, key, .. } => {
                let mut keys = index_keys(self.layout, tenant, &slot_of(key), false);
                keys.push(self.marker_key(tenant));
                keys.retain(|k| !self.known.contains(k) && !self.pending_keys.contains(k));
                keys
            }
            Item::Delete { .. } => Vec::new(),
        }
    }

    fn target_key(&self, item: &Item) -> Bytes {
        match item {
            Item::Put { tenant, key, .. } | Item::Delete { tenant, key } => self.layout.encode(tenant, key),
        }
    }

    fn size(item: &Item) -> usize {
        match item {
            Item::Put { key, value, .. } => key.len() + value.len(),
            Item::Delete { key, .. } => key.len(),
        }
    }

    /// Queues `item`; commits the pending batch first when the item does not fit in
    /// it (or writes a key the batch already writes).
    pub async fn push(&mut self, item: Item, pos: Pos) -> Result<Moved> {
        let mut moved = Moved::default();
        let key = self.target_key(&item);
        let ops = 1 + self.extra_keys(&item).len();
        let bytes = Self::size(&item);
        let full = self.pending_ops + ops > self.max_ops || self.pending_bytes + bytes > self.max_bytes;
        if !self.pending.is_empty() && (full || self.pending_keys.contains(&key)) {
            moved = self.flush().await?;
        }
        let lease = match &item {
            Item::Put { tenant, lease, .. } => self.leases.target_for(*lease, tenant, self.source, self.target).await?,
            Item::Delete { .. } => 0,
        };
        for k in self.extra_keys(&item) {
            self.pending_keys.insert(k);
        }
        self.pending_keys.insert(key);
        self.pending_ops += ops;
        self.pending_bytes += bytes;
        self.pending.push(Pending { item, pos, lease });
        Ok(moved)
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The ops of the pending batch and the index/marker keys it adds.
    fn build(&self) -> (Vec<RequestOp>, Vec<Bytes>) {
        let mut ops = Vec::with_capacity(self.pending_ops);
        let mut extra = Vec::new();
        let mut seen = HashSet::new();
        for p in &self.pending {
            match &p.item {
                Item::Put { tenant, key, value, .. } => {
                    let req = PutRequest { value: value.clone(), lease: p.lease, ..Default::default() };
                    // The root index's shared form only: a migration writes a layout
                    // no replica of an earlier version reads.
                    let (req, mut keys) = placed_put(self.layout, tenant, key, req, false);
                    keys.push(self.marker_key(tenant));
                    for k in keys {
                        if !self.known.contains(&k) && seen.insert(k.clone()) {
                            ops.push(RootIndex::put_op(k.clone()));
                            extra.push(k);
                        }
                    }
                    ops.push(RequestOp { request: Some(request_op::Request::RequestPut(req)) });
                }
                Item::Delete { tenant, key } => {
                    let req = DeleteRangeRequest { key: self.layout.encode(tenant, key), ..Default::default() };
                    ops.push(RequestOp { request: Some(request_op::Request::RequestDeleteRange(req)) });
                }
            }
        }
        (ops, extra)
    }

    /// The checkpoint once the pending batch is applied.
    fn next_checkpoint(&self) -> (Checkpoint, Moved) {
        let mut cp = self.cp.clone();
        let mut moved = Moved::default();
        for p in &self.pending {
            moved.items += 1;
            moved.bytes += Self::size(&p.item) as u64;
        }
        match self.pending.last().map(|p| &p.pos) {
            Some(Pos::Snapshot { range, next_key }) => {
                cp.range_index = *range;
                cp.next_key = hex(next_key);
                cp.copied_keys += moved.items;
                cp.copied_bytes += moved.bytes;
            }
            Some(Pos::Tail { rev, event }) => {
                cp.applied_rev = cp.applied_rev.max(rev - 1);
                cp.partial_rev = *rev;
                cp.partial_events = event + 1;
                cp.events_applied += moved.items;
            }
            None => {}
        }
        if cp.partial_rev != 0 && cp.partial_rev <= cp.applied_rev {
            cp.partial_rev = 0;
            cp.partial_events = 0;
        }
        (cp, moved)
    }

    /// Commits the pending batch with the checkpoint after it.
    pub async fn flush(&mut self) -> Result<Moved> {
        if self.pending.is_empty() {
            return Ok(Moved::default());
        }
        // A lease that expired between its lookup and the write fails the batch:
        // look its leases up again (now gone: no lease) and retry.
        for attempt in 0..3 {
            let (ops, extra) = self.build();
            let (cp, moved) = self.next_checkpoint();
            match self.store.commit(self.target, ops, &cp).await {
                Ok(_) => {
                    self.cp = cp;
                    self.dirty = false;
                    self.known.extend(extra);
                    self.pending.clear();
                    self.pending_keys.clear();
                    self.pending_ops = 0;
                    self.pending_bytes = 0;
                    return Ok(moved);
                }
                Err(e) if e.etcd() == Some(EtcdError::LeaseNotFound) && attempt < 2 => {
                    self.refresh_leases().await?;
                }
                Err(e) if e.etcd() == Some(EtcdError::RequestTooLarge) => {
                    return Err(MigrateError::Refused(format!(
                        "the target refused a batch of {} changes ({} bytes) as too large: lower \
                         migrate.batch_bytes below the target's --max-request-bytes (a single value that \
                         large cannot be copied in a transaction)",
                        self.pending.len(),
                        self.pending_bytes
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        Err(MigrateError::Internal("a batch kept naming leases that do not exist".to_string()))
    }

    async fn refresh_leases(&mut self) -> Result<()> {
        let mut pending = std::mem::take(&mut self.pending);
        for p in &mut pending {
            if let Item::Put { tenant, lease, .. } = &p.item {
                if *lease != 0 {
                    self.leases.forget(*lease);
                    p.lease = self.leases.target_for(*lease, tenant, self.source, self.target).await?;
                }
            }
        }
        self.pending = pending;
        Ok(())
    }

    /// Writes the checkpoint alone (a phase change, or the tail's position moving
    /// past changes that were not migrated). Commits the pending batch first.
    pub async fn commit_position(&mut self) -> Result<Moved> {
        let moved = self.flush().await?;
        if self.dirty {
            let (cp, _) = self.next_checkpoint();
            self.store.commit(self.target, Vec::new(), &cp).await?;
            self.cp = cp;
            self.dirty = false;
        }
        Ok(moved)
    }

    /// Every source change at or below `rev` has been pushed (the tail saw the end
    /// of a watch response, or a fence).
    pub fn complete_through(&mut self, rev: i64) {
        if rev > self.cp.applied_rev {
            self.cp.applied_rev = rev;
            self.dirty = true;
        }
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Changes the checkpoint in memory (written with the next commit).
    pub fn update(&mut self, f: impl FnOnce(&mut Checkpoint)) {
        f(&mut self.cp);
        self.dirty = true;
    }

    pub fn set_phase(&mut self, phase: Phase) {
        self.update(|cp| cp.phase = phase);
    }
}
