//! Stable numbering of things that come and go (label sets, pods, ipBlock
//! prefixes, policies) across compiles.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
};

/// Hands out ids from `first..end` to keys, keeps a key's id while each
/// compile uses it, and frees it after a compile that did not. A freed id
/// comes back (oldest first) never in the compile that freed it, so a map
/// entry written from the previous compile never changes meaning in the
/// next one. Identities and endpoint ids take never-used ids first (a wide
/// space; a recycled number is where stale state could be misread);
/// policy refs reuse first, so the table they index stays dense.
#[derive(Debug)]
pub(super) struct StableIds<K> {
    /// Key → (id, generation that last used it).
    map: HashMap<K, (u32, u64)>,
    next: u32,
    end: u32,
    /// (generation that freed it, id), oldest first.
    free: VecDeque<(u64, u32)>,
    reuse_first: bool,
}

impl<K: Hash + Eq> StableIds<K> {
    /// Ids `first..end`, never-used ones first.
    pub(super) fn new(first: u32, end: u32) -> Self {
        Self {
            map: HashMap::new(),
            next: first,
            end,
            free: VecDeque::new(),
            reuse_first: false,
        }
    }

    /// Ids `first..end`, freed ones first.
    pub(super) fn dense(first: u32, end: u32) -> Self {
        Self {
            reuse_first: true,
            ..Self::new(first, end)
        }
    }

    /// The id of `key`, allocated if new; marks it used in `generation`.
    /// `None` when every id is taken.
    pub(super) fn id(&mut self, key: K, generation: u64) -> Option<u32> {
        if let Some(entry) = self.map.get_mut(&key) {
            entry.1 = generation;
            return Some(entry.0);
        }
        let reusable = self.free.front().is_some_and(|(freed, _)| *freed < generation);
        let id = if reusable && (self.reuse_first || self.next >= self.end) {
            self.free.pop_front()?.1
        } else if self.next < self.end {
            self.next += 1;
            self.next - 1
        } else {
            return None;
        };
        self.map.insert(key, (id, generation));
        Some(id)
    }

    /// The id of `key` if it has one (does not mark it used).
    #[cfg(test)]
    pub(super) fn get<Q>(&self, key: &Q) -> Option<u32>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key).map(|e| e.0)
    }

    /// Frees the ids of keys `generation` did not use.
    pub(super) fn sweep(&mut self, generation: u64) {
        let free = &mut self.free;
        self.map.retain(|_, (id, used)| {
            let keep = *used == generation;
            if !keep {
                free.push_back((generation, *id));
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stay_while_used_and_come_back_only_after_an_unused_compile() {
        let mut ids = StableIds::new(10, 13);
        assert_eq!(ids.id("a", 1), Some(10));
        assert_eq!(ids.id("b", 1), Some(11));
        assert_eq!(ids.id("a", 1), Some(10));
        ids.sweep(1);
        // Compile 2 keeps a, drops b.
        assert_eq!(ids.id("a", 2), Some(10));
        ids.sweep(2);
        assert_eq!(ids.get("b"), None);
        // Never-used ids go first.
        assert_eq!(ids.id("c", 3), Some(12));
        // b's 11 was freed by compile 2: reusable in 3.
        assert_eq!(ids.id("d", 3), Some(11));
        assert_eq!(ids.id("e", 3), None, "all taken");
        ids.sweep(3);
        // a was not used in 3: freed by compile 3, reusable from 4 on.
        assert_eq!(ids.get("a"), None);
        assert_eq!(ids.id("e", 4), Some(10));
    }

    #[test]
    fn dense_ids_reuse_freed_ones_first() {
        let mut ids = StableIds::dense(0, 100);
        assert_eq!(ids.id("a", 1), Some(0));
        assert_eq!(ids.id("b", 1), Some(1));
        ids.sweep(1);
        assert_eq!(ids.id("b", 2), Some(1));
        assert_eq!(ids.id("c", 2), Some(2), "a's 0 is freed only by this compile");
        ids.sweep(2);
        assert_eq!(ids.id("d", 3), Some(0));
    }

    #[test]
    fn a_freed_id_is_not_reused_in_the_compile_that_freed_it() {
        let mut ids = StableIds::new(1, 2);
        assert_eq!(ids.id("a", 1), Some(1));
        ids.sweep(1);
        ids.sweep(2); // compile 2 did not use a: freed with generation 2
        assert_eq!(ids.id("b", 2), None, "freed in this generation");
        assert_eq!(ids.id("b", 3), Some(1));
    }
}
