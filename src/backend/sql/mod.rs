//! The SQL backend: etcd's data model in a PostgreSQL-protocol database, answering
//! every call as etcd would (the same revisions, the same errors).
//!
//! - [`schema`]: the tables, versioned; `etcdmux backend init`;
//! - [`pool`]: the bounded connection pool and what a database failure means;
//! - [`kv`]: reads at a revision and write transactions on the head row;
//! - [`answer`]: etcd's range answers and compares from rows (pure);
//! - [`feed`]: the change feed (Watch) and the head notifier;
//! - [`lease`]: leases, their expiry by one etcdmux at a time;
//! - [`compact`]: compaction in bounded batches.
//!
//! Reads that may be sent twice are retried after a lost connection, within their
//! deadline; writes only when they never reached the database, or when the
//! database aborted them (serialization failure, deadlock), which means nothing
//! of them was applied.

pub mod answer;
pub mod compact;
pub mod feed;
pub mod kv;
pub mod lease;
pub mod pool;
pub mod schema;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{Backend, Call, Open, Responses};
use crate::config::{BackendConfig, Config};
use crate::metrics::names;
use crate::pb::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, AlarmResponse, CompactionRequest, CompactionResponse, DeleteRangeRequest,
    DeleteRangeResponse, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, MemberListRequest, MemberListResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, StatusRequest, StatusResponse, TxnRequest, TxnResponse, WatchRequest, WatchResponse,
};
use crate::shutdown::Tasks;
use crate::upstream::classify::{EtcdError, Failure, UpstreamError};
use crate::upstream::{CallCtx, Retry, StreamCtx};
use kv::{header, TxError};
use pool::{failure, is_retryable, Conn, Pool, Pooled};

/// The etcd API version the SQL backend implements (its `Status`): progress
/// requests are answered only once the stream has everything up to the store's
/// revision, as etcd does from 3.4.31 and 3.5.13.
pub const API_VERSION: &str = "3.5.17";

/// Attempts of a transaction the database aborted (it applied nothing).
const MAX_ABORTS: u32 = 8;

/// One write transaction's work.
pub enum Write<'a> {
    Put(&'a PutRequest),
    Delete(&'a DeleteRangeRequest),
    Txn(&'a TxnRequest),
    Revoke(i64),
    /// The expiry worker's revoke: only if still expired.
    Expire(i64),
    Compact(i64),
}

/// What a write transaction answered.
pub enum Done {
    Put(PutResponse),
    Delete(DeleteRangeResponse),
    Txn(TxnResponse),
    /// The revision after; whether the lease was there.
    Revoke(i64, bool),
    /// The revision when compacted.
    Compact(i64),
}

/// What the backend's calls, feeds and workers share.
pub struct SqlInner {
    pub pool: Arc<Pool>,
    pub cfg: BackendConfig,
    /// The default deadline of the backend's own work (expiry, compaction, feeds).
    pub timeout: Duration,
    pub head: feed::HeadRx,
    pub tasks: Tasks,
}

pub struct SqlBackend {
    inner: Arc<SqlInner>,
}

impl SqlBackend {
    /// The pool (connecting lazily), the change feed's notifier and the
    /// expiry/compaction worker, all on `tasks`.
    pub fn new(cfg: &Config, tasks: &Tasks) -> Result<SqlBackend, crate::certs::BoxError> {
        let b = &cfg.backend;
        let tls = tls::DbTls::from_config(b)?;
        let pool = Pool::new(&b.dsn, tls, b.pool_size, Duration::from_millis(b.connect_timeout_ms), tasks)?;
        let head = feed::start_notifier(pool.clone(), Duration::from_millis(b.poll_interval_ms), b.notify, tasks);
        let inner =
            Arc::new(SqlInner { pool, cfg: b.clone(), timeout: cfg.default_timeout(), head, tasks: tasks.clone() });
        tasks.spawn(lease::worker(inner.clone()));
        Ok(SqlBackend { inner })
    }
}

impl SqlInner {
    /// Runs a read that may be sent again, retrying after a connection failure
    /// until the deadline.
    async fn read<'a, T>(
        &self,
        ctx: &CallCtx,
        f: impl Fn(Pooled) -> futures::future::BoxFuture<'a, Result<T, TxError>>,
    ) -> Result<T, UpstreamError> {
        let mut attempt = 0u32;
        loop {
            let res = match tokio::time::timeout_at(ctx.deadline, async {
                let conn = self.pool.get(ctx.deadline).await.map_err(TxError::Answer)?;
                f(conn).await
            })
            .await
            {
                Err(_) => return Err(UpstreamError::deadline()),
                Ok(r) => r,
            };
            let err = match res {
                Ok(v) => return Ok(v),
                Err(TxError::Answer(e)) => e,
                Err(TxError::Db(e)) => failure(e),
            };
            attempt += 1;
            if !err.failure().may_retry(Retry::Safe) || !self.backoff(ctx, attempt).await {
                return Err(err);
            }
        }
    }

    /// Waits before attempt `attempt + 1`; false if the deadline comes first.
    async fn backoff(&self, ctx: &CallCtx, attempt: u32) -> bool {
        metrics::counter!(names::BACKEND_RETRIES).increment(1);
        let pause = Duration::from_millis(25u64 << attempt.min(5));
        if Instant::now() + pause >= ctx.deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        true
    }

    /// Runs one write transaction: sent again only when it never reached the
    /// database or the database aborted it.
    pub async fn write(&self, ctx: &CallCtx, w: Write<'_>) -> Result<Done, UpstreamError> {
        // etcd measures its raft request; the request itself is that, bar a few bytes.
        let size = match &w {
            Write::Put(p) => prost::Message::encoded_len(*p),
            Write::Delete(d) => prost::Message::encoded_len(*d),
            Write::Txn(t) => prost::Message::encoded_len(*t),
            _ => 0,
        };
        if size > self.cfg.max_request_bytes {
            return Err(UpstreamError::answered(EtcdError::RequestTooLarge));
        }
        let mut attempt = 0u32;
        loop {
            let res = tokio::time::timeout_at(ctx.deadline, async {
                let mut conn = self.pool.get(ctx.deadline).await.map_err(TxError::Answer)?;
                self.write_once(&mut conn, &w).await
            })
            .await;
            let err = match res {
                Err(_) => return Err(UpstreamError::deadline()),
                Ok(Ok(done)) => return Ok(done),
                Ok(Err(TxError::Answer(e))) if e.failure() == Failure::NotSent => e,
                Ok(Err(TxError::Answer(e))) => return Err(e),
                Ok(Err(TxError::Db(e))) if is_retryable(&e) && attempt < MAX_ABORTS => failure(e),
                Ok(Err(TxError::Db(e))) => return Err(failure(e)),
            };
            attempt += 1;
            if !self.backoff(ctx, attempt).await {
                return Err(err);
            }
        }
    }

    async fn write_once(&self, conn: &mut Conn, w: &Write<'_>) -> Result<Done, TxError> {
        conn.in_txn = true;
        conn.client.batch_execute("BEGIN").await?;
        let done = async {
            let mut tx = kv::Tx::start(conn).await?;
            let done = match w {
                Write::Put(p) => Done::Put(tx.put(p, false).await?),
                Write::Delete(d) => Done::Delete(tx.delete(d).await?),
                Write::Txn(t) => {
                    let mut resp = tx.txn(t).await?;
                    resp.header = header(tx.rev());
                    Done::Txn(resp)
                }
                Write::Revoke(id) => {
                    let found = lease::revoke(&mut tx, *id, false).await?;
                    Done::Revoke(tx.rev(), found)
                }
                Write::Expire(id) => {
                    lease::revoke(&mut tx, *id, true).await?;
                    Done::Revoke(tx.rev(), true)
                }
                Write::Compact(rev) => {
                    if *rev <= tx.compact {
                        return Err(UpstreamError::answered(EtcdError::Compacted).into());
                    }
                    if *rev > tx.begin {
                        return Err(UpstreamError::answered(EtcdError::FutureRevision).into());
                    }
                    let stmt = tx.conn.stmt("UPDATE etcdmux_head SET compact_revision = $1 WHERE id = 1").await?;
                    tx.conn.client.execute(&stmt, &[rev]).await?;
                    Done::Compact(tx.begin)
                }
            };
            let changed = tx.changes > 0;
            let rev = tx.finish().await?;
            if changed && self.cfg.notify {
                let stmt = tx.conn.stmt("SELECT pg_notify('etcdmux_revision', $1)").await?;
                tx.conn.client.execute(&stmt, &[&rev.to_string()]).await?;
            }
            Ok::<_, TxError>(done)
        }
        .await;
        match done {
            Ok(d) => {
                conn.client.batch_execute("COMMIT").await?;
                conn.in_txn = false;
                Ok(d)
            }
            Err(e) => {
                if conn.client.batch_execute("ROLLBACK").await.is_ok() {
                    conn.in_txn = false;
                }
                Err(e)
            }
        }
    }

    /// A txn that only reads: one snapshot, no lock on the head.
    async fn read_txn(&self, conn: &mut Conn, req: &TxnRequest) -> Result<TxnResponse, TxError> {
        conn.in_txn = true;
        conn.client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
        let r = async {
            let mut tx = kv::Tx::snapshot(conn).await?;
            let mut resp = tx.txn(req).await?;
            resp.header = header(tx.rev());
            Ok::<_, TxError>(resp)
        }
        .await;
        let end = conn.client.batch_execute(if r.is_ok() { "COMMIT" } else { "ROLLBACK" }).await;
        if end.is_ok() {
            conn.in_txn = false;
        }
        let resp = r?;
        end?;
        Ok(resp)
    }

    /// The head's revision now.
    async fn revision(&self, ctx: &CallCtx) -> Result<i64, UpstreamError> {
        self.read(ctx, |mut conn| {
            Box::pin(async move {
                let stmt = conn.stmt("SELECT revision FROM etcdmux_head WHERE id = 1").await?;
                Ok(conn.client.query_one(&stmt, &[]).await?.try_get(0)?)
            })
        })
        .await
    }
}

impl Backend for SqlBackend {
    fn range<'a>(&'a self, ctx: &'a CallCtx, req: &'a RangeRequest) -> Call<'a, RangeResponse> {
        Box::pin(self.inner.read(ctx, move |mut conn| Box::pin(async move { kv::range(&mut conn, req).await })))
    }

    fn put<'a>(&'a self, ctx: &'a CallCtx, req: &'a PutRequest) -> Call<'a, PutResponse> {
        Box::pin(async move {
            match self.inner.write(ctx, Write::Put(req)).await? {
                Done::Put(p) => Ok(p),
                _ => Err(internal("put")),
            }
        })
    }

    fn delete_range<'a>(&'a self, ctx: &'a CallCtx, req: &'a DeleteRangeRequest) -> Call<'a, DeleteRangeResponse> {
        Box::pin(async move {
            match self.inner.write(ctx, Write::Delete(req)).await? {
                Done::Delete(d) => Ok(d),
                _ => Err(internal("delete")),
            }
        })
    }

    fn txn<'a>(&'a self, ctx: &'a CallCtx, _retry: Retry, req: &'a TxnRequest) -> Call<'a, TxnResponse> {
        Box::pin(async move {
            if !kv::writes(req) {
                let inner = &self.inner;
                return inner
                    .read(ctx, move |mut conn| Box::pin(async move { inner.read_txn(&mut conn, req).await }))
                    .await;
            }
            match self.inner.write(ctx, Write::Txn(req)).await? {
                Done::Txn(t) => Ok(t),
                _ => Err(internal("txn")),
            }
        })
    }

    fn compact<'a>(&'a self, ctx: &'a CallCtx, req: &'a CompactionRequest) -> Call<'a, CompactionResponse> {
        Box::pin(async move {
            let rev = match self.inner.write(ctx, Write::Compact(req.revision)).await? {
                Done::Compact(rev) => rev,
                _ => return Err(internal("compact")),
            };
            if req.physical {
                compact::delete_below(&self.inner, req.revision).await?;
            } else {
                let inner = self.inner.clone();
                let at = req.revision;
                self.inner.tasks.spawn_until_shutdown(async move {
                    if let Err(e) = compact::delete_below(&inner, at).await {
                        tracing::warn!(error = %e, "sql backend: deleting compacted history failed; the expiry lock holder finishes it");
                    }
                });
            }
            Ok(CompactionResponse { header: header(rev) })
        })
    }

    fn lease_grant<'a>(&'a self, ctx: &'a CallCtx, req: &'a LeaseGrantRequest) -> Call<'a, LeaseGrantResponse> {
        Box::pin(async move {
            let ttl = lease::granted_ttl(req.ttl)?;
            let mut attempt = 0;
            loop {
                let id = if req.id != 0 { req.id } else { lease::new_id(attempt) };
                let inserted = self
                    .inner
                    .read(ctx, move |mut conn| {
                        Box::pin(async move {
                            let stmt = conn.stmt(lease::GRANT).await?;
                            Ok(conn.client.execute(&stmt, &[&id, &ttl]).await?)
                        })
                    })
                    .await?;
                if inserted == 1 {
                    let rev = self.inner.revision(ctx).await?;
                    return Ok(LeaseGrantResponse { header: header(rev), id, ttl, error: String::new() });
                }
                if req.id != 0 || attempt > 8 {
                    return Err(lease::exists());
                }
                attempt += 1;
            }
        })
    }

    fn lease_revoke<'a>(&'a self, ctx: &'a CallCtx, req: &'a LeaseRevokeRequest) -> Call<'a, LeaseRevokeResponse> {
        Box::pin(async move {
            match self.inner.write(ctx, Write::Revoke(req.id)).await? {
                Done::Revoke(rev, true) => Ok(LeaseRevokeResponse { header: header(rev) }),
                Done::Revoke(_, false) => Err(UpstreamError::answered(EtcdError::LeaseNotFound)),
                _ => Err(internal("revoke")),
            }
        })
    }

    fn lease_time_to_live<'a>(
        &'a self,
        ctx: &'a CallCtx,
        req: &'a LeaseTimeToLiveRequest,
    ) -> Call<'a, LeaseTimeToLiveResponse> {
        Box::pin(self.inner.read(ctx, move |mut conn| {
            Box::pin(async move {
                let stmt = conn.stmt(lease::TTL).await?;
                let row = conn.client.query_one(&stmt, &[&req.id]).await?;
                let rev: i64 = row.try_get(0)?;
                let Some(granted) = row.try_get::<_, Option<i64>>(1)? else {
                    // etcd answers a lease it does not know with TTL -1, not an error.
                    return Ok(LeaseTimeToLiveResponse {
                        header: header(rev),
                        id: req.id,
                        ttl: -1,
                        ..Default::default()
                    });
                };
                let left: f64 = row.try_get::<_, Option<f64>>(2)?.unwrap_or(0.0);
                let keys = if req.keys { lease::keys(&mut conn, req.id).await? } else { Vec::new() };
                Ok(LeaseTimeToLiveResponse {
                    header: header(rev),
                    id: req.id,
                    ttl: left.max(0.0) as i64,
                    granted_ttl: granted,
                    keys: keys.into_iter().collect(),
                })
            })
        }))
    }

    fn lease_leases<'a>(&'a self, ctx: &'a CallCtx, _req: &'a LeaseLeasesRequest) -> Call<'a, LeaseLeasesResponse> {
        Box::pin(self.inner.read(ctx, |mut conn| {
            Box::pin(async move {
                let stmt = conn.stmt(lease::LIST).await?;
                let rows = conn.client.query(&stmt, &[]).await?;
                let mut resp = LeaseLeasesResponse::default();
                for row in &rows {
                    resp.header = header(row.try_get(0)?);
                    if let Some(id) = row.try_get::<_, Option<i64>>(1)? {
                        resp.leases.push(LeaseStatus { id });
                    }
                }
                Ok(resp)
            })
        }))
    }

    fn lease_keep_alive<'a>(
        &'a self,
        _ctx: &'a StreamCtx,
        requests: mpsc::Receiver<LeaseKeepAliveRequest>,
    ) -> Open<'a, LeaseKeepAliveResponse> {
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(self.inner.cfg.feed_buffer);
            self.inner.tasks.spawn_until_shutdown(lease::keep_alive(self.inner.clone(), requests, tx));
            Ok(Responses::new(ReceiverStream::new(rx)))
        })
    }

    fn watch<'a>(&'a self, ctx: &'a StreamCtx, requests: mpsc::Receiver<WatchRequest>) -> Open<'a, WatchResponse> {
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(self.inner.cfg.feed_buffer);
            self.inner.tasks.spawn_until_shutdown(feed::run(self.inner.clone(), ctx.deadline, requests, tx));
            Ok(Responses::new(ReceiverStream::new(rx)))
        })
    }

    fn status<'a>(&'a self, ctx: &'a CallCtx, _req: &'a StatusRequest) -> Call<'a, StatusResponse> {
        Box::pin(async move {
            let rev = self.inner.revision(ctx).await?;
            // The table's size where the engine can say (PostgreSQL, YugabyteDB); 0 elsewhere.
            let size = self
                .inner
                .read(ctx, |conn| {
                    Box::pin(async move {
                        let r = conn.client.query_one("SELECT pg_total_relation_size('etcdmux_kv')", &[]).await;
                        Ok(r.ok().and_then(|row| row.try_get::<_, i64>(0).ok()).unwrap_or(0))
                    })
                })
                .await
                .unwrap_or(0);
            Ok(StatusResponse {
                header: header(rev),
                version: API_VERSION.to_string(),
                db_size: size,
                db_size_in_use: size,
                raft_index: rev as u64,
                raft_applied_index: rev as u64,
                ..Default::default()
            })
        })
    }

    fn alarm<'a>(&'a self, ctx: &'a CallCtx, req: &'a AlarmRequest) -> Call<'a, AlarmResponse> {
        Box::pin(async move {
            if AlarmAction::try_from(req.action) == Ok(AlarmAction::Activate) {
                return Err(UpstreamError::new(Status::unimplemented(
                    "etcdmux: alarms are etcd's; the SQL backend raises none",
                )));
            }
            let rev = self.inner.revision(ctx).await?;
            Ok(AlarmResponse { header: header(rev), alarms: Vec::new() })
        })
    }

    fn member_list<'a>(&'a self, ctx: &'a CallCtx, _req: &'a MemberListRequest) -> Call<'a, MemberListResponse> {
        Box::pin(async move {
            let rev = self.inner.revision(ctx).await?;
            Ok(MemberListResponse { header: header(rev), members: Vec::new() })
        })
    }
}

fn internal(what: &str) -> UpstreamError {
    UpstreamError::new(Status::internal(format!("etcdmux: the sql backend answered a {what} with another kind")))
}
