//! Probes: the allocator catalog, where each probe goes, the plan for one
//! target, the kernel checks, and loading and attaching the BPF programs.

pub mod attach;
pub mod catalog;
pub mod inlined;
pub mod kernel;
pub mod placement;
pub mod plan;
