//! Compaction: `Compact` moves the head's compact revision (reads and watches
//! below it are refused from then on, as etcd refuses them), then the history it
//! no longer needs is deleted in batches of `backend.compaction_batch` rows, each
//! its own statement, so writers are never held up for long: first every version
//! superseded by a newer one at or below the compact revision, then the deletions
//! (tombstones) at or below it, which by then hide nothing. Rows a read at or
//! above the compact revision needs are never deleted, in any order. The head's
//! `compacted_revision` records how far deletion got; the lease-expiry lock holder
//! finishes what a crash left.

use tokio::time::Instant;

use super::pool::failure;
use super::SqlInner;
use crate::metrics::names;
use crate::upstream::classify::UpstreamError;

const SUPERSEDED: &str = "DELETE FROM etcdmux_kv WHERE (key, mod_revision, seq) IN (
       SELECT k.key, k.mod_revision, k.seq FROM etcdmux_kv k
       WHERE k.mod_revision <= $1
         AND EXISTS (SELECT 1 FROM etcdmux_kv n
                     WHERE n.key = k.key AND (n.mod_revision, n.seq) > (k.mod_revision, k.seq)
                       AND n.mod_revision <= $1)
       LIMIT $2)";
const TOMBSTONES: &str = "DELETE FROM etcdmux_kv WHERE (key, mod_revision, seq) IN (
       SELECT key, mod_revision, seq FROM etcdmux_kv WHERE deleted AND mod_revision <= $1 LIMIT $2)";
const PENDING: &str = "SELECT compact_revision, compacted_revision FROM etcdmux_head WHERE id = 1";
const DONE: &str = "UPDATE etcdmux_head SET compacted_revision = $1 WHERE id = 1 AND compacted_revision < $1";

/// Deletes the history below the head's compact revision, if any is left.
pub async fn finish(inner: &SqlInner) -> Result<(), UpstreamError> {
    let (want, done): (i64, i64) = {
        let mut conn = inner.pool.get(Instant::now() + inner.timeout).await?;
        let stmt = conn.stmt(PENDING).await.map_err(failure)?;
        let row = conn.client.query_one(&stmt, &[]).await.map_err(failure)?;
        (row.try_get(0).map_err(failure)?, row.try_get(1).map_err(failure)?)
    };
    if want > done {
        delete_below(inner, want).await?;
    }
    Ok(())
}

/// Deletes, batch by batch, what compaction at `rev` no longer needs.
pub async fn delete_below(inner: &SqlInner, rev: i64) -> Result<(), UpstreamError> {
    for sql in [SUPERSEDED, TOMBSTONES] {
        loop {
            let mut conn = inner.pool.get(Instant::now() + inner.timeout).await?;
            let stmt = conn.stmt(sql).await.map_err(failure)?;
            let n = conn.client.execute(&stmt, &[&rev, &inner.cfg.compaction_batch]).await.map_err(failure)?;
            metrics::counter!(names::BACKEND_COMPACTED_ROWS).increment(n);
            if (n as i64) < inner.cfg.compaction_batch {
                break;
            }
        }
    }
    let mut conn = inner.pool.get(Instant::now() + inner.timeout).await?;
    let stmt = conn.stmt(DONE).await.map_err(failure)?;
    conn.client.execute(&stmt, &[&rev]).await.map_err(failure)?;
    Ok(())
}
