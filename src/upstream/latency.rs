//! How long etcd takes to answer etcdmux's unary calls, by method
//! (`etcdmux_upstream_request_duration_seconds`). Beside the gRPC layer's
//! `etcdmux_grpc_request_duration_seconds` it tells an operator whether a slow
//! answer was etcd's time or etcdmux's own.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::Histogram;

use crate::metrics::names;
use crate::pb::etcdserverpb::{
    AlarmRequest, CompactionRequest, DefragmentRequest, DeleteRangeRequest, DowngradeRequest, HashKvRequest,
    HashRequest, LeaseGrantRequest, LeaseLeasesRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest, MemberAddRequest,
    MemberListRequest, MemberPromoteRequest, MemberRemoveRequest, MemberUpdateRequest, MoveLeaderRequest, PutRequest,
    RangeRequest, StatusRequest, TxnRequest,
};

/// The etcd method a request type is sent to: its label and its place in [`METHODS`].
pub trait Method {
    const INDEX: usize;
}

/// Lists the methods, and implements [`Method`] for each request type in order.
macro_rules! methods {
    ($($req:ident => $path:literal,)*) => {
        /// Every method etcdmux sends unary calls to, as the `method` label.
        pub const METHODS: &[&str] = &[$($path,)*];
        methods!(@impl 0usize; $($req,)*);
    };
    (@impl $i:expr; $req:ident, $($rest:ident,)*) => {
        impl Method for $req {
            const INDEX: usize = $i;
        }
        methods!(@impl $i + 1usize; $($rest,)*);
    };
    (@impl $i:expr;) => {};
}

methods! {
    RangeRequest => "/etcdserverpb.KV/Range",
    PutRequest => "/etcdserverpb.KV/Put",
    DeleteRangeRequest => "/etcdserverpb.KV/DeleteRange",
    TxnRequest => "/etcdserverpb.KV/Txn",
    CompactionRequest => "/etcdserverpb.KV/Compact",
    LeaseGrantRequest => "/etcdserverpb.Lease/LeaseGrant",
    LeaseRevokeRequest => "/etcdserverpb.Lease/LeaseRevoke",
    LeaseTimeToLiveRequest => "/etcdserverpb.Lease/LeaseTimeToLive",
    LeaseLeasesRequest => "/etcdserverpb.Lease/LeaseLeases",
    StatusRequest => "/etcdserverpb.Maintenance/Status",
    AlarmRequest => "/etcdserverpb.Maintenance/Alarm",
    DefragmentRequest => "/etcdserverpb.Maintenance/Defragment",
    HashRequest => "/etcdserverpb.Maintenance/Hash",
    HashKvRequest => "/etcdserverpb.Maintenance/HashKV",
    MoveLeaderRequest => "/etcdserverpb.Maintenance/MoveLeader",
    DowngradeRequest => "/etcdserverpb.Maintenance/Downgrade",
    MemberListRequest => "/etcdserverpb.Cluster/MemberList",
    MemberAddRequest => "/etcdserverpb.Cluster/MemberAdd",
    MemberRemoveRequest => "/etcdserverpb.Cluster/MemberRemove",
    MemberUpdateRequest => "/etcdserverpb.Cluster/MemberUpdate",
    MemberPromoteRequest => "/etcdserverpb.Cluster/MemberPromote",
}

/// The histogram handles, looked up in the recorder on a method's first call (a
/// lookup per call hashes the series' key), after the recorder is installed.
pub struct Latency {
    series: [OnceLock<Histogram>; METHODS.len()],
}

impl Default for Latency {
    fn default() -> Latency {
        Latency { series: std::array::from_fn(|_| OnceLock::new()) }
    }
}

impl Latency {
    /// Records one call of `R`'s method, all of its attempts.
    pub fn record<R: Method>(&self, took: Duration) {
        let method = METHODS[R::INDEX];
        let h = self.series[R::INDEX]
            .get_or_init(|| metrics::histogram!(names::UPSTREAM_REQUEST_DURATION, "method" => method));
        h.record(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_type_is_labelled_with_its_own_method() {
        let unique: std::collections::HashSet<_> = METHODS.iter().collect();
        assert_eq!(unique.len(), METHODS.len(), "a method listed twice");
        assert_eq!(METHODS[RangeRequest::INDEX], "/etcdserverpb.KV/Range");
        assert_eq!(METHODS[TxnRequest::INDEX], "/etcdserverpb.KV/Txn");
        assert_eq!(METHODS[LeaseGrantRequest::INDEX], "/etcdserverpb.Lease/LeaseGrant");
        assert_eq!(METHODS[MemberPromoteRequest::INDEX], "/etcdserverpb.Cluster/MemberPromote");
    }
}
