//! What travels with one request to etcd: its deadline, etcd's `hasleader`
//! metadata, and whether it may be sent twice.

use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::Request;

/// etcd's metadata key asking that a request fail when the cluster has no leader.
pub const REQUIRE_LEADER: &str = "hasleader";

/// Whether a call may be sent again after an ambiguous failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Reads, status, keepalive-free calls: repeat on any `UNAVAILABLE`.
    Safe,
    /// Writes: repeat only when the connection was never established.
    OnlyUnsent,
}

/// What travels with one client request to etcd: its deadline and the metadata
/// etcd acts on.
#[derive(Debug, Clone)]
pub struct CallCtx {
    pub deadline: Instant,
    pub require_leader: bool,
}

impl CallCtx {
    /// Takes the client's `grpc-timeout` (or the configured default) and
    /// `hasleader` from an incoming request.
    pub fn from_request<T>(req: &Request<T>, default_timeout: Duration) -> CallCtx {
        Self::from_metadata(req.metadata(), default_timeout)
    }

    pub fn from_metadata(md: &tonic::metadata::MetadataMap, default_timeout: Duration) -> CallCtx {
        let timeout = md
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .unwrap_or(default_timeout);
        let require_leader = md.get(REQUIRE_LEADER).is_some();
        CallCtx { deadline: Instant::now() + timeout, require_leader }
    }

    /// An outgoing request carrying the remaining deadline and `hasleader`.
    pub fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.set_timeout(self.deadline.saturating_duration_since(Instant::now()));
        if self.require_leader {
            req.metadata_mut().insert(REQUIRE_LEADER, MetadataValue::from_static("true"));
        }
        req
    }
}

/// Parses gRPC's `grpc-timeout` header: up to 8 digits and a unit (H M S m u n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
    }
}
