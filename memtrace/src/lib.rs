//! memtrace: finds what grows, and where, in running processes, from
//! outside. Data flows one way, and the modules are its stages:
//!
//! - `process`, `binary`: discovery: a process, its memory map and memory,
//!   and the binaries it maps.
//! - `python`: which CPython a process runs, its structure layouts as
//!   data, and what can be read of it from outside (code objects).
//! - `probes` and `census`: where each probe goes, and loading and
//!   attaching them; and what a process holds, read from its memory with
//!   no probe (its memory, pymalloc's count, its objects by type).
//! - `collect`: the kernel maps read into plain values; `coverage` holds
//!   them against pymalloc's own count.
//! - `symbolize`: those values turned into tracebacks.
//! - `snapshot`: tracebacks with sizes and counts, ungrouped; `filter`
//!   keeps those tracemalloc's filters would.
//! - `report`: the report model built from snapshots and censuses, and one
//!   writer per output format.
//! - `session`: drives the stages for the traced processes; in host mode,
//!   `escalation` decides which growing process to trace for a while.
//!
//! `cli` holds the command-line options and builds the outputs;
//! `privileges` says what memtrace must be allowed, and why the kernel
//! refused; `progress` names the steps of a slow start on a terminal; the
//! binary runs a session or a subcommand.

pub mod binary;
pub mod census;
pub mod cli;
pub mod collect;
pub mod coverage;
pub mod escalation;
pub mod filter;
pub mod privileges;
pub mod probes;
pub mod process;
pub mod progress;
pub mod python;
pub mod report;
pub mod session;
pub mod snapshot;
pub mod symbolize;
pub mod type_births;
