//! Running external commands (mostly `ip`) so that every failure names the command line and
//! its stderr.

use std::{
    ffi::OsStr,
    io,
    process::{Command, Stdio},
};

use anyhow::{Result, anyhow, bail};

/// Runs `ip ARGS...` and returns its stdout.
///
/// The error says which `ip` invocation failed and what it printed on stderr, because "RTNETLINK
/// answers: File exists" alone does not tell which of a dozen setup steps went wrong.
pub fn ip<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run(&mut cmd)
}

/// Runs `cmd` to completion with stdin closed and returns its stdout (lossily decoded).
///
/// Fails, naming the command line, when it cannot be started or exits unsuccessfully.
pub fn run(cmd: &mut Command) -> Result<String> {
    let line = command_line(cmd);
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            anyhow!("could not run `{line}`: {e} (is the program installed and on PATH?)")
        } else {
            anyhow!("could not run `{line}`: {e}")
        }
    })?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command as a shell-like line, for error messages.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}
