//! A migration source's view of the tenant rules (`etcdmux migrate`): which key
//! ranges of the source etcd can hold a given set of tenants' keys. The keys
//! themselves resolve as the proxy resolves a client's ([`Resolver::resolve_key`]),
//! with one more rule shape only a source may use: kplane's
//! `<prefix>/{resource}/clusters/{tenant}/` ([`Resolver::for_source`]).

use std::collections::BTreeSet;

use bytes::Bytes;

use super::layout::prefix_end;
use super::rules::{Resolver, Rule};
use super::tenant::TenantName;

impl Resolver {
    /// The key ranges `[start, end)` that can hold keys the rules resolve to one of
    /// `tenants` (every tenant when `None`), sorted and disjoint: where a migration
    /// reads its source. A `{tenant}` rule gives one range per named tenant; the
    /// `{resource}` shape spreads a tenant over every resource, so it is read whole.
    pub fn rule_ranges(&self, tenants: Option<&BTreeSet<TenantName>>) -> Vec<(Bytes, Bytes)> {
        let mut out = Vec::new();
        for rule in &self.rules {
            match rule {
                Rule::Fixed { prefix, tenant } => {
                    if tenants.is_none_or(|ts| ts.contains(tenant)) {
                        out.push((prefix.clone(), prefix_end(prefix)));
                    }
                }
                Rule::Pattern { literal } => match tenants {
                    None => out.push((literal.clone(), prefix_end(literal))),
                    Some(ts) => {
                        for t in ts.iter().filter(|t| !self.reserved.contains(*t)) {
                            let p = Bytes::from([&literal[..], t.as_str().as_bytes(), b"/"].concat());
                            let end = prefix_end(&p);
                            out.push((p, end));
                        }
                    }
                },
                Rule::Clusters { literal } => out.push((literal.clone(), prefix_end(literal))),
            }
        }
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyspace::{KeyError, KeyRef, TenancyConfig};

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn t(s: &str) -> TenantName {
        TenantName::new(s).unwrap()
    }

    fn source(rules: &str) -> Result<Resolver, KeyError> {
        let cfg: TenancyConfig = toml::from_str(&format!("rule = [ {rules} ]")).unwrap();
        Resolver::for_source(&cfg, &["/registry", "/etcdmux"])
    }

    #[test]
    fn clusters_shape_is_a_source_rule_only() {
        let rules = r#"{ prefix = "/kplane/{resource}/clusters/{tenant}/" }, { prefix = "/root/", tenant = "root" }"#;
        let r = source(rules).unwrap();
        let s = r.scope(None).unwrap();
        for (key, tenant, tkey) in [
            ("/kplane/pods/clusters/p/default/x", "p", "/pods/default/x"),
            ("/kplane/apps.k8s.io/deployments/clusters/p/ns/web", "p", "/apps.k8s.io/deployments/ns/web"),
            ("/kplane/pods/clusters/q", "q", "/pods"),
            ("/root/pods/x", "root", "/pods/x"),
        ] {
            assert_eq!(
                r.resolve_key(&s, &b(key)).unwrap(),
                KeyRef::Tenant { tenant: t(tenant), key: b(tkey) },
                "{key}"
            );
        }
        assert!(matches!(r.resolve_key(&s, &b("/kplane/pods/x")), Err(KeyError::Unmatched(_))));
        assert!(matches!(r.resolve_key(&s, &b("/kplane/pods/clusters/root/x")), Err(KeyError::InvalidTenant { .. })));

        let cfg: TenancyConfig = toml::from_str(&format!("rule = [ {rules} ]")).unwrap();
        let e = Resolver::new(&cfg, &[]).unwrap_err().to_string();
        assert!(e.contains("migration source"), "{e}");
        assert!(source(r#"{ prefix = "/k/{resource}/{tenant}/" }"#).is_err(), "only the clusters shape");
        assert!(source(r#"{ prefix = "/k/{resource}/clusters/{tenant}/" }, { prefix = "/p/{tenant}/" }"#).is_err());
    }

    #[test]
    fn rule_ranges_cover_the_named_tenants() {
        let r = source(r#"{ prefix = "/projects/{tenant}/" }, { prefix = "/datum-core/", tenant = "root" }"#).unwrap();
        assert_eq!(
            r.rule_ranges(None),
            vec![(b("/datum-core/"), b("/datum-core0")), (b("/projects/"), b("/projects0"))]
        );
        let some: BTreeSet<TenantName> = [t("b"), t("a"), t("root")].into_iter().collect();
        assert_eq!(
            r.rule_ranges(Some(&some)),
            vec![
                (b("/datum-core/"), b("/datum-core0")),
                (b("/projects/a/"), b("/projects/a0")),
                (b("/projects/b/"), b("/projects/b0")),
            ]
        );
        let no_root: BTreeSet<TenantName> = [t("a")].into_iter().collect();
        assert_eq!(r.rule_ranges(Some(&no_root)), vec![(b("/projects/a/"), b("/projects/a0"))]);
        let k = source(r#"{ prefix = "/kplane/{resource}/clusters/{tenant}/" }"#).unwrap();
        assert_eq!(k.rule_ranges(Some(&no_root)), vec![(b("/kplane/"), b("/kplane0"))]);
    }
}
