//! Running a rule loader (`iptables-restore`, `nft -f -`) in a namespace with the rules on
//! its standard input, as kube-proxy does.

use std::{io::Write as _, process::Stdio, thread};

use anyhow::{Context as _, Result, bail};
use svcproxy_tests::command_in;

/// Runs `program args` in `netns` with `input` on stdin; fails with its stderr.
pub fn stdin_of(netns: &str, program: &str, args: &[&str], input: &str) -> Result<()> {
    let mut child = command_in(netns, program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {program} (installed by `cargo xtask setup`)"))?;
    let mut stdin = child.stdin.take().context("stdin of the rule loader")?;
    let input = input.to_owned();
    // Written from another thread: a loader that fails early stops reading, and the error it
    // prints must still be collected.
    let writer = thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .with_context(|| format!("wait for {program}"))?;
    let written = writer.join();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first: Vec<&str> = stderr.lines().take(10).collect();
        bail!(
            "{program} in {netns} failed ({}): {}",
            out.status,
            first.join("\n")
        );
    }
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e).with_context(|| format!("write the rules to {program}")),
        Err(_) => bail!("the thread writing to {program} panicked"),
    }
}
