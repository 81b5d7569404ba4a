//! The install manifests in `deploy/`, checked without a cluster: each parses as the Kubernetes
//! type its `kind` names (and nothing in it is lost to a misspelt field), the ClusterRole grants
//! exactly kube-proxy's `system:node-proxier` rules, the DaemonSet runs unprivileged with only
//! the capabilities `svcproxy` checks for, and its command line is one the real `svcproxy run`
//! parser accepts once the kubelet has filled in the ConfigMap's values.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use clap::Parser as _;
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, EnvVar, PodSpec, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_yaml::Value;
use svcproxy::{
    caps,
    cli::{Cli, Command},
    loader::HookChoice,
    run::SourceOptions,
    socklb::SocketLb,
};

/// `system:node-proxier` as the Kubernetes bootstrap policy defines it (kube-proxy's role), as
/// (API group, resource, verb) grants.
const NODE_PROXIER: &[(&str, &[&str], &[&str])] = &[
    ("", &["endpoints", "services"], &["list", "watch"]),
    ("", &["nodes"], &["get", "list", "watch"]),
    ("", &["events"], &["create", "patch", "update"]),
    ("events.k8s.io", &["events"], &["create", "patch", "update"]),
    ("discovery.k8s.io", &["endpointslices"], &["list", "watch"]),
];

/// Every object of the install, by kind.
#[derive(Default)]
struct Install {
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The files `kubectl apply -f deploy/` reads: `.yaml`, `.yml` and `.json` directly in it.
fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap_or_else(|e| panic!("reading deploy/: {e}"))
        .map(|e| e.expect("a deploy/ entry").path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "deploy/ holds no manifests");
    files
}

/// Parses `doc` as `T`, and fails if serialising it back loses anything: k8s-openapi ignores
/// unknown fields, so a misspelt `readinesProbe` would otherwise pass unnoticed.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value, what: &str) -> T {
    let obj: T = serde_yaml::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what} does not parse as its kind: {e}"));
    let back = serde_yaml::to_value(&obj).expect("serialise");
    assert_eq!(
        &back,
        doc,
        "{what}: some field is unknown to Kubernetes (misspelt or misplaced); parsed back as\n{}",
        serde_yaml::to_string(&back).unwrap_or_default()
    );
    obj
}

fn install() -> Install {
    let mut install = Install::default();
    for file in manifest_files() {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        for (i, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let doc = Value::deserialize(de)
                .unwrap_or_else(|e| panic!("{name} document {i} is not YAML: {e}"));
            if doc.is_null() {
                continue;
            }
            let field = |f: &str| doc.get(f).and_then(Value::as_str).unwrap_or_default();
            let what = format!(
                "{name} document {i} ({} {})",
                field("kind"),
                doc["metadata"]["name"].as_str().unwrap_or("?")
            );
            match (field("apiVersion"), field("kind")) {
                ("v1", "ServiceAccount") => install.service_accounts.push(typed(&doc, &what)),
                ("v1", "ConfigMap") => install.config_maps.push(typed(&doc, &what)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    install.cluster_roles.push(typed(&doc, &what))
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    install.bindings.push(typed(&doc, &what))
                }
                ("apps/v1", "DaemonSet") => install.daemon_sets.push(typed(&doc, &what)),
                (api, kind) => panic!("{what}: unexpected kind {api}/{kind} in deploy/"),
            }
        }
    }
    install
}

fn one<'a, T>(items: &'a [T], kind: &str) -> &'a T {
    assert_eq!(items.len(), 1, "deploy/ must hold exactly one {kind}");
    &items[0]
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .template
        .spec
        .as_ref()
        .expect("the DaemonSet has a pod spec")
}

fn container(ds: &DaemonSet) -> &Container {
    let spec = pod_spec(ds);
    assert_eq!(spec.containers.len(), 1, "one container: svcproxy");
    &spec.containers[0]
}

fn env<'a>(c: &'a Container, name: &str) -> &'a EnvVar {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("the container has no {name} variable"))
}

#[test]
fn every_manifest_is_a_known_kind_without_unknown_fields() {
    let install = install();
    assert_eq!(install.service_accounts.len(), 1);
    assert_eq!(install.cluster_roles.len(), 1);
    assert_eq!(install.bindings.len(), 1);
    assert_eq!(install.config_maps.len(), 1);
    assert_eq!(install.daemon_sets.len(), 1);
}

#[test]
fn cluster_role_grants_exactly_the_node_proxier_rules() {
    let install = install();
    let role = one(&install.cluster_roles, "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "node-proxier has no resourceNames or nonResourceURLs: {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let expected: BTreeSet<(String, String, String)> = NODE_PROXIER
        .iter()
        .flat_map(|(group, resources, verbs)| {
            resources.iter().flat_map(move |r| {
                verbs
                    .iter()
                    .map(move |v| (group.to_string(), r.to_string(), v.to_string()))
            })
        })
        .collect();
    let extra: Vec<_> = granted.difference(&expected).collect();
    let lacking: Vec<_> = expected.difference(&granted).collect();
    assert!(
        extra.is_empty() && lacking.is_empty(),
        "ClusterRole {:?} differs from system:node-proxier: grants beyond it {extra:?}, \
         lacking {lacking:?}",
        role.metadata.name
    );
}

#[test]
fn binding_gives_the_role_to_the_daemon_sets_service_account() {
    let install = install();
    let sa = one(&install.service_accounts, "ServiceAccount");
    let role = one(&install.cluster_roles, "ClusterRole");
    let binding = one(&install.bindings, "ClusterRoleBinding");
    let ds = one(&install.daemon_sets, "DaemonSet");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        binding.role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "one subject: {subjects:?}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
    assert_eq!(
        pod_spec(ds).service_account_name,
        sa.metadata.name,
        "the pods run as the bound ServiceAccount"
    );
    assert_eq!(ds.metadata.namespace, sa.metadata.namespace);
}

#[test]
fn daemon_set_runs_unprivileged_with_only_the_capabilities_svcproxy_checks_for() {
    let install = install();
    let ds = one(&install.daemon_sets, "DaemonSet");
    let c = container(ds);
    let sc = c.security_context.as_ref().expect("a securityContext");
    assert_eq!(sc.privileged, Some(false), "privileged: false");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let cap_set = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(
        cap_set.drop.as_deref(),
        Some(&["ALL".to_owned()][..]),
        "drop ALL"
    );
    let added: BTreeSet<&str> = cap_set.add.iter().flatten().map(String::as_str).collect();
    let required: BTreeSet<&str> = caps::REQUIRED
        .iter()
        .map(caps::Capability::kubernetes_name)
        .collect();
    assert_eq!(added, required, "exactly what svcproxy checks for at start");
    assert_eq!(
        required,
        BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON"]),
        "the documented set"
    );
}

#[test]
fn daemon_set_pod_is_a_node_agent_like_kube_proxy() {
    let install = install();
    let ds = one(&install.daemon_sets, "DaemonSet");
    let spec = pod_spec(ds);
    let c = container(ds);
    assert_eq!(spec.host_network, Some(true), "hostNetwork");
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        spec.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint, as kube-proxy does: {:?}",
        spec.tolerations
    );
    let node_name = env(c, "NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(
        field,
        Some("spec.nodeName"),
        "NODE_NAME from the downward API"
    );
    let requests = c
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .expect("resource requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));

    for (probe, path) in [
        (&c.readiness_probe, "/healthz"),
        (&c.liveness_probe, "/livez"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("an HTTP probe on {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::Int(10256), "{path} on 10256");
    }

    // Volumes by name -> host path, and where the container sees them.
    let host_paths: BTreeMap<&str, &str> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.as_str())))
        .collect();
    let mounts: BTreeMap<&str, (&str, bool)> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            (
                m.mount_path.as_str(),
                (m.name.as_str(), m.read_only == Some(true)),
            )
        })
        .collect();
    let bpffs = mounts
        .get("/sys/fs/bpf")
        .expect("bpffs mounted at /sys/fs/bpf");
    assert_eq!(
        host_paths.get(bpffs.0),
        Some(&"/sys/fs/bpf"),
        "the node's bpffs"
    );
    assert!(!bpffs.1, "pins are created there: not read-only");
    let cgroup = mounts
        .get("/run/svcproxy/cgroupv2")
        .expect("the node's cgroup2 root mounted where --cgroup-path points");
    assert!(
        cgroup.1 && host_paths.get(cgroup.0) == Some(&"/sys/fs/cgroup"),
        "the node's cgroup2 root, read-only: {mounts:?}"
    );
}

/// The container's arguments with `$(VAR)` replaced as the kubelet does, from the variables'
/// ConfigMap values.
fn expanded_args(c: &Container, cm: &ConfigMap) -> Vec<String> {
    let data = cm.data.as_ref().expect("ConfigMap data");
    let mut vars = BTreeMap::new();
    for var in c.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => match (&from.config_map_key_ref, &from.field_ref) {
                (Some(key), _) => {
                    assert_eq!(
                        Some(&key.name),
                        cm.metadata.name.as_ref(),
                        "{} comes from the install's ConfigMap",
                        var.name
                    );
                    data.get(&key.key)
                        .unwrap_or_else(|| {
                            panic!("{}: the ConfigMap has no key {:?}", var.name, key.key)
                        })
                        .clone()
                }
                (None, Some(_)) => "node-1".to_owned(),
                _ => panic!("{}: an unexpected source", var.name),
            },
            _ => String::new(),
        };
        vars.insert(var.name.clone(), value);
    }
    let mut args: Vec<String> = c.command.clone().unwrap_or_default();
    for arg in c.args.iter().flatten() {
        let mut out = arg.clone();
        while let Some(start) = out.find("$(") {
            let end = out[start..]
                .find(')')
                .map(|e| start + e)
                .unwrap_or_else(|| panic!("unterminated $( in {arg:?}"));
            let name = &out[start + 2..end];
            // The kubelet leaves an unknown reference as it is, which svcproxy would then
            // take literally: fail here instead.
            let value = vars
                .get(name)
                .unwrap_or_else(|| panic!("{arg:?} refers to ${name}, which is not defined"));
            out.replace_range(start..end + 1, value);
        }
        args.push(out);
    }
    args
}

#[test]
fn daemon_set_command_line_is_accepted_by_svcproxy_run() {
    let install = install();
    let ds = one(&install.daemon_sets, "DaemonSet");
    let cm = one(&install.config_maps, "ConfigMap");
    let c = container(ds);
    let args = expanded_args(c, cm);
    assert_eq!(
        args.first().map(String::as_str),
        Some("/usr/local/bin/svcproxy"),
        "where deploy/Containerfile installs the binary"
    );
    let cli = Cli::try_parse_from(&args)
        .unwrap_or_else(|e| panic!("svcproxy rejects the DaemonSet's arguments {args:?}:\n{e}"));
    let Command::Run(run) = cli.command else {
        panic!("the DaemonSet must run `svcproxy run`: {args:?}");
    };
    let opts = run
        .into_options(|| "unused".into())
        .unwrap_or_else(|e| panic!("svcproxy run refuses {args:?}: {e}"));
    assert_eq!(
        opts.source,
        SourceOptions::Kube { kubeconfig: None },
        "the in-cluster service account"
    );
    assert_eq!(
        opts.hook,
        HookChoice::Auto,
        "auto: tc on kind's veths, native XDP where a node has a NIC with it"
    );
    assert!(
        opts.pin_path.starts_with("/sys/fs/bpf/"),
        "the pins live on the node's bpffs: {}",
        opts.pin_path.display()
    );
    assert_eq!(opts.health_addr.port(), 10256, "where the probes look");
    assert_eq!(
        opts.socket_lb,
        SocketLb::Tcp,
        "TCP sockets balanced at connect(); `all` would also need hostPID and SYS_PTRACE"
    );
    assert_eq!(
        opts.cgroup_path.as_deref(),
        Some(std::path::Path::new("/run/svcproxy/cgroupv2")),
        "the hooks attach to the node's cgroup2 root, mounted there (see the volume check)"
    );
    assert!(
        opts.health_addr.ip().is_unspecified(),
        "the kubelet probes the node's address"
    );
    for var in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        let from = env(c, var).value_from.as_ref();
        assert!(
            from.is_some_and(|f| f.config_map_key_ref.is_some()),
            "{var} set from the ConfigMap: the `kubernetes` Service is not served yet"
        );
    }
}

#[test]
fn containerfile_installs_the_binary_the_daemon_set_runs() {
    let text = std::fs::read_to_string(deploy_dir().join("Containerfile"))
        .unwrap_or_else(|e| panic!("reading deploy/Containerfile: {e}"));
    assert!(
        text.contains("COPY --from=builder /out/svcproxy /usr/local/bin/svcproxy"),
        "the runtime stage installs /usr/local/bin/svcproxy"
    );
    assert!(
        text.contains("--bin svcproxy") && text.contains("bpf-linker"),
        "the builder builds the binary with its eBPF object"
    );
}
