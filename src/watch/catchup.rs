//! Catch-up: a watcher whose start is older than the ring is served from a
//! temporary upstream watch until it reaches what the ring covers, then handed over.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::Status;

use super::event::HubEvent;
use super::hub::Hub;
use super::watcher::Watcher;
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{watch_request, PutRequest, WatchCreateRequest, WatchRequest, WatchResponse};
use crate::pb::mvccpb::Event;
use crate::upstream::{CallCtx, StreamCtx};

/// Consecutive failed catch-up attempts before the watcher is cancelled.
const CATCH_UP_ATTEMPTS: u32 = 8;

impl Hub {
    /// Serves a watcher older than the ring from a temporary upstream watch, until
    /// it reaches what the ring covers; then hands it over.
    pub(super) async fn catch_up(self: Arc<Self>, proxy: Arc<Proxy>, w: Arc<Watcher>) {
        let _permit = self.catchups.acquire().await;
        let mut next = w.from_rev;
        let mut backoff = Duration::from_millis(self.cfg.reconnect_backoff_ms.max(1));
        let mut failures = 0;
        loop {
            match self.catch_up_once(&proxy, &w, &mut next).await {
                Ok(_) => break,
                Err(s) => {
                    tracing::debug!(error = %s, watch_id = w.id, "catch-up watch broke; resuming");
                    failures += 1;
                    if w.is_canceled() {
                        break;
                    }
                    if failures >= CATCH_UP_ATTEMPTS {
                        // Give up on this watcher alone, with the reason: its client can
                        // re-watch from its last revision.
                        let reason = format!("etcdmux: cannot catch up from etcd: {}", s.message());
                        self.cancel_catching_up(&w, 0, reason);
                        break;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let mut st = self.lock();
        w.sink.catching_up.fetch_sub(1, Ordering::Relaxed);
        // A progress request may have waited for this watcher only.
        self.answer_progress(&mut st);
    }

    /// One catch-up upstream watch from `*next`. Ok(true) when the watcher was handed
    /// over or cancelled.
    pub(super) async fn catch_up_once(&self, proxy: &Proxy, w: &Arc<Watcher>, next: &mut i64) -> Result<bool, Status> {
        let (tx, rx) = mpsc::channel(4);
        let create = WatchCreateRequest {
            key: self.range.key.clone(),
            range_end: self.range.range_end.clone(),
            start_revision: *next,
            prev_kv: w.prev_kv,
            ..Default::default()
        };
        let _ = tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) }).await;
        let mut stream = proxy.backend.watch(&StreamCtx { deadline: None, require_leader: false }, rx).await?;
        // The catch-up must learn when it has seen everything before the ring. etcd
        // 3.4 answers a progress request even before an old watch has caught up, so
        // instead a fence key inside the watched range is written once the watch
        // exists: its event comes after every older event, and carries a revision
        // the ring covers.
        let fence = PutRequest { key: self.layout.fence_key(), ..Default::default() };
        let ctx = CallCtx::from_metadata(&Default::default(), proxy.cfg.default_timeout());
        proxy.backend.put(&ctx, &fence).await.map_err(|e| e.into_status())?;
        loop {
            tokio::select! {
                msg = stream.message() => {
                    let Some(resp) = msg? else { return Err(Status::unavailable("catch-up stream ended")) };
                    if w.canceled.load(Ordering::Relaxed) || w.sink.is_gone() {
                        return Ok(true);
                    }
                    if resp.compact_revision > 0 {
                        self.cancel_catching_up(w, resp.compact_revision, String::new());
                        return Ok(true);
                    }
                    if resp.created {
                        continue;
                    }
                    if resp.canceled {
                        return Err(Status::unavailable(resp.cancel_reason));
                    }
                    if self.catch_up_step(w, next, resp) {
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// Cancels a watcher that is still catching up (so not in the index).
    pub(super) fn cancel_catching_up(&self, w: &Arc<Watcher>, compact_revision: i64, cancel_reason: String) {
        if w.cancel() {
            let st = self.lock();
            w.sink.send_control(WatchResponse {
                header: st.header_at(st.last_rev),
                watch_id: w.id,
                canceled: true,
                compact_revision,
                cancel_reason,
                ..Default::default()
            });
        }
    }

    /// Delivers one catch-up response; true once the watcher is handed over.
    pub(super) fn catch_up_step(&self, w: &Arc<Watcher>, next: &mut i64, resp: WatchResponse) -> bool {
        let events: Vec<HubEvent> =
            resp.events.iter().cloned().filter_map(|e| HubEvent::from_upstream(&self.layout, e)).collect();
        // Through which revision this upstream watch has shown everything: the last
        // event it sent, of any key in the range (the fence included).
        let known_to = resp.events.iter().filter_map(|e| e.kv.as_ref()).map(|kv| kv.mod_revision).max().unwrap_or(0);
        let mut st = self.lock();
        let cov = st.ring.covers_from();
        let mine: Vec<Event> =
            events.iter().filter(|e| e.rev >= *next && e.rev < cov && w.matches(e)).map(|e| w.render(e)).collect();
        if !mine.is_empty() {
            let rev = events.iter().filter(|e| e.rev < cov).map(|e| e.rev).max().unwrap_or(*next);
            if !self.send_replay(&mut st, w, mine, rev) {
                return true;
            }
        }
        if known_to >= *next {
            *next = (known_to + 1).min(cov);
        }
        if known_to >= cov - 1 {
            self.hand_over(&mut st, w, cov);
            return true;
        }
        false
    }
}
