//! The Maintenance service.
//!
//! `Status` is open to everyone (the apiserver reads db size and version from it)
//! and reports the configured etcd version, since the apiserver gates features such
//! as consistent reads from cache on it. Its member id and leader are etcdmux's
//! own member ([`member_id`]), the one `MemberList` shows. Operations on the shared
//! cluster (defrag, hash, snapshot, leader moves, alarms) are the admin's.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::cluster::member_id;
use super::tls::ScopeSource;
use crate::error::Result;
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{
    alarm_request::AlarmAction, maintenance_server::Maintenance, AlarmRequest, AlarmResponse, DefragmentRequest,
    DefragmentResponse, DowngradeRequest, DowngradeResponse, HashKvRequest, HashKvResponse, HashRequest, HashResponse,
    MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
};
use crate::upstream::{Retry, StreamCtx};

pub struct MaintenanceService {
    proxy: Arc<Proxy>,
    scope: ScopeSource,
}

impl MaintenanceService {
    pub fn new(proxy: Arc<Proxy>, scope: impl Into<ScopeSource>) -> MaintenanceService {
        MaintenanceService { proxy, scope: scope.into() }
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        let scope = self.scope.of(&self.proxy.resolver, &req)?;
        let msg = req.into_inner();
        if AlarmAction::try_from(msg.action) != Ok(AlarmAction::Get) {
            self.proxy.resolver.require_admin(&scope, "changing alarms")?;
        }
        let resp = self.proxy.backend.alarm(&ctx, &msg).await?;
        Ok(Response::new(resp))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        // Anyone may ask, but an unmapped client certificate is refused everything.
        self.scope.of(&self.proxy.resolver, &req)?;
        let msg = req.into_inner();
        let mut resp = self.proxy.backend.status(&ctx, &msg).await?;
        resp.version = self.proxy.cfg.server.advertised_version.clone();
        // etcdmux is the one member clients see (MemberList), and so the leader.
        let id = member_id(&self.proxy.cfg.advertise_urls());
        resp.leader = id;
        if let Some(h) = resp.header.as_mut() {
            h.member_id = id;
        }
        Ok(Response::new(resp))
    }

    async fn defragment(&self, req: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        admin_forward!(self, req, maintenance_call, defragment, "Defragment", Retry::OnlyUnsent)
    }
    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        admin_forward!(self, req, maintenance_call, hash, "Hash", Retry::Safe)
    }
    async fn hash_kv(&self, req: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        admin_forward!(self, req, maintenance_call, hash_kv, "HashKV", Retry::Safe)
    }
    async fn move_leader(&self, req: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        admin_forward!(self, req, maintenance_call, move_leader, "MoveLeader", Retry::OnlyUnsent)
    }
    async fn downgrade(&self, req: Request<DowngradeRequest>) -> Result<Response<DowngradeResponse>, Status> {
        admin_forward!(self, req, maintenance_call, downgrade, "Downgrade", Retry::OnlyUnsent)
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(&self, req: Request<SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        let scope = self.scope.of(&self.proxy.resolver, &req)?;
        self.proxy.resolver.require_admin(&scope, "Snapshot")?;
        // A stream: no deadline unless the client sent one (a large snapshot takes long).
        let ctx = StreamCtx::from_request(&req);
        let up = super::etcd_only(&self.proxy, "Snapshot")?;
        let (ep, ch) = up.stream_channel();
        let mut client = up.maintenance(ch);
        let stream =
            client.snapshot(ctx.request(req.into_inner())).await.inspect_err(|s| up.report(ep, s))?.into_inner();
        Ok(Response::new(Box::pin(stream.map(|r| r))))
    }
}
