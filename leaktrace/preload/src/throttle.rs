//! A ceiling on samples per second: the sampler's cost per second is its rate times a sample's
//! cost (the two USDT traps and the tracer's stack walk, ~7 µs on a numpy loop), and a process
//! that allocates gigabytes a second at the mean interval would take tens of thousands of samples.
//!
//! Above `LEAKTRACE_SAMPLE_LIMIT` samples a second (process-wide, over windows of up to 100 ms)
//! the mean interval rises to the power-of-two multiple of the configured one that the bytes
//! allocated a second need, and falls back when they fall.
//! Each thread takes the process's interval at its next sample, and scales the countdown it has
//! left with it: an exponential draw scaled is an exponential draw of the new mean, so every byte
//! keeps being sampled with probability `size / interval` for the interval in force, and each
//! sample's weight (the sampler's `nsamples * interval`) stays an unbiased estimate. Fewer
//! samples stand behind the estimates while it is raised; the tracer reads the highest interval
//! from `leaktrace_preload_interval_max` and says so. The same design as Java Flight Recorder's
//! throttled allocation samples.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use libdd_profiling_heap_sampler::{dd_alloc_req_t, dd_allocation_requested_slow, dd_tl_state_t};

/// Samples a second when `LEAKTRACE_SAMPLE_LIMIT` is unset: ~3 % of one core at ~7 µs a
/// sample, and more than a service allocating a few hundred MB/s takes at 512 KiB.
pub const DEFAULT_LIMIT: u64 = 4000;
/// The window a rate is measured over.
const WINDOW_NS: u64 = 100_000_000;
/// The interval rises to at most 1 GiB: past it a flood goes over the ceiling rather than the
/// first sample after it (which brings the interval back) being gigabytes away.
const MAX_INTERVAL: u64 = 1 << 30;

/// The most samples a second this process takes (0: no ceiling), for a tracer to read.
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static leaktrace_preload_sample_limit: AtomicU64 = AtomicU64::new(0);

/// The mean interval threads take at their next sample, for a tracer to read.
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static leaktrace_preload_interval_now: AtomicU64 = AtomicU64::new(0);

/// The highest mean interval the ceiling raised it to, for a tracer to read.
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static leaktrace_preload_interval_max: AtomicU64 = AtomicU64::new(0);

/// The process's window: where it started and the samples taken in it.
static LIMITER: Limiter = Limiter::new();

/// Sets the ceiling and the interval it returns to; called once, by the constructor.
pub fn init(limit: u64, interval: u64) {
    LIMITER.base.store(interval, Relaxed);
    leaktrace_preload_interval_now.store(interval, Relaxed);
    leaktrace_preload_interval_max.store(interval, Relaxed);
    leaktrace_preload_sample_limit.store(limit, Relaxed);
}

/// The sampler's slow path, then the ceiling's accounting when it took a sample.
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
    if req.weight != 0 {
        // SAFETY: the same state; the slow path left the guard set, so nothing the accounting
        // does re-enters the sampler.
        unsafe { sampled(tl) };
    }
    req
}

/// Counts one sample and gives this thread the process's interval.
///
/// # Safety
///
/// `tl` is this thread's initialised state.
#[cold]
#[inline(never)]
unsafe fn sampled(tl: *mut dd_tl_state_t) {
    let limit = leaktrace_preload_sample_limit.load(Relaxed);
    if limit == 0 {
        return;
    }
    let interval = LIMITER.count(monotonic_ns(), limit);
    // SAFETY: this thread's state; only this thread writes these fields (a tracer may write
    // `sampling_interval`, and either value is valid).
    unsafe {
        let old = (*tl).sampling_interval;
        if old != 0 && old != interval {
            (*tl).remaining_bytes = rescale((*tl).remaining_bytes, old, interval);
            (*tl).sampling_interval = interval;
        }
    }
}

/// The countdown left, drawn with mean `old`, as a draw with mean `new`.
fn rescale(remaining: i64, old: u64, new: u64) -> i64 {
    let scaled = i128::from(remaining) * i128::from(new) / i128::from(old);
    scaled.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
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

/// One process's rate window. Samples are rare (thousands a second at most), so plain atomics
/// shared by every thread cost nothing that matters.
struct Limiter {
    /// The configured interval, the floor it returns to.
    base: AtomicU64,
    /// When the window started (ns, `CLOCK_MONOTONIC`).
    start: AtomicU64,
    /// Samples in the window.
    count: AtomicU64,
}

impl Limiter {
    const fn new() -> Self {
        Self {
            base: AtomicU64::new(0),
            start: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Counts a sample at `now` and returns the interval threads should sample at. A window
    /// ends after `WINDOW_NS`, or sooner once its samples exceed `limit` a second; it then
    /// measures the bytes allocated a second (samples times interval over the time) and picks
    /// the smallest power-of-two multiple of the base that keeps them under `limit` samples a
    /// second. After a burst, the next sample (one raised interval later) brings it back.
    fn count(&self, now: u64, limit: u64) -> u64 {
        let current = leaktrace_preload_interval_now.load(Relaxed);
        let count = self.count.fetch_add(1, Relaxed) + 1;
        let start = self.start.load(Relaxed);
        let elapsed = now.saturating_sub(start);
        let budget = (limit.saturating_mul(WINDOW_NS) / 1_000_000_000).max(1);
        if elapsed < WINDOW_NS && count <= budget {
            return current;
        }
        let base = self.base.load(Relaxed).max(1);
        let bytes_per_s =
            u128::from(count) * u128::from(current) * 1_000_000_000 / u128::from(elapsed.max(1));
        let mut next = base;
        while next < MAX_INTERVAL && bytes_per_s > u128::from(next) * u128::from(limit) {
            next = next.saturating_mul(2);
        }
        // One thread starts the next window and sets the interval; the others take it.
        if self
            .start
            .compare_exchange(start, now, Relaxed, Relaxed)
            .is_err()
        {
            return leaktrace_preload_interval_now.load(Relaxed);
        }
        self.count.store(0, Relaxed);
        leaktrace_preload_interval_now.store(next, Relaxed);
        leaktrace_preload_interval_max.fetch_max(next, Relaxed);
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives `limiter` with `rate` samples a second for `secs`, the interval's rate falling as
    /// it rises (a fixed allocation rate of `bytes_per_s`); returns the interval at the end.
    fn drive(limiter: &Limiter, t0: u64, bytes_per_s: f64, secs: f64, limit: u64) -> (u64, u64) {
        let mut now = t0;
        let end = t0 + (secs * 1e9) as u64;
        let mut samples = 0;
        while now < end {
            let interval = limiter.count(now, limit);
            samples += 1;
            now += (interval as f64 / bytes_per_s * 1e9) as u64;
        }
        (leaktrace_preload_interval_now.load(Relaxed), samples)
    }

    // One test: the limiter's interval is the process-wide static.
    #[test]
    fn rises_under_a_flood_and_returns_when_it_ends() {
        let limiter = Limiter::new();
        init(4000, 512 << 10);
        limiter.base.store(512 << 10, Relaxed);
        // 14 GB/s at 512 KiB is ~27,000 samples a second; 4 MiB keeps it under 4000.
        let (interval, samples) = drive(&limiter, 1, 14e9, 2.0, 4000);
        assert_eq!(interval, 4 << 20);
        assert!(samples <= 2 * 4000 + 400, "{samples} samples in 2 s");
        assert_eq!(leaktrace_preload_interval_max.load(Relaxed), interval);
        // Then 100 MB/s: ~200 samples a second at 512 KiB, so it comes back down to the base.
        let (interval, _) = drive(&limiter, 3_000_000_000, 100e6, 1.0, 4000);
        assert_eq!(interval, 512 << 10);
        // 3 GB/s needs twice the base; a rate just under the ceiling leaves the base alone.
        let (interval, _) = drive(&limiter, 5_000_000_000, 3e9, 1.0, 4000);
        assert_eq!(interval, 1 << 20);
        let (interval, _) = drive(&limiter, 7_000_000_000, 1.8e9, 2.0, 4000);
        assert_eq!(interval, 512 << 10);
        // No rate raises it past MAX_INTERVAL.
        let (interval, _) = drive(&limiter, 10_000_000_000, 1e15, 0.5, 4000);
        assert_eq!(interval, MAX_INTERVAL);
        assert_eq!(leaktrace_preload_interval_max.load(Relaxed), interval);
    }

    #[test]
    fn a_countdown_keeps_its_sign_and_scales() {
        assert_eq!(rescale(-1000, 512, 1024), -2000);
        assert_eq!(rescale(-1000, 1024, 512), -500);
        assert_eq!(rescale(i64::MIN, 1, 1 << 30), i64::MIN);
    }
}
