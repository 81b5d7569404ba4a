//! The stand-in API server's HTTP/1.1 side: reading requests off one connection, routing
//! them to get/list/watch, and writing JSON bodies or chunked watch streams the way
//! kube-apiserver does (status codes, `Status` objects, event framing).

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::TcpStream,
    sync::{Arc, MutexGuard},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{
    RecordedRequest, Shared, State,
    objects::Kind,
    selector::{FieldSelector, LabelSelector},
    store::{ContinueError, EventType, Filter},
};

/// The longest request line or header line read; longer means a broken client.
const MAX_LINE: u64 = 16 * 1024;
/// The most header lines read per request.
const MAX_HEADERS: usize = 100;
/// A watch without `timeoutSeconds` ends after this, like kube-apiserver's default
/// (which picks 30–60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// The longest a waiting thread sleeps before it looks at the clock and flags again; a
/// safety net, since every change also signals the condition variable.
const MAX_WAIT: Duration = Duration::from_millis(500);

/// A parsed request.
struct Request {
    method: String,
    target: String,
    path: String,
    query: Vec<(String, String)>,
    authorization: Option<String>,
    close: bool,
}

impl Request {
    fn param(&self, name: &str) -> Option<&str> {
        // Clients never repeat these parameters; if one does, the last occurrence wins.
        self.query
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.param(name), Some("true" | "1"))
    }
}

/// How a response left the connection.
enum After {
    KeepAlive,
    Close,
}

/// Serves requests on one connection until the client closes it, the server drops it
/// (fault injection, outage, shutdown) or an I/O error.
pub(crate) fn serve_connection(shared: &Arc<Shared>, stream: TcpStream, generation: u64) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    loop {
        let request = match read_request(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                // A malformed request gets a 400 and the connection closes, like Go's server.
                if e.kind() == io::ErrorKind::InvalidData {
                    let body = status(400, "BadRequest", &e.to_string());
                    let _ = write_json(&mut writer, 400, &body, true);
                }
                return;
            }
        };
        {
            let mut state = shared.lock();
            state.requests.push(RecordedRequest {
                method: request.method.clone(),
                target: request.target.clone(),
                path: request.path.clone(),
                query: request.query.clone(),
            });
            // A stalled server has accepted the request but does not answer it until the
            // stall ends (or the connection is dropped).
            if wait_unstalled(shared, state, generation).is_none() {
                return;
            }
        }
        match handle(shared, &mut writer, &request, generation) {
            Ok(After::KeepAlive) if !request.close => {}
            _ => return,
        }
    }
}

/// Waits while a stall is on. `None` if the connection was dropped or the server stops
/// meanwhile, so the caller closes without answering.
fn wait_unstalled<'a>(
    shared: &'a Shared,
    mut state: MutexGuard<'a, State>,
    generation: u64,
) -> Option<MutexGuard<'a, State>> {
    loop {
        if state.shutdown || state.drop_generation != generation {
            return None;
        }
        let now = Instant::now();
        match state.faults.stall_until {
            Some(until) if now < until => state = shared.wait(state, (until - now).min(MAX_WAIT)),
            _ => return Some(state),
        }
    }
}

fn read_line(reader: &mut BufReader<TcpStream>, line: &mut String) -> io::Result<usize> {
    line.clear();
    let n = reader.by_ref().take(MAX_LINE).read_line(line)?;
    if n as u64 == MAX_LINE && !line.ends_with('\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "request line or header too long",
        ));
    }
    Ok(n)
}

/// Reads one request (discarding any body). `None` on a clean close between requests.
fn read_request(reader: &mut BufReader<TcpStream>) -> io::Result<Option<Request>> {
    let mut line = String::new();
    // Tolerate blank lines before a request line (RFC 9112 section 2.2).
    loop {
        if read_line(reader, &mut line)? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut parts = line.split_whitespace();
    let (method, target, version) = match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v)) => (m.to_string(), t.to_string(), v.to_string()),
        _ => return Err(bad("malformed request line")),
    };
    let mut content_length = 0u64;
    let mut authorization = None;
    let mut close = version == "HTTP/1.0";
    for _ in 0..=MAX_HEADERS {
        if read_line(reader, &mut line)? == 0 {
            return Err(bad("connection closed inside the request headers"));
        }
        let header = line.trim_end();
        if header.is_empty() {
            let mut body = reader.by_ref().take(content_length);
            io::copy(&mut body, &mut io::sink())?;
            let (path, raw_query) = target.split_once('?').unwrap_or((target.as_str(), ""));
            return Ok(Some(Request {
                path: percent_decode(path),
                query: parse_query(raw_query),
                method,
                target,
                authorization,
                close,
            }));
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(bad("malformed header"));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                content_length = value.parse().map_err(|_| bad("bad Content-Length"))?
            }
            "transfer-encoding" => {
                return Err(bad(
                    "request bodies with Transfer-Encoding are not supported",
                ));
            }
            "authorization" => authorization = Some(value.to_string()),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    Err(bad("too many headers"))
}

fn parse_query(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                percent_decode(&k.replace('+', " ")),
                percent_decode(&v.replace('+', " ")),
            )
        })
        .collect()
}

/// `%XX` decoding; invalid escapes are kept literally, as Go's lenient paths do.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            // Two hex digits make at most 0xff, so the cast is lossless.
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `Status` object as the API server returns for failures.
pub(crate) fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        422 => "Unprocessable Entity",
        500 => "Internal Server Error",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

fn write_json(w: &mut TcpStream, code: u16, body: &Value, close: bool) -> io::Result<After> {
    let body = body.to_string();
    let connection = if close { "close" } else { "keep-alive" };
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
        reason_phrase(code),
        body.len(),
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    w.write_all(&out)?;
    w.flush()?;
    Ok(if close {
        After::Close
    } else {
        After::KeepAlive
    })
}

/// What a path names.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

/// Maps `/api/v1/...` and `/apis/<group>/<version>/...` paths to a kind.
fn route(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group_version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ((*v).to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return None,
    };
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.api_version() == group_version && k.plural() == plural)?;
    // A namespaced kind's single object needs a namespace; a cluster-scoped kind has none.
    if (kind.namespaced() && name.is_some() && namespace.is_none())
        || (!kind.namespaced() && namespace.is_some())
    {
        return None;
    }
    Some(Target {
        kind,
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
    })
}

fn handle(
    shared: &Arc<Shared>,
    w: &mut TcpStream,
    req: &Request,
    generation: u64,
) -> io::Result<After> {
    if let Some(token) = &shared.options.token
        && req.authorization.as_deref() != Some(format!("Bearer {token}").as_str())
    {
        return write_json(
            w,
            401,
            &status(401, "Unauthorized", "Unauthorized"),
            req.close,
        );
    }
    match req.path.as_str() {
        "/version" => {
            let version = json!({
                "major": "1", "minor": "34", "gitVersion": "v1.34.0",
                "platform": "linux/amd64", "goVersion": "go1.24.0", "compiler": "gc",
            });
            return write_json(w, 200, &version, req.close);
        }
        "/healthz" | "/livez" | "/readyz" => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok";
            w.write_all(head.as_bytes())?;
            return Ok(After::KeepAlive);
        }
        _ => {}
    }
    let Some(target) = route(&req.path) else {
        let msg = "the server could not find the requested resource";
        return write_json(w, 404, &status(404, "NotFound", msg), req.close);
    };
    if req.method != "GET" {
        let msg = format!(
            "{} is not supported by this test server; mutate through ApiServer",
            req.method
        );
        return write_json(w, 405, &status(405, "MethodNotAllowed", &msg), req.close);
    }
    let labels = LabelSelector::parse(req.param("labelSelector").unwrap_or(""));
    let mut field_text = req.param("fieldSelector").unwrap_or("").to_string();
    if req.flag("watch")
        && let Some(name) = &target.name
    {
        // The deprecated watch-one-object form is a watch with a name field selector.
        field_text = format!("{field_text},metadata.name={name}");
    }
    let fields = FieldSelector::parse(&field_text);
    let (labels, fields) = match (labels, fields) {
        (Ok(l), Ok(f)) => (l, f),
        (Err(e), _) | (_, Err(e)) => {
            return write_json(
                w,
                400,
                &status(400, "BadRequest", &e.to_string()),
                req.close,
            );
        }
    };
    let filter = Filter {
        kind: target.kind,
        namespace: target.namespace.clone(),
        labels,
        fields,
    };
    if req.flag("watch") {
        watch(shared, w, req, &filter, generation)
    } else if let Some(name) = &target.name {
        get(shared, w, req, &target, name)
    } else {
        list(shared, w, req, &filter)
    }
}

fn get(
    shared: &Shared,
    w: &mut TcpStream,
    req: &Request,
    target: &Target,
    name: &str,
) -> io::Result<After> {
    let obj = shared
        .lock()
        .store
        .get(target.kind, target.namespace.as_deref().unwrap_or(""), name)
        .cloned();
    match obj {
        Some(obj) => write_json(w, 200, &obj, req.close),
        None => {
            let msg = format!("{} \"{name}\" not found", target.kind.plural());
            let mut body = status(404, "NotFound", &msg);
            body["details"] = json!({"name": name, "kind": target.kind.plural()});
            write_json(w, 404, &body, req.close)
        }
    }
}

fn parse_limit(req: &Request) -> Result<Option<usize>, String> {
    match req.param("limit") {
        None | Some("") => Ok(None),
        Some(s) => s
            .parse::<usize>()
            .map(Some)
            .map_err(|_| format!("invalid limit {s:?}")),
    }
}

fn list(shared: &Shared, w: &mut TcpStream, req: &Request, filter: &Filter) -> io::Result<After> {
    let kind = filter.kind;
    let limit = match parse_limit(req) {
        Ok(l) => l,
        Err(msg) => return write_json(w, 400, &status(400, "BadRequest", &msg), req.close),
    };
    let rv_param = req.param("resourceVersion").unwrap_or("");
    let rv_match = req.param("resourceVersionMatch").unwrap_or("");
    let page = {
        let mut state = shared.lock();
        if let Some(n) = state.faults.fail_lists.get_mut(&kind).filter(|n| **n > 0) {
            *n -= 1;
            drop(state);
            let body = status(
                500,
                "InternalError",
                "Internal error occurred: injected list failure",
            );
            return write_json(w, 500, &body, req.close);
        }
        if let Some(token) = req.param("continue").filter(|t| !t.is_empty()) {
            match state.store.list_continue(kind, token, limit) {
                Ok(page) => page,
                Err(ContinueError::Invalid) => {
                    drop(state);
                    let body = status(
                        400,
                        "BadRequest",
                        "continue key is not valid: not a token this server issued",
                    );
                    return write_json(w, 400, &body, req.close);
                }
                Err(ContinueError::Expired) => {
                    drop(state);
                    let msg = "The provided continue parameter is too old to display a consistent list result. \
                               You can start a new list without the continue parameter, or use the continue \
                               value from the response to get a consistent list.";
                    return write_json(w, 410, &status(410, "Expired", msg), req.close);
                }
            }
        } else {
            let current = state.store.rv();
            let requested = match rv_param {
                "" => None,
                s => match s.parse::<u64>() {
                    Ok(v) => Some(v),
                    Err(_) => {
                        drop(state);
                        let msg = format!("invalid resource version {s:?}");
                        return write_json(w, 400, &status(400, "BadRequest", &msg), req.close);
                    }
                },
            };
            match (rv_match, requested) {
                ("", _) | ("NotOlderThan", Some(_)) | ("Exact", Some(_)) => {}
                _ => {
                    drop(state);
                    let msg = format!(
                        "resourceVersionMatch {rv_match:?} is invalid with resourceVersion {rv_param:?}"
                    );
                    return write_json(w, 422, &status(422, "Invalid", &msg), req.close);
                }
            }
            match requested {
                // Exact reads of past versions are not kept; only the current one is served.
                Some(v) if rv_match == "Exact" && v != current => {
                    drop(state);
                    let msg = format!("too old resource version: {v} ({current})");
                    return write_json(w, 410, &status(410, "Expired", &msg), req.close);
                }
                Some(v) if v > current => {
                    drop(state);
                    let msg = format!("Too large resource version: {v}, current: {current}");
                    let mut body = status(504, "Timeout", &msg);
                    body["details"] =
                        json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": msg}]});
                    return write_json(w, 504, &body, req.close);
                }
                _ => {}
            }
            state.store.list(filter, limit)
        }
    };
    let items: Vec<Value> = page
        .items
        .into_iter()
        .map(|mut obj| {
            // Items of a typed list come without kind/apiVersion from kube-apiserver.
            if let Some(map) = obj.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            obj
        })
        .collect();
    let mut metadata = json!({"resourceVersion": page.rv.to_string()});
    if let Some(token) = page.continue_token {
        metadata["continue"] = json!(token);
        // kube-apiserver only counts the rest when no selector filters it.
        if filter.labels.is_empty() && filter.fields.is_empty() {
            metadata["remainingItemCount"] = json!(page.remaining);
        }
    }
    let body = json!({
        "kind": kind.list_kind(),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": items,
    });
    write_json(w, 200, &body, req.close)
}

/// Frames `lines` as chunks, one event per chunk, as kube-apiserver flushes them.
fn chunks(lines: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in lines {
        let mut text = line.to_string();
        text.push('\n');
        out.extend_from_slice(format!("{:x}\r\n", text.len()).as_bytes());
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn event(etype: EventType, object: Value) -> Value {
    json!({"type": etype.as_str(), "object": object})
}

fn bookmark(kind: Kind, rv: u64, initial_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({
        "type": "BOOKMARK",
        "object": {"kind": kind.name(), "apiVersion": kind.api_version(), "metadata": metadata},
    })
}

fn expired_event(message: &str) -> Value {
    json!({"type": "ERROR", "object": status(410, "Expired", message)})
}

/// Counts an open watch for [`super::ApiServer::open_watches`] while it lives.
struct WatchGuard<'a>(&'a Shared);

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.open_watches = state.open_watches.saturating_sub(1);
        drop(state);
        self.0.changed.notify_all();
    }
}

/// Where a watch starts.
enum Start {
    /// Send these objects as ADDED first (and, for streaming lists, the initial-events-end
    /// bookmark at `rv`), then events after stream position `seq`.
    Initial {
        objects: Vec<Value>,
        rv: u64,
        seq: u64,
    },
    /// Send events from stream position `seq`, skipping RVs up to `since`.
    From { seq: u64, since: u64 },
    /// Answer with a 410 ERROR event and end.
    Expired(String),
}

fn watch(
    shared: &Shared,
    w: &mut TcpStream,
    req: &Request,
    filter: &Filter,
    generation: u64,
) -> io::Result<After> {
    let send_initial = req.flag("sendInitialEvents");
    let bookmarks = req.flag("allowWatchBookmarks");
    let rv_param = req.param("resourceVersion").unwrap_or("");
    if send_initial && (!bookmarks || req.param("resourceVersionMatch") != Some("NotOlderThan")) {
        let msg = "sendInitialEvents requires allowWatchBookmarks=true and resourceVersionMatch=NotOlderThan";
        return write_json(w, 422, &status(422, "Invalid", msg), req.close);
    }
    let since = match rv_param {
        "" | "0" => None,
        s => match s.parse::<u64>() {
            Ok(v) => Some(v),
            Err(_) => {
                let msg = format!("invalid resource version {s:?}");
                return write_json(w, 400, &status(400, "BadRequest", &msg), req.close);
            }
        },
    };
    let timeout = req
        .param("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let deadline = Instant::now() + timeout;

    let (start, expire_generation) = {
        let mut state = shared.lock();
        state.open_watches += 1;
        let expire_generation = state.expire_generation;
        let forced = state
            .faults
            .expire_watches
            .get_mut(&filter.kind)
            .filter(|n| **n > 0);
        let start = if let Some(n) = forced {
            *n -= 1;
            Start::Expired(format!("too old resource version: {rv_param} (injected)"))
        } else if send_initial || since.is_none() {
            // "0" / unset: the current state as synthetic ADDED events, then changes.
            Start::Initial {
                objects: state.store.select(filter),
                rv: state.store.rv(),
                seq: state.store.end_seq(),
            }
        } else {
            let since = since.unwrap_or(0);
            match state.store.start_after(since) {
                Ok(seq) => Start::From { seq, since },
                Err(e) => {
                    Start::Expired(format!("too old resource version: {since} ({})", e.oldest))
                }
            }
        };
        (start, expire_generation)
    };
    let _guard = WatchGuard(shared);
    shared.changed.notify_all();

    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    w.write_all(head.as_bytes())?;
    let (mut cursor, mut since) = match start {
        Start::Expired(msg) => {
            let mut out = chunks(&[expired_event(&msg)]);
            out.extend_from_slice(b"0\r\n\r\n");
            w.write_all(&out)?;
            return Ok(After::KeepAlive);
        }
        Start::Initial { objects, rv, seq } => {
            let mut lines: Vec<Value> = objects
                .into_iter()
                .map(|o| event(EventType::Added, o))
                .collect();
            if send_initial {
                lines.push(bookmark(filter.kind, rv, true));
            }
            w.write_all(&chunks(&lines))?;
            (seq, rv)
        }
        Start::From { seq, since } => (seq, since),
    };
    w.flush()?;

    let interval = shared.options.bookmark_interval;
    let mut next_bookmark = Instant::now() + interval;
    loop {
        let mut lines = Vec::new();
        let mut end = false;
        {
            let mut state = shared.lock();
            loop {
                if state.shutdown || state.drop_generation != generation {
                    return Ok(After::Close);
                }
                let now = Instant::now();
                if let Some(until) = state.faults.stall_until.filter(|u| *u > now) {
                    // Stalled: hold everything back (events stay queued) until it ends.
                    state = shared.wait(state, (until - now).min(MAX_WAIT));
                    continue;
                }
                if state.expire_generation != expire_generation {
                    lines.push(expired_event(
                        "too old resource version: watch expired by fault injection",
                    ));
                    end = true;
                    break;
                }
                match state.store.events(cursor, since, filter) {
                    Ok((events, next)) => {
                        cursor = next;
                        lines.extend(events.into_iter().map(|(t, o)| event(t, o)));
                    }
                    Err(e) => {
                        let msg = format!("too old resource version: {since} ({})", e.oldest);
                        lines.push(expired_event(&msg));
                        end = true;
                        break;
                    }
                }
                // The watch has now seen everything up to the current RV.
                since = since.max(state.store.rv());
                if bookmarks && now >= next_bookmark {
                    lines.push(bookmark(filter.kind, since, false));
                    next_bookmark = now + interval;
                }
                if now >= deadline {
                    end = true;
                }
                if !lines.is_empty() || end {
                    break;
                }
                let mut wake = deadline;
                if bookmarks {
                    wake = wake.min(next_bookmark);
                }
                state = shared.wait(state, wake.saturating_duration_since(now).min(MAX_WAIT));
            }
        }
        let mut out = chunks(&lines);
        if end {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        w.write_all(&out)?;
        w.flush()?;
        if end {
            return Ok(After::KeepAlive);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_queries() {
        let q = parse_query("labelSelector=%21a%2C%21b&fieldSelector=metadata.name%3Dn1&watch=1&x");
        assert_eq!(q[0], ("labelSelector".into(), "!a,!b".into()));
        assert_eq!(q[1], ("fieldSelector".into(), "metadata.name=n1".into()));
        assert_eq!(q[3], ("x".into(), String::new()));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn routes() {
        let t = route("/api/v1/services").expect("services");
        assert_eq!((t.kind, t.namespace, t.name), (Kind::Service, None, None));
        let t = route("/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices").expect("slices");
        assert_eq!(
            (t.kind, t.namespace.as_deref()),
            (Kind::EndpointSlice, Some("ns"))
        );
        let t = route("/api/v1/nodes/n1").expect("node");
        assert_eq!((t.kind, t.name.as_deref()), (Kind::Node, Some("n1")));
        assert!(route("/api/v1/services/x").is_none());
        assert!(route("/api/v1/namespaces/ns/nodes").is_none());
        assert!(route("/api/v1/pods").is_none());
        assert!(route("/apis/discovery.k8s.io/v1beta1/endpointslices").is_none());
    }
}
