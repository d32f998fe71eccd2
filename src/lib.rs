//! etcdmux: a multi-tenant etcd v3 gRPC proxy. See README.md and DESIGN.md.
pub mod config;
pub mod error;
pub mod keylayout;
pub mod pb;
pub mod tenant;
pub mod upstream;
