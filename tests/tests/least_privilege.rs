//! svcproxy with less than it needs: the real binary, started with one required capability
//! missing, must stop at once with a message naming it, before it creates anything; and the
//! pin directory it loads into is root-only and refused when someone else owns it. (The
//! ClusterIP scenario with exactly the required capabilities is in `clusterip.rs`.) Needs root
//! and bpffs.

mod common;

use std::{
    net::Ipv4Addr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use common::{setpriv_with_only, svcproxy_bin, unique};
use svcproxy::{
    caps,
    loader::{Datapath, LoadError, MapSizes},
};
use svcproxy_tests::Sandbox;

/// Removes a directory (the pin directories below) when the test ends, also by a panic.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bpffs_dir(tag: &str) -> RemoveOnDrop {
    RemoveOnDrop(Path::new("/sys/fs/bpf").join(unique(tag)))
}

/// Runs `svcproxy run` with only `caps` in the sandbox's node namespace (so that a check that
/// let it through would attach nowhere that matters) and returns its exit success and its
/// log. It must exit on its own within 10 s: a check that let it through would leave it
/// running.
fn run_with_only(
    sb: &Sandbox,
    caps: &[&str],
    pin_dir: &Path,
    manifests: &Path,
    socket_lb: &str,
) -> (bool, String) {
    let wrapper = setpriv_with_only(caps);
    let mut child = sb
        .node_command(&wrapper[0])
        .args(&wrapper[1..])
        .arg(svcproxy_bin())
        .arg("run")
        .arg("--manifests")
        .arg(manifests)
        .args(["--interfaces", &sb.veth_glob(), "--pin-path"])
        .arg(pin_dir)
        // `off` unless a test is about it: not on the machine's root cgroup, where other tests
        // run (see `socket_lb.rs`).
        .args(["--socket-lb", socket_lb])
        // Port 0: nothing to collide with, whatever else runs.
        .args([
            "--metrics-bind-address",
            "127.0.0.1:0",
            "--healthz-bind-address",
            "127.0.0.1:0",
        ])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting setpriv (util-linux): {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "svcproxy with only {caps:?} kept running; its log:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), log)
}

#[test]
fn each_missing_capability_is_named_before_anything_is_loaded() {
    let sb = Sandbox::new("lpcaps", Ipv4Addr::new(172, 18, 0, 2)).expect("sandbox");
    let manifests = common::Manifests::new();
    for missing in caps::REQUIRED {
        let others: Vec<String> = caps::REQUIRED
            .iter()
            .filter(|c| **c != missing)
            .map(|c| c.kubernetes_name().to_lowercase())
            .collect();
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        let pins = bpffs_dir("svcproxy-caps");
        let (ok, log) = run_with_only(&sb, &others, &pins.0, manifests.dir(), "off");
        assert!(
            !ok,
            "svcproxy without {} exited successfully:\n{log}",
            missing.name
        );
        assert!(
            log.contains(&format!("missing {}", missing.name)),
            "the error names {}:\n{log}",
            missing.name
        );
        assert!(
            !pins.0.exists(),
            "without {} svcproxy still created {}",
            missing.name,
            pins.0.display()
        );
    }
}

#[test]
fn pin_directory_is_created_root_only() {
    let pins = bpffs_dir("svcproxy-pinmode");
    let dp = Datapath::load(&pins.0, &MapSizes::default())
        .unwrap_or_else(|e| panic!("loading into {}: {e}", pins.0.display()));
    let meta = std::fs::metadata(&pins.0).expect("pin dir");
    assert_eq!(meta.permissions().mode() & 0o777, 0o700, "mode 0700");
    assert_eq!(meta.uid(), 0, "owned by root");
    drop(dp);

    // One left more open (by hand, or an older svcproxy) is tightened on the next load.
    std::fs::set_permissions(&pins.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let dp = Datapath::load(&pins.0, &MapSizes::default()).expect("adopting the pins");
    let mode = std::fs::metadata(&pins.0)
        .expect("pin dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "tightened to 0700");
    drop(dp);
}

#[test]
fn pin_directory_owned_by_someone_else_is_refused() {
    let pins = bpffs_dir("svcproxy-pinowner");
    std::fs::create_dir(&pins.0).expect("create the pin dir");
    // nobody: on a world-writable bpffs any user can make the directory first.
    std::os::unix::fs::chown(&pins.0, Some(65534), Some(65534)).expect("chown");
    match Datapath::load(&pins.0, &MapSizes::default()) {
        Err(e @ LoadError::PinDirOwner { owner: 65534, .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("belongs to uid 65534"), "{msg}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("loaded into a pin directory owned by uid 65534"),
    }
    let entries = std::fs::read_dir(&pins.0).expect("list").count();
    assert_eq!(entries, 0, "nothing was pinned into it");
}

#[test]
fn socket_lb_all_without_cap_sys_ptrace_is_refused_before_anything_is_loaded() {
    let sb = Sandbox::new("lpptrace", Ipv4Addr::new(172, 18, 0, 2)).expect("sandbox");
    let manifests = common::Manifests::new();
    let required: Vec<String> = caps::REQUIRED
        .iter()
        .map(|c| c.kubernetes_name().to_lowercase())
        .collect();
    let required: Vec<&str> = required.iter().map(String::as_str).collect();
    let pins = bpffs_dir("svcproxy-ptrace");
    let (ok, log) = run_with_only(&sb, &required, &pins.0, manifests.dir(), "all");
    assert!(
        !ok,
        "svcproxy --socket-lb all without CAP_SYS_PTRACE started:\n{log}"
    );
    assert!(
        log.contains("missing CAP_SYS_PTRACE"),
        "the error names CAP_SYS_PTRACE:\n{log}"
    );
    assert!(!pins.0.exists(), "it still created {}", pins.0.display());
}
