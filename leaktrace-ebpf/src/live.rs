//! Retiring blocks from the kernel's table of live allocations (`LIVE`) and their sites'
//! counters: frees, addresses reused without a free seen, pages given back (growth mode).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use leaktrace_ebpf::{Counter, LiveAlloc, LiveKey, OLD_BLOCK_NS};

use crate::bump;
use crate::maps::{LIVE, SITES};
use crate::site::SharedSite;

#[inline(always)]
pub(crate) fn remove_stale(key: &LiveKey) {
    // SAFETY: plain integers, copied at once: a slot reused concurrently reads as garbage only.
    if let Some(old) = unsafe { LIVE.get(key) } {
        let old = *old;
        if LIVE.remove(key).is_ok() {
            bump(Counter::StaleReplaced);
            retire(&old, false);
        }
    }
}

/// Retires the block at `addr` if it is live; says whether it was.
#[inline(always)]
pub(crate) fn retire_if_live(tgid: u32, addr: u64) -> bool {
    let key = LiveKey {
        tgid,
        _pad: 0,
        addr,
    };
    // SAFETY: plain integers, copied at once: a slot reused concurrently reads as garbage only.
    let Some(rec) = (unsafe { LIVE.get(&key) }) else {
        return false;
    };
    let rec = *rec;
    if LIVE.remove(&key).is_ok() {
        retire(&rec, true);
    }
    true
}

#[inline(always)]
pub(crate) fn remove_live(tgid: u32, addr: u64) {
    let key = LiveKey {
        tgid,
        _pad: 0,
        addr,
    };
    // SAFETY: plain integers, copied at once: a slot reused concurrently reads as garbage only.
    let Some(rec) = (unsafe { LIVE.get(&key) }) else {
        bump(Counter::FreesUnknown);
        return;
    };
    let rec = *rec;
    // Only the thread whose delete succeeds accounts the free.
    if LIVE.remove(&key).is_ok() {
        bump(Counter::Frees);
        retire(&rec, true);
    }
}

#[inline(always)]
fn retire(rec: &LiveAlloc, freed: bool) {
    if let Some(s) = SITES.get_ptr_mut(&rec.site_id) {
        // SAFETY: a helper with no arguments that only reads the clock.
        let old = freed && unsafe { bpf_ktime_get_ns() }.wrapping_sub(rec.ts_ns) > OLD_BLOCK_NS;
        SharedSite::new(s).released(u64::from(rec.count), rec.weight, freed, old);
    }
}
