//! The read index of linearizable reads: etcd's current revision, learnt with one
//! upstream call shared by every read that arrived before the call was sent.
//!
//! A read may only use the answer of a call *sent after it arrived* (a call already
//! in flight may have been answered before the read's client wrote what it now
//! expects to see). So calls run one at a time, back to back while reads wait:
//! a read that arrives during a call waits for the next one, which every read that
//! arrived meanwhile shares. A flood of reads costs one call per round trip.
//!
//! The call is made by one of the waiting reads (no task of its own). If that read
//! is cancelled (its client went away), a guard hands the turn to another waiter.

use std::future::Future;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::pb::etcdserverpb::ResponseHeader;

#[derive(Default)]
struct State {
    /// Calls sent so far; the newest one has this number.
    started: u64,
    /// The newest call that finished, and its answer (`None`: it failed).
    finished: u64,
    result: Option<ResponseHeader>,
    running: bool,
}

#[derive(Default)]
pub struct ReadIndex {
    st: Mutex<State>,
    done: Notify,
}

impl ReadIndex {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// etcd's current header, from a call sent after this was called; `None` if
    /// that call failed (the read then goes to etcd itself). `call` is made only if
    /// this read's turn comes to send it.
    pub async fn current<F, Fut>(&self, call: F) -> Option<ResponseHeader>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Option<ResponseHeader>>,
    {
        let want = self.lock().started + 1;
        let mut call = Some(call);
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let seq = {
                let mut st = self.lock();
                if st.finished >= want {
                    return st.result;
                }
                if st.running || call.is_none() {
                    None
                } else {
                    st.running = true;
                    st.started += 1;
                    Some(st.started)
                }
            };
            match (seq, call.take()) {
                (Some(seq), Some(f)) => {
                    let mut turn = Turn { ri: self, seq, result: None };
                    turn.result = Some(f().await);
                    // Dropping `turn` publishes the answer.
                }
                (_, f) => {
                    call = f;
                    notified.await;
                }
            }
        }
    }
}

/// One call in flight. Dropped when it ends, or when the read making it is
/// cancelled: either way the next call may start and waiters wake.
struct Turn<'a> {
    ri: &'a ReadIndex,
    seq: u64,
    /// `Some` once the call finished.
    result: Option<Option<ResponseHeader>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut st = self.ri.lock();
        st.running = false;
        if let Some(result) = self.result.take() {
            st.finished = self.seq;
            st.result = result;
        }
        drop(st);
        self.ri.done.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    fn header(rev: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader { revision: rev, ..Default::default() })
    }

    #[tokio::test(start_paused = true)]
    async fn reads_share_calls_sent_after_they_arrived() {
        let ri = Arc::new(ReadIndex::default());
        let calls = Arc::new(AtomicI64::new(0));
        let call = |calls: Arc<AtomicI64>| {
            move || async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                header(n * 100)
            }
        };
        // One read starts call 1; ten reads arrive while it is in flight.
        let first = tokio::spawn({
            let (ri, c) = (ri.clone(), calls.clone());
            async move { ri.current(call(c)).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let later: Vec<_> = (0..10)
            .map(|_| {
                let (ri, c) = (ri.clone(), calls.clone());
                tokio::spawn(async move { ri.current(call(c)).await })
            })
            .collect();
        assert_eq!(first.await.unwrap().map(|h| h.revision), Some(100));
        for r in later {
            assert_eq!(r.await.unwrap().map(|h| h.revision), Some(200), "the call sent after they arrived");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2, "one call for the ten that waited");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_caller_hands_its_turn_over() {
        let ri = Arc::new(ReadIndex::default());
        let stuck = tokio::spawn({
            let ri = ri.clone();
            async move { ri.current(std::future::pending::<Option<ResponseHeader>>).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let waiter = tokio::spawn({
            let ri = ri.clone();
            async move { ri.current(|| async { header(7) }).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        stuck.abort();
        let got = tokio::time::timeout(Duration::from_secs(1), waiter).await.expect("not stuck").unwrap();
        assert_eq!(got.map(|h| h.revision), Some(7));
        let failed = ri.current(|| async { None }).await;
        assert_eq!(failed, None, "a failed call answers None");
    }
}
