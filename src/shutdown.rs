//! Shutdown: one cancellation signal, and the tracker every spawned task belongs to.
//!
//! Every task etcdmux spawns (keepalive relays, the hub's upstream
//! watch and ticker, catch-ups, fence writers, passthrough watches) is spawned
//! through [`Tasks::spawn`], so it is counted, and sees [`Tasks::cancelled`] when
//! shutdown begins. `grpc::server` drives the order: stop accepting, let unary calls
//! finish, end watch streams, stop the hub last, all within one grace period; then
//! [`Tasks::wait`] proves nothing was left behind.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The shutdown signal and the set of tasks that must end before the process does.
#[derive(Clone, Default)]
pub struct Tasks {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Spawns `fut` as an owned task. The task should watch [`Tasks::cancelled`] (or
    /// use [`Tasks::spawn_until_shutdown`]) so that it ends when shutdown begins.
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// Spawns `fut` and drops it at shutdown, wherever it is waiting: for tasks with
    /// nothing to finish (relays, tickers, retries).
    pub fn spawn_until_shutdown<F>(&self, fut: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let token = self.token.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                out = fut => Some(out),
                _ = token.cancelled() => None,
            }
        })
    }

    /// Begins shutdown: every task sees [`Tasks::cancelled`] resolve.
    pub fn shut_down(&self) {
        self.token.cancel();
    }

    pub fn is_shut_down(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once shutdown has begun.
    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }

    /// A token that is cancelled with this one (for APIs that take a token).
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Waits until every task spawned so far (and any they spawn) has ended. Call
    /// after [`Tasks::shut_down`]; new tasks can still be spawned meanwhile.
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
        self.tracker.reopen();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn tasks_see_the_signal_and_wait_returns_when_all_ended() {
        let tasks = Tasks::new();
        let t = tasks.clone();
        tasks.spawn(async move { t.cancelled().await });
        tasks.spawn_until_shutdown(std::future::pending::<()>());
        assert_eq!(tasks.len(), 2);
        assert!(tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await.is_err(), "nothing ended yet");
        tasks.shut_down();
        tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await.expect("every task ended");
        assert!(tasks.is_empty());
    }
}
