//! Objects the cyclic collector tracks that live outside pymalloc's pools — over 512 B (large
//! tuples, instances with many slots, big frames), or from another allocator — found from
//! outside by following the collector's lists out of the pools.
//!
//! Every tracked object sits in a circular doubly linked list of `PyGC_Head`s (a generation,
//! the permanent generation, 3.14's young and old spaces). The pool walk reads each small
//! tracked object's `_gc_next`; where it leads out of the pools walked, the node there is read:
//! an object whose type is a GC type is counted and its own `_gc_next` followed, until the chain
//! comes back into the pools. A node that is no object is a list's head in the interpreter's
//! state: followed too, a few at most, since a torn read can also leave a stale link. Every
//! node is read once; what cannot be read is counted, not guessed.
//!
//! A list holding no small object at all (rare: a generation of large objects only) is not
//! reached. Objects the collector does not track (str, bytes, int) have no such list: `attach`
//! traces those.

use std::collections::HashSet;
use std::sync::Arc;

use super::objects::{GcNode, TypeReader};

/// Non-object nodes followed at most: each list has one head, and an interpreter a handful.
const MAX_HEADS: u64 = 64;
/// Nodes read at most (a bound for a process rewriting its lists under the walk).
const MAX_NODES: usize = 1 << 24;

/// What following the lists found outside the pools.
#[derive(Debug, Default)]
pub struct Outside {
    /// Each object: its type's name and its size as `sys.getsizeof` gives it.
    pub objects: Vec<(Arc<str>, u64)>,
    /// List heads passed through.
    pub heads: u64,
    /// Nodes that could not be read, and non-object nodes past `MAX_HEADS` (stale links).
    pub skipped: u64,
    /// The `PyGC_Head` address of each object counted.
    pub nodes: HashSet<u64>,
}

/// Follows the collector's lists from `starts` (`_gc_next` links that left the pools), never
/// into a pool (`in_pools` says which addresses are in one already walked).
pub fn follow(
    reader: &mut TypeReader,
    starts: Vec<u64>,
    in_pools: impl Fn(u64) -> bool,
) -> Outside {
    let mut out = Outside::default();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut todo: Vec<u64> = starts;
    while let Some(at) = todo.pop() {
        if at == 0 || in_pools(at) || !seen.insert(at) || seen.len() > MAX_NODES {
            continue;
        }
        match reader.gc_node(at) {
            GcNode::Object { name, bytes, next } => {
                out.objects.push((name, bytes));
                out.nodes.insert(at);
                todo.push(next);
            }
            GcNode::Other { next } if out.heads < MAX_HEADS => {
                out.heads += 1;
                todo.push(next);
            }
            other => {
                log::debug!("collector list node {at:#x} skipped: {other:?}");
                out.skipped += 1;
            }
        }
    }
    out
}
