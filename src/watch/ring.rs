//! The ring: the most recent upstream events, in revision order, bounded in count
//! and bytes. Eviction drops whole revisions only, so the ring always holds every
//! event of every revision from [`Ring::covers_from`] on.

use std::collections::VecDeque;

/// What the ring needs of an event.
pub(super) trait Entry {
    fn rev(&self) -> i64;
    /// Bytes it counts for against the ring's byte bound.
    fn size(&self) -> usize;
}

/// Recent events by revision.
pub(super) struct Ring<T> {
    events: VecDeque<T>,
    bytes: usize,
    /// Every event with revision `covers_from..` that was pushed is still here.
    covers_from: i64,
    max_events: usize,
    max_bytes: usize,
}

impl<T: Entry> Ring<T> {
    pub(super) fn new(max_events: usize, max_bytes: usize) -> Ring<T> {
        Ring { events: VecDeque::new(), bytes: 0, covers_from: 1, max_events, max_bytes }
    }

    /// The oldest revision the ring can replay from: it holds every event pushed
    /// since with a revision at or after it.
    pub(super) fn covers_from(&self) -> i64 {
        self.covers_from
    }

    pub(super) fn len(&self) -> usize {
        self.events.len()
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Empties the ring; it covers from `from` on (nothing older is known).
    pub(super) fn reset(&mut self, from: i64) {
        self.events.clear();
        self.bytes = 0;
        self.covers_from = from;
    }

    /// Appends the events of one upstream response (revisions never go back), then
    /// evicts the oldest whole revisions until the ring is within its bounds.
    pub(super) fn extend(&mut self, events: impl IntoIterator<Item = T>) {
        for e in events {
            debug_assert!(self.events.back().is_none_or(|b| b.rev() <= e.rev()), "revisions go back");
            self.bytes += e.size();
            self.events.push_back(e);
        }
        self.evict();
    }

    fn evict(&mut self) {
        while self.events.len() > self.max_events || self.bytes > self.max_bytes {
            let Some(first) = self.events.pop_front() else { break };
            self.bytes -= first.size();
            let rev = first.rev();
            // Whole revisions only: the ring covers from the next revision on.
            while self.events.front().is_some_and(|e| e.rev() == rev) {
                if let Some(e) = self.events.pop_front() {
                    self.bytes -= e.size();
                }
            }
            self.covers_from = rev + 1;
        }
    }

    /// The events from revision `from` on (or from [`Ring::covers_from`], if later),
    /// in order.
    pub(super) fn replay_from(&self, from: i64) -> impl Iterator<Item = &T> {
        let from = from.max(self.covers_from);
        let first = self.events.partition_point(|e| e.rev() < from);
        self.events.range(first..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq)]
    struct E(i64, usize);

    impl Entry for E {
        fn rev(&self) -> i64 {
            self.0
        }
        fn size(&self) -> usize {
            self.1
        }
    }

    fn revs(r: &Ring<E>, from: i64) -> Vec<i64> {
        r.replay_from(from).map(|e| e.0).collect()
    }

    #[test]
    fn replays_from_a_revision_in_order() {
        let mut r = Ring::new(100, 1000);
        r.reset(5);
        r.extend([E(5, 1), E(7, 1), E(7, 1), E(9, 1)]);
        assert_eq!(revs(&r, 5), vec![5, 7, 7, 9]);
        assert_eq!(revs(&r, 6), vec![7, 7, 9]);
        assert_eq!(revs(&r, 9), vec![9]);
        assert_eq!(revs(&r, 10), Vec::<i64>::new());
        assert_eq!(revs(&r, 1), vec![5, 7, 7, 9], "never from before what it covers");
        assert_eq!((r.len(), r.bytes(), r.covers_from()), (4, 4, 5));
    }

    #[test]
    fn evicts_whole_revisions_by_count() {
        let mut r = Ring::new(3, 1000);
        r.extend([E(1, 1), E(2, 1), E(2, 1), E(3, 1)]);
        // Over by one event: revision 1 goes; revision 2 stays whole.
        assert_eq!(revs(&r, 0), vec![2, 2, 3]);
        assert_eq!(r.covers_from(), 2);
        r.extend([E(4, 1)]);
        // Dropping one event of revision 2 drops both.
        assert_eq!(revs(&r, 0), vec![3, 4]);
        assert_eq!(r.covers_from(), 3);
        assert_eq!(r.bytes(), 2);
    }

    #[test]
    fn evicts_by_bytes_and_a_revision_larger_than_the_ring_empties_it() {
        let mut r = Ring::new(100, 10);
        r.extend([E(1, 4), E(2, 4)]);
        assert_eq!(r.covers_from(), 1);
        r.extend([E(3, 4)]);
        assert_eq!(revs(&r, 0), vec![2, 3]);
        assert_eq!(r.covers_from(), 2);
        r.extend([E(4, 6), E(4, 6)]);
        assert_eq!(r.len(), 0, "a revision that alone passes the bound is not kept");
        assert_eq!(r.bytes(), 0);
        assert_eq!(r.covers_from(), 5);
        r.extend([E(5, 1)]);
        assert_eq!(revs(&r, 0), vec![5]);
    }

    #[test]
    fn reset_forgets_everything_before() {
        let mut r = Ring::new(100, 100);
        r.extend([E(1, 1), E(2, 1)]);
        r.reset(10);
        assert_eq!((r.len(), r.bytes(), r.covers_from()), (0, 0, 10));
        assert_eq!(revs(&r, 1), Vec::<i64>::new());
    }
}
