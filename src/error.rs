//! etcdmux's error type and its one conversion to a gRPC status.
//!
//! Where etcd has an error for the same condition, the status carries etcd's code
//! and text (`etcdserver: key is not provided`), so clients that match on etcd's
//! messages keep working. Errors from etcd itself are passed back unchanged.

use bytes::Bytes;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdmux: key {:?} matches no tenant rule and the config rejects unmatched keys", String::from_utf8_lossy(.0))]
    Unmatched(Bytes),
    #[error("etcdmux: invalid tenant name {name:?}: {why}")]
    InvalidTenant { name: String, why: String },
    #[error("etcdmux: a request may not span tenants: range from tenant {from} reaches {to}")]
    CrossTenant { from: String, to: String },
    #[error("etcdmux: a txn may not span tenants: it touches {first} and {second}")]
    CrossTenantTxn { first: String, second: String },
    #[error("etcdmux: permission denied: {0}")]
    PermissionDenied(String),
    #[error("etcdmux: {0}")]
    InvalidArgument(String),
    /// The request is valid etcd but cannot be answered atomically across resource
    /// roots (a compare whose range spans roots).
    #[error("etcdmux: {0}")]
    Unsupported(String),
    #[error("etcdmux: {0}")]
    Unavailable(String),
    /// A broken invariant inside etcdmux (never the client's fault).
    #[error("etcdmux: internal error: {0}")]
    Internal(String),
    /// etcd's limit on operations per transaction (`--max-txn-ops`).
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// etcd answered with an error: passed on as it came.
    #[error("{}", .0.message())]
    Upstream(Status),
}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        Error::Upstream(s)
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match &e {
            Error::Upstream(s) => return s.clone(),
            Error::EmptyKey
            | Error::Unmatched(_)
            | Error::InvalidTenant { .. }
            | Error::CrossTenant { .. }
            | Error::CrossTenantTxn { .. }
            | Error::InvalidArgument(_)
            | Error::TooManyOps => Code::InvalidArgument,
            Error::Internal(_) => Code::Internal,
            Error::LeaseNotFound => Code::NotFound,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unsupported(_) => Code::Unimplemented,
            Error::Unavailable(_) => Code::Unavailable,
        };
        metrics::counter!("etcdmux_request_errors_total", "code" => format!("{code:?}")).increment(1);
        Status::new(code, e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
