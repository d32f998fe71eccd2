//! The schema: versioned steps applied by `etcdmux backend init`, checked at start.
//!
//! Tables (all `etcdmux_*`):
//! - `etcdmux_schema`: one row, the schema version;
//! - `etcdmux_head`: one row, the store's revision, the compact revision asked for,
//!   and the revision history has been deleted up to. Every write transaction
//!   locks it first (`SELECT … FOR UPDATE`): writes serialize on it, as etcd's do on
//!   its raft log, which makes the revision sequence gap-free and in commit order;
//! - `etcdmux_kv`: every version of every key (`mod_revision` is the revision that
//!   wrote it, a delete is a row with `deleted`), until compaction; `seq` orders the
//!   changes inside one revision (a txn's puts and deletes, as etcd's events, and
//!   etcd's sub-revision: one txn may put a key and then delete it);
//! - `etcdmux_latest` (version 2): the newest version of every live key, written in
//!   the same transaction as its history row (reads at the newest revision);
//! - `etcdmux_lease`: leases, their TTL and expiry time (the database's clock);
//! - `etcdmux_lock`: named locks with a holder and an expiry (lease expiry).
//!
//! Only plain SQL that PostgreSQL, CockroachDB and YugabyteDB all accept: no
//! functions, triggers, advisory locks or sequences; `ON CONFLICT DO NOTHING`,
//! `FOR UPDATE`, partial indexes, `DISTINCT ON`, `LATERAL`.

use std::time::Duration;

use super::tls::{drive, explain, DbTls};

/// The schema this etcdmux reads and writes.
pub const VERSION: i32 = 2;

/// The steps from version `i` to `i + 1`, each statement on its own (some engines
/// take one DDL statement per transaction).
const STEPS: &[&[&str]] = &[
    &[
        "CREATE TABLE IF NOT EXISTS etcdmux_head (
        id INT PRIMARY KEY,
        revision BIGINT NOT NULL,
        compact_revision BIGINT NOT NULL,
        compacted_revision BIGINT NOT NULL
    )",
        "INSERT INTO etcdmux_head (id, revision, compact_revision, compacted_revision) VALUES (1, 1, 0, 0)
        ON CONFLICT DO NOTHING",
        "CREATE TABLE IF NOT EXISTS etcdmux_kv (
        key BYTEA NOT NULL,
        mod_revision BIGINT NOT NULL,
        seq INT NOT NULL,
        create_revision BIGINT NOT NULL,
        version BIGINT NOT NULL,
        lease BIGINT NOT NULL,
        value BYTEA NOT NULL,
        deleted BOOLEAN NOT NULL,
        PRIMARY KEY (key, mod_revision, seq)
    )",
        "CREATE INDEX IF NOT EXISTS etcdmux_kv_by_revision ON etcdmux_kv (mod_revision, seq)",
        "CREATE INDEX IF NOT EXISTS etcdmux_kv_by_lease ON etcdmux_kv (lease) WHERE lease <> 0",
        "CREATE TABLE IF NOT EXISTS etcdmux_lease (
        id BIGINT PRIMARY KEY,
        ttl BIGINT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    )",
        "CREATE TABLE IF NOT EXISTS etcdmux_lock (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    )",
    ],
    &[
        // 2: the newest version of every live key, kept in every write transaction,
        // so that reads at the newest revision (and a put's look at the key) do not
        // walk the history. Filled from the history once (stop every etcdmux of the
        // older version first: they would not keep it).
        "CREATE TABLE IF NOT EXISTS etcdmux_latest (
        key BYTEA PRIMARY KEY,
        create_revision BIGINT NOT NULL,
        mod_revision BIGINT NOT NULL,
        version BIGINT NOT NULL,
        lease BIGINT NOT NULL,
        value BYTEA NOT NULL
    )",
        "CREATE INDEX IF NOT EXISTS etcdmux_latest_by_lease ON etcdmux_latest (lease) WHERE lease <> 0",
        "INSERT INTO etcdmux_latest (key, create_revision, mod_revision, version, lease, value)
        SELECT key, create_revision, mod_revision, version, lease, value FROM (
            SELECT DISTINCT ON (key) key, create_revision, mod_revision, version, lease, value, deleted
            FROM etcdmux_kv ORDER BY key, mod_revision DESC, seq DESC) n
        WHERE NOT deleted
        ON CONFLICT (key) DO NOTHING",
    ],
];

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("backend.dsn: {0}")]
    Dsn(tokio_postgres::Error),
    #[error("connecting to the database: {0}")]
    Connect(String),
    #[error("{what}: {source}")]
    Sql { what: String, source: tokio_postgres::Error },
    #[error(
        "the database has etcdmux schema version {found}, this etcdmux needs {want}: run `etcdmux backend init \
         --backend-dsn …` {hint}"
    )]
    Version { found: i32, want: i32, hint: &'static str },
}

fn sql(what: &str) -> impl FnOnce(tokio_postgres::Error) -> SchemaError + '_ {
    move |source| SchemaError::Sql { what: what.to_string(), source }
}

/// The schema version of the database (0: none yet).
pub async fn version(client: &tokio_postgres::Client) -> Result<i32, SchemaError> {
    let exists = client
        .query_opt("SELECT 1 FROM information_schema.tables WHERE table_name = 'etcdmux_schema'", &[])
        .await
        .map_err(sql("reading the catalog"))?;
    if exists.is_none() {
        return Ok(0);
    }
    let row = client
        .query_opt("SELECT version FROM etcdmux_schema WHERE id = 1", &[])
        .await
        .map_err(sql("reading the schema version"))?;
    Ok(row.map_or(0, |r| r.get(0)))
}

/// Refuses a database whose schema is not this etcdmux's.
pub async fn check(client: &tokio_postgres::Client) -> Result<(), SchemaError> {
    match version(client).await? {
        VERSION => Ok(()),
        found if found < VERSION => Err(SchemaError::Version { found, want: VERSION, hint: "to create or migrate it" }),
        found => Err(SchemaError::Version { found, want: VERSION, hint: "with a newer etcdmux, or run that one" }),
    }
}

/// At start: refuses a database whose schema version is not [`VERSION`] (not created
/// yet, older, or newer). A database that cannot be reached is no reason to refuse:
/// etcdmux starts, answers `UNAVAILABLE` and is not ready until it can (as with an
/// etcd that is down), so that is only logged.
pub async fn verify(dsn: &str, tls: &DbTls, timeout: Duration) -> Result<(), SchemaError> {
    let mut cfg: tokio_postgres::Config = dsn.parse().map_err(SchemaError::Dsn)?;
    cfg.connect_timeout(timeout);
    let (client, connection) = match tokio::time::timeout(timeout, tls.connect(&cfg)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::warn!(error = %explain(&e), "sql backend: the database is unreachable; its schema is not checked");
            return Ok(());
        }
        Err(_) => {
            tracing::warn!("sql backend: connecting to the database timed out; its schema is not checked");
            return Ok(());
        }
    };
    tokio::select! {
        r = check(&client) => r,
        _ = drive(connection) => {
            tracing::warn!("sql backend: the database closed the connection; its schema is not checked");
            Ok(())
        }
    }
}

/// `etcdmux backend init`: creates the schema, or migrates it step by step to
/// [`VERSION`]. Safe to run again, and from several processes at once (every step
/// is idempotent). Returns what it did.
pub async fn init(dsn: &str, tls: &DbTls, timeout: Duration) -> Result<String, SchemaError> {
    let mut cfg: tokio_postgres::Config = dsn.parse().map_err(SchemaError::Dsn)?;
    cfg.connect_timeout(timeout);
    let (client, connection) = tls.connect(&cfg).await.map_err(|e| SchemaError::Connect(explain(&e)))?;
    // The connection is driven here, beside the work, for as long as it runs.
    tokio::select! {
        r = apply(&client) => r,
        ended = drive(connection) => Err(SchemaError::Connect(match ended {
            Ok(()) => "the database closed the connection".to_string(),
            Err(e) => e.to_string(),
        })),
    }
}

/// [`init`] on a connected client.
pub async fn apply(client: &tokio_postgres::Client) -> Result<String, SchemaError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS etcdmux_schema (id INT PRIMARY KEY, version INT NOT NULL);
             INSERT INTO etcdmux_schema (id, version) VALUES (1, 0) ON CONFLICT DO NOTHING",
        )
        .await
        .map_err(sql("creating etcdmux_schema"))?;
    let from = version(client).await?;
    if from > VERSION {
        return Err(SchemaError::Version { found: from, want: VERSION, hint: "with a newer etcdmux" });
    }
    for (i, step) in STEPS.iter().enumerate().skip(from as usize) {
        for stmt in *step {
            client.batch_execute(stmt).await.map_err(sql(&format!("schema step {}", i + 1)))?;
        }
        client
            .execute("UPDATE etcdmux_schema SET version = $1 WHERE id = 1 AND version < $1", &[&(i as i32 + 1)])
            .await
            .map_err(sql("recording the schema version"))?;
    }
    Ok(if from == VERSION {
        format!("etcdmux schema: version {VERSION}, up to date")
    } else {
        format!("etcdmux schema: version {from} -> {VERSION}")
    })
}
