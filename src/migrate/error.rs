//! What can stop a migration step, and the exit status each gives: the one place a
//! failure becomes what the operator sees.

use crate::upstream::classify::{EtcdError, Failure, UpstreamError};

/// Which etcd a call went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Bad flags, config or files.
    #[error("{0}")]
    Usage(String),
    /// A call to one of the etcds failed.
    #[error("{side} etcd {url}: {}: {err}", describe(.err))]
    Etcd { side: Side, url: String, err: UpstreamError },
    /// A safety check refused the step; nothing was changed by it.
    #[error("refused: {0}")]
    Refused(String),
    /// `verify` (or the verify inside `cutover`) found differences.
    #[error("{0}")]
    Differences(String),
    /// Another process wrote this migration's checkpoint meanwhile.
    #[error(
        "the checkpoint of migration {id:?} changed under this process (another `etcdmux migrate` with the same \
         --id is running, or ran since): stopped without writing; run one copy, cutover or cleanup per id at a time"
    )]
    CheckpointMoved { id: String },
    /// An etcd dropped history this step needs.
    #[error(
        "the {side} etcd was compacted past revision {needed}{detail}, which this step needs: the changes since \
         cannot be read any more. A copy must start over: `etcdmux migrate copy --restart` (it copies again from a \
         new snapshot and removes what is stale); keep the source's compaction (the apiserver's \
         --etcd-compaction-interval) from overtaking the copy. A verify can simply run again"
    )]
    Compacted { side: Side, needed: i64, detail: String },
    /// Interrupted by a signal; the checkpoint holds the position.
    #[error("interrupted: {0}")]
    Interrupted(String),
    /// A broken expectation inside the tool.
    #[error("internal error: {0}")]
    Internal(String),
}

fn describe(e: &UpstreamError) -> &'static str {
    match e.failure() {
        Failure::NotSent => "unreachable",
        Failure::ConnectionLost => "connection lost",
        Failure::Deadline => "timed out",
        Failure::Etcd(_) => "refused the request",
    }
}

impl MigrateError {
    /// The process exit status: 1 a failure, 2 bad usage, 3 differences found, 4 a
    /// safety refusal, 130 interrupted.
    pub fn exit_code(&self) -> u8 {
        match self {
            MigrateError::Usage(_) => 2,
            MigrateError::Differences(_) => 3,
            MigrateError::Refused(_) => 4,
            MigrateError::Interrupted(_) => 130,
            MigrateError::Etcd { .. }
            | MigrateError::CheckpointMoved { .. }
            | MigrateError::Compacted { .. }
            | MigrateError::Internal(_) => 1,
        }
    }

    /// etcd's own error, when etcd answered with one.
    pub fn etcd(&self) -> Option<EtcdError> {
        match self {
            MigrateError::Etcd { err, .. } => err.etcd(),
            _ => None,
        }
    }

    /// Whether the call may or may not have been applied (the answer was lost).
    pub fn ambiguous(&self) -> bool {
        match self {
            MigrateError::Etcd { err, .. } => matches!(
                err.failure(),
                Failure::ConnectionLost
                    | Failure::Deadline
                    | Failure::Etcd(
                        EtcdError::Timeout | EtcdError::TimeoutDueToLeaderFail | EtcdError::TimeoutDueToConnectionLost
                    )
            ),
            _ => false,
        }
    }
}

pub type Result<T, E = MigrateError> = std::result::Result<T, E>;
