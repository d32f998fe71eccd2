//! The upstream key layout: where a tenant's key lives in the shared etcd keyspace,
//! and how a tenant's key range becomes upstream ranges.
//!
//! The layout is kplane's, so a kplane-native apiserver can later read the same data:
//!
//! | tenant | tenant key                                   | upstream key                                                    |
//! |--------|----------------------------------------------|-----------------------------------------------------------------|
//! | `p`    | `/pods/default/nginx`                        | `/registry/pods/clusters/p/default/nginx`                       |
//! | `p`    | `/pods`                                      | `/registry/pods/clusters/p`                                     |
//! | `p`    | `/pods/`                                     | `/registry/pods/clusters/p/`                                    |
//! | `p`    | `/apps.k8s.io/deployments/ns/web`            | `/registry/apps.k8s.io/deployments/clusters/p/ns/web`           |
//! | `p`    | `/apps.k8s.io`                               | `/registry/apps.k8s.io/clusters/p`                              |
//! | `p`    | `/`                                          | `/registry//clusters/p`                                         |
//! | `p`    | `foo` (no leading `/`)                       | `/etcdmux/bare/p/foo`                                           |
//!
//! A slash key `/<root><rest>` has a *resource root*: its first path segment, or its
//! first two when the first holds a `.` (an API group) and a second follows. `rest`
//! is empty or starts with `/`. Keys without a leading `/` (possible on a static
//! listener) form one more root per tenant, the *bare* root, kept under the meta
//! prefix because no name in the slash layout is free to hold them.
//!
//! Properties (proved by the proptests below, for every byte string):
//! - **bijective and tenant-closed**: `decode(encode(t, k)) == (t, k)`; tenant names
//!   hold no `/`, so a tenant can never reach another's segment;
//! - **order-preserving within a root**: a root's keys are `prefix + rest`, so a range
//!   inside one root is one upstream range with the same order, limit and `more`;
//! - **ranges across roots** are planned as one upstream piece per
//!   *slot* (the key `/<root>` alone, the `/<root>/…` interval — `/<root>!…` belongs
//!   to another root — or the bare root), found through the *root index*: one key per
//!   slot any tenant has used, `<meta>/slots/<slot>`, written in the same transaction
//!   as the slot's first key and never removed, so every etcdmux replica sees it. Its
//!   size is the number of distinct resource roots, whatever the number of tenants.
//!   Versions before it kept one key per tenant and slot (`<meta>/roots/<tenant>/<slot>`,
//!   the *tenant index*); those keys are still read, so a tenant's slots are the
//!   union of both, until `etcdmux migrate root-index` has folded them away.

use bytes::{BufMut, Bytes, BytesMut};

use super::tenant::TenantName;

/// Where a key sits in the layout.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Root {
    /// `/<name>…`. `single` roots are one-segment API groups (`/apps.k8s.io`) that
    /// hold just the key `/<name>`: `/<name>/…` belongs to two-segment roots.
    Slash { name: Bytes, single: bool },
    /// Keys without a leading `/`.
    Bare,
}

/// The smallest key greater than every key with prefix `p` (etcd's prefix end):
/// increment the last byte below 0xff, dropping 0xff bytes after it; all 0xff (or
/// empty) means "no end", which etcd spells `"\x00"`.
pub fn prefix_end(p: &[u8]) -> Bytes {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    Bytes::from_static(b"\0")
}

/// The root of a tenant key.
pub fn root_of(key: &[u8]) -> Root {
    match split_slash_key(key) {
        Some((root_len, single)) => Root::Slash { name: Bytes::copy_from_slice(&key[1..root_len]), single },
        None => Root::Bare,
    }
}

/// Which part of the layout a key is in: the unit of the per-tenant root index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// Keys without a leading `/`.
    Bare,
    /// The key `/<root>` itself (rare: Kubernetes never writes it).
    Key(Bytes),
    /// Keys `/<root>/…` (every Kubernetes object of resource `<root>`).
    Under(Bytes),
}

/// The slot of a tenant key.
pub fn slot_of(key: &[u8]) -> Slot {
    match split_slash_key(key) {
        Some((root_len, _)) if root_len == key.len() => Slot::Key(Bytes::copy_from_slice(&key[1..])),
        Some((root_len, _)) => Slot::Under(Bytes::copy_from_slice(&key[1..root_len])),
        None => Slot::Bare,
    }
}

/// For a slash key: the length of `/<root>` and whether it is a single-key root.
pub(super) fn split_slash_key(key: &[u8]) -> Option<(usize, bool)> {
    if key.first() != Some(&b'/') {
        return None;
    }
    let seg1_end = key[1..].iter().position(|&b| b == b'/').map_or(key.len(), |i| i + 1);
    let dotted = key[1..seg1_end].contains(&b'.');
    if !dotted {
        return Some((seg1_end, false));
    }
    if seg1_end == key.len() {
        return Some((seg1_end, true));
    }
    let seg2_end = key[seg1_end + 1..].iter().position(|&b| b == b'/').map_or(key.len(), |i| seg1_end + 1 + i);
    Some((seg2_end, false))
}

/// One upstream range. An empty `range_end` is a single key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub key: Bytes,
    pub range_end: Bytes,
}

/// The layout with its configured prefixes.
#[derive(Debug, Clone)]
pub struct KeyLayout {
    /// `/registry`
    prefix: Bytes,
    /// `/etcdmux/bare/`
    bare: Bytes,
    /// `/etcdmux/roots` (the per-tenant index of earlier versions: `/<tenant>/<slot>`)
    roots: Bytes,
    /// `/etcdmux/slots/` (the root index: `<slot>`)
    slots: Bytes,
    /// `/etcdmux/leases/`
    leases: Bytes,
    /// `/etcdmux/void`
    void: Bytes,
    /// `/etcdmux/migrate/` (a migration's records add `<id>/...`)
    migrate: Bytes,
}

const CLUSTERS: &[u8] = b"/clusters/";

pub(super) fn cat(parts: &[&[u8]]) -> Bytes {
    let mut out = BytesMut::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        out.put_slice(p);
    }
    out.freeze()
}

impl KeyLayout {
    pub fn new(prefix: &str, meta_prefix: &str) -> KeyLayout {
        let m = meta_prefix.as_bytes();
        KeyLayout {
            prefix: Bytes::copy_from_slice(prefix.as_bytes()),
            bare: cat(&[m, b"/bare/"]),
            roots: cat(&[m, b"/roots"]),
            slots: cat(&[m, b"/slots/"]),
            leases: cat(&[m, b"/leases/"]),
            void: cat(&[m, b"/void"]),
            migrate: cat(&[m, b"/migrate/"]),
        }
    }

    /// The upstream range of every tenant's slash keys: `[/registry/, /registry0)`.
    pub fn slash_range(&self) -> Piece {
        let start = cat(&[&self.prefix, b"/"]);
        let range_end = prefix_end(&start);
        Piece { key: start, range_end }
    }

    /// The upstream range of every tenant's tenant index (earlier versions' form).
    pub fn all_tenant_index_range(&self) -> Piece {
        let start = cat(&[&self.roots, b"/"]);
        let range_end = prefix_end(&start);
        Piece { key: start, range_end }
    }

    /// The tenant and slot a tenant-index key records (any tenant).
    pub fn tenant_index_entry(&self, k: &[u8]) -> Option<(TenantName, Slot)> {
        let rest = k.strip_prefix(&self.roots[..])?.strip_prefix(b"/")?;
        let slash = rest.iter().position(|&b| b == b'/')?;
        let t = tenant_from(&rest[..slash])?;
        let slot = self.slot_from_tenant_index_key(&t, k)?;
        Some((t, slot))
    }

    /// Where migration `id` keeps its record `name` (`etcdmux migrate`): under the meta
    /// prefix, never a tenant key. Migration ids hold no `/`.
    pub fn migrate_key(&self, id: &str, name: &str) -> Bytes {
        cat(&[&self.migrate, id.as_bytes(), b"/", name.as_bytes()])
    }

    /// Upstream prefix of tenant `t`'s keys in slash root `name`: `/registry/<name>/clusters/<t>`.
    pub(super) fn slash_prefix(&self, name: &[u8], t: &TenantName) -> Bytes {
        cat(&[&self.prefix, b"/", name, CLUSTERS, t.as_str().as_bytes()])
    }

    /// Upstream prefix of tenant `t`'s bare keys: `/etcdmux/bare/<t>/`.
    pub(super) fn bare_prefix(&self, t: &TenantName) -> Bytes {
        cat(&[&self.bare, t.as_str().as_bytes(), b"/"])
    }

    /// The upstream key of tenant `t`'s key `key`.
    pub fn encode(&self, t: &TenantName, key: &[u8]) -> Bytes {
        match split_slash_key(key) {
            Some((root_len, _)) => {
                cat(&[&self.prefix, b"/", &key[1..root_len], CLUSTERS, t.as_str().as_bytes(), &key[root_len..]])
            }
            None => cat(&[&self.bare, t.as_str().as_bytes(), b"/", key]),
        }
    }

    /// The tenant and tenant key of an upstream key, or `None` when the key is not
    /// one `encode` can produce (another application's key, index or lease records).
    pub fn decode(&self, up: &Bytes) -> Option<(TenantName, Bytes)> {
        if up.starts_with(&self.prefix[..]) {
            return decode_slash(&self.prefix, up);
        }
        let x = up.strip_prefix(&self.bare[..])?;
        let slash = x.iter().position(|&b| b == b'/')?;
        let tenant = tenant_from(&x[..slash])?;
        let key = &x[slash + 1..];
        if key.is_empty() || key[0] == b'/' {
            return None;
        }
        Some((tenant, up.slice(up.len() - key.len()..)))
    }

    /// The *piece* of an upstream key — one tenant's keys in one root, the unit the
    /// read replica evicts — as the length of its id, the key's prefix
    /// `<prefix>/<root>/clusters/<tenant>` (or `<meta>/bare/<tenant>`). The piece's
    /// keys are its id and the keys under `<id>/`. `None` for keys of no tenant.
    pub fn piece_len(&self, up: &[u8]) -> Option<usize> {
        if let Some(x) = up.strip_prefix(&self.prefix[..]).and_then(|x| x.strip_prefix(b"/")) {
            let (_, tenant_start) = parse_slash(x)?;
            let end = x[tenant_start..].iter().position(|&b| b == b'/').map_or(x.len(), |i| tenant_start + i);
            tenant_from(&x[tenant_start..end])?;
            return Some(self.prefix.len() + 1 + end);
        }
        let x = up.strip_prefix(&self.bare[..])?;
        let slash = x.iter().position(|&b| b == b'/')?;
        tenant_from(&x[..slash])?;
        Some(self.bare.len() + slash)
    }

    /// Whether the upstream range `[key, range_end)` (etcd's conventions: an empty end
    /// is the key alone, `"\0"` no end) holds no tenant's key: it misses both the slash
    /// layout and the bare keys.
    pub fn piece_free(&self, key: &[u8], range_end: &[u8]) -> bool {
        let slash = cat(&[&self.prefix, b"/"]);
        [(slash.clone(), prefix_end(&slash)), (self.bare.clone(), prefix_end(&self.bare))].iter().all(|(lo, hi)| {
            let starts_before_hi = key < &hi[..];
            let ends_after_lo = match range_end {
                [] => key >= &lo[..],
                [0] => true,
                end => end > &lo[..],
            };
            !(starts_before_hi && ends_after_lo)
        })
    }

    /// The root-index key recording that some tenant has (or had) keys in `slot`.
    pub fn slot_key(&self, slot: &Slot) -> Bytes {
        let (tag, name) = slot_tag(slot);
        cat(&[&self.slots, &[tag], name])
    }

    /// The upstream range holding the root index.
    pub fn slot_index_range(&self) -> Piece {
        Piece { key: self.slots.clone(), range_end: prefix_end(&self.slots) }
    }

    /// The slot a root-index key records.
    pub fn slot_from_slot_key(&self, k: &[u8]) -> Option<Slot> {
        parse_slot(k.strip_prefix(&self.slots[..])?)
    }

    /// The tenant-index key (earlier versions' form, still written while
    /// `layout.write_tenant_index` is on) recording that tenant `t` has keys in `slot`.
    pub fn tenant_index_key(&self, t: &TenantName, slot: &Slot) -> Bytes {
        let (tag, name) = slot_tag(slot);
        cat(&[&self.roots, b"/", t.as_str().as_bytes(), b"/", &[tag], name])
    }

    /// The upstream range holding tenant `t`'s tenant index.
    pub fn tenant_index_range(&self, t: &TenantName) -> Piece {
        let start = cat(&[&self.roots, b"/", t.as_str().as_bytes(), b"/"]);
        let range_end = prefix_end(&start);
        Piece { key: start, range_end }
    }

    /// The slot a tenant-index key of tenant `t` records.
    pub fn slot_from_tenant_index_key(&self, t: &TenantName, k: &[u8]) -> Option<Slot> {
        parse_slot(k.strip_prefix(&self.tenant_index_range(t).key[..])?)
    }

    /// The one upstream range the watch hub watches: from the bare keys under the
    /// meta prefix to the end of the slash layout, or the other way round, whichever
    /// comes first. Keys in between that are not layout keys are filtered out.
    pub fn watch_range(&self) -> Piece {
        let slash = cat(&[&self.prefix, b"/"]);
        let (lo, hi) = if self.bare < slash { (&self.bare, &slash) } else { (&slash, &self.bare) };
        Piece { key: lo.clone(), range_end: prefix_end(hi) }
    }

    /// The key catch-up watches write to mark "everything before this revision was
    /// seen": inside the watch range, never a tenant key.
    pub fn fence_key(&self) -> Bytes {
        // Under the bare prefix with an empty tenant name: inside the watch range
        // whatever the prefixes, and never decodable as a tenant's key.
        cat(&[&self.bare, b"/fence"])
    }

    /// A key etcdmux never writes: compares against it behave like compares over an
    /// empty range.
    pub fn void_key(&self) -> Bytes {
        self.void.clone()
    }

    /// Where the owner of lease `id` is recorded.
    pub fn lease_owner_key(&self, id: i64) -> Bytes {
        cat(&[&self.leases, format!("{id:016x}").as_bytes()])
    }

    /// The range of all lease owner records.
    pub fn lease_owner_range(&self) -> Piece {
        Piece { key: self.leases.clone(), range_end: prefix_end(&self.leases) }
    }

    /// The lease id of an owner record key.
    pub fn lease_id_from_owner_key(&self, k: &[u8]) -> Option<i64> {
        let hex = std::str::from_utf8(k.strip_prefix(&self.leases[..])?).ok()?;
        u64::from_str_radix(hex, 16).ok().map(|v| v as i64)
    }
}

/// The tenant and tenant key of `up` in the slash layout under `prefix`
/// (`<prefix>/<root>/clusters/<tenant><rest>`), or `None` when `up` has not that shape.
/// The proxy's own layout uses it, and so does a migration source in the same shape
/// under another prefix (`keyspace::rules`, the `{resource}` rule).
pub(super) fn decode_slash(prefix: &[u8], up: &Bytes) -> Option<(TenantName, Bytes)> {
    let x = up.strip_prefix(prefix)?.strip_prefix(b"/")?;
    let (root_len, tenant_start) = parse_slash(x)?;
    let rel_tenant_end = x[tenant_start..].iter().position(|&b| b == b'/').map_or(x.len(), |i| tenant_start + i);
    let tenant = tenant_from(&x[tenant_start..rel_tenant_end])?;
    let mut key = BytesMut::with_capacity(1 + root_len + (x.len() - rel_tenant_end));
    key.put_u8(b'/');
    key.put_slice(&x[..root_len]);
    key.put_slice(&x[rel_tenant_end..]);
    Some((tenant, key.freeze()))
}

/// For `x` = `<root>/clusters/<tenant><rest>`: the length of `<root>` and where the
/// tenant starts.
fn parse_slash(x: &[u8]) -> Option<(usize, usize)> {
    let seg1 = x.iter().position(|&b| b == b'/')?;
    if x[..seg1].contains(&b'.') {
        // One-segment API group root: exactly `<seg1>/clusters/<tenant>`.
        let after = &x[seg1..];
        if let Some(t) = after.strip_prefix(CLUSTERS) {
            if !t.is_empty() && !t.contains(&b'/') {
                return Some((seg1, seg1 + CLUSTERS.len()));
            }
        }
        let seg2 = x[seg1 + 1..].iter().position(|&b| b == b'/').map(|i| seg1 + 1 + i)?;
        x[seg2..].starts_with(CLUSTERS).then_some((seg2, seg2 + CLUSTERS.len()))
    } else {
        x[seg1..].starts_with(CLUSTERS).then_some((seg1, seg1 + CLUSTERS.len()))
    }
}

fn tenant_from(raw: &[u8]) -> Option<TenantName> {
    TenantName::new(std::str::from_utf8(raw).ok()?).ok()
}

/// How a slot is spelled in index keys: a tag byte, then the root's name.
fn slot_tag(slot: &Slot) -> (u8, &[u8]) {
    match slot {
        Slot::Bare => (b'b', b""),
        Slot::Key(name) => (b'k', name),
        Slot::Under(name) => (b'u', name),
    }
}

fn parse_slot(spelled: &[u8]) -> Option<Slot> {
    let (tag, name) = spelled.split_first()?;
    let name = Bytes::copy_from_slice(name);
    match tag {
        b'b' if name.is_empty() => Some(Slot::Bare),
        b'k' => Some(Slot::Key(name)),
        b'u' => Some(Slot::Under(name)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyspace::End;
    use proptest::prelude::*;

    #[test]
    fn pieces_are_one_tenant_in_one_root() {
        let l = KeyLayout::new("/registry", "/etcdmux");
        let t = |s: &str| TenantName::new(s).unwrap();
        let id = |up: &Bytes| l.piece_len(up).map(|n| String::from_utf8_lossy(&up[..n]).into_owned());
        let (p, q) = (t("p"), t("p!x"));
        assert_eq!(id(&l.encode(&p, b"/pods/ns/a")).as_deref(), Some("/registry/pods/clusters/p"));
        assert_eq!(id(&l.encode(&p, b"/pods")).as_deref(), Some("/registry/pods/clusters/p"));
        assert_eq!(id(&l.encode(&q, b"/pods/ns/a")).as_deref(), Some("/registry/pods/clusters/p!x"));
        assert_eq!(
            id(&l.encode(&p, b"/apps.k8s.io/deployments/ns/d")).as_deref(),
            Some("/registry/apps.k8s.io/deployments/clusters/p")
        );
        assert_eq!(id(&l.encode(&p, b"bare/key")).as_deref(), Some("/etcdmux/bare/p"));
        assert_eq!(id(&l.tenant_index_key(&p, &Slot::Bare)), None);
        assert_eq!(id(&l.slot_key(&Slot::Bare)), None);
        assert_eq!(id(&l.lease_owner_key(7)), None);
        assert!(l.piece_free(&l.tenant_index_range(&p).key, &l.tenant_index_range(&p).range_end));
        assert!(l.piece_free(&l.slot_index_range().key, &l.slot_index_range().range_end));
        assert!(l.piece_free(&l.lease_owner_range().key, &l.lease_owner_range().range_end));
        assert!(!l.piece_free(b"/registry/pods/", b"/registry/pods0"));
        assert!(!l.piece_free(b"/etcdmux/a", b"\0"), "reaches into the bare keys");
        assert!(!l.piece_free(&l.encode(&p, b"x"), b""));
    }
    use std::collections::BTreeSet;

    fn layout() -> KeyLayout {
        KeyLayout::new("/registry", "/etcdmux")
    }

    fn t(s: &str) -> TenantName {
        TenantName::new(s).unwrap()
    }

    #[test]
    fn table_in_module_docs() {
        let l = layout();
        let p = t("p");
        for (key, up) in [
            (&b"/pods/default/nginx"[..], &b"/registry/pods/clusters/p/default/nginx"[..]),
            (b"/pods", b"/registry/pods/clusters/p"),
            (b"/pods/", b"/registry/pods/clusters/p/"),
            (b"/apps.k8s.io/deployments/ns/web", b"/registry/apps.k8s.io/deployments/clusters/p/ns/web"),
            (
                b"/apiextensions.k8s.io/customresourcedefinitions/widgets.example.com",
                b"/registry/apiextensions.k8s.io/customresourcedefinitions/clusters/p/widgets.example.com",
            ),
            (b"/apps.k8s.io", b"/registry/apps.k8s.io/clusters/p"),
            (b"/", b"/registry//clusters/p"),
            (b"foo", b"/etcdmux/bare/p/foo"),
        ] {
            let enc = l.encode(&p, key);
            assert_eq!(enc.as_ref(), up, "{}", String::from_utf8_lossy(key));
            assert_eq!(l.decode(&enc), Some((p.clone(), Bytes::copy_from_slice(key))));
        }
        // Not layout keys.
        for k in [&b"/registry/pods"[..], b"/registry/pods/clusters/", b"/etcdmux/roots/pods", b"/other"] {
            assert_eq!(l.decode(&Bytes::copy_from_slice(k)), None);
        }
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), Bytes::from_static(b"/a0"));
        assert_eq!(prefix_end(b"a\xff"), Bytes::from_static(b"b"));
        assert_eq!(prefix_end(b"\xff\xff"), Bytes::from_static(b"\0"));
    }

    #[test]
    fn index_keys_round_trip() {
        let l = layout();
        for key in [&b"/pods/x"[..], b"/apps.k8s.io", b"/apps.k8s.io/d/x", b"/", b"//", b"bare"] {
            let slot = slot_of(key);
            let ik = l.tenant_index_key(&t("p"), &slot);
            assert!(ik.starts_with(&l.tenant_index_range(&t("p")).key));
            assert_eq!(l.slot_from_tenant_index_key(&t("p"), &ik), Some(slot.clone()));
            assert_eq!(l.slot_from_tenant_index_key(&t("p!"), &ik), None);
            assert_eq!(l.tenant_index_entry(&ik), Some((t("p"), slot.clone())));
            let sk = l.slot_key(&slot);
            let r = l.slot_index_range();
            assert!(sk >= r.key && sk < r.range_end);
            assert_eq!(l.slot_from_slot_key(&sk), Some(slot));
            assert_eq!(l.slot_from_slot_key(&ik), None);
            assert_eq!(l.tenant_index_entry(&sk), None);
        }
        assert_eq!(l.lease_id_from_owner_key(&l.lease_owner_key(-5)), Some(-5));
        let w = l.watch_range();
        let fence = l.fence_key();
        assert!(fence >= w.key && fence < w.range_end && l.decode(&fence).is_none());
    }

    // Keys drawn from a small alphabet around the layout's special bytes, so that
    // roots, dots, slashes, prefix ends and 0xff collide often.
    fn key_strategy() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            Just(b'/'),
            Just(b'.'),
            Just(b'a'),
            Just(b'b'),
            Just(b'0'),
            Just(b'!'),
            Just(0u8),
            Just(0xffu8),
            any::<u8>()
        ];
        prop::collection::vec(byte, 1..12)
    }

    fn tenant_strategy() -> impl Strategy<Value = TenantName> {
        prop::sample::select(vec!["p", "p!", "pa", "clusters", "a.b", "root", "é"]).prop_map(t)
    }

    fn decode_all(l: &KeyLayout, up: &BTreeSet<Bytes>, pieces: &[Piece]) -> BTreeSet<(TenantName, Bytes)> {
        let mut out = BTreeSet::new();
        for p in pieces {
            for k in up {
                let hit = if p.range_end.is_empty() {
                    *k == p.key
                } else {
                    k >= &p.key && (p.range_end.as_ref() == b"\0" || k < &p.range_end)
                };
                if hit {
                    assert!(out.insert(l.decode(k).expect("pieces hold only layout keys")), "pieces overlap");
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn bijective_and_tenant_closed(tn in tenant_strategy(), key in key_strategy()) {
            let l = layout();
            let up = l.encode(&tn, &key);
            prop_assert_eq!(l.decode(&up), Some((tn, Bytes::from(key))));
        }

        #[test]
        fn injective_across_tenants(a in tenant_strategy(), ka in key_strategy(), b in tenant_strategy(), kb in key_strategy()) {
            let l = layout();
            prop_assert_eq!(l.encode(&a, &ka) == l.encode(&b, &kb), a == b && ka == kb);
        }

        #[test]
        fn order_preserving_within_a_root(tn in tenant_strategy(), k1 in key_strategy(), k2 in key_strategy()) {
            let l = layout();
            prop_assume!(root_of(&k1) == root_of(&k2));
            prop_assert_eq!(k1.cmp(&k2), l.encode(&tn, &k1).cmp(&l.encode(&tn, &k2)));
        }

        /// The planner returns exactly the tenant's keys in the range, for any key set
        /// of several tenants and any range, and the fast path agrees with it.
        #[test]
        fn plans_are_exact(
            tn in tenant_strategy(),
            keys in prop::collection::vec((tenant_strategy(), key_strategy()), 0..40),
            start in prop::collection::vec(any::<u8>().prop_map(|b| b % 3 + b'.'), 0..4).prop_map(Bytes::from),
            start_key in key_strategy(),
            end in prop_oneof![Just(None), key_strategy().prop_map(Some)],
            use_start_key in any::<bool>(),
        ) {
            let l = layout();
            let start = if use_start_key { Bytes::from(start_key) } else { start };
            let end = match end { None => End::Unbounded, Some(e) => End::Key(Bytes::from(e)) };
            let up: BTreeSet<Bytes> = keys.iter().map(|(tt, k)| l.encode(tt, k)).collect();
            let slots: BTreeSet<Slot> = keys.iter().filter(|(tt, _)| *tt == tn).map(|(_, k)| slot_of(k)).collect();
            let pieces = l.plan(&tn, &start, &end, &slots);
            let got = decode_all(&l, &up, &pieces);
            let want: BTreeSet<(TenantName, Bytes)> = keys.iter()
                .filter(|(tt, k)| *tt == tn && k.as_slice() >= start.as_ref()
                    && match &end { End::Key(e) => k.as_slice() < e.as_ref(), _ => true })
                .map(|(tt, k)| (tt.clone(), Bytes::from(k.clone())))
                .collect();
            prop_assert_eq!(got, want);
        }
    }
}
