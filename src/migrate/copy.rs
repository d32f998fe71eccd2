//! `copy`: starts a migration (or resumes it from its checkpoint) and runs its
//! phases: wipe (only after a restart or `--on-conflict overwrite`), snapshot, tail.
//!
//! Before anything is written the source's migrated ranges are scanned (keys only)
//! at the snapshot revision: keys that match no rule are refused unless
//! `--skip-unmatched`, and a project that already has keys in the target is refused
//! unless `--on-conflict` says how to resolve it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use super::apply::Writer;
use super::checkpoint::{now_unix, range_text, Checkpoint, Manifest, Phase, Store};
use super::cli::OnConflict;
use super::error::{MigrateError, Result};
use super::etcd::Pager;
use super::leases::{LeaseOwner, Leases};
use super::progress::{human_bytes, Progress};
use super::rate::RateLimit;
use super::source::{prefix_range, Class, SourceMap};
use super::tail::{self, TailOptions, Until};
use super::{revision, snapshot, Ctx};
use crate::keyspace::{End, Slot, TenantName};
use bytes::Bytes;

pub struct CopyOptions {
    pub until_caught_up: bool,
    pub restart: bool,
    pub on_conflict: OnConflict,
    pub skip_unmatched: bool,
    pub lease_owner: Option<String>,
}

pub async fn run(ctx: &Ctx, opts: CopyOptions) -> Result<()> {
    let id = ctx.id();
    let mut store = Store::new(&ctx.layout, id);
    let existing = store.load(&ctx.target).await?;
    let (manifest, cp, map, resumed) = match existing {
        Some((m, mut cp)) if !opts.restart => {
            let map = ctx.source_map_of(&m)?;
            if cp.phase == Phase::Cutover {
                return Err(MigrateError::Refused(format!(
                    "migration {id:?} was cut over: the target is the truth now, and copying would overwrite it"
                )));
            }
            eprintln!(
                "resuming migration {id:?} (run {}): {:?} phase, {} keys copied, {} changes applied, source revision {} applied",
                cp.runs + 1,
                cp.phase,
                cp.copied_keys,
                cp.events_applied,
                cp.applied_rev.max(cp.snapshot_rev)
            );
            cp.runs += 1;
            (m, cp, map, true)
        }
        existing => {
            let (m, cp, map) = start(ctx, &mut store, existing, &opts).await?;
            (m, cp, map, false)
        }
    };
    let owner = LeaseOwner::parse(&manifest.lease_owner)?;
    let leases = Leases::load(&ctx.target, &ctx.layout, id, ctx.same_etcd, owner).await?;
    let m = &ctx.cfg.migrate;
    let mut w = Writer::new(&ctx.source, &ctx.target, &ctx.layout, store, cp, leases, m.batch_ops, m.batch_bytes);
    if resumed {
        w.update(|_| {}); // records the run
        w.commit_position().await?;
    }
    let mut rate = RateLimit::new(m.keys_per_sec, m.bytes_per_sec);
    let interval = Duration::from_millis(m.progress_interval_ms);
    let started = Instant::now();
    let keys_before = w.cp.copied_keys;
    let bytes_before = w.cp.copied_bytes;

    if w.cp.phase == Phase::Wipe {
        snapshot::wipe(&mut w, m.page_keys, &ctx.tasks).await?;
    }
    if w.cp.phase == Phase::Snapshot {
        let mut total = 0;
        for r in &map.ranges {
            total += ctx.source.count(r, w.cp.snapshot_rev).await? as u64;
        }
        let mut progress = Progress::new("copy", Some(total), interval);
        progress.resume_at(w.cp.copied_keys);
        snapshot::copy(&mut w, &map, m.page_keys, m.page_bytes, &mut rate, &mut progress, &ctx.tasks).await?;
        progress.finish();
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let (keys, bytes) = (w.cp.copied_keys - keys_before, w.cp.copied_bytes - bytes_before);
        println!(
            "snapshot at source revision {}: {} keys copied ({}) in {secs:.1} s: {:.0} keys/s, {:.2} MB/s",
            w.cp.snapshot_rev,
            keys,
            human_bytes(bytes),
            keys as f64 / secs,
            bytes as f64 / secs / 1e6
        );
    }
    let until = if opts.until_caught_up { Until::CaughtUp } else { Until::Stopped };
    let topts = TailOptions {
        fence_interval: Duration::from_millis(m.fence_interval_ms),
        lease_sync_interval: Duration::from_millis(m.lease_sync_interval_ms),
        skip_unmatched: opts.skip_unmatched,
    };
    let events_before = w.cp.events_applied;
    let mut progress = Progress::new("tail", None, interval);
    if !opts.until_caught_up {
        eprintln!("tailing the source; SIGINT or SIGTERM stops (the checkpoint keeps the position)");
    }
    let end = tail::run(&mut w, &map, until, topts, &mut rate, &mut progress, &ctx.tasks).await?;
    progress.finish();
    println!(
        "tail: {} changes applied; every source change up to revision {} is in the target (migration {id:?})",
        w.cp.events_applied - events_before,
        end.applied_rev
    );
    Ok(())
}

/// What the keys-only scan before a first copy found.
#[derive(Default)]
struct Scan {
    per_tenant: BTreeMap<TenantName, u64>,
    unmatched: Vec<(String, String)>,
    unmatched_count: u64,
}

async fn prescan(ctx: &Ctx, map: &SourceMap, rev: i64) -> Result<Scan> {
    let mut scan = Scan::default();
    for r in &map.ranges {
        let mut pager = Pager::new(r, rev, ctx.cfg.migrate.page_keys, true);
        while let Some(page) = pager.next(&ctx.source).await? {
            for kv in page {
                match map.classify(&kv.key) {
                    Class::Tenant(t, _) => *scan.per_tenant.entry(t).or_default() += 1,
                    Class::Unmatched(why) => {
                        scan.unmatched_count += 1;
                        if scan.unmatched.len() < 20 {
                            scan.unmatched.push((String::from_utf8_lossy(&kv.key).into_owned(), why));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(scan)
}

/// Tenants of `tenants` with keys in the target, counted in every slot the root
/// index records (and the tenant indexes of earlier versions), in batched txns.
pub(super) async fn target_keys(ctx: &Ctx, tenants: &BTreeSet<TenantName>) -> Result<BTreeMap<TenantName, u64>> {
    let page = ctx.cfg.migrate.page_keys;
    let mut shared = BTreeSet::new();
    let mut pager = Pager::new(&ctx.layout.slot_index_range(), 0, page, true);
    while let Some(kvs) = pager.next(&ctx.target).await? {
        shared.extend(kvs.iter().filter_map(|kv| ctx.layout.slot_from_slot_key(&kv.key)));
    }
    let revision = pager.revision;
    let mut own: BTreeMap<TenantName, BTreeSet<Slot>> = BTreeMap::new();
    let mut pager = Pager::new(&ctx.layout.all_tenant_index_range(), revision, page, true);
    while let Some(kvs) = pager.next(&ctx.target).await? {
        for (t, slot) in kvs.iter().filter_map(|kv| ctx.layout.tenant_index_entry(&kv.key)) {
            own.entry(t).or_default().insert(slot);
        }
    }
    let mut out = BTreeMap::new();
    for t in tenants {
        let slots = shared.iter().chain(own.get(t).into_iter().flatten());
        let pieces = ctx.layout.plan(t, &Bytes::new(), &End::Unbounded, slots);
        let counts = ctx.target.counts(&pieces, revision, ctx.cfg.upstream.max_txn_ops).await?;
        let n: i64 = counts.iter().sum();
        if n > 0 {
            out.insert(t.clone(), n as u64);
        }
    }
    Ok(out)
}

/// Tenants this migration wrote (its markers), for a restart's wipe.
async fn marked(ctx: &Ctx, id: &str) -> Result<BTreeSet<TenantName>> {
    let prefix = ctx.layout.migrate_key(id, "tenant/");
    let mut out = BTreeSet::new();
    let mut pager = Pager::new(&prefix_range(&prefix), 0, ctx.cfg.migrate.page_keys, true);
    while let Some(page) = pager.next(&ctx.target).await? {
        for kv in page {
            if let Some(t) = std::str::from_utf8(&kv.key[prefix.len()..]).ok().and_then(|n| TenantName::new(n).ok()) {
                out.insert(t);
            }
        }
    }
    Ok(out)
}

/// A first copy (or `--restart`): scan, check, advance the target's revision,
/// write the manifest and first checkpoint.
async fn start(
    ctx: &Ctx,
    store: &mut Store,
    previous: Option<(Manifest, Checkpoint)>,
    opts: &CopyOptions,
) -> Result<(Manifest, Checkpoint, SourceMap)> {
    let id = ctx.id();
    if let Some((m, cp)) = &previous {
        ctx.source_map_of(m)?;
        if cp.phase == Phase::Cutover {
            return Err(MigrateError::Refused(format!("migration {id:?} was cut over; it cannot restart")));
        }
    }
    let (rev, _) = ctx.source.status().await?;
    let map = ctx.source_map(id, ctx.tenants.clone(), BTreeSet::new())?;
    let scan = prescan(ctx, &map, rev).await?;
    if scan.unmatched_count > 0 && !opts.skip_unmatched {
        let list: Vec<String> = scan.unmatched.iter().map(|(k, why)| format!("  {k:?}: {why}")).collect();
        return Err(MigrateError::Refused(format!(
            "{} source keys in the migrated ranges match no tenant rule and would be left behind:\n{}\nfix the rules \
             ([tenancy] rule or [migrate] source_rule), or pass --skip-unmatched to leave them",
            scan.unmatched_count,
            list.join("\n")
        )));
    }
    let source_tenants: BTreeSet<TenantName> = scan.per_tenant.keys().cloned().collect();
    let ours = if previous.is_some() { marked(ctx, id).await? } else { BTreeSet::new() };
    let in_target = target_keys(ctx, &source_tenants.union(&ours).cloned().collect()).await?;
    let conflicts: BTreeMap<&TenantName, &u64> = in_target.iter().filter(|(t, _)| !ours.contains(*t)).collect();
    let mut wipe: BTreeSet<TenantName> = in_target.keys().filter(|t| ours.contains(*t)).cloned().collect();
    let mut skipped = BTreeSet::new();
    if !conflicts.is_empty() {
        let list: Vec<String> =
            conflicts.iter().take(50).map(|(t, n)| format!("  project {t}: {n} keys in the target")).collect();
        match opts.on_conflict {
            OnConflict::Refuse => {
                return Err(MigrateError::Refused(format!(
                    "the target already holds keys of {} migrated projects:\n{}\npass --on-conflict overwrite \
                     (remove them, then copy) or --on-conflict skip (leave those projects out)",
                    conflicts.len(),
                    list.join("\n")
                )))
            }
            OnConflict::Overwrite => {
                eprintln!("overwriting the target's keys of {} projects:\n{}", conflicts.len(), list.join("\n"));
                wipe.extend(conflicts.keys().map(|t| (*t).clone()));
            }
            OnConflict::Skip => {
                eprintln!("leaving out {} projects the target already holds:\n{}", conflicts.len(), list.join("\n"));
                skipped.extend(conflicts.keys().map(|t| (*t).clone()));
            }
        }
    }
    let map = ctx.source_map(id, ctx.tenants.clone(), skipped.clone())?;
    if !ctx.same_etcd {
        let key = ctx.layout.migrate_key(id, "revision");
        let m = &ctx.cfg.migrate;
        let interval = Duration::from_millis(m.progress_interval_ms);
        revision::advance_past(&ctx.target, key, rev, m.bump_concurrency, interval).await?;
    }
    let owner = match &opts.lease_owner {
        Some(o) if o == "tenant" => "<tenant>".to_string(),
        Some(o) => TenantName::new(o).map_err(|e| MigrateError::Usage(format!("--lease-owner: {e}")))?.to_string(),
        None => ctx.cfg.tenancy.connection_identity.clone(),
    };
    let manifest = Manifest {
        id: id.to_string(),
        source: ctx.source.url.clone(),
        source_cluster_id: format!("{:x}", ctx.source_cluster),
        same_etcd: ctx.same_etcd,
        projects: map.tenants().map(|ts| ts.iter().map(|t| t.to_string()).collect()).unwrap_or_default(),
        all_projects: map.tenants().is_none(),
        skipped: skipped.iter().map(|t| t.to_string()).collect(),
        ranges: map.ranges.iter().map(range_text).collect(),
        lease_owner: owner,
        started_unix: now_unix(),
    };
    let mut cp = Checkpoint::new(rev, wipe.iter().map(|t| t.to_string()).collect());
    cp.runs = previous.as_ref().map_or(1, |(_, c)| c.runs + 1);
    let keys: u64 = scan.per_tenant.values().sum();
    println!(
        "migration {id:?}: {} projects, {keys} keys at source revision {rev}{}",
        scan.per_tenant.len(),
        if ctx.same_etcd { " (source and target are one etcd)" } else { "" }
    );
    store.create(&ctx.target, &manifest, &cp).await?;
    Ok((manifest, cp, map))
}
