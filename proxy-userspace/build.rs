//! Builds the eBPF object (`proxy-ebpf`) for the BPF target with aya-build, so the `svcproxy`
//! binary embeds exactly the programs of this source tree.
use std::{env, fs, path::PathBuf};

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // With AYA_BUILD_SKIP=1 aya-build builds nothing; leave an empty object so the host code
    // still compiles (for pure-logic work without the BPF toolchain). Loading it fails with a
    // clear error at run time.
    if env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
        fs::write(out.join("proxy-ebpf"), [])?;
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../proxy-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "proxy-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
