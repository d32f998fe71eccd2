//! The Cluster service. `MemberList` answers with etcdmux's own advertised
//! endpoints, so clients that sync their member list keep talking to etcdmux
//! instead of bypassing it; membership changes are the admin's.
//!
//! etcdmux's member id ([`member_id`]) is a stable hash of the advertised URLs, so
//! every etcdmux with the same config is the same member, and `Status` reports it
//! as the leader: clients that look the leader up in the member list find it.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::tls::ScopeSource;
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{
    cluster_server::Cluster, Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest,
    MemberUpdateResponse, ResponseHeader,
};
use crate::upstream::Retry;

pub struct ClusterService {
    proxy: Arc<Proxy>,
    scope: ScopeSource,
}

impl ClusterService {
    pub fn new(proxy: Arc<Proxy>, scope: impl Into<ScopeSource>) -> ClusterService {
        ClusterService { proxy, scope: scope.into() }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(&self, req: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        admin_forward!(self, req, cluster_call, member_add, "MemberAdd", Retry::OnlyUnsent)
    }
    async fn member_remove(&self, req: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        admin_forward!(self, req, cluster_call, member_remove, "MemberRemove", Retry::OnlyUnsent)
    }
    async fn member_update(&self, req: Request<MemberUpdateRequest>) -> Result<Response<MemberUpdateResponse>, Status> {
        admin_forward!(self, req, cluster_call, member_update, "MemberUpdate", Retry::OnlyUnsent)
    }
    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        admin_forward!(self, req, cluster_call, member_promote, "MemberPromote", Retry::OnlyUnsent)
    }

    /// etcdmux itself, as the one member clients should talk to. The header is
    /// etcd's, so the call also fails when etcd is unreachable.
    async fn member_list(&self, req: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        let ctx = self.proxy.ctx(&req);
        // Anyone may ask, but an unmapped client certificate is refused everything.
        self.scope.of(&self.proxy.resolver, &req)?;
        let msg = req.into_inner();
        let up = self.proxy.backend.member_list(&ctx, &msg).await?;
        let urls = self.proxy.cfg.advertise_urls();
        let id = member_id(&urls);
        let member =
            Member { id, name: "etcdmux".to_string(), peer_ur_ls: Vec::new(), client_ur_ls: urls, is_learner: false };
        let header = up.header.map(|h| ResponseHeader { member_id: id, ..h });
        Ok(Response::new(MemberListResponse { header, members: vec![member] }))
    }
}

/// etcdmux's member id: 64-bit FNV-1a over the advertised client URLs, each
/// followed by a NUL byte. Written out here so that it stays the same across
/// processes, builds and Rust releases (std's hashers promise none of that); never
/// 0, which etcd reads as "no member".
pub fn member_id(urls: &[String]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET_BASIS;
    for url in urls {
        for &b in url.as_bytes().iter().chain(&[0u8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
    }
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::member_id;

    #[test]
    fn member_id_is_a_fixed_fnv1a_of_the_urls() {
        // Empty input: FNV-1a's offset basis. The others computed independently
        // (Python, the same definition); they must never change.
        assert_eq!(member_id(&[]), 0xcbf2_9ce4_8422_2325);
        let one = vec!["http://127.0.0.1:2379".to_string()];
        assert_eq!(member_id(&one), 0x15d7_cbb4_082d_5e3b);
        let two = vec!["http://10.0.0.1:2379".to_string(), "http://10.0.0.2:2379".to_string()];
        assert_eq!(member_id(&two), 0x268d_00d7_7075_ef22);
        // The NUL separator keeps URL boundaries apart.
        let joined = vec!["http://10.0.0.1:2379http://10.0.0.2:2379".to_string()];
        assert_ne!(member_id(&joined), member_id(&two));
    }
}
