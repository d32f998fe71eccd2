//! Metrics: every name in one place ([`names`]) with its description, and the
//! Prometheus recorder ([`install`]); `health::http` serves its `/metrics`. The
//! per-call gRPC metrics come from `grpc::layer`.
//!
//! Only the `etcdmux_tenant_*` metrics have a tenant label, and only for the top
//! `server.tenant_metrics_top` tenants ([`tenants`]); every other tenant is summed
//! as `tenant="other"`, so tens of thousands of tenants stay a bounded number of
//! series ([`per_tenant`] records them).
//!
//! Latencies are Prometheus histograms with [`LATENCY_BUCKETS`].

pub mod per_tenant;
pub mod tenants;

use std::sync::Mutex;

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Metric names.
pub mod names {
    pub const GRPC_REQUESTS: &str = "etcdmux_grpc_requests_total";
    pub const GRPC_REQUEST_DURATION: &str = "etcdmux_grpc_request_duration_seconds";
    pub const GRPC_INFLIGHT: &str = "etcdmux_grpc_inflight";
    pub const OVERLOAD_REJECTIONS: &str = "etcdmux_overload_rejections_total";
    pub const CONNECTION_READ_YIELDS: &str = "etcdmux_connection_read_yields_total";
    pub const REQUEST_ERRORS: &str = "etcdmux_request_errors_total";
    pub const UPSTREAM_ERRORS: &str = "etcdmux_upstream_errors_total";
    pub const UPSTREAM_RETRIES: &str = "etcdmux_upstream_retries_total";
    pub const UPSTREAM_FAILOVERS: &str = "etcdmux_upstream_failovers_total";
    pub const UPSTREAM_CONNECTIONS: &str = "etcdmux_upstream_connections";
    pub const UPSTREAM_REQUEST_DURATION: &str = "etcdmux_upstream_request_duration_seconds";
    pub const BACKEND_POOL_OPEN: &str = "etcdmux_backend_pool_connections";
    pub const BACKEND_POOL_WAITING: &str = "etcdmux_backend_pool_waiting";
    pub const BACKEND_RETRIES: &str = "etcdmux_backend_retries_total";
    pub const BACKEND_REVISION: &str = "etcdmux_backend_revision";
    pub const BACKEND_EXPIRY_LOCK: &str = "etcdmux_backend_lease_expiry_lock_held";
    pub const BACKEND_LEASES_EXPIRED: &str = "etcdmux_backend_leases_expired_total";
    pub const BACKEND_COMPACTED_ROWS: &str = "etcdmux_backend_compacted_rows_total";
    pub const ROOT_INDEX_CACHED: &str = "etcdmux_root_index_cached";
    pub const ACCEPT_ERRORS: &str = "etcdmux_accept_errors_total";
    pub const TLS_RELOADS: &str = "etcdmux_tls_reloads_total";
    pub const TLS_CERT_EXPIRY: &str = "etcdmux_tls_cert_expiry_timestamp_seconds";
    pub const TLS_HANDSHAKES: &str = "etcdmux_tls_handshakes";
    pub const TLS_HANDSHAKE_FAILURES: &str = "etcdmux_tls_handshake_failures_total";
    pub const CROSS_ROOT_RANGES: &str = "etcdmux_cross_root_ranges_total";
    pub const CROSS_ROOT_DELETES: &str = "etcdmux_cross_root_deletes_total";
    pub const LEASES_GRANTED: &str = "etcdmux_leases_granted_total";
    pub const WATCH_STREAMS: &str = "etcdmux_watch_streams";
    pub const WATCH_WATCHERS: &str = "etcdmux_watch_watchers";
    pub const WATCH_UPSTREAM_WATCHES: &str = "etcdmux_watch_upstream_watches";
    pub const WATCH_RING_EVENTS: &str = "etcdmux_watch_ring_events";
    pub const WATCH_RING_BYTES: &str = "etcdmux_watch_ring_bytes";
    pub const WATCH_EVENTS_IN: &str = "etcdmux_watch_events_in_total";
    pub const WATCH_EVENTS_OUT: &str = "etcdmux_watch_events_out_total";
    pub const WATCH_CREATED: &str = "etcdmux_watch_created_total";
    pub const WATCH_CANCELLED: &str = "etcdmux_watch_cancelled_total";
    pub const WATCH_SLOW_CANCELS: &str = "etcdmux_watch_slow_cancels_total";
    pub const WATCH_CATCHUPS: &str = "etcdmux_watch_catchups_total";
    pub const WATCH_UPSTREAM_RESTARTS: &str = "etcdmux_watch_upstream_restarts_total";
    pub const WATCH_PROGRESS_FENCES: &str = "etcdmux_watch_progress_fences_total";
    pub const WATCH_PROGRESS_FENCE_FAILURES: &str = "etcdmux_watch_progress_fence_failures_total";
    pub const WATCH_PROGRESS_FENCE_WRITERS: &str = "etcdmux_watch_progress_fence_writers";
    pub const WATCH_PROGRESS_PROBES_FAILED: &str = "etcdmux_watch_progress_probes_failed_total";
    pub const WATCH_PROGRESS_WAITERS: &str = "etcdmux_watch_progress_waiters";
    pub const WATCH_QUEUED_RESPONSES: &str = "etcdmux_watch_queued_responses";
    pub const WATCH_STREAM_OVERFLOWS: &str = "etcdmux_watch_stream_overflows_total";
    pub const WATCH_HUB_LOCK_HOLD: &str = "etcdmux_watch_hub_lock_hold_seconds";
    pub const WATCH_HUB_LOCK_WAIT: &str = "etcdmux_watch_hub_lock_wait_seconds";
    pub const READY: &str = "etcdmux_ready";
    pub const UPSTREAM_PROBE_FAILURES: &str = "etcdmux_upstream_probe_failures_total";
    pub const TENANT_REQUESTS: &str = "etcdmux_tenant_requests_total";
    pub const TENANT_ERRORS: &str = "etcdmux_tenant_request_errors_total";
    pub const TENANT_BYTES: &str = "etcdmux_tenant_request_bytes_total";
    pub const TENANT_WATCHERS: &str = "etcdmux_tenant_watchers";
    pub const TENANT_EVENTS: &str = "etcdmux_tenant_events_sent_total";
    pub const CACHE_HITS: &str = "etcdmux_cache_hits_total";
    pub const CACHE_FORWARDED: &str = "etcdmux_cache_forwarded_total";
    pub const CACHE_BYTES: &str = "etcdmux_cache_bytes";
    pub const CACHE_KEYS: &str = "etcdmux_cache_keys";
    pub const CACHE_REVISION: &str = "etcdmux_cache_revision";
    pub const CACHE_OVER_BUDGET: &str = "etcdmux_cache_over_budget_total";
    pub const CACHE_EVICTIONS: &str = "etcdmux_cache_evictions_total";
    pub const CACHE_PIECE_LOADS: &str = "etcdmux_cache_piece_loads_total";
    pub const CACHE_PIECES_ABSENT: &str = "etcdmux_cache_pieces_absent";
    pub const CACHE_LOADS: &str = "etcdmux_cache_loads_total";
    pub const CACHE_LOAD_DURATION: &str = "etcdmux_cache_load_duration_seconds";
    pub const CACHE_READ_INDEX_CALLS: &str = "etcdmux_cache_read_index_calls_total";
    pub const CACHE_READ_WAIT: &str = "etcdmux_cache_read_wait_seconds";
    pub const TRACE_SPANS_EXPORTED: &str = "etcdmux_trace_spans_exported_total";
    pub const TRACE_SPANS_DROPPED: &str = "etcdmux_trace_spans_dropped_total";
}

/// Buckets of the latency histograms, in seconds: 0.5 ms to 10 s.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// What each metric is: (name, kind, unit, description).
const DESCRIPTIONS: &[(&str, Kind, Unit, &str)] = &[
    (names::GRPC_REQUESTS, Kind::Counter, Unit::Count, "gRPC calls answered, by method and grpc-status code"),
    (
        names::GRPC_REQUEST_DURATION,
        Kind::Histogram,
        Unit::Seconds,
        "Time to a call's answer (for streams: to the response headers), by method",
    ),
    (names::GRPC_INFLIGHT, Kind::Gauge, Unit::Count, "gRPC calls in progress, by method"),
    (
        names::OVERLOAD_REJECTIONS,
        Kind::Counter,
        Unit::Count,
        "Requests refused by a [limits] bound, by scope: global, connection (unary calls in progress), \
         watchers_per_stream (watch creates)",
    ),
    (
        names::CONNECTION_READ_YIELDS,
        Kind::Counter,
        Unit::Count,
        "Turns of a client connection's task that stopped reading after \
         server.connection_streams_per_turn new streams, so they and other connections could run",
    ),
    (
        names::REQUEST_ERRORS,
        Kind::Counter,
        Unit::Count,
        "Errors etcdmux raised itself (not passed on from etcd), by gRPC code",
    ),
    (names::UPSTREAM_ERRORS, Kind::Counter, Unit::Count, "Upstream calls that failed after retries, by gRPC code"),
    (names::UPSTREAM_RETRIES, Kind::Counter, Unit::Count, "Upstream calls sent again after a failure that allowed it"),
    (names::UPSTREAM_FAILOVERS, Kind::Counter, Unit::Count, "Moves of the upstream pool to the next etcd endpoint"),
    (names::UPSTREAM_CONNECTIONS, Kind::Gauge, Unit::Count, "HTTP/2 connections kept to the current etcd endpoint"),
    (
        names::UPSTREAM_REQUEST_DURATION,
        Kind::Histogram,
        Unit::Seconds,
        "Time etcd took to answer etcdmux's unary calls (every attempt of one call, errors included), by method; \
         beside etcdmux_grpc_request_duration_seconds it splits a slow answer into etcd's time and etcdmux's",
    ),
    (
        names::BACKEND_POOL_OPEN,
        Kind::Gauge,
        Unit::Count,
        "SQL backend: database connections open (at most backend.pool_size)",
    ),
    (
        names::BACKEND_POOL_WAITING,
        Kind::Gauge,
        Unit::Count,
        "SQL backend: calls waiting for a free database connection",
    ),
    (
        names::BACKEND_RETRIES,
        Kind::Counter,
        Unit::Count,
        "SQL backend: calls run again (a read after a lost connection, a transaction the database aborted)",
    ),
    (names::BACKEND_REVISION, Kind::Gauge, Unit::Count, "SQL backend: the store's revision as the change feed last read it"),
    (
        names::BACKEND_EXPIRY_LOCK,
        Kind::Gauge,
        Unit::Count,
        "SQL backend: 1 while this etcdmux holds the lease-expiry lock (expires leases, finishes compactions)",
    ),
    (names::BACKEND_LEASES_EXPIRED, Kind::Counter, Unit::Count, "SQL backend: leases this etcdmux revoked on expiry"),
    (names::BACKEND_COMPACTED_ROWS, Kind::Counter, Unit::Count, "SQL backend: history rows deleted by compaction"),
    (names::ROOT_INDEX_CACHED, Kind::Gauge, Unit::Count, "Root-index keys this process knows exist in etcd"),
    (
        names::ACCEPT_ERRORS,
        Kind::Counter,
        Unit::Count,
        "Failed accepts of client connections (e.g. out of file descriptors)",
    ),
    (
        names::TLS_RELOADS,
        Kind::Counter,
        Unit::Count,
        "Changed TLS files taken into use (result=ok) or refused, the old ones kept (result=error), \
         by target: upstream, listener",
    ),
    (
        names::TLS_CERT_EXPIRY,
        Kind::Gauge,
        Unit::Seconds,
        "Not-after (Unix time) of the certificate in use that etcdmux presents, by target (upstream, listener) \
         and file",
    ),
    (names::TLS_HANDSHAKES, Kind::Gauge, Unit::Count, "TLS handshakes with clients in progress, all listeners"),
    (
        names::TLS_HANDSHAKE_FAILURES,
        Kind::Counter,
        Unit::Count,
        "TLS handshakes with clients that failed, by reason: timeout (server.tls_handshake_timeout_ms), tls",
    ),
    (
        names::CROSS_ROOT_RANGES,
        Kind::Counter,
        Unit::Count,
        "Ranges that spanned resource roots (read through the root index)",
    ),
    (
        names::CROSS_ROOT_DELETES,
        Kind::Counter,
        Unit::Count,
        "Deletes that spanned resource roots (one guarded upstream txn)",
    ),
    (names::LEASES_GRANTED, Kind::Counter, Unit::Count, "Leases granted through etcdmux"),
    (names::WATCH_STREAMS, Kind::Gauge, Unit::Count, "Open client watch streams"),
    (names::WATCH_WATCHERS, Kind::Gauge, Unit::Count, "Client watchers registered in the hub"),
    (
        names::WATCH_UPSTREAM_WATCHES,
        Kind::Gauge,
        Unit::Count,
        "Upstream watches the hub holds open (its own, not catch-ups)",
    ),
    (names::WATCH_RING_EVENTS, Kind::Gauge, Unit::Count, "Events kept in the shared ring"),
    (names::WATCH_RING_BYTES, Kind::Gauge, Unit::Bytes, "Bytes of keys and values kept in the shared ring"),
    (names::WATCH_EVENTS_IN, Kind::Counter, Unit::Count, "Events received from the upstream watch"),
    (
        names::WATCH_HUB_LOCK_HOLD,
        Kind::Histogram,
        Unit::Seconds,
        "How long the watch hub's lock was held to apply one upstream batch of events (decode, dispatch to every matching watcher, the ring); every watch create, cancel and progress answer waits behind it",
    ),
    (
        names::WATCH_HUB_LOCK_WAIT,
        Kind::Histogram,
        Unit::Seconds,
        "How long the hub's upstream task waited for that lock before applying a batch of events: the delay other holders (creates, cancels, progress) added to every event of the batch",
    ),
    (names::WATCH_EVENTS_OUT, Kind::Counter, Unit::Count, "Events queued to client watchers"),
    (names::WATCH_CREATED, Kind::Counter, Unit::Count, "Client watchers created"),
    (names::WATCH_CANCELLED, Kind::Counter, Unit::Count, "Client watchers cancelled by their client"),
    (names::WATCH_SLOW_CANCELS, Kind::Counter, Unit::Count, "Watchers cancelled because their stream was full"),
    (
        names::WATCH_CATCHUPS,
        Kind::Counter,
        Unit::Count,
        "Watchers that caught up from etcd (start older than the ring)",
    ),
    (
        names::WATCH_UPSTREAM_RESTARTS,
        Kind::Counter,
        Unit::Count,
        "Re-openings of the hub's upstream watch after it broke",
    ),
    (
        names::WATCH_PROGRESS_FENCES,
        Kind::Counter,
        Unit::Count,
        "Fence writes made to prove watch progress on etcd without reliable progress answers",
    ),
    (
        names::WATCH_PROGRESS_FENCE_FAILURES,
        Kind::Counter,
        Unit::Count,
        "Progress fence writes that failed (etcd refused the write, or could not be reached)",
    ),
    (
        names::WATCH_PROGRESS_FENCE_WRITERS,
        Kind::Gauge,
        Unit::Count,
        "Progress fence writers running (at most one: probes are shared by every stream)",
    ),
    (
        names::WATCH_PROGRESS_PROBES_FAILED,
        Kind::Counter,
        Unit::Count,
        "Progress probes that gave up; the streams waiting for them ended with UNAVAILABLE",
    ),
    (names::WATCH_PROGRESS_WAITERS, Kind::Gauge, Unit::Count, "Progress requests waiting for their answer"),
    (
        names::WATCH_QUEUED_RESPONSES,
        Kind::Gauge,
        Unit::Count,
        "Responses queued on client watch streams and not yet read, progress answers owed included",
    ),
    (
        names::WATCH_STREAM_OVERFLOWS,
        Kind::Counter,
        Unit::Count,
        "Watch streams ended because their client left more than stream_buffer + stream_control_reserve unread",
    ),
    (
        names::READY,
        Kind::Gauge,
        Unit::Count,
        "1 when ready (etcd reachable, watch hub synced and current; what /readyz and grpc.health.v1 report), else 0",
    ),
    (
        names::UPSTREAM_PROBE_FAILURES,
        Kind::Counter,
        Unit::Count,
        "Health probes of etcd (every health.probe_interval_ms) that failed",
    ),
    (
        names::TENANT_REQUESTS,
        Kind::Counter,
        Unit::Count,
        "Unary calls whose tenant was resolved, by tenant (top N, else \"other\"), method and grpc-status code",
    ),
    (
        names::TENANT_ERRORS,
        Kind::Counter,
        Unit::Count,
        "Unary calls whose tenant was resolved and that ended with a non-OK code, by tenant (top N, else \"other\")",
    ),
    (
        names::TENANT_BYTES,
        Kind::Counter,
        Unit::Bytes,
        "Message bytes of unary calls whose tenant was resolved, by tenant (top N, else \"other\") and direction (in: requests, out: responses)",
    ),
    (
        names::TENANT_WATCHERS,
        Kind::Gauge,
        Unit::Count,
        "Client watchers registered in the hub, by tenant (top N, else \"other\")",
    ),
    (
        names::TENANT_EVENTS,
        Kind::Counter,
        Unit::Count,
        "Events queued to client watchers, by tenant (top N, else \"other\")",
    ),
    (
        names::CACHE_HITS,
        Kind::Counter,
        Unit::Count,
        "Ranges answered from the read replica, by consistency (linearizable, serializable, revision)",
    ),
    (
        names::CACHE_FORWARDED,
        Kind::Counter,
        Unit::Count,
        "Ranges the read replica sent to etcd, by reason (outside, excluded, not_loaded, lagging, before_window, \
         after_applied, compacted, sort, read_index_failed, etcd_behind, require_leader)",
    ),
    (
        names::CACHE_BYTES,
        Kind::Gauge,
        Unit::Bytes,
        "Bytes the read replica holds (keys, values, past versions, bookkeeping)",
    ),
    (names::CACHE_KEYS, Kind::Gauge, Unit::Count, "Keys the read replica holds"),
    (names::CACHE_REVISION, Kind::Gauge, Unit::Count, "The revision through which the read replica has applied etcd's changes"),
    (
        names::CACHE_OVER_BUDGET,
        Kind::Counter,
        Unit::Count,
        "Times the read replica ran over cache.max_bytes with nothing left to evict (emptied; it loads again), or a load met more data than it (it kept what fits)",
    ),
    (
        names::CACHE_EVICTIONS,
        Kind::Counter,
        Unit::Count,
        "Pieces (one tenant's keys in one resource) evicted from the read replica over cache.max_bytes, coldest first",
    ),
    (
        names::CACHE_PIECE_LOADS,
        Kind::Counter,
        Unit::Count,
        "Loads of evicted pieces, asked for by a read, by result (ok, error)",
    ),
    (
        names::CACHE_PIECES_ABSENT,
        Kind::Gauge,
        Unit::Count,
        "Pieces of the read replica evicted or loading (their reads go to etcd)",
    ),
    (names::CACHE_LOADS, Kind::Counter, Unit::Count, "Loads of the read replica, by result (ok, error)"),
    (names::CACHE_LOAD_DURATION, Kind::Histogram, Unit::Seconds, "Time a successful load of the read replica took"),
    (
        names::CACHE_READ_INDEX_CALLS,
        Kind::Counter,
        Unit::Count,
        "Upstream calls made to learn etcd's revision for linearizable reads (one per batch of reads)",
    ),
    (
        names::CACHE_READ_WAIT,
        Kind::Histogram,
        Unit::Seconds,
        "Time linearizable reads waited for the read replica to reach etcd's revision",
    ),
    (
        names::TRACE_SPANS_EXPORTED,
        Kind::Counter,
        Unit::Count,
        "Spans sent to the OTLP collector (tracing.otlp_endpoint)",
    ),
    (
        names::TRACE_SPANS_DROPPED,
        Kind::Counter,
        Unit::Count,
        "Sampled spans not exported, by reason: queue_full (tracing.queue_size), export_failed, shut_down",
    ),
];

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// The process's recorder, once installed.
static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Installs the Prometheus recorder (once per process: later calls, e.g. a second
/// etcdmux in one test process, share it) and describes every metric. The handle
/// renders the `/metrics` text.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let mut handle = HANDLE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(h) = handle.as_ref() {
        return Ok(h.clone());
    }
    let h = builder()?.install_recorder()?;
    describe();
    *handle = Some(h.clone());
    Ok(h)
}

/// The exporter's settings: latencies as histograms with [`LATENCY_BUCKETS`].
pub fn builder() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new().set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), LATENCY_BUCKETS)
}

/// Every metric etcdmux exports: (name, type as Prometheus names it, help text).
/// `docs/metrics.md` is checked against this list.
pub fn catalog() -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
    DESCRIPTIONS.iter().map(|&(name, kind, _, text)| {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        (name, kind, text)
    })
}

/// Registers each metric's description with the installed recorder.
pub fn describe() {
    for &(name, kind, unit, text) in DESCRIPTIONS {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, unit, text),
            Kind::Gauge => metrics::describe_gauge!(name, unit, text),
            Kind::Histogram => metrics::describe_histogram!(name, unit, text),
        }
    }
}
