//! etcdmux's error type and its one conversion to a gRPC status.
//!
//! Where etcd has an error for the same condition, the status carries etcd's code
//! and text (`etcdserver: key is not provided`), so clients that match on etcd's
//! messages keep working; those are variants of their own here, never forged
//! upstream errors. Errors from etcd itself are passed back unchanged.

use tonic::{Code, Status};

use crate::keyspace::KeyError;
use crate::metrics::names;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A key, range or tenant the key space refuses.
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdmux: a txn may not span tenants: it touches {first} and {second}")]
    CrossTenantTxn { first: String, second: String },
    #[error("etcdmux: permission denied: {0}")]
    PermissionDenied(String),
    /// The request is valid etcd but cannot be answered atomically across resource
    /// roots (a compare whose range spans roots).
    #[error("etcdmux: {0}")]
    Unsupported(String),
    /// A cross-root operation found the tenant's root index changed (or its pinned
    /// revision compacted) on every attempt.
    #[error("etcdmux: the tenant's root index kept changing during a {0}; retry")]
    IndexKeptChanging(&'static str),
    /// A broken invariant inside etcdmux (never the client's fault).
    #[error("etcdmux: internal error: {0}")]
    Internal(String),
    /// etcd's limit on operations per transaction (`--max-txn-ops`).
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// A txn whose cross-root ranges and deletes need more upstream ops per level
    /// than etcd's `--max-txn-ops` allows, even nested.
    #[error(
        "etcdmux: the txn's ranges and deletes across resource roots need more upstream operations per txn \
         level than upstream.max_txn_ops ({max_ops}, etcd's --max-txn-ops) allows, even nested; use fewer or \
         narrower ranges, or raise both limits together"
    )]
    TxnTooLarge { max_ops: usize },
    /// A txn nested so deeply that etcd's answer could not be decoded.
    #[error(
        "etcdmux: txn nested too deeply: etcd's answer would nest {depth} messages deep (with etcdmux's own \
         nesting), more than the {max} etcdmux can decode; nest fewer txns"
    )]
    TxnTooDeep { depth: usize, max: usize },
    /// etcd's refusal of a txn that writes one key twice on a path.
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// A put with `ignore_value` that carries a value.
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// A put with `ignore_lease` that carries a lease.
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// A range whose sort order or sort target is no enum value (etcd 3.6's check;
    /// etcd 3.4 panics on such a range).
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    /// A txn op without a request (etcd's `ErrGRPCKeyNotFound`).
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// A watch create beyond `limits.max_watchers_per_stream`.
    #[error("etcdmux: too many watchers on this stream (limits.max_watchers_per_stream = {max}); open another stream")]
    TooManyWatchers { max: usize },
    /// etcd answered with an error, or the call failed on the way: passed on as it came.
    #[error("{}", .0.status().message())]
    Upstream(#[from] crate::upstream::classify::UpstreamError),
}

impl Error {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            Error::Upstream(u) => u.status().code(),
            Error::Key(k) => match k {
                KeyError::PermissionDenied(_) => Code::PermissionDenied,
                KeyError::EmptyKey
                | KeyError::Unmatched(_)
                | KeyError::InvalidTenant { .. }
                | KeyError::CrossTenant { .. }
                | KeyError::NoClientForm(_)
                | KeyError::InvalidRule(_) => Code::InvalidArgument,
            },
            Error::CrossTenantTxn { .. }
            | Error::TooManyOps
            | Error::DuplicateKey
            | Error::ValueProvided
            | Error::LeaseProvided
            | Error::InvalidSortOption
            | Error::KeyNotFound
            | Error::TxnTooLarge { .. }
            | Error::TxnTooDeep { .. } => Code::InvalidArgument,
            Error::Internal(_) => Code::Internal,
            Error::LeaseNotFound => Code::NotFound,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unsupported(_) => Code::Unimplemented,
            Error::IndexKeptChanging(_) => Code::Unavailable,
            Error::TooManyWatchers { .. } => Code::ResourceExhausted,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        if let Error::Upstream(u) = e {
            return u.into_status();
        }
        let code = e.code();
        metrics::counter!(names::REQUEST_ERRORS, "code" => format!("{code:?}")).increment(1);
        Status::new(code, e.to_string())
    }
}

impl From<KeyError> for Status {
    fn from(e: KeyError) -> Status {
        Error::Key(e).into()
    }
}

impl From<crate::upstream::classify::UpstreamError> for Status {
    fn from(e: crate::upstream::classify::UpstreamError) -> Status {
        e.into_status()
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
