//! The `etcdmux migrate` subcommands and their flags. Flags override the config
//! file's `[migrate]` section (and `--target` its `[upstream] endpoints`).

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

#[derive(Subcommand, Debug)]
pub enum MigrateCommand {
    /// Scan the source at one revision and report what a copy would move; changes nothing.
    Plan {
        #[command(flatten)]
        common: Common,
        /// One line per project and resource (default: per project, and per resource overall).
        #[arg(long)]
        detail: bool,
    },
    /// Copy every key into the target layout, then apply later changes until stopped.
    Copy {
        #[command(flatten)]
        common: Common,
        /// Exit 0 once the tail has caught up with the source (instead of tailing until SIGINT/SIGTERM).
        #[arg(long)]
        until_caught_up: bool,
        /// Start over from a new snapshot (after the source compacted past the checkpoint);
        /// the target's keys of this migration are removed first.
        #[arg(long)]
        restart: bool,
        /// Target already holding keys of a migrated project: refuse (default), overwrite
        /// (remove the target's keys of that project first) or skip (leave the project out).
        #[arg(long, value_enum, default_value_t = OnConflict::Refuse)]
        on_conflict: OnConflict,
        /// Leave source keys that match no tenant rule behind instead of refusing.
        #[arg(long)]
        skip_unmatched: bool,
        /// Owner of the copied leases in etcdmux's records: a principal, or `tenant` for the
        /// tenant of the keys attached (default: [tenancy] connection_identity).
        #[arg(long)]
        lease_owner: Option<String>,
    },
    /// Compare source and target per project and resource at the checkpoint's source revision.
    Verify {
        #[command(flatten)]
        common: Common,
        /// Print every project and resource, not only those that differ.
        #[arg(long)]
        all_rows: bool,
    },
    /// Fence the old layout, drain the tail, verify, and make every old resource version too old.
    Cutover {
        #[command(flatten)]
        common: Common,
        /// Leave the target uncompacted (old resource versions then still resolve in it).
        #[arg(long)]
        no_compact: bool,
        /// After the fence, how long the source must stay free of writes (ms).
        #[arg(long)]
        quiet_ms: Option<u64>,
    },
    /// Delete the migrated keys from the source (only after cutover's passing verify).
    Cleanup {
        #[command(flatten)]
        common: Common,
        /// Really delete; without it cleanup only reports what it would delete.
        #[arg(long)]
        delete_source: bool,
        /// Keys deleted per transaction (migrate.cleanup_batch).
        #[arg(long)]
        batch: Option<usize>,
    },
    /// Fold the per-tenant root index of earlier etcdmux versions into the shared one
    /// (one key per resource root); needs no source.
    RootIndex {
        /// The etcdmux config ([layout], [upstream]).
        #[arg(long, env = "ETCDMUX_CONFIG")]
        config: PathBuf,
        /// etcd's endpoints (default: the config's upstream.endpoints).
        #[arg(long, value_delimiter = ',')]
        target: Vec<String>,
        /// Also delete the per-tenant keys, once every slot they record has its shared
        /// key (only when no etcdmux of an earlier version serves this etcd).
        #[arg(long)]
        delete_tenant_keys: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnConflict {
    Refuse,
    Overwrite,
    Skip,
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// The etcdmux config: [tenancy] (or [migrate] source_rule) describes the source's
    /// keys, [layout] the target's, [migrate] the copy.
    #[arg(long, env = "ETCDMUX_CONFIG")]
    pub config: PathBuf,
    /// The source etcd's endpoints, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub source: Vec<String>,
    /// The target etcd's endpoints (default: the config's upstream.endpoints). May be the source.
    #[arg(long, value_delimiter = ',')]
    pub target: Vec<String>,
    /// The migration's id: its checkpoint and records. Cutover and verify take several,
    /// comma-separated (batches of projects cut over together).
    #[arg(long, value_delimiter = ',', default_value = "default")]
    pub id: Vec<String>,
    /// Migrate only these projects (tenants), comma-separated; `root` names the root tenant.
    #[arg(long, value_delimiter = ',')]
    pub projects: Vec<String>,
    /// Migrate only the projects listed in this file (one per line, `#` comments).
    #[arg(long)]
    pub projects_file: Option<PathBuf>,
    /// CA bundle (PEM) for an https:// source (default: the config's upstream.cacert).
    #[arg(long)]
    pub source_cacert: Option<PathBuf>,
    /// Client certificate (PEM) presented to the source (default: upstream.cert).
    #[arg(long)]
    pub source_cert: Option<PathBuf>,
    /// Key (PEM) of --source-cert (default: upstream.key).
    #[arg(long)]
    pub source_key: Option<PathBuf>,
    /// Keys per second at most (migrate.keys_per_sec; 0: no limit).
    #[arg(long)]
    pub keys_per_sec: Option<u64>,
    /// Bytes per second at most (migrate.bytes_per_sec; 0: no limit).
    #[arg(long)]
    pub bytes_per_sec: Option<u64>,
    /// Source keys per page (migrate.page_keys).
    #[arg(long)]
    pub page_keys: Option<i64>,
    /// Operations per target transaction (migrate.batch_ops).
    #[arg(long)]
    pub batch_ops: Option<usize>,
}

impl MigrateCommand {
    /// The flags of the steps that move keys from a source (all but `root-index`).
    pub fn common(&self) -> Option<&Common> {
        match self {
            MigrateCommand::Plan { common, .. }
            | MigrateCommand::Copy { common, .. }
            | MigrateCommand::Verify { common, .. }
            | MigrateCommand::Cutover { common, .. }
            | MigrateCommand::Cleanup { common, .. } => Some(common),
            MigrateCommand::RootIndex { .. } => None,
        }
    }
}
