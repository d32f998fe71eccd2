//! Configuration: one serde struct loaded from TOML, then overridden by command-line
//! flags (see `main.rs`), then validated once. Everything else takes a validated
//! [`Config`]; nothing reads the file or the environment later.
//!
//! The example files in `config/` document every field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::keyspace::{Resolver, TenantName};

mod backend;
pub use backend::{BackendConfig, BackendKind};

mod migrate;
pub use migrate::MigrateConfig;

mod tls;
pub use crate::keyspace::{RuleConfig, TenancyConfig, UnmatchedPolicy};
pub use crate::trace::{LogConfig, LogFormat, TracingConfig};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listeners", rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub server: ServerConfig,
    /// `[backend]`: etcd (`[upstream]`) or a SQL database.
    #[serde(default)]
    pub backend: BackendConfig,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub layout: LayoutConfig,
    #[serde(default)]
    pub tenancy: TenancyConfig,
    #[serde(default)]
    pub leases: LeaseConfig,
    #[serde(default)]
    pub watch: WatchConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    /// `[log]`: text or JSON lines on stderr, and their level.
    #[serde(default)]
    pub log: LogConfig,
    /// `[tracing]`: W3C trace context and OTLP span export (off by default).
    #[serde(default)]
    pub tracing: TracingConfig,
    /// `[migrate]`: `etcdmux migrate` (moving an existing installation into the layout).
    #[serde(default)]
    pub migrate: MigrateConfig,
}

/// One gRPC listener. Several listeners let one etcdmux serve several sidecar
/// apiservers, each pinned to its own static tenant.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    /// Every request on this listener belongs to this tenant (sidecar mode).
    #[serde(default)]
    pub static_tenant: Option<String>,
    /// TLS towards clients (etcd's names): this listener's certificate and key (PEM).
    /// Without them the listener speaks plaintext. Like `trusted_ca_file`, read again
    /// every `server.tls_reload_interval_ms`: new connections get the new ones.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates must chain to; used with
    /// `client_cert_auth`.
    #[serde(default)]
    pub trusted_ca_file: Option<PathBuf>,
    /// Refuse clients without a certificate from `trusted_ca_file` at the handshake.
    /// With `[tenancy.identity]`, the certificate also names the request's principal.
    #[serde(default)]
    pub client_cert_auth: bool,
}

impl ListenerConfig {
    /// A plaintext listener on `addr` without a static tenant.
    pub fn plain(addr: SocketAddr) -> ListenerConfig {
        ListenerConfig {
            addr,
            static_tenant: None,
            cert_file: None,
            key_file: None,
            trusted_ca_file: None,
            client_cert_auth: false,
        }
    }

    pub fn is_tls(&self) -> bool {
        self.cert_file.is_some()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Prometheus `/metrics` listener; none when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// Client URLs returned by `MemberList`, so clients that sync their member list
    /// keep talking to etcdmux. Defaults to `http://<listener addr>` of each listener.
    pub advertise_client_urls: Vec<String>,
    /// The etcd version `Status` reports. The apiserver enables consistent reads from
    /// its cache only for >= 3.4.31 / >= 3.5.13, so report a version whose features
    /// etcdmux implements.
    pub advertised_version: String,
    /// Largest request etcdmux decodes; keep it at or above etcd's
    /// `--max-request-bytes` plus gRPC overhead so that etcd, not etcdmux, answers
    /// "etcdserver: request is too large".
    pub max_request_bytes: usize,
    /// Largest response etcdmux encodes.
    pub max_response_bytes: usize,
    /// HTTP/2 streams one client connection may have open at once.
    pub max_concurrent_streams: u32,
    /// HTTP/2 flow-control window of one client connection: request bytes it may
    /// send that etcdmux has not read yet (the bound of what a connection buffers).
    /// h2 also ends a connection holding too many small unread DATA frames (its
    /// guard allows about one per 512 bytes of this window): an apiserver opening
    /// thousands of watch streams at once on one connection sends one small request
    /// each before etcdmux reads them. The default takes a burst of about 20,000
    /// (hyper's 1 MiB: about 2,500). Default 8388608 (8 MiB).
    pub connection_window_bytes: u32,
    /// Streams (calls) one client connection may open per turn of its task; then
    /// it lets the new streams and other connections run. Without it a burst of new
    /// streams waits whole in h2's per-connection tables, which keep their largest
    /// size for the connection's life, and a connection opening calls in a flood
    /// holds a worker thread. Request bodies do not count. At least 1. Default 32.
    pub connection_streams_per_turn: usize,
    /// How long a graceful shutdown (SIGTERM) may take, for all listeners together:
    /// unary calls in flight finish, watch streams end with `UNAVAILABLE`, the watch
    /// hub stops last. What is still running then is closed.
    pub shutdown_grace_ms: u64,
    /// Tenants with their own `tenant` label on the `etcdmux_tenant_*` metrics (the
    /// busiest, picked by a bounded sketch; labels are kept once given); all others
    /// are summed as `tenant="other"`. 0: no per-tenant metrics.
    pub tenant_metrics_top: usize,
    /// How often the TLS files (`[upstream]` cacert/cert/key, each listener's
    /// cert_file/key_file/trusted_ca_file) are read to see whether they changed; new
    /// ones are used for new connections, open ones keep theirs. Files that do not
    /// parse or do not match keep the old ones in use and are tried again next time.
    /// 0: read at start only. Default 10000.
    pub tls_reload_interval_ms: u64,
    /// A client that has not finished its TLS handshake within this is disconnected.
    /// Default 10000.
    pub tls_handshake_timeout_ms: u64,
    /// TLS handshakes in progress on one listener; beyond it new connections wait in
    /// the kernel's backlog until one finishes or times out. Default 1024.
    pub tls_max_handshakes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            metrics_listen: None,
            advertise_client_urls: Vec::new(),
            advertised_version: "3.5.17".to_string(),
            max_request_bytes: 2 * 1024 * 1024 + 512 * 1024,
            max_response_bytes: 256 * 1024 * 1024,
            max_concurrent_streams: 10_000,
            connection_window_bytes: 8 * 1024 * 1024,
            connection_streams_per_turn: 32,
            shutdown_grace_ms: 10_000,
            tenant_metrics_top: 100,
            tls_reload_interval_ms: 10_000,
            tls_handshake_timeout_ms: 10_000,
            tls_max_handshakes: 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// etcd client URLs (`http://host:port`). Requests go to one endpoint at a time
    /// and fail over to the next when it is unreachable.
    pub endpoints: Vec<String>,
    /// HTTP/2 connections kept to the current endpoint, whatever the tenant count.
    pub connections: usize,
    pub connect_timeout_ms: u64,
    /// Deadline for a request whose client sent none.
    pub default_timeout_ms: u64,
    /// etcd's `--max-txn-ops`: ranges that span resource roots are split into
    /// transactions of at most this many operations.
    pub max_txn_ops: usize,
    /// HTTP/2 keepalive ping interval towards etcd.
    pub keepalive_interval_ms: u64,
    /// TLS towards etcd, for `https://` endpoints: the CA bundle (PEM) etcd's
    /// certificate must chain to (required: the system roots are not used). Like
    /// `cert` and `key`, read again every `server.tls_reload_interval_ms`: calls
    /// from then on use new connections, streams already open keep theirs.
    pub cacert: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd's `--client-cert-auth`; both or neither.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name etcd's certificate is checked against, instead of the endpoint's host.
    pub server_name: Option<String>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            endpoints: vec!["http://127.0.0.1:2379".to_string()],
            connections: 2,
            connect_timeout_ms: 3_000,
            default_timeout_ms: 30_000,
            max_txn_ops: 128,
            keepalive_interval_ms: 10_000,
            cacert: None,
            cert: None,
            key: None,
            server_name: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LayoutConfig {
    /// Upstream prefix of the kplane-compatible layout:
    /// `<prefix>/<resource>/clusters/<tenant><rest>`.
    pub prefix: String,
    /// etcdmux's own bookkeeping (resource-root index, lease owners, keys without a
    /// leading `/`). Must not overlap `prefix`.
    pub meta_prefix: String,
    /// Root-index keys remembered as present in etcd (an evicted one only costs one
    /// idempotent index write on the next put into its slot). The root index holds
    /// one key per resource root in use, whatever the number of tenants.
    pub root_cache_capacity: u64,
    /// Also write the per-tenant index of versions before the shared root index
    /// (`<meta_prefix>/roots/<tenant>/<slot>`, one key per tenant and root). Turn it on
    /// only while etcdmux replicas of such a version still serve the same etcd (a
    /// rolling upgrade): they read only that form. This version reads both forms.
    pub write_tenant_index: bool,
}

impl Default for LayoutConfig {
    fn default() -> Self {
        LayoutConfig {
            prefix: "/registry".to_string(),
            meta_prefix: "/etcdmux".to_string(),
            root_cache_capacity: 100_000,
            write_tenant_index: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// How long a lease's owner is remembered before it is read from etcd again.
    pub owner_cache_ttl_ms: u64,
    pub owner_cache_capacity: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig { owner_cache_ttl_ms: 5_000, owner_cache_capacity: 100_000 }
    }
}

/// The watch hub: one shared upstream watch, a bounded event ring, bounded
/// per-stream queues.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// Events kept in the shared ring (watchers starting at a revision still in the
    /// ring are served from it, older ones catch up from etcd first).
    pub ring_events: usize,
    /// Bytes of keys and values kept in the ring.
    pub ring_bytes: usize,
    /// Responses queued for one client stream (events, progress answers and the
    /// progress requests still waiting for theirs, created and cancel responses
    /// alike); a watcher whose events find the stream that far behind is cancelled
    /// (it can resume from its last revision), and the stream's requests are not read
    /// until its client reads.
    pub stream_buffer: usize,
    /// Places above `stream_buffer` for responses that must not be lost (created,
    /// cancels, progress answers). A stream that would need more ends with
    /// `UNAVAILABLE` (its client reconnects and resumes), so one stream never holds
    /// more than `stream_buffer + stream_control_reserve` responses.
    pub stream_control_reserve: usize,
    /// Largest number of events in one response when replaying history.
    pub replay_batch: usize,
    /// Interval of progress notifications to watchers that asked for them
    /// (etcd's default is 10 minutes).
    pub progress_notify_interval_ms: u64,
    /// Watchers catching up from etcd at once; more wait their turn.
    pub max_catchups: usize,
    /// Delay before re-opening a broken upstream watch (doubles up to 5 s).
    pub reconnect_backoff_ms: u64,
    /// Responses larger than this are split for watchers that asked for fragments
    /// (etcd uses its `--max-request-bytes`, 1.5 MiB by default).
    pub fragment_bytes: usize,
    /// How long one progress probe may take against etcd without reliable progress
    /// answers (before 3.4.31 / 3.5.13): its fence writes and seeing the fence's
    /// event. A probe that cannot prove progress in time gives up, and the streams
    /// whose progress requests waited for it end with `UNAVAILABLE` (their clients
    /// reconnect, resume and ask again): a progress answer is never a guess.
    pub progress_probe_timeout_ms: u64,
    /// Fence writes one progress probe tries (backing off from
    /// `reconnect_backoff_ms`) before it gives up. One probe runs at a time.
    pub progress_fence_attempts: u32,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            ring_events: 100_000,
            ring_bytes: 64 * 1024 * 1024,
            stream_buffer: 1024,
            stream_control_reserve: 64,
            replay_batch: 1000,
            progress_notify_interval_ms: 600_000,
            max_catchups: 64,
            reconnect_backoff_ms: 100,
            fragment_bytes: 1536 * 1024,
            progress_probe_timeout_ms: 10_000,
            progress_fence_attempts: 5,
        }
    }
}

/// Readiness (`/readyz`, `grpc.health.v1.Health`): how etcd's reachability and the
/// watch hub's currency are checked. `/livez` needs nothing.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// How often etcd is probed (a range on the layout's void key, which also reads
    /// etcd's current revision).
    pub probe_interval_ms: u64,
    /// Deadline of one probe.
    pub probe_timeout_ms: u64,
    /// Ready only if the last successful probe is at most this old.
    pub max_probe_age_ms: u64,
    /// Ready only if the watch hub has not stayed behind a revision etcd reported
    /// (in a probe) for longer than this. An idle cluster never lags: the hub is
    /// behind only while etcd has revisions it has not yet seen.
    pub max_watch_lag_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            probe_interval_ms: 1_000,
            probe_timeout_ms: 1_000,
            max_probe_age_ms: 5_000,
            max_watch_lag_ms: 10_000,
        }
    }
}

/// Overload bounds. Unary calls beyond a bound are refused at once with etcd's
/// `RESOURCE_EXHAUSTED` "etcdserver: too many requests" (never queued); streams
/// (Watch, LeaseKeepAlive, Snapshot) are not unary calls. HTTP/2 streams per
/// connection are `server.max_concurrent_streams`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Unary calls in progress at once, all listeners together. Default 10000.
    pub max_unary_inflight: usize,
    /// Unary calls in progress at once on one client connection. Default 2000.
    pub max_unary_inflight_per_connection: usize,
    /// Watchers one Watch stream may hold; a create beyond it is refused (created
    /// and canceled with the reason). Default 10000.
    pub max_watchers_per_stream: usize,
    /// HTTP/2 keepalive ping interval towards clients. Default 30000.
    pub http2_keepalive_interval_ms: u64,
    /// A client that does not answer a keepalive ping within this is disconnected.
    /// Default 20000.
    pub http2_keepalive_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_unary_inflight: 10_000,
            max_unary_inflight_per_connection: 2_000,
            max_watchers_per_stream: 10_000,
            http2_keepalive_interval_ms: 30_000,
            http2_keepalive_timeout_ms: 20_000,
        }
    }
}

/// The shared read replica (`[cache]`): one in-memory copy of the keys the watch
/// hub watches, from which `Range` requests are answered without going to etcd.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Answer ranges from the replica. On by default; off sends every range to etcd.
    pub enabled: bool,
    /// Past revisions kept: a range at a revision this far behind the newest is
    /// still answered locally; older ones go to etcd. Default 10000.
    pub window_revisions: i64,
    /// Bytes the replica may hold (keys, values, past versions, bookkeeping). Over
    /// it, past versions are dropped, then the coldest pieces (one tenant's keys in
    /// one resource) are evicted to 90% of it; a load over it keeps the pieces that
    /// fit. An evicted piece's reads go to etcd and load it again. Default 1 GiB.
    pub max_bytes: usize,
    /// Keys in the first page of a load (one range at one revision per page); later
    /// pages grow while they carry less than 4 MiB (up to 65536 keys) and shrink above
    /// 16 MiB. Default 1000.
    pub load_page_keys: i64,
    /// Events held back while a load runs; more abort the load, which starts again.
    /// Default 100000.
    pub max_pending_events: usize,
    /// How long a linearizable read waits for the replica to reach etcd's revision
    /// before it goes to etcd instead. Default 1000.
    pub max_read_wait_ms: u64,
    /// After this long waiting, ask the watch hub to prove progress (etcd's newest
    /// revision may lie outside the watched keys, where no event shows it).
    /// Default 100 (on etcd before 3.4.31 / 3.5.13 a proof is a fence write).
    pub nudge_after_ms: u64,
    /// How often etcd is asked whether it was compacted by someone else (another
    /// etcdmux replica, a client talking to etcd directly): one count-only range per
    /// check. Until then, ranges at revisions etcd has compacted may be answered with
    /// the data instead of etcd's "compacted". 0: never. Default 1000.
    pub compaction_check_ms: u64,
    /// Resource roots never answered from the replica (their reads go to etcd):
    /// resource names as in the layout, e.g. `["events"]`.
    pub exclude_resources: Vec<String>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            window_revisions: 10_000,
            max_bytes: 1 << 30,
            load_page_keys: 1000,
            max_pending_events: 100_000,
            max_read_wait_ms: 1000,
            nudge_after_ms: 100,
            compaction_check_ms: 1000,
            exclude_resources: Vec::new(),
        }
    }
}

fn default_listeners() -> Vec<ListenerConfig> {
    vec![ListenerConfig::plain(SocketAddr::from(([127, 0, 0, 1], 2379)))]
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("parsing {path}: {source}")]
    Parse { path: String, source: toml::de::Error },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Reads a PEM file named by the config (a certificate, key or CA bundle).
pub fn read_pem(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let data = std::fs::read(path).map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    if !data.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(ConfigError::Invalid(format!("{} is not a PEM file", path.display())));
    }
    Ok(data)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Config::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse { path: origin.to_string(), source })
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream.connect_timeout_ms)
    }

    pub fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream.default_timeout_ms)
    }

    /// Client URLs advertised by `MemberList`.
    pub fn advertise_urls(&self) -> Vec<String> {
        if !self.server.advertise_client_urls.is_empty() {
            return self.server.advertise_client_urls.clone();
        }
        self.listeners.iter().map(|l| format!("{}://{}", if l.is_tls() { "https" } else { "http" }, l.addr)).collect()
    }

    /// Checks what serde cannot: cross-field rules, name syntax, overlaps. Tenant
    /// rules are checked again (and compiled) by `tenant::Resolver::new`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.listeners.is_empty() {
            return bad("at least one [[listener]] is required".into());
        }
        self.backend.validate()?;
        if self.backend.kind == BackendKind::Etcd && self.upstream.endpoints.is_empty() {
            return bad("upstream.endpoints must name at least one etcd endpoint".into());
        }
        for e in &self.upstream.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return bad(format!("upstream endpoint {e:?} must be an http:// or https:// URL"));
            }
        }
        if self.upstream.connections == 0 {
            return bad("upstream.connections must be at least 1".into());
        }
        if self.watch.ring_events == 0
            || self.watch.stream_buffer == 0
            || self.watch.replay_batch == 0
            || self.watch.max_catchups == 0
        {
            return bad("watch.ring_events, stream_buffer, replay_batch and max_catchups must be at least 1".into());
        }
        if self.watch.stream_control_reserve == 0
            || self.watch.progress_probe_timeout_ms == 0
            || self.watch.progress_fence_attempts == 0
        {
            return bad(
                "watch.stream_control_reserve, progress_probe_timeout_ms and progress_fence_attempts must be at least 1"
                    .into(),
            );
        }
        let h = &self.health;
        if h.probe_interval_ms == 0 || h.probe_timeout_ms == 0 || h.max_watch_lag_ms == 0 {
            return bad("health.probe_interval_ms, probe_timeout_ms and max_watch_lag_ms must be at least 1".into());
        }
        if h.max_probe_age_ms <= h.probe_interval_ms || h.max_probe_age_ms < h.probe_timeout_ms {
            return bad(format!(
                "health.max_probe_age_ms ({}) must exceed probe_interval_ms ({}) and be at least probe_timeout_ms ({}), or readiness flaps between probes",
                h.max_probe_age_ms, h.probe_interval_ms, h.probe_timeout_ms
            ));
        }
        // HTTP/2's bounds for a window (RFC 9113, 6.9.1).
        if !(65_535..=0x7fff_ffff).contains(&self.server.connection_window_bytes) {
            return bad(format!(
                "server.connection_window_bytes ({}) must be between 65535 and 2147483647",
                self.server.connection_window_bytes
            ));
        }
        if self.server.connection_streams_per_turn == 0 {
            return bad("server.connection_streams_per_turn must be at least 1".into());
        }
        if self.server.tls_handshake_timeout_ms == 0 || self.server.tls_max_handshakes == 0 {
            return bad("server.tls_handshake_timeout_ms and tls_max_handshakes must be at least 1".into());
        }
        let l = &self.limits;
        if l.max_unary_inflight == 0
            || l.max_unary_inflight_per_connection == 0
            || l.max_watchers_per_stream == 0
            || l.http2_keepalive_interval_ms == 0
            || l.http2_keepalive_timeout_ms == 0
        {
            return bad("every limits.* setting must be at least 1".into());
        }
        let c = &self.cache;
        if c.window_revisions < 0 || c.load_page_keys < 1 || c.max_pending_events == 0 || c.max_bytes == 0 {
            return bad("cache.load_page_keys, max_pending_events and max_bytes must be at least 1, window_revisions at least 0".into());
        }
        if let Some(r) = c.exclude_resources.iter().find(|r| r.is_empty() || r.contains('/')) {
            return bad(format!("cache.exclude_resources: {r:?} is not a resource name (non-empty, no '/')"));
        }
        if self.upstream.max_txn_ops < 2 {
            return bad("upstream.max_txn_ops must be at least 2".into());
        }
        let p = &self.layout.prefix;
        let m = &self.layout.meta_prefix;
        for (name, v) in [("layout.prefix", p), ("layout.meta_prefix", m)] {
            if v.is_empty() || v.ends_with('/') {
                return bad(format!("{name} {v:?} must be non-empty and not end with '/'"));
            }
        }
        if p.starts_with(m.as_str()) || m.starts_with(p.as_str()) {
            return bad(format!("layout.prefix {p:?} and layout.meta_prefix {m:?} overlap"));
        }
        for g in &self.tenancy.global_keys {
            if g.is_empty() || g.starts_with(p.as_str()) || g.starts_with(m.as_str()) {
                return bad(format!("global key {g:?} is empty or lies inside etcdmux's own key space ({p:?}, {m:?})"));
            }
        }
        for l in &self.listeners {
            if let Some(t) = &l.static_tenant {
                TenantName::new(t).map_err(|e| ConfigError::Invalid(e.to_string()))?;
            }
        }
        self.log.validate().map_err(ConfigError::Invalid)?;
        self.tracing.validate().map_err(ConfigError::Invalid)?;
        self.validate_tls()?;
        self.migrate.validate(self.upstream.max_txn_ops)?;
        if !self.migrate.source_rules.is_empty() {
            let source = TenancyConfig { rules: self.migrate.source_rules.clone(), ..self.tenancy.clone() };
            Resolver::for_source(&source, &[p, m])
                .map_err(|e| ConfigError::Invalid(format!("[migrate] source_rule: {e}")))?;
        }
        Resolver::new(&self.tenancy, &[p, m]).map(|_| ()).map_err(|e| ConfigError::Invalid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_configs_are_valid() {
        for f in ["config/milo.toml", "config/static.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{f}: {e}"));
            cfg.validate().unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }

    #[test]
    fn defaults_and_rejections() {
        let cfg = Config::parse("", "empty").unwrap();
        assert_eq!(cfg.upstream.connections, 2);
        assert_eq!(cfg.server.advertised_version, "3.5.17");
        assert_eq!(cfg.tenancy.global_keys, vec!["compact_rev_key"]);
        cfg.validate().unwrap();

        assert!(Config::parse("bogus = 1", "x").is_err(), "unknown fields are refused");
        let overlap = Config::parse("[layout]\nprefix = \"/a\"\nmeta_prefix = \"/a/meta\"", "x").unwrap();
        assert!(overlap.validate().is_err());
        let global_inside = Config::parse("[tenancy]\nglobal_keys = [\"/registry/x\"]", "x").unwrap();
        assert!(global_inside.validate().is_err());
        assert_eq!(cfg.health.max_watch_lag_ms, 10_000);
        let flapping = Config::parse("[health]\nprobe_interval_ms = 5000\nmax_probe_age_ms = 5000", "x").unwrap();
        assert!(flapping.validate().is_err(), "a probe age bound within one interval flaps");
        let zero = Config::parse("[health]\nmax_watch_lag_ms = 0", "x").unwrap();
        assert!(zero.validate().is_err());
        assert_eq!(cfg.limits.max_unary_inflight, 10_000);
        let zero = Config::parse("[limits]\nmax_watchers_per_stream = 0", "x").unwrap();
        assert!(zero.validate().is_err());
        assert_eq!(cfg.server.tls_reload_interval_ms, 10_000);
        let zero = Config::parse("[server]\ntls_handshake_timeout_ms = 0", "x").unwrap();
        assert!(zero.validate().is_err());
        assert_eq!(cfg.log.format, LogFormat::Text);
        assert_eq!(cfg.log.level, "info");
        assert!(!cfg.tracing.enabled());
        assert_eq!((cfg.tracing.service_name.as_str(), cfg.tracing.sample_ratio), ("etcdmux", 1.0));
        let json = Config::parse("[log]\nformat = \"json\"\nlevel = \"warn,etcdmux=debug\"", "x").unwrap();
        assert_eq!(json.log.format, LogFormat::Json);
        json.validate().unwrap();
        assert!(Config::parse("[log]\nformat = \"xml\"", "x").is_err());
        let refused = |text: &str| Config::parse(text, "x").unwrap().validate().unwrap_err().to_string();
        assert!(refused("[log]\nlevel = \"etcdmux=loud\"").contains("log.level"));
        assert!(refused("[tracing]\nsample_ratio = 1.5").contains("sample_ratio"));
        assert!(refused("[tracing]\notlp_endpoint = \"collector:4317\"").contains("http://"));
        assert!(refused("[tracing]\nqueue_size = 10\nbatch_size = 20").contains("batch_size"));
        let on = Config::parse("[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"", "x").unwrap();
        assert!(on.tracing.enabled());
        on.validate().unwrap();
    }
}
