//! The demo's requests: from a client pod to Service names, the way `curl ent:8080` would go,
//! checking that every answer comes from one of the Service's own pods and that the load is
//! spread over all of them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};
use svcproxy_tests::{in_netns, tcp_request_here, udp_request_here};

use super::{cluster::Protocol, proxy::Proxy, signals::StopSignal};

/// Tries per name that are printed: enough to show the balancing.
const SHOWN_TRIES: usize = 6;
/// Tries per name before concluding that some endpoint never answers. With two endpoints
/// picked at random, missing one for 40 tries in a row has odds of 2^-39.
const MAX_TRIES: usize = 40;
/// Bound of one exchange once svcproxy is up (it answers in well under a millisecond).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound of one exchange while waiting for svcproxy: without it, a request to a ClusterIP is
/// refused at once (the node has no route), so this only matters if packets get lost.
const READY_REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
const READY_POLL: Duration = Duration::from_millis(200);

/// One name to try from the client pod.
#[derive(Clone, Debug)]
pub struct Target {
    /// `host:port`, as typed after curl.
    pub host: String,
    pub addr: SocketAddrV4,
    pub protocol: Protocol,
    /// `namespace/name` of the Service.
    pub service: String,
    /// Kubernetes names of the pods allowed to answer: the Service's endpoints for this port.
    pub expected: BTreeSet<String>,
    /// Sandbox pod name to Kubernetes pod name, to read UDP replies (which carry the former).
    pub pod_names: BTreeMap<String, String>,
}

impl Target {
    fn label(&self) -> String {
        let port = self.addr.port();
        match self.protocol {
            Protocol::Udp => format!("nc -u {} {port}", self.host),
            _ => format!("curl {}:{port}", self.host),
        }
    }
}

/// What came back for one request.
struct Answer {
    /// The reply on one line.
    text: String,
    /// The Kubernetes pod that answered, if the reply says.
    pod: Option<String>,
}

/// How the tries of one target went.
pub struct Verdict {
    pub target: Target,
    pub seen: BTreeSet<String>,
    pub wrong: usize,
    pub errors: usize,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.wrong == 0 && self.errors == 0 && self.seen == self.target.expected
    }
}

/// One exchange from the current thread's namespace.
fn exchange_here(target: &Target, timeout: Duration) -> Result<Answer> {
    match target.protocol {
        Protocol::Tcp => {
            let request = format!(
                "GET / HTTP/1.0\r\nHost: {}:{}\r\nUser-Agent: svcproxy-demo\r\n\r\n",
                target.host,
                target.addr.port()
            );
            let reply = tcp_request_here(target.addr, request.as_bytes(), timeout)?;
            let reply = String::from_utf8_lossy(&reply);
            let (head, body) = reply
                .split_once("\r\n\r\n")
                .ok_or_else(|| anyhow!("not an HTTP response: {:?}", reply.trim()))?;
            let status = head.lines().next().unwrap_or_default();
            if status.split_whitespace().nth(1) != Some("200") {
                bail!("HTTP status {status:?}");
            }
            let pod = body
                .lines()
                .find_map(|line| line.strip_prefix("Hostname: "))
                .map(|name| name.trim().to_owned());
            let text = body
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" / ");
            Ok(Answer { text, pod })
        }
        Protocol::Udp => {
            let (reply, from) = udp_request_here(target.addr, b"hello\n", timeout)?;
            // Without the reverse translation the reply would come from the pod's own IP, and
            // a real client would drop it.
            if from != target.addr {
                bail!("reply came from {from}, not from {}", target.addr);
            }
            let text = String::from_utf8_lossy(&reply).trim().to_owned();
            let pod = text
                .split_whitespace()
                .next()
                .and_then(|name| target.pod_names.get(name))
                .cloned();
            Ok(Answer { text, pod })
        }
        Protocol::Sctp => bail!("the demo has no SCTP client"),
    }
}

/// Polls every target from `netns` until each one got a right answer (svcproxy has synced),
/// for at most `timeout`.
pub fn wait_ready(
    netns: &str,
    targets: &[Target],
    proxy: &mut Proxy,
    stop: &StopSignal,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<Target> = targets.to_vec();
    let mut last_problem = String::from("no request made yet");
    while !pending.is_empty() {
        if stop.requested() {
            bail!("interrupted while waiting for svcproxy");
        }
        proxy.check_running()?;
        let round = pending.clone();
        let results = in_netns(netns, move || {
            round
                .iter()
                .map(|t| exchange_here(t, READY_REQUEST_TIMEOUT))
                .collect::<Vec<_>>()
        })?;
        let mut still = Vec::new();
        for (target, result) in pending.into_iter().zip(results) {
            match result {
                Ok(Answer { pod: Some(pod), .. }) if target.expected.contains(&pod) => {}
                Ok(answer) => {
                    last_problem = format!("{} -> {}", target.label(), answer.text);
                    still.push(target);
                }
                Err(e) => {
                    last_problem = format!("{}: {e:#}", target.label());
                    still.push(target);
                }
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let synced = if proxy.synced() {
                "svcproxy logged `synced`"
            } else {
                "svcproxy never logged `synced`"
            };
            bail!("no right answer within {timeout:?} ({synced}); last: {last_problem}");
        }
        thread::sleep(READY_POLL);
    }
    Ok(())
}

/// Tries every target from `netns` ([`SHOWN_TRIES`] printed, more until every endpoint
/// answered, at most [`MAX_TRIES`]) and prints a line per try and a verdict per target.
pub fn try_all(netns: &str, targets: Vec<Target>, stop: Arc<AtomicBool>) -> Result<Vec<Verdict>> {
    in_netns(netns, move || {
        let mut verdicts = Vec::new();
        for target in targets {
            if stop.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            verdicts.push(try_one(target, &stop));
        }
        Ok(verdicts)
    })?
}

fn try_one(target: Target, stop: &AtomicBool) -> Verdict {
    let label = target.label();
    let mut verdict = Verdict {
        target,
        seen: BTreeSet::new(),
        wrong: 0,
        errors: 0,
    };
    let mut tries = 0;
    while tries < MAX_TRIES && !stop.load(Ordering::SeqCst) {
        if tries >= SHOWN_TRIES && verdict.seen.is_superset(&verdict.target.expected) {
            break;
        }
        tries += 1;
        let shown = tries <= SHOWN_TRIES;
        match exchange_here(&verdict.target, REQUEST_TIMEOUT) {
            Ok(answer) => {
                let right = answer
                    .pod
                    .as_ref()
                    .is_some_and(|pod| verdict.target.expected.contains(pod));
                if right {
                    if shown {
                        println!("  {label} -> {}", answer.text);
                    }
                    verdict.seen.extend(answer.pod);
                } else {
                    verdict.wrong += 1;
                    println!(
                        "  {label} -> {}   <- WRONG: not a pod of Service {}",
                        answer.text, verdict.target.service
                    );
                }
            }
            Err(e) => {
                verdict.errors += 1;
                println!("  {label} -> ERROR: {e:#}");
            }
        }
    }
    if tries > SHOWN_TRIES {
        println!(
            "  ... {} more tries until every pod had answered",
            tries - SHOWN_TRIES
        );
    }
    print_verdict(&verdict, &label, tries);
    verdict
}

fn print_verdict(verdict: &Verdict, label: &str, tries: usize) {
    let target = &verdict.target;
    let seen: Vec<&str> = verdict.seen.iter().map(String::as_str).collect();
    let missing: Vec<&str> = target
        .expected
        .difference(&verdict.seen)
        .map(String::as_str)
        .collect();
    let mut problems = Vec::new();
    if verdict.wrong > 0 {
        problems.push(format!(
            "{} answers from outside the Service",
            verdict.wrong
        ));
    }
    if verdict.errors > 0 {
        problems.push(format!("{} failed requests", verdict.errors));
    }
    if !missing.is_empty() {
        problems.push(format!(
            "never answered in {tries} tries: {}",
            missing.join(", ")
        ));
    }
    let outcome = if problems.is_empty() {
        format!(
            "all {} pods of Service {}: ok",
            target.expected.len(),
            target.service
        )
    } else {
        format!("FAILED: {}", problems.join("; "))
    };
    println!(
        "  => {label} answered by {} distinct pod(s): {} ({outcome})\n",
        seen.len(),
        if seen.is_empty() {
            "none".into()
        } else {
            seen.join(", ")
        }
    );
}
