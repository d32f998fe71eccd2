//! What etcdmux does with a request, independent of gRPC: the [`Proxy`] (config,
//! tenant resolver, key layout, storage backend, root index, lease owners; one per
//! process, behind an `Arc`) and its operations, one concern per file:
//!
//! - [`range`]: Range, single-root and cross-root;
//! - [`merge`]: answers of several upstream pieces merged into etcd's one answer;
//! - [`write`]: Put, DeleteRange, Compact;
//! - [`txn`]: Txn — etcd's checks, translation into one upstream txn, the answer;
//! - [`index`]: the per-tenant root index that cross-root operations read;
//! - [`lease`]: lease ownership and the Lease operations;
//! - [`validate`]: etcd's checks of every KV request, before anything goes upstream.
//!
//! Per-listener identity travels with each call as a [`Scope`].

pub mod index;
pub mod lease;
pub mod merge;
pub mod range;
pub mod txn;
pub mod validate;
pub mod write;

use std::sync::Arc;

use bytes::Bytes;
use tonic::Request;

use crate::backend::Backend;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::keyspace::{prefix_end, ClientPrefix, KeyLayout, Piece, Resolver, Scope, TenantName};
use crate::pb::etcdserverpb::{request_op, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp};
use crate::pb::mvccpb::KeyValue;
use crate::replica::Replica;
use crate::shutdown::Tasks;
use crate::upstream::CallCtx;
use index::RootIndex;
use lease::LeaseOwners;

pub struct Proxy {
    pub cfg: Config,
    pub resolver: Resolver,
    pub layout: KeyLayout,
    /// The storage: etcd, or a SQL database (`[backend]`).
    pub backend: Arc<dyn Backend>,
    pub index: RootIndex,
    pub leases: LeaseOwners,
    /// The shared read replica (`[cache] enabled`), fed by the watch hub.
    pub replica: Option<Arc<Replica>>,
    /// The shutdown signal; every task spawned on behalf of a request or the hub
    /// is spawned through it.
    pub tasks: Tasks,
}

impl Proxy {
    pub fn new(cfg: Config) -> std::result::Result<Arc<Proxy>, Box<dyn std::error::Error + Send + Sync>> {
        cfg.validate()?;
        crate::metrics::per_tenant::configure(cfg.server.tenant_metrics_top);
        let resolver = Resolver::new(&cfg.tenancy, &[&cfg.layout.prefix, &cfg.layout.meta_prefix])?;
        let layout = KeyLayout::new(&cfg.layout.prefix, &cfg.layout.meta_prefix);
        let tasks = Tasks::new();
        let backend = crate::backend::open(&cfg, &tasks)?;
        let index = RootIndex::new(cfg.layout.root_cache_capacity, cfg.layout.write_tenant_index);
        let leases = LeaseOwners::new(&cfg.leases);
        let replica = cfg.cache.enabled.then(|| {
            let excluded = cfg
                .cache
                .exclude_resources
                .iter()
                .map(|r| {
                    let key = Bytes::from(format!("{}/{r}/", cfg.layout.prefix));
                    Piece { range_end: prefix_end(&key), key }
                })
                .collect();
            Arc::new(Replica::new(&cfg.cache, layout.clone(), excluded))
        });
        Ok(Arc::new(Proxy { cfg, resolver, layout, backend, index, leases, replica, tasks }))
    }

    /// The upstream call context (deadline, `hasleader`) of an incoming unary
    /// request; reports the request's size to the per-tenant metrics of the call.
    pub fn ctx<T: prost::Message>(&self, req: &Request<T>) -> CallCtx {
        crate::metrics::per_tenant::report_bytes_in(|| req.get_ref().encoded_len());
        CallCtx::from_request(req, self.cfg.default_timeout())
    }

    /// Rewrites an upstream key-value of tenant `t` into client form. A key of any
    /// other tenant here, or one without a client form on this listener (a key
    /// without a leading `/` behind a key-path prefix, which would read as another
    /// tenant's), would be a planning bug: it is refused, never shown.
    pub fn render_kv(&self, t: &TenantName, cp: &ClientPrefix, kv: &mut KeyValue) -> Result<()> {
        kv.key = self.render_key(t, cp, &kv.key)?;
        Ok(())
    }

    pub fn render_key(&self, t: &TenantName, cp: &ClientPrefix, up: &Bytes) -> Result<Bytes> {
        match self.layout.decode(up) {
            Some((owner, key)) if &owner == t => cp.render_checked(&key).ok_or_else(|| {
                tracing::error!(tenant = %t, key = ?up, "a key without a client form on this listener was read");
                Error::Internal("upstream key without a client form on this listener".to_string())
            }),
            _ => {
                tracing::error!(tenant = %t, key = ?up, "upstream returned a key outside the tenant's space");
                Err(Error::Internal("upstream key outside the tenant's space".to_string()))
            }
        }
    }

    /// The tenant of a request, authorized for the scope, with its client prefix.
    pub fn tenant_view(&self, scope: &Scope, t: &TenantName) -> Result<ClientPrefix> {
        self.resolver.authorize(scope, t)?;
        crate::trace::record_tenant(t.as_str());
        crate::metrics::per_tenant::report_tenant(t.as_str());
        Ok(self.resolver.client_prefix(scope, t)?)
    }
}

pub(crate) fn range_op(r: RangeRequest) -> RequestOp {
    RequestOp { request: Some(request_op::Request::RequestRange(r)) }
}

pub(crate) fn delete_op(r: DeleteRangeRequest) -> RequestOp {
    RequestOp { request: Some(request_op::Request::RequestDeleteRange(r)) }
}

pub(crate) fn put_op(r: PutRequest) -> RequestOp {
    RequestOp { request: Some(request_op::Request::RequestPut(r)) }
}
