//! The state every service shares: config, tenant resolver, key layout, upstream
//! pool, root index and lease owners. One `Proxy` per process, behind an `Arc`;
//! per-listener identity lives in each service's [`Scope`].

use std::sync::Arc;

use bytes::Bytes;
use tonic::Request;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::index::RootIndex;
use crate::keylayout::KeyLayout;
use crate::lease::LeaseOwners;
use crate::pb::mvccpb::KeyValue;
use crate::tenant::{ClientPrefix, Resolver, Scope, TenantName};
use crate::upstream::{CallCtx, Upstream};

pub struct Proxy {
    pub cfg: Config,
    pub resolver: Resolver,
    pub layout: KeyLayout,
    pub upstream: Upstream,
    pub index: RootIndex,
    pub leases: LeaseOwners,
}

impl Proxy {
    pub fn new(cfg: Config) -> std::result::Result<Arc<Proxy>, Box<dyn std::error::Error + Send + Sync>> {
        cfg.validate()?;
        let resolver = Resolver::new(&cfg)?;
        let layout = KeyLayout::new(&cfg.layout.prefix, &cfg.layout.meta_prefix);
        let upstream = Upstream::new(&cfg)?;
        let index = RootIndex::new(cfg.layout.root_cache_capacity);
        let leases = LeaseOwners::new(&cfg.leases);
        Ok(Arc::new(Proxy { cfg, resolver, layout, upstream, index, leases }))
    }

    /// The upstream call context (deadline, `hasleader`) of an incoming request.
    pub fn ctx<T>(&self, req: &Request<T>) -> CallCtx {
        CallCtx::from_request(req, self.cfg.default_timeout())
    }

    /// Rewrites an upstream key-value of tenant `t` into client form. A key of any
    /// other tenant here would be a layout bug: it is refused, never shown.
    pub fn render_kv(&self, t: &TenantName, cp: &ClientPrefix, kv: &mut KeyValue) -> Result<()> {
        kv.key = self.render_key(t, cp, &kv.key)?;
        Ok(())
    }

    pub fn render_key(&self, t: &TenantName, cp: &ClientPrefix, up: &Bytes) -> Result<Bytes> {
        match self.layout.decode(up) {
            Some((owner, key)) if &owner == t => Ok(cp.render(&key)),
            _ => {
                tracing::error!(tenant = %t, key = ?up, "upstream returned a key outside the tenant's space");
                Err(Error::Internal("upstream key outside the tenant's space".to_string()))
            }
        }
    }

    /// The tenant of a request, authorized for the scope, with its client prefix.
    pub fn tenant_view(&self, scope: &Scope, t: &TenantName) -> Result<ClientPrefix> {
        self.resolver.authorize(scope, t)?;
        tracing::Span::current().record("tenant", t.as_str());
        self.resolver.client_prefix(scope, t)
    }
}
