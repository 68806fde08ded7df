//! Analysis of the live heap: is a stack's memory a leak, a cache, steady churn or start-up
//! state (`classify`), from the trend of its live bytes over the trace (`trend`).

pub mod census;
pub mod classify;
pub mod gate;
pub mod snapshot;
pub mod trend;
