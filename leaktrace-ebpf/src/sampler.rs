//! The kernel side of sampling (`--mode sampled` and growth mode): whether an allocation is
//! recorded, and the bytes and blocks it then stands for. The arithmetic is shared with
//! userspace in `leaktrace_ebpf::sample`; the tables it reads are filled by userspace.

use aya_ebpf::{
    helpers::generated::bpf_get_prandom_u32,
    macros::map,
    maps::{Array, PerCpuArray},
};
use leaktrace_ebpf::{
    sample_count, sample_countdown, sample_weight, Counter, SAMPLE_EXP_POINTS, SAMPLE_TABLE_LEN,
};

use crate::maps::MIN_SIZE;
use crate::{bump, read_global};

/// Sampled and growth modes: one sample per this many bytes on average; 0 tracks every
/// allocation (exact mode).
#[no_mangle]
pub static SAMPLE_RATE: u64 = 0;

/// The sampler's tables (see `leaktrace_ebpf::sample`), filled by userspace in sampled and
/// growth modes.
#[map]
static SAMPLING: Array<u32> = Array::with_max_entries(SAMPLE_TABLE_LEN, 0);

/// Bytes left until the next sample, per CPU (0: draw one).
#[map]
static SAMPLER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Whether an allocation of `size` bytes is recorded, and the bytes and blocks it then stands
/// for (`--min-size`, then sampling). Decided before anything else is read, so an allocation
/// passed over costs little.
#[inline(always)]
pub(crate) fn admit(size: u64) -> Option<(u64, u64)> {
    if size < read_global(&MIN_SIZE) {
        bump(Counter::BelowMinSize);
        return None;
    }
    let w = sample(size);
    if w.is_none() {
        bump(Counter::Unsampled);
    }
    w
}

/// Whether to record an allocation of `size` bytes, and the bytes and blocks it then stands
/// for: always, as itself, in exact mode; by Poisson sampling otherwise.
#[inline(always)]
fn sample(size: u64) -> Option<(u64, u64)> {
    let rate = read_global(&SAMPLE_RATE);
    if rate == 0 {
        return Some((size, 1));
    }
    let left = SAMPLER.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; programs do not nest on one CPU.
    let left = unsafe { &mut *left };
    if *left == 0 {
        *left = draw_countdown(rate);
    }
    if size < *left {
        *left -= size;
        return None;
    }
    *left = draw_countdown(rate);
    let weight = sample_weight(size, rate, |i| table(SAMPLE_EXP_POINTS + i));
    // SAFETY: a helper with no arguments that returns a random u32.
    let rand = unsafe { bpf_get_prandom_u32() };
    Some((
        weight,
        sample_count(weight, size, rand).min(u32::MAX as u64),
    ))
}

#[inline(always)]
fn draw_countdown(rate: u64) -> u64 {
    // SAFETY: a helper with no arguments that returns a random u32.
    let rand = unsafe { bpf_get_prandom_u32() };
    let cell = rand >> 20;
    sample_countdown(rate, table(cell), table(cell + 1), rand)
}

#[inline(always)]
fn table(i: u32) -> u64 {
    SAMPLING.get(i).map_or(0, |v| u64::from(*v))
}
