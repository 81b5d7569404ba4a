//! Reading Services and EndpointSlices from a directory of manifest files, and a cheap
//! fingerprint of that directory so a poller re-reads it only when something changed.
//!
//! Rules, chosen so an operator editing files by hand can never leave the proxy half-configured:
//! - Every `*.yaml`, `*.yml` and `*.json` file directly in the directory is read, in sorted
//!   file-name order. Hidden files (leading `.`) are skipped: editors' lock and swap files live
//!   there, and so do the `..data` internals of a mounted ConfigMap.
//! - A file may hold several documents (`---` in YAML, concatenated values in JSON) and `kind:
//!   List` documents (what `kubectl get -o yaml` prints).
//! - A file with any bad document is skipped as a whole and reported, so a file is never half
//!   applied; every other file still applies.
//! - The same object (kind, namespace, name) in two places: the later one in sorted order wins
//!   and a warning names both files.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fmt, fs,
    io::{self, Read},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_yaml::Value;
use thiserror::Error;

/// Largest manifest file read. Far above any real manifest (the API server caps one object at
/// about 1.5 MiB), low enough that a stray huge file cannot exhaust the proxy's memory.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Namespace of objects that do not name one, as `kubectl apply` would place them.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Which document of a file, for messages: 1-based, as a person counts them in an editor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DocRef {
    pub document: usize,
    /// The item of a `kind: List` document, 1-based.
    pub item: Option<usize>,
}

impl fmt::Display for DocRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.item {
            Some(item) => write!(f, "document {} item {}", self.document, item),
            None => write!(f, "document {}", self.document),
        }
    }
}

/// Everything that can go wrong reading manifests. Only [`ManifestError::ReadDir`] fails
/// [`load_dir`]; the others are per file and land in [`ManifestSet::errors`] or
/// [`ManifestSet::warnings`].
#[derive(Debug, Error)]
pub enum ManifestError {
    #[error(
        "cannot list manifest directory {}: {source}; check that it exists and is readable by svcproxy",
        .dir.display()
    )]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read manifest file {}: {source}; the file is skipped until it is readable", .path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "manifest file {} is larger than {limit} bytes; split it into smaller files (it is skipped)",
        .path.display()
    )]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{}: {doc}: cannot parse: {message}; the whole file is skipped until it is fixed", .path.display())]
    Parse {
        path: PathBuf,
        doc: DocRef,
        message: String,
    },
    #[error(
        "{}: {doc} is not an object with apiVersion and kind; the whole file is skipped until it is fixed",
        .path.display()
    )]
    NotAnObject { path: PathBuf, doc: DocRef },
    #[error("{}: {doc} has no `kind`; add one (the whole file is skipped until then)", .path.display())]
    MissingKind { path: PathBuf, doc: DocRef },
    #[error(
        "{}: {doc} is a {kind} without `apiVersion`; add one (the whole file is skipped until then)",
        .path.display()
    )]
    MissingApiVersion {
        path: PathBuf,
        doc: DocRef,
        kind: String,
    },
    #[error("{}: {doc}: not a valid {kind}: {message}; the whole file is skipped until it is fixed", .path.display())]
    InvalidObject {
        path: PathBuf,
        doc: DocRef,
        kind: &'static str,
        message: String,
    },
    #[error(
        "{}: {doc}: {kind} has no metadata.name; add one (the whole file is skipped until then)",
        .path.display()
    )]
    MissingName {
        path: PathBuf,
        doc: DocRef,
        kind: &'static str,
    },
    /// A warning: the object is ignored, the rest of the file applies.
    #[error(
        "{}: {doc}: {kind} of apiVersion {api_version} is not read (only discovery.k8s.io/v1); convert it",
        .path.display()
    )]
    UnsupportedVersion {
        path: PathBuf,
        doc: DocRef,
        kind: String,
        api_version: String,
    },
    /// A warning: the later definition wins.
    #[error(
        "{kind} {namespace}/{name} is defined in {} and again in {}; using the latter (later in sorted order), remove one",
        .earlier.display(), .later.display()
    )]
    DuplicateObject {
        kind: &'static str,
        namespace: String,
        name: String,
        earlier: PathBuf,
        later: PathBuf,
    },
}

/// One problem with one file.
#[derive(Debug)]
pub struct FileError {
    pub path: PathBuf,
    pub reason: ManifestError,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Every reason already names the file.
        self.reason.fmt(f)
    }
}

/// The objects of a manifest directory.
#[derive(Debug, Default)]
pub struct ManifestSet {
    /// Sorted by namespace/name; namespace defaulted to [`DEFAULT_NAMESPACE`].
    pub services: Vec<Service>,
    /// Sorted by namespace/name; namespace defaulted to [`DEFAULT_NAMESPACE`].
    pub slices: Vec<EndpointSlice>,
    /// Documents of other kinds, counted by kind (Namespace, Deployment, ...).
    pub ignored: BTreeMap<String, usize>,
    /// Files applied (read without error).
    pub files_applied: usize,
    /// Files skipped as a whole, with the reason.
    pub errors: Vec<FileError>,
    /// Problems that did not skip a file (duplicate objects, unsupported versions).
    pub warnings: Vec<FileError>,
    /// The directory as it was just before it was read: compare a later
    /// [`DirFingerprint::of`] with this to know whether to read again.
    pub fingerprint: DirFingerprint,
}

/// Reads every manifest file of `dir`. Fails only if the directory itself cannot be listed; a
/// bad file is reported in [`ManifestSet::errors`] and skipped whole.
pub fn load_dir(dir: &Path) -> Result<ManifestSet, ManifestError> {
    let names = list_manifest_files(dir)?;
    // Fingerprint first: a change made while we read shows up as a difference on the next poll
    // instead of being folded into a fingerprint that claims we saw it.
    let mut set = ManifestSet {
        fingerprint: DirFingerprint::of_files(dir, &names, SystemTime::now()),
        ..ManifestSet::default()
    };
    let mut services = BTreeMap::new();
    let mut slices = BTreeMap::new();
    for name in &names {
        let path = dir.join(name);
        let content = match read_text(&path).and_then(|text| parse_file(&path, &text)) {
            Ok(content) => content,
            Err(reason) => {
                set.errors.push(FileError { path, reason });
                continue;
            }
        };
        set.files_applied += 1;
        for kind in content.ignored {
            *set.ignored.entry(kind).or_default() += 1;
        }
        for reason in content.warnings {
            set.warnings.push(FileError {
                path: path.clone(),
                reason,
            });
        }
        for object in content.objects {
            let duplicate = match object {
                Object::Service(svc) => {
                    insert(&mut services, "Service", *svc, &path, |s| &s.metadata)
                }
                Object::Slice(slice) => {
                    insert(&mut slices, "EndpointSlice", *slice, &path, |s| &s.metadata)
                }
            };
            if let Some(reason) = duplicate {
                set.warnings.push(FileError {
                    path: path.clone(),
                    reason,
                });
            }
        }
    }
    set.services = services.into_values().map(|(svc, _)| svc).collect();
    set.slices = slices.into_values().map(|(slice, _)| slice).collect();
    Ok(set)
}

type ByName<T> = BTreeMap<(String, String), (T, PathBuf)>;

/// Inserts `object` (whose namespace and name [`normalize_meta`] has set), replacing and
/// reporting an earlier definition.
fn insert<T>(
    map: &mut ByName<T>,
    kind: &'static str,
    object: T,
    path: &Path,
    meta: impl Fn(&T) -> &ObjectMeta,
) -> Option<ManifestError> {
    let m = meta(&object);
    let key = (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    );
    let (namespace, name) = key.clone();
    let (_, earlier) = map.insert(key, (object, path.to_path_buf()))?;
    Some(ManifestError::DuplicateObject {
        kind,
        namespace,
        name,
        earlier,
        later: path.to_path_buf(),
    })
}

/// File names (not paths) of the manifest files of `dir`, sorted.
fn list_manifest_files(dir: &Path) -> Result<Vec<OsString>, ManifestError> {
    let read_dir_error = |source| ManifestError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_dir_error)? {
        let entry = entry.map_err(read_dir_error)?;
        let name = entry.file_name();
        // `file_type` does not follow symlinks: a ConfigMap's files are symlinks and must stay
        // in; a real directory named `x.yaml` is not a manifest.
        if is_manifest_name(&name) && !entry.file_type().is_ok_and(|t| t.is_dir()) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn is_manifest_name(name: &OsString) -> bool {
    if name.as_encoded_bytes().first() == Some(&b'.') {
        return false;
    }
    Path::new(name)
        .extension()
        .is_some_and(|ext| ext == "yaml" || ext == "yml" || ext == "json")
}

fn read_text(path: &Path) -> Result<String, ManifestError> {
    let read_error = |source| ManifestError::ReadFile {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::open(path).map_err(read_error)?;
    let mut text = String::new();
    // Read at most one byte past the limit, so a file that grows while we read is still caught.
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(ManifestError::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_FILE_BYTES,
        });
    }
    Ok(text)
}

enum Object {
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
}

#[derive(Default)]
struct FileContent {
    objects: Vec<Object>,
    /// Kind of each ignored document.
    ignored: Vec<String>,
    warnings: Vec<ManifestError>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Syntax {
    Yaml,
    Json,
}

/// The typed kinds we read, for re-parsing a failed document with positions.
#[derive(Clone, Copy)]
enum TypedKind {
    Service,
    EndpointSlice,
}

fn parse_file(path: &Path, text: &str) -> Result<FileContent, ManifestError> {
    // JSON goes through serde_json rather than the YAML parser: YAML 1.1 (libyaml) trips on
    // some valid JSON (tabs), and kubectl also decodes JSON as JSON.
    let syntax = if path.extension().is_some_and(|ext| ext == "json") {
        Syntax::Json
    } else {
        Syntax::Yaml
    };
    let parse_error = |index: usize, message: String| ManifestError::Parse {
        path: path.to_path_buf(),
        doc: DocRef {
            document: index + 1,
            item: None,
        },
        message,
    };
    let mut documents = Vec::new();
    match syntax {
        Syntax::Yaml => {
            for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
                // Return at the first error: after a syntax error the document iterator yields
                // that same error forever.
                let value =
                    Value::deserialize(document).map_err(|e| parse_error(index, e.to_string()))?;
                documents.push(value);
            }
        }
        Syntax::Json => {
            let text = text.strip_prefix('\u{feff}').unwrap_or(text);
            let stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
            for (index, value) in stream.enumerate() {
                let value = value.map_err(|e| parse_error(index, e.to_string()))?;
                // One representation for both syntaxes, so the rules below exist once.
                let value =
                    serde_yaml::to_value(value).map_err(|e| parse_error(index, e.to_string()))?;
                documents.push(value);
            }
        }
    }
    let mut content = FileContent::default();
    for (index, value) in documents.into_iter().enumerate() {
        let doc = DocRef {
            document: index + 1,
            item: None,
        };
        let locate = |kind| located_message(syntax, text, index, kind);
        classify(path, doc, value, &mut content, &locate)?;
    }
    Ok(content)
}

/// Sorts one document into `content`. `locate` re-parses the document straight into its type
/// to get serde's message with line and column, which a conversion from [`Value`] lacks; it is
/// only called on the (rare) failure path, so the common path parses each file once.
fn classify(
    path: &Path,
    doc: DocRef,
    value: Value,
    content: &mut FileContent,
    locate: &dyn Fn(TypedKind) -> Option<String>,
) -> Result<(), ManifestError> {
    let map = match value {
        // An empty document (`---` with nothing after it, or only comments).
        Value::Null => return Ok(()),
        Value::Mapping(map) => map,
        _ => {
            return Err(ManifestError::NotAnObject {
                path: path.to_path_buf(),
                doc,
            });
        }
    };
    let kind = match map.get("kind").and_then(Value::as_str) {
        Some(kind) if !kind.is_empty() => kind.to_owned(),
        _ => {
            return Err(ManifestError::MissingKind {
                path: path.to_path_buf(),
                doc,
            });
        }
    };
    let api_version = map.get("apiVersion").and_then(Value::as_str);
    match (api_version, kind.as_str()) {
        (Some("v1"), "Service") => {
            let mut svc: Service = typed(path, doc, map, TypedKind::Service, locate)?;
            normalize_meta(&mut svc.metadata, path, doc, "Service")?;
            content.objects.push(Object::Service(Box::new(svc)));
        }
        (Some("discovery.k8s.io/v1"), "EndpointSlice") => {
            let mut slice: EndpointSlice = typed(path, doc, map, TypedKind::EndpointSlice, locate)?;
            normalize_meta(&mut slice.metadata, path, doc, "EndpointSlice")?;
            content.objects.push(Object::Slice(Box::new(slice)));
        }
        (Some("v1"), "List") if doc.item.is_none() => {
            let items = match map.get("items") {
                None | Some(Value::Null) => return Ok(()),
                Some(Value::Sequence(items)) => items.clone(),
                Some(_) => {
                    return Err(ManifestError::InvalidObject {
                        path: path.to_path_buf(),
                        doc,
                        kind: "List",
                        message: "`items` is not a list".to_owned(),
                    });
                }
            };
            for (index, item) in items.into_iter().enumerate() {
                let item_doc = DocRef {
                    item: Some(index + 1),
                    ..doc
                };
                // Items have no position of their own to re-parse; their message comes without
                // line and column but names the item.
                classify(path, item_doc, item, content, &|_| None)?;
            }
        }
        (None, "Service" | "EndpointSlice") => {
            return Err(ManifestError::MissingApiVersion {
                path: path.to_path_buf(),
                doc,
                kind,
            });
        }
        (Some(version), "EndpointSlice") if version.starts_with("discovery.k8s.io/") => {
            content.warnings.push(ManifestError::UnsupportedVersion {
                path: path.to_path_buf(),
                doc,
                kind: kind.clone(),
                api_version: version.to_owned(),
            });
            content.ignored.push(kind);
        }
        // Other kinds, and same-named kinds of other API groups (a Knative `Service`).
        _ => content.ignored.push(kind),
    }
    Ok(())
}

fn typed<T: DeserializeOwned>(
    path: &Path,
    doc: DocRef,
    map: serde_yaml::Mapping,
    kind: TypedKind,
    locate: &dyn Fn(TypedKind) -> Option<String>,
) -> Result<T, ManifestError> {
    serde_yaml::from_value(Value::Mapping(map)).map_err(|e| ManifestError::InvalidObject {
        path: path.to_path_buf(),
        doc,
        kind: match kind {
            TypedKind::Service => "Service",
            TypedKind::EndpointSlice => "EndpointSlice",
        },
        message: locate(kind).unwrap_or_else(|| e.to_string()),
    })
}

/// serde's message for document `index` of `text` deserialized straight into `kind`, which
/// carries the line and column; `None` if that somehow succeeds.
fn located_message(syntax: Syntax, text: &str, index: usize, kind: TypedKind) -> Option<String> {
    fn yaml<T: DeserializeOwned>(text: &str, index: usize) -> Option<String> {
        let document = serde_yaml::Deserializer::from_str(text).nth(index)?;
        T::deserialize(document).err().map(|e| e.to_string())
    }
    fn json<T: DeserializeOwned>(text: &str, index: usize) -> Option<String> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut de = serde_json::Deserializer::from_str(text);
        for _ in 0..index {
            serde::de::IgnoredAny::deserialize(&mut de).ok()?;
        }
        T::deserialize(&mut de).err().map(|e| e.to_string())
    }
    match (syntax, kind) {
        (Syntax::Yaml, TypedKind::Service) => yaml::<Service>(text, index),
        (Syntax::Yaml, TypedKind::EndpointSlice) => yaml::<EndpointSlice>(text, index),
        (Syntax::Json, TypedKind::Service) => json::<Service>(text, index),
        (Syntax::Json, TypedKind::EndpointSlice) => json::<EndpointSlice>(text, index),
    }
}

/// Requires a name and defaults the namespace, so consumers can join on namespace without
/// guessing what a missing one means.
fn normalize_meta(
    meta: &mut ObjectMeta,
    path: &Path,
    doc: DocRef,
    kind: &'static str,
) -> Result<(), ManifestError> {
    if meta.name.as_deref().is_none_or(str::is_empty) {
        return Err(ManifestError::MissingName {
            path: path.to_path_buf(),
            doc,
            kind,
        });
    }
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some(DEFAULT_NAMESPACE.to_owned());
    }
    Ok(())
}

/// A cheap summary of a manifest directory (name, size, modification time and identity of each
/// manifest file), so a poller can re-read only when something changed.
///
/// Why polling rather than inotify: it works on every filesystem, including bind mounts, network
/// filesystems and the atomic symlink swap a mounted ConfigMap does on update (which inotify on
/// the files themselves misses); and a poll every 200 ms is a `readdir` plus a few `stat`s, which
/// costs nothing next to the proxy's other work.
///
/// Symlinks are followed, so a ConfigMap swap shows up as a new inode and times. A file changed
/// within [`DirFingerprint::SETTLE`] of the snapshot makes the fingerprint *unsettled*: unequal
/// to every other fingerprint, so the next poll reads again. That closes the gap of two writes
/// of the same size within one timestamp tick (coarse on some filesystems), the first of which
/// we might have read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirFingerprint {
    files: Vec<FileStamp>,
    /// A value no other fingerprint carries, set when some file is too fresh to trust.
    unsettled: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    name: OsString,
    /// `None` when the file cannot be stat'ed (a dangling symlink): it is still part of the set,
    /// so its appearing or being fixed is a change.
    stat: Option<StatStamp>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StatStamp {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    dev: u64,
    ino: u64,
}

impl DirFingerprint {
    /// Files modified more recently than this are not trusted to be finished.
    pub const SETTLE: Duration = Duration::from_secs(2);

    /// Fingerprints the same file set [`load_dir`] reads.
    pub fn of(dir: &Path) -> Result<Self, ManifestError> {
        let names = list_manifest_files(dir)?;
        Ok(Self::of_files(dir, &names, SystemTime::now()))
    }

    /// Whether every file was older than [`Self::SETTLE`] when this was taken.
    pub fn is_settled(&self) -> bool {
        self.unsettled.is_none()
    }

    fn of_files(dir: &Path, names: &[OsString], now: SystemTime) -> Self {
        let mut unsettled = false;
        let files = names
            .iter()
            .map(|name| {
                let stat = fs::metadata(dir.join(name)).ok().map(|m| {
                    unsettled |= is_fresh(&m, now);
                    StatStamp {
                        size: m.len(),
                        mtime: (m.mtime(), m.mtime_nsec()),
                        ctime: (m.ctime(), m.ctime_nsec()),
                        dev: m.dev(),
                        ino: m.ino(),
                    }
                });
                FileStamp {
                    name: name.clone(),
                    stat,
                }
            })
            .collect();
        static NEXT_NONCE: AtomicU64 = AtomicU64::new(1);
        Self {
            files,
            unsettled: unsettled.then(|| NEXT_NONCE.fetch_add(1, Ordering::Relaxed)),
        }
    }
}

/// Modified within [`DirFingerprint::SETTLE`] of `now`, either side: a timestamp slightly in
/// the future is clock skew, not age. Only the modification time counts: content writes set it,
/// and the other ways a file changes (rename, symlink swap) change its inode, which the stamp
/// holds.
fn is_fresh(meta: &fs::Metadata, now: SystemTime) -> bool {
    meta.modified().is_ok_and(|t| match now.duration_since(t) {
        Ok(age) => age < DirFingerprint::SETTLE,
        Err(ahead) => ahead.duration() < DirFingerprint::SETTLE,
    })
}

#[cfg(test)]
mod tests {
    use std::{
        fs::File,
        sync::atomic::{AtomicU64, Ordering},
    };

    use super::*;

    /// A scratch directory removed on drop.
    struct ScratchDir(PathBuf);

    impl ScratchDir {
        fn new() -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "svcproxy-manifest-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
            Self(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            path
        }

        /// Backdates every file so fingerprints are settled and comparable.
        fn age_all(&self) {
            let old = SystemTime::now() - Duration::from_secs(3600);
            for entry in fs::read_dir(&self.0).unwrap_or_else(|e| panic!("list: {e}")) {
                let path = entry.unwrap_or_else(|e| panic!("entry: {e}")).path();
                set_mtime(&path, old);
            }
        }

        fn load(&self) -> ManifestSet {
            load_dir(&self.0).unwrap_or_else(|e| panic!("load_dir: {e}"))
        }

        fn fingerprint(&self) -> DirFingerprint {
            DirFingerprint::of(&self.0).unwrap_or_else(|e| panic!("fingerprint: {e}"))
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn set_mtime(path: &Path, t: SystemTime) {
        File::options()
            .write(true)
            .open(path)
            .and_then(|f| f.set_modified(t))
            .unwrap_or_else(|e| panic!("set mtime of {}: {e}", path.display()));
    }

    fn service_yaml(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: dev\n\
             spec:\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  ports:\n  - port: 80\n"
        )
    }

    fn slice_yaml(name: &str, service: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
             namespace: dev\n  labels:\n    kubernetes.io/service-name: {service}\n\
             addressType: IPv4\nports:\n- port: 8080\nendpoints:\n- addresses: [10.1.0.1]\n"
        )
    }

    fn names(set: &ManifestSet) -> (Vec<String>, Vec<String>) {
        let name = |m: &ObjectMeta| {
            format!(
                "{}/{}",
                m.namespace.as_deref().unwrap_or("?"),
                m.name.as_deref().unwrap_or("?")
            )
        };
        (
            set.services.iter().map(|s| name(&s.metadata)).collect(),
            set.slices.iter().map(|s| name(&s.metadata)).collect(),
        )
    }

    #[test]
    fn multi_document_file_yields_services_and_slices_and_counts_other_kinds() {
        let dir = ScratchDir::new();
        let text = [
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: dev\n".to_owned(),
            service_yaml("web", "10.96.0.10"),
            String::new(), // empty document
            "# only a comment\n".to_owned(),
            slice_yaml("web-abc", "web"),
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n".to_owned(),
            "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: kn\n".to_owned(),
        ]
        .join("---\n");
        dir.write("all.yaml", &text);
        dir.write("notes.txt", "not a manifest");
        dir.write(".#all.yaml", "editor lock file: garbage");

        let set = dir.load();
        assert!(set.errors.is_empty(), "errors: {:?}", set.errors);
        assert!(set.warnings.is_empty(), "warnings: {:?}", set.warnings);
        assert_eq!(
            names(&set),
            (vec!["dev/web".to_owned()], vec!["dev/web-abc".to_owned()])
        );
        let ignored: Vec<_> = set.ignored.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        assert_eq!(
            ignored,
            [("Deployment", 1), ("Namespace", 1), ("Service", 1)]
        );
        assert_eq!(set.files_applied, 1);
    }

    #[test]
    fn json_files_yml_files_and_lists_are_read_and_namespace_defaults() {
        let dir = ScratchDir::new();
        dir.write(
            "a.json",
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"j"},
                "spec":{"clusterIPs":["10.96.0.1"],"ports":[{"port":53,"protocol":"UDP"}]}}
               {"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}}"#,
        );
        let list = "apiVersion: v1\nkind: List\nitems:\n\
            - apiVersion: v1\n  kind: Service\n  metadata: {name: l, namespace: dev}\n  \
              spec: {clusterIPs: [10.96.0.2], ports: [{port: 80}]}\n\
            - apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  \
              metadata: {name: l-1, namespace: dev}\n  addressType: IPv4\n  endpoints: []\n";
        dir.write("b.yml", list);
        let set = dir.load();
        assert!(set.errors.is_empty(), "errors: {:?}", set.errors);
        assert_eq!(
            names(&set),
            (
                vec!["default/j".to_owned(), "dev/l".to_owned()],
                vec!["dev/l-1".to_owned()]
            )
        );
        assert_eq!(set.ignored.get("ConfigMap"), Some(&1));
    }

    #[test]
    fn bad_files_are_reported_by_name_and_skipped_whole_while_others_apply() {
        struct Case {
            what: &'static str,
            file: &'static str,
            text: String,
            /// Substrings the error message must hold.
            expect: &'static [&'static str],
        }
        let good_then = |bad: &str| format!("{}---\n{bad}", service_yaml("half", "10.96.9.9"));
        let cases = [
            Case {
                what: "YAML syntax error",
                file: "syntax.yaml",
                text: good_then("kind: Service\n  bad: [unclosed\n"),
                expect: &["syntax.yaml", "document 2", "line"],
            },
            Case {
                what: "Service that does not deserialize",
                file: "port.yaml",
                text: good_then(
                    "apiVersion: v1\nkind: Service\nmetadata:\n  name: p\nspec:\n  ports:\n  - port: eighty\n",
                ),
                expect: &[
                    "port.yaml",
                    "document 2",
                    "not a valid Service",
                    "expected i32",
                    "line 18 column", // counted from the top of the file
                ],
            },
            Case {
                what: "EndpointSlice that does not deserialize",
                file: "slice.yaml",
                text: good_then(
                    "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s\naddressType: IPv4\nendpoints: 7\n",
                ),
                expect: &["slice.yaml", "not a valid EndpointSlice", "line 17"],
            },
            Case {
                what: "document without kind",
                file: "nokind.yaml",
                text: good_then("apiVersion: v1\nmetadata:\n  name: x\n"),
                expect: &["nokind.yaml", "document 2", "no `kind`"],
            },
            Case {
                what: "scalar document",
                file: "scalar.yaml",
                text: good_then("just a string\n"),
                expect: &["scalar.yaml", "document 2", "not an object"],
            },
            Case {
                what: "Service without apiVersion",
                file: "noversion.yaml",
                text: good_then("kind: Service\nmetadata:\n  name: x\n"),
                expect: &["noversion.yaml", "without `apiVersion`"],
            },
            Case {
                what: "Service without name",
                file: "noname.yaml",
                text: good_then("apiVersion: v1\nkind: Service\nmetadata: {}\n"),
                expect: &["noname.yaml", "no metadata.name"],
            },
            Case {
                what: "bad List item",
                file: "list.yaml",
                text: good_then(
                    "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: x}\n  spec: {ports: [{port: x}]}\n",
                ),
                expect: &["list.yaml", "document 2 item 1", "not a valid Service"],
            },
            Case {
                what: "JSON syntax error",
                file: "broken.json",
                text: r#"{"apiVersion": "v1", "kind": "Service",, }"#.to_owned(),
                expect: &["broken.json", "document 1", "line 1 column"],
            },
            Case {
                what: "JSON Service that does not deserialize",
                file: "typed.json",
                text: "{\"apiVersion\":\"v1\",\"kind\":\"Namespace\"}\n{\"apiVersion\":\"v1\",\"kind\":\"Service\",\n\"metadata\":{\"name\":\"t\"},\n\"spec\":{\"ports\":[{\"port\":\"x\"}]}}".to_owned(),
                expect: &["typed.json", "document 2", "line 4 column"],
            },
            Case {
                what: "not UTF-8",
                file: "binary.yaml",
                text: String::from_utf8_lossy(b"\xff\xfe").into_owned(), // replaced below
                expect: &["binary.yaml", "cannot read"],
            },
        ];
        for case in cases {
            let dir = ScratchDir::new();
            dir.write("a-good.yaml", &service_yaml("good", "10.96.0.1"));
            let path = dir.write(case.file, &case.text);
            if case.file == "binary.yaml" {
                fs::write(&path, b"\xff\xfe\x00")
                    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            }
            dir.write("z-good.yaml", &slice_yaml("good-1", "good"));
            let set = dir.load();
            assert_eq!(
                set.errors.len(),
                1,
                "{}: errors {:?}",
                case.what,
                set.errors
            );
            let error = &set.errors[0];
            assert_eq!(error.path, path, "{}", case.what);
            let message = error.to_string();
            for want in case.expect {
                assert!(
                    message.contains(want),
                    "{}: message {message:?} lacks {want:?}",
                    case.what
                );
            }
            // Nothing of the bad file applied (not even its good first document); both other
            // files did.
            assert_eq!(
                names(&set),
                (vec!["dev/good".to_owned()], vec!["dev/good-1".to_owned()]),
                "{}",
                case.what
            );
            assert_eq!(set.files_applied, 2, "{}", case.what);
        }
    }

    #[test]
    fn duplicate_object_last_file_wins_with_a_warning_naming_both() {
        let dir = ScratchDir::new();
        let first = dir.write("10-web.yaml", &service_yaml("web", "10.96.0.1"));
        let second = dir.write("20-web.yaml", &service_yaml("web", "10.96.0.2"));
        dir.write("30-slice.yaml", &slice_yaml("web-1", "web"));
        let set = dir.load();
        assert!(set.errors.is_empty(), "errors: {:?}", set.errors);
        assert_eq!(set.services.len(), 1);
        let ip = set.services[0]
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.as_deref());
        assert_eq!(ip, Some("10.96.0.2"), "the later file wins");
        assert_eq!(set.warnings.len(), 1, "warnings: {:?}", set.warnings);
        let warning = &set.warnings[0];
        assert_eq!(warning.path, second);
        let message = warning.to_string();
        for want in [
            "Service dev/web",
            &*first.to_string_lossy(),
            &*second.to_string_lossy(),
        ] {
            assert!(message.contains(want), "{message:?} lacks {want:?}");
        }
    }

    #[test]
    fn old_endpointslice_version_is_ignored_with_a_warning() {
        let dir = ScratchDir::new();
        dir.write(
            "old.yaml",
            &slice_yaml("s", "web").replace("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"),
        );
        let set = dir.load();
        assert!(set.errors.is_empty() && set.slices.is_empty());
        assert_eq!(set.warnings.len(), 1);
        assert!(set.warnings[0].to_string().contains("v1beta1"));
    }

    #[test]
    fn missing_directory_is_the_only_hard_error() {
        let dir = ScratchDir::new();
        let missing = dir.0.join("nope");
        let error = load_dir(&missing).err().map(|e| e.to_string());
        assert!(
            error.as_deref().is_some_and(|m| m.contains("nope")),
            "{error:?}"
        );
    }

    #[test]
    fn configmap_style_symlink_swap_is_seen_and_read() {
        use std::os::unix::fs::symlink;
        // The layout the kubelet gives a mounted ConfigMap: name -> ..data/name, ..data -> a
        // timestamped directory, swapped atomically on update.
        let dir = ScratchDir::new();
        let old = dir.0.join("..2024_01");
        let new = dir.0.join("..2024_02");
        for (d, ip) in [(&old, "10.96.0.1"), (&new, "10.96.0.2")] {
            fs::create_dir(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
            let file = d.join("svc.yaml");
            fs::write(&file, service_yaml("web", ip))
                .unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
            // Same size and the same mtime in both versions: only the inode tells them apart.
            set_mtime(
                &file,
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            );
        }
        let link = |target: &Path, name: &str| {
            symlink(target, dir.0.join(name)).unwrap_or_else(|e| panic!("symlink {name}: {e}"));
        };
        link(Path::new("..2024_01"), "..data");
        link(Path::new("..data/svc.yaml"), "svc.yaml");
        let before = dir.load();
        let ip = |set: &ManifestSet| {
            set.services
                .first()
                .and_then(|s| s.spec.as_ref()?.cluster_ip.clone())
        };
        assert_eq!(ip(&before), Some("10.96.0.1".to_owned()));

        link(Path::new("..2024_02"), "..data_tmp");
        fs::rename(dir.0.join("..data_tmp"), dir.0.join("..data"))
            .unwrap_or_else(|e| panic!("swap ..data: {e}"));
        assert_ne!(
            before.fingerprint,
            dir.fingerprint(),
            "the swap is a change"
        );
        assert_eq!(ip(&dir.load()), Some("10.96.0.2".to_owned()));
    }

    #[test]
    fn fingerprint_changes_on_edit_add_remove_and_stays_equal_otherwise() {
        let dir = ScratchDir::new();
        let a = dir.write("a.yaml", &service_yaml("a", "10.96.0.1"));
        dir.write("b.yaml", &service_yaml("b", "10.96.0.2"));
        dir.age_all();
        let base = dir.fingerprint();
        assert!(base.is_settled());
        assert_eq!(base, dir.fingerprint(), "nothing changed");
        assert_eq!(base, dir.load().fingerprint, "load_dir reports the same");

        // Not manifests: no change.
        dir.write("README.md", "hello");
        dir.write(".a.yaml.swp", "swap");
        assert_eq!(base, dir.fingerprint(), "non-manifest files are ignored");

        type Step = (&'static str, Box<dyn Fn(&ScratchDir)>);
        let steps: Vec<Step> = vec![
            (
                "edit keeping the size, older mtime",
                Box::new(|d: &ScratchDir| {
                    let p = d.write("a.yaml", &service_yaml("a", "10.96.0.9"));
                    set_mtime(&p, SystemTime::now() - Duration::from_secs(7200));
                }),
            ),
            (
                "edit changing the size",
                Box::new(|d: &ScratchDir| {
                    d.write("a.yaml", &service_yaml("a", "10.96.0.99"));
                    d.age_all();
                }),
            ),
            (
                "add",
                Box::new(|d: &ScratchDir| {
                    d.write("c.json", "{}");
                    d.age_all();
                }),
            ),
            (
                "remove",
                Box::new(|d: &ScratchDir| {
                    let _ = fs::remove_file(d.0.join("b.yaml"));
                }),
            ),
        ];
        let mut last = base;
        for (what, step) in steps {
            step(&dir);
            let now = dir.fingerprint();
            assert_ne!(last, now, "{what}");
            assert_eq!(now, dir.fingerprint(), "{what}: stable afterwards");
            last = now;
        }

        // A file written just now is not trusted: each snapshot differs until it settles.
        let _ = a;
        dir.write("a.yaml", "fresh");
        let fresh = dir.fingerprint();
        assert!(!fresh.is_settled());
        assert_ne!(
            fresh,
            dir.fingerprint(),
            "unsettled fingerprints never match"
        );
        dir.age_all();
        assert!(dir.fingerprint().is_settled());
    }
}
