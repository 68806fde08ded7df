//! The uprobes: which allocator functions to probe (`plan`), at which instruction
//! (`placement`), and loading and attaching the BPF programs (`loader`).

mod coverage;
pub mod guardian;
pub mod holds;
pub mod loader;
mod names;
pub mod placement;
pub mod plan;
pub mod redirect;
pub mod sampling;
pub mod tables;
pub mod tracefs;
pub mod usdt;
mod usdt_attach;
