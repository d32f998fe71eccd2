//! The metrics listener: a minimal HTTP/1.1 server for `/livez`, `/readyz` and
//! `/metrics` (GET or HEAD); 404 for any other path.
//!
//! - `/livez`: 200 whenever the process answers at all.
//! - `/readyz`: 200 when ready, 503 otherwise; the body says which check failed
//!   (`upstream: ...`, `watch: ...`), as Kubernetes' `/readyz?verbose` does.
//! - `/metrics`: the Prometheus text exposition of every metric.
//!
//! The accept loop is an owned task that ends at the shutdown signal; each
//! connection is a task of `proxy.tasks` dropped at the signal.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use super::Health;
use crate::shutdown::Tasks;

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves connections from `listener` until the shutdown signal.
pub async fn serve(listener: TcpListener, health: Arc<Health>, handle: PrometheusHandle, tasks: Tasks) {
    loop {
        let stream = tokio::select! {
            _ = tasks.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (health, handle) = (health.clone(), handle.clone());
        let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
            let answer = answer(&health, &handle, &req);
            async move { Ok::<_, Infallible>(answer) }
        });
        tasks.spawn_until_shutdown(async move {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics listener: connection ended with an error");
            }
        });
    }
}

fn answer<B>(health: &Health, handle: &PrometheusHandle, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".to_string());
    }
    match req.uri().path() {
        "/livez" => text(StatusCode::OK, "ok\n".to_string()),
        "/readyz" => {
            let r = health.readiness();
            let code = if r.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            text(code, r.report())
        }
        "/metrics" => {
            handle.run_upkeep();
            let mut resp = text(StatusCode::OK, handle.render());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "not found: etcdmux serves /livez, /readyz and /metrics\n".to_string()),
    }
}

fn text(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}
