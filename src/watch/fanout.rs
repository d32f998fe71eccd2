//! The fan-out index: watchers by tenant and resource root, so an event costs work
//! only for the watchers it may match. A tenant without watchers has no entry.
//!
//! One flat table keyed by a 64-bit digest of (tenant, root) holds the watchers:
//! about 40 bytes a watcher, where a map of tenants holding a map of roots cost
//! several hundred (a map and a list allocated for each tenant and root). Two
//! (tenant, root) pairs whose digests collide share a slot, which only adds a
//! candidate that [`Watcher::matches`] turns down.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::Arc;

use super::watcher::Watcher;
use crate::keyspace::{Root, TenantName};

/// Every registered watcher, by (tenant, root), and their count.
#[derive(Default)]
pub(super) struct Fanout {
    /// Watchers whose range lies in one root, by the digest of (tenant, root).
    by_root: HashMap<u64, Slot, BuildHasherDefault<Digest>>,
    /// Watchers whose range spans roots (few), by tenant.
    wide: HashMap<TenantName, Vec<Arc<Watcher>>>,
    /// Keys the digests.
    keys: RandomState,
    count: usize,
}

/// The watchers of one (tenant, root): most have one, which needs no list.
enum Slot {
    One(Arc<Watcher>),
    Many(Vec<Arc<Watcher>>),
}

impl Slot {
    fn as_slice(&self) -> &[Arc<Watcher>] {
        match self {
            Slot::One(w) => std::slice::from_ref(w),
            Slot::Many(v) => v,
        }
    }
}

/// The table's keys are digests already: used as they are.
#[derive(Default)]
struct Digest(u64);

impl Hasher for Digest {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed; this folds anything else in all the same.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl Fanout {
    /// Registered watchers.
    pub(super) fn len(&self) -> usize {
        self.count
    }

    /// Tenants with at least one watcher.
    #[cfg(test)]
    pub(super) fn tenants(&self) -> usize {
        let mut ts: std::collections::HashSet<&TenantName> = self.wide.keys().collect();
        ts.extend(self.by_root.values().flat_map(|s| s.as_slice()).map(|w| &w.tenant));
        ts.len()
    }

    fn digest(&self, tenant: &TenantName, root: &Root) -> u64 {
        self.keys.hash_one((tenant, root))
    }

    pub(super) fn insert(&mut self, w: Arc<Watcher>) {
        self.count += 1;
        let Some(root) = w.root() else {
            self.wide.entry(w.tenant.clone()).or_default().push(w);
            return;
        };
        let d = self.digest(&w.tenant, &root);
        match self.by_root.get_mut(&d) {
            None => {
                self.by_root.insert(d, Slot::One(w));
            }
            Some(slot) => match slot {
                Slot::Many(v) => v.push(w),
                Slot::One(first) => {
                    let first = first.clone();
                    *slot = Slot::Many(vec![first, w]);
                }
            },
        }
    }

    /// Removes `w`; true if it was there.
    pub(super) fn remove(&mut self, w: &Arc<Watcher>) -> bool {
        let removed = match w.root() {
            None => {
                let Some(list) = self.wide.get_mut(&w.tenant) else { return false };
                let before = list.len();
                list.retain(|x| !Arc::ptr_eq(x, w));
                let removed = list.len() < before;
                if list.is_empty() {
                    self.wide.remove(&w.tenant);
                }
                removed
            }
            Some(root) => {
                let d = self.digest(&w.tenant, &root);
                let Some(slot) = self.by_root.get_mut(&d) else { return false };
                match slot {
                    Slot::One(x) if Arc::ptr_eq(x, w) => {
                        self.by_root.remove(&d);
                        true
                    }
                    Slot::One(_) => false,
                    Slot::Many(v) => {
                        let before = v.len();
                        v.retain(|x| !Arc::ptr_eq(x, w));
                        let removed = v.len() < before;
                        if v.len() == 1 {
                            *slot = Slot::One(v[0].clone());
                        }
                        removed
                    }
                }
            }
        };
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// The watchers an event of `tenant` in `root` may match.
    pub(super) fn candidates<'a>(
        &'a self,
        tenant: &TenantName,
        root: &Root,
    ) -> impl Iterator<Item = &'a Arc<Watcher>> + 'a {
        let by_root = self.by_root.get(&self.digest(tenant, root)).map(Slot::as_slice).unwrap_or_default();
        by_root.iter().chain(self.wide.get(tenant).into_iter().flatten())
    }

    /// Every registered watcher.
    pub(super) fn all(&self) -> impl Iterator<Item = &Arc<Watcher>> {
        self.by_root.values().flat_map(Slot::as_slice).chain(self.wide.values().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyspace::{prefix_end, root_of, End};
    use crate::pb::etcdserverpb::WatchCreateRequest;
    use crate::watch::sink::StreamSink;
    use crate::watch::watcher::Render;
    use bytes::Bytes;

    fn watcher(id: i64, tenant: &str, key: &str, end: End) -> Arc<Watcher> {
        let (sink, _rx) = StreamSink::new(4, 1, false, metrics::Gauge::noop());
        let t = TenantName::new(tenant).unwrap();
        let c = WatchCreateRequest::default();
        Arc::new(Watcher::new(id, sink, t, Bytes::from(key.to_string()), end, 1, &c, Render::Tenant))
    }

    fn prefix(p: &str) -> End {
        End::Key(prefix_end(p.as_bytes()))
    }

    fn ids<'a>(it: impl Iterator<Item = &'a Arc<Watcher>>) -> Vec<i64> {
        let mut v: Vec<i64> = it.map(|w| w.id).collect();
        v.sort();
        v
    }

    #[test]
    fn candidates_are_the_tenants_watchers_of_the_root_and_the_wide_ones() {
        let mut f = Fanout::default();
        let pods = watcher(1, "a", "/pods/", prefix("/pods/"));
        let one = watcher(2, "a", "/pods/ns/x", End::Single);
        let wide = watcher(3, "a", "/", End::Unbounded);
        let cms = watcher(4, "a", "/configmaps/", prefix("/configmaps/"));
        let other = watcher(5, "b", "/pods/", prefix("/pods/"));
        for w in [&pods, &one, &wide, &cms, &other] {
            f.insert(w.clone());
        }
        assert_eq!((f.len(), f.tenants()), (5, 2));
        let a = TenantName::new("a").unwrap();
        let pods_root = root_of(b"/pods/ns/x");
        assert_eq!(ids(f.candidates(&a, &pods_root)), vec![1, 2, 3]);
        assert_eq!(ids(f.candidates(&a, &root_of(b"/secrets/ns/y"))), vec![3]);
        assert_eq!(ids(f.candidates(&TenantName::new("c").unwrap(), &pods_root)), Vec::<i64>::new());
        assert_eq!(ids(f.all()), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn watchers_sharing_a_root_are_listed_and_removed_one_by_one() {
        let mut f = Fanout::default();
        let a = TenantName::new("a").unwrap();
        let root = root_of(b"/pods/ns/x");
        let ws: Vec<_> = (1..=3).map(|i| watcher(i, "a", "/pods/", prefix("/pods/"))).collect();
        for w in &ws {
            f.insert(w.clone());
        }
        assert_eq!(ids(f.candidates(&a, &root)), vec![1, 2, 3]);
        assert!(f.remove(&ws[1]));
        assert_eq!(ids(f.candidates(&a, &root)), vec![1, 3]);
        assert!(f.remove(&ws[0]));
        assert!(!f.remove(&ws[0]));
        assert_eq!(ids(f.candidates(&a, &root)), vec![3]);
        assert!(!f.remove(&watcher(3, "a", "/pods/", prefix("/pods/"))), "another watcher with the same id");
        assert!(f.remove(&ws[2]));
        assert_eq!((f.len(), f.by_root.len()), (0, 0), "no slot left");
    }

    #[test]
    fn remove_counts_once_and_leaves_no_empty_entries() {
        let mut f = Fanout::default();
        let w = watcher(1, "a", "/pods/", prefix("/pods/"));
        let wide = watcher(2, "a", "/", End::Unbounded);
        f.insert(w.clone());
        f.insert(wide.clone());
        assert!(f.remove(&w));
        assert!(!f.remove(&w), "already gone");
        assert_eq!((f.len(), f.tenants()), (1, 1));
        assert!(f.remove(&wide));
        assert_eq!((f.len(), f.tenants()), (0, 0), "no state kept for a tenant without watchers");
        assert!(!f.remove(&watcher(3, "z", "/", End::Unbounded)));
        assert_eq!(f.len(), 0);
    }
}
