//! The change feed: etcd's Watch over the history table.
//!
//! One notifier per process knows the head's revision: it LISTENs for the
//! notification every write transaction sends at commit (`backend.notify`), and
//! reads the head every `backend.poll_interval_ms` as well (a notification can be
//! lost with its connection; CockroachDB has none). Each watch stream is a task
//! that, whenever the head moves, reads every watcher's rows from its next revision
//! to the head — in one statement with the head and compact revisions, so one
//! snapshot — and sends them in revision order, a revision never split. Revisions
//! commit in order (writes serialize on the head row), so a snapshot that shows
//! head N shows every row up to N: the feed never skips or reorders a revision.
//!
//! A watcher behind the compact revision gets etcd's compacted cancel. A progress
//! request is answered once every watcher on the stream has been sent everything
//! up to a head read after the request arrived (so the answer is never older than
//! the store when asked, nor newer than what the stream was sent).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_postgres::types::ToSql;
use tokio_postgres::AsyncMessage;

use super::tls::DbTls;
use tonic::Status;

use super::kv::{header, span, Span};
use super::pool::{failure, Pool};
use super::SqlInner;
use crate::metrics::names;
use crate::pb::etcdserverpb::{
    watch_create_request::FilterType, watch_request, WatchCreateRequest, WatchRequest, WatchResponse,
};
use crate::pb::mvccpb::{event::EventType, Event, KeyValue};
use crate::shutdown::Tasks;
use crate::upstream::classify::UpstreamError;

/// The channel write transactions notify on commit (payload: the new revision).
pub const CHANNEL: &str = "etcdmux_revision";

/// The head as the notifier last read it: (revision, compact revision).
pub type HeadRx = watch::Receiver<(i64, i64)>;

const HEAD: &str = "SELECT revision, compact_revision FROM etcdmux_head WHERE id = 1";

/// Starts the notifier; its receiver wakes feeds when the head moves.
pub fn start_notifier(pool: Arc<Pool>, poll: Duration, notify: bool, tasks: &Tasks) -> HeadRx {
    let (tx, rx) = watch::channel((0, 0));
    let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
    if notify {
        tasks.spawn_until_shutdown(listen(pool.config().clone(), pool.tls().clone(), wake_tx));
    }
    tasks.spawn_until_shutdown(async move {
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = wake_rx.recv() => {}
            }
            let Ok(mut conn) = pool.get(Instant::now() + poll.max(Duration::from_secs(1))).await else { continue };
            let Ok(stmt) = conn.stmt(HEAD).await else { continue };
            if let Ok(row) = conn.client.query_one(&stmt, &[]).await {
                let head: (i64, i64) = (row.get(0), row.get(1));
                metrics::gauge!(names::BACKEND_REVISION).set(head.0 as f64);
                tx.send_if_modified(|h| std::mem::replace(h, head) != head);
            }
        }
    });
    rx
}

/// Holds a LISTEN connection (reconnecting after a failure) and wakes the notifier
/// on every notification.
async fn listen(cfg: tokio_postgres::Config, tls: DbTls, wake: mpsc::Sender<()>) {
    loop {
        match tls.connect(&cfg).await {
            Ok((client, mut messages)) => {
                let listen_sql = format!("LISTEN {CHANNEL}");
                let listening = client.batch_execute(&listen_sql);
                let mut listening = std::pin::pin!(listening);
                let mut listened = false;
                loop {
                    tokio::select! {
                        r = &mut listening, if !listened => {
                            listened = true;
                            if let Err(e) = r {
                                tracing::warn!(error = %e, "sql backend: LISTEN failed; the change feed polls");
                            }
                        }
                        m = messages.next() => match m {
                            Some(Ok(AsyncMessage::Notification(_))) => { let _ = wake.try_send(()); }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "sql backend: the LISTEN connection broke");
                                break;
                            }
                            None => break,
                        },
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %super::tls::explain(&e), "sql backend: cannot open the LISTEN connection; polling")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

macro_rules! events_sql {
    ($cond:literal) => {
        concat!(
            "WITH h AS (SELECT revision, compact_revision FROM etcdmux_head WHERE id = 1)
             SELECT h.revision, h.compact_revision, e.key, e.create_revision, e.mod_revision, e.version, e.lease,
                    e.value, e.deleted, p.create_revision, p.mod_revision, p.version, p.lease, p.value, p.deleted
             FROM h LEFT JOIN (
               SELECT k.* FROM etcdmux_kv k, h
               WHERE ",
            $cond,
            " AND k.mod_revision >= $3 AND k.mod_revision <= h.revision
               ORDER BY k.mod_revision, k.seq LIMIT $4
             ) e ON true
             LEFT JOIN LATERAL (
               SELECT q.create_revision, q.mod_revision, q.version, q.lease, q.value, q.deleted
               FROM etcdmux_kv q WHERE q.key = e.key AND q.mod_revision < e.mod_revision
               ORDER BY q.mod_revision DESC, q.seq DESC LIMIT 1
             ) p ON true
             ORDER BY e.mod_revision, e.seq"
        )
    };
}

const EVENTS_ONE: &str = events_sql!("k.key = $1 AND $2::BYTEA IS NOT NULL");
const EVENTS_FROM: &str = events_sql!("k.key >= $1 AND $2::BYTEA IS NOT NULL");
const EVENTS_BETWEEN: &str = events_sql!("k.key >= $1 AND k.key < $2");

/// One watcher of a stream.
struct Watcher {
    id: i64,
    key: Bytes,
    range_end: Bytes,
    /// The next revision to send.
    next: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
}

/// Events of one read: the head and compact revisions, the events, whether the
/// read stopped before the head.
struct Batch {
    head: i64,
    compact: i64,
    events: Vec<Event>,
    cut: bool,
}

/// The watcher's events from its next revision on: at most `limit` rows, cut at a
/// revision boundary (a revision larger than `limit` is read whole).
async fn read_events(inner: &SqlInner, w: &Watcher, mut limit: i64) -> Result<Batch, Status> {
    loop {
        let b = read_rows(inner, w, limit).await.map_err(stream_failure)?;
        if b.cut && b.events.is_empty() {
            limit = limit.saturating_mul(4);
            continue;
        }
        return Ok(b);
    }
}

async fn read_rows(inner: &SqlInner, w: &Watcher, limit: i64) -> Result<Batch, RowsError> {
    let mut conn = inner.pool.get(Instant::now() + Duration::from_secs(30)).await.map_err(RowsError::Pool)?;
    let sql = match span(&w.range_end) {
        Span::One => EVENTS_ONE,
        Span::From => EVENTS_FROM,
        Span::Between => EVENTS_BETWEEN,
    };
    let stmt = conn.stmt(sql).await?;
    let (key, end): (&[u8], &[u8]) = (&w.key, &w.range_end);
    let params: [&(dyn ToSql + Sync); 4] = [&key, &end, &w.next, &limit];
    let rows = conn.client.query(&stmt, &params).await?;
    let mut b = Batch { head: 0, compact: 0, events: Vec::with_capacity(rows.len()), cut: false };
    for row in &rows {
        b.head = row.try_get(0)?;
        b.compact = row.try_get(1)?;
        let Some(key) = row.try_get::<_, Option<Vec<u8>>>(2)? else { continue };
        let key = Bytes::from(key);
        let deleted: bool = row.try_get(8)?;
        let value: Vec<u8> = row.try_get(7)?;
        let kv = KeyValue {
            key: key.clone(),
            create_revision: row.try_get(3)?,
            mod_revision: row.try_get(4)?,
            version: row.try_get(5)?,
            lease: row.try_get(6)?,
            value: Bytes::from(value),
        };
        let prev = match row.try_get::<_, Option<bool>>(14)? {
            Some(false) => {
                let value: Vec<u8> = row.try_get(13)?;
                Some(KeyValue {
                    key,
                    create_revision: row.try_get(9)?,
                    mod_revision: row.try_get(10)?,
                    version: row.try_get(11)?,
                    lease: row.try_get(12)?,
                    value: Bytes::from(value),
                })
            }
            _ => None,
        };
        let r#type = if deleted { EventType::Delete } else { EventType::Put } as i32;
        b.events.push(Event { r#type, kv: Some(kv), prev_kv: prev });
    }
    if b.events.len() as i64 >= limit {
        // Never split a revision: the last one may continue past the limit.
        let last = b.events.last().and_then(|e| e.kv.as_ref()).map_or(0, |kv| kv.mod_revision);
        let whole = b.events.iter().position(|e| e.kv.as_ref().is_some_and(|kv| kv.mod_revision == last));
        // Position 0: one revision fills the batch; emptied, it is read again larger.
        b.events.truncate(whole.unwrap_or(0));
        b.cut = true;
    }
    Ok(b)
}

/// Sends `resp`; false when the stream's reader is gone.
async fn send(out: &mpsc::Sender<Result<WatchResponse, Status>>, resp: WatchResponse) -> bool {
    out.send(Ok(resp)).await.is_ok()
}

/// Serves one watch stream until its reader goes away, its deadline passes, or
/// the database fails (the stream then ends with `UNAVAILABLE`; the hub resumes).
pub async fn run(
    inner: Arc<SqlInner>,
    deadline: Option<Instant>,
    mut requests: mpsc::Receiver<WatchRequest>,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
) {
    let mut head_rx = inner.head.clone();
    let mut watchers: Vec<Watcher> = Vec::new();
    let mut next_id = 0i64;
    let mut requests_open = true;
    // A progress request waits for every watcher to reach this revision.
    let mut progress: Option<i64> = None;
    let mut more = false;
    loop {
        if !more {
            let until = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = out.closed() => return,
                _ = until => {
                    let _ = out.send(Err(Status::deadline_exceeded("context deadline exceeded"))).await;
                    return;
                }
                r = head_rx.changed() => if r.is_err() { return },
                req = requests.recv(), if requests_open => match req {
                    None => requests_open = false,
                    Some(req) => {
                        if let Err(s) = request(&inner, req, &mut watchers, &mut next_id, &mut progress, &out).await {
                            let _ = out.send(Err(s)).await;
                            return;
                        }
                    }
                },
            }
        }
        head_rx.borrow_and_update();
        more = false;
        let mut i = 0;
        while i < watchers.len() {
            let limit = inner.cfg.feed_batch;
            let b = match read_events(&inner, &watchers[i], limit).await {
                Ok(b) => b,
                Err(s) => {
                    let _ = out.send(Err(s)).await;
                    return;
                }
            };
            let w = &mut watchers[i];
            if w.next < b.compact {
                let resp = WatchResponse {
                    header: header(0),
                    watch_id: w.id,
                    compact_revision: b.compact,
                    canceled: true,
                    ..Default::default()
                };
                watchers.remove(i);
                if !send(&out, resp).await {
                    return;
                }
                continue;
            }
            let reached = match b.events.last().and_then(|e| e.kv.as_ref()) {
                Some(kv) if b.cut => kv.mod_revision,
                _ => b.head,
            };
            let events: Vec<Event> = b
                .events
                .into_iter()
                .filter(|e| !(w.no_put && e.r#type == EventType::Put as i32))
                .filter(|e| !(w.no_delete && e.r#type == EventType::Delete as i32))
                .map(|mut e| {
                    // etcd's prev_kv: a read at rev - 1, which fails when compacted.
                    let rev = e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                    if !w.prev_kv || rev - 1 < b.compact {
                        e.prev_kv = None;
                    }
                    e
                })
                .collect();
            w.next = w.next.max(reached + 1);
            more |= b.cut;
            if !events.is_empty() {
                let resp = WatchResponse { header: header(b.head), watch_id: w.id, events, ..Default::default() };
                if !send(&out, resp).await {
                    return;
                }
            }
            i += 1;
        }
        if let Some(want) = progress {
            if watchers.iter().all(|w| w.next > want) {
                let rev = watchers.iter().map(|w| w.next - 1).min().unwrap_or(want);
                progress = None;
                let resp = WatchResponse { header: header(rev), watch_id: -1, ..Default::default() };
                if !send(&out, resp).await {
                    return;
                }
            } else {
                more = true;
            }
        }
    }
}

/// The head's revision read now (for a create from now, and progress requests).
async fn fresh_head(inner: &SqlInner) -> Result<(i64, i64), Status> {
    let mut conn = inner.pool.get(Instant::now() + Duration::from_secs(30)).await.map_err(|e| e.into_status())?;
    let stmt = conn.stmt(HEAD).await.map_err(stream_failure)?;
    let row = conn.client.query_one(&stmt, &[]).await.map_err(stream_failure)?;
    Ok((row.get(0), row.get(1)))
}

/// One request on the stream: a create, a cancel, or a progress request.
async fn request(
    inner: &SqlInner,
    req: WatchRequest,
    watchers: &mut Vec<Watcher>,
    next_id: &mut i64,
    progress: &mut Option<i64>,
    out: &mpsc::Sender<Result<WatchResponse, Status>>,
) -> Result<(), Status> {
    match req.request_union {
        Some(watch_request::RequestUnion::CreateRequest(c)) => create(inner, c, watchers, next_id, out).await,
        Some(watch_request::RequestUnion::CancelRequest(c)) => {
            if let Some(i) = watchers.iter().position(|w| w.id == c.watch_id) {
                watchers.remove(i);
                let (head, _) = fresh_head(inner).await?;
                let resp =
                    WatchResponse { header: header(head), watch_id: c.watch_id, canceled: true, ..Default::default() };
                let _ = send(out, resp).await;
            }
            Ok(())
        }
        Some(watch_request::RequestUnion::ProgressRequest(_)) => {
            let (head, _) = fresh_head(inner).await?;
            *progress = Some(progress.map_or(head, |p| p.max(head)));
            Ok(())
        }
        None => Ok(()),
    }
}

async fn create(
    inner: &SqlInner,
    c: WatchCreateRequest,
    watchers: &mut Vec<Watcher>,
    next_id: &mut i64,
    out: &mpsc::Sender<Result<WatchResponse, Status>>,
) -> Result<(), Status> {
    let (head, _) = fresh_head(inner).await?;
    let id = if c.watch_id > 0 {
        c.watch_id
    } else {
        while watchers.iter().any(|w| w.id == *next_id) {
            *next_id += 1;
        }
        *next_id
    };
    *next_id = (*next_id).max(id + 1);
    let has = |f: FilterType| c.filters.contains(&(f as i32));
    watchers.push(Watcher {
        id,
        // etcd watches one key for an empty range_end, every key from `key` on for "\0".
        key: c.key,
        range_end: c.range_end,
        next: if c.start_revision > 0 { c.start_revision } else { head + 1 },
        prev_kv: c.prev_kv,
        no_put: has(FilterType::Noput),
        no_delete: has(FilterType::Nodelete),
    });
    let _ = send(out, WatchResponse { header: header(head), watch_id: id, created: true, ..Default::default() }).await;
    Ok(())
}

/// Why rows could not be read: no connection, or the database failed.
enum RowsError {
    Pool(UpstreamError),
    Db(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for RowsError {
    fn from(e: tokio_postgres::Error) -> Self {
        RowsError::Db(e)
    }
}

/// A failure of a stream, classified as a unary call's would be.
fn stream_failure(e: impl Into<RowsError>) -> Status {
    match e.into() {
        RowsError::Pool(u) => u.into_status(),
        RowsError::Db(e) => failure(e).into_status(),
    }
}
