//! Range planning: a tenant's `[start, end)` as upstream ranges.
//!
//! A range inside one resource root is one upstream range ([`KeyLayout::plan_fast`]).
//! A range that may span roots becomes one [`Piece`] per *slot* the tenant has used
//! ([`KeyLayout::plan`], given the root index). Pieces are disjoint and their union
//! holds exactly the tenant's keys in the range (proved by the proptests in
//! `layout.rs`); answers must be merged in tenant-key order, as roots interleave
//! (`/a` < `/a!x` < `/a/x`).

use bytes::Bytes;

use super::layout::{cat, prefix_end, root_of, KeyLayout, Piece, Root, Slot};
use super::tenant::{End, TenantName};

impl KeyLayout {
    /// The single upstream piece for a tenant range that stays inside one root (the
    /// common case: `/pods/` with its prefix end), or `None` when the range may span
    /// roots and needs [`KeyLayout::plan`] with the root index.
    pub fn plan_fast(&self, t: &TenantName, start: &Bytes, end: &End) -> Option<Piece> {
        if let End::Single = end {
            return Some(Piece { key: self.encode(t, start), range_end: Bytes::new() });
        }
        match root_of(start) {
            Root::Slash { name, single: false } => {
                let lo = cat(&[b"/", &name, b"/"]);
                let hi = prefix_end(&lo);
                let inside = start.as_ref() >= lo.as_ref() && matches!(end, End::Key(e) if e.as_ref() <= hi.as_ref());
                if inside {
                    return self.slash_interval(t, &name, start, end);
                }
                None
            }
            Root::Bare if start.as_ref() >= b"0".as_ref() => self.bare_pieces(t, start, end).pop(),
            Root::Bare if matches!(end, End::Key(e) if e.as_ref() <= b"/".as_ref()) => {
                self.bare_pieces(t, start, end).pop()
            }
            _ => None,
        }
    }

    /// Every upstream piece of tenant `t`'s range `[start, end)`, given every slot
    /// that may hold the tenant's keys (an over-approximation is fine). Pieces are
    /// disjoint; their union holds exactly the tenant's keys in the range. Results
    /// must be merged in tenant-key order, as roots interleave (`/a` < `/a!x` < `/a/x`).
    pub fn plan<'s>(
        &self,
        t: &TenantName,
        start: &Bytes,
        end: &End,
        slots: impl IntoIterator<Item = &'s Slot>,
    ) -> Vec<Piece> {
        if let Some(p) = self.plan_fast(t, start, end) {
            return vec![p];
        }
        let mut pieces = Vec::new();
        for slot in slots {
            match slot {
                Slot::Bare => pieces.extend(self.bare_pieces(t, start, end)),
                Slot::Key(name) => {
                    let key = cat(&[b"/", name]);
                    let below_end = match end {
                        End::Key(e) => key.as_ref() < e.as_ref(),
                        _ => true,
                    };
                    if start.as_ref() <= key.as_ref() && below_end {
                        pieces.push(Piece { key: self.slash_prefix(name, t), range_end: Bytes::new() });
                    }
                }
                Slot::Under(name) => pieces.extend(self.slash_interval(t, name, start, end)),
            }
        }
        pieces
    }

    /// `[start, end)` ∩ `[/<name>/, /<name>0)` as one upstream range.
    fn slash_interval(&self, t: &TenantName, name: &[u8], start: &Bytes, end: &End) -> Option<Piece> {
        let lo = cat(&[b"/", name, b"/"]);
        let hi = prefix_end(&lo);
        let from = if start.as_ref() > lo.as_ref() { start.clone() } else { lo };
        let to = match end {
            End::Key(e) if e.as_ref() < hi.as_ref() => e.clone(),
            _ => hi.clone(),
        };
        if from >= to {
            return None;
        }
        let base = self.slash_prefix(name, t);
        let rest = |k: &Bytes| k.slice(1 + name.len()..);
        let range_end = if to == hi { cat(&[&base, b"0"]) } else { cat(&[&base, &rest(&to)]) };
        Some(Piece { key: cat(&[&base, &rest(&from)]), range_end })
    }

    /// `[start, end)` ∩ the bare keys (`< "/"` or `>= "0"`), as up to two pieces.
    fn bare_pieces(&self, t: &TenantName, start: &Bytes, end: &End) -> Vec<Piece> {
        let base = self.bare_prefix(t);
        let mut out = Vec::new();
        let end_key = |e: &End| match e {
            End::Key(k) => Some(k.clone()),
            _ => None,
        };
        // Keys below "/".
        let below = match end_key(end) {
            Some(e) if e.as_ref() < b"/".as_ref() => e,
            _ => Bytes::from_static(b"/"),
        };
        if start.as_ref() < below.as_ref() {
            out.push(Piece { key: cat(&[&base, start]), range_end: cat(&[&base, &below]) });
        }
        // Keys from "0" on.
        let from = if start.as_ref() > b"0".as_ref() { start.clone() } else { Bytes::from_static(b"0") };
        let range_end = match end_key(end) {
            Some(e) if e.as_ref() <= from.as_ref() => return out,
            Some(e) => cat(&[&base, &e]),
            None => prefix_end(&base),
        };
        out.push(Piece { key: cat(&[&base, &from]), range_end });
        out
    }
}
