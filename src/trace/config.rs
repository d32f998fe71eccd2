//! The `[log]` and `[tracing]` config sections (part of the one
//! [`Config`](crate::config::Config), which re-exports them).

use serde::{Deserialize, Serialize};

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event, with the fields of the spans it is in.
    #[default]
    Text,
    /// One JSON object per line; the request's fields (`method`, `request_id`,
    /// `tenant`) are under `span`, so an aggregator can filter by tenant.
    Json,
}

/// `[log]`: the log lines etcdmux writes to stderr.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`. Default `text`. Flag `--log-format`.
    pub format: LogFormat,
    /// Which events are written, as `RUST_LOG` directives (`info`,
    /// `warn,etcdmux=debug`, ...). Default `info`. `RUST_LOG` overrides it, and
    /// `--log-level` overrides both. At `debug`, every gRPC call logs one
    /// `answered` line (its code and duration) in its request's span.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info".to_string() }
    }
}

/// `[tracing]`: distributed tracing. An incoming W3C `traceparent` (the apiserver
/// sends one with `APIServerTracing`) is continued in every case: with an
/// `otlp_endpoint`, each gRPC call is a span, child of the caller's, and etcd's
/// requests are its children; without one, the caller's `traceparent` is passed on
/// to etcd unchanged.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// OTLP/gRPC collector (`http://host:4317`) spans are exported to. Empty (the
    /// default): no spans are recorded or exported. Flag `--otlp-endpoint`.
    pub otlp_endpoint: String,
    /// `service.name` of the exported spans. Default `etcdmux`.
    pub service_name: String,
    /// Sampling of calls whose caller sent no `traceparent` (root spans): each is
    /// sampled with this probability, 0.0 to 1.0. A call whose caller sent one
    /// follows the caller's decision (its sampled flag). Default 1.0.
    pub sample_ratio: f64,
    /// Spans waiting for export; when full, new spans are dropped and counted in
    /// `etcdmux_trace_spans_dropped_total`. Default 2048.
    pub queue_size: usize,
    /// Most spans in one export request. Default 512.
    pub batch_size: usize,
    /// Longest a span waits in the queue before it is exported. Default 1000.
    pub export_interval_ms: u64,
    /// Deadline of one export request, and of the last flush at shutdown (after
    /// the listeners and the watch hub have stopped). Default 5000.
    pub export_timeout_ms: u64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: String::new(),
            service_name: "etcdmux".to_string(),
            sample_ratio: 1.0,
            queue_size: 2048,
            batch_size: 512,
            export_interval_ms: 1_000,
            export_timeout_ms: 5_000,
        }
    }
}

impl LogConfig {
    /// Checks the level parses as filter directives.
    pub fn validate(&self) -> Result<(), String> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(|_| ())
            .map_err(|e| format!("log.level {:?} (from [log] level, RUST_LOG or --log-level): {e}", self.level))
    }
}

impl TracingConfig {
    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.is_empty()
    }

    pub fn validate(&self) -> Result<(), String> {
        let e = &self.otlp_endpoint;
        if !e.is_empty() && !e.starts_with("http://") {
            return Err(format!("tracing.otlp_endpoint {e:?} must be an http:// URL (OTLP over plaintext gRPC)"));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(format!("tracing.sample_ratio {} must be between 0.0 and 1.0", self.sample_ratio));
        }
        if self.service_name.is_empty() {
            return Err("tracing.service_name must not be empty".to_string());
        }
        if self.queue_size == 0 || self.batch_size == 0 || self.export_interval_ms == 0 || self.export_timeout_ms == 0 {
            return Err("tracing.queue_size, batch_size, export_interval_ms and export_timeout_ms must be at least 1"
                .to_string());
        }
        if self.batch_size > self.queue_size {
            return Err(format!(
                "tracing.batch_size ({}) must not exceed queue_size ({})",
                self.batch_size, self.queue_size
            ));
        }
        Ok(())
    }
}
