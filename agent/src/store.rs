//! The agent's watch stores: every object of a kind, by namespace and
//! name, as the compact type the agent reads (`slim.rs`).
//!
//! kube's reflector store keys each object with an `ObjectRef` that copies
//! its name, namespace, uid and resourceVersion, holds the decoded type
//! whole (an `ObjectMeta` of hundreds of bytes inline, however empty), and
//! builds a second table during every (re)list. Here the key shares the
//! object's own name and namespace (one allocation, and namespaces are
//! interned), the object is whatever the kind's compact type keeps, and a
//! relist updates the one table in place: objects the relist did not bring
//! back are dropped when it completes.

use std::{
    borrow::Borrow,
    collections::HashMap,
    hash::{Hash, Hasher},
    sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

/// An object's place in its store: namespace (empty for cluster-scoped
/// kinds) and name, both shared with the object itself.
#[derive(Clone, Debug, Default)]
pub struct ObjKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjKey {
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

/// An object a store can hold.
pub trait Keyed: Send + Sync + 'static {
    /// Namespace and name; cheap (reference counts, no copies).
    fn key(&self) -> ObjKey;
}

/// Borrowed form of a key, so a lookup by `(&str, &str)` builds nothing.
trait KeyRef {
    fn parts(&self) -> (&str, &str);
}

impl KeyRef for ObjKey {
    fn parts(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

impl KeyRef for (&str, &str) {
    fn parts(&self) -> (&str, &str) {
        (self.0, self.1)
    }
}

impl Hash for dyn KeyRef + '_ {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.parts().hash(h);
    }
}

impl PartialEq for dyn KeyRef + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyRef + '_ {}

// Hash and Eq of the owned key are those of its borrowed form, as
// `Borrow` requires.
impl Hash for ObjKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (self as &dyn KeyRef).hash(h);
    }
}

impl PartialEq for ObjKey {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for ObjKey {}

impl<'a> Borrow<dyn KeyRef + 'a> for ObjKey {
    fn borrow(&self) -> &(dyn KeyRef + 'a) {
        self
    }
}

/// `map[namespace/name]` without building an [`ObjKey`].
pub fn get_in<'m, V>(map: &'m HashMap<ObjKey, V>, namespace: &str, name: &str) -> Option<&'m V> {
    map.get(&(namespace, name) as &dyn KeyRef)
}

/// `map[namespace/name]`, mutable, without building an [`ObjKey`].
pub fn get_mut_in<'m, V>(map: &'m mut HashMap<ObjKey, V>, namespace: &str, name: &str) -> Option<&'m mut V> {
    map.get_mut(&(namespace, name) as &dyn KeyRef)
}

/// Removes `namespace/name` from `map` without building an [`ObjKey`].
pub fn remove_in<V>(map: &mut HashMap<ObjKey, V>, namespace: &str, name: &str) -> Option<V> {
    map.remove(&(namespace, name) as &dyn KeyRef)
}

struct Entry<T> {
    object: Arc<T>,
    /// The list (or relist) that last brought this object.
    epoch: u32,
}

struct Table<T> {
    objects: HashMap<ObjKey, Entry<T>>,
    epoch: u32,
}

/// Every object of one kind. Cheap to clone (a shared table); readers get
/// `Arc`s of the objects, so a reader never holds the lock for long.
pub struct Store<T> {
    table: Arc<RwLock<Table<T>>>,
    /// `true` once the first list is complete.
    listed: Arc<tokio::sync::watch::Sender<bool>>,
}

impl<T> Clone for Store<T> {
    fn clone(&self) -> Self {
        Self { table: Arc::clone(&self.table), listed: Arc::clone(&self.listed) }
    }
}

impl<T: Keyed> Default for Store<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Keyed> Store<T> {
    pub fn new() -> Self {
        Self {
            table: Arc::new(RwLock::new(Table { objects: HashMap::new(), epoch: 0 })),
            listed: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Table<T>> {
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table<T>> {
        self.table.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every object, in no particular order.
    pub fn state(&self) -> Vec<Arc<T>> {
        self.read().objects.values().map(|e| Arc::clone(&e.object)).collect()
    }

    /// The object `namespace/name` (`namespace` empty for cluster-scoped
    /// kinds).
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<T>> {
        self.read().objects.get(&(namespace, name) as &dyn KeyRef).map(|e| Arc::clone(&e.object))
    }

    pub fn len(&self) -> usize {
        self.read().objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds or replaces `object`.
    pub fn apply(&self, object: T) {
        let mut t = self.write();
        let epoch = t.epoch;
        t.objects.insert(object.key(), Entry { object: Arc::new(object), epoch });
    }

    /// Removes the object with `object`'s key.
    pub fn delete(&self, object: &T) {
        self.write().objects.remove(&object.key());
    }

    /// A (re)list starts: what it brings is applied as it comes.
    pub fn begin_relist(&self) {
        let mut t = self.write();
        t.epoch = t.epoch.wrapping_add(1);
    }

    /// The (re)list is complete: objects it did not bring back are gone
    /// (deleted while the watch was down).
    pub fn finish_relist(&self) {
        let mut t = self.write();
        let epoch = t.epoch;
        t.objects.retain(|_, e| e.epoch == epoch);
        t.objects.shrink_to_fit();
        drop(t);
        self.listed.send_replace(true);
    }

    /// Returns once the first list is complete.
    pub async fn wait_until_ready(&self) {
        let mut rx = self.listed.subscribe();
        // Cannot fail: `self` holds the sender.
        let _ = rx.wait_for(|listed| *listed).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Obj {
        key: ObjKey,
        v: u32,
    }

    impl Keyed for Obj {
        fn key(&self) -> ObjKey {
            self.key.clone()
        }
    }

    fn obj(ns: &str, name: &str, v: u32) -> Obj {
        Obj { key: ObjKey::new(ns, name), v }
    }

    #[test]
    fn lookups_updates_and_deletes() {
        let s = Store::new();
        s.apply(obj("a", "x", 1));
        s.apply(obj("b", "x", 2));
        s.apply(obj("a", "x", 3));
        assert_eq!(s.len(), 2);
        assert_eq!(s.get("a", "x").map(|o| o.v), Some(3));
        assert_eq!(s.get("b", "x").map(|o| o.v), Some(2));
        assert!(s.get("a", "y").is_none() && s.get("", "x").is_none());
        s.delete(&obj("a", "x", 0));
        assert!(s.get("a", "x").is_none());
        assert_eq!(s.state().len(), 1);
    }

    /// A relist keeps what it brings back, replaces what changed and
    /// drops what it did not bring, once it completes.
    #[test]
    fn a_relist_drops_what_it_did_not_bring() {
        let s = Store::new();
        s.begin_relist();
        for (name, v) in [("keep", 1), ("gone", 2), ("changed", 3)] {
            s.apply(obj("ns", name, v));
        }
        s.finish_relist();
        assert_eq!(s.len(), 3);
        s.begin_relist();
        s.apply(obj("ns", "keep", 1));
        s.apply(obj("ns", "changed", 30));
        s.apply(obj("ns", "new", 4));
        // Until it completes, readers still see the old objects too.
        assert_eq!(s.len(), 4);
        s.finish_relist();
        let mut got: Vec<(String, u32)> = s.state().iter().map(|o| (o.key.name.to_string(), o.v)).collect();
        got.sort();
        assert_eq!(got, [("changed".to_owned(), 30), ("keep".to_owned(), 1), ("new".to_owned(), 4)]);
    }
}
