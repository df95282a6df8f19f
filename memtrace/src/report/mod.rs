//! Report writers: each reads snapshots and knows nothing of eBPF.

pub mod format;
pub mod text;
