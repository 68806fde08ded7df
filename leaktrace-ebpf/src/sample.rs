//! Poisson sampling by bytes, the arithmetic shared by the kernel (which decides and weighs each
//! allocation) and userspace (which builds the tables and checks the estimates are unbiased).
//!
//! Every byte allocated is a point of a Poisson process with one sample per `rate` bytes on
//! average: a per-CPU countdown, drawn from the exponential distribution, is decremented by each
//! allocation's size, and the allocation that takes it to zero is sampled. An allocation of `s`
//! bytes is then sampled with probability `p = 1 - exp(-s / rate)` whatever came before it
//! (the exponential is memoryless, so neither threads sharing a CPU's countdown nor the order of
//! allocations bias it), and it stands for `1 / p` allocations and `s / p` bytes: the estimates
//! of live and allocated bytes and counts per site are unbiased.
//!
//! BPF has no floating point, so both functions come from a table userspace fills
//! (`SAMPLING` map), each interpolated linearly: the inverse CDF of the unit exponential at
//! 4097 points (inverse-CDF sampling with 12 random bits for the cell and 16 within it; without
//! the interpolation the draws would be lumpy at sizes near `rate / 4096`, and small
//! allocations right after a sample would be over-sampled), and `g(x) = x / (1 - exp(-x))` at
//! 257 points.

/// Cells of the exponential's inverse CDF: the table holds `-ln(1 - i / 4096)` for i < 4096,
/// then the last cell's end, placed so the cell keeps the tail's mean.
pub const SAMPLE_EXP_SLOTS: u32 = 4096;
/// Points of the inverse CDF in the table.
pub const SAMPLE_EXP_POINTS: u32 = SAMPLE_EXP_SLOTS + 1;
/// Steps per unit of `x = size / rate` in the weight table.
pub const SAMPLE_WEIGHT_STEPS: u64 = 32;
/// Points of the weight table: `g(i / 32)` for i in 0..=256; past x = 8, `g(x) = x` within 0.04 %.
pub const SAMPLE_WEIGHT_POINTS: u32 = 257;
/// Entries of the `SAMPLING` map: the inverse CDF first, then the weights.
pub const SAMPLE_TABLE_LEN: u32 = SAMPLE_EXP_POINTS + SAMPLE_WEIGHT_POINTS;
/// Fixed-point scale of both tables (16.16).
pub const SAMPLE_ONE: u64 = 1 << 16;
/// Largest rate accepted: keeps every product below 2^64.
pub const SAMPLE_MAX_RATE: u64 = 1 << 36;

/// Bytes until the next sample: the exponential's inverse CDF at cell `rand >> 20`, between its
/// ends `lo` and `hi` (16.16) at `rand & 0xffff`.
#[inline(always)]
pub fn sample_countdown(rate: u64, lo: u64, hi: u64, rand: u32) -> u64 {
    let q = lo + ((hi.saturating_sub(lo) * (rand & 0xffff) as u64) >> 16);
    let c = (rate * q) >> 16;
    if c == 0 {
        1
    } else {
        c
    }
}

/// The bytes a sampled block of `size` bytes stands for: `size / p = rate * g(size / rate)`,
/// with `g` read through `table(i)` = `g(i / 32)` (16.16).
#[inline(always)]
pub fn sample_weight(size: u64, rate: u64, table: impl Fn(u32) -> u64) -> u64 {
    let size = if size == 0 { 1 } else { size };
    let scaled = size.saturating_mul(SAMPLE_WEIGHT_STEPS);
    let i = scaled / rate;
    if i >= (SAMPLE_WEIGHT_POINTS - 1) as u64 {
        return size;
    }
    let frac = ((scaled - i * rate) << 16) / rate;
    let lo = table(i as u32);
    let hi = table(i as u32 + 1);
    let g = lo + ((hi.saturating_sub(lo) * frac) >> 16);
    let w = (rate * g) >> 16;
    if w < size {
        size
    } else {
        w
    }
}

/// The number of blocks a sampled block stands for, `weight / size`, rounded up or down at
/// random in proportion so the count estimate stays unbiased (`rand` is uniform in u32).
#[inline(always)]
pub fn sample_count(weight: u64, size: u64, rand: u32) -> u64 {
    let size = if size == 0 { 1 } else { size };
    let whole = weight / size;
    let rem = weight - whole * size;
    // Round up with probability rem / size; both are scaled down past 32 bits so the product
    // cannot overflow (blocks up to 2^48 bytes).
    let (size, rem) = if size >> 32 != 0 {
        (size >> 16, rem >> 16)
    } else {
        (size, rem)
    };
    whole + u64::from(((rand as u64 * size) >> 32) < rem)
}
