//! Watches of global or passthrough keys: those keys are the same upstream and for
//! every client, so the watch is etcd's own, relayed under the client's watch id.

use std::sync::Arc;

use super::sink::StreamSink;
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{watch_request, WatchCreateRequest, WatchRequest, WatchResponse};
use crate::upstream::call::StreamCtx;
use crate::upstream::classify::{EtcdError, Failure};

/// A watch on global or passthrough keys: those keys are the same upstream and for
/// every client, so the watch is etcd's own, relayed under the client's watch id and
/// resumed after upstream errors from the revision after the last event relayed.
/// (Progress answers on the stream do not wait for it: it is not in the hub.)
pub(super) async fn passthrough(proxy: Arc<Proxy>, sink: Arc<StreamSink>, id: i64, mut create: WatchCreateRequest) {
    let mut created = false;
    let mut backoff = std::time::Duration::from_millis(proxy.cfg.watch.reconnect_backoff_ms.max(1));
    loop {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let req = WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create.clone())) };
        let _ = tx.send(req).await;
        // A relayed watch lives as long as its client's: no deadline.
        let ctx = StreamCtx { deadline: None, require_leader: sink.require_leader };
        let mut stream = match proxy.backend.watch(&ctx, rx).await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                continue;
            }
        };
        loop {
            let mut r = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(s) => {
                    if Failure::of(&s) == Failure::Etcd(EtcdError::NoLeader) && sink.require_leader {
                        sink.end(s);
                        return;
                    }
                    break;
                }
            };
            if r.created {
                if created {
                    continue; // a resumed watch: the client saw its creation already
                }
                created = true;
                if create.start_revision == 0 {
                    // "From now" means from after the creation's revision, also on resume.
                    create.start_revision = r.header.as_ref().map_or(0, |h| h.revision) + 1;
                }
            }
            r.watch_id = id;
            if let Some(last) = r.events.iter().filter_map(|e| e.kv.as_ref()).map(|kv| kv.mod_revision).max() {
                create.start_revision = last + 1;
            }
            let ends = r.canceled;
            if r.created || r.canceled {
                sink.send_control(r);
            } else if r.events.is_empty() {
                // A progress notification: dropped when the stream is full, as etcd does.
                let _ = sink.send_events(r);
            } else if !sink.send_events(r) {
                sink.send_control(WatchResponse {
                    watch_id: id,
                    canceled: true,
                    cancel_reason:
                        "etcdmux: watcher fell behind; re-watch from the revision after the last event received"
                            .to_string(),
                    ..Default::default()
                });
                return;
            }
            if ends {
                return;
            }
        }
        tokio::time::sleep(backoff).await;
    }
}
