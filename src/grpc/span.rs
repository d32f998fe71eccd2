//! A tower layer that runs every gRPC call in its own span (see [`crate::trace`]):
//! `method`, `request_id` and, once resolved, `tenant`, as a child of the caller's
//! W3C trace context. The request id goes back to the client in the answer's
//! `x-request-id` (streams included, in their response headers).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::HeaderValue;
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};
use tracing::instrument::Instrumented;

use crate::trace::call::{self, Call, REQUEST_ID};

#[derive(Debug, Clone, Copy, Default)]
pub struct CallSpanLayer;

impl<S> Layer<S> for CallSpanLayer {
    type Service = CallSpan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallSpan { inner }
    }
}

#[derive(Debug, Clone)]
pub struct CallSpan<S> {
    inner: S,
}

/// The `method` of a call: its path without the leading `/` (`etcdserverpb.KV/Range`)
/// when it looks like a gRPC path, else `other`, so a client cannot write what it
/// likes into the logs.
fn method(path: &str) -> &str {
    let m = path.strip_prefix('/').unwrap_or("");
    let plausible = !m.is_empty()
        && m.len() <= 128
        && m.bytes().filter(|&b| b == b'/').count() == 1
        && m.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/'));
    if plausible {
        m
    } else {
        "other"
    }
}

impl<S, B, RB> Service<http::Request<B>> for CallSpan<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = SpanFuture<Instrumented<TaskLocalFuture<Arc<Call>, S::Future>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let id = call::request_id(req.headers());
        let c = Call::start(method(req.uri().path()), id.to_str().unwrap_or("invalid"), req.headers());
        let inner = {
            let _in = c.span().enter();
            self.inner.call(req)
        };
        SpanFuture { call: c.clone(), inner: call::scope(c, inner), id, start: Instant::now() }
    }
}

pin_project! {
    pub struct SpanFuture<F> {
        #[pin]
        inner: F,
        call: Arc<Call>,
        id: HeaderValue,
        start: Instant,
    }
}

impl<F, RB, E> Future for SpanFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut out = std::task::ready!(this.inner.poll(cx));
        let _in = this.call.span().enter();
        if let Ok(resp) = &mut out {
            // An error answer is "trailers only": its grpc-status is in the headers.
            let code = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
            this.call.finish(code);
            resp.headers_mut().insert(REQUEST_ID, this.id.clone());
            tracing::debug!(elapsed_ms = this.start.elapsed().as_secs_f64() * 1e3, "answered");
        }
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_grpc_paths_or_other() {
        assert_eq!(method("/etcdserverpb.KV/Range"), "etcdserverpb.KV/Range");
        assert_eq!(method("/grpc.health.v1.Health/Check"), "grpc.health.v1.Health/Check");
        for bad in ["", "/", "KV/Range", "/a/b/c", "/a b/c", "/kv/range\n", &format!("/a/{}", "x".repeat(200))] {
            assert_eq!(method(bad), "other", "{bad:?}");
        }
    }
}
