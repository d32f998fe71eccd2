//! Leases of the copied keys.
//!
//! - **One etcd** (source = target): the source's lease is the target's. The copy
//!   only adds etcdmux's owner record (`<meta>/leases/<id>`, attached to the lease)
//!   so that the lease's owner can use it through etcdmux.
//! - **Two etcds**: each source lease is granted again in the target with its
//!   *remaining* TTL, under the same id when that id is free there (so a client that
//!   keeps it alive by id after cutover keeps the copy alive), and the copied keys
//!   are attached to it. The mapping is kept in the target under
//!   `<meta>/migrate/<id>/lease/<source id>`, attached to the new lease, so a resumed
//!   copy finds it and it disappears with the lease. While the tail runs, a copy
//!   whose source lease is still alive is kept alive too (`lease_sync_interval_ms`).
//!
//! A source lease that is already gone when its key is copied maps to no lease: the
//! key is copied without one, and the source's delete (the lease's expiry) follows
//! in the tail.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::error::{MigrateError, Result};
use super::etcd::{Etcd, Pager};
use crate::keyspace::{prefix_end, KeyLayout, Piece, TenantName};
use crate::ops::lease::owner_record;
use crate::pb::etcdserverpb::{compare, request_op, Compare, PutRequest, RequestOp, TxnRequest};
use crate::upstream::classify::EtcdError;

/// Who owns a copied lease in etcdmux's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOwner {
    /// This principal (the `[tenancy] connection_identity` by default: on a key-path
    /// listener every request, lease grants too, carries it).
    Principal(TenantName),
    /// The tenant of the first copied key attached to the lease (static-tenant or
    /// certificate-identity deployments, where each project grants its own).
    KeyTenant,
}

impl LeaseOwner {
    /// From a manifest: a principal, or `<tenant>`.
    pub fn parse(text: &str) -> Result<LeaseOwner> {
        if text == "<tenant>" {
            return Ok(LeaseOwner::KeyTenant);
        }
        TenantName::new(text).map(LeaseOwner::Principal).map_err(|e| MigrateError::Usage(format!("lease owner: {e}")))
    }

    pub fn text(&self) -> String {
        match self {
            LeaseOwner::Principal(p) => p.to_string(),
            LeaseOwner::KeyTenant => "<tenant>".to_string(),
        }
    }
}

pub struct Leases {
    same_etcd: bool,
    owner: LeaseOwner,
    layout: KeyLayout,
    id: String,
    /// Source lease → target lease; `None`: gone, copy without a lease.
    map: BTreeMap<i64, Option<i64>>,
}

impl Leases {
    /// Reads the mappings a previous run left in the target.
    pub async fn load(
        target: &Etcd,
        layout: &KeyLayout,
        id: &str,
        same_etcd: bool,
        owner: LeaseOwner,
    ) -> Result<Leases> {
        let mut map = BTreeMap::new();
        if !same_etcd {
            let range = map_range(layout, id);
            let mut pager = Pager::new(&range, 0, 1000, false);
            while let Some(page) = pager.next(target).await? {
                for kv in page {
                    let src = std::str::from_utf8(&kv.key[range.key.len()..])
                        .ok()
                        .and_then(|h| u64::from_str_radix(h, 16).ok());
                    let dst = std::str::from_utf8(&kv.value).ok().and_then(|v| v.parse::<i64>().ok());
                    if let (Some(s), Some(d)) = (src, dst) {
                        map.insert(s as i64, Some(d));
                    }
                }
            }
        }
        Ok(Leases { same_etcd, owner, layout: layout.clone(), id: id.to_string(), map })
    }

    /// The target lease for source lease `src` (0: none), created when first needed.
    pub async fn target_for(&mut self, src: i64, tenant: &TenantName, source: &Etcd, target: &Etcd) -> Result<i64> {
        if src == 0 {
            return Ok(0);
        }
        if let Some(t) = self.map.get(&src) {
            return Ok(t.unwrap_or(0));
        }
        let owner = match &self.owner {
            LeaseOwner::Principal(p) => p.clone(),
            LeaseOwner::KeyTenant => tenant.clone(),
        };
        let left = source.lease_ttl(src).await?;
        let dst = if left.ttl <= 0 {
            None
        } else if self.same_etcd {
            self.record_owner(target, src, &owner).await?
        } else {
            Some(self.grant_copy(target, src, left.ttl, &owner).await?)
        };
        self.map.insert(src, dst);
        Ok(dst.unwrap_or(0))
    }

    /// One etcd: the owner record, unless there is one (a lease granted through
    /// etcdmux already). `None` when the lease expired meanwhile.
    async fn record_owner(&self, target: &Etcd, id: i64, owner: &TenantName) -> Result<Option<i64>> {
        let rec = owner_record(&self.layout, id, owner);
        let txn = TxnRequest { compare: vec![absent(rec.key.clone())], success: vec![put_op(rec)], failure: vec![] };
        match target.txn(txn).await {
            Ok(_) => Ok(Some(id)),
            Err(e) if e.etcd() == Some(EtcdError::LeaseNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Two etcds: grants the copy (the same id if free) and records the mapping and
    /// the owner, both attached to the new lease.
    async fn grant_copy(&self, target: &Etcd, src: i64, ttl: i64, owner: &TenantName) -> Result<i64> {
        let granted = match target.lease_grant(src, ttl).await {
            Err(e) if e.etcd() == Some(EtcdError::LeaseExists) => target.lease_grant(0, ttl).await?,
            other => other?,
        };
        if !granted.error.is_empty() {
            return Err(MigrateError::Internal(format!("target refused a lease grant: {}", granted.error)));
        }
        let dst = granted.id;
        let mapping = PutRequest {
            key: map_key(&self.layout, &self.id, src),
            value: Bytes::from(dst.to_string()),
            lease: dst,
            ..Default::default()
        };
        let txn = TxnRequest {
            compare: vec![],
            success: vec![put_op(mapping), put_op(owner_record(&self.layout, dst, owner))],
            failure: vec![],
        };
        target.txn(txn).await?;
        Ok(dst)
    }

    /// Forgets what is known of `src` (its copy vanished under a write): the next
    /// use asks the source again.
    pub fn forget(&mut self, src: i64) {
        self.map.remove(&src);
    }

    /// The expected target lease of a source lease already copied (verify).
    pub fn known(&self, src: i64) -> Option<i64> {
        if src == 0 {
            return Some(0);
        }
        if self.same_etcd {
            return Some(src);
        }
        self.map.get(&src).map(|t| t.unwrap_or(0))
    }

    /// Two etcds: keeps alive the copies whose source lease lives longer than they
    /// do. A copy that expired while its source lease lives lost keys: an error.
    pub async fn sync(&mut self, source: &Etcd, target: &Etcd) -> Result<()> {
        if self.same_etcd {
            return Ok(());
        }
        let live: Vec<(i64, i64)> = self.map.iter().filter_map(|(s, d)| d.map(|d| (*s, d))).collect();
        for (src, dst) in live {
            let s = source.lease_ttl(src).await?.ttl;
            if s <= 0 {
                // The source's expiry deletes its keys; the tail applies that.
                self.map.insert(src, None);
                continue;
            }
            let t = target.lease_ttl(dst).await?.ttl;
            if t <= 0 {
                return Err(MigrateError::Refused(format!(
                    "the target's copy {dst:x} of source lease {src:x} expired while the source's lease lives \
                     (kept alive there): its keys are gone from the target. Re-run with --restart, with \
                     migrate.lease_sync_interval_ms well below the lease's TTL"
                )));
            }
            if s > t {
                target.lease_keepalive(dst).await?;
            }
        }
        Ok(())
    }
}

fn map_key(layout: &KeyLayout, id: &str, src: i64) -> Bytes {
    layout.migrate_key(id, &format!("lease/{src:016x}"))
}

fn map_range(layout: &KeyLayout, id: &str) -> Piece {
    let key = layout.migrate_key(id, "lease/");
    let range_end = prefix_end(&key);
    Piece { key, range_end }
}

fn absent(key: Bytes) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key,
        range_end: Bytes::new(),
        target_union: Some(compare::TargetUnion::CreateRevision(0)),
    }
}

fn put_op(p: PutRequest) -> RequestOp {
    RequestOp { request: Some(request_op::Request::RequestPut(p)) }
}
