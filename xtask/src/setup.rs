//! `cargo xtask setup`: idempotently installs what building and testing svcproxy needs on a
//! Debian 12 host (LLVM 22 and tools from apt, nightly's rust-src, bpf-linker) and mounts
//! bpffs. Each step checks first and says "ok: ... already present" when there is nothing
//! to do.
use std::{fs, path::Path};

use anyhow::{Context as _, Result, bail};

use crate::util::{self, cargo, command, probe};

/// Debian packages: LLVM 22 (+ Polly, which LLVM 22's cmake/llvm-config wants) for
/// bpf-linker's build, bpftool for inspecting maps, iproute2 for the netns sandbox, iperf3
/// for throughput checks, curl for the demo, util-linux's setpriv for running svcproxy with a
/// reduced capability set (Debian installs util-linux everywhere; listed so that the check
/// says so if it is gone), iptables and nftables for the kube-proxy-shaped rules the traffic
/// benchmark compares against.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "bpftool",
    "iproute2",
    "iperf3",
    "curl",
    "util-linux",
    "iptables",
    "nftables",
];

/// Where Debian's llvm-22 packages put `llvm-config` and the libraries.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// The toolchain aya-build compiles the eBPF crate with (it needs `-Z build-std`).
const NIGHTLY: &str = "nightly";

const BPFFS: &str = "/sys/fs/bpf";

pub fn setup() -> Result<()> {
    ensure_root()?;
    ensure_apt_packages()?;
    ensure_tools()?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_bpffs()?;
    println!("setup: all done");
    Ok(())
}

/// apt, mounting bpffs, loading eBPF programs and creating network namespaces all need root.
pub fn ensure_root() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "svcproxy's setup and tests must run as root (they install packages, mount bpffs, \
             load eBPF programs and create network namespaces); run as root, e.g. \
             `sudo -E env PATH=\"$PATH\" cargo xtask setup`"
        );
    }
    println!("ok: running as root");
    Ok(())
}

fn ensure_apt_packages() -> Result<()> {
    let mut missing = Vec::new();
    for &pkg in APT_PACKAGES {
        let out = probe(command("dpkg-query").args(["-W", "-f=${Status}", pkg]))?.context(
            "`dpkg-query` not found: setup supports Debian-based systems (Debian 12 bookworm); \
             elsewhere install LLVM 22 (dev + polly), bpftool, iproute2, iperf3, curl, \
             util-linux, iptables and nftables yourself",
        )?;
        // dpkg-query exits non-zero for packages it has never heard of; treat that as missing.
        if out.status.success() && String::from_utf8_lossy(&out.stdout) == "install ok installed" {
            continue;
        }
        missing.push(pkg);
    }
    if missing.is_empty() {
        println!(
            "ok: Debian packages already present ({})",
            APT_PACKAGES.join(" ")
        );
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    // On bookworm the llvm-22 packages come from the bookworm-security suite.
    let hint = "check network access and that the apt sources include bookworm-security \
                (where bookworm gets llvm-22)";
    util::run(command("apt-get").arg("update"), hint)?;
    util::run(
        command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
        hint,
    )
}

/// Programs the tests and benchmarks run, with the package that brings each and the flag
/// that makes it print its version (`ip` knows no `--version`).
const TOOLS: &[(&str, &str, &str)] = &[
    ("ip", "iproute2", "-V"),
    ("bpftool", "bpftool", "--version"),
    ("iperf3", "iperf3", "--version"),
    ("iptables-restore", "iptables", "--version"),
    ("nft", "nftables", "--version"),
];

/// Confirms each of [`TOOLS`] runs: an installed package whose binary is not on PATH (e.g.
/// `/usr/sbin` missing from a non-login shell's PATH) would otherwise fail deep inside a test.
fn ensure_tools() -> Result<()> {
    for &(tool, pkg, version) in TOOLS {
        let runs = probe(command(tool).arg(version))?.is_some_and(|o| o.status.success());
        if !runs {
            bail!(
                "`{tool} {version}` does not run although {pkg} is installed; add its directory \
                 (usually /usr/sbin) to PATH"
            );
        }
    }
    let names: Vec<&str> = TOOLS.iter().map(|t| t.0).collect();
    println!("ok: tools run ({})", names.join(" "));
    Ok(())
}

fn ensure_rust_src() -> Result<()> {
    let out = probe(command("rustup").args([
        "component",
        "list",
        "--toolchain",
        NIGHTLY,
        "--installed",
    ]))?
    .context(
        "`rustup` not found: install Rust with rustup (https://rustup.rs), then rerun setup",
    )?;
    if !out.status.success() {
        bail!(
            "rustup could not list the {NIGHTLY} toolchain's components ({}); install it with \
             `rustup toolchain install {NIGHTLY}` and rerun setup",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // Installed components are listed as `rust-src` (no target suffix: it is target-independent).
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == "rust-src" || l.trim().starts_with("rust-src-"))
    {
        println!("ok: rust-src for {NIGHTLY} already present");
        return Ok(());
    }
    println!("setup: adding rust-src to the {NIGHTLY} toolchain (eBPF builds use -Z build-std)");
    util::run(
        command("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]),
        "check network access and that the nightly toolchain is installed \
         (`rustup toolchain install nightly`)",
    )
}

fn ensure_bpf_linker() -> Result<()> {
    if let Some(out) = probe(command("bpf-linker").arg("--version"))?
        && out.status.success()
    {
        let version = String::from_utf8_lossy(&out.stdout);
        println!("ok: bpf-linker already present ({})", version.trim());
        return Ok(());
    }
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        bail!(
            "{LLVM_PREFIX}/bin/llvm-config is missing, so bpf-linker cannot be built; \
             install llvm-22-dev and libpolly-22-dev (apt) and rerun setup"
        );
    }
    println!("setup: installing bpf-linker against LLVM 22 (takes a minute or two)");
    util::run(
        cargo()
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            // Without these, bpf-linker's build script finds Debian's default llvm-config (an
            // older LLVM) and linking fails with "unable to find library -lLLVM".
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
        "read the compiler output above; usually llvm-22-dev or libpolly-22-dev is missing",
    )?;
    // Confirm the fresh binary is the one child processes will find.
    let found = probe(command("bpf-linker").arg("--version"))?;
    if !found.is_some_and(|o| o.status.success()) {
        bail!(
            "bpf-linker was installed but cannot be run from {}; add that directory to PATH",
            util::cargo_bin_dir()
                .map_or_else(|| "cargo's bin dir".into(), |d| d.display().to_string())
        );
    }
    Ok(())
}

/// aya pins maps under bpffs; without it loading the proxy fails.
pub fn ensure_bpffs() -> Result<()> {
    if bpffs_mounted()? {
        println!("ok: bpffs already mounted at {BPFFS}");
        return Ok(());
    }
    println!("setup: mounting bpffs at {BPFFS}");
    fs::create_dir_all(BPFFS).with_context(|| format!("could not create {BPFFS}"))?;
    util::run(
        command("mount").args(["-t", "bpf", "bpf", BPFFS]),
        "in a container, run it privileged or mount bpffs on the host \
         (`mount -t bpf bpf /sys/fs/bpf`)",
    )
}

/// Looks for a `bpf` filesystem at [`BPFFS`] in our mount table (what `mountpoint` does,
/// plus a check that it really is bpffs).
fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/self/mounts")
        .context("could not read /proc/self/mounts to check for bpffs; is /proc mounted?")?;
    let mut other = None;
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_src), Some(target), Some(fstype)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if target == BPFFS {
            if fstype == "bpf" {
                return Ok(true);
            }
            other = Some(fstype.to_owned());
        }
    }
    if let Some(fstype) = other {
        bail!(
            "{BPFFS} is mounted but as {fstype}, not bpf; unmount it (`umount {BPFFS}`) and \
             rerun setup"
        );
    }
    Ok(false)
}
