//! The Cluster service. `MemberList` answers with etcdmux's own advertised
//! endpoints, so clients that sync their member list keep talking to etcdmux
//! instead of bypassing it; membership changes are the admin's.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::keyspace::Scope;
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{
    cluster_server::Cluster, Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest,
    MemberUpdateResponse,
};
use crate::upstream::Retry;

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
