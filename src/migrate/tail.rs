//! The tail: after the snapshot, every later change of the source, in order, from
//! one watch over the migrated ranges (`SourceMap::watch`), applied in batches that
//! advance the checkpoint.
//!
//! Knowing "everything up to revision R is applied" needs a revision the watch
//! surely delivered: etcd before 3.4.31 / 3.5.13 may answer a progress request
//! ahead of the events it still owes, so the tail writes a **fence** key into the
//! source (`<meta>/migrate/<id>/fence`, inside the watched range, never a tenant
//! key) and waits for its event. `--until-caught-up` stops at the first fence;
//! cutover's fence also marks the source's last write, after which any write to the
//! old layout is refused (a lease expiring is not a write: its deletes are applied).
//!
//! A watch start the source has compacted away fails clearly
//! ([`MigrateError::Compacted`]); no change is ever skipped silently.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::{sleep_until, Instant};
use tokio_stream::wrappers::ReceiverStream;

use super::apply::{Item, Pos, Writer};
use super::error::{MigrateError, Result};
use super::progress::Progress;
use super::rate::RateLimit;
use super::source::{Class, SourceMap};
use crate::pb::etcdserverpb::{watch_request, PutRequest, WatchCreateRequest, WatchRequest, WatchResponse};
use crate::pb::mvccpb::event::EventType;
use crate::shutdown::Tasks;

/// How long the source's watch may keep failing before the tail gives up.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);

/// When the tail ends.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// At a signal (SIGINT, SIGTERM).
    Stopped,
    /// Once a fence written at the start has been seen.
    CaughtUp,
    /// Cutover: once the fence at `fence_rev` has been seen and the source then
    /// stayed free of writes for `quiet`.
    Drained { fence_rev: i64, quiet: Duration },
}

#[derive(Debug, Clone, Copy)]
pub struct TailOptions {
    pub fence_interval: Duration,
    pub lease_sync_interval: Duration,
    pub skip_unmatched: bool,
}

/// How the tail ended: the source revision everything up to is applied.
#[derive(Debug, Clone, Copy)]
pub struct TailEnd {
    pub applied_rev: i64,
}

/// The value of a fence: who wrote it and why, for whoever finds it.
pub async fn write_fence(w: &Writer<'_>, map: &SourceMap, why: &str) -> Result<i64> {
    let value = format!("etcdmux migrate {}: {why} fence", w.store.id);
    let resp = w
        .source
        .put(PutRequest { key: map.fence_key().clone(), value: Bytes::from(value), ..Default::default() })
        .await?;
    Ok(resp.header.map_or(0, |h| h.revision))
}

pub async fn run(
    w: &mut Writer<'_>,
    map: &SourceMap,
    until: Until,
    opts: TailOptions,
    rate: &mut RateLimit,
    progress: &mut Progress,
    tasks: &Tasks,
) -> Result<TailEnd> {
    let mut want = match until {
        Until::CaughtUp => Some(write_fence(w, map, "caught-up").await?),
        Until::Drained { fence_rev, .. } => Some(fence_rev),
        Until::Stopped => None,
    };
    let mut quiet_until: Option<Instant> = None;
    let mut next_fence = Instant::now() + opts.fence_interval;
    let mut next_sync = Instant::now() + opts.lease_sync_interval;
    let mut next_save = Instant::now() + Duration::from_secs(1);
    let mut backoff = Duration::from_millis(100);
    // Since when the source's watch keeps failing: the tail retries for a while, then
    // gives up (the checkpoint keeps the position for the next run).
    let mut failing_since: Option<Instant> = None;
    loop {
        if let Some(since) = failing_since {
            if since.elapsed() > GIVE_UP_AFTER {
                w.commit_position().await?;
                return Err(MigrateError::Etcd {
                    side: w.source.side,
                    url: w.source.url.clone(),
                    err: crate::upstream::classify::UpstreamError::new(tonic::Status::unavailable(format!(
                        "the watch kept failing for {} s; run copy again to resume",
                        GIVE_UP_AFTER.as_secs()
                    ))),
                });
            }
        }
        let start = if w.cp.partial_rev != 0 { w.cp.partial_rev } else { w.cp.applied_rev + 1 };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let create = WatchCreateRequest {
            key: map.watch.key.clone(),
            range_end: map.watch.range_end.clone(),
            start_revision: start,
            // Only cutover tells a lease's expiry from a write, by the deleted key's lease.
            prev_kv: matches!(until, Until::Drained { .. }),
            ..Default::default()
        };
        let req = WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) };
        if tx.send(req).await.is_err() {
            return Err(MigrateError::Internal("the watch request channel closed".to_string()));
        }
        let mut stream = match w.source.watch_client().watch(ReceiverStream::new(rx)).await {
            Ok(s) => s.into_inner(),
            Err(status) => {
                let e = w.source.err(status.into());
                failing_since.get_or_insert_with(Instant::now);
                eprintln!("tail: opening the watch failed ({e}); retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            let quiet_deadline = quiet_until.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = tasks.cancelled() => {
                    w.commit_position().await?;
                    return match until {
                        Until::Stopped => Ok(TailEnd { applied_rev: w.cp.applied_rev }),
                        _ => Err(MigrateError::Interrupted(format!(
                            "tail at source revision {}; run again to resume", w.cp.applied_rev))),
                    };
                }
                _ = sleep_until(quiet_deadline), if quiet_until.is_some() => {
                    w.commit_position().await?;
                    return Ok(TailEnd { applied_rev: w.cp.applied_rev });
                }
                _ = sleep_until(next_fence), if matches!(until, Until::Stopped) => {
                    next_fence = Instant::now() + opts.fence_interval;
                    // A failed fence only delays the checkpoint: the next one comes.
                    match write_fence(w, map, "progress").await {
                        Ok(rev) => want = Some(rev),
                        Err(e @ MigrateError::Etcd { .. }) => eprintln!("tail: writing a progress fence failed: {e}"),
                        Err(e) => return Err(e),
                    }
                }
                _ = sleep_until(next_sync) => {
                    next_sync = Instant::now() + opts.lease_sync_interval;
                    match w.leases.sync(w.source, w.target).await {
                        Err(e @ MigrateError::Etcd { .. }) => eprintln!("tail: keeping leases alive failed: {e}"),
                        other => other?,
                    }
                }
                _ = sleep_until(next_save), if w.is_dirty() => {
                    next_save = Instant::now() + Duration::from_secs(1);
                    w.commit_position().await?;
                }
                msg = stream.message() => {
                    let resp = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => {
                            failing_since.get_or_insert_with(Instant::now);
                            break;
                        }
                        Err(status) => {
                            failing_since.get_or_insert_with(Instant::now);
                            eprintln!("tail: the watch broke ({}); resuming", w.source.err(status.into()));
                            break;
                        }
                    };
                    backoff = Duration::from_millis(100);
                    failing_since = None;
                    if resp.compact_revision != 0 {
                        return Err(MigrateError::Compacted {
                            side: w.source.side,
                            needed: start,
                            detail: format!(" (it is compacted at {})", resp.compact_revision),
                        });
                    }
                    if resp.canceled {
                        return Err(MigrateError::Internal(format!("the source cancelled the watch: {}", resp.cancel_reason)));
                    }
                    let seen = apply_response(w, map, until, opts, resp, progress).await?;
                    rate.take(seen.events, seen.bytes).await;
                    if let (Some(f), Some(goal)) = (seen.fence, want) {
                        if f >= goal {
                            match until {
                                Until::CaughtUp => {
                                    w.commit_position().await?;
                                    return Ok(TailEnd { applied_rev: w.cp.applied_rev });
                                }
                                Until::Drained { quiet, .. } if quiet_until.is_none() => {
                                    w.commit_position().await?;
                                    quiet_until = Some(Instant::now() + quiet);
                                }
                                _ => {
                                    want = None;
                                    w.commit_position().await?;
                                }
                            }
                        }
                    }
                    progress.note(&format!("source revision {} applied", w.cp.applied_rev));
                }
            }
        }
        // The stream ended or broke: what was received is committed; resume after it.
        w.commit_position().await?;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// What one watch response held.
struct Seen {
    events: u64,
    bytes: u64,
    /// The revision of the fence event in it, if any.
    fence: Option<i64>,
}

/// Applies one watch response's events (whole revisions) and commits them.
async fn apply_response(
    w: &mut Writer<'_>,
    map: &SourceMap,
    until: Until,
    opts: TailOptions,
    resp: WatchResponse,
    progress: &mut Progress,
) -> Result<Seen> {
    let mut seen = Seen { events: 0, bytes: 0, fence: None };
    let mut rev = 0;
    let mut index = 0u64;
    for ev in resp.events {
        let Some(kv) = ev.kv else { continue };
        if kv.mod_revision != rev {
            rev = kv.mod_revision;
            index = 0;
        } else {
            index += 1;
        }
        let applied = rev <= w.cp.applied_rev || (rev == w.cp.partial_rev && index < w.cp.partial_events);
        if applied {
            continue;
        }
        let delete = ev.r#type == EventType::Delete as i32;
        match map.classify(&kv.key) {
            Class::Fence => seen.fence = Some(rev),
            Class::Tenant(tenant, key) => {
                if let Until::Drained { fence_rev, .. } = until {
                    let expiry = delete && ev.prev_kv.as_ref().is_some_and(|p| p.lease != 0);
                    if rev > fence_rev && !expiry {
                        return Err(MigrateError::Refused(format!(
                            "the old layout was written after the cutover fence (revision {fence_rev}): key {:?} at \
                             revision {rev}. Stop every writer of the source (scale the apiservers down) and run \
                             cutover again",
                            String::from_utf8_lossy(&kv.key)
                        )));
                    }
                }
                seen.events += 1;
                seen.bytes += (kv.key.len() + kv.value.len()) as u64;
                let item = if delete {
                    Item::Delete { tenant, key }
                } else {
                    Item::Put { tenant, key, value: kv.value, lease: kv.lease }
                };
                let moved = w.push(item, Pos::Tail { rev, event: index }).await?;
                progress.add(moved.items, moved.bytes);
            }
            Class::Unmatched(why) if map.in_ranges(&kv.key) && !opts.skip_unmatched => {
                return Err(MigrateError::Refused(format!(
                    "source key {:?} (revision {rev}) {why}; it would not be migrated. Pass --skip-unmatched to \
                     leave such keys behind",
                    String::from_utf8_lossy(&kv.key)
                )));
            }
            _ => {}
        }
    }
    // Only a response that moved something advances the checkpoint: other keys in
    // the watched range (the checkpoint itself, when source and target are one
    // etcd) would otherwise keep rewriting it.
    if rev != 0 && (seen.events > 0 || seen.fence.is_some()) {
        w.complete_through(rev);
    }
    let moved = w.flush().await?;
    progress.add(moved.items, moved.bytes);
    Ok(seen)
}
