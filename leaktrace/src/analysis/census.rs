//! Type census of live Python objects, from outside: live blocks counted by the type of the
//! object they hold, overall and per site, at the end and against a baseline taken early in the
//! trace — what `objgraph.show_growth()` shows from inside, without a line of code in the target.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::process::malloc_heap;
use crate::process::maps::anonymous_regions;
use crate::process::remote::Remote;
use crate::stacks::python::gc_lists::{follow, Outside};
use crate::stacks::python::objects::{BlockKind, TypeReader};
use crate::stacks::python::pools::{scan, POOL_SIZE};

/// Live blocks by what they hold.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Census {
    /// Type name → (objects, bytes).
    pub by_type: HashMap<String, (u64, u64)>,
    /// Site id → type name → objects.
    pub by_site: HashMap<u64, HashMap<String, u64>>,
    /// Site id → blocks read, objects or not: in sampled mode, the sampled blocks a site's
    /// estimate stands on.
    #[serde(default)]
    pub blocks_by_site: HashMap<u64, u64>,
    /// Blocks that hold no Python object (buffers, C structures), and blocks that could not be
    /// read (the process is gone): (blocks, bytes).
    pub not_objects: (u64, u64),
    pub unreadable: (u64, u64),
    /// pymalloc pools skipped because their header and free list disagreed (read while the
    /// target ran).
    #[serde(default)]
    pub torn_pools: u64,
}

impl Census {
    /// Takes the census of live blocks `(address, size, site id)`.
    pub fn take(reader: &mut TypeReader, blocks: &[(u64, u64, u64)]) -> Census {
        let addrs: Vec<(u64, u64)> = blocks.iter().map(|(a, s, _)| (*a, *s)).collect();
        let kinds = reader.classify(&addrs);
        let mut c = Census::default();
        for ((_, size, site), kind) in blocks.iter().zip(kinds) {
            c.count(kind, *size, *site);
        }
        c
    }

    /// Adds the small objects found in `pid`'s pymalloc pools, each pool's credited to
    /// `site_of(pool address)`; returns the pools walked (torn ones are counted in the census).
    pub fn add_pools(
        &mut self,
        reader: &mut TypeReader,
        pid: u32,
        site_of: impl Fn(u64) -> u64,
    ) -> u64 {
        self.walk_pools(reader, pid, site_of, None)
    }

    /// As `add_pools`, plus the objects the collector tracks outside the pools (over 512 B, or
    /// from another allocator), found by following its lists out of them
    /// (stacks/python/gc_lists.rs); all credited to no site. Returns the pools walked and what
    /// the lists gave.
    pub fn add_pools_and_gc(&mut self, reader: &mut TypeReader, pid: u32) -> (u64, Outside) {
        let mut gc = (HashSet::new(), Vec::new());
        let pools = self.walk_pools(reader, pid, |_| 0, Some(&mut gc));
        let (walked, mut next) = gc;
        next.sort_unstable();
        next.dedup();
        let outside = follow(reader, next, |a| walked.contains(&(a & !(POOL_SIZE - 1))));
        for (name, bytes) in &outside.objects {
            self.count(BlockKind::Object(name.clone()), *bytes, 0);
        }
        (pools, outside)
    }

    /// Adds the objects over 512 B in `pid`'s malloc heaps (pymalloc hands those to malloc)
    /// that the collector's lists did not give (`tracked`: their `PyGC_Head`s) — untracked
    /// types (str, bytes, int) and untracked instances of tracked ones (a tuple of atoms) —
    /// found by walking glibc's chunks (process/malloc_heap); credited to no site.
    pub fn add_malloc_heap(
        &mut self,
        reader: &mut TypeReader,
        pid: u32,
        tracked: &HashSet<u64>,
    ) -> HeapObjects {
        let heap = malloc_heap::walk(pid, SMALL_MAX + 1);
        let blocks: Vec<(u64, u64)> = heap.chunks.iter().map(|c| (c.addr, c.size)).collect();
        let mut found = HeapObjects {
            chunks: blocks.len() as u64,
            arenas: heap.arenas,
            mmapped: heap.mmapped,
            torn: heap.torn,
            tcache: heap.tcache_skipped,
            ..HeapObjects::default()
        };
        for ((_, size), object) in blocks.iter().zip(reader.objects(&blocks)) {
            let Some((name, gc_head)) = object else {
                continue;
            };
            if gc_head.is_none_or(|h| !tracked.contains(&h)) {
                found.objects += 1;
                found.bytes += size;
                self.count(BlockKind::Object(name), *size, 0);
            }
        }
        found
    }

    /// Walks the pools; with `gc`, also notes each pool walked and the collector-list links that
    /// leave it.
    fn walk_pools(
        &mut self,
        reader: &mut TypeReader,
        pid: u32,
        site_of: impl Fn(u64) -> u64,
        mut gc: Option<&mut (HashSet<u64>, Vec<u64>)>,
    ) -> u64 {
        reader.forget_pages();
        let totals = scan(
            &Remote { pid },
            &anonymous_regions(pid),
            |at, data, used| {
                let links = gc.as_mut().map(|(walked, next)| {
                    walked.insert(at);
                    (POOL_SIZE, next)
                });
                let kinds = reader.classify_local(at, data, used, links);
                let site = site_of(at);
                for ((_, size), kind) in used.iter().zip(kinds) {
                    self.count(kind, *size, site);
                }
            },
        );
        self.torn_pools += totals.torn_pools;
        totals.pools
    }

    /// Counts one block.
    fn count(&mut self, kind: BlockKind, size: u64, site: u64) {
        if site != 0 {
            *self.blocks_by_site.entry(site).or_default() += 1;
        }
        match kind {
            BlockKind::Object(name) => {
                // Keys are made once per type, not once per block.
                let e = match self.by_type.get_mut(&*name) {
                    Some(e) => e,
                    None => self.by_type.entry(name.to_string()).or_default(),
                };
                e.0 += 1;
                e.1 += size;
                let per_site = self.by_site.entry(site).or_default();
                match per_site.get_mut(&*name) {
                    Some(n) => *n += 1,
                    None => {
                        per_site.insert(name.to_string(), 1);
                    }
                }
            }
            BlockKind::NotAnObject => {
                self.not_objects.0 += 1;
                self.not_objects.1 += size;
            }
            BlockKind::Unreadable => {
                self.unreadable.0 += 1;
                self.unreadable.1 += size;
            }
        }
    }
}

/// The largest block pymalloc serves; larger requests go to malloc.
const SMALL_MAX: u64 = 512;

/// What the walk of malloc's heaps found (`Census::add_malloc_heap`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct HeapObjects {
    /// Untracked objects found, and the bytes of their blocks.
    pub objects: u64,
    pub bytes: u64,
    /// Chunks in use over 512 B walked, arenas whose heaps were read, mmapped chunks seen.
    pub chunks: u64,
    pub arenas: u64,
    pub mmapped: u64,
    /// Heaps or tcaches left unread because their headers did not chain (torn reads, or a
    /// malloc other than glibc's).
    pub torn: u64,
    /// Chunks over 512 B left out because a thread's tcache holds them (freed).
    pub tcache: u64,
}

/// Types a report keeps: those that grew most, then the largest (the table shows 12).
pub const MAX_TYPES: usize = 200;

/// One type in the report's census.
#[derive(Clone, Debug, Serialize)]
pub struct TypeCount {
    #[serde(rename = "type")]
    pub name: String,
    pub count: u64,
    pub bytes: u64,
    /// Since the baseline (the main module's start): how many more, how many more bytes.
    pub growth_count: i64,
    pub growth_bytes: i64,
}

impl TypeCount {
    /// `      +20000       20,671      1,322,944  dict`: the census tables' row.
    pub fn growth_row(&self) -> String {
        use crate::units::group;
        format!(
            "{:>12} {:>12} {:>14}  {}",
            format!("{:+}", self.growth_count),
            group(self.count),
            group(self.bytes),
            self.name
        )
    }
}

/// The report's census.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TypeCensus {
    /// Seconds into the trace when the baseline was taken (`None`: no baseline).
    pub baseline_t: Option<f64>,
    /// What growth is measured from, in words.
    pub baseline: Option<String>,
    /// Types by growth in bytes, then by bytes (the first `MAX_TYPES`).
    pub types: Vec<TypeCount>,
    pub objects: u64,
    pub not_objects: u64,
    pub unreadable: u64,
    /// pymalloc pools skipped because their header and free list disagreed.
    #[serde(default)]
    pub torn_pools: u64,
}

impl TypeCensus {
    /// Compares the end census with the baseline.
    pub fn of(end: &Census, baseline: Option<(f64, &Census)>, since: Option<String>) -> TypeCensus {
        let mut types: Vec<TypeCount> = end
            .by_type
            .iter()
            .map(|(name, (count, bytes))| {
                let (c0, b0) = baseline
                    .and_then(|(_, b)| b.by_type.get(name).copied())
                    .unwrap_or((0, 0));
                TypeCount {
                    name: name.clone(),
                    count: *count,
                    bytes: *bytes,
                    growth_count: *count as i64 - c0 as i64,
                    growth_bytes: *bytes as i64 - b0 as i64,
                }
            })
            .collect();
        types.sort_by(|a, b| {
            (b.growth_bytes, b.bytes, &a.name).cmp(&(a.growth_bytes, a.bytes, &b.name))
        });
        let objects = types.iter().map(|t| t.count).sum();
        types.truncate(MAX_TYPES);
        TypeCensus {
            baseline_t: baseline.map(|(t, _)| t),
            baseline: since,
            types,
            objects,
            not_objects: end.not_objects.0,
            unreadable: end.unreadable.0,
            torn_pools: end.torn_pools,
        }
    }
}
