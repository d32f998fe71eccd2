//! `cleanup`: deletes the migrated keys from the source, and only then:
//!
//! - the migration was cut over (its verify passed at the fence revision F);
//! - no migrated key in the source changed after F (the old layout was not written
//!   since: such a change is not in the target, and deleting would lose it);
//! - `--delete-source` was given (without it: what would be deleted, and exit 4).
//!
//! Keys go in batches of `migrate.cleanup_batch`, each one transaction that deletes
//! a key only if its revision is still the one read (a key changed meanwhile stops
//! the cleanup), within the rate limit. An interrupted cleanup resumes where it was:
//! what is deleted is gone from the source only, and the target is never touched.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::checkpoint::{CleanupRecord, Phase};
use super::error::{MigrateError, Result};
use super::etcd::Pager;
use super::rate::RateLimit;
use super::source::Class;
use super::{verify, Ctx};
use crate::keyspace::TenantName;
use crate::pb::etcdserverpb::{compare, request_op, Compare, DeleteRangeRequest, RequestOp, TxnRequest};

pub async fn run(ctx: &Ctx, delete: bool, batch: usize) -> Result<()> {
    let id = ctx.id();
    let (mut store, _m, mut cp, map, _) = verify::open(ctx, id).await?;
    let Some(cut) = cp.cutover.clone().filter(|_| cp.phase == Phase::Cutover) else {
        return Err(MigrateError::Refused(format!(
            "migration {id:?} is not cut over (phase {:?}): cleanup deletes the source's keys only after cutover, \
             whose verify must pass",
            cp.phase
        )));
    };
    if cp.cleanup.as_ref().is_some_and(|c| c.done) {
        println!("cleanup {id:?}: already done; nothing left to delete");
        return Ok(());
    }
    if batch == 0 || batch >= ctx.cfg.upstream.max_txn_ops {
        return Err(MigrateError::Usage(format!(
            "--batch must be at least 1 and below upstream.max_txn_ops ({})",
            ctx.cfg.upstream.max_txn_ops
        )));
    }
    // The source must still be what was verified.
    let mut changed = Vec::new();
    let mut per_tenant: BTreeMap<TenantName, u64> = BTreeMap::new();
    for r in &map.ranges {
        let mut pager = Pager::new(r, 0, ctx.cfg.migrate.page_keys, true);
        while let Some(kvs) = pager.next(&ctx.source).await? {
            for kv in kvs {
                if let Class::Tenant(t, _) = map.classify(&kv.key) {
                    if kv.mod_revision > cut.fence_rev {
                        changed.push(format!(
                            "  {:?} at revision {}",
                            String::from_utf8_lossy(&kv.key),
                            kv.mod_revision
                        ));
                    }
                    *per_tenant.entry(t).or_default() += 1;
                }
            }
        }
    }
    if !changed.is_empty() {
        let n = changed.len();
        changed.truncate(50);
        return Err(MigrateError::Refused(format!(
            "{n} migrated keys were written in the source after the cutover (source revision {}): those changes \
             are not in the target, so nothing is deleted. Find the writer that still uses the old layout:\n{}",
            cut.fence_rev,
            changed.join("\n")
        )));
    }
    let total: u64 = per_tenant.values().sum();
    if !delete {
        println!(
            "cleanup {id:?}: would delete {total} keys of {} projects from the source {} (verified at cutover, \
             source revision {})",
            per_tenant.len(),
            ctx.source.url,
            cut.fence_rev
        );
        return Err(MigrateError::Refused(
            "cleanup deletes only with --delete-source; nothing was deleted".to_string(),
        ));
    }
    let mut rate = RateLimit::new(ctx.cfg.migrate.keys_per_sec, 0);
    let mut deleted = cp.cleanup.as_ref().map_or(0, |c| c.deleted);
    let mut since_record = 0;
    for r in &map.ranges {
        // Large pages read, small batches deleted: etcd walks the rest of a range for
        // every page.
        let mut pager = Pager::new(r, 0, ctx.cfg.migrate.page_keys, true);
        while let Some(kvs) = pager.next(&ctx.source).await? {
            let keys: Vec<(Bytes, i64)> = kvs
                .into_iter()
                .filter(|kv| matches!(map.classify(&kv.key), Class::Tenant(..)))
                .map(|kv| (kv.key, kv.mod_revision))
                .collect();
            for keys in keys.chunks(batch) {
                if ctx.tasks.is_shut_down() {
                    cp.cleanup = Some(CleanupRecord { deleted, done: false });
                    store.commit(&ctx.target, Vec::new(), &cp).await?;
                    return Err(MigrateError::Interrupted(format!(
                        "{deleted} keys deleted; run cleanup again to go on"
                    )));
                }
                rate.take(keys.len() as u64, 0).await;
                let txn = TxnRequest {
                    compare: keys.iter().map(|(k, rev)| unchanged(k.clone(), *rev)).collect(),
                    success: keys.iter().map(|(k, _)| delete_op(k.clone())).collect(),
                    failure: vec![],
                };
                if !ctx.source.txn(txn).await?.succeeded {
                    return Err(MigrateError::Refused(format!(
                        "a source key changed while cleanup was deleting it (between {:?} and {:?}): stopped; its \
                         change is not in the target. Find the writer that still uses the old layout",
                        String::from_utf8_lossy(&keys[0].0),
                        String::from_utf8_lossy(&keys[keys.len() - 1].0)
                    )));
                }
                deleted += keys.len() as u64;
                since_record += 1;
                if since_record >= 20 {
                    since_record = 0;
                    cp.cleanup = Some(CleanupRecord { deleted, done: false });
                    store.commit(&ctx.target, Vec::new(), &cp).await?;
                    eprintln!("cleanup {id:?}: {deleted} of about {total} keys deleted");
                }
            }
        }
    }
    let fence = map.fence_key().clone();
    ctx.source.txn(TxnRequest { compare: vec![], success: vec![delete_op(fence)], failure: vec![] }).await?;
    cp.cleanup = Some(CleanupRecord { deleted, done: true });
    store.commit(&ctx.target, Vec::new(), &cp).await?;
    println!("cleanup {id:?}: {deleted} keys deleted from the source; the old layout of this migration is gone");
    Ok(())
}

fn unchanged(key: Bytes, rev: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Mod as i32,
        key,
        range_end: Bytes::new(),
        target_union: Some(compare::TargetUnion::ModRevision(rev)),
    }
}

fn delete_op(key: Bytes) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest { key, ..Default::default() })),
    }
}
