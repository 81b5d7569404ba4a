//! Upgrades and crashes under load: while a client pod opens 1,000 new connections per second
//! through a ClusterIP and keeps one long TCP stream open through it, svcproxy is replaced by a
//! new process over the same pins (after a clean exit, as the DaemonSet's rolling update does;
//! alongside the running one, which then stops; after SIGKILL), or a build with another map
//! layout is refused. Every connection must succeed, the stream must go on in order, and each
//! pinned link must hold a new program afterwards (or the old one, when the new build was
//! refused). Needs root, bpffs and the built binary (`cargo xtask test`).

mod common;

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::Stdio,
    sync::{Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use aya::programs::links::{FdLink, PinnedLink};
use common::{Endpoint, Manifests, Proxy, SvcPort};
use proxy_common::{LAYOUT, LAYOUT_VERSION, backend::BACKENDS4};
use svcproxy_tests::{
    Sandbox, in_netns,
    load::{ConnectionLoad, LoadOptions, LoadReport, LongStream, StreamReport},
    sandbox::DEFAULT_ECHO_PORT,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 0, 11),
    Ipv4Addr::new(10, 244, 0, 12),
    Ipv4Addr::new(10, 244, 0, 13),
];
/// Load before the proxy is touched, so the event meets a steady state.
const LEAD: Duration = Duration::from_secs(2);
/// Load after the new programs are in, so flows begun under the old ones finish under the new.
const TAIL: Duration = Duration::from_secs(3);
/// How long a new svcproxy gets to load and replace the programs on a busy machine.
const STARTUP: Duration = Duration::from_secs(20);
/// A stream that gets no byte for this long is broken.
const STALL: Duration = Duration::from_secs(10);

/// Each test offers 1,000 connections/s; two at once on a small machine would measure the
/// machine rather than the upgrade. The tests take turns.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    // A test that failed while holding the lock poisoned it; the next one may still run.
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn backend_names() -> Vec<String> {
    (0..BACKENDS.len()).map(|i| format!("web-{i}")).collect()
}

/// A node with a client pod and three backend pods behind a ClusterIP (TCP port 80).
fn cluster(tag: &str) -> (Sandbox, Manifests) {
    let mut sb = Sandbox::new(tag, Ipv4Addr::new(172, 18, 0, 2)).expect("sandbox");
    sb.add_pod("client", CLIENT).expect("client pod");
    for (i, ip) in BACKENDS.iter().enumerate() {
        sb.add_pod(&format!("web-{i}"), *ip).expect("backend pod");
    }
    let manifests = Manifests::new();
    let ports = [SvcPort::new("tcp", 80, "TCP", DEFAULT_ECHO_PORT)];
    manifests.service("default", "web", VIP, &ports);
    let endpoints: Vec<Endpoint> = BACKENDS
        .iter()
        .zip(backend_names())
        .map(|(ip, name)| Endpoint::ready(*ip, &name))
        .collect();
    manifests.slice("default", "web", &endpoints, &ports);
    (sb, manifests)
}

fn start_proxy(sb: &Sandbox, manifests: &Manifests) -> Proxy {
    let proxy = Proxy::start(sb, manifests.dir(), "tc");
    proxy.wait_until_serving(sb, "client", SocketAddrV4::new(VIP, 80));
    proxy
}

/// The link and the program inside it, by kernel id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Attached {
    link: u32,
    program: u32,
}

/// What each pinned link (by pin name, `tc-<veth>`) holds, from the kernel's link info: what
/// tells a program replaced inside its link from one left in place, or from a new link.
fn links(pin_dir: &Path) -> BTreeMap<String, Attached> {
    let dir = pin_dir.join("links");
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
    entries
        .map(|entry| {
            let path = entry.expect("link pin").path();
            let link: FdLink = PinnedLink::from_pin(&path)
                .unwrap_or_else(|e| panic!("opening link {}: {e}", path.display()))
                .into();
            let info = link
                .info()
                .unwrap_or_else(|e| panic!("link info of {}: {e}", path.display()));
            let name = path.file_name().expect("file name").to_string_lossy();
            let attached = Attached {
                link: info.id(),
                program: info.program_id(),
            };
            (name.into_owned(), attached)
        })
        .collect()
}

/// Waits until each link of `before` holds another program: the same links (the same kernel
/// objects, so the program was swapped inside them, never detached), none more, none fewer.
fn wait_for_new_programs(
    pin_dir: &Path,
    before: &BTreeMap<String, Attached>,
) -> BTreeMap<String, Attached> {
    let deadline = Instant::now() + STARTUP;
    loop {
        let now = links(pin_dir);
        let replaced = now.len() == before.len()
            && before.iter().all(|(pin, old)| {
                now.get(pin)
                    .is_some_and(|new| new.link == old.link && new.program != old.program)
            });
        if replaced {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the programs were not replaced inside the same links within {STARTUP:?}: \
             before {before:?}, now {now:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// "tc-x: program 10 -> 12 in link 4; ..." for the test log.
fn replaced(before: &BTreeMap<String, Attached>, after: &BTreeMap<String, Attached>) -> String {
    before
        .iter()
        .map(|(pin, old)| {
            let new = after.get(pin).map_or(0, |a| a.program);
            format!(
                "{pin}: program {} -> {new} in link {}",
                old.program, old.link
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The node's count of packets it had to route and found no route for (`InNoRoutes` in its
/// `/proc/net/netstat`, `IpExt`). The node has no route to a ClusterIP, so a packet to one that crossed a
/// pod veth while no program was attached counts here (and is dropped, answered by a
/// rate-limited ICMP error): a gap in the datapath shows even when TCP hides it by
/// retransmitting a SYN.
fn untranslated_packets(sb: &Sandbox) -> u64 {
    in_netns(sb.node_netns(), || {
        // `thread-self`: this thread is in the node namespace, the process is not.
        let netstat = fs::read_to_string("/proc/thread-self/net/netstat").expect("reading netstat");
        let mut ip = netstat.lines().filter(|l| l.starts_with("IpExt:"));
        let (names, values) = (
            ip.next().expect("IpExt: header"),
            ip.next().expect("IpExt: values"),
        );
        let column = names
            .split_whitespace()
            .position(|n| n == "InNoRoutes")
            .expect("an InNoRoutes column");
        values
            .split_whitespace()
            .nth(column)
            .and_then(|v| v.parse().ok())
            .expect("an InNoRoutes value")
    })
    .expect("entering the node namespace")
}

/// The load of the acceptance test, from the client pod: 1,000 new connections/s and
/// one long stream.
struct Traffic {
    load: ConnectionLoad,
    stream: LongStream,
    /// [`untranslated_packets`] before the load.
    untranslated: u64,
}

/// What [`Traffic`] saw: the connections, the stream, and how many packets to the ClusterIP
/// went untranslated meanwhile.
struct Outcome {
    load: LoadReport,
    stream: StreamReport,
    untranslated: u64,
}

impl Traffic {
    fn start(sb: &Sandbox) -> Self {
        let untranslated = untranslated_packets(sb);
        let netns = sb.pod("client").expect("client pod").netns.clone();
        let vip = SocketAddrV4::new(VIP, 80);
        let stream = LongStream::start(&netns, vip, STALL).expect("starting the long stream");
        let load = ConnectionLoad::start(&netns, vip, &backend_names(), LoadOptions::default())
            .expect("starting the connection load");
        thread::sleep(LEAD);
        Self {
            load,
            stream,
            untranslated,
        }
    }

    /// Marks the start of an event on the load's clock, with the stream's byte count then.
    fn mark(&self) -> (Duration, u64) {
        (self.load.elapsed(), self.stream.received())
    }

    fn finish(self, sb: &Sandbox) -> Outcome {
        thread::sleep(TAIL);
        Outcome {
            load: self.load.finish(),
            stream: self.stream.finish(),
            untranslated: untranslated_packets(sb) - self.untranslated,
        }
    }
}

/// Every connection succeeded, some of them while svcproxy was being replaced (between the
/// marks `from` and `to`), the stream went on, unbroken, after `to`, and no packet to the
/// ClusterIP ever met an interface without a program.
fn assert_nothing_lost(
    what: &str,
    Outcome {
        load: report,
        stream,
        untranslated,
    }: &Outcome,
    from: (Duration, u64),
    to: (Duration, u64),
    datapath: &str,
) {
    eprintln!(
        "{what}: {}; event from {:?} to {:?} of the load; stream {} bytes",
        report.summary(),
        from.0,
        to.0,
        stream.received
    );
    let failed: Vec<String> = report
        .failures()
        .take(5)
        .map(|c| format!("#{} at {:?}: {:?}", c.index, c.started, c.outcome))
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} connections lost ({:?}); first: {failed:#?}; datapath: {datapath}",
        report.attempted() - report.succeeded(),
        report.attempted(),
        report.failure_summary(),
    );
    assert!(
        report.succeeded_between(from.0, to.0) > 0,
        "{what}: no connection started between {:?} and {:?}, so the load did not overlap the \
         event: {}",
        from.0,
        to.0,
        report.summary()
    );
    assert_eq!(
        *untranslated, 0,
        "{what}: {untranslated} packets to the ClusterIP reached the node untranslated: for a \
         moment an interface had no program"
    );
    if let Some(broken) = &stream.broken {
        panic!("{what}: the long stream broke: {broken}; datapath: {datapath}");
    }
    assert!(
        stream.received > to.1,
        "{what}: the stream got nothing after the event ({} bytes at its start, {} at its end, \
         {} in all)",
        from.1,
        to.1,
        stream.received
    );
}

/// The rolling update: the old svcproxy exits cleanly, then the new one adopts the pins and
/// replaces the program in every link.
#[test]
fn upgrade_after_a_clean_exit_replaces_every_program_and_loses_no_connection() {
    let _serial = serial();
    let (sb, manifests) = cluster("upclean");
    let mut proxy = start_proxy(&sb, &manifests);
    let before = links(proxy.pin_dir());
    assert_eq!(before.len(), 4, "one link per pod veth: {before:?}");

    let traffic = Traffic::start(&sb);
    let from = traffic.mark();
    proxy.restart(&sb);
    let after = wait_for_new_programs(proxy.pin_dir(), &before);
    let to = traffic.mark();
    let outcome = traffic.finish(&sb);

    assert_nothing_lost("clean exit, then start", &outcome, from, to, &proxy.stats());
    eprintln!("{}", replaced(&before, &after));
    proxy.stop();
}

/// A surge: the new svcproxy starts while the old one still runs (on other metrics and health
/// ports), takes every link over from it, and then the old one stops without undoing that.
#[test]
fn a_new_svcproxy_takes_the_links_over_from_a_running_one_and_loses_no_connection() {
    let _serial = serial();
    let (sb, manifests) = cluster("upsurge");
    let old = start_proxy(&sb, &manifests);
    let before = links(old.pin_dir());

    let traffic = Traffic::start(&sb);
    let from = traffic.mark();
    let new = old.start_alongside(
        &sb,
        &[
            "--metrics-bind-address",
            "127.0.0.1:10349",
            "--healthz-bind-address",
            "127.0.0.1:10356",
        ],
    );
    let after = wait_for_new_programs(new.pin_dir(), &before);
    // Held to the end: dropping it would remove the pins the new svcproxy runs on.
    let _old_pins = old.stop_keeping_pins();
    let to = traffic.mark();
    let outcome = traffic.finish(&sb);

    assert_nothing_lost("takeover", &outcome, from, to, &new.stats());
    assert_eq!(
        links(new.pin_dir()),
        after,
        "the old svcproxy's exit changed the links the new one took over"
    );
    eprintln!("{}", replaced(&before, &after));
    new.stop();
}

/// A crash (or an OOM kill) and the DaemonSet's restart: nothing of the old process's shutdown
/// runs, and the new one still replaces every program without losing a connection.
#[test]
fn sigkill_and_restart_under_load_lose_no_connection() {
    let _serial = serial();
    let (sb, manifests) = cluster("upkill");
    let mut proxy = start_proxy(&sb, &manifests);
    let before = links(proxy.pin_dir());

    let traffic = Traffic::start(&sb);
    let from = traffic.mark();
    proxy.kill_and_restart(&sb);
    let after = wait_for_new_programs(proxy.pin_dir(), &before);
    let to = traffic.mark();
    let outcome = traffic.finish(&sb);

    assert_nothing_lost("SIGKILL, then start", &outcome, from, to, &proxy.stats());
    eprintln!("{}", replaced(&before, &after));
    proxy.stop();
}

/// An upgrade to a build whose map layout differs from the pinned maps': the new svcproxy
/// refuses to adopt them, says why and how to start over, and touches nothing, so the
/// programs already attached keep serving on the maps they have. Here the other build's map
/// has another value size.
#[test]
fn a_build_with_another_map_layout_is_refused_and_the_datapath_keeps_serving() {
    refused_upgrade("uplayout", |pins| {
        // What an older build would have pinned: the backend map with a wider value. The
        // attached programs keep the map they were loaded with; the pin is only what the next
        // svcproxy finds. The original stays pinned beside it (bpffs names may hold no dot).
        let pin = pins.join(BACKENDS4);
        fs::rename(&pin, pins.join("BACKENDS4_live")).expect("moving the backend map's pin");
        let value = size_of::<proxy_common::backend::Backend4>() + 4;
        bpftool(&[
            "map".as_ref(),
            "create".as_ref(),
            pin.as_os_str(),
            "type".as_ref(),
            "hash".as_ref(),
            "key".as_ref(),
            "4".as_ref(),
            "value".as_ref(),
            value.to_string().as_ref(),
            "entries".as_ref(),
            "4096".as_ref(),
            "name".as_ref(),
            BACKENDS4.as_ref(),
            "flags".as_ref(),
            "1".as_ref(),
        ]);
        vec![
            format!("pinned map {}", pin.display()),
            format!("has value size {value}, this build expects {}", value - 4),
            format!("incompatible svcproxy (layout version {LAYOUT_VERSION})"),
            format!("rm -r {}", pins.display()),
        ]
    });
}

/// The same when every size matches but the recorded layout version does not (a field moved):
/// sizes alone would have let the new build misread every entry.
#[test]
fn maps_recorded_with_another_layout_version_are_refused_even_when_sizes_match() {
    refused_upgrade("upversion", |pins| {
        let other = LAYOUT_VERSION + 1;
        let pin = pins.join(LAYOUT);
        let value = other.to_le_bytes().map(|b| b.to_string());
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "map".as_ref(),
            "update".as_ref(),
            "pinned".as_ref(),
            pin.as_os_str(),
            "key".as_ref(),
        ];
        args.extend(["0", "0", "0", "0", "value"].map(std::ffi::OsStr::new));
        args.extend(value.iter().map(std::ffi::OsStr::new));
        bpftool(&args);
        vec![
            format!("written by svcproxy with map layout version {other}"),
            format!("this build has version {LAYOUT_VERSION}"),
            format!("rm -r {}", pins.display()),
        ]
    });
}

fn bpftool(args: &[&std::ffi::OsStr]) {
    let out = std::process::Command::new("bpftool")
        .args(args)
        .output()
        .expect("running bpftool (installed by `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stops svcproxy under load keeping its pins, lets `tamper` make them another build's (it
/// returns what the refusal must say), starts the current build over them, and checks that it
/// refuses, says so, leaves the links alone, and that the load lost nothing.
fn refused_upgrade(tag: &str, tamper: impl FnOnce(&std::path::Path) -> Vec<String>) {
    let _serial = serial();
    let (sb, manifests) = cluster(tag);
    let proxy = start_proxy(&sb, &manifests);
    let before = links(proxy.pin_dir());
    let incompatible = proxy.command(&sb);

    let traffic = Traffic::start(&sb);
    let from = traffic.mark();
    let pins = proxy.stop_keeping_pins();
    let expected = tamper(&pins.0);

    let log = std::env::temp_dir().join(common::unique("svcproxy-refused.log"));
    let log_file = fs::File::create(&log).expect("log file");
    let mut child = {
        let mut cmd = incompatible;
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file);
        cmd.spawn().expect("starting the incompatible svcproxy")
    };
    let deadline = Instant::now() + STARTUP;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for svcproxy") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let printed = fs::read_to_string(&log).unwrap_or_default();
    let _ = fs::remove_file(&log);
    let to = traffic.mark();
    let outcome = traffic.finish(&sb);

    assert!(
        status.is_some_and(|s| !s.success()),
        "svcproxy adopted maps of another layout (status {status:?}):\n{printed}"
    );
    for expected in expected {
        assert!(
            printed.contains(&expected),
            "the refusal does not say {expected:?}:\n{printed}"
        );
    }
    assert_eq!(
        links(&pins.0),
        before,
        "the refused svcproxy changed the attached programs"
    );
    assert_nothing_lost(
        "refused upgrade",
        &outcome,
        from,
        to,
        "(no svcproxy running)",
    );
}
