//! Rebuilds the eBPF object when bpf-linker changes, as aya-template does: the linker is part of
//! the toolchain but cargo cannot see it.
use which::which;

fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
