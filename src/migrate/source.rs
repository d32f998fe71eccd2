//! The source's keys as the migration sees them: which tenant and tenant key each
//! resolves to under the source's rules (the proxy's [`Resolver`], so a key lands
//! exactly where a client's write of it through etcdmux would), which ranges to
//! read, and the one range the tail watches.

use std::collections::BTreeSet;

use bytes::Bytes;

use crate::keyspace::{prefix_end, KeyRef, Piece, Resolver, Scope, TenantName};

/// What a source key is to the migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// Migrated: tenant `0`'s key `1`.
    Tenant(TenantName, Bytes),
    /// A configured global key: passes through etcdmux unchanged, not copied.
    Global,
    /// etcdmux's own key space (source and target are one etcd): the target.
    Owned,
    /// The migration's own fence key in the source.
    Fence,
    /// Matches no tenant rule (or names an invalid tenant): why.
    Unmatched(String),
    /// A tenant outside this migration's set of projects.
    Excluded(TenantName),
}

pub struct SourceMap {
    resolver: Resolver,
    scope: Scope,
    /// `None`: every tenant.
    tenants: Option<BTreeSet<TenantName>>,
    /// Tenants left out of this migration (`--on-conflict skip`).
    skipped: BTreeSet<TenantName>,
    /// Prefixes of etcdmux's own keys when the source is the target.
    owned: Vec<Bytes>,
    fence: Bytes,
    /// Where the migrated tenants' keys can be, sorted and disjoint.
    pub ranges: Vec<Piece>,
    /// The tail's one watch: covers `ranges` and the fence key.
    pub watch: Piece,
}

impl SourceMap {
    /// `owned` holds etcdmux's prefixes only when source and target are one etcd.
    pub fn new(
        resolver: Resolver,
        tenants: Option<BTreeSet<TenantName>>,
        skipped: BTreeSet<TenantName>,
        owned: Vec<Bytes>,
        fence: Bytes,
    ) -> SourceMap {
        let scope = Scope { static_tenant: None, principal: resolver.admin().clone() };
        let ranges: Vec<Piece> = resolver
            .rule_ranges(tenants.as_ref())
            .into_iter()
            .map(|(key, range_end)| Piece { key, range_end })
            .collect();
        let fence_end = {
            let mut e = fence.to_vec();
            e.push(0);
            Bytes::from(e)
        };
        let lo = ranges.iter().map(|r| r.key.clone()).chain([fence.clone()]).min().unwrap_or_else(|| fence.clone());
        let hi = ranges.iter().map(|r| r.range_end.clone()).chain([fence_end]).max().unwrap_or_default();
        SourceMap { resolver, scope, tenants, skipped, owned, fence, ranges, watch: Piece { key: lo, range_end: hi } }
    }

    pub fn tenants(&self) -> Option<&BTreeSet<TenantName>> {
        self.tenants.as_ref()
    }

    pub fn fence_key(&self) -> &Bytes {
        &self.fence
    }

    /// Whether `t` is part of this migration.
    pub fn includes(&self, t: &TenantName) -> bool {
        !self.skipped.contains(t) && self.tenants.as_ref().is_none_or(|ts| ts.contains(t))
    }

    pub fn classify(&self, key: &Bytes) -> Class {
        if *key == self.fence {
            return Class::Fence;
        }
        if self.owned.iter().any(|p| key.starts_with(p)) {
            return Class::Owned;
        }
        match self.resolver.resolve_key(&self.scope, key) {
            Ok(KeyRef::Tenant { tenant, key }) if self.includes(&tenant) => Class::Tenant(tenant, key),
            Ok(KeyRef::Tenant { tenant, .. }) => Class::Excluded(tenant),
            Ok(KeyRef::Raw { global: true, .. }) => Class::Global,
            Ok(KeyRef::Raw { global: false, .. }) => Class::Unmatched(
                "matches no tenant rule (unmatched = \"passthrough\": etcdmux would pass it through unchanged)"
                    .to_string(),
            ),
            Err(e) => Class::Unmatched(e.to_string()),
        }
    }

    /// Whether `key` lies in one of the ranges the migration reads.
    pub fn in_ranges(&self, key: &[u8]) -> bool {
        self.ranges.iter().any(|r| key >= &r.key[..] && key < &r.range_end[..])
    }
}

/// The range etcd calls "with prefix `p`".
pub fn prefix_range(p: &[u8]) -> Piece {
    Piece { key: Bytes::copy_from_slice(p), range_end: prefix_end(p) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyspace::TenancyConfig;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn t(s: &str) -> TenantName {
        TenantName::new(s).unwrap()
    }

    fn milo(tenants: Option<&[&str]>, skipped: &[&str]) -> SourceMap {
        let cfg: TenancyConfig = toml::from_str(
            r#"rule = [ { prefix = "/projects/{tenant}/" }, { prefix = "/datum-core/", tenant = "root" } ]
               global_keys = ["compact_rev_key"]"#,
        )
        .unwrap();
        let r = Resolver::for_source(&cfg, &["/registry", "/etcdmux"]).unwrap();
        SourceMap::new(
            r,
            tenants.map(|ts| ts.iter().map(|s| t(s)).collect()),
            skipped.iter().map(|s| t(s)).collect(),
            vec![b("/registry"), b("/etcdmux")],
            b("/etcdmux/migrate/m/fence"),
        )
    }

    #[test]
    fn keys_classify_as_the_proxy_resolves_them() {
        let m = milo(None, &["skipped"]);
        assert_eq!(m.classify(&b("/projects/p/pods/ns/x")), Class::Tenant(t("p"), b("/pods/ns/x")));
        assert_eq!(m.classify(&b("/datum-core/pods/x")), Class::Tenant(t("root"), b("/pods/x")));
        assert_eq!(m.classify(&b("/projects/skipped/pods/x")), Class::Excluded(t("skipped")));
        assert_eq!(m.classify(&b("compact_rev_key")), Class::Global);
        assert_eq!(m.classify(&b("/registry/pods/clusters/p/x")), Class::Owned);
        assert_eq!(m.classify(&b("/etcdmux/migrate/m/fence")), Class::Fence);
        assert!(matches!(m.classify(&b("/elsewhere/x")), Class::Unmatched(_)));
        assert!(matches!(m.classify(&b("/projects/root/x")), Class::Unmatched(_)), "reserved name");
        // The watch covers every range and the fence.
        assert_eq!(m.watch, Piece { key: b("/datum-core/"), range_end: b("/projects0") });
        assert!(m.in_ranges(b"/projects/p/x") && !m.in_ranges(b"/etcdmux/migrate/m/fence"));
    }

    #[test]
    fn a_subset_reads_only_its_projects() {
        let m = milo(Some(&["a", "b"]), &[]);
        assert_eq!(m.ranges.len(), 2, "{:?}", m.ranges);
        assert_eq!(m.classify(&b("/projects/c/pods/x")), Class::Excluded(t("c")));
        assert_eq!(m.classify(&b("/datum-core/pods/x")), Class::Excluded(t("root")));
        assert!(m.in_ranges(b"/projects/a/pods/x") && !m.in_ranges(b"/projects/c/pods/x"));
        assert_eq!(m.watch.key, b("/etcdmux/migrate/m/fence"));
        assert_eq!(m.watch.range_end, b("/projects/b0"));
    }
}
