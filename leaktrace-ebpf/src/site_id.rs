//! Site ids: one 64-bit hash of a process, an allocator function and its call path (native
//! return addresses, then Python frames). Only the kernel computes them; they live in this
//! `no_std` crate so the hashing is tested on the host.

use crate::PyFrameRec;

/// The start of a site id: a 64-bit mix of the process and the allocator function. Native
/// return addresses are folded in with `site_id_add_pc`, Python frames with
/// `site_id_add_frame`.
#[inline(always)]
pub fn site_id_start(tgid: u32, func: u8) -> u64 {
    mix64(((tgid as u64) << 8) | func as u64)
}

/// Folds one native return address into a site id.
#[inline(always)]
pub fn site_id_add_pc(h: u64, pc: u64) -> u64 {
    mix64(h ^ pc)
}

/// Folds one Python frame into a site id: the same call path gives the same id, any other
/// code object or instruction gives another.
#[inline(always)]
pub fn site_id_add_frame(h: u64, f: &PyFrameRec) -> u64 {
    mix64(mix64(h ^ f.code) ^ f.instr)
}

/// Site ids are never 0 (0 means "no site").
#[inline(always)]
pub fn site_id_finish(h: u64) -> u64 {
    if h == 0 {
        1
    } else {
        h
    }
}

/// splitmix64's finalizer: cheap in BPF, good avalanche.
#[inline(always)]
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
