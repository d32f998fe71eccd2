//! A tower layer that counts and times every gRPC call, so handlers need no metrics
//! code of their own. Each call runs with a per-call slot
//! ([`per_tenant::scope`]) in which the handler reports its tenant and message
//! sizes; the layer records them under the tenant's label when the call ends.

use crate::metrics::names;
use crate::metrics::per_tenant::{self, CallTenant, TenantSeries};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram};
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};

/// The layer and the series it records into. Handles are looked up in the recorder
/// once per method (and tenant label), not on every call: a lookup builds and hashes
/// the series' key, which showed as several percent of etcdmux's CPU per request.
/// Build it after the recorder is installed (the handles belong to the recorder that
/// was current when each was first used).
#[derive(Clone, Default)]
pub struct GrpcMetricsLayer {
    series: Arc<Series>,
}

impl GrpcMetricsLayer {
    pub fn new() -> GrpcMetricsLayer {
        GrpcMetricsLayer::default()
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner, series: self.series.clone() }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    series: Arc<Series>,
}

/// The method labels: known etcd methods as they are, anything else as `other`, so
/// a client cannot grow the label set. A method's number is its place here.
const METHODS: &[&str] = &[
    "/etcdserverpb.KV/Range",
    "/etcdserverpb.KV/Put",
    "/etcdserverpb.KV/DeleteRange",
    "/etcdserverpb.KV/Txn",
    "/etcdserverpb.KV/Compact",
    "/etcdserverpb.Watch/Watch",
    "/etcdserverpb.Lease/LeaseGrant",
    "/etcdserverpb.Lease/LeaseRevoke",
    "/etcdserverpb.Lease/LeaseKeepAlive",
    "/etcdserverpb.Lease/LeaseTimeToLive",
    "/etcdserverpb.Lease/LeaseLeases",
    "/etcdserverpb.Maintenance/Status",
    "/etcdserverpb.Maintenance/Alarm",
    "/etcdserverpb.Maintenance/Defragment",
    "/etcdserverpb.Maintenance/Hash",
    "/etcdserverpb.Maintenance/HashKV",
    "/etcdserverpb.Maintenance/Snapshot",
    "/etcdserverpb.Maintenance/MoveLeader",
    "/etcdserverpb.Maintenance/Downgrade",
    "/etcdserverpb.Cluster/MemberList",
    "/etcdserverpb.Cluster/MemberAdd",
    "/etcdserverpb.Cluster/MemberRemove",
    "/etcdserverpb.Cluster/MemberUpdate",
    "/etcdserverpb.Cluster/MemberPromote",
    OTHER,
];

const OTHER: &str = "other";

/// The number of a call's method in [`METHODS`] (the last, `other`, for any other path).
fn method_number(path: &str) -> usize {
    METHODS.iter().position(|k| *k == path).unwrap_or(METHODS.len() - 1)
}

/// Handles of the series a method's calls are recorded in.
struct MethodSeries {
    inflight: Gauge,
    duration: Histogram,
    ok: Counter,
}

/// What the layer records into: per method, registered on its first call.
struct Series {
    methods: Vec<OnceLock<MethodSeries>>,
    tenants: TenantSeries,
}

impl Default for Series {
    fn default() -> Series {
        Series { methods: METHODS.iter().map(|_| OnceLock::new()).collect(), tenants: TenantSeries::default() }
    }
}

impl Series {
    fn method(&self, n: usize) -> &MethodSeries {
        let method = METHODS[n];
        self.methods[n].get_or_init(|| MethodSeries {
            inflight: metrics::gauge!(names::GRPC_INFLIGHT, "method" => method),
            duration: metrics::histogram!(names::GRPC_REQUEST_DURATION, "method" => method),
            ok: metrics::counter!(names::GRPC_REQUESTS, "method" => method, "code" => "0"),
        })
    }
}

impl<S, B, RB> Service<http::Request<B>> for GrpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = MetricsFuture<TaskLocalFuture<Arc<CallTenant>, S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let call = Call::start(self.series.clone(), method_number(req.uri().path()));
        let inner = per_tenant::scope(call.tenant.clone(), self.inner.call(req));
        MetricsFuture { inner, call }
    }
}

/// One call in flight: counted in the gauge from [`Call::start`] until it ends,
/// exactly once: answered ([`Call::finish`]), or dropped unanswered (the client's
/// deadline passed or it reset the stream), which counts as CANCELLED.
struct Call {
    series: Arc<Series>,
    method: usize,
    start: Instant,
    done: bool,
    /// What the handler reported: tenant, message sizes.
    tenant: Arc<CallTenant>,
}

/// grpc-status of a call dropped before it was answered: CANCELLED.
const CANCELLED: &str = "1";

impl Call {
    fn start(series: Arc<Series>, method: usize) -> Call {
        series.method(method).inflight.increment(1.0);
        Call { series, method, start: Instant::now(), done: false, tenant: Arc::default() }
    }

    fn finish(&mut self, code: &str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let m = self.series.method(self.method);
        m.inflight.decrement(1.0);
        m.duration.record(self.start.elapsed().as_secs_f64());
        self.tenant.finish(&self.series.tenants, self.method, METHODS, code);
        if code == "0" {
            m.ok.increment(1);
        } else {
            let method = METHODS[self.method];
            metrics::counter!(names::GRPC_REQUESTS, "method" => method, "code" => code.to_string()).increment(1);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.done {
            self.finish(CANCELLED);
        }
    }
}

pin_project! {
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        call: Call,
    }
}

impl<F, RB, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        // An error answer is "trailers only": its grpc-status is in the headers.
        let code = match &out {
            Ok(resp) => resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("0"),
            Err(_) => "transport",
        };
        this.call.finish(code);
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    use tower::service_fn;

    const RANGE: &str = "/etcdserverpb.KV/Range";

    /// The value of the sample of `name` whose labels include every one of `labels`.
    fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
        text.lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with('{')))
            .find(|l| labels.iter().all(|lab| l.contains(lab)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    fn request() -> http::Request<()> {
        let mut req = http::Request::new(());
        *req.uri_mut() = http::Uri::from_static(RANGE);
        req
    }

    /// Regression: a call whose future was dropped unanswered (client deadline or
    /// reset) stayed in the in-flight gauge for ever and was never counted.
    #[test]
    fn a_call_dropped_unanswered_leaves_the_gauge_and_is_counted_once() {
        let recorder = crate::metrics::builder().expect("buckets").build_recorder();
        let handle = recorder.handle();
        let method = format!("method=\"{RANGE}\"");
        metrics::with_local_recorder(&recorder, || {
            let never =
                service_fn(|_: http::Request<()>| std::future::pending::<Result<http::Response<()>, Infallible>>());
            let mut svc = GrpcMetricsLayer::new().layer(never);
            let mut fut = Box::pin(svc.call(request()));
            let waker = futures::task::noop_waker();
            assert!(fut.as_mut().poll(&mut Context::from_waker(&waker)).is_pending());
            assert_eq!(sample(&handle.render(), names::GRPC_INFLIGHT, &[&method]), Some(1.0));
            drop(fut);

            // An answered call is counted with its grpc-status, once.
            let answer = service_fn(|_: http::Request<()>| async {
                let mut resp = http::Response::new(());
                resp.headers_mut().insert("grpc-status", http::HeaderValue::from_static("5"));
                Ok::<_, Infallible>(resp)
            });
            let mut svc = GrpcMetricsLayer::new().layer(answer);
            futures::executor::block_on(svc.call(request())).expect("answered");
        });
        let text = handle.render();
        assert_eq!(sample(&text, names::GRPC_INFLIGHT, &[&method]), Some(0.0), "{text}");
        assert_eq!(sample(&text, names::GRPC_REQUESTS, &[&method, "code=\"1\""]), Some(1.0), "{text}");
        assert_eq!(sample(&text, names::GRPC_REQUESTS, &[&method, "code=\"5\""]), Some(1.0), "{text}");
        let count = format!("{}_count", names::GRPC_REQUEST_DURATION);
        assert_eq!(sample(&text, &count, &[&method]), Some(2.0), "{text}");
        // A histogram, not a summary.
        let bucket = format!("{}_bucket", names::GRPC_REQUEST_DURATION);
        assert_eq!(sample(&text, &bucket, &[&method, "le=\"+Inf\""]), Some(2.0), "{text}");
    }
}
