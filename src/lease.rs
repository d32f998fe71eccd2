//! The Lease service: Grant, Revoke, KeepAlive, TimeToLive, Leases.
//!
//! Leases are shared upstream resources. Each lease granted through etcdmux gets an
//! owner record `<meta>/leases/<id>` holding the granting principal, written *with
//! the lease attached*, so the record survives restarts, is seen by every replica and
//! disappears with the lease. A principal may revoke, keep alive, inspect, list and
//! attach keys to its own leases only; anyone else's lease answers exactly like a
//! lease that does not exist (`etcdserver: requested lease not found`), so lease ids
//! reveal nothing across tenants. The admin may use every lease.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::config::LeaseConfig;
use crate::error::{Error, Result};
use crate::kv::{answer, request_span};
use crate::pb::etcdserverpb::{
    lease_server::Lease, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse, PutRequest, RangeRequest, ResponseHeader,
};
use crate::proxy::Proxy;
use crate::tenant::{Scope, TenantName};
use crate::upstream::{CallCtx, Retry};

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

impl Proxy {
    /// The principal that granted lease `id`, if it was granted through etcdmux and
    /// is still alive.
    async fn lease_owner(&self, ctx: &CallCtx, id: i64) -> Result<Option<TenantName>> {
        if let Some(owner) = self.leases.cache.get(&id).await {
            return Ok(Some(owner));
        }
        let req = RangeRequest { key: self.layout.lease_owner_key(id), ..Default::default() };
        let resp = self.upstream.kv_call(ctx, Retry::Safe, &req, |mut c, r| async move { c.range(r).await }).await?;
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
        tracing::Span::current().record("tenant", scope.principal.as_str());
        let resp = self
            .upstream
            .lease_call(ctx, Retry::OnlyUnsent, &req, |mut c, r| async move { c.lease_grant(r).await })
            .await?;
        if !resp.error.is_empty() {
            return Ok(resp);
        }
        let record = PutRequest {
            key: self.layout.lease_owner_key(resp.id),
            value: scope.principal.as_str().as_bytes().to_vec().into(),
            lease: resp.id,
            ..Default::default()
        };
        let written =
            self.upstream.kv_call(ctx, Retry::OnlyUnsent, &record, |mut c, r| async move { c.put(r).await }).await;
        if let Err(e) = written {
            // A lease nobody owns would only be usable by the admin: take it back.
            let revoke = LeaseRevokeRequest { id: resp.id };
            let _ = self
                .upstream
                .lease_call(ctx, Retry::Safe, &revoke, |mut c, r| async move { c.lease_revoke(r).await })
                .await;
            return Err(e.into());
        }
        self.leases.cache.insert(resp.id, scope.principal.clone()).await;
        metrics::counter!("etcdmux_leases_granted_total").increment(1);
        Ok(resp)
    }

    pub async fn lease_revoke(
        &self,
        scope: &Scope,
        ctx: &CallCtx,
        req: LeaseRevokeRequest,
    ) -> Result<LeaseRevokeResponse> {
        self.check_lease(scope, ctx, req.id).await?;
        let resp =
            self.upstream.lease_call(ctx, Retry::Safe, &req, |mut c, r| async move { c.lease_revoke(r).await }).await?;
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
        let mut resp = self
            .upstream
            .lease_call(ctx, Retry::Safe, &req, |mut c, r| async move { c.lease_time_to_live(r).await })
            .await?;
        let owner_key = self.layout.lease_owner_key(req.id);
        let admin = self.resolver.is_admin(scope);
        resp.keys = std::mem::take(&mut resp.keys)
            .into_iter()
            .filter(|k| *k != owner_key)
            .filter_map(|k| match self.layout.decode(&k) {
                Some((t, key)) => {
                    self.resolver.authorize(scope, &t).ok()?;
                    Some(self.resolver.client_prefix(scope, &t).ok()?.render(&key))
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
        let mut resp =
            self.upstream.lease_call(ctx, Retry::Safe, &req, |mut c, r| async move { c.lease_leases(r).await }).await?;
        if self.resolver.is_admin(scope) {
            return Ok(resp);
        }
        let range = self.layout.lease_owner_range();
        let owners = RangeRequest { key: range.key, range_end: range.range_end, ..Default::default() };
        let owners =
            self.upstream.kv_call(ctx, Retry::Safe, &owners, |mut c, r| async move { c.range(r).await }).await?;
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

pub struct LeaseService {
    proxy: Arc<Proxy>,
    scope: Scope,
}

impl LeaseService {
    pub fn new(proxy: Arc<Proxy>, scope: Scope) -> LeaseService {
        LeaseService { proxy, scope }
    }
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

/// Buffer between a client's keepalive stream and etcd's, per direction.
const KEEPALIVE_BUFFER: usize = 64;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(&self, req: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        answer("lease", "grant", self.proxy.lease_grant(&self.scope, &ctx, req.into_inner())).await
    }

    async fn lease_revoke(&self, req: Request<LeaseRevokeRequest>) -> Result<Response<LeaseRevokeResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        answer("lease", "revoke", self.proxy.lease_revoke(&self.scope, &ctx, req.into_inner())).await
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    /// Each client stream gets one upstream stream, opened on its first owned lease.
    /// Keepalives for leases the principal does not own are answered here with
    /// TTL 0, which is etcd's answer for a lease that does not exist.
    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let proxy = self.proxy.clone();
        let scope = self.scope.clone();
        let md = req.metadata().clone();
        let mut inbound = req.into_inner();
        let (out_tx, out_rx) = mpsc::channel(KEEPALIVE_BUFFER);
        tokio::spawn(
            async move {
                let mut up_tx: Option<mpsc::Sender<LeaseKeepAliveRequest>> = None;
                let mut upstream: Option<Streaming<LeaseKeepAliveResponse>> = None;
                let mut last_header: Option<ResponseHeader> = None;
                loop {
                    let up_next = async {
                        match upstream.as_mut() {
                            Some(s) => s.message().await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        msg = inbound.message() => {
                            let Ok(Some(ka)) = msg else { break };
                            let ctx = CallCtx::from_metadata(&md, proxy.cfg.default_timeout());
                            match proxy.check_lease(&scope, &ctx, ka.id).await {
                                Ok(()) => {}
                                Err(Error::LeaseNotFound) => {
                                    let resp = LeaseKeepAliveResponse { header: last_header, id: ka.id, ttl: 0 };
                                    if out_tx.send(Ok(resp)).await.is_err() { break }
                                    continue;
                                }
                                Err(e) => { let _ = out_tx.send(Err(e.into())).await; break }
                            }
                            if let Some(tx) = &up_tx {
                                if tx.send(ka).await.is_err() { break }
                                continue;
                            }
                            // First owned lease: open the upstream stream with it queued,
                            // since etcd sends response headers only with its first answer.
                            let (tx, rx) = mpsc::channel(KEEPALIVE_BUFFER);
                            let _ = tx.send(ka).await;
                            up_tx = Some(tx);
                            let (ep, ch) = proxy.upstream.stream_channel();
                            let mut client = proxy.upstream.lease(ch);
                            match client.lease_keep_alive(ctx.request(ReceiverStream::new(rx))).await {
                                Ok(s) => upstream = Some(s.into_inner()),
                                Err(s) => {
                                    proxy.upstream.report(ep, &s);
                                    let _ = out_tx.send(Err(s)).await;
                                    break
                                }
                            }
                        }
                        resp = up_next => match resp {
                            Ok(Some(r)) => {
                                last_header = r.header;
                                if out_tx.send(Ok(r)).await.is_err() { break }
                            }
                            Ok(None) => { let _ = out_tx.send(Err(Status::unavailable("etcdmux: upstream keepalive stream ended"))).await; break }
                            Err(s) => { let _ = out_tx.send(Err(s)).await; break }
                        }
                    }
                }
            }
            .instrument(request_span("lease", "keep_alive")),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        answer("lease", "time_to_live", self.proxy.lease_time_to_live(&self.scope, &ctx, req.into_inner())).await
    }

    async fn lease_leases(&self, req: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        answer("lease", "leases", self.proxy.lease_leases(&self.scope, &ctx, req.into_inner())).await
    }
}
