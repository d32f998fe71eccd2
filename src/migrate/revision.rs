//! The target's revision at cutover. Copied keys get new revisions, and clients of
//! the apiserver hold resource versions that are *source* revisions. Two rules make
//! every such resource version fail cleanly ("too old", 410, re-list) instead of
//! meaning something else:
//!
//! 1. the target's revision is advanced past the source's last revision (two etcds:
//!    a target behind would take an old resource version for a *future* revision,
//!    and the apiserver would wait on it, then time out);
//! 2. the target is compacted at its revision after cutover, so no read or watch
//!    can start at any revision the old layout's clients know.
//!
//! Advancing costs one write per revision (etcd has no other way online); the copy
//! does most of it before the snapshot, so cutover only closes the gap the tail
//! left. For a very large gap, restoring the target from a snapshot with `etcdutl
//! snapshot restore --bump-revision N --mark-compacted` (recent etcd 3.5 and 3.6) is the offline
//! alternative.

use bytes::Bytes;
use futures::StreamExt;

use super::error::Result;
use super::etcd::Etcd;
use super::progress::Progress;
use crate::pb::etcdserverpb::PutRequest;

/// Writes `key` until the target's revision is above `past`, `concurrency` writes
/// in flight. Returns the target's revision afterwards.
pub async fn advance_past(
    target: &Etcd,
    key: Bytes,
    past: i64,
    concurrency: usize,
    interval: std::time::Duration,
) -> Result<i64> {
    let (mut now, _) = target.status().await?;
    if now > past {
        return Ok(now);
    }
    let gap = (past - now + 1) as u64;
    eprintln!("advancing the target's revision from {now} past the source's {past} ({gap} writes)");
    let mut progress = Progress::new("revision", Some(gap), interval);
    while now <= past {
        let n = (past - now + 1) as usize;
        let writes = futures::stream::iter(0..n)
            .map(|_| target.put(PutRequest { key: key.clone(), ..Default::default() }))
            .buffer_unordered(concurrency);
        let mut writes = std::pin::pin!(writes);
        while let Some(r) = writes.next().await {
            let resp = r?;
            now = now.max(resp.header.map_or(0, |h| h.revision));
            progress.add(1, 0);
        }
    }
    progress.finish();
    Ok(now)
}
