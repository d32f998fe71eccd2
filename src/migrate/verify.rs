//! `verify`: source and target compared at one pair of revisions: the target at
//! its current revision X, the source at the revision A that the checkpoint, as of
//! X, says is applied (data and checkpoint are written in one transaction, so the
//! copy's writes up to X hold exactly the source's state at A; anything else that
//! wrote the target shows as a difference). Both are fixed, so a copy may keep
//! running meanwhile.
//!
//! Per project and resource (slot): key count, bytes and an order-independent
//! 128-bit digest of (tenant key, value, expected lease) on each side, in one
//! streaming pass each. Where digests differ, a second pass lists every differing
//! key. Also checked: every slot holding keys has its root-index entry (cross-root
//! ranges and deletes depend on it), and every lease of a copied key has its owner
//! record. A difference only on a key whose lease has expired since is reported but
//! not counted: the source deletes that key too.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use bytes::Bytes;

use super::checkpoint::{now_unix, to_toml, Manifest, Phase, Store, VerifyRecord};
use super::error::{MigrateError, Result};
use super::etcd::{Etcd, Pager};
use super::leases::{LeaseOwner, Leases};
use super::progress::human_bytes;
use super::source::{prefix_range, Class, SourceMap};
use super::Ctx;
use crate::keyspace::{slot_of, End, KeyLayout, Slot, TenantName};
use crate::pb::etcdserverpb::PutRequest;

/// One side of one (project, slot).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    pub keys: u64,
    pub bytes: u64,
    sum: (u64, u64),
}

fn h(seed: u8, key: &[u8], value: &[u8], lease: i64) -> u64 {
    let mut s = std::hash::DefaultHasher::new();
    (seed, key, value, lease).hash(&mut s);
    s.finish()
}

impl Digest {
    fn add(&mut self, key: &[u8], value: &[u8], lease: i64) {
        self.keys += 1;
        self.bytes += (key.len() + value.len()) as u64;
        self.sum.0 = self.sum.0.wrapping_add(h(0, key, value, lease));
        self.sum.1 = self.sum.1.wrapping_add(h(1, key, value, lease));
    }

    pub fn hex(&self) -> String {
        format!("{:016x}{:016x}", self.sum.0, self.sum.1)
    }
}

type Row = (TenantName, Slot);

/// What a comparison found.
#[derive(Debug, Default)]
pub struct Report {
    pub source_rev: i64,
    pub target_rev: i64,
    pub rows: BTreeMap<Row, (Digest, Digest)>,
    /// Every difference, one line each.
    pub differences: Vec<String>,
    /// Differences explained by a lease that expired since.
    pub expired: Vec<String>,
}

impl Report {
    pub fn source_keys(&self) -> u64 {
        self.rows.values().map(|(s, _)| s.keys).sum()
    }

    pub fn passed(&self) -> bool {
        self.differences.is_empty()
    }
}

pub fn slot_name(s: &Slot) -> String {
    match s {
        Slot::Under(n) => String::from_utf8_lossy(n).into_owned(),
        Slot::Key(n) => format!("{} (the key itself)", String::from_utf8_lossy(n)),
        Slot::Bare => "(keys without a leading /)".to_string(),
    }
}

/// The source's value of one key, for the detailed pass.
type Entry = (u64, i64);

fn entry(value: &[u8], lease: i64) -> Entry {
    (h(2, b"", value, 0), lease)
}

/// Compares the migration's source at `a` with the target at `x`.
pub async fn compare(ctx: &Ctx, id: &str, map: &SourceMap, leases: &Leases, a: i64, x: i64) -> Result<Report> {
    let (page, bytes) = (ctx.cfg.migrate.page_keys, ctx.cfg.migrate.page_bytes);
    let mut report = Report { source_rev: a, target_rev: x, ..Default::default() };
    let expected = |src: i64| leases.known(src).unwrap_or(-1);

    // The source.
    for r in &map.ranges {
        let mut pager = Pager::new(r, a, page, false).page_bytes(bytes);
        while let Some(kvs) = pager.next(&ctx.source).await? {
            for kv in kvs {
                if let Class::Tenant(t, k) = map.classify(&kv.key) {
                    let row = report.rows.entry((t, slot_of(&k))).or_default();
                    row.0.add(&k, &kv.value, expected(kv.lease));
                }
            }
        }
    }
    // The target: the tenants the source has, and those this migration wrote.
    let mut scope: BTreeSet<TenantName> = report.rows.keys().map(|(t, _)| t.clone()).collect();
    scope.extend(markers(&ctx.target, &ctx.layout, id, x).await?.into_iter().filter(|t| map.includes(t)));
    let mut target_leases = BTreeSet::new();
    let mut pager = Pager::new(&ctx.layout.slash_range(), x, page, false).page_bytes(bytes);
    while let Some(kvs) = pager.next(&ctx.target).await? {
        for kv in kvs {
            let Some((t, k)) = ctx.layout.decode(&kv.key) else { continue };
            if scope.contains(&t) {
                if kv.lease != 0 {
                    target_leases.insert(kv.lease);
                }
                let row = report.rows.entry((t, slot_of(&k))).or_default();
                row.1.add(&k, &kv.value, kv.lease);
            }
        }
    }
    // The root index (either form) and the lease owners.
    let mut shared = BTreeSet::new();
    let mut pager = Pager::new(&ctx.layout.slot_index_range(), x, page, true);
    while let Some(kvs) = pager.next(&ctx.target).await? {
        shared.extend(kvs.iter().filter_map(|kv| ctx.layout.slot_from_slot_key(&kv.key)));
    }
    let mut own = BTreeSet::new();
    let mut pager = Pager::new(&ctx.layout.all_tenant_index_range(), x, page, true);
    while let Some(kvs) = pager.next(&ctx.target).await? {
        own.extend(kvs.iter().filter_map(|kv| ctx.layout.tenant_index_entry(&kv.key)));
    }
    // One line per resource root: a missing root-index key hides it for every project.
    let mut unindexed: BTreeMap<Slot, (Vec<String>, u64)> = BTreeMap::new();
    for ((t, slot), (_, tgt)) in &report.rows {
        if tgt.keys > 0 && !shared.contains(slot) && !own.contains(&(t.clone(), slot.clone())) {
            let e = unindexed.entry(slot.clone()).or_default();
            e.0.push(t.to_string());
            e.1 += tgt.keys;
        }
    }
    for (slot, (projects, keys)) in unindexed {
        report.differences.push(format!(
            "{}: no root-index entry in the target (cross-root ranges of {} project(s) would miss their {keys} keys: {})",
            slot_name(&slot),
            projects.len(),
            projects.join(", ")
        ));
    }
    let mut owners = BTreeSet::new();
    let mut pager = Pager::new(&ctx.layout.lease_owner_range(), x, page, true);
    while let Some(kvs) = pager.next(&ctx.target).await? {
        owners.extend(kvs.iter().filter_map(|kv| ctx.layout.lease_id_from_owner_key(&kv.key)));
    }
    for l in target_leases.difference(&owners) {
        report.differences.push(format!("lease {l:x} of copied keys has no owner record in the target"));
    }
    // Every differing key, where digests differ.
    let differing: BTreeSet<Row> = report.rows.iter().filter(|(_, (s, t))| s != t).map(|(r, _)| r.clone()).collect();
    if !differing.is_empty() {
        detail(ctx, map, &differing, &expected, &mut report).await?;
    }
    Ok(report)
}

/// Lists the differing keys of `rows`: the source's ranges again, and each row's
/// slot in the target.
async fn detail(
    ctx: &Ctx,
    map: &SourceMap,
    rows: &BTreeSet<Row>,
    expected: &dyn Fn(i64) -> i64,
    report: &mut Report,
) -> Result<()> {
    let (page, bytes) = (ctx.cfg.migrate.page_keys, ctx.cfg.migrate.page_bytes);
    let mut src: BTreeMap<Row, BTreeMap<Bytes, (Entry, i64)>> = BTreeMap::new();
    for r in &map.ranges {
        let mut pager = Pager::new(r, report.source_rev, page, false).page_bytes(bytes);
        while let Some(kvs) = pager.next(&ctx.source).await? {
            for kv in kvs {
                if let Class::Tenant(t, k) = map.classify(&kv.key) {
                    let row = (t, slot_of(&k));
                    if rows.contains(&row) {
                        src.entry(row).or_default().insert(k, (entry(&kv.value, expected(kv.lease)), kv.lease));
                    }
                }
            }
        }
    }
    for row in rows {
        let (t, slot) = row;
        let mut tgt: BTreeMap<Bytes, Entry> = BTreeMap::new();
        for piece in ctx.layout.plan(t, &Bytes::new(), &End::Unbounded, [slot]) {
            let mut pager = Pager::new(&piece, report.target_rev, page, false).page_bytes(bytes);
            while let Some(kvs) = pager.next(&ctx.target).await? {
                for kv in kvs {
                    if let Some((_, k)) = ctx.layout.decode(&kv.key) {
                        tgt.insert(k, entry(&kv.value, kv.lease));
                    }
                }
            }
        }
        let s = src.remove(row).unwrap_or_default();
        let keys: BTreeSet<&Bytes> = s.keys().chain(tgt.keys()).collect();
        for k in keys {
            let what = match (s.get(k), tgt.get(k)) {
                (Some(_), None) => "missing in the target".to_string(),
                (None, Some(_)) => "only in the target (deleted in the source, or never there)".to_string(),
                (Some(((a, _), _)), Some((b, _))) if a != b => "value differs".to_string(),
                (Some(((_, la), src_lease)), Some((_, lb))) if la != lb => {
                    format!("lease differs: source lease {src_lease:x} should be {la:x} in the target, is {lb:x}")
                }
                _ => continue,
            };
            let line = format!("project {t}, {}: {:?}: {what}", slot_name(slot), String::from_utf8_lossy(k));
            let lease = s.get(k).map(|(_, l)| *l).unwrap_or(0);
            let tlease = tgt.get(k).map(|(_, l)| *l).unwrap_or(0);
            if lease_gone(&ctx.source, lease).await? || lease_gone(&ctx.target, tlease).await? {
                report.expired.push(line);
            } else {
                report.differences.push(line);
            }
        }
    }
    Ok(())
}

async fn lease_gone(etcd: &Etcd, id: i64) -> Result<bool> {
    Ok(id > 0 && etcd.lease_ttl(id).await?.ttl <= 0)
}

async fn markers(target: &Etcd, layout: &KeyLayout, id: &str, rev: i64) -> Result<BTreeSet<TenantName>> {
    let prefix = layout.migrate_key(id, "tenant/");
    let mut out = BTreeSet::new();
    let mut pager = Pager::new(&prefix_range(&prefix), rev, 1000, true);
    while let Some(kvs) = pager.next(target).await? {
        out.extend(
            kvs.iter().filter_map(|kv| {
                std::str::from_utf8(&kv.key[prefix.len()..]).ok().and_then(|n| TenantName::new(n).ok())
            }),
        );
    }
    Ok(out)
}

/// Prints a report; the summary line names the revisions compared.
pub fn print(id: &str, r: &Report, all_rows: bool) {
    let projects: BTreeSet<&TenantName> = r.rows.keys().map(|(t, _)| t).collect();
    println!(
        "verify {id:?}: source at revision {}, target at revision {}: {} projects, {} resources, {} keys ({})",
        r.source_rev,
        r.target_rev,
        projects.len(),
        r.rows.len(),
        r.source_keys(),
        human_bytes(r.rows.values().map(|(s, _)| s.bytes).sum())
    );
    for ((t, slot), (s, tg)) in &r.rows {
        if all_rows || s != tg {
            println!(
                "  {:<8} {:<24} {:<40} keys {:>7} / {:<7} digest {} / {}",
                if s == tg { "ok" } else { "DIFFERS" },
                t.as_str(),
                slot_name(slot),
                s.keys,
                tg.keys,
                s.hex(),
                tg.hex()
            );
        }
    }
    for d in &r.differences {
        println!("  difference: {d}");
    }
    for e in &r.expired {
        println!("  not counted (its lease expired since): {e}");
    }
    if r.passed() {
        println!("verify {id:?}: passed");
    } else {
        println!("verify {id:?}: {} differences", r.differences.len());
    }
}

/// The migration's records and source map, for verify, cutover and cleanup.
pub async fn open(ctx: &Ctx, id: &str) -> Result<(Store, Manifest, super::checkpoint::Checkpoint, SourceMap, Leases)> {
    let mut store = Store::new(&ctx.layout, id);
    let Some((m, cp)) = store.load(&ctx.target).await? else {
        return Err(MigrateError::Refused(format!(
            "migration {id:?} does not exist in the target {}: nothing copied yet (run `etcdmux migrate copy` first)",
            ctx.target.url
        )));
    };
    let map = ctx.source_map_of(&m)?;
    let owner = LeaseOwner::parse(&m.lease_owner)?;
    let leases = Leases::load(&ctx.target, &ctx.layout, id, m.same_etcd, owner).await?;
    Ok((store, m, cp, map, leases))
}

pub async fn record(ctx: &Ctx, id: &str, r: &Report) -> Result<()> {
    let rec = VerifyRecord {
        source_rev: r.source_rev,
        target_rev: r.target_rev,
        source_keys: r.source_keys(),
        passed: r.passed(),
        unix: now_unix(),
    };
    let key = ctx.layout.migrate_key(id, "verified");
    ctx.target.put(PutRequest { key, value: Bytes::from(to_toml(&rec)?), ..Default::default() }).await?;
    Ok(())
}

pub async fn run(ctx: &Ctx, all_rows: bool) -> Result<()> {
    let mut failed = Vec::new();
    for id in &ctx.ids {
        let (store, _m, _, map, leases) = open(ctx, id).await?;
        // The target as it is now, and the checkpoint as of then: it names the source
        // revision the copy had applied. Anything else that wrote the target since is
        // in the comparison too.
        let (x, _) = ctx.target.status().await?;
        let cp = store.checkpoint_at(&ctx.target, x).await?;
        let a = match cp.phase {
            Phase::Wipe | Phase::Snapshot => {
                return Err(MigrateError::Refused(format!(
                    "migration {id:?} has not finished its snapshot ({} keys copied): nothing to verify yet",
                    cp.copied_keys
                )))
            }
            _ if cp.partial_rev != 0 => {
                return Err(MigrateError::Refused(format!(
                    "migration {id:?} is in the middle of source revision {}: verify again in a moment",
                    cp.partial_rev
                )))
            }
            Phase::Cutover => {
                // The target was compacted at cutover and has moved on since: the
                // comparison that counts was cutover's own.
                let c =
                    cp.cutover.as_ref().ok_or_else(|| MigrateError::Internal("cut over without a record".into()))?;
                println!(
                    "verify {id:?}: cut over at source revision {} (target revision {}); the verify then passed for \
                     {} keys. The target is the truth since, so there is nothing to compare now",
                    c.fence_rev, c.target_rev, c.source_keys
                );
                continue;
            }
            Phase::Tail => cp.applied_rev,
        };
        let report = compare(ctx, id, &map, &leases, a, x).await?;
        print(id, &report, all_rows);
        record(ctx, id, &report).await?;
        if !report.passed() {
            failed.push(format!("{id:?}: {} differences", report.differences.len()));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(MigrateError::Differences(format!("verify found differences: {}", failed.join(", "))))
    }
}
