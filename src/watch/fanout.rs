//! The fan-out index: watchers by tenant and resource root, so an event costs work
//! only for the watchers it may match.

use std::collections::HashMap;
use std::sync::Arc;

use super::watcher::Watcher;
use crate::keyspace::Root;

/// One tenant's watchers, indexed by the resource root their range lies in, so an
/// event is checked only against watchers of its tenant and root (plus the few whose
/// range spans roots). A tenant without watchers has no entry at all.
#[derive(Default)]
pub(super) struct TenantWatchers {
    pub(super) by_root: HashMap<Root, Vec<Arc<Watcher>>>,
    pub(super) wide: Vec<Arc<Watcher>>,
}

impl TenantWatchers {
    pub(super) fn insert(&mut self, w: Arc<Watcher>) {
        match &w.root {
            Some(r) => self.by_root.entry(r.clone()).or_default().push(w),
            None => self.wide.push(w),
        }
    }

    /// Removes `w`; true if it was there.
    pub(super) fn remove(&mut self, w: &Arc<Watcher>) -> bool {
        let list = match &w.root {
            Some(r) => match self.by_root.get_mut(r) {
                Some(l) => l,
                None => return false,
            },
            None => &mut self.wide,
        };
        let before = list.len();
        list.retain(|x| !Arc::ptr_eq(x, w));
        let removed = list.len() < before;
        if let Some(r) = &w.root {
            if self.by_root.get(r).is_some_and(|l| l.is_empty()) {
                self.by_root.remove(r);
            }
        }
        removed
    }

    /// The watchers an event in `root` may match.
    pub(super) fn candidates<'a>(&'a self, root: &Root) -> impl Iterator<Item = &'a Arc<Watcher>> {
        self.by_root.get(root).into_iter().flatten().chain(self.wide.iter())
    }

    pub(super) fn all(&self) -> impl Iterator<Item = &Arc<Watcher>> {
        self.by_root.values().flatten().chain(self.wide.iter())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.by_root.is_empty() && self.wide.is_empty()
    }
}
