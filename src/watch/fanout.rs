//! The fan-out index: watchers by tenant and resource root, so an event costs work
//! only for the watchers it may match. A tenant without watchers has no entry.

use std::collections::HashMap;
use std::sync::Arc;

use super::watcher::Watcher;
use crate::keyspace::{Root, TenantName};

/// Every registered watcher, by (tenant, root), and their count.
#[derive(Default)]
pub(super) struct Fanout {
    tenants: HashMap<TenantName, TenantWatchers>,
    count: usize,
}

/// One tenant's watchers, indexed by the resource root their range lies in, so an
/// event is checked only against watchers of its tenant and root (plus the few whose
/// range spans roots).
#[derive(Default)]
struct TenantWatchers {
    by_root: HashMap<Root, Vec<Arc<Watcher>>>,
    wide: Vec<Arc<Watcher>>,
}

impl Fanout {
    /// Registered watchers.
    pub(super) fn len(&self) -> usize {
        self.count
    }

    /// Tenants with at least one watcher.
    #[cfg(test)]
    pub(super) fn tenants(&self) -> usize {
        self.tenants.len()
    }

    pub(super) fn insert(&mut self, w: Arc<Watcher>) {
        let ws = self.tenants.entry(w.tenant.clone()).or_default();
        match &w.root {
            Some(r) => ws.by_root.entry(r.clone()).or_default().push(w),
            None => ws.wide.push(w),
        }
        self.count += 1;
    }

    /// Removes `w`; true if it was there.
    pub(super) fn remove(&mut self, w: &Arc<Watcher>) -> bool {
        let Some(ws) = self.tenants.get_mut(&w.tenant) else { return false };
        let list = match &w.root {
            Some(r) => match ws.by_root.get_mut(r) {
                Some(l) => l,
                None => return false,
            },
            None => &mut ws.wide,
        };
        let before = list.len();
        list.retain(|x| !Arc::ptr_eq(x, w));
        let removed = list.len() < before;
        if list.is_empty() {
            if let Some(r) = &w.root {
                ws.by_root.remove(r);
            }
        }
        if ws.by_root.is_empty() && ws.wide.is_empty() {
            self.tenants.remove(&w.tenant);
        }
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
        let ws = self.tenants.get(tenant);
        let by_root = ws.and_then(|ws| ws.by_root.get(root)).into_iter().flatten();
        by_root.chain(ws.into_iter().flat_map(|ws| ws.wide.iter()))
    }

    /// Every registered watcher.
    pub(super) fn all(&self) -> impl Iterator<Item = &Arc<Watcher>> {
        self.tenants.values().flat_map(|ws| ws.by_root.values().flatten().chain(ws.wide.iter()))
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
        let (sink, _rx) = StreamSink::new(4, 1, false);
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
