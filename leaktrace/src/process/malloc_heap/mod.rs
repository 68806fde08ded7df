//! glibc malloc's heaps read from outside: which chunks are handed out now, and how large.
//!
//! CPython hands requests over 512 bytes (large str, bytes, int) to malloc, where pymalloc's
//! pool walk cannot see them. To count those, `snapshot` walks glibc's heaps in the target's
//! memory while it runs (no ptrace, nothing injected). The layout read is glibc 2.35–2.36's on
//! x86_64, checked against glibc-2.36's malloc/malloc.c and malloc/arena.c, and what differs in
//! Debian sid's 2.43 (the Python 3.14 the tests run) found from the heap itself:
//! - a chunk is `prev_size` (8 bytes), `size` (8; low bits PREV_INUSE 1, IS_MMAPPED 2,
//!   NON_MAIN_ARENA 4), then the user's memory; chunks follow each other in 16-byte steps, and
//!   one is handed out iff the next one's PREV_INUSE is set;
//! - the main arena's chunks fill `[heap]` from its start to the top chunk, which ends it;
//! - other arenas' heaps are mappings aligned to `HEAP_MAX_SIZE` (64 MiB) that start with
//!   `heap_info` (`ar_ptr`, `prev`, `size`, `mprotect_size`, `pagesize`, pad: 48 bytes; before
//!   2.35, without `pagesize`: 32); an arena's first heap holds its `malloc_state` (2200 bytes;
//!   2.43: 96 fewer) next, so its first chunk is at 0x8d0 (others: found by chaining), a later
//!   heap's right after `heap_info`; a heap ends at `size`, with the top chunk or, once the
//!   arena has moved on to a newer heap, a 16-byte fencepost and a zero header;
//! - a chunk of `mmap_threshold` (128 KiB) or more is its own mapping: `prev_size` 0, then its
//!   size in whole pages (2.43: less its 16-byte header) with IS_MMAPPED alone, at the start of
//!   a page;
//! - freed chunks in a tcache keep the next chunk's PREV_INUSE: each thread's
//!   `tcache_perthread_struct` (in a 0x290-byte chunk: `u16 counts[64]`, `entries[64]`) lists
//!   them, up to 1032 usable bytes, through `next` at their start, stored as `next ^ (address of
//!   that field >> 12)`, with the process-wide `tcache_key` after it.
//!
//! The target runs while it is read, so every header is checked (sizes are 16-byte multiples of
//! at least 32 that stay inside the heap, the bits fit the arena, a heap's chain ends exactly at
//! its end, read again when the top chunk has moved it) and a heap whose chain still breaks on
//! the third walk is left there and counted as torn. The tcaches' own 0x290-byte chunks are
//! malloc's and count as in use. Not read: fastbins (their chunks, 120 usable bytes at most, look
//! in use), heaps on huge pages, a main arena outside `[heap]`, and mmapped chunks from
//! `memalign` with more than 16-byte alignment.

use std::collections::HashSet;

mod mmapped;
mod tcache;

use mmapped::mmapped_in;
use tcache::read_tcaches;

use super::maps::anonymous_regions;
use super::remote::{word, Remote};
use super::Process;

const PREV_INUSE: u64 = 1;
const IS_MMAPPED: u64 = 2;
const NON_MAIN_ARENA: u64 = 4;
const FLAGS: u64 = 7;
/// `CHUNK_HDR_SZ`, also malloc's alignment; `MINSIZE`.
const HDR: u64 = 16;
const MIN_CHUNK: u64 = 32;
const PAGE: u64 = 4096;
/// `HEAP_MAX_SIZE` on 64-bit (`2 * DEFAULT_MMAP_THRESHOLD_MAX`), which non-main heaps align to.
const HEAP_MAX: u64 = 64 << 20;
/// `sizeof (heap_info)` since 2.35 added `pagesize`.
const HEAP_INFO: u64 = 48;
/// `heap_info` before glibc 2.35 (no `pagesize`).
const HEAP_INFO_OLD: u64 = 32;
/// An arena's first chunk: past `heap_info` and `malloc_state`, moved up until its user memory
/// is aligned (`_int_new_arena`).
const FIRST_CHUNK: u64 = (HEAP_INFO + 2200 + HDR).next_multiple_of(HDR) - HDR;
/// How much of a heap one system call reads.
const PIECE: u64 = 1 << 20;
/// Walks of a heap before its break is taken as it stands.
const WALKS: usize = 3;
/// Times one walk reads its heap's bounds again.
const REREADS: usize = 4;
/// Pages whose first 16 bytes one system call reads when looking for mmapped chunks.
const PAGES_AT_ONCE: usize = 512;

/// One chunk handed out: the pointer malloc returned and the usable size behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// The address malloc returned.
    pub addr: u64,
    /// Usable bytes (the chunk's size less its header, plus the next chunk's `prev_size`).
    pub size: u64,
}

/// What a walk of a process's malloc heaps found.
#[derive(Debug, Default)]
pub struct HeapWalk {
    /// The chunks in use of at least the asked usable size, by address.
    pub chunks: Vec<Chunk>,
    /// Arenas whose heaps were found (the main one included).
    pub arenas: u64,
    /// mmapped chunks found, of any size.
    pub mmapped: u64,
    /// Heaps left part-way and tcaches left unread because their headers did not chain (a torn
    /// read of a running target).
    pub torn: u64,
    /// Chunks of at least the asked size left out because a tcache holds them: freed.
    pub tcache_skipped: u64,
}

/// Lists the chunks of `pid`'s malloc heaps that are in use now with at least `min_size`
/// usable bytes. What cannot be read is left out, never guessed.
pub fn walk(pid: u32, min_size: u64) -> HeapWalk {
    let mem = Remote { pid };
    let regions = anonymous_regions(pid);
    let mut heaps: Vec<Heap> = main_heap(pid).into_iter().collect();
    // The main arena lives in libc, at an address the walk never needs: 0 stands for it.
    let mut arenas: HashSet<u64> = heaps.iter().map(|_| 0).collect();
    for (heap, arena) in arena_heaps(&mem, &regions) {
        arenas.insert(arena);
        heaps.push(heap);
    }
    let mut out = HeapWalk {
        arenas: arenas.len() as u64,
        ..HeapWalk::default()
    };
    let mut found = Found::default();
    for heap in &heaps {
        if !walk_heap_again(&mem, heap, min_size, &mut found) {
            out.torn += 1;
        }
    }
    let tcaches = read_tcaches(&mem, &found.tcaches);
    out.torn += tcaches.torn;
    for (chunk, key) in found.seen {
        // `tcache_get` clears the key of a chunk it hands out again: only entries carry it.
        let keyed = tcaches.key.is_some() && key == tcaches.key;
        if keyed || tcaches.listed.contains(&chunk.addr) {
            out.tcache_skipped += 1;
        } else {
            out.chunks.push(chunk);
        }
    }
    let non_main: Vec<u64> = heaps.iter().filter(|h| !h.main).map(|h| h.start).collect();
    for &region in &regions {
        mmapped_in(&mem, region, &non_main, |chunk| {
            out.mmapped += 1;
            if chunk.size >= min_size {
                out.chunks.push(chunk);
            }
        });
    }
    out.chunks.sort_by_key(|c| c.addr);
    out
}

/// One heap: where its mapping starts, its first chunk, and where its chunks end.
#[derive(Clone, Debug)]
struct Heap {
    start: u64,
    first: u64,
    end: u64,
    main: bool,
}

/// The main arena's heap, `[heap]`: sbrk's memory, whose first chunk is at its start (aligned).
fn main_heap(pid: u32) -> Option<Heap> {
    let maps = Process { pid }.maps().ok()?;
    let m = maps.iter().find(|m| m.path == "[heap]")?;
    Some(Heap {
        start: m.start,
        first: m.start.next_multiple_of(HDR),
        end: m.end,
        main: true,
    })
}

/// The heaps of the other arenas, each with its arena's address: the `HEAP_MAX`-aligned
/// addresses of anonymous memory that begin with a consistent `heap_info`.
fn arena_heaps(mem: &Remote, regions: &[(u64, u64)]) -> Vec<(Heap, u64)> {
    let starts: Vec<(u64, u64)> = regions
        .iter()
        .flat_map(|&(s, e)| {
            (s.next_multiple_of(HEAP_MAX)..e)
                .step_by(HEAP_MAX as usize)
                .map(move |a| (a, e))
        })
        .filter(|(a, e)| a + HEAP_INFO <= *e)
        .collect();
    let ranges: Vec<(u64, usize)> = starts.iter().map(|(a, _)| (*a, 40)).collect();
    starts
        .iter()
        .zip(mem.read_many(&ranges))
        .filter_map(|(&(at, region_end), info)| heap_at(at, region_end, &info?))
        .map(|(mut heap, arena)| {
            if heap.first == heap.start + FIRST_CHUNK {
                heap.first = first_chunk(mem, &heap).unwrap_or(heap.first);
            }
            (heap, arena)
        })
        .collect()
}

/// Chunks a first heap's first chunk must chain into to be taken for it, and the bytes of the
/// heap read to see them.
const FIRST_CHAIN: usize = 8;
const FIRST_READ: u64 = 64 << 10;

/// Where an arena's first heap has its first chunk. `malloc_state`'s size is glibc's to
/// change (2200 bytes up to 2.41; Debian sid's 2.43 has 96 fewer): 2.36's offset is taken
/// unless its header contradicts it; else the first 16-byte offset from which `FIRST_CHAIN`
/// chunks (or all up to the heap's end) chain. The first chunk of a heap has `PREV_INUSE` set
/// (nothing is before it); `malloc_state`'s words are bin pointers (low bits clear), counters
/// and sizes that chain nowhere.
fn first_chunk(mem: &Remote, heap: &Heap) -> Option<u64> {
    let len = (heap.end - heap.start).min(FIRST_READ);
    let head = mem.read(heap.start, len as usize)?;
    // Some(true): it chains; Some(false): it cannot be a chunk; None: past what was read.
    let chains = |off: u64| -> Option<bool> {
        let mut at = off;
        for step in 0..FIRST_CHAIN {
            let size = word(&head, at + 8)?;
            let len = size & !FLAGS;
            if (step == 0 && size & PREV_INUSE == 0)
                || size & IS_MMAPPED != 0
                || len < MIN_CHUNK
                || !len.is_multiple_of(HDR)
                || len > heap.end - heap.start - at
            {
                return Some(false);
            }
            at += len;
            if heap.start + at == heap.end {
                return Some(true);
            }
        }
        Some(true)
    };
    if chains(FIRST_CHUNK) != Some(false) {
        return Some(heap.start + FIRST_CHUNK);
    }
    (HEAP_INFO + 1024..PAGE)
        .step_by(HDR as usize)
        .find(|&off| chains(off) == Some(true))
        .map(|off| heap.start + off)
}

/// The heap whose `heap_info` is `h`, read at `at`, if it holds together.
fn heap_at(at: u64, region_end: u64, h: &[u8]) -> Option<(Heap, u64)> {
    let (arena, prev, size) = (word(h, 0)?, word(h, 8)?, word(h, 16)?);
    let (mprotect_size, pagesize) = (word(h, 24)?, word(h, 32)?);
    // 2.35 added `pagesize`; before it `heap_info` is four words.
    let info = if pagesize == PAGE {
        HEAP_INFO
    } else {
        HEAP_INFO_OLD
    };
    // The first heap holds its arena; a later one points back to it, in another heap.
    let first_heap = prev == 0;
    let linked = if first_heap {
        arena == at + info
    } else {
        prev.is_multiple_of(HEAP_MAX) && arena % HEAP_MAX == info
    };
    // A first heap's first chunk is checked (and found when elsewhere) by `first_chunk`.
    let first = at + if first_heap { FIRST_CHUNK } else { info };
    let sane = size.is_multiple_of(PAGE)
        && size <= mprotect_size
        && mprotect_size <= HEAP_MAX
        && size <= region_end.saturating_sub(at)
        && first + MIN_CHUNK <= at + size;
    (linked && sane).then_some((
        Heap {
            start: at,
            first,
            end: at + size,
            main: false,
        },
        arena,
    ))
}

/// What the heap walks gathered.
#[derive(Default)]
struct Found {
    /// The chunks in use by their heap's headers, before the tcaches are taken out: each with
    /// its second word, which a tcache entry's key would be.
    seen: Vec<(Chunk, Option<u64>)>,
    /// User addresses and sizes of chunks in use of a tcache's size, which may be one.
    tcaches: Vec<(u64, u64)>,
}

/// A heap's memory, read front to back in large pieces as a walk moves through it.
struct Cursor<'a> {
    mem: &'a Remote,
    end: u64,
    base: u64,
    buf: Vec<u8>,
}

impl Cursor<'_> {
    fn word(&mut self, addr: u64) -> Option<u64> {
        let held = addr >= self.base && addr + 8 <= self.base + self.buf.len() as u64;
        if !held {
            let len = self.end.checked_sub(addr)?.min(PIECE);
            if len < 8 {
                return None;
            }
            // A heap that shrank since its bounds were read ends before the piece does.
            let to_page = (addr + 8).next_multiple_of(PAGE) - addr;
            self.buf = self
                .mem
                .read(addr, len as usize)
                .or_else(|| self.mem.read(addr, to_page.min(len) as usize))?;
            self.base = addr;
        }
        word(&self.buf, addr - self.base)
    }
}

/// Walks one heap's chunks into `found`; false when the chain broke before the heap's end.
fn walk_heap(mem: &Remote, heap: &Heap, min_size: u64, found: &mut Found) -> bool {
    let mut heap = heap.clone();
    let mut cur = Cursor {
        mem,
        end: heap.end,
        base: 0,
        buf: Vec::new(),
    };
    let mut rereads = 0;
    let mut p = heap.first;
    let Some(mut head) = cur.word(p + 8) else {
        return false;
    };
    loop {
        let size = head & !FLAGS;
        if size < MIN_CHUNK {
            // A heap its arena has moved on from ends in a 16-byte fencepost and a zero header.
            let zero_next = cur.word(p + HDR + 8).is_some_and(|h| h & !FLAGS == 0);
            return (size == 0 && p + HDR == heap.end)
                || (size == HDR && p + 2 * HDR == heap.end && zero_next);
        }
        let Some(next) = sane(head, &heap).and_then(|s| p.checked_add(s)) else {
            return false;
        };
        let mut next_head = None;
        while next != heap.end {
            next_head = cur.word(next + 8).filter(|h| follows(*h, next, &heap));
            if next_head.is_some() || rereads == REREADS {
                break;
            }
            // The top chunk moves with the heap's end, which may have changed since it was read.
            rereads += 1;
            let Some(now) = bounds_now(mem, &heap).filter(|h| h.first == heap.first) else {
                break;
            };
            heap = now;
            cur.end = heap.end;
        }
        if next == heap.end {
            return true; // the top chunk
        }
        let Some(next_head) = next_head else {
            return false;
        };
        // The chunk before the closing zero header is a fencepost, never the user's.
        let closing = next_head & !FLAGS == 0;
        if next_head & PREV_INUSE != 0 && !closing {
            if !heap.main && head & NON_MAIN_ARENA == 0 {
                return false;
            }
            in_use(&mut cur, p, size, min_size, found);
        }
        p = next;
        head = next_head;
    }
}

/// The size in the chunk header `head`, when it can be one of `heap`'s.
fn sane(head: u64, heap: &Heap) -> Option<u64> {
    let size = head & !FLAGS;
    let bad_bits = head & IS_MMAPPED != 0 || (heap.main && head & NON_MAIN_ARENA != 0);
    (!bad_bits && size >= MIN_CHUNK && size.is_multiple_of(HDR)).then_some(size)
}

/// Whether `head`, read at chunk `at`, continues the chain: a chunk that stays inside the heap,
/// or one of the fenceposts that close it.
fn follows(head: u64, at: u64, heap: &Heap) -> bool {
    match head & !FLAGS {
        0 => at + HDR == heap.end,
        HDR => at + 2 * HDR == heap.end,
        _ => sane(head, heap).is_some_and(|s| at.checked_add(s).is_some_and(|e| e <= heap.end)),
    }
}

/// Walks a heap until one walk gets through it whole: a running target moves chunks while it is
/// read, and a break seen one moment is often gone the next. The last walk keeps what it saw
/// before its break.
fn walk_heap_again(mem: &Remote, heap: &Heap, min_size: u64, found: &mut Found) -> bool {
    for _ in 1..WALKS {
        let mut attempt = Found::default();
        if walk_heap(mem, heap, min_size, &mut attempt) {
            found.seen.append(&mut attempt.seen);
            found.tcaches.append(&mut attempt.tcaches);
            return true;
        }
    }
    walk_heap(mem, heap, min_size, found)
}

/// `heap` with its bounds read again.
fn bounds_now(mem: &Remote, heap: &Heap) -> Option<Heap> {
    if heap.main {
        return main_heap(mem.pid);
    }
    let info = mem.read(heap.start, 40)?;
    heap_at(heap.start, heap.start + HEAP_MAX, &info).map(|(h, _)| h)
}

/// Records the chunk at `p`, in use, when it is large enough or may be a tcache.
fn in_use(cur: &mut Cursor, p: u64, size: u64, min_size: u64, found: &mut Found) {
    let addr = p + HDR;
    // A chunk in a heap uses the next chunk's `prev_size` too.
    let usable = size - 8;
    if tcache::may_be_tcache(size) {
        found.tcaches.push((addr, size));
    }
    if usable < min_size {
        return;
    }
    // 2.42+ keeps larger chunks in a tcache too: every chunk's second word is looked at.
    let key = cur.word(addr + 8);
    found.seen.push((Chunk { addr, size: usable }, key));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::path::Path;
    use std::process::{Command, Stdio};

    /// Live after the frees, each block filled with its marker: 700 B ×275 ('A'; 7 of the 25
    /// freed in the main thread's tcache), 4000 B ×16, 300 KiB ×4 (mmapped); from a second
    /// thread, in its own arena, 2000 B ×40 and 600 B ×7 (its 3 freed ones in its tcache).
    const PROGRAM: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static volatile int other_ready;
static void *take(size_t n, char marker) { return memset(malloc(n), marker, n); }
static void *other(void *unused) {
    static void *d[50], *e[10];
    for (int i = 0; i < 50; i++) d[i] = take(2000, 'D');
    for (int i = 0; i < 10; i++) e[i] = take(600, 'E');
    for (int i = 0; i < 10; i++) free(d[i]);
    for (int i = 0; i < 3; i++) free(e[i]);
    other_ready = 1;
    for (;;) pause();
}
int main(void) {
    static void *a[300], *b[20], *c[5];
    for (int i = 0; i < 300; i++) a[i] = take(700, 'A');
    for (int i = 0; i < 20; i++) b[i] = take(4000, 'B');
    for (int i = 0; i < 5; i++) c[i] = take(300 * 1024, 'C');
    for (int i = 0; i < 120; i++) if (i < 5 || i >= 100) free(a[i]);
    for (int i = 0; i < 4; i++) free(b[i]);
    free(c[0]);
    pthread_t t; pthread_create(&t, NULL, other, NULL);
    while (!other_ready) usleep(1000);
    printf("ready\n"); fflush(stdout);
    for (;;) pause();
}
"#;

    /// `malloc_usable_size` of a heap chunk for a request of `n` bytes.
    fn usable(n: u64) -> u64 {
        ((n + 8 + 15) & !15) - 8
    }

    /// Builds `PROGRAM`, runs it (under `loader` when given: another glibc) and walks it.
    fn walk_program(loader: Option<(&str, &str)>) -> (HeapWalk, Vec<(usize, bool)>, String) {
        let (_dir, exe) = crate::test_support::compile_c(PROGRAM, &["-pthread"]);
        let mut cmd = match loader {
            Some((ld, libs)) => {
                let mut c = Command::new(ld);
                c.args(["--library-path", libs]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        let (w, mem) = (walk(child.id(), 513), Remote { pid: child.id() });
        let mmapped = (usable(300 * 1024) + 16).next_multiple_of(PAGE) - HDR;
        let [a, b, d, e] = [700, 4000, 2000, 600].map(usable);
        // 2.43 leaves the header out of an mmapped chunk's size.
        let sizes: [&[u64]; 5] = [&[a], &[b], &[mmapped, mmapped - HDR], &[d], &[e]];
        let markers = [b'A', b'B', b'C', b'D', b'E'];
        let seen = sizes
            .iter()
            .zip(markers)
            .map(|(sizes, marker)| {
                let of_size: Vec<&Chunk> = w
                    .chunks
                    .iter()
                    .filter(|c| sizes.contains(&c.size))
                    .collect();
                let marked = |c: &&Chunk| mem.read(c.addr, 16).is_some_and(|b| b == [marker; 16]);
                (of_size.len(), of_size.iter().all(marked))
            })
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        (w, seen, line)
    }

    /// Live blocks of each size, each holding its marker: 700 B, 4000 B, 300 KiB, and the
    /// second thread's 2000 B and 600 B.
    const LIVE: [(usize, bool); 5] = [(275, true), (16, true), (4, true), (40, true), (7, true)];

    #[test]
    fn finds_exactly_the_live_blocks_of_a_running_program() {
        let (w, seen, line) = walk_program(None);
        assert_eq!(line, "ready\n");
        assert_eq!(seen, LIVE, "{w:?}");
        assert!(w.chunks.iter().all(|c| c.size >= 513));
        assert_eq!((w.arenas, w.mmapped, w.torn), (2, 4, 0), "{w:?}");
        assert_eq!(w.tcache_skipped, 10, "7 of 700 B, 3 of 600 B");
    }

    /// The same program under Debian sid's glibc 2.43 (the one the tests' Python 3.14 runs
    /// with): a smaller `malloc_state`, 76 tcache bins of 16 in a 0x300 chunk, mmapped sizes
    /// without their header.
    #[test]
    fn finds_exactly_the_live_blocks_under_glibc_2_43() {
        let libs = "/opt/leaktrace/python3.14/usr/lib/x86_64-linux-gnu";
        let ld = format!("{libs}/ld-linux-x86-64.so.2");
        assert!(
            Path::new(&ld).exists(),
            "{ld} missing: `cargo xtask setup` unpacks Debian sid's Python 3.14 and its libc"
        );
        let (w, seen, line) = walk_program(Some((&ld, libs)));
        assert_eq!(line, "ready\n");
        assert_eq!(seen, LIVE, "{w:?}");
        assert_eq!((w.arenas, w.mmapped, w.torn), (2, 4, 0), "{w:?}");
        assert_eq!(
            w.tcache_skipped, 19,
            "16 of 700 B (a bin holds 16 now), 3 of 600 B"
        );
    }

    #[test]
    fn a_chain_that_breaks_is_torn_and_one_that_ends_at_top_is_whole() {
        let me = Remote {
            pid: std::process::id(),
        };
        let walk_own = |headers: &[(usize, u64)]| {
            let mut mem = [0u64; 64];
            for &(at, head) in headers {
                mem[at / 8 + 1] = head;
            }
            let start = mem.as_ptr() as u64;
            let heap = Heap {
                start,
                first: start,
                end: start + 512,
                main: true,
            };
            let mut found = Found::default();
            let whole = walk_heap(&me, &heap, 0, &mut found);
            (
                whole,
                found.seen.iter().map(|s| s.0.size).collect::<Vec<_>>(),
            )
        };
        // In use, free (the next lacks PREV_INUSE), in use, then the top chunk to the end.
        let whole = [(0, 64 | 1), (64, 96 | 1), (160, 48), (208, 304 | 1)];
        assert_eq!(walk_own(&whole), (true, vec![56, 40]));
        for bad in [40 | 1, 0, 1 << 40, 48 | IS_MMAPPED, 48 | NON_MAIN_ARENA] {
            assert_eq!(
                walk_own(&[(0, 64 | 1), (64, bad)]),
                (false, vec![]),
                "{bad:#x}"
            );
        }
    }
}
