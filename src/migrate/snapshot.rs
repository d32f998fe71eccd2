//! The copy's first phases: clearing stale target keys of some tenants (a restart,
//! or `--on-conflict overwrite`), then copying every migrated key as of one source
//! revision, page by page within the rate limits.

use std::collections::BTreeSet;

use bytes::Bytes;

use super::apply::{Item, Pos, Writer};
use super::checkpoint::{unhex, Phase};
use super::error::{MigrateError, Result};
use super::etcd::{Etcd, Pager};
use super::progress::Progress;
use super::rate::RateLimit;
use super::source::{Class, SourceMap};
use crate::keyspace::{End, KeyLayout, Piece, Slot, TenantName};
use crate::pb::etcdserverpb::{request_op, DeleteRangeRequest, RequestOp};
use crate::shutdown::Tasks;

/// Every slot the target's root index records, with tenant `t`'s tenant index of
/// earlier versions (a superset of the slots `t` uses).
pub async fn indexed_slots(target: &Etcd, layout: &KeyLayout, t: &TenantName, revision: i64) -> Result<BTreeSet<Slot>> {
    let mut slots = BTreeSet::<Slot>::new();
    let mut pager = Pager::new(&layout.slot_index_range(), revision, 1000, true);
    while let Some(page) = pager.next(target).await? {
        slots.extend(page.iter().filter_map(|kv| layout.slot_from_slot_key(&kv.key)));
    }
    let mut pager = Pager::new(&layout.tenant_index_range(t), revision, 1000, true);
    while let Some(page) = pager.next(target).await? {
        slots.extend(page.iter().filter_map(|kv| layout.slot_from_tenant_index_key(t, &kv.key)));
    }
    Ok(slots)
}

/// Every upstream range that can hold tenant `t`'s keys in the target.
pub async fn tenant_pieces(target: &Etcd, layout: &KeyLayout, t: &TenantName, revision: i64) -> Result<Vec<Piece>> {
    let slots = indexed_slots(target, layout, t, revision).await?;
    Ok(layout.plan(t, &Bytes::new(), &End::Unbounded, &slots))
}

/// Clears the target's keys of the tenants in the checkpoint's wipe list, a page
/// at a time (each delete guarded by the checkpoint like any other write).
pub async fn wipe(w: &mut Writer<'_>, page: i64, tasks: &Tasks) -> Result<()> {
    while w.cp.wipe_done < w.cp.wipe.len() {
        let name = &w.cp.wipe[w.cp.wipe_done];
        let t = TenantName::new(name).map_err(|e| MigrateError::Internal(e.to_string()))?;
        eprintln!("wipe: removing the target's keys of tenant {t} before copying it again");
        for piece in tenant_pieces(w.target, w.layout, &t, 0).await? {
            loop {
                if tasks.is_shut_down() {
                    return Err(MigrateError::Interrupted("during the wipe; run copy again to resume".into()));
                }
                let mut pager = Pager::new(&piece, 0, page, true);
                let Some(kvs) = pager.next(w.target).await? else { break };
                let (first, last) = match (kvs.first(), kvs.last()) {
                    (Some(f), Some(l)) => (f.key.clone(), l.key.clone()),
                    _ => break,
                };
                let mut end = last.to_vec();
                end.push(0);
                let del = DeleteRangeRequest { key: first, range_end: Bytes::from(end), ..Default::default() };
                let ops = vec![RequestOp { request: Some(request_op::Request::RequestDeleteRange(del)) }];
                let cp = w.cp.clone();
                w.store.commit(w.target, ops, &cp).await?;
            }
        }
        w.update(|cp| cp.wipe_done += 1);
        w.commit_position().await?;
    }
    w.set_phase(Phase::Snapshot);
    w.commit_position().await?;
    Ok(())
}

/// Copies every migrated key at the snapshot revision, resuming where the
/// checkpoint says; ends in the tail phase at that revision.
pub async fn copy(
    w: &mut Writer<'_>,
    map: &SourceMap,
    page: i64,
    page_bytes: usize,
    rate: &mut RateLimit,
    progress: &mut Progress,
    tasks: &Tasks,
) -> Result<()> {
    let rev = w.cp.snapshot_rev;
    for (i, range) in map.ranges.iter().enumerate().skip(w.cp.range_index) {
        let mut pager = Pager::new(range, rev, page, false).page_bytes(page_bytes);
        if i == w.cp.range_index && !w.cp.next_key.is_empty() {
            pager = pager.from_key(unhex(&w.cp.next_key)?);
        }
        while let Some(kvs) = pager.next(w.source).await? {
            if tasks.is_shut_down() {
                w.flush().await?;
                return Err(MigrateError::Interrupted(format!(
                    "snapshot at {} keys; run copy again to resume",
                    w.cp.copied_keys
                )));
            }
            for kv in kvs {
                let mut next = kv.key.to_vec();
                next.push(0);
                // Keys outside the migration (other projects, unmatched keys the
                // operator chose to skip) are left where they are.
                if let Class::Tenant(tenant, key) = map.classify(&kv.key) {
                    // Per key, so that the writes of a large page are spread out too.
                    rate.take(1, (kv.key.len() + kv.value.len()) as u64).await;
                    let item = Item::Put { tenant, key, value: kv.value, lease: kv.lease };
                    let moved = w.push(item, Pos::Snapshot { range: i, next_key: Bytes::from(next) }).await?;
                    progress.add(moved.items, moved.bytes);
                }
            }
        }
        let moved = w.flush().await?;
        progress.add(moved.items, moved.bytes);
        w.update(|cp| {
            cp.range_index = i + 1;
            cp.next_key.clear();
        });
    }
    w.update(|cp| {
        cp.phase = Phase::Tail;
        cp.applied_rev = rev;
    });
    w.commit_position().await?;
    Ok(())
}
