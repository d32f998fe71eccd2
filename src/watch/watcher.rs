//! One client watcher: its range, start, filters and how its events are rendered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::event::HubEvent;
use super::sink::StreamSink;
use crate::keyspace::{prefix_end, root_of, ClientPrefix, End, Root, TenantName};
use crate::metrics::per_tenant::WatcherMetrics;
use crate::pb::etcdserverpb::WatchCreateRequest;
use crate::pb::mvccpb::Event;

/// How a watcher's events are shown to its client.
pub enum Render {
    /// Tenant keys as they are (static listeners).
    Tenant,
    /// Tenant keys under the tenant's key-path prefix.
    Prefixed(ClientPrefix),
}

/// One client watcher.
pub struct Watcher {
    pub id: i64,
    pub sink: Arc<StreamSink>,
    pub tenant: TenantName,
    pub start: Bytes,
    pub end: End,
    /// Events before this revision are not for this watcher.
    pub from_rev: i64,
    pub prev_kv: bool,
    pub no_put: bool,
    pub no_delete: bool,
    pub progress_notify: bool,
    /// Split responses larger than etcd's request limit into fragments.
    pub fragment: bool,
    pub render: Render,
    pub(super) canceled: AtomicBool,
    /// Whether events reached this watcher since the last progress tick.
    pub(super) active: AtomicBool,
    /// Its start was compacted in etcd: only etcd can answer it, through a catch-up.
    pub compacted: bool,
    /// Events before this revision are sent without prev_kv, as etcd sends them: it
    /// reads an event's prev_kv at the revision before the event, which may be
    /// compacted (a watch from exactly the compact revision).
    pub prev_kv_from: i64,
    /// Whether its range lies in one resource root ([`Watcher::root`]).
    one_root: bool,
    /// Its tenant's watcher gauge and event counter, shared with the tenant's other
    /// watchers (`None`: per-tenant metrics off).
    pub(super) tenant_metrics: Option<Arc<WatcherMetrics>>,
}

impl Watcher {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: i64,
        sink: Arc<StreamSink>,
        tenant: TenantName,
        start: Bytes,
        end: End,
        from_rev: i64,
        create: &WatchCreateRequest,
        render: Render,
    ) -> Watcher {
        use crate::pb::etcdserverpb::watch_create_request::FilterType;
        let (start, end) = own_range(start, end);
        Watcher {
            id,
            sink,
            start,
            end,
            from_rev,
            prev_kv: create.prev_kv,
            no_put: create.filters.contains(&(FilterType::Noput as i32)),
            no_delete: create.filters.contains(&(FilterType::Nodelete as i32)),
            progress_notify: create.progress_notify,
            fragment: create.fragment,
            render,
            canceled: AtomicBool::new(false),
            active: AtomicBool::new(false),
            compacted: false,
            prev_kv_from: 0,
            one_root: false,
            tenant_metrics: WatcherMetrics::of(tenant.as_str()),
            tenant,
        }
        .with_root()
    }

    fn with_root(mut self) -> Watcher {
        self.one_root = self.find_root().is_some();
        self
    }

    fn find_root(&self) -> Option<Root> {
        let root = root_of(&self.start);
        match (&self.end, &root) {
            (End::Single, _) => Some(root),
            (End::Key(e), Root::Slash { name, single: false }) => {
                let lo = [b"/", &name[..], b"/"].concat();
                let hi = prefix_end(&lo);
                (self.start.as_ref() >= lo.as_slice() && e.as_ref() <= hi.as_ref()).then_some(root)
            }
            _ => None,
        }
    }

    /// The one resource root its range lies in, if it lies in one. Worked out again
    /// when asked (the fan-out index asks when it adds or removes the watcher), not
    /// kept: most watchers have one, and keeping it cost 64 bytes each.
    pub(super) fn root(&self) -> Option<Root> {
        if self.one_root {
            self.find_root()
        } else {
            None
        }
    }

    pub(super) fn matches(&self, ev: &HubEvent) -> bool {
        // The tenant check is what keeps replay and catch-up tenant-closed: they walk
        // every event, not the tenant index that live dispatch uses.
        if ev.tenant != self.tenant || ev.rev < self.from_rev || self.canceled.load(Ordering::Relaxed) {
            return false;
        }
        let in_range = match &self.end {
            End::Single => ev.key == self.start,
            End::Key(e) => ev.key >= self.start && ev.key < *e,
            End::Unbounded => ev.key >= self.start,
        };
        in_range && !(if ev.is_put() { self.no_put } else { self.no_delete })
    }

    pub(super) fn render(&self, ev: &HubEvent) -> Event {
        let mut e = match &self.render {
            Render::Tenant => ev.event.clone(),
            Render::Prefixed(cp) => ev
                .prefixed
                .get_or_init(|| {
                    let mut e = ev.event.clone();
                    let key = cp.render(&ev.key);
                    if let Some(kv) = e.kv.as_mut() {
                        kv.key = key.clone();
                    }
                    if let Some(p) = e.prev_kv.as_mut() {
                        p.key = key;
                    }
                    e
                })
                .clone(),
        };
        if !self.prev_kv || ev.rev < self.prev_kv_from {
            e.prev_kv = None;
        }
        e
    }

    pub fn cancel(&self) -> bool {
        !self.canceled.swap(true, Ordering::Relaxed)
    }

    pub fn is_canceled(&self) -> bool {
        self.canceled.load(Ordering::Relaxed)
    }
}

/// The range a watcher keeps, in one allocation of its own. The keys it is given are
/// slices of the client's decoded create request (its key and range end, two
/// allocations), which would stay alive for as long as the watch does.
fn own_range(start: Bytes, end: End) -> (Bytes, End) {
    match end {
        End::Key(e) => {
            let mut both = BytesMut::with_capacity(start.len() + e.len());
            both.extend_from_slice(&start);
            both.extend_from_slice(&e);
            let both = both.freeze();
            (both.slice(..start.len()), End::Key(both.slice(start.len()..)))
        }
        other => (Bytes::copy_from_slice(&start), other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watcher_keeps_its_own_copy_of_its_range() {
        // As decoded from a create: the key and range end, each its own allocation.
        let key = Bytes::from(b"/projects/p/pods/".to_vec());
        let range_end = Bytes::from(b"/projects/p/pods0".to_vec());
        let (k, r) = (key.clone(), range_end.clone());
        let (start, end) = own_range(k.slice(11..), End::Key(r.slice(11..)));
        drop((k, r));
        assert_eq!(start, Bytes::from_static(b"/pods/"));
        assert!(matches!(&end, End::Key(e) if e == &Bytes::from_static(b"/pods0")), "{end:?}");
        assert!(key.is_unique() && range_end.is_unique(), "the request's keys are still referenced");
        let (single, end) = own_range(key.slice(11..), End::Single);
        assert_eq!(single, Bytes::from_static(b"/pods/"));
        assert!(matches!(end, End::Single));
        drop(single);
        assert!(key.is_unique());
    }

    /// Every watcher carries this; streams with thousands of watchers multiply it.
    #[test]
    fn a_watcher_stays_small() {
        let size = std::mem::size_of::<Watcher>();
        eprintln!("Watcher: {size} bytes");
        assert!(size <= 200, "a Watcher takes {size} bytes");
    }
}
