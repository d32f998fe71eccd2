//! The Lease service: Grant, Revoke, KeepAlive, TimeToLive, Leases.
//!
//! Leases are shared upstream resources. Each lease granted through etcdmux gets an
//! owner record `<meta>/leases/<id>` holding the granting principal, written *with
//! the lease attached*, so the record survives restarts, is seen by every replica and
//! disappears with the lease. A principal may revoke, keep alive, inspect, list and
//! attach keys to its own leases only; anyone else's lease answers exactly like a
//! lease that does not exist (`etcdserver: requested lease not found`), so lease ids
//! reveal nothing across tenants. The admin may use every lease.

use crate::metrics::names;
use std::time::Duration;

use super::Proxy;
use crate::config::LeaseConfig;
use crate::error::{Error, Result};
use crate::keyspace::{KeyLayout, Scope, TenantName};
use crate::pb::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest,
    LeaseRevokeResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, PutRequest, RangeRequest,
};
use crate::upstream::CallCtx;

/// Remembers lease owners for a short while: KeepAlive and puts with a lease check
/// ownership on every call.
pub struct LeaseOwners {
    cache: moka::future::Cache<i64, TenantName>,
}

impl LeaseOwners {
    pub fn new(cfg: &LeaseConfig) -> LeaseOwners {
        LeaseOwners {
            cache: moka::future::Cache::builder()
                .max_capacity(cfg.owner_cache_capacity)
                .time_to_live(Duration::from_millis(cfg.owner_cache_ttl_ms))
                .build(),
        }
    }
}

/// The put of lease `id`'s owner record, attached to the lease: what a grant through
/// etcdmux writes (and what `etcdmux migrate` writes for the leases it copies).
pub fn owner_record(layout: &KeyLayout, id: i64, owner: &TenantName) -> PutRequest {
    PutRequest {
        key: layout.lease_owner_key(id),
        value: owner.as_str().as_bytes().to_vec().into(),
        lease: id,
        ..Default::default()
    }
}

impl Proxy {
    /// The principal that granted lease `id`, if it was granted through etcdmux and
    /// is still alive.
    async fn lease_owner(&self, ctx: &CallCtx, id: i64) -> Result<Option<TenantName>> {
        if let Some(owner) = self.leases.cache.get(&id).await {
            return Ok(Some(owner));
        }
        let req = RangeRequest { key: self.layout.lease_owner_key(id), ..Default::default() };
        let resp = self.backend.range(ctx, &req).await?;
        let Some(kv) = resp.kvs.first() else { return Ok(None) };
        let owner = std::str::from_utf8(&kv.value).ok().and_then(|s| TenantName::new(s).ok());
        if let Some(o) = &owner {
            self.leases.cache.insert(id, o.clone()).await;
        }
        Ok(owner)
    }

    /// Refuses a lease the scope's principal does not own, as etcd refuses an
    /// unknown lease.
    pub async fn check_lease(&self, scope: &Scope, ctx: &CallCtx, id: i64) -> Result<()> {
        if self.resolver.is_admin(scope) {
            return Ok(());
        }
        match self.lease_owner(ctx, id).await? {
            Some(owner) if owner == scope.principal => Ok(()),
            _ => Err(Error::LeaseNotFound),
        }
    }

    pub async fn lease_grant(
        &self,
        scope: &Scope,
        ctx: &CallCtx,
        req: LeaseGrantRequest,
    ) -> Result<LeaseGrantResponse> {
        crate::trace::record_tenant(scope.principal.as_str());
        let resp = self.backend.lease_grant(ctx, &req).await?;
        if !resp.error.is_empty() {
            return Ok(resp);
        }
        let record = owner_record(&self.layout, resp.id, &scope.principal);
        let written = self.backend.put(ctx, &record).await;
        if let Err(e) = written {
            // A lease nobody owns would only be usable by the admin: take it back.
            let revoke = LeaseRevokeRequest { id: resp.id };
            let _ = self.backend.lease_revoke(ctx, &revoke).await;
            return Err(e.into());
        }
        self.leases.cache.insert(resp.id, scope.principal.clone()).await;
        metrics::counter!(names::LEASES_GRANTED).increment(1);
        Ok(resp)
    }

    pub async fn lease_revoke(
        &self,
        scope: &Scope,
        ctx: &CallCtx,
        req: LeaseRevokeRequest,
    ) -> Result<LeaseRevokeResponse> {
        self.check_lease(scope, ctx, req.id).await?;
        let resp = self.backend.lease_revoke(ctx, &req).await?;
        self.leases.cache.invalidate(&req.id).await;
        Ok(resp)
    }

    pub async fn lease_time_to_live(
        &self,
        scope: &Scope,
        ctx: &CallCtx,
        req: LeaseTimeToLiveRequest,
    ) -> Result<LeaseTimeToLiveResponse> {
        self.check_lease(scope, ctx, req.id).await?;
        let mut resp = self.backend.lease_time_to_live(ctx, &req).await?;
        let owner_key = self.layout.lease_owner_key(req.id);
        let admin = self.resolver.is_admin(scope);
        resp.keys = std::mem::take(&mut resp.keys)
            .into_iter()
            .filter(|k| *k != owner_key)
            .filter_map(|k| match self.layout.decode(&k) {
                Some((t, key)) => {
                    self.resolver.authorize(scope, &t).ok()?;
                    // Keys without a client form here (a static tenant's keys without
                    // a leading `/`, on a key-path listener) are not shown.
                    self.resolver.client_prefix(scope, &t).ok()?.render_checked(&key)
                }
                // Global or passthrough keys: their form is the upstream form.
                None if admin => Some(k),
                None => None,
            })
            .collect();
        Ok(resp)
    }

    pub async fn lease_leases(
        &self,
        scope: &Scope,
        ctx: &CallCtx,
        req: LeaseLeasesRequest,
    ) -> Result<LeaseLeasesResponse> {
        let mut resp = self.backend.lease_leases(ctx, &req).await?;
        if self.resolver.is_admin(scope) {
            return Ok(resp);
        }
        let range = self.layout.lease_owner_range();
        let owners = RangeRequest { key: range.key, range_end: range.range_end, ..Default::default() };
        let owners = self.backend.range(ctx, &owners).await?;
        let mine: std::collections::HashSet<i64> = owners
            .kvs
            .iter()
            .filter(|kv| kv.value.as_ref() == scope.principal.as_str().as_bytes())
            .filter_map(|kv| self.layout.lease_id_from_owner_key(&kv.key))
            .collect();
        resp.leases.retain(|l| mine.contains(&l.id));
        Ok(resp)
    }
}
