//! One of the migration's two etcds: the proxy's upstream pool (the same TLS,
//! retries and failover), every call with the configured deadline and `hasleader`,
//! failures tagged with the etcd they came from.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::error::{MigrateError, Result, Side};
use crate::config::{Config, UpstreamConfig};
use crate::keyspace::Piece;
use crate::pb::etcdserverpb::watch_client::WatchClient;
use crate::pb::etcdserverpb::{
    request_op, response_op, CompactionRequest, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp,
    TxnRequest, TxnResponse,
};
use crate::pb::mvccpb::KeyValue;
use crate::upstream::classify::{EtcdError, UpstreamError};
use crate::upstream::{CallCtx, Retry, Upstream};

pub struct Etcd {
    up: Upstream,
    pub side: Side,
    /// The endpoints, for messages.
    pub url: String,
    timeout: Duration,
}

impl Etcd {
    /// A pool to `upstream`'s endpoints (with its TLS settings), otherwise as `cfg`.
    pub fn connect(cfg: &Config, side: Side, upstream: UpstreamConfig) -> Result<Etcd> {
        let url = upstream.endpoints.join(",");
        let mut c = cfg.clone();
        c.upstream = upstream;
        // Two connections: the migration is one client, not thousands.
        c.upstream.connections = c.upstream.connections.clamp(1, 2);
        let up = Upstream::new(&c).map_err(|e| MigrateError::Usage(format!("{side} etcd {url}: {e}")))?;
        Ok(Etcd { up, side, url, timeout: cfg.default_timeout() })
    }

    fn ctx(&self) -> CallCtx {
        CallCtx { deadline: Instant::now() + self.timeout, require_leader: true }
    }

    pub fn err(&self, err: UpstreamError) -> MigrateError {
        MigrateError::Etcd { side: self.side, url: self.url.clone(), err }
    }

    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        let ctx = self.ctx();
        self.up
            .kv_call(&ctx, Retry::Safe, &req, |mut c, r| async move { c.range(r).await })
            .await
            .map_err(|e| self.err(e))
    }

    /// A write: sent again only when it surely never reached etcd.
    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        let ctx = self.ctx();
        self.up
            .kv_call(&ctx, Retry::OnlyUnsent, &req, |mut c, r| async move { c.txn(r).await })
            .await
            .map_err(|e| self.err(e))
    }

    pub async fn put(&self, req: PutRequest) -> Result<PutResponse> {
        let ctx = self.ctx();
        self.up
            .kv_call(&ctx, Retry::OnlyUnsent, &req, |mut c, r| async move { c.put(r).await })
            .await
            .map_err(|e| self.err(e))
    }

    /// etcd's current revision and cluster id (a range that matches nothing).
    pub async fn status(&self) -> Result<(i64, u64)> {
        let resp = self
            .range(RangeRequest {
                key: Bytes::from_static(b"\0etcdmux-migrate"),
                count_only: true,
                ..Default::default()
            })
            .await?;
        let h = resp.header.unwrap_or_default();
        Ok((h.revision, h.cluster_id))
    }

    /// Compacts at `revision`; one already compacted at or past it counts as done.
    pub async fn compact(&self, revision: i64) -> Result<()> {
        let ctx = self.ctx();
        let req = CompactionRequest { revision, physical: false };
        match self.up.kv_call(&ctx, Retry::OnlyUnsent, &req, |mut c, r| async move { c.compact(r).await }).await {
            Ok(_) => Ok(()),
            Err(e) if e.etcd() == Some(EtcdError::Compacted) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    pub async fn lease_grant(&self, id: i64, ttl: i64) -> Result<LeaseGrantResponse> {
        let ctx = self.ctx();
        let req = LeaseGrantRequest { id, ttl };
        self.up
            .lease_call(&ctx, Retry::OnlyUnsent, &req, |mut c, r| async move { c.lease_grant(r).await })
            .await
            .map_err(|e| self.err(e))
    }

    /// The lease's remaining TTL (-1 once it is gone).
    pub async fn lease_ttl(&self, id: i64) -> Result<LeaseTimeToLiveResponse> {
        let ctx = self.ctx();
        let req = LeaseTimeToLiveRequest { id, keys: false };
        self.up
            .lease_call(&ctx, Retry::Safe, &req, |mut c, r| async move { c.lease_time_to_live(r).await })
            .await
            .map_err(|e| self.err(e))
    }

    /// One keepalive of lease `id`: its TTL afterwards (0 or less: gone).
    pub async fn lease_keepalive(&self, id: i64) -> Result<i64> {
        let ctx = self.ctx();
        let resp = self
            .up
            .call(&ctx, Retry::Safe, |ch| {
                let mut c = self.up.lease(ch);
                let r = ctx.request(futures::stream::iter([LeaseKeepAliveRequest { id }]));
                async move {
                    let mut s = c.lease_keep_alive(r).await?.into_inner();
                    let first = s.next().await.transpose()?.unwrap_or_default();
                    Ok(tonic::Response::new(first))
                }
            })
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp.ttl)
    }

    /// A client for the tail's watch stream.
    pub fn watch_client(&self) -> WatchClient<Channel> {
        let (_, ch) = self.up.stream_channel();
        self.up.watch(ch)
    }

    /// Key counts of `range` at `revision` (0: now).
    pub async fn count(&self, range: &Piece, revision: i64) -> Result<i64> {
        let req = RangeRequest {
            key: range.key.clone(),
            range_end: range.range_end.clone(),
            count_only: true,
            revision,
            ..Default::default()
        };
        Ok(self.range(req).await?.count)
    }

    /// Key counts of `ranges` at `revision`, `per_txn` counts to an etcd transaction.
    pub async fn counts(&self, ranges: &[Piece], revision: i64, per_txn: usize) -> Result<Vec<i64>> {
        let mut out = Vec::with_capacity(ranges.len());
        for chunk in ranges.chunks(per_txn.max(1)) {
            let success = chunk
                .iter()
                .map(|r| RequestOp {
                    request: Some(request_op::Request::RequestRange(RangeRequest {
                        key: r.key.clone(),
                        range_end: r.range_end.clone(),
                        count_only: true,
                        revision,
                        ..Default::default()
                    })),
                })
                .collect();
            for r in self.txn(TxnRequest { success, ..Default::default() }).await?.responses {
                match r.response {
                    Some(response_op::Response::ResponseRange(rr)) => out.push(rr.count),
                    other => return Err(MigrateError::Internal(format!("count txn answered {other:?}"))),
                }
            }
        }
        Ok(out)
    }
}

/// Reads a range page by page at one revision: the first page's, unless given.
pub struct Pager {
    next: Bytes,
    end: Bytes,
    /// The revision every page is read at (0 until the first page when not given).
    pub revision: i64,
    limit: i64,
    /// With `page_bytes`: the most keys a page may have (the limit adapts below it).
    max_limit: i64,
    /// Bytes a page should hold about (0: fixed `limit`): pages of large values get
    /// fewer keys, pages of small ones more.
    page_bytes: usize,
    keys_only: bool,
    /// Only keys modified after this revision (0: every key).
    pub min_mod_revision: i64,
    done: bool,
}

impl Pager {
    pub fn new(range: &Piece, revision: i64, limit: i64, keys_only: bool) -> Pager {
        Pager {
            next: range.key.clone(),
            end: range.range_end.clone(),
            revision,
            limit,
            max_limit: limit,
            page_bytes: 0,
            keys_only,
            min_mod_revision: 0,
            done: false,
        }
    }

    /// Sizes pages to about `bytes` each, with at most the pager's limit of keys.
    /// (etcd before 3.5 collects every remaining key of the range for each page, so
    /// few large pages cost much less than many small ones.)
    pub fn page_bytes(mut self, bytes: usize) -> Pager {
        self.page_bytes = bytes;
        self.limit = self.max_limit.min(1000);
        self
    }

    /// Starts at `key` instead of the range's start (a resumed scan).
    pub fn from_key(mut self, key: Bytes) -> Pager {
        self.next = key;
        self
    }

    /// The next page, `None` at the end. A compacted revision is
    /// [`MigrateError::Compacted`].
    pub async fn next(&mut self, etcd: &Etcd) -> Result<Option<Vec<KeyValue>>> {
        if self.done {
            return Ok(None);
        }
        let req = RangeRequest {
            key: self.next.clone(),
            range_end: self.end.clone(),
            limit: self.limit,
            revision: self.revision,
            keys_only: self.keys_only,
            min_mod_revision: self.min_mod_revision,
            ..Default::default()
        };
        let resp = match etcd.range(req).await {
            Ok(r) => r,
            Err(e) if e.etcd() == Some(EtcdError::Compacted) => {
                return Err(MigrateError::Compacted { side: etcd.side, needed: self.revision, detail: String::new() });
            }
            Err(e) => return Err(e),
        };
        if self.revision == 0 {
            self.revision = resp.header.as_ref().map_or(0, |h| h.revision);
        }
        match resp.kvs.last() {
            Some(last) if resp.more => {
                let mut k = last.key.to_vec();
                k.push(0);
                self.next = Bytes::from(k);
            }
            _ => self.done = true,
        }
        if resp.kvs.is_empty() {
            return Ok(None);
        }
        if self.page_bytes > 0 {
            let bytes: usize = resp.kvs.iter().map(|kv| kv.key.len() + kv.value.len()).sum();
            let per_key = (bytes / resp.kvs.len()).max(1);
            self.limit = ((self.page_bytes / per_key) as i64).clamp(100.min(self.max_limit), self.max_limit);
        }
        Ok(Some(resp.kvs))
    }
}
