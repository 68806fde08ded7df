//! Reading another process's memory (`process_vm_readv`).

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
}
