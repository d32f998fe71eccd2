//! `cutover`: the end of the old layout. For each migration (batches of projects
//! are cut over together, `--id a,b`):
//!
//! 1. a **fence** is written into the source; the tail drains every change up to
//!    it, then watches for `quiet` more: any write to the old layout after the
//!    fence stops the cutover (the apiservers must be stopped or read-only first;
//!    a lease expiring is not a write and is applied);
//! 2. **verify** at the drained revision must pass;
//! 3. the migration is marked cut over (copy refuses to run again).
//!
//! Then, once for all: the target's revision is advanced past the source's last,
//! and the target is **compacted** at its current revision, so that every resource
//! version a client still holds is "too old" (see `revision.rs`). What is left is
//! the operator's: point the apiservers at etcdmux and start them.

use std::time::Duration;

use super::apply::Writer;
use super::checkpoint::{now_unix, CutoverRecord, Phase};
use super::error::{MigrateError, Result};
use super::progress::Progress;
use super::rate::RateLimit;
use super::tail::{self, TailOptions, Until};
use super::{revision, verify, Ctx};

pub async fn run(ctx: &Ctx, compact: bool, quiet: Duration) -> Result<()> {
    let m = &ctx.cfg.migrate;
    let interval = Duration::from_millis(m.progress_interval_ms);
    let mut last_source_rev = 0;
    for id in &ctx.ids {
        let (store, manifest, cp, map, leases) = verify::open(ctx, id).await?;
        match cp.phase {
            Phase::Wipe | Phase::Snapshot => {
                return Err(MigrateError::Refused(format!(
                    "migration {id:?} has not finished its snapshot: run `etcdmux migrate copy --until-caught-up` first"
                )))
            }
            Phase::Cutover => {
                let c =
                    cp.cutover.as_ref().ok_or_else(|| MigrateError::Internal("cut over without a record".into()))?;
                println!("cutover {id:?}: already cut over at source revision {}", c.fence_rev);
                last_source_rev = last_source_rev.max(c.fence_rev);
                continue;
            }
            Phase::Tail => {}
        }
        let mut w = Writer::new(&ctx.source, &ctx.target, &ctx.layout, store, cp, leases, m.batch_ops, m.batch_bytes);
        let fence = tail::write_fence(&w, &map, "cutover").await?;
        println!(
            "cutover {id:?}: fence written at source revision {fence}; draining the tail, then {} ms without writes \
             to the old layout",
            quiet.as_millis()
        );
        let topts = TailOptions {
            fence_interval: Duration::from_millis(m.fence_interval_ms),
            lease_sync_interval: Duration::from_millis(m.lease_sync_interval_ms),
            skip_unmatched: true,
        };
        let mut progress = Progress::new("drain", None, interval);
        let mut unlimited = RateLimit::new(0, 0);
        let until = Until::Drained { fence_rev: fence, quiet };
        let end = tail::run(&mut w, &map, until, topts, &mut unlimited, &mut progress, &ctx.tasks).await?;
        progress.finish();
        if w.cp.partial_rev != 0 {
            return Err(MigrateError::Internal("drained in the middle of a revision".into()));
        }
        // The target now (not only what the drain wrote): a stray write is a difference.
        let (a, x) = (end.applied_rev, ctx.target.status().await?.0);
        let report = verify::compare(ctx, id, &map, &w.leases, a, x).await?;
        verify::print(id, &report, false);
        verify::record(ctx, id, &report).await?;
        if !report.passed() {
            return Err(MigrateError::Differences(format!(
                "cutover {id:?} stopped: verify found {} differences, so the source stays the truth. Keep copying \
                 (`copy`), find the cause, and run cutover again",
                report.differences.len()
            )));
        }
        let source_keys = report.source_keys();
        w.update(|cp| {
            cp.phase = Phase::Cutover;
            cp.cutover = Some(CutoverRecord { fence_rev: a, target_rev: x, source_keys, unix: now_unix() });
        });
        w.commit_position().await?;
        println!("cutover {id:?}: {source_keys} keys verified at source revision {a} (manifest {})", manifest.source);
        last_source_rev = last_source_rev.max(a);
    }
    let key = ctx.layout.migrate_key(ctx.id(), "revision");
    let now = if ctx.same_etcd {
        ctx.target.status().await?.0
    } else {
        revision::advance_past(&ctx.target, key, last_source_rev, m.bump_concurrency, interval).await?
    };
    if compact {
        ctx.target.compact(now).await?;
        println!(
            "target compacted at revision {now} (past every source revision, {last_source_rev} the last): every \
             resource version a client holds from before is now too old (410 Gone: watch caches and informers re-list)"
        );
    } else {
        println!(
            "target at revision {now} (past the source's {last_source_rev}); not compacted (--no-compact): old \
             resource versions still resolve in the target until it is compacted"
        );
    }
    println!(
        "cutover complete: point the apiservers' --etcd-servers at etcdmux (upstream {}) and start them; the old \
         layout stays in the source until `etcdmux migrate cleanup --delete-source`",
        ctx.target.url
    );
    Ok(())
}
