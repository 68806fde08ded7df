//! leaktrace: find memory leaks in Python processes — C extensions included — from outside the
//! process, with eBPF uprobes on the allocators.
//!
//! The pipeline follows the folders: `probes` (what to probe, where, and loading it into the
//! kernel) → `events` (the kernel's announcements) → `heap` (live allocations per site) →
//! `stacks` (symbolization) → `analysis` → `report`, and `capture` records it all to render later.
//! `process` knows the traced process; `options` says what a session is asked to do; `session`
//! runs it all.

pub mod analysis;
pub mod capture;
pub mod cli;
pub mod error;
pub mod events;
pub mod heap;
pub mod options;
pub mod preload;
pub mod probes;
pub mod process;
pub mod report;
pub mod session;
pub mod stacks;
#[cfg(test)]
mod test_support;
pub mod units;

pub use error::{Error, Result};
