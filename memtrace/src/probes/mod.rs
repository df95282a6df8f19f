//! Probes: the allocator catalog, where each probe goes, the plan for one
//! target, the kernel checks, loading and attaching the BPF programs, and
//! the unwind rules the kernel side unwinds native stacks with.

pub mod attach;
pub mod catalog;
pub mod inlined;
pub mod kernel;
pub mod placement;
pub mod plan;
pub mod unwinding;
