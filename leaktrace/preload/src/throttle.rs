//! A ceiling on samples per second: the sampler's cost per second is its rate times a sample's
//! cost (the two USDT traps and the tracer's stack walk, ~7 µs on a numpy loop), and a process
//! that allocates gigabytes a second at the mean interval would take tens of thousands of samples.
//!
//! Above `LEAKTRACE_SAMPLE_LIMIT` samples a second (process-wide, over windows of up to 100 ms)
//! the samples are thinned: each one the sampler draws at the configured interval is kept with
//! probability `1/k` and then weighs `k` times as much, `k` the smallest power of two that brings
//! the rate under the ceiling. A Poisson process thinned independently is a Poisson process of
//! `k` times the interval, so every byte is still counted with its expected weight: estimates
//! stay unbiased, with fewer samples behind them.
//!
//! Thinning rather than a longer countdown keeps the sampler's own draws at the configured
//! interval, so the rate is measured at every interval's worth of allocation (a cheap slow path
//! with no trap) and `k` falls back as soon as allocation slows. A countdown stretched `k` times
//! would have to wait for `k` intervals of allocation to notice: after a burst that raised it to
//! 512 MiB, a service allocating 40 MB/s took no sample for minutes (QA, 2026-12-01).
//!
//! The tracer reads `leaktrace_preload_interval_max` (the configured interval times the highest
//! `k`) and says so. The same idea as Java Flight Recorder's throttled allocation samples.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use libdd_profiling_heap_sampler::{dd_alloc_req_t, dd_allocation_requested_slow, dd_tl_state_t};

/// Samples a second when `LEAKTRACE_SAMPLE_LIMIT` is unset: ~3 % of one core at ~7 µs a
/// sample, and more than a service allocating a few hundred MB/s takes at 512 KiB.
pub const DEFAULT_LIMIT: u64 = 4000;
/// The window a rate is measured over.
const WINDOW_NS: u64 = 100_000_000;
/// The effective interval (configured interval times `k`) goes no higher than 1 GiB.
const MAX_INTERVAL: u64 = 1 << 30;
/// A gap between draws this long says the rate fell: the draws before it say nothing of the
/// rate after it. (A relative rule, a gap many times the mean the factor allows, also fired on
/// the microsecond pauses of a Python loop allocating 600 GB/s, and let 25 times the ceiling
/// through.)
const LULL_NS: u64 = WINDOW_NS / 2;

/// The most samples a second this process takes (0: no ceiling), for a tracer to read.
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static leaktrace_preload_sample_limit: AtomicU64 = AtomicU64::new(0);

/// The effective mean interval now (the configured one times the thinning factor).
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static leaktrace_preload_interval_now: AtomicU64 = AtomicU64::new(0);

/// The highest effective mean interval the ceiling has put in force.
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static leaktrace_preload_interval_max: AtomicU64 = AtomicU64::new(0);

/// The process's window, factor and thinning draws.
static LIMITER: Limiter = Limiter::new();

/// Sets the ceiling and the configured interval; called once, by the constructor.
pub fn init(limit: u64, interval: u64) {
    LIMITER.base.store(interval.max(1), Relaxed);
    leaktrace_preload_interval_now.store(interval, Relaxed);
    leaktrace_preload_interval_max.store(interval, Relaxed);
    leaktrace_preload_sample_limit.store(limit, Relaxed);
}

/// The sampler's slow path, then the ceiling: a sample it thins out becomes an unsampled
/// request, one it keeps weighs `k` times as much.
///
/// # Safety
///
/// As `dd_allocation_requested_slow`: `tl` is this thread's initialised state with its reentry
/// guard clear, and `alignment` a power of two.
#[inline(always)]
pub unsafe fn requested_slow(
    tl: *mut dd_tl_state_t,
    size: usize,
    alignment: usize,
) -> dd_alloc_req_t {
    // SAFETY: by the caller's guarantee.
    let req = unsafe { dd_allocation_requested_slow(tl, size, alignment) };
    if req.weight == 0 {
        return req;
    }
    match thin() {
        1 => req,
        0 => {
            // What the slow path returns for a request it does not sample: the caller's own,
            // with the reentry guard it opened closed again.
            // SAFETY: this thread's state, as above.
            unsafe { (*tl).reentry_guard = false };
            dd_alloc_req_t {
                size,
                user_size: size,
                alignment,
                weight: 0,
            }
        }
        k => dd_alloc_req_t {
            weight: req.weight.saturating_mul(k),
            ..req
        },
    }
}

/// Counts a sample the sampler drew and decides it: 0 to drop it, else the weight factor.
#[cold]
#[inline(never)]
fn thin() -> u64 {
    let limit = leaktrace_preload_sample_limit.load(Relaxed);
    if limit == 0 {
        return 1;
    }
    let k = LIMITER.count(monotonic_ns(), limit);
    if k <= 1 || LIMITER.draw().is_multiple_of(k) {
        k
    } else {
        0
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds (the vDSO: no system call, no allocation).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// One process's rate window. Draws at the configured interval are rare (an allocation rate of
/// 18 GB/s makes 35,000 a second at 512 KiB), so plain atomics shared by every thread cost
/// nothing that matters.
struct Limiter {
    /// The configured interval.
    base: AtomicU64,
    /// The thinning factor in force (a power of two; 0 reads as 1).
    factor: AtomicU64,
    /// When the window started (ns, `CLOCK_MONOTONIC`).
    start: AtomicU64,
    /// Draws in the window.
    count: AtomicU64,
    /// When the last draw came (ns).
    last: AtomicU64,
    /// The thinning draws' sequence.
    draws: AtomicU64,
}

impl Limiter {
    const fn new() -> Self {
        Self {
            base: AtomicU64::new(1),
            factor: AtomicU64::new(1),
            start: AtomicU64::new(0),
            count: AtomicU64::new(0),
            last: AtomicU64::new(0),
            draws: AtomicU64::new(0),
        }
    }

    /// Counts a draw at `now` and returns the factor in force. A window ends after
    /// `WINDOW_NS`, or sooner once the samples it keeps would exceed a tenth of `limit`; it
    /// then sets the factor to the smallest power of two that keeps the draws it measured under
    /// `limit` a second. A draw after a gap of `LULL_NS` ends a window at once, measured by
    /// that gap alone: after a burst and a pause, the factor falls at the next draw instead of
    /// counting the burst's draws into the slower allocation's window.
    fn count(&self, now: u64, limit: u64) -> u64 {
        let k = self.factor.load(Relaxed).max(1);
        let count = self.count.fetch_add(1, Relaxed) + 1;
        let gap = now.saturating_sub(self.last.swap(now, Relaxed));
        let start = self.start.load(Relaxed);
        let elapsed = now.saturating_sub(start);
        let budget = (limit.saturating_mul(WINDOW_NS) / 1_000_000_000).max(1);
        let lull = k > 1 && gap >= LULL_NS;
        if elapsed < WINDOW_NS && count <= budget.saturating_mul(k) && !lull {
            return k;
        }
        let base = self.base.load(Relaxed).max(1);
        let draws_per_s = if lull {
            1_000_000_000 / u128::from(gap.max(1))
        } else {
            u128::from(count) * 1_000_000_000 / u128::from(elapsed.max(1))
        };
        let mut next = 1u64;
        while base.saturating_mul(next) < MAX_INTERVAL
            && draws_per_s > u128::from(next) * u128::from(limit)
        {
            next *= 2;
        }
        // One thread starts the next window and sets the factor; the others take it.
        if self
            .start
            .compare_exchange(start, now, Relaxed, Relaxed)
            .is_err()
        {
            return self.factor.load(Relaxed).max(1);
        }
        self.count.store(0, Relaxed);
        self.factor.store(next, Relaxed);
        let interval = base.saturating_mul(next);
        leaktrace_preload_interval_now.store(interval, Relaxed);
        leaktrace_preload_interval_max.fetch_max(interval, Relaxed);
        next
    }

    /// A uniform 64-bit draw (SplitMix64 over a shared sequence).
    fn draw(&self) -> u64 {
        let mut z = self
            .draws
            .fetch_add(0x9e37_79b9_7f4a_7c15, Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives `limiter` with the sampler's draws at `bytes_per_s` over an interval of `base`
    /// for `secs`; returns the factor at the end and the samples kept.
    fn drive(limiter: &Limiter, t0: u64, bytes_per_s: f64, secs: f64, limit: u64) -> (u64, u64) {
        let base = limiter.base.load(Relaxed) as f64;
        let step = (base / bytes_per_s * 1e9).max(1.0) as u64;
        let (mut now, end, mut kept) = (t0, t0 + (secs * 1e9) as u64, 0);
        while now < end {
            let k = limiter.count(now, limit);
            if k <= 1 || limiter.draw().is_multiple_of(k) {
                kept += 1;
            }
            now += step;
        }
        (limiter.factor.load(Relaxed), kept)
    }

    #[test]
    fn thins_under_a_flood_and_stops_as_soon_as_it_ends() {
        let limiter = Limiter::new();
        limiter.base.store(512 << 10, Relaxed);
        // 14 GB/s at 512 KiB is ~27,000 draws a second; keeping one in 8 is under 4000.
        let (k, kept) = drive(&limiter, 1, 14e9, 2.0, 4000);
        assert_eq!(k, 8);
        assert!(kept <= 2 * 4000 + 400, "{kept} samples kept in 2 s");
        assert!(kept >= 2 * 2600, "{kept} samples kept in 2 s");
        // Then 100 MB/s, after 5 s of nothing: the first draw gives the factor back.
        let (k, _) = drive(&limiter, 7_000_000_000, 100e6, 0.006, 4000);
        assert_eq!(k, 1);
        // From the flood to 10 MB/s (19 draws a second, a gap of 52 ms): the first gap is enough.
        drive(&limiter, 7_500_000_000, 14e9, 0.5, 4000);
        assert_eq!(limiter.factor.load(Relaxed), 8);
        let (k, _) = drive(&limiter, 8_000_000_000, 10e6, 0.06, 4000);
        assert_eq!(k, 1);
        // A drop to 1.5 GB/s (2,900 draws a second) waits for its window to end.
        drive(&limiter, 8_100_000_000, 14e9, 0.5, 4000);
        let (k, _) = drive(&limiter, 8_600_000_000, 1.5e9, 0.01, 4000);
        assert_eq!(k, 8);
        let (k, _) = drive(&limiter, 8_610_000_000, 1.5e9, 0.2, 4000);
        assert_eq!(k, 1);
        // 3 GB/s needs one in two; just under the ceiling needs none.
        let (k, _) = drive(&limiter, 9_000_000_000, 3e9, 1.0, 4000);
        assert_eq!(k, 2);
        let (k, _) = drive(&limiter, 10_000_000_000, 1.8e9, 2.0, 4000);
        assert_eq!(k, 1);
        // No rate takes the effective interval past MAX_INTERVAL.
        let (k, _) = drive(&limiter, 13_000_000_000, 1e15, 0.01, 4000);
        assert_eq!(k, MAX_INTERVAL / (512 << 10));
    }

    #[test]
    fn a_factor_keeps_one_draw_in_k() {
        let limiter = Limiter::new();
        let kept = (0..80_000)
            .filter(|_| limiter.draw().is_multiple_of(8))
            .count();
        assert!(
            (9_500..=10_500).contains(&kept),
            "{kept} of 80,000 kept at 1 in 8"
        );
    }
}
