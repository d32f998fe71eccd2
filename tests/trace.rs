//! Logs and distributed tracing, end to end: a real etcd, the etcdmux binary (or an
//! in-process etcdmux), raw gRPC clients.
//!
//! - An in-test OTLP collector (a tonic `TraceService` server) receives etcdmux's
//!   spans; a client's `traceparent` is continued (same trace, the client's span as
//!   parent, method / tenant / request_id attributes).
//! - What reaches etcd is recorded by a real gRPC relay in front of it (HTTP/2,
//!   every request forwarded to etcd as it came, its headers kept): etcd's requests
//!   carry etcdmux's span as their parent in the same trace.
//! - `--log-format json` writes JSON lines with the call's fields.
//! - A malformed `traceparent` is ignored; the request succeeds.

mod common;

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcdmux::pb::etcdserverpb::{kv_client::KvClient, RangeRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};

use common::{free_port, Etcd};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const RANGE: &str = "/etcdserverpb.KV/Range";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A span as the collector received it, with its resource's attributes.
type Received = (Vec<KeyValue>, Span);

/// An OTLP/gRPC collector on a free port: every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("lock");
        for rs in req.into_inner().resource_spans {
            let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (resource.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn start() -> (Collector, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the collector");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let c = Collector::default();
        let svc = TraceServiceServer::new(c.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (c, url)
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().expect("lock").clone()
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.as_str()),
        _ => None,
    })
}

/// A gRPC relay in front of etcd that records each request's path and headers:
/// what etcdmux really sends upstream.
struct Recorder {
    seen: Arc<Mutex<Vec<(String, http::HeaderMap)>>>,
    url: String,
}

impl Recorder {
    async fn start(upstream: &str) -> Recorder {
        let etcd = tonic::transport::Endpoint::from_shared(upstream.to_string()).expect("url").connect_lazy();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the relay");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (etcd, log) = (etcd.clone(), log.clone());
                let relay = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    log.lock().expect("lock").push((req.uri().path().to_string(), req.headers().clone()));
                    let mut etcd = etcd.clone();
                    async move { etcd.ready().await?.call(req.map(tonic::body::Body::new)).await }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(sock), relay),
                );
            }
        });
        Recorder { seen, url }
    }

    /// The traceparents of the Range requests etcd was sent.
    fn range_traceparents(&self) -> Vec<String> {
        let seen = self.seen.lock().expect("lock");
        seen.iter()
            .filter(|(path, _)| path == RANGE)
            .filter_map(|(_, h)| Some(h.get("traceparent")?.to_str().ok()?.to_string()))
            .collect()
    }
}

/// A Range through etcdmux with these metadata; its answer's metadata.
async fn range(url: &str, metadata: &[(&'static str, &str)]) -> tonic::metadata::MetadataMap {
    let mut kv = KvClient::connect(url.to_string()).await.expect("connecting to etcdmux");
    let mut req = tonic::Request::new(RangeRequest { key: Bytes::from_static(b"/k"), ..Default::default() });
    for (k, v) in metadata {
        req.metadata_mut().insert(*k, v.parse().expect("a metadata value"));
    }
    kv.range(req).await.unwrap_or_else(|s| panic!("range with {metadata:?}: {s:?}")).metadata().clone()
}

/// The etcdmux binary, killed on drop; its stderr in a file.
struct Mux {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Mux {
    fn start(config: &str, args: &[&str]) -> Mux {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let path = dir.path().join("etcdmux.toml");
        std::fs::write(&path, config).expect("writing config");
        let stderr = std::fs::File::create(dir.path().join("stderr")).expect("stderr file");
        let child = Command::new(env!("CARGO_BIN_EXE_etcdmux"))
            .arg("--config")
            .arg(&path)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--static-tenant", "t1"])
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting etcdmux");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "etcdmux did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Mux { child, url: format!("http://127.0.0.1:{port}"), dir }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// SIGTERM, and waits (at most 10 s) for a clean exit.
    fn terminate(&mut self) {
        let ok = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().expect("kill");
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "etcdmux exited with {status}\n{}", self.stderr());
                return;
            }
            assert!(Instant::now() < deadline, "etcdmux still running 10 s after SIGTERM\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The apiserver's traceparent is continued: etcdmux's span is its child (with
/// method, tenant and request id) and etcd's requests are children of etcdmux's
/// span. Spans are exported only at shutdown here (a long interval), which proves
/// the flush. A malformed traceparent is ignored: the call succeeds as a new trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_goes_from_the_client_through_etcdmux_to_etcd() {
    let etcd = Etcd::start();
    let relay = Recorder::start(&etcd.client_url).await;
    let (collector, otlp) = Collector::start().await;
    let config = format!(
        "[upstream]\nendpoints = [\"{}\"]\n\n[tracing]\notlp_endpoint = \"{otlp}\"\nservice_name = \"etcdmux-test\"\nexport_interval_ms = 600000\n",
        relay.url
    );
    let mut mux = Mux::start(&config, &[]);

    let answer =
        range(&mux.url, &[("traceparent", &format!("00-{TRACE}-{PARENT}-01")), ("x-request-id", "support-1")]).await;
    assert_eq!(answer.get("x-request-id").and_then(|v| v.to_str().ok()), Some("support-1"));
    let answer = range(&mux.url, &[("traceparent", "00-not-a-trace-01"), ("x-request-id", "support-2")]).await;
    assert_eq!(answer.get("x-request-id").and_then(|v| v.to_str().ok()), Some("support-2"));
    let generated = range(&mux.url, &[]).await;
    assert!(generated.get("x-request-id").is_some(), "a request id is made when the client sends none");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(collector.spans().is_empty(), "exported before the interval: the shutdown flush would go untested");

    mux.terminate();
    let spans = collector.spans();
    let by_id = |id: &str| {
        spans
            .iter()
            .find(|(_, s)| attr(&s.attributes, "request_id") == Some(id))
            .unwrap_or_else(|| panic!("no span with request_id {id} in {spans:#?}\n{}", mux.stderr()))
    };
    let (resource, span) = by_id("support-1");
    assert_eq!(hex(&span.trace_id), TRACE, "the client's trace");
    assert_eq!(hex(&span.parent_span_id), PARENT, "the client's span is the parent");
    assert_eq!(span.name, "etcdserverpb.KV/Range");
    assert_eq!(attr(&span.attributes, "method"), Some("etcdserverpb.KV/Range"));
    assert_eq!(attr(&span.attributes, "tenant"), Some("t1"));
    assert_eq!(attr(resource, "service.name"), Some("etcdmux-test"));

    // etcd was asked in the same trace, as a child of etcdmux's span.
    let upstream = relay.range_traceparents();
    let want = format!("00-{TRACE}-{}-01", hex(&span.span_id));
    assert!(upstream.contains(&want), "etcd got {upstream:?}, not {want}");

    // The malformed traceparent: a trace of its own, and etcd's request in it.
    let (_, fresh) = by_id("support-2");
    assert!(fresh.parent_span_id.is_empty(), "a root span: {fresh:?}");
    assert_ne!(hex(&fresh.trace_id), TRACE);
    let want = format!("00-{}-{}-01", hex(&fresh.trace_id), hex(&fresh.span_id));
    assert!(upstream.contains(&want), "etcd got {upstream:?}, not {want}");
}

/// While etcdmux runs, spans go out within `export_interval_ms` (`--otlp-endpoint`
/// given as a flag), counted in `etcdmux_trace_spans_exported_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_on_their_interval_and_counted() {
    let etcd = Etcd::start();
    let (collector, otlp) = Collector::start().await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let config = format!("[upstream]\nendpoints = [\"{}\"]\n\n[tracing]\nexport_interval_ms = 200\n", etcd.client_url);
    let mux = Mux::start(&config, &["--otlp-endpoint", &otlp, "--metrics-listen", &metrics]);
    range(&mux.url, &[("x-request-id", "periodic-1")]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !collector.spans().iter().any(|(_, s)| attr(&s.attributes, "request_id") == Some("periodic-1")) {
        assert!(Instant::now() < deadline, "the span was not exported within 10 s\n{}", mux.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Counted once the collector has answered, a moment after it received them.
    loop {
        let exported = common::scrape_metric(&format!("http://{metrics}"), "etcdmux_trace_spans_exported_total");
        if exported.is_some_and(|n| n >= 1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "exported spans not counted: {exported:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `--log-format json`: each line is a JSON object, and the call's lines carry its
/// method, tenant and request id (under `span`) for a log aggregator to filter on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_the_calls_fields() {
    let etcd = Etcd::start();
    let config = format!("[upstream]\nendpoints = [\"{}\"]\n", etcd.client_url);
    let mux = Mux::start(&config, &["--log-format", "json", "--log-level", "info,etcdmux=debug"]);
    range(&mux.url, &[("x-request-id", "json-1")]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = mux.stderr();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
            .collect();
        let found = lines.iter().any(|l| {
            let span = &l["span"];
            span["method"] == "etcdserverpb.KV/Range" && span["tenant"] == "t1" && span["request_id"] == "json-1"
        });
        if found {
            break;
        }
        assert!(Instant::now() < deadline, "no line with the call's method, tenant and request id:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Without an OTLP endpoint etcdmux records no spans, yet the caller's trace is
/// not cut: its traceparent reaches etcd as it came. A malformed one is dropped,
/// and the request succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_export_the_callers_traceparent_reaches_etcd_unchanged() {
    let etcd = Etcd::start();
    let relay = Recorder::start(&etcd.client_url).await;
    let mux = common::start_mux_with(&common::static_toml("t1"), vec![relay.url.clone()]).await;
    let url = mux.1;

    range(&url, &[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01")]).await;
    range(&url, &[("traceparent", "garbage")]).await;
    assert_eq!(relay.range_traceparents(), Vec::<String>::new(), "a malformed traceparent was passed on");

    let sent = format!("00-{TRACE}-{PARENT}-01");
    let answer = range(&url, &[("traceparent", &sent)]).await;
    assert_eq!(relay.range_traceparents(), vec![sent]);
    assert!(answer.get("x-request-id").is_some());
}
