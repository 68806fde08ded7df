//! Analysis of the live heap: is a stack's memory a leak, a cache, steady churn or start-up
//! state (`classify`, from each site's `heap::trend`), which objects are live by type
//! (`census`), and the heap snapshot read from outside (`snapshot`).

pub mod census;
pub mod classify;
pub mod snapshot;
pub mod why;
