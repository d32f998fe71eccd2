//! The Maintenance and Cluster services.
//!
//! `Status` is open to everyone (the apiserver reads db size and version from it)
//! and reports the configured etcd version, since the apiserver gates features such
//! as consistent reads from cache on it. Operations on the shared cluster (defrag,
//! hash, snapshot, leader moves, alarms, membership changes) are the admin's.
//! `MemberList` answers with etcdmux's own advertised endpoints, so clients that
//! sync their member list keep talking to etcdmux instead of bypassing it.

use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::error::Result;
use crate::pb::etcdserverpb::{
    alarm_request::AlarmAction, cluster_server::Cluster, maintenance_server::Maintenance, AlarmRequest, AlarmResponse,
    DefragmentRequest, DefragmentResponse, DowngradeRequest, DowngradeResponse, HashKvRequest, HashKvResponse,
    HashRequest, HashResponse, Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest,
    MemberUpdateResponse, MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest,
    StatusResponse,
};
use crate::proxy::Proxy;
use crate::tenant::Scope;
use crate::upstream::Retry;

pub struct MaintenanceService {
    proxy: Arc<Proxy>,
    scope: Scope,
}

impl MaintenanceService {
    pub fn new(proxy: Arc<Proxy>, scope: Scope) -> MaintenanceService {
        MaintenanceService { proxy, scope }
    }
}

/// The body of an admin-only call, forwarded unchanged: `$call` is the upstream
/// helper (`maintenance_call`, `cluster_call`) and `$method` the client method.
macro_rules! admin_forward {
    ($self:ident, $req:ident, $service:literal, $call:ident, $method:ident, $what:literal, $retry:expr) => {{
        let ctx = $self.proxy.ctx(&$req);
        let fut = async {
            $self.proxy.resolver.require_admin(&$self.scope, $what)?;
            let msg = $req.into_inner();
            let resp =
                $self.proxy.upstream.$call(&ctx, $retry, &msg, |mut c, r| async move { c.$method(r).await }).await?;
            Ok::<_, crate::error::Error>(resp)
        };
        crate::kv::answer($service, stringify!($method), fut).await
    }};
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        let msg = req.into_inner();
        if AlarmAction::try_from(msg.action) != Ok(AlarmAction::Get) {
            self.proxy.resolver.require_admin(&self.scope, "changing alarms")?;
        }
        let resp = self
            .proxy
            .upstream
            .maintenance_call(&ctx, Retry::Safe, &msg, |mut c, r| async move { c.alarm(r).await })
            .await?;
        Ok(Response::new(resp))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        let msg = req.into_inner();
        let mut resp = self
            .proxy
            .upstream
            .maintenance_call(&ctx, Retry::Safe, &msg, |mut c, r| async move { c.status(r).await })
            .await?;
        resp.version = self.proxy.cfg.server.advertised_version.clone();
        Ok(Response::new(resp))
    }

    async fn defragment(&self, req: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        admin_forward!(self, req, "maintenance", maintenance_call, defragment, "Defragment", Retry::OnlyUnsent)
    }
    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        admin_forward!(self, req, "maintenance", maintenance_call, hash, "Hash", Retry::Safe)
    }
    async fn hash_kv(&self, req: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        admin_forward!(self, req, "maintenance", maintenance_call, hash_kv, "HashKV", Retry::Safe)
    }
    async fn move_leader(&self, req: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        admin_forward!(self, req, "maintenance", maintenance_call, move_leader, "MoveLeader", Retry::OnlyUnsent)
    }
    async fn downgrade(&self, req: Request<DowngradeRequest>) -> Result<Response<DowngradeResponse>, Status> {
        admin_forward!(self, req, "maintenance", maintenance_call, downgrade, "Downgrade", Retry::OnlyUnsent)
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(&self, req: Request<SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        self.proxy.resolver.require_admin(&self.scope, "Snapshot")?;
        let ctx = self.proxy.ctx(&req);
        let (ep, ch) = self.proxy.upstream.stream_channel();
        let mut client = self.proxy.upstream.maintenance(ch);
        let stream = client
            .snapshot(ctx.request(req.into_inner()))
            .await
            .inspect_err(|s| self.proxy.upstream.report(ep, s))?
            .into_inner();
        Ok(Response::new(Box::pin(stream.map(|r| r))))
    }
}

pub struct ClusterService {
    proxy: Arc<Proxy>,
    scope: Scope,
}

impl ClusterService {
    pub fn new(proxy: Arc<Proxy>, scope: Scope) -> ClusterService {
        ClusterService { proxy, scope }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(&self, req: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        admin_forward!(self, req, "cluster", cluster_call, member_add, "MemberAdd", Retry::OnlyUnsent)
    }
    async fn member_remove(&self, req: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        admin_forward!(self, req, "cluster", cluster_call, member_remove, "MemberRemove", Retry::OnlyUnsent)
    }
    async fn member_update(&self, req: Request<MemberUpdateRequest>) -> Result<Response<MemberUpdateResponse>, Status> {
        admin_forward!(self, req, "cluster", cluster_call, member_update, "MemberUpdate", Retry::OnlyUnsent)
    }
    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        admin_forward!(self, req, "cluster", cluster_call, member_promote, "MemberPromote", Retry::OnlyUnsent)
    }

    /// etcdmux itself, as the one member clients should talk to. The header is
    /// etcd's, so the call also fails when etcd is unreachable.
    async fn member_list(&self, req: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        let msg = req.into_inner();
        let up = self
            .proxy
            .upstream
            .cluster_call(&ctx, Retry::Safe, &msg, |mut c, r| async move { c.member_list(r).await })
            .await?;
        let urls = self.proxy.cfg.advertise_urls();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        urls.hash(&mut h);
        let member = Member {
            id: h.finish(),
            name: "etcdmux".to_string(),
            peer_ur_ls: Vec::new(),
            client_ur_ls: urls,
            is_learner: false,
        };
        Ok(Response::new(MemberListResponse { header: up.header, members: vec![member] }))
    }
}
