//! Stacks of allocation sites: the Python stack the kernel walked, the native stack unwound
//! from the kernel's stack copy, their symbols, and the two merged into one.

pub mod merge;
pub mod native;
pub mod python;
pub mod symbolize;
