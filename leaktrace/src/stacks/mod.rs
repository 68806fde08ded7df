//! Stacks of allocation sites: the caller's native frame, symbolized, and the Python stack the
//! kernel walked.

pub mod python;
pub mod symbolize;
