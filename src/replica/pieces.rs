//! The replica's *pieces*: one tenant's keys in one resource root (an upstream
//! prefix, [`KeyLayout::piece_len`](crate::keyspace::KeyLayout::piece_len)), the
//! unit that is evicted when the replica is over its byte budget and loaded again
//! when read. Pure bookkeeping; the replica holds it under its lock.
//!
//! A piece is *held* (its keys are in the store and fed), *evicted* (its keys are
//! gone and its events skipped: reads go to etcd and ask for a load), or *loading*:
//! first its events wait while its keys are read from etcd at some revision `at`,
//! then (once loaded, until the replica has applied `at`) only its events after
//! `at` are applied. A reloaded piece has no versions before `at`: its `floor`.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::pb::mvccpb::Event;

pub(super) enum State {
    Held,
    Evicted,
    Loading { at: Option<i64>, pending: Vec<(i64, Event)> },
}

pub(super) struct Piece {
    /// The clock when it was last read (or loaded): the coldest go first.
    used: u64,
    /// Ranges below this revision go to etcd (the piece was reloaded at it).
    pub(super) floor: i64,
    pub(super) state: State,
}

/// What to do with one event of a piece.
pub(super) enum Route {
    Apply,
    Skip,
    /// Held back for a piece being loaded.
    Held,
}

#[derive(Default)]
pub(super) struct Pieces {
    map: HashMap<Bytes, Piece>,
    clock: u64,
    /// Pieces not held (evicted or loading).
    absent: usize,
    /// Loads asked for and not yet taken by the loader.
    wanted: VecDeque<Bytes>,
    /// Loaded pieces waiting for the replica to apply their load's revision.
    settling: Vec<(Bytes, i64)>,
}

impl Pieces {
    /// The number of pieces not held: ranges spanning pieces are answered only
    /// when it is 0.
    pub(super) fn absent(&self) -> usize {
        self.absent
    }

    pub(super) fn get(&self, id: &[u8]) -> Option<&Piece> {
        self.map.get(id)
    }

    /// A key of piece `id` was loaded or written: a new piece starts held and warm.
    pub(super) fn seen(&mut self, id: &Bytes) {
        if !self.map.contains_key(id) {
            self.clock += 1;
            self.map.insert(id.clone(), Piece { used: self.clock, floor: 0, state: State::Held });
        }
    }

    /// Where an event of revision `rev` for piece `id` goes.
    pub(super) fn route(&mut self, id: &Bytes, rev: i64, ev: &Event) -> Route {
        match self.map.get_mut(id) {
            None => {
                self.seen(id);
                Route::Apply
            }
            Some(p) => match &mut p.state {
                State::Held => Route::Apply,
                State::Evicted => Route::Skip,
                State::Loading { at: None, pending } => {
                    pending.push((rev, ev.clone()));
                    Route::Held
                }
                State::Loading { at: Some(at), .. } if rev <= *at => Route::Skip,
                State::Loading { .. } => Route::Apply,
            },
        }
    }

    /// A read of a held piece: it gets warmer.
    pub(super) fn touch(&mut self, id: &[u8]) {
        self.clock += 1;
        if let Some(p) = self.map.get_mut(id) {
            p.used = self.clock;
        }
    }

    /// A read found piece `id` evicted: ask for its load (once).
    pub(super) fn want(&mut self, id: &[u8]) -> bool {
        let Some(p) = self.map.get_mut(id) else { return false };
        if !matches!(p.state, State::Evicted) {
            return false;
        }
        p.state = State::Loading { at: None, pending: Vec::new() };
        self.wanted.push_back(Bytes::copy_from_slice(id));
        true
    }

    pub(super) fn next_wanted(&mut self) -> Option<Bytes> {
        self.wanted.pop_front()
    }

    /// The coldest held pieces first.
    pub(super) fn coldest(&self) -> Vec<Bytes> {
        let mut held: Vec<(&Bytes, u64)> =
            self.map.iter().filter(|(_, p)| matches!(p.state, State::Held)).map(|(k, p)| (k, p.used)).collect();
        held.sort_by_key(|&(_, used)| used);
        held.into_iter().map(|(k, _)| k.clone()).collect()
    }

    pub(super) fn evicted(&mut self, id: &[u8]) {
        if let Some(p) = self.map.get_mut(id) {
            if matches!(p.state, State::Held) {
                self.absent += 1;
            }
            p.state = State::Evicted;
        }
    }

    /// The keys of a wanted piece were read at `at`: its held-back events, and
    /// whether it is held already (the replica has applied `at`) or still settling.
    pub(super) fn loaded(&mut self, id: &[u8], at: i64, applied: i64) -> Option<Vec<(i64, Event)>> {
        self.clock += 1;
        let p = self.map.get_mut(id)?;
        let State::Loading { at: None, pending } = &mut p.state else { return None };
        let pending = std::mem::take(pending);
        p.used = self.clock;
        p.floor = at;
        if applied >= at {
            p.state = State::Held;
            self.absent -= 1;
        } else {
            p.state = State::Loading { at: Some(at), pending: Vec::new() };
            self.settling.push((Bytes::copy_from_slice(id), at));
        }
        Some(pending.into_iter().filter(|(rev, _)| *rev > at).collect())
    }

    /// A load of piece `id` failed: evicted again (the next read asks again).
    pub(super) fn load_failed(&mut self, id: &[u8]) {
        if let Some(p) = self.map.get_mut(id) {
            if matches!(p.state, State::Loading { .. }) {
                p.state = State::Evicted;
            }
        }
    }

    /// The replica has applied `applied`: settling pieces loaded at or before it are held.
    pub(super) fn settle(&mut self, applied: i64) {
        let (done, waiting): (Vec<_>, Vec<_>) = self.settling.drain(..).partition(|&(_, at)| at <= applied);
        self.settling = waiting;
        for (id, _) in done {
            if let Some(p) = self.map.get_mut(&id) {
                if matches!(p.state, State::Loading { at: Some(_), .. }) {
                    p.state = State::Held;
                    self.absent -= 1;
                }
            }
        }
    }
}
