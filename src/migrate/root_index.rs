//! `etcdmux migrate root-index`: folds the per-tenant root index of earlier versions
//! (`<meta>/roots/<tenant>/<slot>`, one key per tenant and resource root) into the
//! shared one (`<meta>/slots/<slot>`, one key per resource root), so etcd's key count
//! stops growing with tenants × roots.
//!
//! Every slot any per-tenant key records first gets its shared key (a txn that puts
//! it only where it is missing). Only then, with `--delete-tenant-keys`, are the
//! per-tenant keys deleted: exactly the keys read, in batches, so a key an older
//! replica writes meanwhile stays (its slot is then read from it). This version reads
//! both forms, so the fold is safe while it serves; replicas of earlier versions
//! read only the per-tenant form and must all be gone first, and
//! `layout.write_tenant_index` off, or the keys come back.

use std::collections::BTreeSet;

use bytes::Bytes;

use super::error::{MigrateError, Result, Side};
use super::etcd::{Etcd, Pager};
use crate::config::Config;
use crate::keyspace::{KeyLayout, Slot};
use crate::ops::index::RootIndex;
use crate::pb::etcdserverpb::{compare, request_op, Compare, DeleteRangeRequest, RequestOp, TxnRequest};
use crate::shutdown::Tasks;

/// What a fold found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Folded {
    pub tenant_keys: usize,
    pub slots: usize,
    pub shared_added: usize,
    pub tenant_keys_deleted: usize,
}

pub async fn run(cfg: &Config, delete: bool, tasks: &Tasks) -> Result<()> {
    let layout = KeyLayout::new(&cfg.layout.prefix, &cfg.layout.meta_prefix);
    let etcd = Etcd::connect(cfg, Side::Target, cfg.upstream.clone())?;
    if delete && cfg.layout.write_tenant_index {
        return Err(MigrateError::Usage(
            "layout.write_tenant_index is on: replicas with this config write the per-tenant keys again; \
             turn it off (once no replica of an earlier version serves this etcd) before deleting them"
                .into(),
        ));
    }
    let f = fold(&etcd, &layout, cfg.upstream.max_txn_ops, cfg.migrate.page_keys, delete, tasks).await?;
    println!(
        "root index: {} per-tenant keys over {} resource roots; {} shared keys added; {} per-tenant keys deleted",
        f.tenant_keys, f.slots, f.shared_added, f.tenant_keys_deleted
    );
    if !delete && f.tenant_keys > 0 {
        println!("run again with --delete-tenant-keys to delete the per-tenant keys");
    }
    Ok(())
}

pub async fn fold(
    etcd: &Etcd,
    layout: &KeyLayout,
    max_txn_ops: usize,
    page: i64,
    delete: bool,
    tasks: &Tasks,
) -> Result<Folded> {
    let mut keys: Vec<Bytes> = Vec::new();
    let mut slots = BTreeSet::<Slot>::new();
    let mut pager = Pager::new(&layout.all_tenant_index_range(), 0, page, true);
    while let Some(kvs) = pager.next(etcd).await? {
        for kv in kvs {
            if let Some((_, slot)) = layout.tenant_index_entry(&kv.key) {
                slots.insert(slot);
                keys.push(kv.key);
            }
        }
    }
    let mut f = Folded { tenant_keys: keys.len(), slots: slots.len(), ..Default::default() };
    for slot in &slots {
        // Put only where missing: an existing key keeps its revisions.
        let key = layout.slot_key(slot);
        let txn = TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Create as i32,
                key: key.clone(),
                target_union: Some(compare::TargetUnion::CreateRevision(0)),
                ..Default::default()
            }],
            success: vec![RootIndex::put_op(key)],
            failure: vec![],
        };
        f.shared_added += usize::from(etcd.txn(txn).await?.succeeded);
    }
    if !delete {
        return Ok(f);
    }
    for batch in keys.chunks(max_txn_ops.max(1)) {
        if tasks.is_shut_down() {
            return Err(MigrateError::Interrupted("while deleting per-tenant keys; run it again to finish".into()));
        }
        let success = batch
            .iter()
            .map(|k| RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                    key: k.clone(),
                    ..Default::default()
                })),
            })
            .collect();
        let resp = etcd.txn(TxnRequest { success, ..Default::default() }).await?;
        for r in resp.responses {
            if let Some(crate::pb::etcdserverpb::response_op::Response::ResponseDeleteRange(d)) = r.response {
                f.tenant_keys_deleted += d.deleted as usize;
            }
        }
    }
    Ok(f)
}
