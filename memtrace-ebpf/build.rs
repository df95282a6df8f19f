//! Rebuilds the eBPF object when bpf-linker changes: the linker, not rustc,
//! produces the final BPF bytecode, so a new linker means a new object.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
