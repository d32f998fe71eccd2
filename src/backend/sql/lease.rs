//! Leases on SQL, and the work one etcdmux does for all: lease expiry and the
//! deletion of compacted history.
//!
//! A lease is a row with its TTL and its expiry time on the database's clock (so
//! every etcdmux agrees on it); a key's lease is its newest version's. Revoking a
//! lease deletes its keys in one write transaction: one revision, as in etcd.
//! Expired leases are revoked by exactly one etcdmux at a time: the holder of the
//! `lease_expiry` lock row, taken when free or expired and renewed every
//! `lease_check_interval_ms` for `lease_lock_ttl_ms`. The holder also finishes any
//! compaction whose history is not yet deleted (after a crash mid-way).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Status;

use super::kv::{header, Tx};
use super::pool::{failure, Conn};
use super::{SqlInner, Write};
use crate::metrics::names;
use crate::pb::etcdserverpb::{LeaseKeepAliveRequest, LeaseKeepAliveResponse};
use crate::upstream::classify::{EtcdError, UpstreamError};

/// etcd's largest TTL (`MaxLeaseTTL`).
pub const MAX_TTL: i64 = 9_000_000_000;
/// etcd's smallest TTL with its default heartbeat and election timeout
/// (`minLeaseTTL`: 1.5 election timeouts, rounded up to seconds).
pub const MIN_TTL: i64 = 2;

pub const GRANT: &str = "INSERT INTO etcdmux_lease (id, ttl, expires_at)
     VALUES ($1, $2, now() + ($2::BIGINT * INTERVAL '1 second')) ON CONFLICT DO NOTHING";
pub const TTL: &str = "SELECT (SELECT revision FROM etcdmux_head WHERE id = 1), l.ttl,
            EXTRACT(EPOCH FROM (l.expires_at - now()))::FLOAT8
     FROM (SELECT 1) one LEFT JOIN etcdmux_lease l ON l.id = $1";
pub const LIST: &str = "SELECT (SELECT revision FROM etcdmux_head WHERE id = 1), l.id
     FROM (SELECT 1) one LEFT JOIN etcdmux_lease l ON true ORDER BY l.id";
const RENEW: &str = "WITH u AS (
       UPDATE etcdmux_lease SET expires_at = now() + (ttl * INTERVAL '1 second')
       WHERE id = $1 AND expires_at > now() RETURNING ttl)
     SELECT (SELECT revision FROM etcdmux_head WHERE id = 1), (SELECT ttl FROM u)";
/// The keys whose newest version is attached to a lease.
pub const KEYS: &str = "SELECT key FROM etcdmux_latest WHERE lease = $1 ORDER BY key";
const DROP: &str = "DELETE FROM etcdmux_lease WHERE id = $1";
const DROP_EXPIRED: &str = "DELETE FROM etcdmux_lease WHERE id = $1 AND expires_at <= now()";
const EXPIRED: &str = "SELECT id FROM etcdmux_lease WHERE expires_at <= now() ORDER BY expires_at LIMIT 100";
const LOCK: &str = "INSERT INTO etcdmux_lock (name, holder, expires_at)
     VALUES ('lease_expiry', $1, now() + ($2::BIGINT * INTERVAL '1 millisecond'))
     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
     WHERE etcdmux_lock.holder = excluded.holder OR etcdmux_lock.expires_at < now()
     RETURNING holder";
const UNLOCK: &str = "DELETE FROM etcdmux_lock WHERE name = 'lease_expiry' AND holder = $1";

/// The keys attached to lease `id`, in key order.
pub async fn keys(conn: &mut Conn, id: i64) -> Result<Vec<Bytes>, tokio_postgres::Error> {
    let stmt = conn.stmt(KEYS).await?;
    let rows = conn.client.query(&stmt, &[&id]).await?;
    rows.iter().map(|r| r.try_get::<_, Vec<u8>>(0).map(Bytes::from)).collect()
}

/// Revokes lease `id` in write transaction `tx`: its row, then a tombstone for every
/// key attached (in key order, as etcd's lessor deletes them). `only_expired`: the
/// expiry worker's revoke, which leaves a lease renewed meanwhile alone. Returns
/// whether the lease was there.
pub async fn revoke(tx: &mut Tx<'_>, id: i64, only_expired: bool) -> Result<bool, tokio_postgres::Error> {
    let stmt = tx.conn.stmt(if only_expired { DROP_EXPIRED } else { DROP }).await?;
    if tx.conn.client.execute(&stmt, &[&id]).await? == 0 {
        return Ok(false);
    }
    tx.delete_leased(id).await?;
    Ok(true)
}

/// A lease id for a grant without one: positive, from the clock and a counter
/// (a taken one is refused by the insert and another is tried).
pub fn new_id(attempt: u64) -> i64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let n = NEXT.fetch_add(1, Ordering::Relaxed).wrapping_add(attempt);
    // splitmix64 of both: ids spread over the space, so replicas rarely collide.
    let mut z = nanos ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) & (i64::MAX as u64)).max(1) as i64
}

/// Serves one keepalive stream: each request renews its lease (if alive) and is
/// answered in order, as etcd answers (TTL 0 for a lease that is gone).
pub async fn keep_alive(
    inner: Arc<SqlInner>,
    mut requests: mpsc::Receiver<LeaseKeepAliveRequest>,
    out: mpsc::Sender<Result<LeaseKeepAliveResponse, Status>>,
) {
    loop {
        let req = tokio::select! {
            _ = out.closed() => return,
            r = requests.recv() => match r { Some(r) => r, None => return },
        };
        let answer = async {
            let mut conn = inner.pool.get(Instant::now() + inner.timeout).await?;
            let stmt = conn.stmt(RENEW).await.map_err(failure)?;
            let row = conn.client.query_one(&stmt, &[&req.id]).await.map_err(failure)?;
            let rev: i64 = row.try_get(0).map_err(failure)?;
            let ttl: Option<i64> = row.try_get(1).map_err(failure)?;
            Ok::<_, UpstreamError>(LeaseKeepAliveResponse { header: header(rev), id: req.id, ttl: ttl.unwrap_or(0) })
        };
        let resp = answer.await.map_err(|e| e.into_status());
        let end = resp.is_err();
        if out.send(resp).await.is_err() || end {
            return;
        }
    }
}

/// The lease-expiry and compaction worker: runs in every etcdmux, works only while
/// it holds the lock.
pub async fn worker(inner: Arc<SqlInner>) {
    let holder = format!("etcdmux-{}-{}", std::process::id(), new_id(0));
    let every = Duration::from_millis(inner.cfg.lease_check_interval_ms);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut held = false;
    loop {
        tokio::select! {
            _ = inner.tasks.cancelled() => break,
            _ = tick.tick() => {}
        }
        held = match take_lock(&inner, &holder).await {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(error = %e, "sql backend: lease-expiry lock not renewed");
                false
            }
        };
        metrics::gauge!(names::BACKEND_EXPIRY_LOCK).set(if held { 1.0 } else { 0.0 });
        if !held {
            continue;
        }
        if let Err(e) = expire(&inner).await {
            tracing::warn!(error = %e, "sql backend: lease expiry failed; trying again");
        }
        if let Err(e) = super::compact::finish(&inner).await {
            tracing::warn!(error = %e, "sql backend: deleting compacted history failed; trying again");
        }
    }
    if held {
        // Hand expiry over at once rather than after the lock's TTL.
        if let Ok(mut conn) = inner.pool.get(Instant::now() + Duration::from_secs(2)).await {
            if let Ok(stmt) = conn.stmt(UNLOCK).await {
                let _ = conn.client.execute(&stmt, &[&holder]).await;
            }
        }
        metrics::gauge!(names::BACKEND_EXPIRY_LOCK).set(0.0);
    }
}

async fn take_lock(inner: &SqlInner, holder: &str) -> Result<bool, UpstreamError> {
    let mut conn = inner.pool.get(Instant::now() + inner.timeout).await?;
    let stmt = conn.stmt(LOCK).await.map_err(failure)?;
    let ttl = inner.cfg.lease_lock_ttl_ms as i64;
    Ok(conn.client.query_opt(&stmt, &[&holder, &ttl]).await.map_err(failure)?.is_some())
}

/// Revokes every expired lease, each in its own revision (as etcd's leader revokes
/// each with its own proposal).
async fn expire(inner: &SqlInner) -> Result<(), UpstreamError> {
    let ids: Vec<i64> = {
        let mut conn = inner.pool.get(Instant::now() + inner.timeout).await?;
        let stmt = conn.stmt(EXPIRED).await.map_err(failure)?;
        let rows = conn.client.query(&stmt, &[]).await.map_err(failure)?;
        rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>().map_err(failure)?
    };
    for id in ids {
        let ctx = crate::upstream::CallCtx { deadline: Instant::now() + inner.timeout, require_leader: false };
        inner.write(&ctx, Write::Expire(id)).await?;
        metrics::counter!(names::BACKEND_LEASES_EXPIRED).increment(1);
    }
    Ok(())
}

/// etcd's answer to a TTL out of bounds, or the TTL granted.
pub fn granted_ttl(ttl: i64) -> Result<i64, UpstreamError> {
    if ttl > MAX_TTL {
        return Err(UpstreamError::new(Status::out_of_range("etcdserver: too large lease TTL")));
    }
    Ok(ttl.max(MIN_TTL))
}

/// etcd's "lease already exists".
pub fn exists() -> UpstreamError {
    UpstreamError::answered(EtcdError::LeaseExists)
}
