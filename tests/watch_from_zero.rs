//! k8s.io/apiserver's `RunTestWatchFromZero`, reduced to its gRPC calls and checked
//! against etcd itself.
//!
//! The test writes a key three times, compacts at the last write, then watches from
//! the revision of that last write with prev_kv (the apiserver's etcd3 watcher
//! always asks for prev_kv, and watches from `resourceVersion + 1`). etcd fills an
//! event's prev_kv from a range at the revision before the event; that revision is
//! compacted, so etcd sends the event without prev_kv, which the apiserver reports
//! as an error ("etcd event received with PrevKv=nil"). The hub's ring still holds
//! the prev_kv it was given live, and must not show it.
//!
//! The same sequence runs through etcdmux (in front of one etcd) and straight on a
//! second etcd; every answer must be the same, with revisions counted from the
//! first write of each run.

mod common;

use std::time::Duration;

use bytes::Bytes;
use etcdmux::pb::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request, CompactionRequest, PutRequest, WatchCreateRequest,
    WatchRequest, WatchResponse,
};
use etcdmux::pb::mvccpb::KeyValue;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const KEY: &str = "/projects/p/pods/test-ns/foo";

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// One key-value with its revisions relative to the run's first write.
fn kv_line(kv: &KeyValue, base: i64) -> String {
    format!(
        "{}={} create={} mod={} version={}",
        String::from_utf8_lossy(&kv.key),
        String::from_utf8_lossy(&kv.value),
        kv.create_revision - base,
        kv.mod_revision - base,
        kv.version
    )
}

/// A watch response as compared: everything but the header.
fn resp_line(r: &WatchResponse, base: i64) -> String {
    let mut s = format!(
        "created={} canceled={} compact_revision={} reason={:?}",
        r.created,
        r.canceled,
        if r.compact_revision > 0 { r.compact_revision - base } else { 0 },
        r.cancel_reason
    );
    for e in &r.events {
        let kv = e.kv.as_ref().map_or("-".to_string(), |kv| kv_line(kv, base));
        let prev = e.prev_kv.as_ref().map_or("none".to_string(), |kv| kv_line(kv, base));
        s += &format!(" | type={} kv=[{kv}] prev_kv=[{prev}]", e.r#type);
    }
    s
}

struct Watch {
    _tx: mpsc::Sender<WatchRequest>,
    stream: tonic::Streaming<WatchResponse>,
}

async fn watch(url: &str, start_revision: i64, prev_kv: bool) -> Watch {
    let mut client = WatchClient::connect(url.to_string()).await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    let c = WatchCreateRequest { key: b(KEY), start_revision, prev_kv, ..Default::default() };
    tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(c)) }).await.unwrap();
    let stream = client.watch(ReceiverStream::new(rx)).await.unwrap().into_inner();
    Watch { _tx: tx, stream }
}

impl Watch {
    /// The responses up to and including the first with events, or a cancel.
    async fn until_events(&mut self, base: i64) -> Vec<String> {
        self.until(base, |r| r.canceled || !r.events.is_empty()).await
    }

    /// The responses up to and including `created`.
    async fn until_created(&mut self, base: i64) -> Vec<String> {
        self.until(base, |r| r.created || r.canceled).await
    }

    async fn until(&mut self, base: i64, last: impl Fn(&WatchResponse) -> bool) -> Vec<String> {
        let mut got = Vec::new();
        loop {
            let r = match tokio::time::timeout(Duration::from_secs(5), self.stream.message()).await {
                Ok(Ok(Some(r))) => r,
                other => {
                    got.push(format!("stream: {other:?}"));
                    return got;
                }
            };
            if !r.created && !r.canceled && r.events.is_empty() {
                continue; // progress
            }
            got.push(resp_line(&r, base));
            if last(&r) {
                return got;
            }
        }
    }
}

async fn put(kv: &mut KvClient<Channel>, value: &str) -> i64 {
    let r = kv.put(PutRequest { key: b(KEY), value: b(value), ..Default::default() }).await.unwrap().into_inner();
    r.header.unwrap().revision
}

/// The apiserver's sequence against `url`; returns every answer, labelled.
async fn run(url: &str) -> Vec<(&'static str, Vec<String>)> {
    let mut kv = KvClient::connect(url.to_string()).await.unwrap();
    // A watch is created once etcdmux's hub is ready, so the writes below are in its
    // ring (a start before the ring would catch up from etcd, writing a fence key).
    let mut now = watch(url, 0, true).await;
    now.until_created(0).await;
    let r1 = put(&mut kv, "v1").await;
    let base = r1 - 1;
    let r2 = put(&mut kv, "v2").await;
    let r3 = put(&mut kv, "v3").await;
    let mut out = Vec::new();

    // Every write seen by a watch (through etcdmux: the hub has dispatched them).
    let mut all = watch(url, r1, true).await;
    // (Events one per line: how responses group revisions may differ here.)
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains(&format!("mod={}", r3 - base))) {
        let got = all.until_events(base).await;
        assert!(got.last().is_some_and(|l| l.contains("type=")), "{url}: watch from r1 ended: {got:?}");
        seen.extend(got.iter().flat_map(|l| l.split(" | ").skip(1)).map(str::to_string));
    }
    out.push(("watch from r1, prev_kv, before compaction", seen));

    kv.compact(CompactionRequest { revision: r3, physical: true }).await.unwrap();

    // The apiserver's tooOldWatcher: from the compact revision itself, with prev_kv.
    out.push(("watch from the compact revision, prev_kv", watch(url, r3, true).await.until_events(base).await));
    out.push(("watch from the compact revision, no prev_kv", watch(url, r3, false).await.until_events(base).await));

    // After the compact revision prev_kv is there again.
    let mut after = watch(url, r3 + 1, true).await;
    let mut got = after.until_created(base).await;
    put(&mut kv, "v4").await;
    got.extend(after.until_events(base).await);
    out.push(("watch from after the compact revision, prev_kv, then a write", got));

    // Last: through etcdmux this one catches up from etcd, which writes a fence key.
    out.push(("watch from before the compact revision", watch(url, r2, true).await.until_events(base).await));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_the_compact_revision_matches_etcd() {
    common::init_tracing();
    let etcd_mux = common::Etcd::start();
    let etcd_direct = common::Etcd::start();
    let mux = common::start_mux(&etcd_mux, common::MILO_TOML).await;
    let through = run(&mux.url).await;
    let direct = run(&etcd_direct.client_url).await;
    for ((what, m), (_, d)) in through.iter().zip(&direct) {
        assert_eq!(m, d, "{what}: etcdmux (left) vs etcd (right)");
    }
    // What etcd answers, spelled out: the first revision of a watch from the compact
    // revision comes without prev_kv; later ones have it.
    let at_compact = &direct[1].1;
    assert!(at_compact.last().unwrap().contains("prev_kv=[none]"), "{at_compact:?}");
    let later = &direct[3].1;
    assert!(later.last().unwrap().contains("prev_kv=[/projects"), "{later:?}");
}
