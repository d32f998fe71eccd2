//! What travels with one request to etcd: its deadline, etcd's `hasleader`
//! metadata, the trace context (`traceparent`), and whether it may be sent twice.
//!
//! A unary call always has a deadline: the client's, or the configured default. A
//! stream ([`StreamCtx`]) has one only when its client sent one: a keepalive or a
//! snapshot may rightly last longer than any default.

use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::Request;

/// etcd's metadata key asking that a request fail when the cluster has no leader.
pub const REQUIRE_LEADER: &str = "hasleader";

/// Whether a call may be sent again after an ambiguous failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Reads, status, keepalive-free calls: repeat on any `UNAVAILABLE`.
    Safe,
    /// Writes: repeat only when the connection was never established.
    OnlyUnsent,
}

/// What travels with one client request to etcd: its deadline and the metadata
/// etcd acts on.
#[derive(Debug, Clone)]
pub struct CallCtx {
    pub deadline: Instant,
    pub require_leader: bool,
}

impl CallCtx {
    /// Takes the client's `grpc-timeout` (or the configured default) and
    /// `hasleader` from an incoming request.
    pub fn from_request<T>(req: &Request<T>, default_timeout: Duration) -> CallCtx {
        Self::from_metadata(req.metadata(), default_timeout)
    }

    pub fn from_metadata(md: &tonic::metadata::MetadataMap, default_timeout: Duration) -> CallCtx {
        let timeout = client_timeout(md).unwrap_or(default_timeout);
        CallCtx { deadline: Instant::now() + timeout, require_leader: md.get(REQUIRE_LEADER).is_some() }
    }

    /// An outgoing request carrying the remaining deadline, `hasleader` and the
    /// current call's trace context.
    pub fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.set_timeout(self.deadline.saturating_duration_since(Instant::now()));
        if self.require_leader {
            req.metadata_mut().insert(REQUIRE_LEADER, MetadataValue::from_static("true"));
        }
        crate::trace::inject(req.metadata_mut());
        req
    }
}

/// The `grpc-timeout` a client sent, if any (and if it parses).
fn client_timeout(md: &tonic::metadata::MetadataMap) -> Option<Duration> {
    md.get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout)
}

/// What travels with one client stream to etcd: the client's deadline, only if it
/// sent one, and `hasleader`.
#[derive(Debug, Clone)]
pub struct StreamCtx {
    pub deadline: Option<Instant>,
    pub require_leader: bool,
}

impl StreamCtx {
    /// Takes the client's `grpc-timeout` (no default) and `hasleader` from an
    /// incoming stream.
    pub fn from_request<T>(req: &Request<T>) -> StreamCtx {
        Self::from_metadata(req.metadata())
    }

    pub fn from_metadata(md: &tonic::metadata::MetadataMap) -> StreamCtx {
        StreamCtx {
            deadline: client_timeout(md).map(|t| Instant::now() + t),
            require_leader: md.get(REQUIRE_LEADER).is_some(),
        }
    }

    /// The outgoing stream: the remaining deadline if the client set one,
    /// `hasleader`, and the current call's trace context.
    pub fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Some(d) = self.deadline {
            req.set_timeout(d.saturating_duration_since(Instant::now()));
        }
        if self.require_leader {
            req.metadata_mut().insert(REQUIRE_LEADER, MetadataValue::from_static("true"));
        }
        crate::trace::inject(req.metadata_mut());
        req
    }

    /// The context of one unary call made on the stream's behalf (a lease check):
    /// the default deadline from now, but never past the stream's own.
    pub fn unary(&self, default_timeout: Duration) -> CallCtx {
        let default = Instant::now() + default_timeout;
        CallCtx { deadline: self.deadline.map_or(default, |d| d.min(default)), require_leader: self.require_leader }
    }
}

/// Parses gRPC's `grpc-timeout` header: up to 8 digits and a unit (H M S m u n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
    }

    fn metadata(pairs: &[(&'static str, &'static str)]) -> tonic::metadata::MetadataMap {
        let mut md = tonic::metadata::MetadataMap::new();
        for (k, v) in pairs {
            md.insert(*k, MetadataValue::from_static(v));
        }
        md
    }

    #[tokio::test(start_paused = true)]
    async fn streams_carry_a_deadline_only_when_the_client_sent_one() {
        let default = Duration::from_secs(30);
        // Regression: a keepalive stream without a client deadline went upstream with
        // the unary default as grpc-timeout, and etcd ended it after 30 s.
        let s = StreamCtx::from_metadata(&metadata(&[(REQUIRE_LEADER, "true")]));
        assert_eq!(s.deadline, None);
        let req = s.request(());
        assert!(req.metadata().get("grpc-timeout").is_none());
        assert!(req.metadata().get(REQUIRE_LEADER).is_some());
        // Its unary calls keep the default.
        let u = s.unary(default);
        assert_eq!(u.deadline, Instant::now() + default);
        assert!(u.require_leader);
        assert!(u.request(()).metadata().get("grpc-timeout").is_some());

        let s = StreamCtx::from_metadata(&metadata(&[("grpc-timeout", "5S")]));
        assert_eq!(s.deadline, Some(Instant::now() + Duration::from_secs(5)));
        assert!(s.request(()).metadata().get("grpc-timeout").is_some());
        assert!(s.request(()).metadata().get(REQUIRE_LEADER).is_none());
        assert_eq!(s.unary(default).deadline, Instant::now() + Duration::from_secs(5), "never past the stream's");
        assert_eq!(s.unary(Duration::from_secs(1)).deadline, Instant::now() + Duration::from_secs(1));

        // Unary calls: the client's deadline, else the default.
        assert_eq!(CallCtx::from_metadata(&metadata(&[]), default).deadline, Instant::now() + default);
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    const TRACESTATE: &str = "vendor=abc,other=1";

    fn client_headers(traceparent: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", http::HeaderValue::from_str(traceparent).expect("a header value"));
        h.insert("tracestate", http::HeaderValue::from_static(TRACESTATE));
        h
    }

    /// What a call sends to etcd: the traceparent of a unary request and of a
    /// stream, the unary request's tracestate; and the call's own span id.
    async fn upstream_context(client: http::HeaderMap) -> ([Option<String>; 3], String) {
        use crate::trace::call::{scope, Call};
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let call = Call::start("etcdserverpb.KV/Range", "req-1", &client);
        scope(call, async {
            let get = |r: &Request<()>, k: &str| r.metadata().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
            let unary = CallCtx::from_metadata(&metadata(&[]), Duration::from_secs(1)).request(());
            let stream = StreamCtx::from_metadata(&metadata(&[])).request(());
            let own = tracing::Span::current().context().span().span_context().span_id();
            ([get(&unary, "traceparent"), get(&stream, "traceparent"), get(&unary, "tracestate")], format!("{own}"))
        })
        .await
    }

    #[tokio::test]
    async fn upstream_requests_continue_the_calls_trace() {
        let (subscriber, _provider, _ended) = crate::trace::test_subscriber();
        let _default = tracing::subscriber::set_default(subscriber);
        let ([unary, stream, state], own) = upstream_context(client_headers(&format!("00-{TRACE}-{PARENT}-01"))).await;
        // etcd's span is a child of etcdmux's span, in the caller's trace.
        let want = format!("00-{TRACE}-{own}-01");
        assert_ne!(own, PARENT);
        assert_eq!(unary.as_deref(), Some(want.as_str()));
        assert_eq!(stream.as_deref(), Some(want.as_str()));
        assert_eq!(state.as_deref(), Some(TRACESTATE), "the caller's tracestate goes on");
        // Outside a call (the hub's own watch) nothing is added.
        let outside = CallCtx::from_metadata(&metadata(&[]), Duration::from_secs(1)).request(());
        assert!(outside.metadata().get("traceparent").is_none());
    }

    #[tokio::test]
    async fn without_spans_of_its_own_the_callers_trace_is_passed_on() {
        // No OpenTelemetry layer (no otlp_endpoint): the caller's context as it came.
        let sent = format!("00-{TRACE}-{PARENT}-01");
        let ([unary, stream, state], _) = upstream_context(client_headers(&sent)).await;
        assert_eq!(unary.as_deref(), Some(sent.as_str()));
        assert_eq!(stream.as_deref(), Some(sent.as_str()));
        assert_eq!(state.as_deref(), Some(TRACESTATE));
        // A malformed one is not passed on.
        let (sent, _) = upstream_context(client_headers(&format!("00-{TRACE}-{PARENT}"))).await;
        assert_eq!(sent, [None, None, None]);
    }
}
