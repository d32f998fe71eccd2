//! Tenant names and the forms a request's keys take once resolved: which tenant,
//! which tenant key, and how a tenant key is shown back to its client.
//!
//! Keys arrive in *client form*, the form the apiserver uses (`/projects/p/pods/x`).
//! Resolution ([`super::Resolver`]) splits a client key into a tenant and a *tenant
//! key* (`/pods/x`), which the [layout](super::layout) then places upstream. Responses
//! go the other way: a tenant key is rendered back into client form with the
//! tenant's [`ClientPrefix`].

use std::fmt;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use super::KeyError;

/// A validated tenant name: non-empty, valid UTF-8, at most 253 bytes, no `/` and no
/// control characters (so it can never split or escape a path segment upstream).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantName(Arc<str>);

impl TenantName {
    pub fn new(name: &str) -> Result<TenantName, KeyError> {
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
            Some(why) => Err(KeyError::InvalidTenant { name: name.to_string(), why: why.to_string() }),
            None => Ok(TenantName(name.into())),
        }
    }

    pub(super) fn from_bytes(raw: &[u8]) -> Result<TenantName, KeyError> {
        match std::str::from_utf8(raw) {
            Ok(s) => TenantName::new(s),
            Err(_) => Err(KeyError::InvalidTenant {
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
    /// To the end of the tenant's key space (`"\x00"` on a static listener).
    Unbounded,
}

/// Where keys with a leading `/` end (the prefix end of `/`). On a key-path listener
/// every tenant key has a leading `/`, and a range to the end of the tenant's keys
/// (`"\x00"`, or the prefix end of `/projects/p/`) ends here: keys without one,
/// written through a static listener, have no client form there (`/projects/a` +
/// `b/x` would name tenant `ab`'s key `/projects/ab/x`).
pub const SLASH_KEYS_END: &[u8] = b"0";

/// Where a `(key, range_end)` pair goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeRef {
    Tenant { tenant: TenantName, start: Bytes, end: End },
    Raw { key: Bytes, range_end: Bytes, global: bool },
}

/// The bytes a tenant key is prefixed with in client form: `/projects/p` for a
/// key-path tenant, empty on a static listener.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientPrefix(pub(super) Bytes);

impl ClientPrefix {
    /// Client form of a tenant key, or `None` when the key has none here: behind a
    /// key-path prefix only keys with a leading `/` have one (`/projects/a` +
    /// `b/x` would be tenant `ab`'s `/projects/ab/x`).
    pub fn render_checked(&self, tenant_key: &Bytes) -> Option<Bytes> {
        (self.0.is_empty() || tenant_key.starts_with(b"/")).then(|| self.render(tenant_key))
    }

    /// Client form of a tenant key with a client form (see [`Self::render_checked`]).
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

/// The identity a listener gives its requests: on a static listener both fields are
/// the static tenant; otherwise the principal is the config's `connection_identity`.
#[derive(Debug, Clone)]
pub struct Scope {
    pub static_tenant: Option<TenantName>,
    pub principal: TenantName,
}
