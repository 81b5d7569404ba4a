//! The stand-in API server against a real kube-rs client: watchers and reflectors see
//! changes, survive its injected faults (410, dropped connections, outages, stalls, list
//! failures) and its list features (pagination, selectors) behave like kube-apiserver's.

use std::{
    fmt::Debug,
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    api::{ListParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, reflector, watcher},
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use svcproxy_tests::apiserver::{
    ApiServer, Endpoint, EndpointPort, Kind, Options, RecordedRequest, ServicePort, endpoint_slice,
    node, service,
};

/// Generous bound for anything that should happen "soon"; tests finish well within it.
const SOON: Duration = Duration::from_secs(8);

async fn client(server: &ApiServer) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig_text()).expect("kubeconfig parses");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig loads");
    Client::try_from(config).expect("client builds")
}

fn svc(name: &str, ip: &str) -> Value {
    service("default", name, ip, &[ServicePort::tcp("http", 80, 8080)])
}

fn rv(obj: &Value) -> String {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .expect("stored objects carry a resourceVersion")
        .to_string()
}

/// A reflector driven in the background with the default backoff, recording the errors
/// the watcher reports.
struct Reflected<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    store: reflector::Store<K>,
    errors: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Reflected<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    async fn start(api: Api<K>, config: watcher::Config) -> Self {
        let (store, writer) = reflector::store();
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&errors);
        let stream = reflector(writer, watcher(api, config)).default_backoff();
        let task = tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(item) = stream.next().await {
                if let Err(e) = item {
                    sink.lock().expect("error list").push(e.to_string());
                }
            }
        });
        tokio::time::timeout(SOON, store.wait_until_ready())
            .await
            .expect("reflector ready in time")
            .expect("reflector writer alive");
        Self {
            store,
            errors,
            task,
        }
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.store.state().iter().map(|o| o.name_any()).collect();
        names.sort();
        names
    }

    fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("error list").clone()
    }

    async fn wait_names(&self, want: &[&str]) {
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        eventually(&format!("reflector to hold {want:?}"), || {
            self.names() == want
        })
        .await;
    }
}

impl<K: Resource + 'static> Drop for Reflected<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + SOON;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {SOON:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Prints what the server was asked, shown when a test fails (or with `--nocapture`).
fn log_requests(server: &ApiServer) {
    for r in server.requests() {
        eprintln!("{} {}", r.method, r.target);
    }
}

fn lists(requests: &[RecordedRequest], path: &str) -> usize {
    requests
        .iter()
        .filter(|r| r.path == path && !r.is_watch())
        .count()
}

fn watches(requests: &[RecordedRequest], path: &str) -> Vec<RecordedRequest> {
    requests
        .iter()
        .filter(|r| r.path == path && r.is_watch())
        .cloned()
        .collect()
}

#[tokio::test]
async fn reflector_sees_create_update_delete_with_default_config() {
    let server = ApiServer::start();
    // The list comes right after this, so its resourceVersion is `a`'s.
    let a_rv = rv(&server.apply(svc("a", "10.96.0.10")).expect("apply a"));
    let api: Api<Service> = Api::all(client(&server).await);
    let reflected = Reflected::start(api, watcher::Config::default()).await;
    assert_eq!(reflected.names(), ["a"]);

    let b = server.apply(svc("b", "10.96.0.11")).expect("apply b");
    reflected.wait_names(&["a", "b"]).await;

    let mut updated = svc("b", "10.96.0.11");
    updated["spec"]["ports"][0]["port"] = json!(81);
    let b2 = server.apply(updated).expect("update b");
    assert!(rv(&b2).parse::<u64>().expect("numeric") > rv(&b).parse::<u64>().expect("numeric"));
    assert_eq!(
        b2["metadata"]["uid"], b["metadata"]["uid"],
        "uid survives updates"
    );
    eventually("the port update", || {
        reflected.store.state().iter().any(|s| {
            s.name_any() == "b"
                && s.spec
                    .as_ref()
                    .and_then(|sp| sp.ports.as_ref())
                    .is_some_and(|p| p[0].port == 81)
        })
    })
    .await;

    server
        .delete(Kind::Service, "default", "a")
        .expect("delete a");
    reflected.wait_names(&["b"]).await;
    assert!(reflected.errors().is_empty(), "{:?}", reflected.errors());

    // What kube-rs's default watcher config asks for: one list with the client-go page
    // size, then a watch from the list's resourceVersion with bookmarks.
    log_requests(&server);
    let requests = server.requests();
    // Compared decoded: kube 5 sends `/api/v1/services?&limit=500` (note the empty pair),
    // a quirk the real server ignores too.
    let query = |r: &RecordedRequest| {
        r.query
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    };
    assert_eq!(
        (requests[0].path.as_str(), query(&requests[0]).as_str()),
        ("/api/v1/services", "limit=500")
    );
    let watch = &watches(&requests, "/api/v1/services")[0];
    assert_eq!(
        query(watch),
        format!("watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion={a_rv}")
    );
}

#[tokio::test]
async fn kubeconfig_file_and_token_auth() {
    let server = ApiServer::start_with(Options {
        token: Some("s3cret".into()),
        ..Options::default()
    })
    .expect("start");
    server
        .apply(node("n1", &[("zone", "a")]))
        .expect("apply node");
    let dir = std::env::temp_dir().join(format!("svcproxy-apiserver-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("kubeconfig");
    server.kubeconfig(&path).expect("write kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("kubeconfig file parses");
    let _ = std::fs::remove_dir_all(&dir);
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("loads");
    let nodes: Api<Node> = Api::all(Client::try_from(config).expect("client"));
    let n1 = nodes.get("n1").await.expect("get with the token");
    assert_eq!(n1.labels().get("zone").map(String::as_str), Some("a"));

    // Without the token: 401 as a Status.
    let mut anonymous = Config::new(server.url().parse().expect("url"));
    anonymous.default_namespace = "default".into();
    let nodes: Api<Node> = Api::all(Client::try_from(anonymous).expect("client"));
    match nodes.get("n1").await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 401),
        other => panic!("expected 401, got {other:?}"),
    }
}

#[tokio::test]
async fn forced_410_relists_and_converges() {
    let server = ApiServer::start();
    server.apply(svc("a", "10.96.0.10")).expect("apply");
    server.apply(svc("b", "10.96.0.11")).expect("apply");
    let api: Api<Service> = Api::all(client(&server).await);
    let reflected = Reflected::start(api, watcher::Config::default()).await;
    assert!(server.wait_for_watches(1, SOON), "watch opened");

    // Hold the open watch back so the changes below never reach it, then expire it: only
    // a relist can tell the reflector that `b` is gone.
    server.stall(Duration::from_millis(300));
    server
        .delete(Kind::Service, "default", "b")
        .expect("delete");
    server.apply(svc("c", "10.96.0.12")).expect("apply");
    server.expire_open_watches();
    reflected.wait_names(&["a", "c"]).await;
    assert!(
        reflected
            .errors()
            .iter()
            .any(|e| e.contains("410") || e.to_lowercase().contains("expired")),
        "{:?}",
        reflected.errors()
    );
    assert_eq!(
        lists(&server.requests(), "/api/v1/services"),
        2,
        "one relist"
    );

    // A resumed watch that is refused with 410 also relists.
    server.expire_next_watch(Kind::Service);
    assert!(server.drop_connections() >= 1);
    eventually("a third list", || {
        lists(&server.requests(), "/api/v1/services") == 3
    })
    .await;
    server.apply(svc("d", "10.96.0.13")).expect("apply");
    reflected.wait_names(&["a", "c", "d"]).await;
    log_requests(&server);
}

#[tokio::test]
async fn watch_from_compacted_version_gets_410_event() {
    let server = ApiServer::start_with(Options {
        history_limit: 2,
        ..Options::default()
    })
    .expect("start");
    let first = server.apply(svc("a", "10.96.0.10")).expect("apply");
    for i in 0..3 {
        server
            .apply(svc(&format!("s{i}"), "10.96.0.11"))
            .expect("apply");
    }
    let api: Api<Service> = Api::all(client(&server).await);
    let mut stream = api
        .watch(&WatchParams::default(), &rv(&first))
        .await
        .expect("watch starts")
        .boxed();
    match stream.try_next().await.expect("event decodes") {
        Some(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert!(
                status.message.starts_with("too old resource version"),
                "{}",
                status.message
            );
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        stream.try_next().await.expect("clean end").is_none(),
        "the watch ends after the error"
    );

    // After a compaction even the current RV minus one is gone; the current one still works.
    let current = server.resource_version();
    server.compact();
    let mut stream = api
        .watch(&WatchParams::default(), &current.to_string())
        .await
        .expect("watch")
        .boxed();
    server.apply(svc("late", "10.96.0.20")).expect("apply");
    match stream.try_next().await.expect("event decodes") {
        Some(WatchEvent::Added(s)) => assert_eq!(s.name_any(), "late"),
        other => panic!("expected ADDED late, got {other:?}"),
    }
    let mut stream = api
        .watch(&WatchParams::default(), &(current - 1).to_string())
        .await
        .expect("watch")
        .boxed();
    assert!(matches!(stream.try_next().await, Ok(Some(WatchEvent::Error(s))) if s.code == 410));
}

#[tokio::test]
async fn dropped_connection_resumes_without_relist() {
    let server = ApiServer::start();
    server.apply(svc("a", "10.96.0.10")).expect("apply");
    let api: Api<Service> = Api::all(client(&server).await);
    let reflected = Reflected::start(api, watcher::Config::default()).await;
    assert!(server.wait_for_watches(1, SOON), "watch opened");
    let before = server.resource_version();
    server.clear_requests();

    assert!(
        server.drop_connections() >= 1,
        "the watch connection was open"
    );
    server.apply(svc("b", "10.96.0.11")).expect("apply");
    reflected.wait_names(&["a", "b"]).await;

    let requests = server.requests();
    assert_eq!(
        lists(&requests, "/api/v1/services"),
        0,
        "resumed, not relisted: {requests:?}"
    );
    let resumed = watches(&requests, "/api/v1/services");
    assert_eq!(
        resumed[0].param("resourceVersion"),
        Some(before.to_string().as_str()),
        "{requests:?}"
    );
}

#[tokio::test]
async fn outage_is_survived_with_default_backoff() {
    let server = ApiServer::start();
    server.apply(svc("a", "10.96.0.10")).expect("apply");
    let api: Api<Service> = Api::all(client(&server).await);
    let reflected = Reflected::start(api, watcher::Config::default()).await;
    assert!(server.wait_for_watches(1, SOON), "watch opened");
    let port = server.addr().port();

    server
        .outage(Duration::from_secs(2))
        .expect("outage starts");
    assert!(!server.is_listening());
    assert!(
        std::net::TcpStream::connect(server.addr()).is_err(),
        "refused during the outage"
    );
    // Changed while the server is unreachable: seen only once it is back.
    server.apply(svc("during", "10.96.0.11")).expect("apply");
    server
        .delete(Kind::Service, "default", "a")
        .expect("delete");
    reflected.wait_names(&["during"]).await;
    log_requests(&server);
    assert!(server.is_listening());
    assert_eq!(server.addr().port(), port, "same port after the outage");
    assert!(
        !reflected.errors().is_empty(),
        "the watcher noticed the outage"
    );
}

#[tokio::test]
async fn pagination_with_continue_tokens() {
    let server = ApiServer::start();
    for i in 0..7 {
        server
            .apply(svc(&format!("s{i}"), "10.96.0.10"))
            .expect("apply");
    }
    let list_rv = server.resource_version().to_string();
    let api: Api<Service> = Api::all(client(&server).await);

    let page1 = api
        .list(&ListParams::default().limit(3))
        .await
        .expect("page 1");
    assert_eq!(page1.items.len(), 3);
    assert_eq!(page1.metadata.remaining_item_count, Some(4));
    assert_eq!(
        page1.metadata.resource_version.as_deref(),
        Some(list_rv.as_str())
    );
    // A change between pages does not show in the rest of the list: it is a snapshot.
    server.apply(svc("s99", "10.96.0.10")).expect("apply");
    let token = page1.metadata.continue_.clone().expect("continue token");
    let page2 = api
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await
        .expect("page 2");
    // Tokens can be used again (a client retrying a page).
    let again = api
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await
        .expect("page 2 again");
    assert_eq!(again.items, page2.items);
    let token = page2.metadata.continue_.clone().expect("continue token");
    let page3 = api
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await
        .expect("page 3");
    assert!(page3.metadata.continue_.is_none());
    assert_eq!(
        page3.metadata.resource_version.as_deref(),
        Some(list_rv.as_str())
    );
    let names: Vec<String> = [page1, page2, page3]
        .iter()
        .flat_map(|p| p.items.iter().map(|s| s.name_any()))
        .collect();
    assert_eq!(names, (0..7).map(|i| format!("s{i}")).collect::<Vec<_>>());

    // An expired token is a 410 on the list path.
    let page1 = api
        .list(&ListParams::default().limit(2))
        .await
        .expect("page 1");
    server.expire_continue_tokens();
    let token = page1.metadata.continue_.expect("continue token");
    match api
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected 410, got {other:?}"),
    }

    // The watcher pages through too.
    let reflected = Reflected::start(api, watcher::Config::default().page_size(3)).await;
    assert_eq!(reflected.names().len(), 8);
    let requests = server.requests();
    let paged: Vec<&RecordedRequest> = requests
        .iter()
        .filter(|r| !r.is_watch() && r.param("limit") == Some("3") && r.param("continue").is_some())
        .collect();
    assert_eq!(
        paged.len(),
        3 + 2,
        "three continued lists above, two by the watcher"
    );
}

#[tokio::test]
async fn label_selector_filters_and_moves_objects_in_and_out() {
    let server = ApiServer::start();
    let mut headless = svc("headless", "None");
    headless["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    let mut other_proxy = svc("other", "10.96.0.11");
    other_proxy["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] =
        json!("someone-else");
    for obj in [headless, other_proxy, svc("plain", "10.96.0.12")] {
        server.apply(obj).expect("apply");
    }
    let selector = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";
    let api: Api<Service> = Api::all(client(&server).await);
    let listed = api
        .list(&ListParams::default().labels(selector))
        .await
        .expect("list");
    assert_eq!(
        listed
            .items
            .iter()
            .map(|s| s.name_any())
            .collect::<Vec<_>>(),
        ["plain"]
    );
    assert_eq!(listed.metadata.remaining_item_count, None);

    let reflected = Reflected::start(api, watcher::Config::default().labels(selector)).await;
    assert_eq!(reflected.names(), ["plain"]);
    // Relabelling out of the selection is a DELETED for this watch, back in an ADDED.
    let mut plain = svc("plain", "10.96.0.12");
    plain["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = json!("x");
    server.apply(plain).expect("apply");
    reflected.wait_names(&[]).await;
    server.apply(svc("plain", "10.96.0.12")).expect("apply");
    reflected.wait_names(&["plain"]).await;
    log_requests(&server);
    let watch = &watches(&server.requests(), "/api/v1/services")[0];
    assert_eq!(watch.param("labelSelector"), Some(selector));
}

#[tokio::test]
async fn nodes_by_name_and_field_selector() {
    let server = ApiServer::start();
    server.apply(node("n1", &[])).expect("apply");
    server.apply(node("n2", &[])).expect("apply");
    let api: Api<Node> = Api::all(client(&server).await);
    assert_eq!(api.get("n2").await.expect("get").name_any(), "n2");
    match api.get("n3").await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"))
        }
        other => panic!("expected 404, got {other:?}"),
    }
    let reflected =
        Reflected::start(api, watcher::Config::default().fields("metadata.name=n1")).await;
    assert_eq!(reflected.names(), ["n1"]);
    server
        .apply(node("n1", &[("changed", "yes")]))
        .expect("apply");
    server.delete(Kind::Node, "", "n2").expect("delete");
    eventually("n1's new label", || {
        reflected
            .store
            .state()
            .iter()
            .any(|n| n.labels().contains_key("changed"))
    })
    .await;
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.target.contains("fieldSelector=metadata.name%3Dn1") && r.is_watch()),
        "{:?}",
        server.requests()
    );
}

#[tokio::test]
async fn endpoint_slices_and_streaming_lists() {
    let server = ApiServer::start();
    let slice = endpoint_slice(
        "default",
        "web-abc12",
        "web",
        &[
            Endpoint::ready("10.244.1.5", "n1"),
            Endpoint::terminating("10.244.2.7", "n2"),
        ],
        &[EndpointPort::tcp("http", 8080)],
    );
    server.apply(slice).expect("apply");
    let api: Api<EndpointSlice> = Api::namespaced(client(&server).await, "default");
    let reflected = Reflected::start(api, watcher::Config::default().streaming_lists()).await;
    assert_eq!(reflected.names(), ["web-abc12"]);
    let stored = reflected.store.state();
    let s = &stored[0];
    assert_eq!(
        s.labels()
            .get("kubernetes.io/service-name")
            .map(String::as_str),
        Some("web")
    );
    assert_eq!(s.address_type, "IPv4");
    let endpoints = s.endpoints.as_deref().expect("endpoints");
    assert_eq!(
        endpoints[1].conditions.as_ref().and_then(|c| c.terminating),
        Some(true)
    );
    assert_eq!(endpoints[0].node_name.as_deref(), Some("n1"));
    server
        .apply(endpoint_slice("default", "web-def34", "web", &[], &[]))
        .expect("apply");
    reflected.wait_names(&["web-abc12", "web-def34"]).await;
    log_requests(&server);
    let requests = server.requests();
    let first = &watches(
        &requests,
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
    )[0];
    assert_eq!(first.param("sendInitialEvents"), Some("true"));
    assert_eq!(
        lists(
            &requests,
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
        ),
        0
    );
}

#[tokio::test]
async fn list_failure_is_retried() {
    let server = ApiServer::start();
    server.apply(svc("a", "10.96.0.10")).expect("apply");
    server.fail_next_list(Kind::Service);
    let api: Api<Service> = Api::all(client(&server).await);
    let reflected = Reflected::start(api, watcher::Config::default()).await;
    assert_eq!(reflected.names(), ["a"]);
    assert_eq!(lists(&server.requests(), "/api/v1/services"), 2);
    assert_eq!(reflected.errors().len(), 1, "{:?}", reflected.errors());
}

#[tokio::test]
async fn stale_replay_and_out_of_order_delivery() {
    let server = ApiServer::start();
    let ports = [EndpointPort::tcp("http", 8080)];
    let v1 = server
        .apply(endpoint_slice(
            "default",
            "s",
            "web",
            &[Endpoint::ready("10.244.0.1", "n1")],
            &ports,
        ))
        .expect("v1");
    let v2 = server
        .apply(endpoint_slice(
            "default",
            "s",
            "web",
            &[Endpoint::ready("10.244.0.2", "n1")],
            &ports,
        ))
        .expect("v2");
    let api: Api<EndpointSlice> = Api::all(client(&server).await);
    let mut stream = api
        .watch(&WatchParams::default().disable_bookmarks(), &rv(&v2))
        .await
        .expect("watch")
        .boxed();

    let stale = server
        .replay_stale(Kind::EndpointSlice, "default", "s")
        .expect("replay");
    assert_eq!(rv(&stale), rv(&v1));
    match stream.try_next().await.expect("decodes") {
        Some(WatchEvent::Modified(s)) => assert_eq!(s.resource_version(), Some(rv(&v1))),
        other => panic!("expected the stale MODIFIED, got {other:?}"),
    }

    let v3 = endpoint_slice(
        "default",
        "s",
        "web",
        &[Endpoint::ready("10.244.0.3", "n1")],
        &ports,
    );
    let v4 = endpoint_slice(
        "default",
        "s",
        "web",
        &[Endpoint::ready("10.244.0.4", "n1")],
        &ports,
    );
    let stored = server.apply_out_of_order(vec![v3, v4]).expect("apply");
    let mut seen = Vec::new();
    for _ in 0..2 {
        match stream.try_next().await.expect("decodes") {
            Some(WatchEvent::Modified(s)) => seen.push(s.resource_version().unwrap_or_default()),
            other => panic!("expected MODIFIED, got {other:?}"),
        }
    }
    assert_eq!(seen, [rv(&stored[1]), rv(&stored[0])], "newest first");
    // The store itself holds the last applied version.
    assert_eq!(
        server
            .get(Kind::EndpointSlice, "default", "s")
            .map(|s| rv(&s)),
        Some(rv(&stored[1]))
    );
}

#[tokio::test]
async fn stall_delays_answers_and_events() {
    let server = ApiServer::start();
    let api: Api<Service> = Api::all(client(&server).await);
    let mut stream = api
        .watch(
            &WatchParams::default(),
            &server.resource_version().to_string(),
        )
        .await
        .expect("watch")
        .boxed();
    server.stall(Duration::from_millis(700));
    server.apply(svc("a", "10.96.0.10")).expect("apply");
    let start = tokio::time::Instant::now();
    let listed = api
        .list(&ListParams::default())
        .await
        .expect("answered after the stall");
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(listed.items.len(), 1);
    match tokio::time::timeout(SOON, stream.try_next())
        .await
        .expect("event after the stall")
        .expect("decodes")
    {
        Some(WatchEvent::Added(s)) => assert_eq!(s.name_any(), "a"),
        other => panic!("expected ADDED a, got {other:?}"),
    }
}

#[tokio::test]
async fn bookmarks_arrive_and_shutdown_is_clean() {
    let server = ApiServer::start_with(Options {
        bookmark_interval: Duration::from_millis(200),
        ..Options::default()
    })
    .expect("start");
    let a = server.apply(svc("a", "10.96.0.10")).expect("apply");
    let api: Api<Service> = Api::all(client(&server).await);
    let mut stream = api
        .watch(&WatchParams::default(), &rv(&a))
        .await
        .expect("watch")
        .boxed();
    match tokio::time::timeout(SOON, stream.try_next())
        .await
        .expect("bookmark in time")
        .expect("decodes")
    {
        Some(WatchEvent::Bookmark(b)) => assert_eq!(b.metadata.resource_version, rv(&a)),
        other => panic!("expected a BOOKMARK, got {other:?}"),
    }
    // Dropping the server with a watch open closes it and joins every thread.
    drop(server);
    let end = tokio::time::timeout(SOON, async {
        loop {
            match stream.try_next().await {
                Ok(Some(_)) => continue,
                _ => return,
            }
        }
    });
    end.await.expect("the watch ends when the server goes");
}
