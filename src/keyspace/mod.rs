//! The key space: tenant names, how a client key resolves to a tenant, and where a
//! tenant's key lives upstream. Pure functions over bytes: no I/O, no tokio, no
//! tonic, so every rule here is tested without an etcd.
//!
//! - [`tenant`]: [`TenantName`], the resolved forms of keys and ranges
//!   ([`KeyRef`], [`RangeRef`], [`End`]) and the client form of a tenant key
//!   ([`ClientPrefix`]);
//! - [`rules`]: the [`Resolver`] — key-path rules, static tenants, global keys,
//!   principals and what they may touch;
//! - [`identity`]: the principal named by a client certificate's CN or SAN;
//! - [`layout`]: the shared upstream layout ([`KeyLayout`]), bijective and
//!   tenant-closed, and etcdmux's own records (root index, lease owners, fence);
//! - [`plan`]: a tenant range as upstream ranges ([`Piece`]s), one per slot;
//! - [`source`]: where a migration source keeps a set of tenants' keys.

pub mod identity;
pub mod layout;
pub mod plan;
pub mod rules;
pub mod source;
pub mod tenant;
#[cfg(test)]
mod views;

use bytes::Bytes;

pub use identity::{IdentityConfig, IdentityField, IdentityRules};
pub use layout::{prefix_end, root_of, slot_of, KeyLayout, Piece, Root, Slot};
pub use rules::{Resolver, RuleConfig, TenancyConfig, UnmatchedPolicy};
pub use tenant::{ClientPrefix, End, KeyRef, RangeRef, Scope, TenantName, SLASH_KEYS_END};

/// Why a key, range or rule was refused. Converted to a gRPC status in `crate::error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdmux: key {:?} matches no tenant rule and the config rejects unmatched keys", String::from_utf8_lossy(.0))]
    Unmatched(Bytes),
    #[error("etcdmux: invalid tenant name {name:?}: {why}")]
    InvalidTenant { name: String, why: String },
    #[error("etcdmux: a request may not span tenants: range from tenant {from} reaches {to}")]
    CrossTenant { from: String, to: String },
    #[error("etcdmux: permission denied: {0}")]
    PermissionDenied(String),
    #[error("etcdmux: tenant {0} has no client key form under the configured rules")]
    NoClientForm(TenantName),
    /// A tenant rule in the config is malformed (reported at startup).
    #[error("etcdmux: {0}")]
    InvalidRule(String),
}
