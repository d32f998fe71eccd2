//! Shared integration-test harness, used by the test files through `mod common;`.
//!
//! Everything that does not need etcdmux (a private etcd per test, the relay,
//! `/metrics`, `etcdctl`) comes from the `etcdmux-testkit` workspace member and is
//! re-exported here; this module adds what does: an in-process etcdmux in front of an
//! etcd ([`start_mux`]), its test configs, and an `etcd-client` connection.
#![allow(dead_code)]

use std::net::SocketAddr;

pub use etcdmux_testkit::*;

/// An in-process etcdmux serving one upstream etcd.
pub struct Mux {
    /// `None` once shut down (`take()` it to call `Running::shutdown`).
    pub running: Option<etcdmux::grpc::server::Running>,
    /// Bound address of the first listener.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT` of the first listener.
    pub url: String,
}

impl Mux {
    /// Graceful shutdown (no-op if already shut down).
    pub async fn shutdown(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// Milo-style tenancy (the `[tenancy]` section of config/milo.toml): one listener
/// without a static tenant; `/projects/{tenant}/` and `/datum-core/` (tenant root).
pub const MILO_TOML: &str = r#"
[[listener]]
addr = "127.0.0.1:0"

[tenancy]
rule = [
  { prefix = "/projects/{tenant}/" },
  { prefix = "/datum-core/", tenant = "root" },
]
global_keys = ["compact_rev_key", "health"]
unmatched = "reject"
connection_identity = "root"
admin_identity = "root"
"#;

/// Sidecar-style config: one listener whose every key belongs to `tenant`
/// (mirrors config/static.toml).
pub fn static_toml(tenant: &str) -> String {
    format!(
        r#"
[[listener]]
addr = "127.0.0.1:0"
static_tenant = "{tenant}"

[tenancy]
global_keys = ["compact_rev_key", "health"]
admin_identity = "root"
"#
    )
}

/// Starts etcdmux in-process with config `toml`, pointed at `etcd`, every listener on
/// 127.0.0.1:0 (static tenants kept) and no metrics listener.
pub async fn start_mux(etcd: &Etcd, toml: &str) -> Mux {
    let (running, url) = start_mux_with(toml, vec![etcd.client_url.clone()]).await;
    Mux { addr: running.addrs[0], running: Some(running), url }
}

/// Starts etcdmux in-process with config `toml` on the SQL backend in `pg` (its
/// schema created first), every listener on 127.0.0.1:0, no metrics listener.
pub async fn start_mux_sql(pg: &Postgres, toml: &str) -> Mux {
    init_schema(&pg.dsn).await;
    let (running, url) = start_configured(toml, |cfg| {
        cfg.backend.kind = etcdmux::config::BackendKind::Sql;
        cfg.backend.dsn = pg.dsn.clone();
    })
    .await;
    Mux { addr: running.addrs[0], running: Some(running), url }
}

/// `etcdmux backend init` on the database at `dsn`.
pub async fn init_schema(dsn: &str) {
    etcdmux::backend::sql::schema::init(dsn, &Default::default(), std::time::Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("backend init: {e}"));
}

/// Which storage a parameterized test runs etcdmux on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Etcd,
    Sql,
}

/// etcdmux on `store` (a private etcd or PostgreSQL, kept alive by the returned guard).
pub async fn start_on(store: Store, toml: &str) -> (Mux, StoreGuard) {
    match store {
        Store::Etcd => {
            let etcd = Etcd::start();
            let mux = start_mux(&etcd, toml).await;
            (mux, StoreGuard::Etcd(etcd))
        }
        Store::Sql => {
            let pg = Postgres::start();
            let mux = start_mux_sql(&pg, toml).await;
            (mux, StoreGuard::Sql(pg))
        }
    }
}

/// The storage behind a [`start_on`] etcdmux.
pub enum StoreGuard {
    Etcd(Etcd),
    Sql(Postgres),
}

/// Starts etcdmux in-process with config `toml` and these upstream endpoints, in
/// order (every listener on 127.0.0.1:0, no metrics listener); returns it and the
/// URL of its first listener.
pub async fn start_mux_with(toml: &str, endpoints: Vec<String>) -> (etcdmux::grpc::server::Running, String) {
    start_configured(toml, |cfg| cfg.upstream.endpoints = endpoints).await
}

/// Starts etcdmux in-process with config `toml` changed by `set` (every listener on
/// 127.0.0.1:0, no metrics listener); returns it and its first listener's URL.
async fn start_configured(
    toml: &str,
    set: impl FnOnce(&mut etcdmux::config::Config),
) -> (etcdmux::grpc::server::Running, String) {
    let mut cfg = etcdmux::config::Config::parse(toml, "test config").unwrap_or_else(|e| panic!("{e}\n{toml}"));
    set(&mut cfg);
    for l in &mut cfg.listeners {
        l.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    }
    cfg.server.metrics_listen = None;
    cfg.validate().unwrap_or_else(|e| panic!("{e}\n{toml}"));
    let running = etcdmux::grpc::server::start(cfg).await.unwrap_or_else(|e| panic!("starting etcdmux: {e}"));
    let url = format!("http://127.0.0.1:{}", running.addrs[0].port());
    (running, url)
}

/// Starts etcdmux in-process like [`start_mux`], with a metrics listener (`/metrics`,
/// `/livez`, `/readyz`) on a free port; returns it and that listener's address.
pub async fn start_mux_with_metrics(etcd: &Etcd, toml: &str) -> (Mux, SocketAddr) {
    let mut cfg = etcdmux::config::Config::parse(toml, "test config").unwrap_or_else(|e| panic!("{e}\n{toml}"));
    cfg.upstream.endpoints = vec![etcd.client_url.clone()];
    for l in &mut cfg.listeners {
        l.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    }
    cfg.server.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg.validate().unwrap_or_else(|e| panic!("{e}\n{toml}"));
    let running = etcdmux::grpc::server::start(cfg).await.unwrap_or_else(|e| panic!("starting etcdmux: {e}"));
    let metrics = running.metrics_addr.expect("a metrics listener");
    let url = format!("http://127.0.0.1:{}", running.addrs[0].port());
    (Mux { addr: running.addrs[0], running: Some(running), url }, metrics)
}

/// `toml` for an etcdmux compared revision for revision with a second etcd: the
/// read replica waits for etcd's revision without asking the hub for progress (on
/// etcd < 3.4.31 that proof is a fence write, a revision the other etcd would not
/// have); a read that waits too long goes to etcd.
pub fn compared_with_etcd(toml: &str) -> String {
    format!("{toml}\n[cache]\nenabled = true\nnudge_after_ms = 2000\nmax_read_wait_ms = 2000\n")
}

/// `toml` with the read replica off: every range goes to etcd.
pub fn without_cache(toml: &str) -> String {
    format!("{toml}\n[cache]\nenabled = false\n")
}

/// An etcd-client connected to `url` (etcd or etcdmux).
pub async fn client(url: &str) -> etcd_client::Client {
    etcd_client::Client::connect([url], None).await.unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// Clears what differs between two etcds answering the same request (cluster,
/// member, term), so answers can be compared.
pub fn norm_header(h: &mut Option<etcdmux::pb::etcdserverpb::ResponseHeader>) {
    if let Some(h) = h {
        h.cluster_id = 0;
        h.member_id = 0;
        h.raft_term = 0;
    }
}

/// [`norm_header`] on every answer of a txn, nested ones too.
pub fn norm_ops(ops: &mut [etcdmux::pb::etcdserverpb::ResponseOp]) {
    for op in ops {
        match &mut op.response {
            Some(etcdmux::pb::etcdserverpb::response_op::Response::ResponseRange(r)) => norm_header(&mut r.header),
            Some(etcdmux::pb::etcdserverpb::response_op::Response::ResponsePut(r)) => norm_header(&mut r.header),
            Some(etcdmux::pb::etcdserverpb::response_op::Response::ResponseDeleteRange(r)) => {
                norm_header(&mut r.header)
            }
            Some(etcdmux::pb::etcdserverpb::response_op::Response::ResponseTxn(r)) => {
                norm_header(&mut r.header);
                norm_ops(&mut r.responses);
            }
            None => {}
        }
    }
}

/// A gRPC codec that sends and receives raw message bytes: puts garbage on a stream.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = bytes::Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: bytes::Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<bytes::Bytes>, tonic::Status> {
        Ok(Some(bytes::Buf::copy_to_bytes(src, bytes::Buf::remaining(src))))
    }
}

/// An answer in comparable form: the normalized response, or the error's code and text.
pub type Out = Result<String, (tonic::Code, String)>;

/// `r` as an [`Out`], after `norm` cleared what legitimately differs.
pub fn show<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, norm: impl FnOnce(&mut T)) -> Out {
    match r {
        Ok(resp) => {
            let mut v = resp.into_inner();
            norm(&mut v);
            Ok(format!("{v:?}"))
        }
        Err(s) => Err((s.code(), s.message().to_string())),
    }
}

/// The etcdmux binary run as an operator runs it, with `config`, listening on a free
/// port; returns once it answers `Status`.
#[allow(dead_code)]
pub async fn spawn_mux_process(config: &std::path::Path) -> (Proc, String) {
    let port = free_port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_etcdmux"))
        .arg("--config")
        .arg(config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting etcdmux");
    let proc = Proc(child);
    let url = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Ok(mut c) = etcd_client::Client::connect([url.as_str()], None).await {
            if c.status().await.is_ok() {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "etcdmux on {url} did not answer");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    (proc, url)
}
