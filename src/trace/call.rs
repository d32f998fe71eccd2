//! One gRPC call's trace context: its request id, its span, the caller's W3C trace
//! context, and how that context reaches etcd.
//!
//! `grpc::span` starts a [`Call`] per call and runs the call in it ([`scope`]); the
//! handlers report the tenant once it is resolved ([`record_tenant`]), tasks spawned
//! for the call (a keepalive relay) carry it along ([`in_call`]), as does the work a
//! stream does when polled ([`within`]); every upstream request gets its
//! `traceparent` ([`inject`]).

use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tokio::task::futures::TaskLocalFuture;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing::{field, Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Metadata key of the request id, in requests (the client's) and in answers.
pub const REQUEST_ID: &str = "x-request-id";
const TRACEPARENT: &str = "traceparent";
/// Longest client request id that is kept; a longer one is replaced.
const MAX_REQUEST_ID: usize = 64;

/// What travels with one call.
pub struct Call {
    span: Span,
    /// The caller's trace context, when it sent a valid `traceparent`: passed on to
    /// etcd as it is when etcdmux records no span of its own.
    parent: Option<Context>,
    /// Whether `tenant` has been recorded (the first tenant resolved counts).
    tenant: AtomicBool,
}

tokio::task_local! {
    static CALL: Arc<Call>;
}

impl Call {
    /// Starts the span of a call to `method` (the gRPC path's `service/method`)
    /// with `request_id`, as a child of the caller's trace context in `headers`.
    /// A malformed `traceparent` is ignored, as if none was sent.
    pub fn start(method: &str, request_id: &str, headers: &HeaderMap) -> Arc<Call> {
        let span = tracing::info_span!(
            "grpc",
            method,
            request_id,
            tenant = field::Empty,
            code = field::Empty,
            otel.name = method,
            otel.kind = "server",
            otel.status_code = field::Empty,
        );
        let parent = caller_context(headers);
        if let Some(cx) = &parent {
            // Fails only without the OpenTelemetry layer (no endpoint): nothing to parent.
            let _ = span.set_parent(cx.clone());
        }
        Arc::new(Call { span, parent, tenant: AtomicBool::new(false) })
    }

    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Records the call's answer: its grpc-status `code` (an error answered in
    /// the headers; 0 for an answer or stream that began).
    pub fn finish(&self, code: u32) {
        self.span.record("code", code);
        // OpenTelemetry's server-side errors for gRPC: the server's fault, not the request's.
        if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
            self.span.record("otel.status_code", "error");
        }
    }
}

/// Runs `fut` (one call) as `call`: in its span, with `call` as the current call.
pub fn scope<F: Future>(call: Arc<Call>, fut: F) -> tracing::instrument::Instrumented<TaskLocalFuture<Arc<Call>, F>> {
    let span = call.span.clone();
    CALL.scope(call, fut).instrument(span)
}

/// `fut`, to be spawned for the current call: it runs in the call's span and as
/// that call, so its upstream requests continue the call's trace. The span ends
/// when the call's last task does (a watch stream's span lasts as long as it).
pub fn in_call<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    match CALL.try_with(Arc::clone) {
        Ok(call) => {
            let span = call.span.clone();
            futures::future::Either::Left(CALL.scope(call, fut).instrument(span))
        }
        Err(_) => futures::future::Either::Right(fut.in_current_span()),
    }
}

/// The current call, to do work as it later, outside its future ([`within`]).
pub fn current() -> Option<Arc<Call>> {
    CALL.try_with(Arc::clone).ok()
}

/// Runs `f` as `call` (in its span, as the current call): for work a call's stream
/// does when polled, such as a watch stream reading its requests from the body
/// that sends its responses.
pub fn within<R>(call: Option<&Arc<Call>>, f: impl FnOnce() -> R) -> R {
    match call {
        Some(c) => {
            let _in = c.span.enter();
            CALL.sync_scope(c.clone(), f)
        }
        None => f(),
    }
}

/// Records the tenant of the current call, the first time it is resolved (a watch
/// stream whose watchers name several tenants keeps the first).
pub fn record_tenant(tenant: &str) {
    let _ = CALL.try_with(|c| {
        if !c.tenant.swap(true, Ordering::Relaxed) {
            c.span.record("tenant", tenant);
        }
    });
}

/// Adds the trace context to a request for etcd: the current span's (etcd's span
/// becomes its child), or, when etcdmux records no span, the caller's as it came.
pub fn inject(md: &mut MetadataMap) {
    let cx = Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(md));
        return;
    }
    let _ = CALL.try_with(|c| {
        if let Some(parent) = &c.parent {
            TraceContextPropagator::new().inject_context(parent, &mut MetadataInjector(md));
        }
    });
}

/// The caller's trace context, if it sent a well-formed `traceparent` (malformed
/// ones are ignored: never an error to the client).
fn caller_context(headers: &HeaderMap) -> Option<Context> {
    headers.get(TRACEPARENT)?;
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

/// The request id of a call: the client's `x-request-id` if it is well-formed (1
/// to 64 of `A-Z a-z 0-9 . _ : -`), else a new one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= MAX_REQUEST_ID
            && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
        {
            return v.clone();
        }
    }
    new_request_id()
}

/// A new request id: a random prefix per process and a counter (unique without
/// coordination, and cheap).
fn new_request_id() -> HeaderValue {
    static PREFIX: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let prefix = *PREFIX.get_or_init(|| RandomState::new().hash_one(std::process::id()) as u32);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // Written by hand: `format!` showed in the per-request profile.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 8 + 1 + 16];
    for (i, b) in id[..8].iter_mut().enumerate() {
        *b = HEX[(prefix >> (28 - 4 * i) & 0xf) as usize];
    }
    id[8] = b'-';
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, b) in id[9..9 + digits].iter_mut().enumerate() {
        *b = HEX[(n >> (4 * (digits - 1 - i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id[..9 + digits]).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry::Value;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("a header value"));
        }
        h
    }

    #[test]
    fn request_ids_are_the_clients_when_well_formed_else_new() {
        let id = |v: &str| request_id(&headers(&[(REQUEST_ID, v)]));
        assert_eq!(id("req-42:a_b.c"), "req-42:a_b.c");
        assert_eq!(id(&"x".repeat(64)), &"x".repeat(64));
        for bad in ["", "has space", "semi;colon", "ünïcode", &"x".repeat(65)] {
            let got = request_id(&headers(&[(REQUEST_ID, bad)]));
            assert_ne!(got.as_bytes(), bad.as_bytes(), "{bad:?} was kept");
        }
        let (a, b) = (request_id(&HeaderMap::new()), request_id(&HeaderMap::new()));
        assert_ne!(a, b, "new ids are unique");
        let prefix = |v: &HeaderValue| v.to_str().expect("ascii").split('-').next().map(str::to_string);
        assert_eq!(prefix(&a), prefix(&b), "one prefix per process");
        // `<8 hex digits>-<counter in hex>`, as `format!("{prefix:08x}-{n:x}")` writes it.
        let (p, n) = a.to_str().expect("ascii").split_once('-').expect("a dash");
        let (p2, n2) = b.to_str().expect("ascii").split_once('-').expect("a dash");
        assert_eq!(p.len(), 8);
        let (n, n2) = (u64::from_str_radix(n, 16).expect("hex"), u64::from_str_radix(n2, 16).expect("hex"));
        assert_eq!(format!("{:08x}-{n:x}", u32::from_str_radix(p, 16).expect("hex")), a.to_str().expect("ascii"));
        assert!(n2 > n && p2 == p);
    }

    #[test]
    fn only_a_well_formed_traceparent_is_the_callers_context() {
        let valid = format!("00-{TRACE}-{PARENT}-01");
        let cx = caller_context(&headers(&[(TRACEPARENT, &valid)])).expect("a valid traceparent");
        assert_eq!(cx.span().span_context().trace_id(), TraceId::from_hex(TRACE).expect("hex"));
        assert!(cx.span().span_context().is_remote());
        for bad in [
            "garbage".to_string(),
            format!("00-{TRACE}-{PARENT}"),
            format!("00-{}-{PARENT}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("ff-{TRACE}-{PARENT}-01"),
            format!("00-{TRACE}-{PARENT}-01-extra"),
        ] {
            assert!(caller_context(&headers(&[(TRACEPARENT, &bad)])).is_none(), "{bad:?} accepted");
        }
        assert!(caller_context(&HeaderMap::new()).is_none());
    }

    fn attr<'a>(span: &'a opentelemetry_sdk::trace::SpanData, key: &str) -> Vec<&'a Value> {
        span.attributes.iter().filter(|kv| kv.key.as_str() == key).map(|kv| &kv.value).collect()
    }

    #[tokio::test]
    async fn a_call_is_a_child_of_its_caller_with_its_fields_and_first_tenant() {
        let (subscriber, _provider, mut ended) = crate::trace::test_subscriber();
        let _default = tracing::subscriber::set_default(subscriber);
        let h = headers(&[(TRACEPARENT, &format!("00-{TRACE}-{PARENT}-01"))]);
        let call = Call::start("etcdserverpb.KV/Range", "req-1", &h);
        let own = scope(call, async {
            record_tenant("t1");
            // A spawned task of the call (a watch reader) reports into the same span.
            tokio::spawn(in_call(async { record_tenant("t2") })).await.expect("the task");
            Span::current().context().span().span_context().span_id()
        })
        .await;
        let span = ended.try_recv().expect("the call's span ended with its last handle");
        assert_eq!(span.span_context.trace_id(), TraceId::from_hex(TRACE).expect("hex"));
        assert_eq!(span.parent_span_id, SpanId::from_hex(PARENT).expect("hex"));
        assert_eq!(span.span_context.span_id(), own);
        assert_eq!(span.name, "etcdserverpb.KV/Range");
        assert_eq!(attr(&span, "method"), [&Value::from("etcdserverpb.KV/Range")]);
        assert_eq!(attr(&span, "request_id"), [&Value::from("req-1")]);
        assert_eq!(attr(&span, "tenant"), [&Value::from("t1")], "recorded once, the first");
    }

    #[tokio::test]
    async fn a_caller_that_did_not_sample_is_followed() {
        let (subscriber, _provider, mut ended) = crate::trace::test_subscriber();
        let _default = tracing::subscriber::set_default(subscriber);
        let h = headers(&[(TRACEPARENT, &format!("00-{TRACE}-{PARENT}-00"))]);
        let sampled = scope(Call::start("etcdserverpb.KV/Range", "req-2", &h), async {
            Span::current().context().span().span_context().is_sampled()
        })
        .await;
        assert!(!sampled);
        assert!(ended.try_recv().is_err(), "an unsampled span is not queued for export");
    }
}
