//! What an upstream failure means. One place decides, and every retry, failover,
//! watch restart and error mapping asks it:
//!
//! - [`Failure::NotSent`]: the request never reached etcd (the connection could not
//!   be made, or etcd refused the stream unprocessed): safe to send again, anywhere;
//! - [`Failure::ConnectionLost`]: the connection broke with the request in flight:
//!   etcd may have applied it, so a write is never sent again;
//! - [`Failure::Deadline`]: the call's deadline passed;
//! - [`Failure::Etcd`]: etcd answered with one of its errors, recognized by code and
//!   exact text from [`ETCD_ERRORS`] (etcd's `rpctypes`; its own clients match them
//!   the same way).
//!
//! Transport failures are recognized by the types in the error's source chain
//! (tonic's `ConnectError`, h2 and hyper errors, I/O errors, and [`Unreachable`] for
//! a backend that is not etcd), never by message text. A backend that answers as
//! etcd would makes its errors with [`UpstreamError::etcd`] from the same table.

use std::error::Error as StdError;
use std::fmt;

use tonic::{Code, Status};

use super::call::Retry;

/// An error etcd itself answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdError {
    Compacted,
    FutureRevision,
    NoLeader,
    LeaderChanged,
    /// The proposal timed out: it may still be applied.
    Timeout,
    TimeoutDueToLeaderFail,
    TimeoutDueToConnectionLost,
    TooManyRequests,
    NoSpace,
    Stopped,
    NotCapable,
    UnhealthyCluster,
    LeaseNotFound,
    /// A grant with an id that is taken (`etcdmux migrate` keeps lease ids).
    LeaseExists,
    /// A request over etcd's `--max-request-bytes`.
    RequestTooLarge,
    /// Any other `UNAVAILABLE` answer: a passing condition, as gRPC defines the code.
    Unavailable,
    /// Any other error etcd (or the gRPC layer in front of it) answered.
    Other,
}

/// etcd's errors that etcdmux acts on: (code, exact text, meaning).
pub const ETCD_ERRORS: &[(Code, &str, EtcdError)] = &[
    (Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted", EtcdError::Compacted),
    (Code::OutOfRange, "etcdserver: mvcc: required revision is a future revision", EtcdError::FutureRevision),
    (Code::Unavailable, "etcdserver: no leader", EtcdError::NoLeader),
    (Code::Unavailable, "etcdserver: leader changed", EtcdError::LeaderChanged),
    (Code::Unavailable, "etcdserver: request timed out", EtcdError::Timeout),
    (
        Code::Unavailable,
        "etcdserver: request timed out, possibly due to previous leader failure",
        EtcdError::TimeoutDueToLeaderFail,
    ),
    (
        Code::Unavailable,
        "etcdserver: request timed out, possibly due to connection lost",
        EtcdError::TimeoutDueToConnectionLost,
    ),
    (Code::ResourceExhausted, "etcdserver: too many requests", EtcdError::TooManyRequests),
    (Code::ResourceExhausted, "etcdserver: mvcc: database space exceeded", EtcdError::NoSpace),
    (Code::Unavailable, "etcdserver: server stopped", EtcdError::Stopped),
    (Code::Unavailable, "etcdserver: not capable", EtcdError::NotCapable),
    (Code::Unavailable, "etcdserver: unhealthy cluster", EtcdError::UnhealthyCluster),
    (Code::NotFound, "etcdserver: requested lease not found", EtcdError::LeaseNotFound),
    (Code::FailedPrecondition, "etcdserver: lease already exists", EtcdError::LeaseExists),
    (Code::InvalidArgument, "etcdserver: request is too large", EtcdError::RequestTooLarge),
];

impl EtcdError {
    fn lookup(status: &Status) -> EtcdError {
        ETCD_ERRORS.iter().find(|(code, text, _)| *code == status.code() && *text == status.message()).map_or(
            if status.code() == Code::Unavailable { EtcdError::Unavailable } else { EtcdError::Other },
            |(_, _, e)| *e,
        )
    }

    /// A condition of the cluster that may pass (no leader, overload of the moment):
    /// a read may be asked again. A write never is: etcd may have applied it.
    fn transient(self) -> bool {
        matches!(
            self,
            EtcdError::NoLeader
                | EtcdError::LeaderChanged
                | EtcdError::Timeout
                | EtcdError::TimeoutDueToLeaderFail
                | EtcdError::TimeoutDueToConnectionLost
                | EtcdError::Stopped
                | EtcdError::NotCapable
                | EtcdError::UnhealthyCluster
                | EtcdError::Unavailable
        )
    }
}

/// A backend other than etcd (a database) could not be reached. `sent`: the request
/// may have reached it, so a write is never sent again.
#[derive(Debug)]
pub struct Unreachable {
    pub sent: bool,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.sent { "connection lost" } else { "not connected" })
    }
}

impl StdError for Unreachable {}

/// What a failed upstream call means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    NotSent,
    ConnectionLost,
    Deadline,
    Etcd(EtcdError),
}

impl Failure {
    /// Classifies a failed call's status by its source chain, then by etcd's table.
    pub fn of(status: &Status) -> Failure {
        if let Some(f) = transport_failure(status) {
            return f;
        }
        Failure::Etcd(EtcdError::lookup(status))
    }

    /// Whether a call of kind `retry` may be sent again after this failure.
    pub fn may_retry(self, retry: Retry) -> bool {
        match self {
            Failure::NotSent => true,
            Failure::ConnectionLost => retry == Retry::Safe,
            Failure::Deadline => false,
            Failure::Etcd(e) => retry == Retry::Safe && e.transient(),
        }
    }

    /// Whether the endpoint should be left for the next one: it cannot be reached,
    /// or its member has no leader or is stopping.
    pub fn fails_over(self) -> bool {
        matches!(
            self,
            Failure::NotSent
                | Failure::ConnectionLost
                | Failure::Etcd(EtcdError::NoLeader | EtcdError::Stopped | EtcdError::NotCapable)
        )
    }
}

/// The transport failure in `status`'s source chain, if any.
fn transport_failure(status: &Status) -> Option<Failure> {
    let mut found = None;
    let mut src: Option<&(dyn StdError + 'static)> = status.source();
    while let Some(e) = src {
        if e.is::<tonic::ConnectError>() {
            return Some(Failure::NotSent);
        }
        if let Some(u) = e.downcast_ref::<Unreachable>() {
            return Some(if u.sent { Failure::ConnectionLost } else { Failure::NotSent });
        }
        if e.is::<tonic::TimeoutExpired>() {
            return Some(Failure::Deadline);
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            // RFC 9113 §8.7: a refused stream was not processed.
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return Some(Failure::NotSent);
            }
            found = Some(Failure::ConnectionLost);
        }
        if e.is::<hyper::Error>() || e.is::<std::io::Error>() || e.is::<tonic::transport::Error>() {
            found = Some(Failure::ConnectionLost);
        }
        src = e.source();
    }
    found
}

/// The last error in `status`'s source chain (the cause), or its message.
fn innermost(status: &Status) -> String {
    let mut last = None;
    let mut src: Option<&(dyn StdError + 'static)> = status.source();
    while let Some(e) = src {
        last = Some(e);
        src = e.source();
    }
    last.map_or_else(|| status.message().to_string(), |e| e.to_string())
}

/// A failed upstream call: the status as it came, and what it means.
#[derive(Debug)]
pub struct UpstreamError {
    failure: Failure,
    status: Status,
}

impl UpstreamError {
    pub fn new(status: Status) -> UpstreamError {
        UpstreamError { failure: Failure::of(&status), status }
    }

    /// etcd's answer to a missed deadline, as its clients see it.
    pub fn deadline() -> UpstreamError {
        UpstreamError { failure: Failure::Deadline, status: Status::deadline_exceeded("context deadline exceeded") }
    }

    /// etcd's answer `e`, with etcd's code and text, from a backend that answers as
    /// etcd would. `None` for the kinds without one text (`Unavailable`, `Other`).
    pub fn etcd_error(e: EtcdError) -> Option<UpstreamError> {
        let (code, text, _) = ETCD_ERRORS.iter().find(|(_, _, k)| *k == e)?;
        Some(UpstreamError { failure: Failure::Etcd(e), status: Status::new(*code, *text) })
    }

    /// [`Self::etcd_error`] for the kinds of [`ETCD_ERRORS`].
    pub fn answered(e: EtcdError) -> UpstreamError {
        Self::etcd_error(e).unwrap_or_else(|| UpstreamError::new(Status::unavailable("etcdserver: unavailable")))
    }

    /// A backend that could not be reached (see [`Unreachable`]): `UNAVAILABLE` with `cause`.
    pub fn unreachable(sent: bool, cause: String) -> UpstreamError {
        UpstreamError::new(Self::unreachable_status(sent, cause))
    }

    /// The status of [`Self::unreachable`], for streams (classified the same way).
    pub fn unreachable_status(sent: bool, cause: String) -> Status {
        let mut s = Status::unavailable(cause);
        s.set_source(std::sync::Arc::new(Unreachable { sent }));
        s
    }

    pub fn failure(&self) -> Failure {
        self.failure
    }

    pub fn etcd(&self) -> Option<EtcdError> {
        match self.failure {
            Failure::Etcd(e) => Some(e),
            _ => None,
        }
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    /// The status for etcdmux's client: etcd's answer as it came, or for a broken
    /// connection (where tonic says `CANCELLED` "operation was canceled" or `UNKNOWN`
    /// "transport error", though the client cancelled nothing) `UNAVAILABLE` with the
    /// cause, as etcd's own clients expect of an unreachable member. A TLS refusal by
    /// etcd (no or an untrusted client certificate) looks like this too: TLS 1.3
    /// reports it only as the connection closing.
    pub fn into_status(self) -> Status {
        let transport = matches!(self.failure, Failure::NotSent | Failure::ConnectionLost);
        if transport && matches!(self.status.code(), Code::Cancelled | Code::Unknown) {
            return Status::unavailable(format!(
                "etcdmux: the connection to etcd failed: {} (with TLS to etcd, check that etcd accepts \
                 etcdmux's client certificate: upstream.cert, upstream.key)",
                innermost(&self.status)
            ));
        }
        self.status
    }
}

impl From<Status> for UpstreamError {
    fn from(s: Status) -> Self {
        UpstreamError::new(s)
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.status.code(), self.status.message())
    }
}

impl StdError for UpstreamError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_texts_are_matched_exactly_with_their_code() {
        let s = Status::unavailable("etcdserver: request timed out, possibly due to connection lost");
        assert_eq!(Failure::of(&s), Failure::Etcd(EtcdError::TimeoutDueToConnectionLost));
        // Regression: this answer was once taken for "not sent" (its text contains
        // "connect"), so a write etcd may have applied was sent again.
        assert!(!Failure::of(&s).may_retry(Retry::OnlyUnsent));
        assert!(Failure::of(&s).may_retry(Retry::Safe));
        let s = Status::out_of_range("etcdserver: mvcc: required revision has been compacted");
        assert_eq!(Failure::of(&s), Failure::Etcd(EtcdError::Compacted));
        assert!(!Failure::of(&s).may_retry(Retry::Safe));
        // The same text with another code is not etcd's error.
        let s = Status::internal("etcdserver: no leader");
        assert_eq!(Failure::of(&s), Failure::Etcd(EtcdError::Other));
        let s = Status::unavailable("some text about a connection refused");
        assert_eq!(Failure::of(&s), Failure::Etcd(EtcdError::Unavailable));
        assert!(!Failure::of(&s).may_retry(Retry::OnlyUnsent));
        assert!(!Failure::of(&s).fails_over());
    }

    #[test]
    fn transport_failures_come_from_the_source_chain() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let s = Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
        assert_eq!(Failure::of(&s), Failure::NotSent);
        assert!(Failure::of(&s).may_retry(Retry::OnlyUnsent));
        assert!(Failure::of(&s).fails_over());

        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let mut s = Status::unknown("transport error");
        s.set_source(std::sync::Arc::new(reset));
        assert_eq!(Failure::of(&s), Failure::ConnectionLost);
        assert!(!Failure::of(&s).may_retry(Retry::OnlyUnsent));
        assert!(Failure::of(&s).may_retry(Retry::Safe));

        let refused_stream = h2::Error::from(h2::Reason::REFUSED_STREAM);
        let mut s = Status::unavailable("refused stream");
        s.set_source(std::sync::Arc::new(refused_stream));
        assert_eq!(Failure::of(&s), Failure::NotSent);

        let s = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(Failure::of(&s), Failure::Deadline);
        assert!(!Failure::of(&s).may_retry(Retry::Safe));
    }
}
