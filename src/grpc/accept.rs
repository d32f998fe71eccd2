//! Accepting client connections without spinning when accept fails.
//!
//! tonic's accept loop retries a failed `accept()` at once. When the process is out
//! of file descriptors (EMFILE/ENFILE) the pending connection stays in the backlog,
//! so every retry fails again: one core at 100 % and no log line (found by apiload
//! with one connection per project). [`Backoff`] wraps the listener's stream and,
//! after an error, waits before the next accept, doubling from 5 ms to 1 s like Go's
//! `net/http` server (and so etcd), counts `etcdmux_accept_errors_total` and warns
//! once per streak of errors.

use crate::metrics::names;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::time::Sleep;

const FIRST_DELAY: Duration = Duration::from_millis(5);
const MAX_DELAY: Duration = Duration::from_secs(1);

/// An incoming-connection stream that pauses after accept errors.
pub struct Backoff<S> {
    inner: S,
    /// The pause in progress, if any.
    pause: Option<Pin<Box<Sleep>>>,
    /// The next pause; `None` while accepts succeed.
    delay: Option<Duration>,
}

impl<S> Backoff<S> {
    pub fn new(inner: S) -> Backoff<S> {
        Backoff { inner, pause: None, delay: None }
    }
}

impl<S, T, E> Stream for Backoff<S>
where
    S: Stream<Item = Result<T, E>> + Unpin,
    E: std::fmt::Display,
{
    type Item = Result<T, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(pause) = self.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                // Not passed on: tonic only logs accept errors at trace level.
                Some(Err(e)) => {
                    metrics::counter!(names::ACCEPT_ERRORS).increment(1);
                    let delay = match self.delay {
                        None => {
                            tracing::warn!(error = %e, "accepting a connection failed; retrying with backoff");
                            FIRST_DELAY
                        }
                        Some(d) => (d * 2).min(MAX_DELAY),
                    };
                    self.delay = Some(delay);
                    self.pause = Some(Box::pin(tokio::time::sleep(delay)));
                }
                Some(Ok(io)) => {
                    if self.delay.take().is_some() {
                        tracing::info!("accepting connections again");
                    }
                    return Poll::Ready(Some(Ok(io)));
                }
                None => return Poll::Ready(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test(start_paused = true)]
    async fn pauses_after_errors_and_resets_after_success() {
        let items: Vec<Result<u32, String>> =
            vec![Err("emfile".into()), Err("emfile".into()), Err("emfile".into()), Ok(7), Err("emfile".into()), Ok(8)];
        let mut s = Backoff::new(futures::stream::iter(items));
        let start = tokio::time::Instant::now();
        assert_eq!(s.next().await, Some(Ok(7)));
        // 5 + 10 + 20 ms of pauses (the clock is paused, so this is exact).
        assert_eq!(start.elapsed(), Duration::from_millis(35));
        let start = tokio::time::Instant::now();
        assert_eq!(s.next().await, Some(Ok(8)));
        assert_eq!(start.elapsed(), FIRST_DELAY, "a success resets the backoff");
        assert_eq!(s.next().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_pause_is_capped() {
        let items: Vec<Result<u32, String>> = (0..12).map(|_| Err("emfile".to_string())).chain([Ok(1)]).collect();
        let mut s = Backoff::new(futures::stream::iter(items));
        let start = tokio::time::Instant::now();
        assert_eq!(s.next().await, Some(Ok(1)));
        // 5, 10, ..., 640 ms, then 1 s for the remaining errors.
        let expected: Duration = (0..12).map(|i| (FIRST_DELAY * 2u32.pow(i)).min(MAX_DELAY)).sum();
        assert_eq!(start.elapsed(), expected);
    }
}
