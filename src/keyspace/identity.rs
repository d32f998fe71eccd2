//! Identity from a client certificate (`[tenancy.identity]`): which field of a
//! verified client certificate names the principal, and how its value maps to a
//! tenant or to the admin identity. Pure: the certificate is parsed by the caller
//! (`grpc::identity`), this module only sees the field's values.
//!
//! ```toml
//! [tenancy.identity]
//! from = "uri_san"                                   # "cn" | "dns_san" | "uri_san"
//! pattern = "spiffe://example.org/project/{tenant}"  # optional
//! map = { "spiffe://example.org/apiserver" = "root" } # exact values, checked first
//! ```
//!
//! A value found in `map` gives that principal (the admin identity only comes this
//! way). Otherwise a value matching `pattern` gives the tenant in `{tenant}`, unless
//! that name is the admin identity or a tenant of a fixed key-path rule: those are
//! reachable through `map` only. A certificate whose values map to nothing, or to
//! two different principals, is refused with `PERMISSION_DENIED` naming its values.

use serde::{Deserialize, Serialize};

use super::tenant::TenantName;
use super::KeyError;

/// The certificate field that carries the identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityField {
    /// The subject's common name.
    Cn,
    /// The DNS names of the subject alternative name extension.
    DnsSan,
    /// The URIs of the subject alternative name extension (SPIFFE IDs).
    UriSan,
}

impl IdentityField {
    pub fn name(self) -> &'static str {
        match self {
            IdentityField::Cn => "CN",
            IdentityField::DnsSan => "DNS SAN",
            IdentityField::UriSan => "URI SAN",
        }
    }
}

/// The `[tenancy.identity]` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    pub from: IdentityField,
    /// A value with one `{tenant}` placeholder, e.g. `spiffe://example.org/project/{tenant}`.
    #[serde(default)]
    pub pattern: Option<String>,
    /// Exact values mapped to a principal (a tenant or the admin identity).
    #[serde(default)]
    pub map: std::collections::BTreeMap<String, String>,
}

/// A compiled [`IdentityConfig`].
#[derive(Debug, Clone)]
pub struct IdentityRules {
    pub from: IdentityField,
    /// The pattern split at `{tenant}`.
    pattern: Option<(String, String)>,
    map: Vec<(String, TenantName)>,
    /// Names a pattern may not yield (the admin, fixed-rule tenants).
    reserved: Vec<TenantName>,
}

impl IdentityRules {
    pub fn new(cfg: &IdentityConfig, reserved: Vec<TenantName>) -> Result<IdentityRules, KeyError> {
        let invalid = |m: String| Err(KeyError::InvalidRule(m));
        let pattern = match &cfg.pattern {
            None => None,
            Some(p) => match p.split_once("{tenant}") {
                Some((pre, post)) if !post.contains("{tenant}") => Some((pre.to_string(), post.to_string())),
                _ => return invalid(format!("tenancy.identity.pattern {p:?} needs exactly one {{tenant}}")),
            },
        };
        if pattern.is_none() && cfg.map.is_empty() {
            return invalid("tenancy.identity needs a pattern, a map, or both".to_string());
        }
        let map =
            cfg.map.iter().map(|(k, v)| TenantName::new(v).map(|t| (k.clone(), t))).collect::<Result<Vec<_>, _>>()?;
        Ok(IdentityRules { from: cfg.from, pattern, map, reserved })
    }

    /// The principal named by a certificate whose `from` field holds `values`.
    pub fn principal(&self, values: &[String]) -> Result<TenantName, KeyError> {
        let mut found: Option<TenantName> = None;
        for v in values {
            let Some(p) = self.map_one(v) else { continue };
            match &found {
                Some(f) if *f != p => {
                    return Err(KeyError::PermissionDenied(format!(
                        "client certificate {} {} name two principals ({f} and {p})",
                        self.from.name(),
                        quoted(values)
                    )))
                }
                _ => found = Some(p),
            }
        }
        found.ok_or_else(|| {
            KeyError::PermissionDenied(if values.is_empty() {
                format!("client certificate has no {}", self.from.name())
            } else {
                format!("client certificate {} {} maps to no tenant", self.from.name(), quoted(values))
            })
        })
    }

    fn map_one(&self, value: &str) -> Option<TenantName> {
        if let Some((_, t)) = self.map.iter().find(|(k, _)| k == value) {
            return Some(t.clone());
        }
        let (pre, post) = self.pattern.as_ref()?;
        let name = value.strip_prefix(pre.as_str())?.strip_suffix(post.as_str())?;
        let t = TenantName::new(name).ok()?;
        (!self.reserved.contains(&t)).then_some(t)
    }
}

fn quoted(values: &[String]) -> String {
    values.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml_text: &str) -> IdentityRules {
        let cfg: IdentityConfig = toml::from_str(toml_text).unwrap();
        IdentityRules::new(&cfg, vec![TenantName::new("root").unwrap()]).unwrap()
    }

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn map_then_pattern() {
        let r = rules(
            r#"from = "uri_san"
               pattern = "spiffe://example.org/project/{tenant}"
               map = { "spiffe://example.org/apiserver" = "root" }"#,
        );
        let p = |vals: &[&str]| r.principal(&v(vals)).map(|t| t.to_string());
        assert_eq!(p(&["spiffe://example.org/project/a"]).unwrap(), "a");
        assert_eq!(p(&["spiffe://example.org/apiserver"]).unwrap(), "root");
        assert_eq!(p(&["https://x", "spiffe://example.org/project/a"]).unwrap(), "a");
        // The admin only through the map; no tenant name with a slash.
        assert!(p(&["spiffe://example.org/project/root"]).is_err());
        assert!(p(&["spiffe://example.org/project/a/b"]).is_err());
        assert!(p(&["spiffe://example.org/project/"]).is_err());
        let e = p(&["spiffe://other.org/project/a"]).unwrap_err().to_string();
        assert!(e.contains("URI SAN \"spiffe://other.org/project/a\" maps to no tenant"), "{e}");
        let two = p(&["spiffe://example.org/project/a", "spiffe://example.org/project/b"]).unwrap_err();
        assert!(two.to_string().contains("two principals"), "{two}");
        assert!(p(&[]).unwrap_err().to_string().contains("has no URI SAN"));
    }

    #[test]
    fn bad_configs() {
        let bad = |t: &str| IdentityRules::new(&toml::from_str(t).unwrap(), vec![]).is_err();
        assert!(bad(r#"from = "cn""#));
        assert!(bad(r#"from = "cn"
                       pattern = "x""#));
        assert!(bad(r#"from = "cn"
                       pattern = "{tenant}{tenant}""#));
        assert!(bad(r#"from = "cn"
                       map = { "x" = "a/b" }"#));
        assert!(toml::from_str::<IdentityConfig>(r#"from = "email""#).is_err());
    }
}
