#![no_std]
// Empty library target: memtrace's build.rs depends on this crate so that cargo
// rebuilds the eBPF object whenever the kernel side changes.
