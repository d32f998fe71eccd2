//! etcdmux: a multi-tenant etcd v3 gRPC proxy. Unmodified Kubernetes-style
//! apiservers point `--etcd-servers` at it; it resolves each request's tenant,
//! rewrites keys into one shared tenant-embedded layout, and keeps a few upstream
//! connections whatever the tenant count. See README.md for the map of modules.

pub mod accept;
pub mod codec;
pub mod config;
pub mod error;
pub mod index;
pub mod keylayout;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod metrics;
pub mod pb;
pub mod proxy;
pub mod server;
pub mod tenant;
pub mod txn;
pub mod upstream;
pub mod watch;
