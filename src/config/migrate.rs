//! `[migrate]`: how `etcdmux migrate` moves an existing installation's keys into the
//! shared layout (see the README, "Migrating an existing installation"). Every
//! setting can also be given as a flag of the `migrate` subcommands.

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::keyspace::RuleConfig;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrateConfig {
    /// The source's tenant rules, when they differ from `[tenancy]` (by default the
    /// source keys are in the form the proxy's clients write, `[tenancy] rule`).
    /// Besides the proxy's rule shapes, a source may be in kplane's shape:
    /// `{ prefix = "/registry/{resource}/clusters/{tenant}/" }`. Default: none.
    #[serde(rename = "source_rule")]
    pub source_rules: Vec<RuleConfig>,
    /// Keys copied per second at most (snapshot and tail; cleanup deletes at this
    /// rate too). 0: no limit. Default 10000.
    pub keys_per_sec: u64,
    /// Bytes of keys and values copied per second at most. 0: no limit.
    /// Default 33554432 (32 MiB).
    pub bytes_per_sec: u64,
    /// Keys per page when reading at most (keys-only scans use it as is). Default
    /// 10000.
    pub page_keys: i64,
    /// Pages that carry values (the snapshot, verify, plan) are sized to about this
    /// many bytes, with at most `page_keys` keys. Few large pages matter: etcd before
    /// 3.5 walks the whole rest of a range for every page. Default 8388608 (8 MiB).
    pub page_bytes: usize,
    /// Operations per transaction written to the target (each also updates the
    /// checkpoint, so at most `upstream.max_txn_ops - 1`). Default 100.
    pub batch_ops: usize,
    /// Bytes of keys and values per transaction written to the target; keep it
    /// below etcd's `--max-request-bytes` (1.5 MiB by default). Default 1048576.
    pub batch_bytes: usize,
    /// While tailing, how often a fence key is written to the source so that the
    /// checkpoint (and `verify`'s revision) follows the source even when no
    /// migrated key changes. Default 10000.
    pub fence_interval_ms: u64,
    /// Source and target in different etcds: how often the target's copies of
    /// leases are kept alive while the source's leases still live. Default 5000.
    pub lease_sync_interval_ms: u64,
    /// `cutover`: after the fence, how long the source must stay free of writes
    /// to the old layout. Default 5000.
    pub quiet_period_ms: u64,
    /// `cleanup`: source keys deleted per transaction (each guarded by its
    /// revision). Default 100.
    pub cleanup_batch: usize,
    /// Puts in flight when the target's revision is advanced past the source's.
    /// Default 64.
    pub bump_concurrency: usize,
    /// Without a terminal: how often a progress line is printed. Default 5000.
    pub progress_interval_ms: u64,
}

impl Default for MigrateConfig {
    fn default() -> Self {
        MigrateConfig {
            source_rules: Vec::new(),
            keys_per_sec: 10_000,
            bytes_per_sec: 32 * 1024 * 1024,
            page_keys: 10_000,
            page_bytes: 8 * 1024 * 1024,
            batch_ops: 100,
            batch_bytes: 1024 * 1024,
            fence_interval_ms: 10_000,
            lease_sync_interval_ms: 5_000,
            quiet_period_ms: 5_000,
            cleanup_batch: 100,
            bump_concurrency: 64,
            progress_interval_ms: 5_000,
        }
    }
}

impl MigrateConfig {
    pub(super) fn validate(&self, max_txn_ops: usize) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.page_keys < 1 || self.page_bytes == 0 || self.batch_bytes == 0 || self.bump_concurrency == 0 {
            return bad("migrate.page_keys, page_bytes, batch_bytes and bump_concurrency must be at least 1".into());
        }
        if self.fence_interval_ms == 0 || self.lease_sync_interval_ms == 0 || self.progress_interval_ms == 0 {
            return bad(
                "migrate.fence_interval_ms, lease_sync_interval_ms and progress_interval_ms must be at least 1".into(),
            );
        }
        for (name, v) in [("batch_ops", self.batch_ops), ("cleanup_batch", self.cleanup_batch)] {
            if v == 0 || v >= max_txn_ops {
                return bad(format!(
                    "migrate.{name} ({v}) must be at least 1 and below upstream.max_txn_ops ({max_txn_ops}): \
                     each transaction also writes the migration's checkpoint"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn check(text: &str) -> Result<(), String> {
        Config::parse(text, "x").unwrap().validate().map_err(|e| e.to_string())
    }

    #[test]
    fn migrate_settings_are_checked() {
        let cfg = Config::parse("", "x").unwrap();
        assert_eq!((cfg.migrate.keys_per_sec, cfg.migrate.batch_ops, cfg.migrate.cleanup_batch), (10_000, 100, 100));
        assert!(check("[migrate]\nbatch_ops = 128").unwrap_err().contains("max_txn_ops"));
        assert!(check("[upstream]\nmax_txn_ops = 1000\n[migrate]\nbatch_ops = 500").is_ok());
        assert!(check("[migrate]\npage_keys = 0").is_err());
        assert!(check("[migrate]\nkeys_per_sec = 0\nbytes_per_sec = 0").is_ok(), "0: no limit");
        // kplane's shape is a source rule only.
        let kplane = "source_rule = [ { prefix = \"/kplane/{resource}/clusters/{tenant}/\" } ]";
        assert!(check(&format!("[migrate]\n{kplane}")).is_ok());
        assert!(check("[tenancy]\nrule = [ { prefix = \"/kplane/{resource}/clusters/{tenant}/\" } ]").is_err());
        let bad = check("[migrate]\nsource_rule = [ { prefix = \"/k/{resource}/{tenant}/\" } ]").unwrap_err();
        assert!(bad.contains("[migrate] source_rule") && bad.contains("kplane shape"), "{bad}");
    }
}
