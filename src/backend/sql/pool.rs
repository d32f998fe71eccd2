//! A small bounded pool of database connections, each with its prepared statements,
//! and what a database failure means ([`failure`]).
//!
//! At most `backend.pool_size` connections are open; a call waits for one until its
//! deadline. A connection whose transaction did not end (its call was cancelled
//! half-way) is closed rather than reused: the server rolls back what it held.
//! Shutdown closes the idle connections and keeps none that come back, so each
//! connection's driver task ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};

use super::tls::{drive, explain, DbTls};
use tonic::Status;

use crate::metrics::names;
use crate::shutdown::Tasks;
use crate::upstream::classify::UpstreamError;

/// One connection and the statements prepared on it.
pub struct Conn {
    pub client: Client,
    stmts: HashMap<&'static str, Statement>,
    /// Inside BEGIN without COMMIT or ROLLBACK yet.
    pub in_txn: bool,
}

impl Conn {
    /// `sql` prepared on this connection (once).
    pub async fn stmt(&mut self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        self.stmts.insert(sql, s.clone());
        Ok(s)
    }
}

pub struct Pool {
    cfg: tokio_postgres::Config,
    tls: DbTls,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
    tasks: Tasks,
    connect_timeout: Duration,
}

/// A connection taken from the pool; back to it when dropped (unless broken, in a
/// transaction, or the process is shutting down).
pub struct Pooled {
    conn: Option<Conn>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for Pooled {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().unwrap_or_else(|| unreachable!("taken only in drop"))
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().unwrap_or_else(|| unreachable!("taken only in drop"))
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            if !c.in_txn && !c.client.is_closed() && !self.pool.tasks.is_shut_down() {
                self.pool.idle.lock().unwrap_or_else(|p| p.into_inner()).push(c);
                return;
            }
            metrics::gauge!(names::BACKEND_POOL_OPEN).decrement(1.0);
        }
    }
}

impl Pool {
    pub fn new(
        dsn: &str,
        tls: DbTls,
        size: usize,
        connect_timeout: Duration,
        tasks: &Tasks,
    ) -> Result<Arc<Pool>, String> {
        let mut cfg: tokio_postgres::Config = dsn.parse().map_err(|e| format!("backend.dsn: {e}"))?;
        cfg.connect_timeout(connect_timeout);
        if cfg.get_application_name().is_none() {
            cfg.application_name("etcdmux");
        }
        let pool = Arc::new(Pool {
            cfg,
            tls,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(size)),
            tasks: tasks.clone(),
            connect_timeout,
        });
        let p = pool.clone();
        let t = tasks.clone();
        tasks.spawn(async move {
            t.cancelled().await;
            let closed = std::mem::take(&mut *p.idle.lock().unwrap_or_else(|e| e.into_inner()));
            metrics::gauge!(names::BACKEND_POOL_OPEN).decrement(closed.len() as f64);
        });
        Ok(pool)
    }

    /// The connection settings (for the change feed's own LISTEN connection).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.cfg
    }

    /// How this pool's connections are made (plain or TLS): for the change feed's own.
    pub fn tls(&self) -> &DbTls {
        &self.tls
    }

    /// A connection, waiting for a free one until `deadline`.
    pub async fn get(self: &Arc<Self>, deadline: Instant) -> Result<Pooled, UpstreamError> {
        let waiting = metrics::gauge!(names::BACKEND_POOL_WAITING);
        waiting.increment(1.0);
        let permit = tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned()).await;
        waiting.decrement(1.0);
        let permit = match permit {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(unreachable_db(false, "the connection pool is closed")),
            Err(_) => return Err(UpstreamError::deadline()),
        };
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(c) => c,
            None => {
                let c = tokio::time::timeout_at(deadline.min(Instant::now() + self.connect_timeout), self.connect())
                    .await
                    .map_err(|_| unreachable_db(false, "connecting to the database timed out"))??;
                metrics::gauge!(names::BACKEND_POOL_OPEN).increment(1.0);
                c
            }
        };
        Ok(Pooled { conn: Some(conn), pool: self.clone(), _permit: permit })
    }

    /// A new connection, its driver a task that ends with the connection.
    async fn connect(&self) -> Result<Conn, UpstreamError> {
        let (client, connection) = self
            .tls
            .connect(&self.cfg)
            .await
            .map_err(|e| unreachable_db(false, &format!("connecting: {}", explain(&e))))?;
        self.tasks.spawn(async move {
            if let Err(e) = drive(connection).await {
                tracing::debug!(error = %e, "database connection ended");
            }
        });
        Ok(Conn { client, stmts: HashMap::new(), in_txn: false })
    }
}

/// The database could not be reached: `sent` says whether the request may have
/// reached it (then a write is never sent again).
pub fn unreachable_db(sent: bool, cause: &str) -> UpstreamError {
    UpstreamError::unreachable(sent, format!("etcdmux: the database is unreachable: {cause}"))
}

/// What a database error means, by its type and SQLSTATE (never its text): a lost
/// connection; a transaction the engine aborted and that may be run again
/// (serialization failure, deadlock: nothing of it was applied); or an error of
/// the database, passed on as `UNAVAILABLE` (a passing condition: out of
/// connections, shutting down) or `INTERNAL`.
pub fn failure(e: tokio_postgres::Error) -> UpstreamError {
    if e.is_closed() {
        return unreachable_db(true, &e.to_string());
    }
    let Some(db) = e.as_db_error() else {
        // No answer from the server: the connection broke mid-request.
        return unreachable_db(true, &e.to_string());
    };
    let code = db.code();
    let passing = [
        SqlState::TOO_MANY_CONNECTIONS,
        SqlState::ADMIN_SHUTDOWN,
        SqlState::CRASH_SHUTDOWN,
        SqlState::CANNOT_CONNECT_NOW,
        SqlState::QUERY_CANCELED,
    ];
    if passing.contains(code) {
        return UpstreamError::new(Status::unavailable(format!("etcdmux: database: {}", db.message())));
    }
    UpstreamError::new(Status::internal(format!("etcdmux: database error {}: {}", code.code(), db.message())))
}

/// Whether the engine aborted the transaction and asks that it be run again.
pub fn is_retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
}
