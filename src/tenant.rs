//! Tenant resolution: which tenant a request belongs to, and the tenant's own view
//! of its keys.
//!
//! Keys arrive in *client form*, the form the apiserver uses (`/projects/p/pods/x`).
//! Resolution splits a client key into a tenant and a *tenant key* (`/pods/x`), which
//! `keylayout` then places upstream. Responses go the other way: a tenant key is
//! rendered back into client form with the tenant's [`ClientPrefix`].
//!
//! Three sources, in the order DESIGN.md gives:
//! 1. key-path rules from the config (`/projects/{tenant}/`, `/datum-core/` → `root`);
//! 2. a static tenant per listener (sidecar mode: every key belongs to it);
//! 3. (mTLS identities are not built yet.)
//!
//! Global keys (`compact_rev_key`) pass through unchanged. One request never touches
//! two tenants: ranges whose ends resolve to different tenants are refused here.
//!
//! A request's *principal* (who is asking) is separate from the tenant whose keys it
//! names: on a static listener both are the static tenant; with key-path rules the
//! principal is the config's `connection_identity` (one trusted apiserver holds the
//! connection). A principal may touch tenant T's keys when it is T or the admin.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::config::{Config, UnmatchedPolicy};
use crate::error::Error;
use crate::keylayout::prefix_end;

/// A validated tenant name: non-empty, valid UTF-8, at most 253 bytes, no `/` and no
/// control characters (so it can never split or escape a path segment upstream).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantName(Arc<str>);

impl TenantName {
    pub fn new(name: &str) -> Result<TenantName, Error> {
        let why = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > 253 {
            Some("it is longer than 253 bytes")
        } else if name.contains('/') {
            Some("it contains '/'")
        } else if name.chars().any(|c| c.is_control()) {
            Some("it contains a control character")
        } else {
            None
        };
        match why {
            Some(why) => Err(Error::InvalidTenant { name: name.to_string(), why: why.to_string() }),
            None => Ok(TenantName(name.into())),
        }
    }

    fn from_bytes(raw: &[u8]) -> Result<TenantName, Error> {
        match std::str::from_utf8(raw) {
            Ok(s) => TenantName::new(s),
            Err(_) => Err(Error::InvalidTenant {
                name: String::from_utf8_lossy(raw).into_owned(),
                why: "it is not valid UTF-8".to_string(),
            }),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// Where a single key goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    /// A tenant's key, in tenant form.
    Tenant { tenant: TenantName, key: Bytes },
    /// A key passed upstream unchanged: a configured global key, or an unmatched key
    /// under the `passthrough` policy.
    Raw { key: Bytes, global: bool },
}

/// The end of a tenant range, in tenant form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// `range_end` was empty: the start key alone.
    Single,
    /// Exclusive end key.
    Key(Bytes),
    /// To the end of the tenant's key space (`"\x00"`, or the prefix end of the
    /// tenant's client prefix).
    Unbounded,
}

/// Where a `(key, range_end)` pair goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeRef {
    Tenant { tenant: TenantName, start: Bytes, end: End },
    Raw { key: Bytes, range_end: Bytes, global: bool },
}

/// The bytes a tenant key is prefixed with in client form: `/projects/p` for a
/// key-path tenant, empty on a static listener.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientPrefix(Bytes);

impl ClientPrefix {
    /// Client form of a tenant key.
    pub fn render(&self, tenant_key: &Bytes) -> Bytes {
        if self.0.is_empty() {
            return tenant_key.clone();
        }
        let mut out = BytesMut::with_capacity(self.0.len() + tenant_key.len());
        out.put_slice(&self.0);
        out.put_slice(tenant_key);
        out.freeze()
    }
}

#[derive(Debug, Clone)]
enum Rule {
    /// `/datum-core/` → `root`: tenant key = the key after the prefix, with its `/`.
    Fixed { prefix: Bytes, tenant: TenantName },
    /// `/projects/{tenant}/`: `literal` is `/projects/`.
    Pattern { literal: Bytes },
}

/// The identity a listener gives its requests.
#[derive(Debug, Clone)]
pub struct Scope {
    pub static_tenant: Option<TenantName>,
    pub principal: TenantName,
}

/// Compiled tenant rules; shared by every listener.
#[derive(Debug)]
pub struct Resolver {
    rules: Vec<Rule>,
    globals: HashSet<Bytes>,
    unmatched: UnmatchedPolicy,
    /// Tenant names fixed rules own; a path may not claim them (a project named
    /// `root` must never reach the root control plane's data).
    reserved: HashSet<TenantName>,
    admin: TenantName,
    connection_identity: TenantName,
    /// Upstream prefixes etcdmux owns; passthrough keys may not reach into them.
    owned_prefixes: Vec<Bytes>,
}

impl Resolver {
    pub fn new(cfg: &Config) -> Result<Resolver, Error> {
        let invalid = |m: String| Err(Error::InvalidArgument(m));
        let mut rules = Vec::new();
        let mut reserved = HashSet::new();
        let mut patterns = 0;
        for r in &cfg.tenancy.rules {
            let p = r.prefix.as_str();
            if !p.starts_with('/') || !p.ends_with('/') {
                return invalid(format!("tenant rule prefix {p:?} must start and end with '/'"));
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
                Rule::Pattern { literal } => &literal[..],
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
        let globals = cfg.tenancy.global_keys.iter().map(|g| Bytes::copy_from_slice(g.as_bytes())).collect();
        for l in &cfg.listeners {
            if let Some(t) = &l.static_tenant {
                TenantName::new(t)?;
            }
        }
        Ok(Resolver {
            rules,
            globals,
            unmatched: cfg.tenancy.unmatched,
            reserved,
            admin: TenantName::new(&cfg.tenancy.admin_identity)?,
            connection_identity: TenantName::new(&cfg.tenancy.connection_identity)?,
            owned_prefixes: vec![
                Bytes::copy_from_slice(cfg.layout.prefix.as_bytes()),
                Bytes::copy_from_slice(cfg.layout.meta_prefix.as_bytes()),
            ],
        })
    }

    /// The scope of a listener with an optional static tenant.
    pub fn scope(&self, static_tenant: Option<&str>) -> Result<Scope, Error> {
        match static_tenant {
            Some(t) => {
                let t = TenantName::new(t)?;
                Ok(Scope { static_tenant: Some(t.clone()), principal: t })
            }
            None => Ok(Scope { static_tenant: None, principal: self.connection_identity.clone() }),
        }
    }

    pub fn admin(&self) -> &TenantName {
        &self.admin
    }

    pub fn is_admin(&self, scope: &Scope) -> bool {
        scope.principal == self.admin
    }

    /// Refuses a principal that is neither `tenant` nor the admin.
    pub fn authorize(&self, scope: &Scope, tenant: &TenantName) -> Result<(), Error> {
        if &scope.principal == tenant || self.is_admin(scope) {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!("identity {} may not access keys of tenant {tenant}", scope.principal)))
        }
    }

    /// Refuses a principal that is not the admin, saying what was attempted.
    pub fn require_admin(&self, scope: &Scope, what: &str) -> Result<(), Error> {
        if self.is_admin(scope) {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!(
                "{what} is reserved for the admin identity {}; identity {} may not",
                self.admin, scope.principal
            )))
        }
    }

    /// Resolves one key (Put, single-key Range/Delete, compare without range_end).
    pub fn resolve_key(&self, scope: &Scope, key: &Bytes) -> Result<KeyRef, Error> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
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

    fn match_rules(&self, key: &Bytes) -> Result<Option<KeyRef>, Error> {
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
                        return Err(Error::InvalidTenant {
                            name: tenant.to_string(),
                            why: "the name is reserved by another tenant rule".to_string(),
                        });
                    }
                    return Ok(Some(KeyRef::Tenant { tenant, key: key.slice(literal.len() + slash..) }));
                }
                _ => {}
            }
        }
        Ok(None)
    }

    fn unmatched(&self, key: &Bytes) -> Result<KeyRef, Error> {
        match self.unmatched {
            UnmatchedPolicy::Reject => Err(Error::Unmatched(key.clone())),
            UnmatchedPolicy::Passthrough => {
                self.check_raw(key, &Bytes::new())?;
                Ok(KeyRef::Raw { key: key.clone(), global: false })
            }
        }
    }

    /// Resolves a `(key, range_end)` pair with etcd's conventions: empty `range_end`
    /// is one key, `"\x00"` is "from key on" (here: to the end of the tenant's space).
    pub fn resolve_range(&self, scope: &Scope, key: &Bytes, range_end: &Bytes) -> Result<RangeRef, Error> {
        // etcd refuses an empty key for ranges too, whatever the range_end.
        if key.is_empty() {
            return Err(Error::EmptyKey);
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
            return Ok(RangeRef::Tenant { tenant, start, end: End::Unbounded });
        }
        match self.match_rules(range_end)? {
            Some(KeyRef::Tenant { tenant: t2, key: end }) if t2 == tenant => {
                Ok(RangeRef::Tenant { tenant, start, end: End::Key(end) })
            }
            Some(KeyRef::Tenant { tenant: t2, .. }) => {
                Err(Error::CrossTenant { from: tenant.to_string(), to: t2.to_string() })
            }
            _ => Err(Error::CrossTenant {
                from: tenant.to_string(),
                to: format!("unmatched key {}", String::from_utf8_lossy(range_end)),
            }),
        }
    }

    fn resolve_raw_range(&self, _scope: &Scope, key: &Bytes, range_end: &Bytes) -> Result<RangeRef, Error> {
        if self.unmatched == UnmatchedPolicy::Reject {
            return Err(Error::Unmatched(key.clone()));
        }
        if range_end.as_ref() != b"\0" {
            if let Some(KeyRef::Tenant { tenant, .. }) = self.match_rules(range_end)? {
                return Err(Error::CrossTenant {
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
    fn check_raw(&self, key: &Bytes, range_end: &Bytes) -> Result<(), Error> {
        for owned in &self.owned_prefixes {
            let owned_end = prefix_end(owned);
            let overlaps = if range_end.is_empty() {
                key.starts_with(owned)
            } else {
                let end_after_owned = range_end.as_ref() == b"\0" || range_end > owned;
                key.as_ref() < owned_end.as_ref() && end_after_owned
            };
            if overlaps {
                return Err(Error::PermissionDenied(format!(
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
    pub fn client_prefix(&self, scope: &Scope, tenant: &TenantName) -> Result<ClientPrefix, Error> {
        if scope.static_tenant.is_some() {
            return Ok(ClientPrefix::default());
        }
        self.client_prefix_bytes(tenant).map(ClientPrefix)
    }

    fn client_prefix_bytes(&self, tenant: &TenantName) -> Result<Bytes, Error> {
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
            _ => Err(Error::InvalidArgument(format!(
                "tenant {tenant} has no client key form under the configured rules"
            ))),
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
        let cfg = Config::parse(
            r#"
            [tenancy]
            rule = [ { prefix = "/projects/{tenant}/" }, { prefix = "/datum-core/", tenant = "root" } ]
            "#,
            "test",
        )
        .unwrap();
        let r = Resolver::new(&cfg).unwrap();
        let s = r.scope(None).unwrap();
        (r, s)
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
        assert!(matches!(r.resolve_key(&s, &b("/other/x")), Err(Error::Unmatched(_))));
        assert!(matches!(r.resolve_key(&s, &b("/projects/p1")), Err(Error::Unmatched(_))));
        assert!(matches!(r.resolve_key(&s, &b("/projects//x")), Err(Error::InvalidTenant { .. })));
        assert!(matches!(r.resolve_key(&s, &b("/projects/root/x")), Err(Error::InvalidTenant { .. })));
        assert!(matches!(r.resolve_key(&s, &Bytes::new()), Err(Error::EmptyKey)));
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
            RangeRef::Tenant { tenant: t("p"), start: b("/"), end: End::Unbounded }
        );
        assert_eq!(
            rr("/projects/p/a", b"\0").unwrap(),
            RangeRef::Tenant { tenant: t("p"), start: b("/a"), end: End::Unbounded }
        );
        assert!(matches!(rr("/projects/p/a", b"/projects/q/a"), Err(Error::CrossTenant { .. })));
        assert!(matches!(rr("/projects/p/a", b"/zzz"), Err(Error::CrossTenant { .. })));
        assert!(matches!(rr("/projects/", b"/projects0"), Err(Error::Unmatched(_))));
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
        assert!(matches!(r.resolve_range(&s, &Bytes::new(), &b("\0")), Err(Error::EmptyKey)));
        assert!(r.authorize(&s, &t("tenant-a")).is_ok());
        assert!(r.authorize(&s, &t("tenant-b")).is_err());
        assert!(r.require_admin(&s, "Compact").is_err());
    }

    #[test]
    fn passthrough_cannot_reach_owned_space() {
        let cfg = Config::parse(
            "[tenancy]\nunmatched = \"passthrough\"\nrule = [ { prefix = \"/projects/{tenant}/\" } ]",
            "t",
        )
        .unwrap();
        let r = Resolver::new(&cfg).unwrap();
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
        let rule = |p: &str| Config::parse(&format!("[tenancy]\nrule = [ {{ prefix = {p:?} }} ]"), "t").unwrap();
        assert!(Resolver::new(&rule("/projects/{tenant}/x/")).is_err());
        assert!(Resolver::new(&rule("projects/{tenant}/")).is_err());
        assert!(Resolver::new(&rule("/projects/")).is_err());
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
