//! etcdmux: a multi-tenant etcd v3 gRPC proxy. Unmodified Kubernetes-style
//! apiservers point `--etcd-servers` at it; it resolves each request's tenant,
//! rewrites keys into one shared tenant-embedded layout, serves every tenant's
//! watches from one upstream watch, and keeps a few upstream connections whatever
//! the tenant count.
//!
//! # Layout
//!
//! ```text
//! main.rs      the `etcdmux` command (clap): serve, check-config, migrate
//! config/      the one serde config, validated once (tls.rs: the TLS settings;
//!              migrate.rs: [migrate])
//! error.rs     the error enum and its one mapping to a gRPC status
//! shutdown.rs  the shutdown signal and the tracker every spawned task belongs to
//! certs.rs     TLS files: read, checked (pairs that match), read again on an interval
//!              and swapped in when they change (rotation without a restart)
//! trace/       logs (text or JSON) and tracing: the per-call span, request id and
//!              W3C trace context (call.rs), carried to etcd; the OTLP export queue
//!              (export.rs); the [log] and [tracing] config (config.rs)
//! metrics/     metric names (one place), descriptions, the Prometheus recorder
//!              (latency histograms); per-tenant metrics: the top-N tenants that get
//!              their own label (tenants.rs, a bounded sketch), the per-call slot
//!              handlers report the tenant into (per_tenant.rs)
//! health/      readiness (a pure decision in ready.rs), the probe of etcd, the
//!              grpc.health.v1 statuses, the HTTP /livez, /readyz, /metrics server
//! pb.rs        generated etcd protos;  codec/  the gRPC codec (small buffers), Watch framing
//! keyspace/    tenant names, resolution rules, the layout, range planning, the
//!              client views of a listener (pure: no I/O)
//! ops/         the Proxy and what it does: validate (etcd's request checks, before
//!              anything goes upstream), range, merge, write, txn/{check, translate,
//!              fit, answer}, index, lease
//! backend/     the storage behind the services: the Backend interface (etcd's
//!              protobuf messages as its vocabulary); etcd.rs the etcd cluster through
//!              upstream/; sql/ a PostgreSQL-protocol database with etcd's data model
//! upstream/    the etcd connection pool (its channels rebuilt when the TLS files
//!              change), call and stream context (deadlines), classify (what a
//!              failure means), body (unary requests in two HTTP/2 frames)
//! grpc/        server (shutdown order), accept, tls (listener TLS, swapped on
//!              rotation; the scope of a request from its client certificate),
//!              handshake (bounded, timed TLS accepts), the span layer (a span and
//!              request id per call), the metrics layer, the limits layer (load
//!              shedding), one file per etcd service
//! replica/     the shared read replica (in progress): store, a multi-version copy
//!              of etcd's keys that answers ranges as etcd would
//! watch/       the hub: session, sink (per-stream budget), event, watcher, fanout,
//!              ring, hub, upstream, progress (state machine), probe (its I/O),
//!              catchup, passthrough
//! migrate/     `etcdmux migrate`: an existing installation's keys into the layout:
//!              cli, source (keys → tenants with the proxy's Resolver), etcd (the
//!              two pools), checkpoint (records in the target; guarded writes),
//!              apply (batches placed as the proxy places a put), leases, rate,
//!              progress, plan, snapshot, tail (one watch, fences), copy, verify
//!              (digests per project and resource), revision, cutover, cleanup
//! ```
//!
//! Dependencies between top-level modules point one way (checked by a test in
//! `tests/architecture.rs`): `grpc → health → watch → ops → replica → backend → upstream,
//! keyspace`; `config → keyspace`; only `backend` (and `migrate`, and the etcd-only admin
//! calls in `grpc`) call etcd; `error → upstream, keyspace`; `grpc, upstream → certs → metrics, shutdown`;
//! `keyspace` depends on nothing; `migrate → ops, upstream, config, keyspace` and
//! nothing depends on `migrate`.
//!
//! # A request
//!
//! `grpc::kv` takes a `Range` with the listener's [`keyspace::Scope`] and the
//! client's deadline ([`upstream::CallCtx`]) → [`ops::Proxy::range`] resolves the
//! tenant ([`keyspace::Resolver`]), plans upstream ranges ([`keyspace::KeyLayout`]),
//! reads them through the [`backend::Backend`] (for etcd: [`upstream::Upstream`],
//! retries and failover decided by [`upstream::classify`]), merges ([`ops::merge`]) and renders keys back into the
//! client's form → `grpc::answer` turns the result or [`error::Error`] into the gRPC
//! answer.
//!
//! # An event
//!
//! [`watch::upstream`] reads the one upstream watch → each event is decoded once
//! into tenant form ([`watch::event`]), kept in the ring and dispatched by the
//! [`watch::Hub`] to the watchers the fan-out index finds by (tenant, root) → each
//! watcher's stream has one bounded [`watch::sink`]; a full one cancels that watcher
//! alone → [`watch::session`] hands the responses to tonic.
//!
//! `docs/architecture.md` states the invariants each module keeps.

pub mod backend;
pub mod certs;
pub mod codec;
pub mod config;
pub mod error;
pub mod grpc;
pub mod health;
pub mod keyspace;
pub mod metrics;
pub mod migrate;
pub mod ops;
pub mod pb;
pub mod replica;
pub mod shutdown;
pub mod trace;
pub mod upstream;
pub mod watch;
