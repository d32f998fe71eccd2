//! The key-value store on SQL: reads at a revision, and write transactions that take
//! the next revision.
//!
//! A write transaction locks the head row first (`SELECT … FOR UPDATE`), so writes
//! run one at a time and commit in revision order: a reader that sees revision N in
//! the head sees every row of every revision up to N. It then does what etcd's
//! `applierV3backend` does, in the same order: the compares of the whole txn tree
//! against the state at its start, the checks of the chosen path (puts' leases and
//! `ignore_*` keys, then ranges' revisions), then the operations, every change at
//! revision `head + 1` numbered by `seq` (the order of etcd's events). The head
//! moves only when something changed.
//!
//! A read is one statement that reads the head and the rows together (one
//! snapshot): the revision is checked against the head's current and compact
//! revisions, and the rows are the newest version of each key at or below it.

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::answer::{compare_holds, fetch_limit, range_answer};
use super::pool::Conn;
use crate::pb::etcdserverpb::{
    request_op, response_op, Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use crate::pb::mvccpb::KeyValue;
use crate::upstream::classify::{EtcdError, UpstreamError};

/// A failure inside a store operation: the database's (the transaction is rolled
/// back; some may be run again), or etcd's answer (rolled back, answered as is).
#[derive(Debug)]
pub enum TxError {
    Db(tokio_postgres::Error),
    Answer(UpstreamError),
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Db(e)
    }
}

impl From<UpstreamError> for TxError {
    fn from(e: UpstreamError) -> Self {
        TxError::Answer(e)
    }
}

/// etcd's `ErrGRPCKeyNotFound`: a put with `ignore_value`/`ignore_lease` on no key.
fn key_not_found() -> UpstreamError {
    UpstreamError::new(tonic::Status::invalid_argument("etcdserver: key not found"))
}

/// Which keys a range names, in etcd's convention: one key (`range_end` empty),
/// every key from `key` on (`"\0"`), or `[key, range_end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    One,
    From,
    Between,
}

pub fn span(range_end: &[u8]) -> Span {
    match range_end {
        [] => Span::One,
        [0] => Span::From,
        _ => Span::Between,
    }
}

/// The newest version of every key of the range at `$3` (0: the head's revision),
/// live ones only, in key order, at most `$4` (NULL: all), each with the total;
/// and the head's revisions. One statement: one snapshot.
macro_rules! read_sql {
    ($cond:literal) => {
        concat!(
            "WITH h AS (SELECT revision, compact_revision FROM etcdmux_head WHERE id = 1),
             live AS (
               SELECT DISTINCT ON (k.key) k.key, k.create_revision, k.mod_revision, k.version, k.lease, k.value,
                      k.deleted
               FROM etcdmux_kv k
               WHERE ",
            $cond,
            " AND k.mod_revision <= (SELECT CASE WHEN $3::BIGINT > 0 THEN $3::BIGINT ELSE revision END FROM h)
               ORDER BY k.key, k.mod_revision DESC, k.seq DESC
             )
             SELECT h.revision, h.compact_revision, l.key, l.create_revision, l.mod_revision, l.version, l.lease,
                    l.value, l.total
             FROM h LEFT JOIN (
               SELECT key, create_revision, mod_revision, version, lease, value, count(*) OVER () AS total
               FROM live WHERE NOT deleted ORDER BY key LIMIT $4
             ) l ON true
             ORDER BY l.key"
        )
    };
}

const READ_ONE: &str = read_sql!("k.key = $1 AND $2::BYTEA IS NOT NULL");
const READ_FROM: &str = read_sql!("k.key >= $1 AND $2::BYTEA IS NOT NULL");
const READ_BETWEEN: &str = read_sql!("k.key >= $1 AND k.key < $2");

/// As [`read_sql`] at the newest revision (`$3` = 0), from `etcdmux_latest`: one
/// row per live key instead of a walk over every version kept.
macro_rules! read_latest_sql {
    ($cond:literal) => {
        concat!(
            "WITH h AS (SELECT revision, compact_revision FROM etcdmux_head WHERE id = 1)
             SELECT h.revision, h.compact_revision, l.key, l.create_revision, l.mod_revision, l.version, l.lease,
                    l.value, l.total
             FROM h LEFT JOIN (
               SELECT k.key, k.create_revision, k.mod_revision, k.version, k.lease, k.value, count(*) OVER () AS total
               FROM etcdmux_latest k WHERE ",
            $cond,
            " AND $3::BIGINT = 0 ORDER BY k.key LIMIT $4
             ) l ON true
             ORDER BY l.key"
        )
    };
}

const LATEST_ONE: &str = read_latest_sql!("k.key = $1 AND $2::BYTEA IS NOT NULL");
const LATEST_FROM: &str = read_latest_sql!("k.key >= $1 AND $2::BYTEA IS NOT NULL");
const LATEST_BETWEEN: &str = read_latest_sql!("k.key >= $1 AND k.key < $2");

/// Deletes the live keys of a range in one statement: gone from `etcdmux_latest`,
/// a tombstone each in the history at revision `$3`, numbered from `seq` `$4` in key
/// order; returns their last versions in key order.
macro_rules! delete_sql {
    ($cond:literal) => {
        concat!(
            "WITH d AS (
               DELETE FROM etcdmux_latest k WHERE ",
            $cond,
            " RETURNING k.key, k.create_revision, k.mod_revision, k.version, k.lease, k.value),
             n AS (SELECT d.*, row_number() OVER (ORDER BY d.key) AS i FROM d),
             t AS (INSERT INTO etcdmux_kv (key, mod_revision, seq, create_revision, version, lease, value, deleted)
                   SELECT n.key, $3::BIGINT, $4::INT + (n.i - 1)::INT, 0, 0, 0, ''::BYTEA, true FROM n)
             SELECT key, create_revision, mod_revision, version, lease, value FROM n ORDER BY key"
        )
    };
}

const DELETE_ONE: &str = delete_sql!("k.key = $1 AND $2::BYTEA IS NOT NULL");
const DELETE_FROM: &str = delete_sql!("k.key >= $1 AND $2::BYTEA IS NOT NULL");
const DELETE_BETWEEN: &str = delete_sql!("k.key >= $1 AND k.key < $2");
/// As the deletes above, for the keys whose newest version is attached to lease `$1`
/// (`$2` unused); only the keys are returned.
const DELETE_LEASED: &str =
    "WITH d AS (DELETE FROM etcdmux_latest WHERE lease = $1 AND $2::BYTEA IS NOT NULL RETURNING key),
       n AS (SELECT d.key, row_number() OVER (ORDER BY d.key) AS i FROM d),
       t AS (INSERT INTO etcdmux_kv (key, mod_revision, seq, create_revision, version, lease, value, deleted)
             SELECT n.key, $3::BIGINT, $4::INT + (n.i - 1)::INT, 0, 0, 0, ''::BYTEA, true FROM n)
     SELECT key, 0::BIGINT, 0::BIGINT, 0::BIGINT, 0::BIGINT, ''::BYTEA FROM n ORDER BY key";

/// The rows of one read: the head's revision and compact revision, the live keys
/// and their total.
pub struct Read {
    pub head: i64,
    pub compact: i64,
    pub kvs: Vec<KeyValue>,
    pub count: i64,
}

fn kv_of(row: &Row, at: usize) -> Result<Option<KeyValue>, tokio_postgres::Error> {
    let key: Option<Vec<u8>> = row.try_get(at)?;
    let Some(key) = key else { return Ok(None) };
    let value: Vec<u8> = row.try_get(at + 5)?;
    Ok(Some(KeyValue {
        key: Bytes::from(key),
        create_revision: row.try_get(at + 1)?,
        mod_revision: row.try_get(at + 2)?,
        version: row.try_get(at + 3)?,
        lease: row.try_get(at + 4)?,
        value: Bytes::from(value),
    }))
}

/// Reads the live keys of `[key, range_end)` at `rev` (0: the newest).
pub async fn read(
    conn: &mut Conn,
    key: &[u8],
    range_end: &[u8],
    rev: i64,
    limit: Option<i64>,
) -> Result<Read, tokio_postgres::Error> {
    let sql = match (span(range_end), rev) {
        (Span::One, 0) => LATEST_ONE,
        (Span::From, 0) => LATEST_FROM,
        (Span::Between, 0) => LATEST_BETWEEN,
        (Span::One, _) => READ_ONE,
        (Span::From, _) => READ_FROM,
        (Span::Between, _) => READ_BETWEEN,
    };
    let stmt = conn.stmt(sql).await?;
    let params: [&(dyn ToSql + Sync); 4] = [&key, &range_end, &rev, &limit];
    let rows = conn.client.query(&stmt, &params).await?;
    let mut out = Read { head: 0, compact: 0, kvs: Vec::with_capacity(rows.len()), count: 0 };
    for row in &rows {
        out.head = row.try_get(0)?;
        out.compact = row.try_get(1)?;
        if let Some(kv) = kv_of(row, 2)? {
            out.count = row.try_get(8)?;
            out.kvs.push(kv);
        }
    }
    Ok(out)
}

/// A header with the store's revision (cluster and member ids are filled by the
/// service that answers, as etcd's server fills them).
pub fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader { revision, ..Default::default() })
}

/// A range outside a transaction: etcd's checks of the revision, then its answer.
pub async fn range(conn: &mut Conn, req: &RangeRequest) -> Result<RangeResponse, TxError> {
    if req.range_end.as_ref() != [0u8] && !req.range_end.is_empty() && req.range_end <= req.key {
        // An empty interval: etcd answers no keys at its current revision.
        let r = read(conn, &req.key, &[], 0, Some(0)).await?;
        check_revision(req.revision, r.head, r.compact)?;
        return Ok(RangeResponse { header: header(r.head), ..Default::default() });
    }
    let r = read(conn, &req.key, &req.range_end, req.revision, fetch_limit(req)).await?;
    check_revision(req.revision, r.head, r.compact)?;
    let mut resp = range_answer(req, r.kvs, r.count);
    resp.header = header(r.head);
    Ok(resp)
}

/// etcd's mvcc checks of a read revision against the current and compact revisions.
fn check_revision(rev: i64, head: i64, compact: i64) -> Result<(), UpstreamError> {
    if rev > head {
        return Err(UpstreamError::answered(EtcdError::FutureRevision));
    }
    if rev > 0 && rev < compact {
        return Err(UpstreamError::answered(EtcdError::Compacted));
    }
    Ok(())
}

const LOCK_HEAD: &str = "SELECT revision, compact_revision FROM etcdmux_head WHERE id = 1 FOR UPDATE";
const HEAD: &str = "SELECT revision, compact_revision FROM etcdmux_head WHERE id = 1";
const MOVE_HEAD: &str = "UPDATE etcdmux_head SET revision = $1 WHERE id = 1";
/// A put: its history row, and the key's newest version replaced.
const INSERT: &str = "WITH h AS (
       INSERT INTO etcdmux_kv (key, mod_revision, seq, create_revision, version, lease, value, deleted)
       VALUES ($1, $2, $3, $4, $5, $6, $7, false))
     INSERT INTO etcdmux_latest (key, create_revision, mod_revision, version, lease, value)
     VALUES ($1, $4, $2, $5, $6, $7)
     ON CONFLICT (key) DO UPDATE SET create_revision = excluded.create_revision,
       mod_revision = excluded.mod_revision, version = excluded.version, lease = excluded.lease,
       value = excluded.value";
const LEASE_EXISTS: &str = "SELECT 1 FROM etcdmux_lease WHERE id = $1";

/// One write transaction: the head locked at `begin`, changes so far.
pub struct Tx<'c> {
    pub conn: &'c mut Conn,
    pub begin: i64,
    pub compact: i64,
    /// Changes made (the next change's `seq`).
    pub changes: i32,
}

impl<'c> Tx<'c> {
    /// Locks the head: from here on this transaction is the only writer.
    pub async fn start(conn: &'c mut Conn) -> Result<Tx<'c>, tokio_postgres::Error> {
        let stmt = conn.stmt(LOCK_HEAD).await?;
        let row = conn.client.query_one(&stmt, &[]).await?;
        Ok(Tx { begin: row.try_get(0)?, compact: row.try_get(1)?, conn, changes: 0 })
    }

    /// A read-only view at the head's revision (inside a snapshot transaction).
    pub async fn snapshot(conn: &'c mut Conn) -> Result<Tx<'c>, tokio_postgres::Error> {
        let stmt = conn.stmt(HEAD).await?;
        let row = conn.client.query_one(&stmt, &[]).await?;
        Ok(Tx { begin: row.try_get(0)?, compact: row.try_get(1)?, conn, changes: 0 })
    }

    /// The revision reads see now, and the one changes are written at.
    pub fn rev(&self) -> i64 {
        if self.changes > 0 {
            self.begin + 1
        } else {
            self.begin
        }
    }

    /// Moves the head if anything changed; the revision the transaction ends at.
    pub async fn finish(&mut self) -> Result<i64, tokio_postgres::Error> {
        if self.changes > 0 {
            let stmt = self.conn.stmt(MOVE_HEAD).await?;
            self.conn.client.execute(&stmt, &[&(self.begin + 1)]).await?;
        }
        Ok(self.rev())
    }

    /// The live keys of a range as this transaction sees them (its own changes too:
    /// the newest versions are this transaction's).
    async fn live(&mut self, key: &[u8], range_end: &[u8]) -> Result<Vec<KeyValue>, tokio_postgres::Error> {
        if span(range_end) == Span::Between && range_end <= key {
            return Ok(Vec::new());
        }
        Ok(read(self.conn, key, range_end, 0, None).await?.kvs)
    }

    async fn lease_exists(&mut self, id: i64) -> Result<bool, tokio_postgres::Error> {
        let stmt = self.conn.stmt(LEASE_EXISTS).await?;
        Ok(self.conn.client.query_opt(&stmt, &[&id]).await?.is_some())
    }

    /// Writes one put at the transaction's revision.
    async fn change(&mut self, kv: &KeyValue) -> Result<(), tokio_postgres::Error> {
        let rev = self.begin + 1;
        let seq = self.changes;
        self.changes += 1;
        let stmt = self.conn.stmt(INSERT).await?;
        let (key, value): (&[u8], &[u8]) = (&kv.key, &kv.value);
        let params: [&(dyn ToSql + Sync); 7] = [&key, &rev, &seq, &kv.create_revision, &kv.version, &kv.lease, &value];
        self.conn.client.execute(&stmt, &params).await?;
        Ok(())
    }

    /// Runs one of the delete statements (one round trip, however many keys) at the
    /// transaction's revision; the deleted keys' last versions, in key order.
    async fn delete_with(
        &mut self,
        sql: &'static str,
        a: &(dyn ToSql + Sync),
        b: &(dyn ToSql + Sync),
    ) -> Result<Vec<KeyValue>, tokio_postgres::Error> {
        let rev = self.begin + 1;
        let seq = self.changes;
        let stmt = self.conn.stmt(sql).await?;
        let rows = self.conn.client.query(&stmt, &[a, b, &rev, &seq]).await?;
        let gone = rows.iter().filter_map(|r| kv_of(r, 0).transpose()).collect::<Result<Vec<_>, _>>()?;
        self.changes += i32::try_from(gone.len()).unwrap_or(i32::MAX);
        Ok(gone)
    }

    /// Deletes every key attached to lease `id` (its newest version's lease), in key
    /// order, at the transaction's revision; how many.
    pub async fn delete_leased(&mut self, id: i64) -> Result<usize, tokio_postgres::Error> {
        let none: &[u8] = &[];
        Ok(self.delete_with(DELETE_LEASED, &id, &none).await?.len())
    }

    /// etcd's `Put`: the lease must exist; `ignore_*` needs the key.
    pub async fn put(&mut self, req: &PutRequest, checked: bool) -> Result<PutResponse, TxError> {
        if !checked && req.lease != 0 && !self.lease_exists(req.lease).await? {
            return Err(UpstreamError::answered(EtcdError::LeaseNotFound).into());
        }
        let prev = self.live(&req.key, &[]).await?.into_iter().next();
        if (req.ignore_value || req.ignore_lease) && prev.is_none() {
            return Err(key_not_found().into());
        }
        let rev = self.begin + 1;
        let kv = KeyValue {
            key: req.key.clone(),
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease: match (&prev, req.ignore_lease) {
                (Some(p), true) => p.lease,
                _ => req.lease,
            },
            value: match (&prev, req.ignore_value) {
                (Some(p), true) => p.value.clone(),
                _ => req.value.clone(),
            },
        };
        self.change(&kv).await?;
        Ok(PutResponse { header: header(rev), prev_kv: prev.filter(|_| req.prev_kv) })
    }

    /// etcd's `DeleteRange`: a tombstone for every live key of the range, in one
    /// statement.
    pub async fn delete(&mut self, req: &DeleteRangeRequest) -> Result<DeleteRangeResponse, TxError> {
        let live = if span(&req.range_end) == Span::Between && req.range_end <= req.key {
            Vec::new()
        } else {
            let sql = match span(&req.range_end) {
                Span::One => DELETE_ONE,
                Span::From => DELETE_FROM,
                Span::Between => DELETE_BETWEEN,
            };
            let (key, end): (&[u8], &[u8]) = (&req.key, &req.range_end);
            self.delete_with(sql, &key, &end).await?
        };
        let deleted = live.len() as i64;
        Ok(DeleteRangeResponse {
            header: header(self.rev()),
            deleted,
            prev_kvs: if req.prev_kv { live } else { Vec::new() },
        })
    }

    /// A range inside the transaction: at its revision, its own changes included.
    async fn range(&mut self, req: &RangeRequest) -> Result<RangeResponse, TxError> {
        let cur = self.rev();
        let rev = if req.revision <= 0 { cur } else { req.revision };
        if rev > cur {
            return Err(UpstreamError::answered(EtcdError::FutureRevision).into());
        }
        if rev < self.compact {
            return Err(UpstreamError::answered(EtcdError::Compacted).into());
        }
        if span(&req.range_end) == Span::Between && req.range_end <= req.key {
            return Ok(RangeResponse { header: header(cur), ..Default::default() });
        }
        // At the transaction's own revision: the newest versions (0).
        let at = if rev == cur { 0 } else { rev };
        let r = read(self.conn, &req.key, &req.range_end, at, fetch_limit(req)).await?;
        let mut resp = range_answer(req, r.kvs, r.count);
        resp.header = header(cur);
        Ok(resp)
    }

    /// The branch every txn of the tree takes, in etcd's order (`compareToPath`):
    /// all compares against the state before any operation.
    fn path<'a>(&'a mut self, txn: &'a TxnRequest, out: &'a mut Vec<bool>) -> BoxFuture<'a, Result<(), TxError>> {
        Box::pin(async move {
            let mut ok = true;
            for c in &txn.compare {
                if !self.compare(c).await? {
                    ok = false;
                    break;
                }
            }
            out.push(ok);
            for op in if ok { &txn.success } else { &txn.failure } {
                if let Some(request_op::Request::RequestTxn(t)) = &op.request {
                    self.path(t, out).await?;
                }
            }
            Ok(())
        })
    }

    async fn compare(&mut self, c: &Compare) -> Result<bool, TxError> {
        let kvs = self.live(&c.key, &c.range_end).await?;
        Ok(compare_holds(c, &kvs))
    }

    /// etcd's checks of the chosen path before anything is applied: every put
    /// (`checkRequestPut`, only when the txn writes), then every range's revision.
    fn check<'a>(
        &'a mut self,
        txn: &'a TxnRequest,
        path: &'a [bool],
        at: &'a mut usize,
        puts: bool,
    ) -> BoxFuture<'a, Result<(), TxError>> {
        Box::pin(async move {
            let ok = path.get(*at).copied().unwrap_or(false);
            *at += 1;
            for op in if ok { &txn.success } else { &txn.failure } {
                match &op.request {
                    Some(request_op::Request::RequestTxn(t)) => self.check(t, path, at, puts).await?,
                    Some(request_op::Request::RequestPut(p)) if puts => {
                        if (p.ignore_value || p.ignore_lease) && self.live(&p.key, &[]).await?.is_empty() {
                            return Err(key_not_found().into());
                        }
                        if p.lease != 0 && !self.lease_exists(p.lease).await? {
                            return Err(UpstreamError::answered(EtcdError::LeaseNotFound).into());
                        }
                    }
                    Some(request_op::Request::RequestRange(r)) if !puts && r.revision != 0 => {
                        if r.revision > self.begin {
                            return Err(UpstreamError::answered(EtcdError::FutureRevision).into());
                        }
                        if r.revision < self.compact {
                            return Err(UpstreamError::answered(EtcdError::Compacted).into());
                        }
                    }
                    _ => {}
                }
            }
            Ok(())
        })
    }

    /// etcd's `applyTxn` along the chosen path.
    fn apply<'a>(
        &'a mut self,
        txn: &'a TxnRequest,
        path: &'a [bool],
        at: &'a mut usize,
    ) -> BoxFuture<'a, Result<TxnResponse, TxError>> {
        Box::pin(async move {
            let ok = path.get(*at).copied().unwrap_or(false);
            *at += 1;
            let mut resp =
                TxnResponse { header: Some(ResponseHeader::default()), succeeded: ok, responses: Vec::new() };
            for op in if ok { &txn.success } else { &txn.failure } {
                use response_op::Response as R;
                let r = match &op.request {
                    Some(request_op::Request::RequestRange(r)) => R::ResponseRange(self.range(r).await?),
                    Some(request_op::Request::RequestPut(p)) => R::ResponsePut(self.put(p, true).await?),
                    Some(request_op::Request::RequestDeleteRange(d)) => R::ResponseDeleteRange(self.delete(d).await?),
                    Some(request_op::Request::RequestTxn(t)) => R::ResponseTxn(self.apply(t, path, at).await?),
                    // Refused before it reaches a backend (etcd's "key not found").
                    None => return Err(key_not_found().into()),
                };
                resp.responses.push(ResponseOp { response: Some(r) });
            }
            Ok(resp)
        })
    }

    /// A whole txn, as etcd's `Txn` applies it.
    pub async fn txn(&mut self, req: &TxnRequest) -> Result<TxnResponse, TxError> {
        let mut path = Vec::new();
        self.path(req, &mut path).await?;
        if writes(req) {
            self.check(req, &path, &mut 0, true).await?;
        }
        self.check(req, &path, &mut 0, false).await?;
        self.apply(req, &path, &mut 0).await
    }
}

/// Whether any operation of the tree, on either branch, writes (etcd's
/// `isTxnReadonly`, negated).
pub fn writes(req: &TxnRequest) -> bool {
    let op_writes = |op: &RequestOp| match &op.request {
        Some(request_op::Request::RequestPut(_) | request_op::Request::RequestDeleteRange(_)) => true,
        Some(request_op::Request::RequestTxn(t)) => writes(t),
        _ => false,
    };
    req.success.iter().chain(&req.failure).any(op_writes)
}
