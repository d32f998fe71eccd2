//! apiload's cachers: the paged list of one (project, resource) and its watch, on a
//! stream of its own or on a stream shared by every watch of a client (etcd's Go
//! client puts watches with equal context metadata on one stream); and the delivery
//! bookkeeping every event goes through.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcdmux::pb::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request, RangeRequest, WatchCreateRequest,
    WatchProgressRequest, WatchRequest, WatchResponse,
};
use etcdmux_loadtest::{b, prefix_end, Error};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::prefix;

/// How long a watch may take to be created.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Per (project, resource) delivery bookkeeping, shared with the watch readers.
#[derive(Default)]
pub struct Delivery {
    pub revisions: HashMap<(usize, usize), Vec<i64>>,
    pub latencies: Vec<Duration>,
    /// (when the write was sent, since `t0`; its delivery latency) per event.
    pub timed: Vec<(Duration, Duration)>,
}

/// Shared by the watch readers.
pub struct Shared {
    pub t0: Instant,
    pub delivery: Mutex<Delivery>,
    pub progress: AtomicU64,
}

impl Shared {
    pub fn new() -> Shared {
        Shared { t0: Instant::now(), delivery: Mutex::default(), progress: AtomicU64::new(0) }
    }

    /// Counts a response of watch (p, r): its events (each write's value holds the
    /// time it was sent), or a progress notification.
    fn record(&self, p: usize, r: usize, w: &WatchResponse) {
        if w.events.is_empty() {
            if !w.created {
                self.progress.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let now = self.t0.elapsed();
        let mut d = self.delivery.lock().unwrap_or_else(|e| e.into_inner());
        for e in &w.events {
            let Some(kv) = &e.kv else { continue };
            d.revisions.entry((p, r)).or_default().push(kv.mod_revision);
            let sent = std::str::from_utf8(&kv.value)
                .ok()
                .and_then(|v| v.strip_prefix("t="))
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(sent) = sent {
                let (sent, took) = (Duration::from_nanos(sent), now.saturating_sub(Duration::from_nanos(sent)));
                d.latencies.push(took);
                d.timed.push((sent, took));
            }
        }
    }
}

/// Lists (p, r) page by page as the apiserver's cacher does (limit 500, the next
/// page from the last key + "\0", later pages at the first page's revision).
/// Returns the list's revision, how long it took and the keys it saw.
pub async fn list(ch: Channel, p: usize, r: usize) -> Result<(i64, Duration, Vec<(Bytes, i64)>), Error> {
    let mut kv = KvClient::new(ch);
    let (mut from, end) = (b(&prefix(p, r)), prefix_end(&prefix(p, r)));
    let started = Instant::now();
    let mut rev = 0;
    let mut seen = Vec::new();
    loop {
        let page = kv
            .range(RangeRequest {
                key: from.clone(),
                range_end: end.clone(),
                limit: 500,
                revision: rev,
                ..Default::default()
            })
            .await?
            .into_inner();
        if rev == 0 {
            rev = page.header.map_or(0, |h| h.revision);
        }
        seen.extend(page.kvs.iter().map(|kv| (kv.key.clone(), kv.mod_revision)));
        match (page.more, page.kvs.last()) {
            (true, Some(last)) => from = Bytes::from([&last.key[..], b"\0"].concat()),
            _ => break,
        }
    }
    Ok((rev, started.elapsed(), seen))
}

/// The apiserver's watch of (p, r) from `rev`: prev_kv and progress notifications.
fn create_request(p: usize, r: usize, rev: i64) -> WatchRequest {
    let create = WatchCreateRequest {
        key: b(&prefix(p, r)),
        range_end: prefix_end(&prefix(p, r)),
        start_revision: rev,
        prev_kv: true,
        progress_notify: true,
        ..Default::default()
    };
    WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) }
}

/// One client watch stream: its request sender and the task reading its responses.
pub struct Stream {
    tx: mpsc::Sender<WatchRequest>,
    reader: JoinHandle<()>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Stream {
    /// Asks for a progress notification, as the apiserver's consistent reads do; skipped
    /// when the stream's queue is full.
    pub fn progress(&self) {
        let req =
            WatchRequest { request_union: Some(watch_request::RequestUnion::ProgressRequest(WatchProgressRequest {})) };
        let _ = self.tx.try_send(req);
    }

    /// Opens a stream on `ch` whose responses go to `on_response`. The call is not
    /// awaited before the first create is queued: etcd sends the response headers
    /// with its first answer.
    fn open(ch: Channel, queue: usize, mut on_response: impl FnMut(WatchResponse) + Send + 'static) -> Stream {
        let (tx, rx) = mpsc::channel(queue);
        let reader = tokio::spawn(async move {
            let Ok(resp) = WatchClient::new(ch).watch(ReceiverStream::new(rx)).await else { return };
            let mut s = resp.into_inner();
            while let Ok(Some(w)) = s.message().await {
                on_response(w);
            }
        });
        Stream { tx, reader }
    }
}

/// A stream of its own for the watch of (p, r) from `rev`, once etcd created it
/// (Milo's apiserver: one stream per storage).
pub async fn own_stream(ch: Channel, p: usize, r: usize, rev: i64, shared: Arc<Shared>) -> Result<Stream, Error> {
    let (created_tx, created_rx) = oneshot::channel();
    let mut created_tx = Some(created_tx);
    let stream = Stream::open(ch, 16, move |w| {
        if w.created {
            if let Some(c) = created_tx.take() {
                let _ = c.send(());
            }
        }
        shared.record(p, r, &w);
    });
    stream.tx.send(create_request(p, r, rev)).await?;
    match tokio::time::timeout(CREATE_TIMEOUT, created_rx).await {
        Ok(Ok(())) => Ok(stream),
        Ok(Err(_)) => Err(format!("watch on {} ended before it was created", prefix(p, r)).into()),
        Err(_) => Err(format!("watch on {} not created within 60 s", prefix(p, r)).into()),
    }
}

/// Creates waiting for their `created` answer, oldest first.
type Pending = Arc<Mutex<VecDeque<((usize, usize), oneshot::Sender<Result<(), String>>)>>>;

/// One stream carrying every watch of a client, as etcd's Go client keeps them: a
/// create is sent once the one before it was created (the Go client sends them one
/// at a time), and each answer goes to its watch by watch id.
pub struct SharedStream {
    pub stream: Stream,
    pending: Pending,
    /// Held from a create's send to its answer.
    creating: tokio::sync::Mutex<()>,
}

impl SharedStream {
    pub fn open(ch: Channel, shared: Arc<Shared>) -> SharedStream {
        let pending: Pending = Arc::default();
        let waiting = pending.clone();
        let mut ids: HashMap<i64, (usize, usize)> = HashMap::new();
        let stream = Stream::open(ch, 1024, move |w| {
            if w.created {
                let next = waiting.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                if let Some(((p, r), done)) = next {
                    if w.canceled {
                        let _ = done.send(Err(format!("watch on {} refused: {}", prefix(p, r), w.cancel_reason)));
                    } else {
                        ids.insert(w.watch_id, (p, r));
                        let _ = done.send(Ok(()));
                    }
                }
                return;
            }
            match ids.get(&w.watch_id) {
                Some(&(p, r)) => shared.record(p, r, &w),
                // A progress notification for the whole stream.
                None if w.events.is_empty() => {
                    shared.progress.fetch_add(1, Ordering::Relaxed);
                }
                None => {}
            }
        });
        SharedStream { stream, pending, creating: tokio::sync::Mutex::new(()) }
    }

    /// Adds the watch of (p, r) from `rev`; returns once etcd created it.
    pub async fn create(&self, p: usize, r: usize, rev: i64) -> Result<(), Error> {
        let _turn = self.creating.lock().await;
        let (done_tx, done_rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).push_back(((p, r), done_tx));
        self.stream.tx.send(create_request(p, r, rev)).await?;
        match tokio::time::timeout(CREATE_TIMEOUT, done_rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(refused))) => Err(refused.into()),
            Ok(Err(_)) => Err(format!("the stream ended before the watch on {} was created", prefix(p, r)).into()),
            Err(_) => Err(format!("watch on {} not created within 60 s", prefix(p, r)).into()),
        }
    }
}
