//! Tenant resolution: which tenant a request belongs to, and the tenant's own view
//! of its keys.
//!
//! Keys arrive in *client form*, the form the apiserver uses (`/projects/p/pods/x`).
//! Resolution splits a client key into a tenant and a *tenant key* (`/pods/x`), which
//! the [layout](super::layout) then places upstream. Responses go the other way: a tenant key is
//! rendered back into client form with the tenant's [`ClientPrefix`].
//!
//! Three sources:
//! 1. key-path rules from the config (`/projects/{tenant}/`, `/datum-core/` → `root`);
//! 2. a static tenant per listener (sidecar mode: every key belongs to it);
//! 3. the client certificate of an mTLS connection names the principal
//!    ([`identity`](super::identity), `[tenancy.identity]`); keys still resolve by
//!    1 or 2.
//!
//! Global keys (`compact_rev_key`) pass through unchanged. One request never touches
//! two tenants: ranges whose ends resolve to different tenants are refused here.
//!
//! A request's *principal* (who is asking) is separate from the tenant whose keys it
//! names: on a static listener both are the static tenant; with key-path rules the
//! principal is the config's `connection_identity` (one trusted apiserver holds the
//! connection), or the identity of the client certificate where `[tenancy.identity]`
//! is set and the listener requires one. A principal may touch tenant T's keys when
//! it is T or the admin.

use std::collections::HashSet;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::identity::{IdentityConfig, IdentityRules};
use super::layout::{decode_slash, prefix_end};
use super::tenant::{ClientPrefix, End, KeyRef, RangeRef, Scope, TenantName, SLASH_KEYS_END};
use super::KeyError;

/// What to do with a key that matches no tenant rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnmatchedPolicy {
    /// Refuse the request with `INVALID_ARGUMENT`, naming the key.
    #[default]
    Reject,
    /// Send the key upstream unchanged (it may not touch etcdmux's own key space).
    Passthrough,
}

/// A key-path rule: `prefix = "/projects/{tenant}/"` takes the tenant from the
/// path; `prefix = "/datum-core/", tenant = "root"` maps a fixed prefix to a tenant.
///
/// A migration source (`etcdmux migrate`, `[migrate] source_rule`) may also use
/// `prefix = "/registry/{resource}/clusters/{tenant}/"`: kplane's shape, the resource
/// before the tenant (`/registry/pods/clusters/p/ns/x` is tenant `p`'s `/pods/ns/x`).
/// The proxy refuses it: such keys have no client prefix to render them with.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub prefix: String,
    #[serde(default)]
    pub tenant: Option<String>,
}

/// The `[tenancy]` section of the config.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenancyConfig {
    #[serde(rename = "rule")]
    pub rules: Vec<RuleConfig>,
    /// Keys passed upstream unchanged (reads for everyone, writes for the admin).
    pub global_keys: Vec<String>,
    pub unmatched: UnmatchedPolicy,
    /// Identity of requests that carry no key (Compact, LeaseGrant, Maintenance)
    /// on a listener without a static tenant.
    pub connection_identity: String,
    /// The identity allowed to compact, write global keys and run maintenance.
    pub admin_identity: String,
    /// The principal from the client certificate on listeners with
    /// `client_cert_auth` (see `keyspace::identity`).
    pub identity: Option<IdentityConfig>,
}

impl Default for TenancyConfig {
    fn default() -> Self {
        TenancyConfig {
            rules: Vec::new(),
            global_keys: vec!["compact_rev_key".to_string()],
            unmatched: UnmatchedPolicy::Reject,
            connection_identity: "root".to_string(),
            admin_identity: "root".to_string(),
            identity: None,
        }
    }
}

#[derive(Debug, Clone)]
pub(super) enum Rule {
    /// `/datum-core/` → `root`: tenant key = the key after the prefix, with its `/`.
    Fixed { prefix: Bytes, tenant: TenantName },
    /// `/projects/{tenant}/`: `literal` is `/projects/`.
    Pattern { literal: Bytes },
    /// `/registry/{resource}/clusters/{tenant}/` (migration sources only): `literal`
    /// is `/registry/`; keys are decoded as the layout decodes its own.
    Clusters { literal: Bytes },
}

/// Compiled tenant rules; shared by every listener.
#[derive(Debug)]
pub struct Resolver {
    pub(super) rules: Vec<Rule>,
    globals: HashSet<Bytes>,
    unmatched: UnmatchedPolicy,
    /// Tenant names fixed rules own; a path may not claim them (a project named
    /// `root` must never reach the root control plane's data).
    pub(super) reserved: HashSet<TenantName>,
    admin: TenantName,
    connection_identity: TenantName,
    /// Upstream prefixes etcdmux owns; passthrough keys may not reach into them.
    owned_prefixes: Vec<Bytes>,
    identity: Option<IdentityRules>,
}

impl Resolver {
    pub fn new(cfg: &TenancyConfig, owned_prefixes: &[&str]) -> Result<Resolver, KeyError> {
        Self::build(cfg, owned_prefixes, false)
    }

    /// The resolver of a migration source's keys: the proxy's rules, and also the
    /// `{resource}/clusters/{tenant}` shape.
    pub fn for_source(cfg: &TenancyConfig, owned_prefixes: &[&str]) -> Result<Resolver, KeyError> {
        Self::build(cfg, owned_prefixes, true)
    }

    fn build(cfg: &TenancyConfig, owned_prefixes: &[&str], source: bool) -> Result<Resolver, KeyError> {
        let invalid = |m: String| Err(KeyError::InvalidRule(m));
        let mut rules = Vec::new();
        let mut reserved = HashSet::new();
        let mut patterns = 0;
        for r in &cfg.rules {
            let p = r.prefix.as_str();
            if !p.starts_with('/') || !p.ends_with('/') {
                return invalid(format!("tenant rule prefix {p:?} must start and end with '/'"));
            }
            if let Some(i) = p.find("{resource}") {
                if !source {
                    return invalid(format!(
                        "tenant rule {p:?}: the {{resource}}/clusters/{{tenant}} shape describes a migration source \
                         ([migrate] source_rule), not keys the proxy can serve"
                    ));
                }
                if r.tenant.is_some() || &p[i..] != "{resource}/clusters/{tenant}/" || !p[..i].ends_with('/') {
                    return invalid(format!(
                        "tenant rule {p:?}: write the kplane shape as \"<prefix>/{{resource}}/clusters/{{tenant}}/\""
                    ));
                }
                patterns += 1;
                rules.push(Rule::Clusters { literal: Bytes::copy_from_slice(&p.as_bytes()[..i]) });
                continue;
            }
            match (&r.tenant, p.find("{tenant}")) {
                (Some(t), None) => {
                    let tenant = TenantName::new(t)?;
                    reserved.insert(tenant.clone());
                    rules.push(Rule::Fixed { prefix: Bytes::copy_from_slice(p.as_bytes()), tenant });
                }
                (None, Some(i)) => {
                    if &p[i..] != "{tenant}/" || !p[..i].ends_with('/') {
                        return invalid(format!("tenant rule {p:?}: {{tenant}} must be the last path segment"));
                    }
                    patterns += 1;
                    rules.push(Rule::Pattern { literal: Bytes::copy_from_slice(&p.as_bytes()[..i]) });
                }
                (Some(_), Some(_)) => {
                    return invalid(format!("tenant rule {p:?} has both {{tenant}} and a fixed tenant"))
                }
                (None, None) => {
                    return invalid(format!("tenant rule {p:?} needs {{tenant}} in its prefix or a tenant"))
                }
            }
        }
        if patterns > 1 {
            // Two patterns would give one tenant two client forms.
            return invalid("at most one {tenant} rule may be configured".to_string());
        }
        // Overlapping rule prefixes make resolution order-dependent: refuse them.
        let literals: Vec<&[u8]> = rules
            .iter()
            .map(|r| match r {
                Rule::Fixed { prefix, .. } => &prefix[..],
                Rule::Pattern { literal } | Rule::Clusters { literal } => &literal[..],
            })
            .collect();
        for (i, a) in literals.iter().enumerate() {
            for b in &literals[i + 1..] {
                if a.starts_with(b) || b.starts_with(a) {
                    return invalid(format!(
                        "tenant rule prefixes {:?} and {:?} overlap",
                        String::from_utf8_lossy(a),
                        String::from_utf8_lossy(b)
                    ));
                }
            }
        }
        let globals = cfg.global_keys.iter().map(|g| Bytes::copy_from_slice(g.as_bytes())).collect();
        let admin = TenantName::new(&cfg.admin_identity)?;
        let connection_identity = TenantName::new(&cfg.connection_identity)?;
        let identity = match &cfg.identity {
            Some(i) => {
                let mut names: Vec<TenantName> = reserved.iter().cloned().collect();
                names.extend([admin.clone(), connection_identity.clone()]);
                Some(IdentityRules::new(i, names)?)
            }
            None => None,
        };
        Ok(Resolver {
            rules,
            globals,
            unmatched: cfg.unmatched,
            reserved,
            admin,
            connection_identity,
            identity,
            owned_prefixes: owned_prefixes.iter().map(|p| Bytes::copy_from_slice(p.as_bytes())).collect(),
        })
    }

    /// The scope of a listener with an optional static tenant.
    pub fn scope(&self, static_tenant: Option<&str>) -> Result<Scope, KeyError> {
        match static_tenant {
            Some(t) => {
                let t = TenantName::new(t)?;
                Ok(Scope { static_tenant: Some(t.clone()), principal: t })
            }
            None => Ok(Scope { static_tenant: None, principal: self.connection_identity.clone() }),
        }
    }

    /// Where `[tenancy.identity]` is set: which certificate field names the principal.
    pub fn identity(&self) -> Option<&IdentityRules> {
        self.identity.as_ref()
    }

    /// The scope of one request on a listener whose scope is `listener`, from the
    /// values of its client certificate's identity field: the listener's static
    /// tenant (if any) with the certificate's principal. Refused when
    /// `[tenancy.identity]` is not set or the values map to no principal.
    pub fn cert_scope(&self, listener: &Scope, values: &[String]) -> Result<Scope, KeyError> {
        let Some(rules) = &self.identity else {
            return Err(KeyError::PermissionDenied("no [tenancy.identity] to read a certificate with".to_string()));
        };
        Ok(Scope { static_tenant: listener.static_tenant.clone(), principal: rules.principal(values)? })
    }

    pub fn admin(&self) -> &TenantName {
        &self.admin
    }

    pub fn is_admin(&self, scope: &Scope) -> bool {
        scope.principal == self.admin
    }

    /// Refuses a principal that is neither `tenant` nor the admin.
    pub fn authorize(&self, scope: &Scope, tenant: &TenantName) -> Result<(), KeyError> {
        if &scope.principal == tenant || self.is_admin(scope) {
            Ok(())
        } else {
            Err(KeyError::PermissionDenied(format!(
                "identity {} may not access keys of tenant {tenant}",
                scope.principal
            )))
        }
    }

    /// Refuses a principal that is not the admin, saying what was attempted.
    pub fn require_admin(&self, scope: &Scope, what: &str) -> Result<(), KeyError> {
        if self.is_admin(scope) {
            Ok(())
        } else {
            Err(KeyError::PermissionDenied(format!(
                "{what} is reserved for the admin identity {}; identity {} may not",
                self.admin, scope.principal
            )))
        }
    }

    /// Resolves one key (Put, single-key Range/Delete, compare without range_end).
    pub fn resolve_key(&self, scope: &Scope, key: &Bytes) -> Result<KeyRef, KeyError> {
        if key.is_empty() {
            return Err(KeyError::EmptyKey);
        }
        if self.globals.contains(key) {
            return Ok(KeyRef::Raw { key: key.clone(), global: true });
        }
        if let Some(t) = &scope.static_tenant {
            return Ok(KeyRef::Tenant { tenant: t.clone(), key: key.clone() });
        }
        match self.match_rules(key)? {
            Some(k) => Ok(k),
            None => self.unmatched(key),
        }
    }

    fn match_rules(&self, key: &Bytes) -> Result<Option<KeyRef>, KeyError> {
        for rule in &self.rules {
            match rule {
                Rule::Fixed { prefix, tenant } if key.starts_with(prefix) => {
                    return Ok(Some(KeyRef::Tenant { tenant: tenant.clone(), key: key.slice(prefix.len() - 1..) }));
                }
                Rule::Pattern { literal } if key.starts_with(literal) => {
                    let rest = &key[literal.len()..];
                    let Some(slash) = rest.iter().position(|&b| b == b'/') else { continue };
                    let tenant = TenantName::from_bytes(&rest[..slash])?;
                    if self.reserved.contains(&tenant) {
                        return Err(KeyError::InvalidTenant {
                            name: tenant.to_string(),
                            why: "the name is reserved by another tenant rule".to_string(),
                        });
                    }
                    return Ok(Some(KeyRef::Tenant { tenant, key: key.slice(literal.len() + slash..) }));
                }
                Rule::Clusters { literal } if key.starts_with(literal) => {
                    let Some((tenant, tkey)) = decode_slash(&literal[..literal.len() - 1], key) else { continue };
                    if self.reserved.contains(&tenant) {
                        return Err(KeyError::InvalidTenant {
                            name: tenant.to_string(),
                            why: "the name is reserved by another tenant rule".to_string(),
                        });
                    }
                    return Ok(Some(KeyRef::Tenant { tenant, key: tkey }));
                }
                _ => {}
            }
        }
        Ok(None)
    }

    fn unmatched(&self, key: &Bytes) -> Result<KeyRef, KeyError> {
        match self.unmatched {
            UnmatchedPolicy::Reject => Err(KeyError::Unmatched(key.clone())),
            UnmatchedPolicy::Passthrough => {
                self.check_raw(key, &Bytes::new())?;
                Ok(KeyRef::Raw { key: key.clone(), global: false })
            }
        }
    }

    /// Resolves a `(key, range_end)` pair with etcd's conventions: empty `range_end`
    /// is one key, `"\x00"` is "from key on" (here: to the end of the tenant's space).
    pub fn resolve_range(&self, scope: &Scope, key: &Bytes, range_end: &Bytes) -> Result<RangeRef, KeyError> {
        // etcd refuses an empty key for ranges too, whatever the range_end.
        if key.is_empty() {
            return Err(KeyError::EmptyKey);
        }
        if range_end.is_empty() {
            return Ok(match self.resolve_key(scope, key)? {
                KeyRef::Tenant { tenant, key } => RangeRef::Tenant { tenant, start: key, end: End::Single },
                KeyRef::Raw { key, global } => RangeRef::Raw { key, range_end: Bytes::new(), global },
            });
        }
        let unbounded = range_end.as_ref() == b"\0";
        if let Some(t) = &scope.static_tenant {
            // Every non-global key is the tenant's, so any range is a tenant range;
            // global keys are simply not part of the tenant's space.
            let end = if unbounded { End::Unbounded } else { End::Key(range_end.clone()) };
            return Ok(RangeRef::Tenant { tenant: t.clone(), start: key.clone(), end });
        }
        let Some(KeyRef::Tenant { tenant, key: start }) = self.match_rules(key)? else {
            return self.resolve_raw_range(scope, key, range_end);
        };
        if unbounded || *range_end == prefix_end(&self.client_prefix_bytes(&tenant)?.concat_slash()) {
            // Key-path tenant keys all have a leading `/`: the tenant's keys end there.
            let end = End::Key(Bytes::from_static(SLASH_KEYS_END));
            return Ok(RangeRef::Tenant { tenant, start, end });
        }
        match self.match_rules(range_end)? {
            Some(KeyRef::Tenant { tenant: t2, key: end }) if t2 == tenant => {
                Ok(RangeRef::Tenant { tenant, start, end: End::Key(end) })
            }
            Some(KeyRef::Tenant { tenant: t2, .. }) => {
                Err(KeyError::CrossTenant { from: tenant.to_string(), to: t2.to_string() })
            }
            _ => Err(KeyError::CrossTenant {
                from: tenant.to_string(),
                to: format!("unmatched key {}", String::from_utf8_lossy(range_end)),
            }),
        }
    }

    fn resolve_raw_range(&self, _scope: &Scope, key: &Bytes, range_end: &Bytes) -> Result<RangeRef, KeyError> {
        if self.unmatched == UnmatchedPolicy::Reject {
            return Err(KeyError::Unmatched(key.clone()));
        }
        if range_end.as_ref() != b"\0" {
            if let Some(KeyRef::Tenant { tenant, .. }) = self.match_rules(range_end)? {
                return Err(KeyError::CrossTenant {
                    from: format!("unmatched key {}", String::from_utf8_lossy(key)),
                    to: tenant.to_string(),
                });
            }
        }
        self.check_raw(key, range_end)?;
        Ok(RangeRef::Raw { key: key.clone(), range_end: range_end.clone(), global: false })
    }

    /// A passthrough range may not reach into the layout or meta prefixes: those hold
    /// every tenant's data.
    fn check_raw(&self, key: &Bytes, range_end: &Bytes) -> Result<(), KeyError> {
        for owned in &self.owned_prefixes {
            let owned_end = prefix_end(owned);
            let overlaps = if range_end.is_empty() {
                key.starts_with(owned)
            } else {
                let end_after_owned = range_end.as_ref() == b"\0" || range_end > owned;
                key.as_ref() < owned_end.as_ref() && end_after_owned
            };
            if overlaps {
                return Err(KeyError::PermissionDenied(format!(
                    "passthrough key range starting at {:?} reaches into etcdmux's own key space {:?}",
                    String::from_utf8_lossy(key),
                    String::from_utf8_lossy(owned)
                )));
            }
        }
        Ok(())
    }

    /// The client prefix of `tenant` as seen on `scope`: empty on a static listener,
    /// the rule's prefix otherwise.
    pub fn client_prefix(&self, scope: &Scope, tenant: &TenantName) -> Result<ClientPrefix, KeyError> {
        if scope.static_tenant.is_some() {
            return Ok(ClientPrefix::default());
        }
        self.client_prefix_bytes(tenant).map(ClientPrefix)
    }

    fn client_prefix_bytes(&self, tenant: &TenantName) -> Result<Bytes, KeyError> {
        let mut pattern = None;
        for rule in &self.rules {
            match rule {
                Rule::Fixed { prefix, tenant: t } if t == tenant => {
                    return Ok(prefix.slice(..prefix.len() - 1));
                }
                Rule::Pattern { literal } => pattern = Some(literal),
                _ => {}
            }
        }
        match pattern {
            Some(lit) if !self.reserved.contains(tenant) => {
                let mut out = BytesMut::with_capacity(lit.len() + tenant.as_str().len());
                out.put_slice(lit);
                out.put_slice(tenant.as_str().as_bytes());
                Ok(out.freeze())
            }
            _ => Err(KeyError::NoClientForm(tenant.clone())),
        }
    }
}

trait ConcatSlash {
    fn concat_slash(&self) -> Bytes;
}

impl ConcatSlash for Bytes {
    fn concat_slash(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.len() + 1);
        out.put_slice(self);
        out.put_u8(b'/');
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn milo() -> (Resolver, Scope) {
        let cfg =
            tenancy(r#"rule = [ { prefix = "/projects/{tenant}/" }, { prefix = "/datum-core/", tenant = "root" } ]"#);
        let r = Resolver::new(&cfg, OWNED).unwrap();
        let s = r.scope(None).unwrap();
        (r, s)
    }

    const OWNED: &[&str] = &["/registry", "/etcdmux"];

    fn tenancy(toml_text: &str) -> TenancyConfig {
        toml::from_str(toml_text).unwrap()
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn t(s: &str) -> TenantName {
        TenantName::new(s).unwrap()
    }

    #[test]
    fn key_path_rules() {
        let (r, s) = milo();
        assert_eq!(
            r.resolve_key(&s, &b("/projects/p1/pods/default/nginx")).unwrap(),
            KeyRef::Tenant { tenant: t("p1"), key: b("/pods/default/nginx") }
        );
        assert_eq!(
            r.resolve_key(&s, &b("/datum-core/pods/x")).unwrap(),
            KeyRef::Tenant { tenant: t("root"), key: b("/pods/x") }
        );
        assert_eq!(
            r.resolve_key(&s, &b("compact_rev_key")).unwrap(),
            KeyRef::Raw { key: b("compact_rev_key"), global: true }
        );
        assert!(matches!(r.resolve_key(&s, &b("/other/x")), Err(KeyError::Unmatched(_))));
        assert!(matches!(r.resolve_key(&s, &b("/projects/p1")), Err(KeyError::Unmatched(_))));
        assert!(matches!(r.resolve_key(&s, &b("/projects//x")), Err(KeyError::InvalidTenant { .. })));
        assert!(matches!(r.resolve_key(&s, &b("/projects/root/x")), Err(KeyError::InvalidTenant { .. })));
        assert!(matches!(r.resolve_key(&s, &Bytes::new()), Err(KeyError::EmptyKey)));
    }

    #[test]
    fn range_ends() {
        let (r, s) = milo();
        let rr = |k: &str, e: &[u8]| r.resolve_range(&s, &b(k), &Bytes::copy_from_slice(e));
        assert_eq!(
            rr("/projects/p/pods/", b"/projects/p/pods0").unwrap(),
            RangeRef::Tenant { tenant: t("p"), start: b("/pods/"), end: End::Key(b("/pods0")) }
        );
        // The whole project: prefix end of `/projects/p/`.
        assert_eq!(
            rr("/projects/p/", b"/projects/p0").unwrap(),
            RangeRef::Tenant { tenant: t("p"), start: b("/"), end: End::Key(b("0")) }
        );
        assert_eq!(
            rr("/projects/p/a", b"\0").unwrap(),
            RangeRef::Tenant { tenant: t("p"), start: b("/a"), end: End::Key(b("0")) }
        );
        assert!(matches!(rr("/projects/p/a", b"/projects/q/a"), Err(KeyError::CrossTenant { .. })));
        assert!(matches!(rr("/projects/p/a", b"/zzz"), Err(KeyError::CrossTenant { .. })));
        assert!(matches!(rr("/projects/", b"/projects0"), Err(KeyError::Unmatched(_))));
    }

    #[test]
    fn static_scope_owns_every_key_but_globals() {
        let (r, _) = milo();
        let s = r.scope(Some("tenant-a")).unwrap();
        assert_eq!(r.resolve_key(&s, &b("foo")).unwrap(), KeyRef::Tenant { tenant: t("tenant-a"), key: b("foo") });
        assert_eq!(
            r.resolve_key(&s, &b("compact_rev_key")).unwrap(),
            KeyRef::Raw { key: b("compact_rev_key"), global: true }
        );
        assert_eq!(
            r.resolve_range(&s, &b("\0"), &b("\0")).unwrap(),
            RangeRef::Tenant { tenant: t("tenant-a"), start: b("\0"), end: End::Unbounded }
        );
        assert!(matches!(r.resolve_range(&s, &Bytes::new(), &b("\0")), Err(KeyError::EmptyKey)));
        assert!(r.authorize(&s, &t("tenant-a")).is_ok());
        assert!(r.authorize(&s, &t("tenant-b")).is_err());
        assert!(r.require_admin(&s, "Compact").is_err());
    }

    #[test]
    fn passthrough_cannot_reach_owned_space() {
        let cfg = tenancy("unmatched = \"passthrough\"\nrule = [ { prefix = \"/projects/{tenant}/\" } ]");
        let r = Resolver::new(&cfg, OWNED).unwrap();
        let s = r.scope(None).unwrap();
        assert!(r.resolve_key(&s, &b("/free/key")).is_ok());
        assert!(r.resolve_key(&s, &b("/registry/pods/clusters/p/x")).is_err());
        assert!(r.resolve_range(&s, &b("/a"), &b("/z")).is_err(), "[/a,/z) contains /registry");
        assert!(r.resolve_range(&s, &b("/a"), &b("/b")).is_ok());
        assert!(r.resolve_range(&s, &b("/a"), &b("/projects/p/x")).is_err());
    }

    #[test]
    fn tenant_names() {
        for bad in ["", "a/b", "a\nb"] {
            assert!(TenantName::new(bad).is_err(), "{bad:?}");
        }
        assert!(TenantName::new("project-1.example").is_ok());
        let rule = |p: &str| tenancy(&format!("rule = [ {{ prefix = {p:?} }} ]"));
        assert!(Resolver::new(&rule("/projects/{tenant}/x/"), OWNED).is_err());
        assert!(Resolver::new(&rule("projects/{tenant}/"), OWNED).is_err());
        assert!(Resolver::new(&rule("/projects/"), OWNED).is_err());
    }

    #[test]
    fn client_prefixes() {
        let (r, s) = milo();
        assert_eq!(r.client_prefix(&s, &t("p")).unwrap().render(&b("/pods/x")), b("/projects/p/pods/x"));
        assert_eq!(r.client_prefix(&s, &t("root")).unwrap().render(&b("/pods/x")), b("/datum-core/pods/x"));
        let st = r.scope(Some("p")).unwrap();
        assert_eq!(r.client_prefix(&st, &t("p")).unwrap().render(&b("/pods/x")), b("/pods/x"));
    }
}
