//! The stand-in API server's object store: current objects, the global resourceVersion,
//! the retained event history watches replay from, and list snapshots for pagination.
//!
//! One counter serves every kind, as etcd's revision does, so resourceVersions of different
//! kinds interleave. The history is a window of the most recent events; a watch or
//! `continue` token from before the window is "expired" (410), which is what makes clients
//! relist.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use super::{
    ApiServerError,
    objects::Kind,
    selector::{FieldSelector, LabelSelector},
};

/// (kind, namespace or "" for cluster-scoped, name).
pub(crate) type Key = (Kind, String, String);

/// The `type` of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One retained event, in the order watches deliver it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Position in the stream; watches keep a cursor of these, not of resourceVersions,
    /// because injected faults put events out of resourceVersion order.
    seq: u64,
    /// The resourceVersion the event carries.
    rv: u64,
    kind: Kind,
    etype: EventType,
    /// The object after the event (for DELETED: its last state, with the deletion's RV).
    object: Value,
    /// The object before the event, so label-selected watches can turn an update that
    /// leaves or enters the selection into DELETED / ADDED as kube-apiserver does.
    prev: Option<Value>,
    /// A replayed stale event: its RV is older than its position, so it is delivered to
    /// every watch whose cursor passes it, whatever RV the watch started from.
    injected: bool,
}

/// What a watch selects: one kind, maybe one namespace, and selectors.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    /// Whether an object of `self.kind` is selected.
    pub(crate) fn selects(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && obj.pointer("/metadata/namespace").and_then(Value::as_str) != Some(ns.as_str())
        {
            return false;
        }
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// The event a watch with this filter sees for `entry`, if any.
    fn convert(&self, entry: &Entry) -> Option<(EventType, Value)> {
        if entry.kind != self.kind {
            return None;
        }
        let now = self.selects(&entry.object);
        let before = entry.prev.as_ref().is_some_and(|p| self.selects(p));
        match (entry.etype, before, now) {
            (EventType::Added | EventType::Deleted, _, true) => {
                Some((entry.etype, entry.object.clone()))
            }
            (EventType::Modified, true, true) => Some((EventType::Modified, entry.object.clone())),
            (EventType::Modified, false, true) => Some((EventType::Added, entry.object.clone())),
            (EventType::Modified, true, false) => {
                // Left the selection: the watcher gets DELETED of the old state at the new RV.
                let mut old = entry.prev.clone()?;
                old["metadata"]["resourceVersion"] = json!(entry.rv.to_string());
                Some((EventType::Deleted, old))
            }
            _ => None,
        }
    }
}

/// The result of looking for where a watch from some resourceVersion starts.
#[derive(Debug)]
pub(crate) struct Expired {
    /// The oldest resourceVersion a watch may still start from.
    pub oldest: u64,
}

/// A consistent list result being paged through with `continue` tokens.
#[derive(Debug)]
struct Snapshot {
    rv: u64,
    kind: Kind,
    items: Vec<Value>,
    /// Set by fault injection: the next use of the token answers 410.
    expired: bool,
}

/// A page of a list.
#[derive(Debug)]
pub(crate) struct Page {
    pub rv: u64,
    pub items: Vec<Value>,
    pub continue_token: Option<String>,
    pub remaining: usize,
}

/// Why a `continue` token was refused.
#[derive(Debug)]
pub(crate) enum ContinueError {
    /// Not a token this server issued (400).
    Invalid,
    /// Issued, but its snapshot is older than the history window (410).
    Expired,
}

#[derive(Debug)]
pub(crate) struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Entry>,
    next_seq: u64,
    /// Events with RV up to this one were dropped from the history.
    compacted_rv: u64,
    history_limit: usize,
    next_uid: u64,
    snapshots: HashMap<u64, Snapshot>,
    next_snapshot: u64,
}

impl Store {
    pub(crate) fn new(history_limit: usize) -> Self {
        Self {
            // Start above zero: "0" means "any version" to the API, never a real one.
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            next_seq: 0,
            compacted_rv: 1,
            history_limit: history_limit.max(1),
            next_uid: 1,
            snapshots: HashMap::new(),
            next_snapshot: 1,
        }
    }

    /// The current global resourceVersion.
    pub(crate) fn rv(&self) -> u64 {
        self.rv
    }

    /// The stream position the next event will get, i.e. the end of the history.
    pub(crate) fn end_seq(&self) -> u64 {
        self.next_seq
    }

    /// Creates or replaces an object (like PUT, or create if absent), stamping the
    /// metadata the server owns. Returns the stored object.
    pub(crate) fn apply(&mut self, mut obj: Value) -> Result<Value, ApiServerError> {
        let (kind, key) = key_of(&obj)?;
        self.rv += 1;
        let rv = self.rv;
        let prev = self.objects.get(&key).cloned();
        let meta = obj
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| ApiServerError::BadObject("metadata is not an object".into()))?;
        if kind.namespaced() {
            meta.insert("namespace".into(), json!(key.1));
        } else {
            meta.remove("namespace");
        }
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        match &prev {
            Some(p) => {
                // Identity and creation time survive updates, as on a real server.
                for field in ["uid", "creationTimestamp"] {
                    if let Some(v) = p.pointer(&format!("/metadata/{field}")) {
                        meta.insert(field.into(), v.clone());
                    }
                }
                let generation = p
                    .pointer("/metadata/generation")
                    .and_then(Value::as_u64)
                    .unwrap_or(1);
                meta.insert("generation".into(), json!(generation + 1));
            }
            None => {
                meta.insert(
                    "uid".into(),
                    json!(format!("00000000-0000-4000-8000-{:012x}", self.next_uid)),
                );
                self.next_uid += 1;
                meta.insert("creationTimestamp".into(), json!(rfc3339_now()));
                meta.insert("generation".into(), json!(1));
            }
        }
        self.objects.insert(key, obj.clone());
        let etype = if prev.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.push(Entry {
            seq: 0,
            rv,
            kind,
            etype,
            object: obj.clone(),
            prev,
            injected: false,
        });
        Ok(obj)
    }

    /// Deletes an object; the DELETED event carries its last state with a new RV.
    pub(crate) fn delete(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiServerError> {
        let key = (
            kind,
            if kind.namespaced() {
                namespace.to_string()
            } else {
                String::new()
            },
            name.to_string(),
        );
        let prev = self
            .objects
            .remove(&key)
            .ok_or_else(|| ApiServerError::NotFound {
                kind,
                namespace: key.1.clone(),
                name: name.to_string(),
            })?;
        self.rv += 1;
        let mut obj = prev.clone();
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.push(Entry {
            seq: 0,
            rv: self.rv,
            kind,
            etype: EventType::Deleted,
            object: obj.clone(),
            prev: Some(prev),
            injected: false,
        });
        Ok(obj)
    }

    pub(crate) fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<&Value> {
        let ns = if kind.namespaced() { namespace } else { "" };
        self.objects.get(&(kind, ns.to_string(), name.to_string()))
    }

    /// The selected objects in key order (namespace, name), as etcd returns them.
    pub(crate) fn select(&self, filter: &Filter) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((k, _, _), obj)| *k == filter.kind && filter.selects(obj))
            .map(|(_, obj)| obj.clone())
            .collect()
    }

    /// Answers a list: the first page (and a token for the rest) if `limit` is set.
    pub(crate) fn list(&mut self, filter: &Filter, limit: Option<usize>) -> Page {
        let items = self.select(filter);
        let id = self.next_snapshot;
        self.next_snapshot += 1;
        let snapshot = Snapshot {
            rv: self.rv,
            kind: filter.kind,
            items,
            expired: false,
        };
        let page = page(id, &snapshot, 0, limit);
        if page.continue_token.is_some() {
            self.snapshots.insert(id, snapshot);
        }
        page
    }

    /// Answers a list with a `continue` token (`<snapshot>-<offset>`). Tokens can be
    /// used again, like kube-apiserver's, until they expire.
    pub(crate) fn list_continue(
        &self,
        kind: Kind,
        token: &str,
        limit: Option<usize>,
    ) -> Result<Page, ContinueError> {
        let (id, offset) = token
            .split_once('-')
            .and_then(|(id, offset)| Some((id.parse::<u64>().ok()?, offset.parse::<usize>().ok()?)))
            .ok_or(ContinueError::Invalid)?;
        let snapshot = self.snapshots.get(&id).ok_or(ContinueError::Invalid)?;
        if snapshot.kind != kind {
            return Err(ContinueError::Invalid);
        }
        if snapshot.expired || snapshot.rv < self.compacted_rv {
            return Err(ContinueError::Expired);
        }
        Ok(page(id, snapshot, offset, limit))
    }

    /// Makes every outstanding `continue` token answer 410.
    pub(crate) fn expire_continue_tokens(&mut self) {
        for s in self.snapshots.values_mut() {
            s.expired = true;
            // Never served again: keep only the marker.
            s.items = Vec::new();
        }
    }

    /// Drops the whole history: every watch from a past resourceVersion and every
    /// outstanding `continue` token now gets 410.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.compacted_rv = self.rv;
        self.expire_continue_tokens();
    }

    /// Where in the stream a watch from `rv` starts, or `Expired` if events after `rv`
    /// are no longer retained.
    pub(crate) fn start_after(&self, rv: u64) -> Result<u64, Expired> {
        if rv < self.compacted_rv {
            return Err(Expired {
                oldest: self.compacted_rv,
            });
        }
        Ok(self
            .history
            .iter()
            .find(|e| !e.injected && e.rv > rv)
            .map_or(self.next_seq, |e| e.seq))
    }

    /// The events at stream positions `from..` for a watch that started from `since_rv`,
    /// and the position after them. `Expired` if the history no longer reaches `from`.
    pub(crate) fn events(
        &self,
        from: u64,
        since_rv: u64,
        filter: &Filter,
    ) -> Result<(Vec<(EventType, Value)>, u64), Expired> {
        let base = self.history.front().map_or(self.next_seq, |e| e.seq);
        if from < base {
            return Err(Expired {
                oldest: self.compacted_rv,
            });
        }
        let skip = usize::try_from(from - base).unwrap_or(usize::MAX);
        let events = self
            .history
            .iter()
            .skip(skip)
            // Entries reordered by fault injection may sit after the start position with an
            // RV the watch asked to skip; real (not injected) ones are never delivered twice.
            .filter(|e| e.injected || e.rv > since_rv)
            .filter_map(|e| filter.convert(e))
            .collect();
        Ok((events, self.next_seq))
    }

    /// Appends a MODIFIED event carrying the previous retained version of an object (with
    /// its old RV), without changing the store: a duplicate, stale event in the stream.
    pub(crate) fn replay_stale(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiServerError> {
        let ns = if kind.namespaced() { namespace } else { "" };
        let current =
            self.get(kind, ns, name)
                .cloned()
                .ok_or_else(|| ApiServerError::NotFound {
                    kind,
                    namespace: ns.to_string(),
                    name: name.to_string(),
                })?;
        let stale = self
            .history
            .iter()
            .rev()
            .filter(|e| !e.injected && e.kind == kind && e.etype != EventType::Deleted)
            .filter(|e| same_object(&e.object, ns, name) && e.object != current)
            .map(|e| (e.rv, e.object.clone()))
            .next();
        let (rv, object) = stale.ok_or_else(|| ApiServerError::NoOlderVersion {
            kind,
            namespace: ns.to_string(),
            name: name.to_string(),
        })?;
        self.push(Entry {
            seq: 0,
            rv,
            kind,
            etype: EventType::Modified,
            object: object.clone(),
            prev: Some(object.clone()),
            injected: true,
        });
        Ok(object)
    }

    /// Reverses the stream order of the last `n` events (without changing their RVs).
    pub(crate) fn reverse_last(&mut self, n: usize) {
        let len = self.history.len();
        let n = n.min(len);
        let seqs: Vec<u64> = self.history.iter().skip(len - n).map(|e| e.seq).collect();
        let tail: Vec<Entry> = self.history.drain(len - n..).rev().collect();
        for (mut e, seq) in tail.into_iter().zip(seqs) {
            e.seq = seq;
            self.history.push_back(e);
        }
    }

    fn push(&mut self, mut entry: Entry) {
        entry.seq = self.next_seq;
        self.next_seq += 1;
        self.history.push_back(entry);
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front()
                && !old.injected
            {
                self.compacted_rv = self.compacted_rv.max(old.rv);
            }
        }
        // Snapshots older than the window can never be continued; free their items but
        // keep them, so their tokens get 410 rather than "invalid".
        let oldest = self.compacted_rv;
        for s in self.snapshots.values_mut().filter(|s| s.rv < oldest) {
            s.expired = true;
            s.items = Vec::new();
        }
    }
}

/// The page of `snapshot` starting at `offset`.
fn page(id: u64, snapshot: &Snapshot, offset: usize, limit: Option<usize>) -> Page {
    let rest = snapshot.items.get(offset..).unwrap_or_default();
    let take = limit
        .filter(|&l| l > 0)
        .unwrap_or(rest.len())
        .min(rest.len());
    let remaining = rest.len() - take;
    Page {
        rv: snapshot.rv,
        items: rest[..take].to_vec(),
        continue_token: (remaining > 0).then(|| format!("{id}-{}", offset + take)),
        remaining,
    }
}

fn same_object(obj: &Value, namespace: &str, name: &str) -> bool {
    obj.pointer("/metadata/name").and_then(Value::as_str) == Some(name)
        && obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
            == namespace
}

/// The kind and store key of an object, checking the fields the server needs.
pub(crate) fn key_of(obj: &Value) -> Result<(Kind, Key), ApiServerError> {
    let kind_str = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = Kind::from_type(kind_str, api_version).ok_or_else(|| {
        ApiServerError::UnknownKind(format!("kind {kind_str:?} apiVersion {api_version:?}"))
    })?;
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiServerError::BadObject(format!("{kind} has no metadata.name")))?;
    let namespace = if kind.namespaced() {
        // kubectl's default when an object names no namespace.
        obj.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
    } else {
        ""
    };
    Ok((kind, (kind, namespace.to_string(), name.to_string())))
}

/// Now as RFC 3339 UTC with second precision, like `metadata.creationTimestamp`.
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm), valid for any date after 1970.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::objects::{ServicePort, service};

    fn all_services() -> Filter {
        Filter {
            kind: Kind::Service,
            namespace: None,
            labels: LabelSelector::default(),
            fields: FieldSelector::default(),
        }
    }

    #[test]
    fn timestamp_shape() {
        let ts = rfc3339_now();
        assert_eq!(ts.len(), 20, "{ts}");
        assert!(ts.starts_with("20") && ts.ends_with('Z'), "{ts}");
    }

    #[test]
    fn history_window_expires_old_versions() {
        let mut store = Store::new(2);
        let mut rvs = Vec::new();
        for i in 0..4 {
            let obj = store.apply(service(
                "ns",
                &format!("s{i}"),
                "10.0.0.1",
                &[ServicePort::tcp("", 80, 80)],
            ));
            rvs.push(obj.expect("applies")["metadata"]["resourceVersion"].clone());
        }
        // 4 events, 2 retained: a watch from the RV of the 2nd object still gets 3rd and 4th.
        let from2: u64 = rvs[1].as_str().and_then(|s| s.parse().ok()).expect("rv");
        let start = store.start_after(from2).expect("retained");
        let (events, _) = store
            .events(start, from2, &all_services())
            .expect("retained");
        assert_eq!(events.len(), 2);
        let from1: u64 = rvs[0].as_str().and_then(|s| s.parse().ok()).expect("rv");
        assert!(store.start_after(from1).is_err());
    }

    #[test]
    fn continue_tokens_page_and_expire() {
        let mut store = Store::new(100);
        for i in 0..5 {
            store
                .apply(service("ns", &format!("s{i}"), "10.0.0.1", &[]))
                .expect("applies");
        }
        let first = store.list(&all_services(), Some(2));
        assert_eq!((first.items.len(), first.remaining), (2, 3));
        let token = first.continue_token.expect("more to come");
        let second = store
            .list_continue(Kind::Service, &token, Some(2))
            .expect("valid");
        assert_eq!(second.items[0]["metadata"]["name"], "s2");
        assert!(matches!(
            store.list_continue(Kind::Node, &token, None),
            Err(ContinueError::Invalid)
        ));
        assert!(matches!(
            store.list_continue(Kind::Service, "junk", None),
            Err(ContinueError::Invalid)
        ));
        store.compact();
        assert!(matches!(
            store.list_continue(Kind::Service, &token, None),
            Err(ContinueError::Expired)
        ));
    }

    #[test]
    fn apply_validates_and_stamps() {
        let mut store = Store::new(100);
        assert!(matches!(
            store.apply(json!({"kind": "Pod", "apiVersion": "v1"})),
            Err(ApiServerError::UnknownKind(_))
        ));
        let nameless = json!({"kind": "Service", "apiVersion": "v1", "metadata": {}});
        assert!(matches!(
            store.apply(nameless),
            Err(ApiServerError::BadObject(_))
        ));
        let no_ns = json!({"kind": "Service", "apiVersion": "v1", "metadata": {"name": "x"}});
        let stored = store.apply(no_ns).expect("applies");
        assert_eq!(stored["metadata"]["namespace"], "default");
        assert_eq!(stored["metadata"]["generation"], 1);
        assert!(store.delete(Kind::Service, "default", "x").is_ok());
        assert!(matches!(
            store.delete(Kind::Service, "default", "x"),
            Err(ApiServerError::NotFound { .. })
        ));
    }
}
