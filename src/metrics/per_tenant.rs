//! Per-tenant metrics: the process's [`TopTenants`] (configured once from
//! `server.tenant_metrics_top`), the per-call slot through which a handler tells the
//! metrics layer whose call it was, and the watcher handles the hub updates.
//!
//! A unary call runs inside [`scope`] (set by `grpc::layer`): `ops::Proxy::tenant_view`
//! reports the tenant ([`report_tenant`]), the codec the request's size and
//! `grpc::answer` the response's; the layer records them with the call's method and
//! code when it ends. Calls whose tenant was never resolved (admin calls, requests
//! refused before resolution) and streams (Watch, LeaseKeepAlive) have no per-tenant
//! request series; watchers and their events are counted by the hub.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use metrics::{Counter, Gauge, SharedString};
use tokio::task::futures::TaskLocalFuture;

use super::names;
use super::tenants::TopTenants;

/// The process's labelled tenants; `None` when per-tenant metrics are off.
static TOP: Mutex<Option<TopTenants>> = Mutex::new(None);
/// Whether `TOP` is `Some`: lets calls skip measuring sizes when nobody records them.
static ENABLED: AtomicBool = AtomicBool::new(false);

fn top() -> MutexGuard<'static, Option<TopTenants>> {
    TOP.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sets how many tenants get their own label (0: no per-tenant metrics). Keeps what
/// was learnt when `n` is unchanged (a second etcdmux in one process).
pub fn configure(n: usize) {
    let mut t = top();
    if t.as_ref().map(TopTenants::top) != Some(n) {
        *t = (n > 0).then(|| TopTenants::new(n));
    }
    ENABLED.store(n > 0, Ordering::Relaxed);
}

/// Counts a hit of `tenant` and answers its label, if per-tenant metrics are on.
pub fn label(tenant: &str) -> Option<SharedString> {
    top().as_mut()?.hit(tenant)
}

/// What one unary call reports about itself.
#[derive(Default)]
pub struct CallTenant {
    label: OnceLock<SharedString>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

tokio::task_local! {
    static CALL: Arc<CallTenant>;
}

/// Runs `fut` (one call) with `slot` as its [`CallTenant`].
pub fn scope<F: Future>(slot: Arc<CallTenant>, fut: F) -> TaskLocalFuture<Arc<CallTenant>, F> {
    CALL.scope(slot, fut)
}

/// The tenant of the current call, once resolved (the first report counts).
pub fn report_tenant(tenant: &str) {
    let _ = CALL.try_with(|c| {
        if c.label.get().is_none() {
            if let Some(l) = label(tenant) {
                let _ = c.label.set(l);
            }
        }
    });
}

/// Size of a request message of the current call; `size` is measured only when
/// per-tenant metrics are on (a large range answer costs a pass to measure).
pub fn report_bytes_in(size: impl FnOnce() -> usize) {
    if ENABLED.load(Ordering::Relaxed) {
        let _ = CALL.try_with(|c| c.bytes_in.fetch_add(size() as u64, Ordering::Relaxed));
    }
}

/// Size of a response message of the current call (measured as for requests).
pub fn report_bytes_out(size: impl FnOnce() -> usize) {
    if ENABLED.load(Ordering::Relaxed) {
        let _ = CALL.try_with(|c| c.bytes_out.fetch_add(size() as u64, Ordering::Relaxed));
    }
}

impl CallTenant {
    /// Records the call (number `method` of the labels `methods`, ended with
    /// grpc-status `code`) under its tenant's label, with the handles in `series`.
    pub fn finish(&self, series: &TenantSeries, method: usize, methods: &[&'static str], code: &str) {
        let Some(tenant) = self.label.get() else { return };
        let Some(name) = methods.get(method).copied() else { return };
        let handles = series.of(tenant, methods.len());
        if code == "0" {
            handles.ok[method]
                .get_or_init(|| metrics::counter!(names::TENANT_REQUESTS, "tenant" => tenant.clone(), "method" => name, "code" => "0"))
                .increment(1);
        } else {
            metrics::counter!(names::TENANT_REQUESTS, "tenant" => tenant.clone(), "method" => name, "code" => code.to_string())
                .increment(1);
            handles
                .errors
                .get_or_init(|| metrics::counter!(names::TENANT_ERRORS, "tenant" => tenant.clone()))
                .increment(1);
        }
        handles.bytes_in.increment(self.bytes_in.load(Ordering::Relaxed));
        handles.bytes_out.increment(self.bytes_out.load(Ordering::Relaxed));
    }
}

/// The request series of each tenant label, looked up in the recorder once per label
/// (and method) rather than on every call: a lookup builds and hashes the series' key.
/// Bounded by the labels [`TopTenants`] gives (`top` + `other`).
#[derive(Default)]
pub struct TenantSeries {
    by_label: RwLock<HashMap<SharedString, Arc<LabelSeries>>>,
}

struct LabelSeries {
    bytes_in: Counter,
    bytes_out: Counter,
    /// Registered on the first error, like every series here: none at 0 before.
    errors: OnceLock<Counter>,
    /// Calls answered OK, per method number (registered on the first).
    ok: Vec<OnceLock<Counter>>,
}

impl TenantSeries {
    fn of(&self, tenant: &SharedString, methods: usize) -> Arc<LabelSeries> {
        if let Some(s) = self.by_label.read().unwrap_or_else(|p| p.into_inner()).get(tenant) {
            return s.clone();
        }
        let mut map = self.by_label.write().unwrap_or_else(|p| p.into_inner());
        map.entry(tenant.clone())
            .or_insert_with(|| {
                let bytes = |direction: &'static str| {
                    metrics::counter!(names::TENANT_BYTES, "tenant" => tenant.clone(), "direction" => direction)
                };
                Arc::new(LabelSeries {
                    bytes_in: bytes("in"),
                    bytes_out: bytes("out"),
                    errors: OnceLock::new(),
                    ok: (0..methods).map(|_| OnceLock::new()).collect(),
                })
            })
            .clone()
    }
}

/// A watcher's per-tenant handles, looked up once when it is created: the hub's hot
/// path only adds to them.
pub struct WatcherMetrics {
    pub watchers: Gauge,
    pub events: Counter,
}

/// The watcher handles of each label in use, shared by its watchers: a handle is an
/// allocation, and a stream may carry thousands of watchers of one tenant.
static WATCHER_SERIES: Mutex<Option<HashMap<SharedString, Arc<WatcherMetrics>>>> = Mutex::new(None);

/// Labels whose handles are kept with no watcher holding them: past this, the map
/// keeps only handles in use (the labels are bounded by `tenant_metrics_top`, but
/// the top tenants change).
const IDLE_WATCHER_SERIES: usize = 256;

impl WatcherMetrics {
    /// The handles of a watcher of `tenant`; `None` when per-tenant metrics are off.
    pub fn of(tenant: &str) -> Option<Arc<WatcherMetrics>> {
        let l = label(tenant)?;
        let mut series = WATCHER_SERIES.lock().unwrap_or_else(|p| p.into_inner());
        let map = series.get_or_insert_with(HashMap::new);
        if let Some(m) = map.get(&l) {
            return Some(m.clone());
        }
        if map.len() >= IDLE_WATCHER_SERIES {
            map.retain(|_, m| Arc::strong_count(m) > 1);
        }
        let m = Arc::new(WatcherMetrics {
            watchers: metrics::gauge!(names::TENANT_WATCHERS, "tenant" => l.clone()),
            events: metrics::counter!(names::TENANT_EVENTS, "tenant" => l.clone()),
        });
        map.insert(l, m.clone());
        Some(m)
    }
}
