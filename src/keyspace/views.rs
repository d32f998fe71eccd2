//! Property tests across listener kinds: whatever keys tenants wrote (through static
//! listeners, with or without a leading `/`, or through key-path rules) and whatever
//! range a client asks for, every key a listener renders lies inside the range
//! asked for and resolves back, on that listener, to the same tenant and key. A key
//! that rendered as another tenant's (`/projects/a` + `b/x` = tenant `ab`'s
//! `/projects/ab/x`) would be read, and deleted, as that tenant's.

use std::collections::BTreeSet;

use bytes::Bytes;
use proptest::prelude::*;

use super::layout::{prefix_end, slot_of, KeyLayout, Slot};
use super::rules::{Resolver, TenancyConfig};
use super::tenant::{KeyRef, RangeRef, Scope, TenantName};

fn resolver() -> Resolver {
    let cfg: TenancyConfig = toml::from_str(
        r#"rule = [ { prefix = "/projects/{tenant}/" }, { prefix = "/datum-core/", tenant = "root" } ]"#,
    )
    .expect("tenancy");
    Resolver::new(&cfg, &["/registry", "/etcdmux"]).expect("resolver")
}

const TENANTS: &[&str] = &["a", "ab", "a.b", "b", "root"];

/// Tenant keys around the layout's edges: bare keys that look like a tenant name
/// and a path (`b/pods/x`), slash keys, `0` and `/` bytes.
fn tenant_key() -> impl Strategy<Value = Bytes> {
    let piece = prop::sample::select(vec!["b", "/", "pods", "0", ".", "x", "\u{7f}", "b/pods/x", "/pods/", "!"]);
    prop::collection::vec(piece, 1..5).prop_map(|p| Bytes::from(p.concat()))
}

/// A client key on a key-path listener: a rule's prefix, a tenant-ish name, a rest.
fn key_path_key() -> impl Strategy<Value = Bytes> {
    let head = prop::sample::select(vec!["/projects/a", "/projects/ab", "/projects/a.b", "/projects/b", "/datum-core"]);
    (head, tenant_key(), any::<bool>()).prop_map(|(h, rest, slash)| {
        let mid = if slash && !rest.starts_with(b"/") { "/" } else { "" };
        Bytes::from([h.as_bytes(), mid.as_bytes(), &rest].concat())
    })
}

/// Whether client key `k` is in etcd's range `[key, end)`.
fn in_range(k: &[u8], key: &[u8], end: &[u8]) -> bool {
    match end {
        b"" => k == key,
        b"\0" => k >= key,
        e => k >= key && k < e,
    }
}

/// Every upstream key of `written` inside one of `pieces`.
fn read(
    layout: &KeyLayout,
    written: &BTreeSet<(TenantName, Bytes)>,
    pieces: &[super::Piece],
) -> Vec<(TenantName, Bytes)> {
    let mut out = Vec::new();
    for (t, k) in written {
        let up = layout.encode(t, k);
        let hit = pieces.iter().any(|p| {
            if p.range_end.is_empty() {
                up == p.key
            } else {
                up >= p.key && (p.range_end.as_ref() == b"\0" || up < p.range_end)
            }
        });
        if hit {
            out.push((t.clone(), k.clone()));
        }
    }
    out
}

/// Checks one client range on one listener against the written keys.
fn check(
    scope: &Scope,
    written: &BTreeSet<(TenantName, Bytes)>,
    key: &Bytes,
    end: &Bytes,
) -> Result<(), TestCaseError> {
    let r = resolver();
    let layout = KeyLayout::new("/registry", "/etcdmux");
    let Ok(RangeRef::Tenant { tenant, start, end: tend }) = r.resolve_range(scope, key, end) else { return Ok(()) };
    let Ok(cp) = r.client_prefix(scope, &tenant) else { return Ok(()) };
    let slots: BTreeSet<Slot> = written.iter().filter(|(t, _)| *t == tenant).map(|(_, k)| slot_of(k)).collect();
    for (t, k) in read(&layout, written, &layout.plan(&tenant, &start, &tend, &slots)) {
        prop_assert_eq!(&t, &tenant);
        let Some(client) = cp.render_checked(&k) else {
            return Err(TestCaseError::fail(format!("{k:?} of {t} planned but has no client form")));
        };
        prop_assert!(in_range(&client, key, end), "{:?} outside [{:?}, {:?})", client, key, end);
        let back = r.resolve_key(scope, &client);
        prop_assert_eq!(back, Ok(KeyRef::Tenant { tenant: t.clone(), key: k.clone() }), "{:?}", client);
    }
    Ok(())
}

fn written() -> impl Strategy<Value = BTreeSet<(TenantName, Bytes)>> {
    let tenant = prop::sample::select(TENANTS.to_vec()).prop_map(|t| TenantName::new(t).expect("tenant"));
    prop::collection::btree_set((tenant, tenant_key()), 0..24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn key_path_listeners_render_only_their_range_and_tenant(
        written in written(),
        key in key_path_key(),
        end in prop_oneof![
            Just(None),
            Just(Some(Bytes::from_static(b"\0"))),
            Just(Some(Bytes::new())),
            key_path_key().prop_map(Some),
        ],
    ) {
        let scope = resolver().scope(None).expect("scope");
        // None: the prefix end of the key (etcdctl's --prefix).
        let end = end.unwrap_or_else(|| prefix_end(&key));
        check(&scope, &written, &key, &end)?;
        // The whole project, as the apiserver lists and deletes it.
        let mut whole = key.to_vec();
        if let Some(i) = whole.iter().skip(b"/projects/".len()).position(|&c| c == b'/') {
            whole.truncate(b"/projects/".len() + i + 1);
            let whole = Bytes::from(whole);
            check(&scope, &written, &whole, &prefix_end(&whole))?;
        }
    }

    #[test]
    fn static_listeners_render_only_their_range_and_tenant(
        written in written(),
        tenant in prop::sample::select(TENANTS.to_vec()),
        key in tenant_key(),
        end in prop_oneof![Just(Bytes::from_static(b"\0")), Just(Bytes::new()), tenant_key()],
    ) {
        let scope = resolver().scope(Some(tenant)).expect("scope");
        check(&scope, &written, &key, &end)?;
        check(&scope, &written, &Bytes::from_static(b"\0"), &Bytes::from_static(b"\0"))?;
    }
}
