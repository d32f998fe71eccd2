//! Logs and distributed tracing.
//!
//! - Logs go to stderr as text or JSON lines (`[log]`), filtered by `RUST_LOG`-style
//!   directives.
//! - Every gRPC call runs in one span (`grpc::span` starts it, [`call`] keeps it):
//!   `method`, `request_id` (the client's `x-request-id`, else a new one, returned
//!   in the answer's `x-request-id`) and `tenant` once resolved. Log lines within
//!   a call carry these fields.
//! - The caller's W3C `traceparent` is continued, and every request to etcd
//!   carries the trace on ([`call::inject`]), so one trace goes apiserver →
//!   etcdmux → etcd.
//! - With `[tracing] otlp_endpoint`, the spans are exported over OTLP/gRPC
//!   ([`export`]: a bounded queue, one task); without one no OpenTelemetry layer is
//!   installed at all.
//!
//! [`init`] installs it all once per process, before the server starts;
//! [`Telemetry::shutdown`] sends the last spans after the server has stopped.

pub mod call;
pub mod config;
pub mod export;

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::trace::TracerProvider;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanExporter};
use opentelemetry_sdk::Resource;
use tracing::Level;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

pub use call::{in_call, inject, record_tenant};
pub use config::{LogConfig, LogFormat, TracingConfig};

use crate::shutdown::Tasks;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("log.level {0:?}: {1}")]
    Level(String, tracing_subscriber::filter::ParseError),
    #[error("OTLP exporter for {0}: {1}")]
    Exporter(String, opentelemetry_otlp::ExporterBuildError),
    #[error("installing the log subscriber: {0}")]
    Install(#[from] tracing_subscriber::util::TryInitError),
}

/// What [`init`] installed that needs an end: the span export task.
pub struct Telemetry {
    export: Option<Export>,
}

struct Export {
    provider: SdkTracerProvider,
    tasks: Tasks,
    timeout: Duration,
}

/// Installs the process's log subscriber and, with an `otlp_endpoint`, the span
/// export (its task is spawned: call from within the Tokio runtime).
pub fn init(log: &LogConfig, tracing_cfg: &TracingConfig) -> Result<Telemetry, InitError> {
    let filter = EnvFilter::try_new(&log.level).map_err(|e| InitError::Level(log.level.clone(), e))?;
    let stderr = std::io::stderr;
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match log.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(stderr)
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
    };
    let mut layers = vec![fmt];
    let mut export = None;
    if tracing_cfg.enabled() {
        let (provider, e) = exporter(tracing_cfg)?;
        let otel = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("etcdmux"))
            // Entering a span (each poll of a call's future) does no more than it must.
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_threads(false)
            .with_location(false)
            // etcdmux's own spans and the events in them; not those of its libraries.
            .with_filter(Targets::new().with_target("etcdmux", Level::INFO))
            .boxed();
        layers.push(otel);
        export = Some(Export { provider, tasks: e, timeout: Duration::from_millis(tracing_cfg.export_timeout_ms) });
    }
    tracing_subscriber::registry().with(layers).try_init()?;
    Ok(Telemetry { export })
}

/// The tracer provider over the OTLP exporter, and the tasks of its export task.
fn exporter(cfg: &TracingConfig) -> Result<(SdkTracerProvider, Tasks), InitError> {
    let timeout = Duration::from_millis(cfg.export_timeout_ms);
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(cfg.otlp_endpoint.clone())
        .with_timeout(timeout)
        .build()
        .map_err(|e| InitError::Exporter(cfg.otlp_endpoint.clone(), e))?;
    let resource = Resource::builder().with_service_name(cfg.service_name.clone()).build();
    exporter.set_resource(&resource);
    let (queue, rx) = export::Queue::new(cfg.queue_size);
    let provider = SdkTracerProvider::builder()
        .with_span_processor(queue)
        // The caller's decision when it sent one; `sample_ratio` for the rest.
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sample_ratio))))
        .with_resource(resource)
        .build();
    let schedule = export::Schedule {
        batch_size: cfg.batch_size,
        interval: Duration::from_millis(cfg.export_interval_ms),
        timeout,
    };
    let tasks = Tasks::new();
    tasks.spawn(export::run(exporter, rx, schedule, tasks.token()));
    Ok((provider, tasks))
}

impl Telemetry {
    /// Sends the spans still queued, within `tracing.export_timeout_ms`. Call after
    /// the server has shut down, so that its last calls' spans are among them.
    pub async fn shutdown(self) {
        let Some(e) = self.export else { return };
        e.tasks.shut_down();
        if tokio::time::timeout(e.timeout, e.tasks.wait()).await.is_err() {
            tracing::warn!(timeout = ?e.timeout, "trace export: spans still queued at shutdown were not all sent");
        }
        let _ = e.provider.shutdown();
    }
}

/// An OpenTelemetry subscriber for unit tests: every span sampled unless its
/// caller's was not, ended spans in the returned queue of `size` (nothing is
/// exported).
#[cfg(test)]
pub(crate) fn test_subscriber_with_queue(
    size: usize,
) -> (
    impl tracing::Subscriber + Send + Sync,
    SdkTracerProvider,
    tokio::sync::mpsc::Receiver<opentelemetry_sdk::trace::SpanData>,
) {
    let (queue, rx) = export::Queue::new(size);
    let provider = SdkTracerProvider::builder().with_span_processor(queue).build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
    (tracing_subscriber::registry().with(otel), provider, rx)
}

/// [`test_subscriber_with_queue`] with room for every span of a test.
#[cfg(test)]
pub(crate) fn test_subscriber() -> (
    impl tracing::Subscriber + Send + Sync,
    SdkTracerProvider,
    tokio::sync::mpsc::Receiver<opentelemetry_sdk::trace::SpanData>,
) {
    test_subscriber_with_queue(64)
}
