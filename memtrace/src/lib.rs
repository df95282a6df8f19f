//! memtrace: finds what grows, and where, in running processes, from
//! outside. Data flows one way, and the modules are its stages:
//!
//! - `process`, `binary`: discovery: a process, its memory map and memory,
//!   and the binaries it maps.
//! - `python`: which CPython a process runs, its structure layouts, and
//!   what can be read of it from outside (code objects, pymalloc's count).
//! - `probes`: where each probe goes, and loading and attaching them.
//! - `collect`: the kernel maps read into plain values.
//! - `symbolize`: those values turned into tracebacks.
//! - `snapshot`: tracebacks with sizes and counts, ungrouped.
//! - `report`: the report model built from snapshots, and its writers.
//! - `session`: drives the stages for the traced processes.
//!
//! `cli` holds the command-line options; the binary only runs a session.

pub mod binary;
pub mod census;
pub mod cli;
pub mod collect;
pub mod coverage;
pub mod filter;
pub mod probes;
pub mod process;
pub mod python;
pub mod report;
pub mod session;
pub mod snapshot;
pub mod symbolize;
