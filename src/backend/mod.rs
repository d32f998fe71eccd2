//! The storage behind the etcd v3 services: one [`Backend`] per process, chosen by
//! `[backend] kind`.
//!
//! - [`etcd`]: an etcd cluster through the [`Upstream`] pool (retries, failover,
//!   deadlines, trace context and TLS rotation as before);
//! - [`sql`]: a PostgreSQL-protocol database holding etcd's data model (one gap-free
//!   revision sequence, per-key history, leases, a change feed).
//!
//! The interface speaks etcd's own protobuf messages ([`crate::pb`]): the SQL
//! backend must answer field for field as etcd would, so anything else would only
//! be translated back. Keys here are upstream keys: the tenant layout is applied
//! above ([`crate::ops`]), the same for every backend. Failures are
//! [`UpstreamError`]s classified as [`crate::upstream::classify`] defines (not sent,
//! connection lost, deadline, or one of etcd's errors), so retries and error texts
//! mean the same whatever the backend.

pub mod etcd;
pub mod sql;

use std::pin::Pin;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::Status;

use crate::config::{BackendKind, Config};
use crate::pb::etcdserverpb::{
    AlarmRequest, AlarmResponse, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
    MemberListRequest, MemberListResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, StatusRequest,
    StatusResponse, TxnRequest, TxnResponse, WatchRequest, WatchResponse,
};
use crate::shutdown::Tasks;
use crate::upstream::classify::UpstreamError;
use crate::upstream::{CallCtx, Retry, StreamCtx, Upstream};

/// The answer of one backend call.
pub type Call<'a, T> = BoxFuture<'a, Result<T, UpstreamError>>;

/// The answers of a backend stream (a watch, a keepalive), read like a gRPC
/// stream: `Ok(None)` when it ended, `Err` when it broke.
pub struct Responses<T> {
    inner: Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>,
}

impl<T> Responses<T> {
    pub fn new(s: impl Stream<Item = Result<T, Status>> + Send + 'static) -> Responses<T> {
        Responses { inner: Box::pin(s) }
    }

    /// The next answer.
    pub async fn message(&mut self) -> Result<Option<T>, Status> {
        self.inner.next().await.transpose()
    }
}

impl<T> Stream for Responses<T> {
    type Item = Result<T, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// The opening of a backend stream: its answers, or why it could not be opened.
pub type Open<'a, T> = BoxFuture<'a, Result<Responses<T>, Status>>;

/// What the etcd v3 services need of storage. Keys are upstream keys; every answer
/// is etcd's, header revisions included.
pub trait Backend: Send + Sync + 'static {
    /// A range at `req.revision` (0: the newest).
    fn range<'a>(&'a self, ctx: &'a CallCtx, req: &'a RangeRequest) -> Call<'a, RangeResponse>;
    /// One put, at a revision of its own.
    fn put<'a>(&'a self, ctx: &'a CallCtx, req: &'a PutRequest) -> Call<'a, PutResponse>;
    /// One delete of a key or range, at a revision of its own when it deletes anything.
    fn delete_range<'a>(&'a self, ctx: &'a CallCtx, req: &'a DeleteRangeRequest) -> Call<'a, DeleteRangeResponse>;
    /// A txn (compares, then puts, deletes, ranges and nested txns), atomic at one
    /// revision. `retry` says whether it may be sent twice (a txn of ranges only).
    fn txn<'a>(&'a self, ctx: &'a CallCtx, retry: Retry, req: &'a TxnRequest) -> Call<'a, TxnResponse>;
    /// Drops history before `req.revision`.
    fn compact<'a>(&'a self, ctx: &'a CallCtx, req: &'a CompactionRequest) -> Call<'a, CompactionResponse>;

    fn lease_grant<'a>(&'a self, ctx: &'a CallCtx, req: &'a LeaseGrantRequest) -> Call<'a, LeaseGrantResponse>;
    /// Revokes a lease and deletes its keys, in one revision.
    fn lease_revoke<'a>(&'a self, ctx: &'a CallCtx, req: &'a LeaseRevokeRequest) -> Call<'a, LeaseRevokeResponse>;
    fn lease_time_to_live<'a>(
        &'a self,
        ctx: &'a CallCtx,
        req: &'a LeaseTimeToLiveRequest,
    ) -> Call<'a, LeaseTimeToLiveResponse>;
    fn lease_leases<'a>(&'a self, ctx: &'a CallCtx, req: &'a LeaseLeasesRequest) -> Call<'a, LeaseLeasesResponse>;
    /// A keepalive stream: one answer per request, in order.
    fn lease_keep_alive<'a>(
        &'a self,
        ctx: &'a StreamCtx,
        requests: mpsc::Receiver<LeaseKeepAliveRequest>,
    ) -> Open<'a, LeaseKeepAliveResponse>;

    /// The change feed, as etcd's Watch: creates (from a revision, with `prev_kv`,
    /// progress notify), progress requests and cancels in; events in revision order
    /// (a revision never split), progress answers, and the compacted cancel out.
    fn watch<'a>(&'a self, ctx: &'a StreamCtx, requests: mpsc::Receiver<WatchRequest>) -> Open<'a, WatchResponse>;

    /// The store's status: header (the current revision), size, version.
    fn status<'a>(&'a self, ctx: &'a CallCtx, req: &'a StatusRequest) -> Call<'a, StatusResponse>;
    /// Alarms (NOSPACE, CORRUPT): etcd's own; a SQL database has none to report.
    fn alarm<'a>(&'a self, ctx: &'a CallCtx, req: &'a AlarmRequest) -> Call<'a, AlarmResponse>;
    /// The members, for their header (the Cluster service answers with etcdmux itself).
    fn member_list<'a>(&'a self, ctx: &'a CallCtx, req: &'a MemberListRequest) -> Call<'a, MemberListResponse>;

    /// The etcd cluster itself, for what only etcd has (defragment, hashes,
    /// snapshots, membership and leader changes, TLS towards it); `None` otherwise.
    fn etcd(&self) -> Option<&Upstream> {
        None
    }
}

/// The backend `cfg` asks for. A SQL backend starts its background work (the
/// change feed's notifier, lease expiry, compaction) on `tasks`.
pub fn open(cfg: &Config, tasks: &Tasks) -> Result<Arc<dyn Backend>, crate::certs::BoxError> {
    Ok(match cfg.backend.kind {
        BackendKind::Etcd => Arc::new(etcd::EtcdBackend::new(cfg)?),
        BackendKind::Sql => Arc::new(sql::SqlBackend::new(cfg, tasks)?),
    })
}
