//! `etcdmux migrate`: moves an existing installation's keys (each Milo project under
//! `/projects/<project>/`, the root control plane under its etcd prefix, or any
//! layout the tenant rules describe) into etcdmux's shared layout, online.
//!
//! ```text
//! plan      scan the source at one revision; report; change nothing   (plan.rs)
//! copy      wipe? → snapshot (paged, rate-limited) → tail (one watch)  (copy.rs, snapshot.rs, tail.rs)
//!           every write: the data + the checkpoint, one guarded txn    (apply.rs, checkpoint.rs)
//! verify    per project and resource: counts and content digests of
//!           source and target at the checkpoint's revisions            (verify.rs)
//! cutover   fence the old layout, drain, verify, revisions past the
//!           source's, compact: every old resource version is too old  (cutover.rs)
//! cleanup   delete the source's migrated keys after cutover            (cleanup.rs)
//!
//! root-index  fold earlier versions' per-tenant root index into the
//!           shared one (no source; any time after an upgrade)        (root_index.rs)
//! ```
//!
//! The source's keys resolve with the proxy's own rules ([`source`]) and are written
//! by the proxy's own placement ([`crate::ops::write::placed_put`], the root index,
//! lease owner records), so a migrated object reads, lists and watches through
//! etcdmux exactly as if it had been written through it. Leases: [`leases`].
//! Source and target may be one etcd.

pub mod apply;
pub mod checkpoint;
pub mod cleanup;
pub mod cli;
pub mod copy;
pub mod cutover;
pub mod error;
pub mod etcd;
pub mod leases;
pub mod plan;
pub mod progress;
pub mod rate;
pub mod revision;
pub mod root_index;
pub mod snapshot;
pub mod source;
pub mod tail;
pub mod verify;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;

use crate::config::Config;
use crate::keyspace::{prefix_end, KeyLayout, Resolver, TenancyConfig, TenantName};
use crate::shutdown::Tasks;
use checkpoint::{range_text, Manifest};
pub use cli::MigrateCommand;
pub use error::{MigrateError, Result, Side};
use etcd::Etcd;
use source::SourceMap;

/// What every step works with.
pub struct Ctx {
    pub cfg: Config,
    pub layout: KeyLayout,
    pub source: Etcd,
    pub target: Etcd,
    pub same_etcd: bool,
    pub source_cluster: u64,
    pub source_rev: i64,
    pub target_rev: i64,
    pub ids: Vec<String>,
    /// `--projects` / `--projects-file`; `None`: every project.
    pub tenants: Option<BTreeSet<TenantName>>,
    pub tasks: Tasks,
    source_tenancy: TenancyConfig,
}

/// Runs one subcommand; `tasks` is cancelled on SIGINT/SIGTERM.
pub async fn run(cmd: MigrateCommand, tasks: Tasks) -> Result<()> {
    if let MigrateCommand::RootIndex { config, target, delete_tenant_keys } = &cmd {
        let mut cfg = Config::load(config).map_err(|e| usage(e.to_string()))?;
        if !target.is_empty() {
            cfg.upstream.endpoints.clone_from(target);
        }
        return root_index::run(&cfg, *delete_tenant_keys, &tasks).await;
    }
    let ctx = Ctx::open(&cmd, tasks).await?;
    match cmd {
        MigrateCommand::Plan { detail, .. } => plan::run(&ctx, detail).await,
        MigrateCommand::Copy { until_caught_up, restart, on_conflict, skip_unmatched, lease_owner, .. } => {
            let opts = copy::CopyOptions { until_caught_up, restart, on_conflict, skip_unmatched, lease_owner };
            copy::run(&ctx, opts).await
        }
        MigrateCommand::Verify { all_rows, .. } => verify::run(&ctx, all_rows).await,
        MigrateCommand::Cutover { no_compact, quiet_ms, .. } => {
            let quiet = Duration::from_millis(quiet_ms.unwrap_or(ctx.cfg.migrate.quiet_period_ms));
            cutover::run(&ctx, !no_compact, quiet).await
        }
        MigrateCommand::Cleanup { delete_source, batch, .. } => {
            cleanup::run(&ctx, delete_source, batch.unwrap_or(ctx.cfg.migrate.cleanup_batch)).await
        }
        MigrateCommand::RootIndex { .. } => Err(usage("root-index takes no source")),
    }
}

fn usage(m: impl Into<String>) -> MigrateError {
    MigrateError::Usage(m.into())
}

fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(usage(format!("--id {id:?}: use 1 to 64 letters, digits, '-', '_' or '.'")))
    }
}

fn read_tenants(names: &[String], file: Option<&std::path::Path>) -> Result<Option<BTreeSet<TenantName>>> {
    let mut all: Vec<String> = names.to_vec();
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).map_err(|e| usage(format!("--projects-file {}: {e}", f.display())))?;
        all.extend(
            text.lines().map(|l| l.split('#').next().unwrap_or("").trim().to_string()).filter(|l| !l.is_empty()),
        );
    }
    if all.is_empty() {
        return Ok(None);
    }
    let set = all
        .iter()
        .map(|n| TenantName::new(n).map_err(|e| usage(format!("project {n:?}: {e}"))))
        .collect::<Result<BTreeSet<_>>>()?;
    Ok(Some(set))
}

impl Ctx {
    async fn open(cmd: &MigrateCommand, tasks: Tasks) -> Result<Ctx> {
        let c = cmd.common().ok_or_else(|| usage("this step takes no source"))?;
        for id in &c.id {
            check_id(id)?;
        }
        let several_ok = matches!(cmd, MigrateCommand::Verify { .. } | MigrateCommand::Cutover { .. });
        if c.id.len() != 1 && !several_ok {
            return Err(usage("this step takes one --id"));
        }
        let mut cfg = Config::load(&c.config).map_err(|e| usage(e.to_string()))?;
        if !c.target.is_empty() {
            cfg.upstream.endpoints = c.target.clone();
        }
        let m = &mut cfg.migrate;
        m.keys_per_sec = c.keys_per_sec.unwrap_or(m.keys_per_sec);
        m.bytes_per_sec = c.bytes_per_sec.unwrap_or(m.bytes_per_sec);
        m.page_keys = c.page_keys.unwrap_or(m.page_keys);
        m.batch_ops = c.batch_ops.unwrap_or(m.batch_ops);
        cfg.validate().map_err(|e| usage(format!("{}: {e}", c.config.display())))?;
        for url in &c.source {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(usage(format!("--source {url:?} must be an http:// or https:// URL")));
            }
        }
        let mut src_up = cfg.upstream.clone();
        src_up.endpoints = c.source.clone();
        let https = c.source.iter().any(|u| u.starts_with("https://"));
        if !https {
            (src_up.cacert, src_up.cert, src_up.key, src_up.server_name) = (None, None, None, None);
        }
        for (flag, field) in [
            (&c.source_cacert, &mut src_up.cacert),
            (&c.source_cert, &mut src_up.cert),
            (&c.source_key, &mut src_up.key),
        ] {
            if flag.is_some() {
                field.clone_from(flag);
            }
        }
        if https && src_up.cacert.is_none() {
            return Err(usage("an https:// source needs --source-cacert (or upstream.cacert)"));
        }
        let source = Etcd::connect(&cfg, Side::Source, src_up)?;
        let target = Etcd::connect(&cfg, Side::Target, cfg.upstream.clone())?;
        let (source_rev, source_cluster) = source.status().await?;
        let (target_rev, target_cluster) = target.status().await?;
        let same_etcd = source_cluster == target_cluster;
        let layout = KeyLayout::new(&cfg.layout.prefix, &cfg.layout.meta_prefix);
        let mut source_tenancy = cfg.tenancy.clone();
        if !cfg.migrate.source_rules.is_empty() {
            source_tenancy.rules = cfg.migrate.source_rules.clone();
        }
        let tenants = read_tenants(&c.projects, c.projects_file.as_deref())?;
        let ctx = Ctx {
            cfg,
            layout,
            source,
            target,
            same_etcd,
            source_cluster,
            source_rev,
            target_rev,
            ids: c.id.clone(),
            tenants,
            tasks,
            source_tenancy,
        };
        if same_etcd {
            ctx.check_no_overlap()?;
        }
        Ok(ctx)
    }

    pub fn id(&self) -> &str {
        &self.ids[0]
    }

    fn resolver(&self) -> Result<Resolver> {
        let l = &self.cfg.layout;
        Resolver::for_source(&self.source_tenancy, &[&l.prefix, &l.meta_prefix]).map_err(|e| usage(e.to_string()))
    }

    /// One etcd: the source's ranges must not reach into the layout's keys.
    fn check_no_overlap(&self) -> Result<()> {
        let l = &self.cfg.layout;
        let owned = [l.prefix.as_bytes(), l.meta_prefix.as_bytes()];
        for (start, end) in self.resolver()?.rule_ranges(None) {
            for o in owned {
                let o_end = prefix_end(o);
                if start.as_ref() < o_end.as_ref() && o < end.as_ref() {
                    return Err(usage(format!(
                        "source and target are one etcd, and the source's keys from {:?} overlap etcdmux's own \
                         prefix {:?}: choose another [layout] prefix / meta_prefix",
                        String::from_utf8_lossy(&start),
                        String::from_utf8_lossy(o)
                    )));
                }
            }
        }
        Ok(())
    }

    /// How the source's keys map for migration `id` (tenants from `tenants`, minus
    /// `skipped`).
    pub fn source_map(
        &self,
        id: &str,
        tenants: Option<BTreeSet<TenantName>>,
        skipped: BTreeSet<TenantName>,
    ) -> Result<SourceMap> {
        let owned = if self.same_etcd {
            let l = &self.cfg.layout;
            vec![Bytes::from(l.prefix.clone()), Bytes::from(l.meta_prefix.clone())]
        } else {
            Vec::new()
        };
        Ok(SourceMap::new(self.resolver()?, tenants, skipped, owned, self.layout.migrate_key(id, "fence")))
    }

    /// The source map a migration was started with.
    pub fn source_map_of(&self, m: &Manifest) -> Result<SourceMap> {
        let names = |v: &[String]| -> Result<BTreeSet<TenantName>> {
            v.iter().map(|n| TenantName::new(n).map_err(|e| MigrateError::Internal(e.to_string()))).collect()
        };
        let tenants = if m.all_projects { None } else { Some(names(&m.projects)?) };
        let map = self.source_map(&m.id, tenants, names(&m.skipped)?)?;
        let ranges: Vec<String> = map.ranges.iter().map(range_text).collect();
        if ranges != m.ranges {
            return Err(MigrateError::Refused(format!(
                "migration {:?} was started with other source rules (its ranges differ from what the config gives \
                 now): restore the config, or start another --id",
                m.id
            )));
        }
        if m.source_cluster_id != format!("{:x}", self.source_cluster) {
            return Err(MigrateError::Refused(format!(
                "migration {:?} copies from etcd cluster {} ({}), but --source is cluster {:x}",
                m.id, m.source_cluster_id, m.source, self.source_cluster
            )));
        }
        if self.tenants.is_some() && self.tenants.as_ref() != map.tenants() {
            return Err(MigrateError::Refused(format!(
                "--projects/--projects-file differ from migration {:?}'s own list: leave them out to resume it, or \
                 start another --id for other projects",
                m.id
            )));
        }
        Ok(map)
    }
}
