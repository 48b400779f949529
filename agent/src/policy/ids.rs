//! Stable numbering of things that come and go (label sets, pods, ipBlock
//! prefixes, policies) across compiles.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    hash::Hash,
    sync::Arc,
};

/// The numbers of one kind: `first..end`. A freed id comes back (oldest
/// first) never in the compile that freed it, so a map entry written from
/// the previous compile never changes meaning in the next one. Identities
/// and endpoint ids take never-used ids first (a wide space; a recycled
/// number is where stale state could be misread); policy refs reuse first,
/// so the table they index stays dense.
#[derive(Debug)]
pub(super) struct Allocator {
    next: u32,
    end: u32,
    /// (generation that freed it, id), oldest first.
    free: VecDeque<(u64, u32)>,
    reuse_first: bool,
    /// Ids found in maps a previous agent wrote ([`Self::reserve`]) that
    /// no key has adopted yet ([`Self::adopt`]).
    reserved: HashSet<u32>,
    /// Every id ever reserved: the counter skips them (one may be in use
    /// or queued as free).
    skip: HashSet<u32>,
}

impl Allocator {
    pub(super) fn new(first: u32, end: u32, reuse_first: bool) -> Self {
        Self {
            next: first,
            end,
            free: VecDeque::new(),
            reuse_first,
            reserved: HashSet::new(),
            skip: HashSet::new(),
        }
    }

    fn alloc(&mut self, generation: u64) -> Option<u32> {
        let reusable = self.free.front().is_some_and(|(freed, _)| *freed < generation);
        if reusable && self.reuse_first {
            return self.free.pop_front().map(|(_, id)| id);
        }
        while self.next < self.end {
            let id = self.next;
            self.next += 1;
            if !self.skip.contains(&id) {
                return Some(id);
            }
        }
        if reusable { self.free.pop_front().map(|(_, id)| id) } else { None }
    }

    fn release(&mut self, id: u32, generation: u64) {
        self.free.push_back((generation, id));
    }

    /// Keeps `id` from being handed out fresh.
    pub(super) fn reserve(&mut self, id: u32) {
        if id >= self.next && id < self.end {
            self.reserved.insert(id);
            self.skip.insert(id);
        }
    }

    /// Takes a reserved id for the key that had it; false when it is not
    /// reserved or already taken.
    fn adopt(&mut self, id: u32) -> bool {
        self.reserved.remove(&id)
    }

    /// After the first compile: reserved ids nobody adopted are free from
    /// the next compile on (and no longer adoptable).
    pub(super) fn release_unadopted(&mut self, generation: u64) {
        let mut unadopted: Vec<u32> = self.reserved.drain().collect();
        unadopted.sort_unstable();
        for id in unadopted {
            self.free.push_back((generation, id));
        }
    }
}

/// Ids of keys, kept while each compile uses them and freed after a
/// compile that did not.
#[derive(Debug)]
pub(super) struct StableIds<K> {
    /// Key → (id, generation that last used it).
    map: HashMap<K, (u32, u64)>,
    pub(super) alloc: Allocator,
}

impl<K: Hash + Eq> StableIds<K> {
    /// Ids `first..end`, never-used ones first.
    pub(super) fn new(first: u32, end: u32) -> Self {
        Self {
            map: HashMap::new(),
            alloc: Allocator::new(first, end, false),
        }
    }

    /// Ids `first..end`, freed ones first.
    pub(super) fn dense(first: u32, end: u32) -> Self {
        Self {
            map: HashMap::new(),
            alloc: Allocator::new(first, end, true),
        }
    }

    /// The id of `key`, allocated if new (`hint`, a reserved id the key
    /// had in a previous agent's maps, if still free); marks it used in
    /// `generation`. `None` when every id is taken.
    pub(super) fn id(&mut self, key: K, generation: u64, hint: Option<u32>) -> Option<u32> {
        if let Some(entry) = self.map.get_mut(&key) {
            entry.1 = generation;
            return Some(entry.0);
        }
        let id = match hint {
            Some(h) if self.alloc.adopt(h) => h,
            _ => self.alloc.alloc(generation)?,
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
        let alloc = &mut self.alloc;
        self.map.retain(|_, (id, used)| {
            let keep = *used == generation;
            if !keep {
                alloc.release(*id, generation);
            }
            keep
        });
    }
}

pub(super) type Labels = BTreeMap<String, String>;

/// Label identities: (namespace, namespace labels, pod labels) → id, looked
/// up without building the key (a compile looks up every label set of the
/// cluster; only new ones are copied). The pod labels are shared with the
/// compile's output.
#[derive(Debug)]
pub(super) struct LabelIds {
    by_ns: HashMap<String, NsIds>,
    pub(super) alloc: Allocator,
}

#[derive(Debug)]
struct NsIds {
    ns_labels: Labels,
    /// Pod labels → (id, generation that last used it).
    sets: HashMap<Arc<Labels>, (u32, u64)>,
}

impl LabelIds {
    pub(super) fn new(first: u32, end: u32) -> Self {
        Self {
            by_ns: HashMap::new(),
            alloc: Allocator::new(first, end, false),
        }
    }

    /// The identity of a label set and the shared copy of its pod labels
    /// (`labels` itself when the set is new: the pod store's interned
    /// copy); see [`StableIds::id`].
    pub(super) fn id(&mut self, namespace: &str, ns_labels: &Labels, labels: &Arc<Labels>, generation: u64, hint: Option<u32>) -> Option<(u32, Arc<Labels>)> {
        let ns = if let Some(ns) = self.by_ns.get_mut(namespace) {
            if ns.ns_labels != *ns_labels {
                // New namespace labels: every set of the namespace is a
                // new label set.
                for (id, _) in ns.sets.drain().map(|(_, v)| v) {
                    self.alloc.release(id, generation);
                }
                ns.ns_labels.clone_from(ns_labels);
            }
            ns
        } else {
            self.by_ns.entry(namespace.to_owned()).or_insert_with(|| NsIds {
                ns_labels: ns_labels.clone(),
                sets: HashMap::new(),
            })
        };
        if let Some((shared, entry)) = ns.sets.get_key_value(&**labels) {
            let (id, shared) = (entry.0, Arc::clone(shared));
            if let Some(entry) = ns.sets.get_mut(&**labels) {
                entry.1 = generation;
            }
            return Some((id, shared));
        }
        let id = match hint {
            Some(h) if self.alloc.adopt(h) => h,
            _ => self.alloc.alloc(generation)?,
        };
        let shared = Arc::clone(labels);
        ns.sets.insert(Arc::clone(&shared), (id, generation));
        Some((id, shared))
    }

    /// Frees the identities `generation` did not use.
    pub(super) fn sweep(&mut self, generation: u64) {
        let alloc = &mut self.alloc;
        self.by_ns.retain(|_, ns| {
            ns.sets.retain(|_, (id, used)| {
                let keep = *used == generation;
                if !keep {
                    alloc.release(*id, generation);
                }
                keep
            });
            !ns.sets.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stay_while_used_and_come_back_only_after_an_unused_compile() {
        let mut ids = StableIds::new(10, 13);
        assert_eq!(ids.id("a", 1, None), Some(10));
        assert_eq!(ids.id("b", 1, None), Some(11));
        assert_eq!(ids.id("a", 1, None), Some(10));
        ids.sweep(1);
        // Compile 2 keeps a, drops b.
        assert_eq!(ids.id("a", 2, None), Some(10));
        ids.sweep(2);
        assert_eq!(ids.get("b"), None);
        // Never-used ids go first.
        assert_eq!(ids.id("c", 3, None), Some(12));
        // b's 11 was freed by compile 2: reusable in 3.
        assert_eq!(ids.id("d", 3, None), Some(11));
        assert_eq!(ids.id("e", 3, None), None, "all taken");
        ids.sweep(3);
        // a was not used in 3: freed by compile 3, reusable from 4 on.
        assert_eq!(ids.get("a"), None);
        assert_eq!(ids.id("e", 4, None), Some(10));
    }

    #[test]
    fn dense_ids_reuse_freed_ones_first() {
        let mut ids = StableIds::dense(0, 100);
        assert_eq!(ids.id("a", 1, None), Some(0));
        assert_eq!(ids.id("b", 1, None), Some(1));
        ids.sweep(1);
        assert_eq!(ids.id("b", 2, None), Some(1));
        assert_eq!(ids.id("c", 2, None), Some(2), "a's 0 is freed only by this compile");
        ids.sweep(2);
        assert_eq!(ids.id("d", 3, None), Some(0));
    }

    #[test]
    fn a_freed_id_is_not_reused_in_the_compile_that_freed_it() {
        let mut ids = StableIds::new(1, 2);
        assert_eq!(ids.id("a", 1, None), Some(1));
        ids.sweep(1);
        ids.sweep(2); // compile 2 did not use a: freed with generation 2
        assert_eq!(ids.id("b", 2, None), None, "freed in this generation");
        assert_eq!(ids.id("b", 3, None), Some(1));
    }

    #[test]
    fn reserved_ids_go_only_to_their_keys_then_free_up() {
        let mut ids = StableIds::new(1, 100);
        for id in [1, 2, 5] {
            ids.alloc.reserve(id);
        }
        assert_eq!(ids.id("new", 1, None), Some(3), "1 and 2 are reserved");
        assert_eq!(ids.id("had-5", 1, Some(5)), Some(5));
        assert_eq!(ids.id("also-5", 1, Some(5)), Some(4), "5 is taken: a fresh one, skipping reserved");
        assert_eq!(ids.id("bogus", 1, Some(50)), Some(6), "50 was never reserved");
        ids.alloc.release_unadopted(1);
        ids.sweep(1);
        // 1 and 2 (never adopted) are free from compile 2 on; the counter
        // never hands out 5 again while it is in use.
        assert_eq!(ids.id("x", 2, None), Some(7));
        let mut ids2 = StableIds::dense(1, 100);
        ids2.alloc.reserve(1);
        assert_eq!(ids2.id("a", 1, None), Some(2));
        ids2.alloc.release_unadopted(1);
        ids2.sweep(1);
        assert_eq!(ids2.id("b", 2, None), Some(1));
    }

    #[test]
    fn label_ids_follow_namespace_labels() {
        let l = |pairs: &[(&str, &str)]| -> Labels { pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect() };
        let a_labels = Arc::new(l(&[("pod", "a")]));
        let mut ids = LabelIds::new(256, 1000);
        let (a, shared) = ids.id("x", &l(&[("ns", "x")]), &a_labels, 1, None).unwrap();
        assert!(Arc::ptr_eq(&shared, &a_labels), "the caller's copy is kept, not cloned");
        assert_eq!(ids.id("x", &l(&[("ns", "x")]), &a_labels, 1, None).unwrap().0, a);
        let (b, _) = ids.id("y", &l(&[("ns", "y")]), &a_labels, 1, None).unwrap();
        assert_ne!(a, b);
        ids.sweep(1);
        assert_eq!(ids.id("x", &l(&[("ns", "x")]), &a_labels, 2, None).unwrap().0, a);
        // x gets a label: its pods' label sets are new.
        let (a2, _) = ids.id("x", &l(&[("ns", "x"), ("team", "t")]), &a_labels, 3, None).unwrap();
        assert_ne!(a2, a);
        ids.sweep(3);
        // y was not used in 3: gone.
        let (b2, _) = ids.id("y", &l(&[("ns", "y")]), &a_labels, 4, None).unwrap();
        assert_ne!(b2, b);
    }
}
