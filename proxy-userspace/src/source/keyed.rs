//! A set of shared objects found by (namespace, name), read from the objects themselves: a
//! store of 10,000 Services does not keep a second copy of every name as a map key.

use std::{
    borrow::Borrow,
    collections::HashSet,
    hash::{Hash, Hasher},
    sync::Arc,
};

use crate::{
    objects::{ServiceObject, SliceObject},
    source::NodeState,
};

/// (namespace, name) of an object.
pub type KeyRef<'a> = (Option<&'a str>, &'a str);

/// An object that says its own (namespace, name).
pub trait Keyed {
    fn key(&self) -> KeyRef<'_>;
}

impl Keyed for ServiceObject {
    fn key(&self) -> KeyRef<'_> {
        (
            self.namespace.as_deref(),
            self.name.as_deref().unwrap_or_default(),
        )
    }
}

impl Keyed for SliceObject {
    fn key(&self) -> KeyRef<'_> {
        (
            self.namespace.as_deref(),
            self.name.as_deref().unwrap_or_default(),
        )
    }
}

/// A Node (cluster-scoped) by its name.
impl Keyed for (String, NodeState) {
    fn key(&self) -> KeyRef<'_> {
        (None, &self.0)
    }
}

/// Objects by key; inserting an object replaces the one of the same key.
pub struct KeyedSet<T> {
    set: HashSet<Entry<T>>,
}

impl<T> Default for KeyedSet<T> {
    fn default() -> Self {
        Self {
            set: HashSet::new(),
        }
    }
}

impl<T: Keyed> KeyedSet<T> {
    pub fn insert(&mut self, object: Arc<T>) {
        self.set.replace(Entry(object));
    }

    pub fn remove(&mut self, key: KeyRef<'_>) {
        self.set.remove(&key as &dyn View);
    }

    pub fn get(&self, key: KeyRef<'_>) -> Option<&Arc<T>> {
        self.set.get(&key as &dyn View).map(|e| &e.0)
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<T>> {
        self.set.iter().map(|e| &e.0)
    }
}

/// A set member, hashed and compared by its object's key.
struct Entry<T>(Arc<T>);

/// What lookups hash and compare: a member or a bare key.
trait View {
    fn view(&self) -> KeyRef<'_>;
}

impl<T: Keyed> View for Entry<T> {
    fn view(&self) -> KeyRef<'_> {
        self.0.key()
    }
}

impl View for KeyRef<'_> {
    fn view(&self) -> KeyRef<'_> {
        *self
    }
}

impl Hash for dyn View + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.view().hash(state);
    }
}

impl PartialEq for dyn View + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.view() == other.view()
    }
}

impl Eq for dyn View + '_ {}

// Hash and equality of a member are those of its view, so a bare key finds it.
impl<T: Keyed> Hash for Entry<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.view().hash(state);
    }
}

impl<T: Keyed> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.view() == other.view()
    }
}

impl<T: Keyed> Eq for Entry<T> {}

impl<'a, T: Keyed + 'a> Borrow<dyn View + 'a> for Entry<T> {
    fn borrow(&self) -> &(dyn View + 'a) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(namespace: Option<&str>, name: &str, ip: &str) -> Arc<ServiceObject> {
        Arc::new(ServiceObject {
            namespace: namespace.map(Into::into),
            name: Some(name.to_owned()),
            spec: Some(Box::new(crate::objects::ServiceSpec {
                cluster_ips: vec![ip.to_owned()],
                ..Default::default()
            })),
            ..ServiceObject::default()
        })
    }

    #[test]
    fn objects_are_found_replaced_and_removed_by_namespace_and_name() {
        let mut set = KeyedSet::default();
        set.insert(svc(Some("dev"), "web", "10.96.0.1"));
        set.insert(svc(Some("prod"), "web", "10.96.0.2"));
        set.insert(svc(None, "web", "10.96.0.3"));
        assert_eq!(set.len(), 3, "same name, other namespace: another object");
        let ip = |set: &KeyedSet<ServiceObject>, key| {
            set.get(key)
                .and_then(|s| s.spec.as_ref()?.cluster_ips.first().cloned())
        };
        assert_eq!(ip(&set, (Some("dev"), "web")).as_deref(), Some("10.96.0.1"));

        set.insert(svc(Some("dev"), "web", "10.96.0.9"));
        assert_eq!(set.len(), 3, "an insert of a known key replaces");
        assert_eq!(ip(&set, (Some("dev"), "web")).as_deref(), Some("10.96.0.9"));

        set.remove((Some("dev"), "web"));
        set.remove((Some("dev"), "absent"));
        assert_eq!(set.len(), 2);
        assert!(set.get((Some("dev"), "web")).is_none());
        assert_eq!(ip(&set, (None, "web")).as_deref(), Some("10.96.0.3"));
    }
}
