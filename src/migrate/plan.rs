//! `plan`: reads the whole source at one revision and reports what a copy would
//! move: projects, keys and bytes per project and resource, keys that match no
//! rule, global keys, leases in use, projects the target already holds, and how
//! long the copy would take at the configured limits. Writes nothing.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use super::error::Result;
use super::etcd::Pager;
use super::progress::human_bytes;
use super::source::Class;
use super::verify::slot_name;
use super::{copy, Ctx};
use crate::keyspace::{slot_of, Piece, Slot, TenantName};

#[derive(Default, Clone, Copy)]
struct Count {
    keys: u64,
    bytes: u64,
}

impl Count {
    fn add(&mut self, n: usize) {
        self.keys += 1;
        self.bytes += n as u64;
    }
}

pub async fn run(ctx: &Ctx, detail: bool) -> Result<()> {
    let map = ctx.source_map(ctx.id(), ctx.tenants.clone(), BTreeSet::new())?;
    let rev = ctx.source_rev;
    let mut rows: BTreeMap<(TenantName, Slot), Count> = BTreeMap::new();
    let mut leases: BTreeMap<i64, u64> = BTreeMap::new();
    let (mut unmatched, mut globals, mut owned, mut excluded) =
        (Count::default(), Vec::new(), Count::default(), Count::default());
    let mut samples = Vec::new();
    let everything = Piece { key: Bytes::from_static(b"\0"), range_end: Bytes::from_static(b"\0") };
    let m = &ctx.cfg.migrate;
    let mut pager = Pager::new(&everything, rev, m.page_keys, false).page_bytes(m.page_bytes);
    while let Some(kvs) = pager.next(&ctx.source).await? {
        for kv in kvs {
            let size = kv.key.len() + kv.value.len();
            match map.classify(&kv.key) {
                Class::Tenant(t, k) => {
                    rows.entry((t, slot_of(&k))).or_default().add(size);
                    if kv.lease != 0 {
                        *leases.entry(kv.lease).or_default() += 1;
                    }
                }
                Class::Global => globals.push(String::from_utf8_lossy(&kv.key).into_owned()),
                Class::Owned | Class::Fence => owned.add(size),
                Class::Excluded(_) => excluded.add(size),
                Class::Unmatched(why) => {
                    unmatched.add(size);
                    if samples.len() < 20 {
                        samples.push(format!("  {:?}: {why}", String::from_utf8_lossy(&kv.key)));
                    }
                }
            }
        }
    }
    let mut per_project: BTreeMap<&TenantName, (Count, usize)> = BTreeMap::new();
    let mut per_resource: BTreeMap<&Slot, Count> = BTreeMap::new();
    let mut total = Count::default();
    for ((t, s), c) in &rows {
        let p = per_project.entry(t).or_default();
        p.0.keys += c.keys;
        p.0.bytes += c.bytes;
        p.1 += 1;
        let r = per_resource.entry(s).or_default();
        r.keys += c.keys;
        r.bytes += c.bytes;
        total.keys += c.keys;
        total.bytes += c.bytes;
    }
    println!(
        "plan for migration {:?}: source {} at revision {rev}; target {} at revision {}{}",
        ctx.id(),
        ctx.source.url,
        ctx.target.url,
        ctx.target_rev,
        if ctx.same_etcd { " (the same etcd)" } else { " (another etcd)" }
    );
    println!(
        "to copy: {} projects, {} resources, {} keys, {}",
        per_project.len(),
        per_resource.len(),
        total.keys,
        human_bytes(total.bytes)
    );
    if detail {
        println!("  {:<28} {:<40} {:>9} {:>11}", "project", "resource", "keys", "bytes");
        for ((t, s), c) in &rows {
            println!("  {:<28} {:<40} {:>9} {:>11}", t.as_str(), slot_name(s), c.keys, human_bytes(c.bytes));
        }
    } else {
        println!("  {:<28} {:>9} {:>11} {:>10}", "project", "keys", "bytes", "resources");
        for (t, (c, n)) in &per_project {
            println!("  {:<28} {:>9} {:>11} {:>10}", t.as_str(), c.keys, human_bytes(c.bytes), n);
        }
        println!("  {:<40} {:>9} {:>11}", "resource (all projects)", "keys", "bytes");
        for (s, c) in &per_resource {
            println!("  {:<40} {:>9} {:>11}", slot_name(s), c.keys, human_bytes(c.bytes));
        }
    }
    let attached: u64 = leases.values().sum();
    println!("leases in use: {} leases, {attached} migrated keys attached to them", leases.len());
    println!("keys matching no tenant rule (not copied): {} ({})", unmatched.keys, human_bytes(unmatched.bytes));
    for s in &samples {
        println!("{s}");
    }
    if !globals.is_empty() {
        println!("global keys (etcdmux passes them through unchanged; not copied): {}", globals.join(", "));
    }
    if ctx.same_etcd && owned.keys > 0 {
        println!("etcdmux's own keys already in this etcd: {} ({})", owned.keys, human_bytes(owned.bytes));
    }
    if excluded.keys > 0 {
        println!("keys of projects outside --projects (not copied): {}", excluded.keys);
    }
    let tenants: BTreeSet<TenantName> = per_project.keys().map(|t| (*t).clone()).collect();
    let conflicts = copy::target_keys(ctx, &tenants).await?;
    if conflicts.is_empty() {
        println!("target: holds no keys of these projects");
    } else {
        println!(
            "target: already holds keys of {} of these projects (copy refuses them unless --on-conflict overwrite|skip):",
            conflicts.len()
        );
        for (t, n) in conflicts.iter().take(50) {
            println!("  project {t}: {n} keys");
        }
    }
    let m = &ctx.cfg.migrate;
    let by_keys = (m.keys_per_sec > 0).then(|| total.keys as f64 / m.keys_per_sec as f64);
    let by_bytes = (m.bytes_per_sec > 0).then(|| total.bytes as f64 / m.bytes_per_sec as f64);
    let bound = match (by_keys, by_bytes) {
        (Some(k), Some(b)) if k >= b => format!("about {k:.0} s (bound by migrate.keys_per_sec = {})", m.keys_per_sec),
        (_, Some(b)) => format!("about {b:.0} s (bound by migrate.bytes_per_sec = {})", human_bytes(m.bytes_per_sec)),
        (Some(k), None) => format!("about {k:.0} s (bound by migrate.keys_per_sec = {})", m.keys_per_sec),
        (None, None) => "as fast as the etcds allow (no rate limit set)".to_string(),
    };
    println!("estimate: the snapshot copy takes {bound}; the tail then follows the source's writes");
    if !ctx.same_etcd && ctx.target_rev <= rev {
        println!(
            "revisions: the target's revision will first be advanced past the source's ({} writes to the target)",
            rev - ctx.target_rev + 1
        );
    }
    Ok(())
}
