//! Reading another process's memory (`process_vm_readv`).

use std::collections::HashMap;
use std::io::IoSliceMut;

use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;

/// A process's memory, read without stopping it.
#[derive(Clone, Copy, Debug)]
pub struct Remote {
    pub pid: u32,
}

impl Remote {
    /// Reads exactly `len` bytes at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        if addr == 0 || len == 0 {
            return None;
        }
        let mut buf = vec![0u8; len];
        let remote = [RemoteIoVec {
            base: addr as usize,
            len,
        }];
        let n = process_vm_readv(
            Pid::from_raw(self.pid as i32),
            &mut [IoSliceMut::new(&mut buf)],
            &remote,
        )
        .ok()?;
        (n == len).then_some(buf)
    }

    /// Writes `bytes` at `addr` whole, or reports how much was written.
    pub fn write(&self, addr: u64, bytes: &[u8]) -> std::result::Result<(), String> {
        let remote = [RemoteIoVec {
            base: addr as usize,
            len: bytes.len(),
        }];
        match nix::sys::uio::process_vm_writev(
            Pid::from_raw(self.pid as i32),
            &[std::io::IoSlice::new(bytes)],
            &remote,
        ) {
            Ok(n) if n == bytes.len() => Ok(()),
            Ok(n) => Err(format!("{n} of {} bytes written", bytes.len())),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Reads many small ranges with few system calls; an unreadable range is `None`.
    pub fn read_many(&self, ranges: &[(u64, usize)]) -> Vec<Option<Vec<u8>>> {
        const BATCH: usize = 512;
        let mut out: Vec<Option<Vec<u8>>> = Vec::with_capacity(ranges.len());
        let mut i = 0;
        while i < ranges.len() {
            let batch = &ranges[i..(i + BATCH).min(ranges.len())];
            let mut bufs: Vec<Vec<u8>> = batch.iter().map(|(_, l)| vec![0u8; *l]).collect();
            let remote: Vec<RemoteIoVec> = batch
                .iter()
                .map(|(a, l)| RemoteIoVec {
                    base: *a as usize,
                    len: *l,
                })
                .collect();
            let mut local: Vec<IoSliceMut> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let n =
                process_vm_readv(Pid::from_raw(self.pid as i32), &mut local, &remote).unwrap_or(0);
            // The kernel stops at the first range it cannot read: those before it are whole.
            let mut done = 0;
            let mut whole = 0;
            for (_, l) in batch {
                if done + l > n {
                    break;
                }
                done += l;
                whole += 1;
            }
            drop(local);
            out.extend(bufs.into_iter().take(whole).map(Some));
            if whole < batch.len() {
                // The range that failed, read alone; then go on after it.
                let (a, l) = batch[whole];
                out.push(self.read(a, l));
                i += whole + 1;
            } else {
                i += batch.len();
            }
        }
        out
    }

    /// Reads a little-endian u64.
    pub fn u64(&self, addr: u64) -> Option<u64> {
        self.read(addr, 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }
}

/// Bytes per cached page.
const PAGE: u64 = 4096;
/// Pages kept at most (16 MiB); past it the cache starts over.
const MAX_PAGES: usize = 4096;

/// A process's memory read a page at a time and kept. Walking an object graph touches the same
/// pages again and again (pymalloc packs objects into 16 KiB pools), so one system call serves
/// many objects. A page is as old as its first read: callers validate what they find.
pub struct PageCache {
    mem: Remote,
    pages: HashMap<u64, Option<Box<[u8]>>>,
    capacity: usize,
}

impl PageCache {
    /// An empty cache of process `pid`'s memory.
    pub fn new(pid: u32) -> Self {
        Self::with_capacity(pid, MAX_PAGES)
    }

    /// An empty cache that keeps at most `capacity` pages.
    pub fn with_capacity(pid: u32, capacity: usize) -> Self {
        PageCache {
            mem: Remote { pid },
            pages: HashMap::new(),
            capacity,
        }
    }

    /// The page numbered `n`, read on first use (`None`: not mapped).
    fn page(&mut self, n: u64) -> Option<&[u8]> {
        if !self.pages.contains_key(&n) {
            if self.pages.len() >= self.capacity {
                self.pages.clear();
            }
            let bytes = self.mem.read(n * PAGE, PAGE as usize);
            self.pages.insert(n, bytes.map(Vec::into_boxed_slice));
        }
        self.pages.get(&n)?.as_deref()
    }

    /// Forgets every page read.
    pub fn clear(&mut self) {
        self.pages.clear();
    }

    /// Reads exactly `len` bytes at `addr` (none: an empty container's items).
    pub fn read(&mut self, addr: u64, len: usize) -> Option<Vec<u8>> {
        if len == 0 {
            return Some(Vec::new());
        }
        let end = addr.checked_add(len as u64)?;
        if addr == 0 || end > USER_TOP {
            return None;
        }
        let mut out = Vec::with_capacity(len);
        let mut at = addr;
        while at < end {
            let page = self.page(at / PAGE)?;
            let from = (at % PAGE) as usize;
            let to = (PAGE as usize).min(from + (end - at) as usize);
            out.extend_from_slice(&page[from..to]);
            at += (to - from) as u64;
        }
        Some(out)
    }

    /// Reads a little-endian u64.
    pub fn u64(&mut self, addr: u64) -> Option<u64> {
        self.read(addr, 8).and_then(|b| word(&b, 0))
    }
}

/// The end of x86-64 user space: no pointer into the target lies past it.
pub const USER_TOP: u64 = 1 << 47;

/// A u64 from a byte buffer at `off`.
pub fn word(buf: &[u8], off: u64) -> Option<u64> {
    let o = off as usize;
    buf.get(o..o + 8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_and_refuses_null() {
        let value: u64 = 0x1122_3344_5566_7788;
        let me = Remote {
            pid: std::process::id(),
        };
        assert_eq!(me.u64(&value as *const u64 as u64), Some(value));
        assert_eq!(me.read(0, 8), None);
        assert_eq!(word(&value.to_le_bytes(), 0), Some(value));
        assert_eq!(word(&[0u8; 4], 0), None);
    }

    #[test]
    fn the_page_cache_reads_across_pages_and_refuses_what_is_not_mapped() {
        let data: Vec<u8> = (0..3 * PAGE as usize).map(|i| (i % 251) as u8).collect();
        let mut cache = PageCache::new(std::process::id());
        let at = data.as_ptr() as u64 + PAGE - 5;
        assert_eq!(
            cache.read(at, 20).as_deref(),
            Some(&data[PAGE as usize - 5..][..20])
        );
        assert_eq!(cache.read(0, 8), None);
        assert_eq!(cache.read(at, 0), Some(Vec::new()));
        assert_eq!(cache.read(USER_TOP - 4, 8), None);
        assert_eq!(cache.read(u64::MAX - 2, 8), None);
    }
}
