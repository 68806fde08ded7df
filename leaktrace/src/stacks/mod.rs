//! Stacks of allocation sites: today the caller's native frame, symbolized.

pub mod symbolize;
