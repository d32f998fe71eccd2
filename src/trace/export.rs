//! Span export: ended spans go into one bounded queue (a full queue drops the span
//! and counts it, the request path never waits), and one task sends them to the
//! OTLP collector in batches. At shutdown the task sends what is queued and ends.

use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::names;

/// The queue's sending side: the tracer provider's span processor.
#[derive(Debug)]
pub struct Queue {
    tx: mpsc::Sender<SpanData>,
}

impl Queue {
    /// A queue of at most `size` spans, and its receiving side for [`run`].
    pub fn new(size: usize) -> (Queue, mpsc::Receiver<SpanData>) {
        let (tx, rx) = mpsc::channel(size);
        (Queue { tx }, rx)
    }
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let reason = match self.tx.try_send(span) {
            Ok(()) => return,
            Err(TrySendError::Full(_)) => "queue_full",
            Err(TrySendError::Closed(_)) => "shut_down",
        };
        metrics::counter!(names::TRACE_SPANS_DROPPED, "reason" => reason).increment(1);
    }

    /// The export task flushes on its own schedule and at shutdown ([`run`]).
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// When the export task sends.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Most spans in one export request.
    pub batch_size: usize,
    /// Longest a span waits before it is sent.
    pub interval: Duration,
    /// Deadline of one export request.
    pub timeout: Duration,
}

/// The export task: sends the queued spans in batches of at most
/// `batch_size`, each at most `interval` after its first span was queued; once
/// `stop` is cancelled, sends what is queued and returns.
pub async fn run<E: SpanExporter>(exporter: E, mut rx: mpsc::Receiver<SpanData>, s: Schedule, stop: CancellationToken) {
    let mut out = Export { exporter, failing: false, timeout: s.timeout };
    let mut batch = Vec::with_capacity(s.batch_size);
    let mut due: Option<Instant> = None;
    loop {
        let wait = async {
            match due {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let room = s.batch_size - batch.len();
        tokio::select! {
            () = stop.cancelled() => break,
            n = rx.recv_many(&mut batch, room) => {
                if n == 0 {
                    break;
                }
                due.get_or_insert_with(|| Instant::now() + s.interval);
                if batch.len() < s.batch_size {
                    continue;
                }
            }
            () = wait => {}
        }
        out.send(&mut batch).await;
        due = None;
    }
    rx.close();
    loop {
        let room = s.batch_size - batch.len();
        if room > 0 && rx.recv_many(&mut batch, room).await > 0 {
            continue;
        }
        if batch.is_empty() {
            break;
        }
        out.send(&mut batch).await;
    }
    let _ = out.exporter.shutdown();
}

struct Export<E> {
    exporter: E,
    /// The last export failed: the next failure is not logged again.
    failing: bool,
    timeout: Duration,
}

impl<E: SpanExporter> Export<E> {
    async fn send(&mut self, batch: &mut Vec<SpanData>) {
        let spans = std::mem::replace(batch, Vec::with_capacity(batch.capacity()));
        let n = spans.len() as u64;
        let error = match tokio::time::timeout(self.timeout, self.exporter.export(spans)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {:?}", self.timeout)),
        };
        match error {
            None => {
                metrics::counter!(names::TRACE_SPANS_EXPORTED).increment(n);
                if std::mem::replace(&mut self.failing, false) {
                    tracing::info!("trace export: the collector accepts spans again");
                }
            }
            Some(error) => {
                metrics::counter!(names::TRACE_SPANS_DROPPED, "reason" => "export_failed").increment(n);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(%error, spans = n, "trace export failed; spans are dropped until it succeeds again");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full queue drops the span at once (the request path never waits) and
    /// counts it.
    #[test]
    fn a_full_queue_drops_and_counts() {
        let recorder = crate::metrics::builder().expect("buckets").build_recorder();
        let handle = recorder.handle();
        let (subscriber, _provider, mut queued) = crate::trace::test_subscriber_with_queue(2);
        metrics::with_local_recorder(&recorder, || {
            tracing::subscriber::with_default(subscriber, || {
                for i in 0..5 {
                    let _span = tracing::info_span!("call", i).entered();
                }
            })
        });
        let mut n = 0;
        while queued.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, 2, "the queue holds its size");
        let text = handle.render();
        let dropped = text
            .lines()
            .find(|l| l.starts_with(names::TRACE_SPANS_DROPPED) && l.contains("reason=\"queue_full\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        assert_eq!(dropped, Some(3.0), "{text}");
    }
}
