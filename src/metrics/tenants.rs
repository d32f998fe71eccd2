//! Which tenants get their own `tenant` label: at most `top` of them, for the life of
//! the process, everyone else is `other`. Pure: no I/O, no recorder.
//!
//! A label, once given, is kept (a Prometheus series that comes and goes with a
//! tenant's rank would multiply the series, which is what this bounds). Who gets
//! one of the `top` slots is decided by a space-saving sketch (Metwally et al.) of
//! the unlabelled tenants, `4 × top` counters at most (and at most
//! [`MAX_SKETCH`]): a tenant is promoted while a slot is free and its guaranteed
//! count (count minus the sketch's error bound) is at least [`MIN_HITS`] and at
//! least its fair share of the unlabelled traffic seen (`seen / capacity`). So a
//! tenant seen once never takes a slot, and once traffic has been seen a newcomer
//! needs a real share of it; any tenant with more than `seen / capacity` of that
//! traffic is guaranteed to be in the sketch. Memory: `top` labels plus the sketch,
//! whatever the number of tenants.
//!
//! Limitation: slots are never given back, so when all `top` are taken by early
//! tenants, a tenant that becomes heavy later is counted in `other`.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::Arc;

use metrics::SharedString;

/// The label of every tenant without its own.
pub const OTHER: &str = "other";

/// A tenant needs at least this many guaranteed hits to be given a label.
pub const MIN_HITS: u64 = 2;

/// Largest sketch, whatever `top` is.
pub const MAX_SKETCH: usize = 4096;

/// The labelled tenants and the sketch that picks them.
pub struct TopTenants {
    top: usize,
    labels: HashMap<Box<str>, SharedString>,
    sketch: SpaceSaving,
}

impl TopTenants {
    /// `top` labelled tenants at most; 0 means none (every call answers `None`).
    pub fn new(top: usize) -> TopTenants {
        let capacity = top.saturating_mul(4).clamp(16, MAX_SKETCH);
        TopTenants { top, labels: HashMap::new(), sketch: SpaceSaving::new(capacity) }
    }

    pub fn top(&self) -> usize {
        self.top
    }

    /// Tenants with their own label.
    pub fn labelled(&self) -> usize {
        self.labels.len()
    }

    /// Tenants the sketch tracks.
    pub fn tracked(&self) -> usize {
        self.sketch.counts.len()
    }

    /// Counts one hit of `tenant` and answers its label: its own, or [`OTHER`]. The
    /// answer is a shared string (no allocation once a tenant is labelled).
    pub fn hit(&mut self, tenant: &str) -> Option<SharedString> {
        if self.top == 0 {
            return None;
        }
        if let Some(l) = self.labels.get(tenant) {
            return Some(l.clone());
        }
        let guaranteed = self.sketch.observe(tenant);
        let fair_share = self.sketch.seen / self.sketch.capacity as u64;
        if self.labels.len() < self.top && guaranteed >= MIN_HITS.max(fair_share) {
            self.sketch.forget(tenant);
            let label = SharedString::from(Arc::<str>::from(tenant));
            self.labels.insert(tenant.into(), label.clone());
            return Some(label);
        }
        Some(SharedString::const_str(OTHER))
    }
}

/// Space-saving: `capacity` counters; a new item replaces the smallest one and
/// inherits its count as its error bound. The counters are also kept ordered by
/// count, so finding the smallest is O(log n), not a scan of the table (a scan per
/// call from an untracked tenant showed as 2.8 % of etcdmux's CPU with 30,000
/// projects). Items are tracked by a 64-bit hash of their name, so a miss allocates
/// nothing; two tenants sharing a hash (about 1 in 10^15 for a full sketch) would
/// share a counter, and one of them could get a label a little early.
struct SpaceSaving {
    capacity: usize,
    hasher: RandomState,
    /// item hash → its counter; count − error ≤ true count ≤ count.
    counts: HashMap<u64, Counter, BuildHasherDefault<Prehashed>>,
    /// (count, seq) → item hash, smallest first: the next one to replace. `seq`
    /// orders equal counts by arrival (the oldest is replaced first).
    order: BTreeMap<(u64, u64), u64>,
    next_seq: u64,
    /// Hits observed.
    seen: u64,
}

struct Counter {
    count: u64,
    error: u64,
    seq: u64,
}

/// The keys of [`SpaceSaving::counts`] are hashes already.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl SpaceSaving {
    fn new(capacity: usize) -> SpaceSaving {
        SpaceSaving {
            capacity: capacity.max(1),
            hasher: RandomState::new(),
            counts: HashMap::default(),
            order: BTreeMap::new(),
            next_seq: 0,
            seen: 0,
        }
    }

    fn id(&self, item: &str) -> u64 {
        self.hasher.hash_one(item)
    }

    /// Counts one hit of `item`; answers its guaranteed count.
    fn observe(&mut self, item: &str) -> u64 {
        self.seen += 1;
        let id = self.id(item);
        if let Some(c) = self.counts.get_mut(&id) {
            self.order.remove(&(c.count, c.seq));
            c.count += 1;
            self.order.insert((c.count, c.seq), id);
            return c.count - c.error;
        }
        let mut floor = 0;
        if self.counts.len() >= self.capacity {
            if let Some(((count, _), smallest)) = self.order.pop_first() {
                self.counts.remove(&smallest);
                floor = count;
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert((floor + 1, seq), id);
        self.counts.insert(id, Counter { count: floor + 1, error: floor, seq });
        1
    }

    fn forget(&mut self, item: &str) {
        if let Some(c) = self.counts.remove(&self.id(item)) {
            self.order.remove(&(c.count, c.seq));
        }
    }

    #[cfg(test)]
    fn count(&self, item: &str) -> Option<(u64, u64)> {
        self.counts.get(&self.id(item)).map(|c| (c.count, c.error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts every hit under its label, as the recorder would.
    fn drive(t: &mut TopTenants, hits: impl IntoIterator<Item = String>) -> HashMap<String, u64> {
        let mut series: HashMap<String, u64> = HashMap::new();
        for h in hits {
            let label = t.hit(&h).expect("enabled");
            *series.entry(label.to_string()).or_default() += 1;
        }
        series
    }

    #[test]
    fn size_stays_bounded_whatever_the_tenant_count() {
        let mut t = TopTenants::new(10);
        let hits = (0..30_000).flat_map(|i| std::iter::repeat_n(format!("t{i}"), 1 + i % 3));
        let series = drive(&mut t, hits);
        assert!(t.labelled() <= 10, "{}", t.labelled());
        assert!(t.tracked() <= 40, "{}", t.tracked());
        assert!(series.len() <= 11, "{series:?}");
        let total: u64 = (0..30_000u64).map(|i| 1 + i % 3).sum();
        assert_eq!(series.values().sum::<u64>(), total, "every hit counted once");
    }

    #[test]
    fn heavy_hitters_get_and_keep_their_label_the_rest_is_other() {
        let mut t = TopTenants::new(3);
        let mut hits = Vec::new();
        for round in 0..1000 {
            hits.push(format!("heavy{}", round % 3));
            hits.push(format!("noise{round}"));
        }
        let series = drive(&mut t, hits);
        for h in ["heavy0", "heavy1", "heavy2"] {
            assert!(series.get(h).is_some_and(|n| *n >= 300), "{h}: {series:?}");
        }
        // The noise, and each heavy tenant's first hit (one hit takes no slot).
        assert_eq!(series.get(OTHER), Some(&1003), "{series:?}");
        assert_eq!(series.len(), 4, "{series:?}");
        // Kept afterwards, however much noise follows.
        let _ = drive(&mut t, (0..5000).map(|i| format!("late{i}")));
        assert_eq!(t.hit("heavy1").as_deref(), Some("heavy1"));
        assert_eq!(t.hit("late7").as_deref(), Some(OTHER));
    }

    #[test]
    fn a_tenant_seen_once_takes_no_slot() {
        let mut t = TopTenants::new(5);
        let series = drive(&mut t, (0..300).map(|i| format!("once{i}")));
        assert_eq!(t.labelled(), 0);
        assert_eq!(series.get(OTHER), Some(&300));
    }

    #[test]
    fn a_newcomer_needs_a_fair_share_once_traffic_was_seen() {
        let mut t = TopTenants::new(2);
        // One slot taken; 100k hits of noise spread over many tenants.
        let _ = drive(&mut t, ["a".to_string(), "a".to_string()]);
        let _ = drive(&mut t, (0..100_000).map(|i| format!("n{}", i % 5000)));
        assert_eq!(t.hit("b").as_deref(), Some(OTHER));
        assert_eq!(t.hit("b").as_deref(), Some(OTHER), "two hits are no share of 100k");
        assert_eq!(t.labelled(), 1);
    }

    /// The sketch's bounds hold on a skewed stream, its two views agree, and a full
    /// sketch replaces its smallest counter (the oldest among equals).
    #[test]
    fn the_sketch_keeps_its_bounds_and_replaces_the_smallest() {
        let mut s = SpaceSaving::new(8);
        let mut truth: HashMap<String, u64> = HashMap::new();
        let mut x = 12345u64;
        for _ in 0..20_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            // Skewed: t1 about half the stream, t2 a sixth, t3 a twelfth, …
            let r = (x >> 33) % 1000;
            let item = format!("t{}", 1000 / (r + 1));
            *truth.entry(item.clone()).or_default() += 1;
            s.observe(&item);
        }
        assert_eq!(s.counts.len(), 8);
        assert_eq!(s.order.len(), s.counts.len(), "one ordered entry per counter");
        for (id, c) in &s.counts {
            assert_eq!(s.order.get(&(c.count, c.seq)), Some(id));
        }
        let mut tracked = 0;
        for (item, &t) in &truth {
            if let Some((count, error)) = s.count(item) {
                tracked += 1;
                assert!(count - error <= t && t <= count, "{item}: {count} - {error} vs {t}");
            }
        }
        assert_eq!(tracked, 8);
        // Items with more than 1/capacity of the stream are always tracked.
        assert!(["t1", "t2", "t3"].iter().all(|k| s.count(k).is_some()));

        let mut s = SpaceSaving::new(2);
        for item in ["a", "a", "b", "c"] {
            s.observe(item);
        }
        // b (count 1) was the smallest: c took its place with error 1.
        assert!(s.count("a").is_some() && s.count("b").is_none());
        assert_eq!(s.count("c"), Some((2, 1)));
        s.observe("d"); // c and a both count 2: a arrived first, so a goes
        assert!(s.count("a").is_none() && s.count("c").is_some() && s.count("d").is_some());
        s.forget("d");
        assert_eq!((s.counts.len(), s.order.len()), (1, 1));
    }

    #[test]
    fn zero_disables_the_label() {
        let mut t = TopTenants::new(0);
        assert!(t.hit("a").is_none());
        assert!(t.hit("a").is_none());
        assert_eq!(t.labelled(), 0);
    }
}
