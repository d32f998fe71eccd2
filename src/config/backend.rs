//! `[backend]`: where keys are stored — the etcd cluster of `[upstream]`, or a
//! PostgreSQL-protocol SQL database (PostgreSQL, CockroachDB, YugabyteDB).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{read_pem, ConfigError};

/// Which storage serves the etcd API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The etcd cluster of `[upstream]`.
    #[default]
    Etcd,
    /// A SQL database (`dsn`), with etcd's data model in tables `etcdmux_*`.
    Sql,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// `"etcd"` (the `[upstream]` cluster) or `"sql"` (the database at `dsn`).
    /// Default "etcd". Flag `--backend`.
    pub kind: BackendKind,
    /// The database, as a libpq key/value string (`host=/run/pg port=5432 user=etcdmux
    /// dbname=etcdmux`) or a `postgres://user:pass@host:port/db` URL. Required with
    /// `kind = "sql"`. Its `sslmode` (`disable`, `prefer`, `require`) says whether TLS
    /// is used, as libpq's does; TLS needs `cacert`. Default "". Flag `--backend-dsn`.
    pub dsn: String,
    /// CA bundle (PEM) the database's certificate must chain to. Set, etcdmux offers
    /// TLS to the database (the DSN's `sslmode` decides whether it insists) and
    /// always verifies the certificate and its name: `server_name`, else the DSN's
    /// host. Unset, it connects without TLS. Default none.
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM) for the database's `clientcert`/`cert` auth; with
    /// `key`. Default none.
    pub cert: Option<PathBuf>,
    /// The client certificate's key (PEM). Default none.
    pub key: Option<PathBuf>,
    /// The name the database's certificate must carry, when not the DSN's host (a
    /// database reached by IP or through a proxy). Default none.
    pub server_name: Option<String>,
    /// Database connections each etcdmux holds at most, for all calls together (the
    /// change feed's LISTEN connection is one more). A call waits for a free one until
    /// its deadline. Default 16.
    pub pool_size: usize,
    /// How long opening one database connection may take. Default 5000.
    pub connect_timeout_ms: u64,
    /// How often the change feed reads the database's revision when no notification
    /// woke it (the fallback to LISTEN/NOTIFY, and the only way on engines without
    /// it). Default 100.
    pub poll_interval_ms: u64,
    /// Wake the change feed with LISTEN/NOTIFY (PostgreSQL, YugabyteDB); set false on
    /// CockroachDB, which has neither, and the feed polls. Default true.
    pub notify: bool,
    /// Rows the change feed reads per query (a revision is never split: a query
    /// stops at a revision boundary). Default 1000.
    pub feed_batch: i64,
    /// Watch responses queued per watch stream before its reader waits for the
    /// consumer. Default 64.
    pub feed_buffer: usize,
    /// History rows one compaction statement deletes; writers are never held up for
    /// longer than one batch. Default 1000.
    pub compaction_batch: i64,
    /// How often expired leases are looked for (by the one etcdmux that holds the
    /// expiry lock). Default 500.
    pub lease_check_interval_ms: u64,
    /// How long the lease-expiry lock is held without being renewed: after a crash,
    /// another etcdmux takes expiry over this long later. Default 5000.
    pub lease_lock_ttl_ms: u64,
    /// Largest write (the encoded put, delete or txn, keys in their stored form) the
    /// SQL backend applies; larger ones get etcd's "etcdserver: request is too large",
    /// as etcd refuses them (its `--max-request-bytes`, whose default this is).
    /// Default 1572864 (1.5 MiB).
    pub max_request_bytes: usize,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            kind: BackendKind::Etcd,
            dsn: String::new(),
            cacert: None,
            cert: None,
            key: None,
            server_name: None,
            pool_size: 16,
            connect_timeout_ms: 5000,
            poll_interval_ms: 100,
            notify: true,
            feed_batch: 1000,
            feed_buffer: 64,
            compaction_batch: 1000,
            lease_check_interval_ms: 500,
            lease_lock_ttl_ms: 5000,
            max_request_bytes: 1536 * 1024,
        }
    }
}

impl BackendConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.kind == BackendKind::Sql && self.dsn.trim().is_empty() {
            return bad("backend.kind = \"sql\" needs backend.dsn (--backend-dsn)".into());
        }
        if self.pool_size == 0 || self.pool_size > 1024 {
            return bad(format!("backend.pool_size ({}) must be between 1 and 1024", self.pool_size));
        }
        if self.connect_timeout_ms == 0 || self.poll_interval_ms == 0 || self.lease_check_interval_ms == 0 {
            return bad(
                "backend.connect_timeout_ms, poll_interval_ms and lease_check_interval_ms must be at least 1".into()
            );
        }
        if self.max_request_bytes == 0 {
            return bad("backend.max_request_bytes must be at least 1".into());
        }
        if self.feed_batch < 1 || self.feed_buffer == 0 || self.compaction_batch < 1 {
            return bad("backend.feed_batch, feed_buffer and compaction_batch must be at least 1".into());
        }
        if self.kind == BackendKind::Sql && self.cacert.is_none() {
            let require = self
                .dsn
                .parse::<tokio_postgres::Config>()
                .is_ok_and(|c| matches!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Require));
            if require {
                return bad("backend.dsn has sslmode=require, which needs TLS: set backend.cacert".into());
            }
        }
        if self.cert.is_some() != self.key.is_some() {
            return bad("backend.cert and backend.key go together".into());
        }
        if self.cacert.is_none() && (self.cert.is_some() || self.server_name.is_some()) {
            return bad("backend.cert, key and server_name are TLS settings: they need backend.cacert".into());
        }
        for f in [&self.cacert, &self.cert, &self.key].into_iter().flatten() {
            read_pem(f)?;
        }
        if self.lease_lock_ttl_ms <= self.lease_check_interval_ms {
            return bad(format!(
                "backend.lease_lock_ttl_ms ({}) must exceed lease_check_interval_ms ({}), or the expiry lock lapses \
                 between renewals",
                self.lease_lock_ttl_ms, self.lease_check_interval_ms
            ));
        }
        Ok(())
    }
}
