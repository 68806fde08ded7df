//! The tables behind the kernel's Poisson byte sampler (`leaktrace_ebpf::sample`), computed here
//! because BPF has no floating point.

use leaktrace_ebpf::{
    SAMPLE_EXP_POINTS, SAMPLE_EXP_SLOTS, SAMPLE_ONE, SAMPLE_WEIGHT_POINTS, SAMPLE_WEIGHT_STEPS,
};

/// The `SAMPLING` map's contents: the unit exponential's inverse CDF at i / 4096, then
/// `g(x) = x / (1 - e^-x)` at x = i / 32, all 16.16 fixed point.
pub fn table() -> Vec<u32> {
    let one = SAMPLE_ONE as f64;
    let n = f64::from(SAMPLE_EXP_SLOTS);
    let last = -(1.0 / n).ln();
    let quantiles = (0..SAMPLE_EXP_POINTS).map(|i| {
        let q = if i < SAMPLE_EXP_SLOTS {
            -(1.0 - f64::from(i) / n).ln()
        } else {
            // Beyond `last` the exponential's mean is `last + 1`: a uniform cell of width 2
            // keeps it.
            last + 2.0
        };
        (q * one).round() as u32
    });
    let weights = (0..SAMPLE_WEIGHT_POINTS).map(|i| {
        let x = f64::from(i) / SAMPLE_WEIGHT_STEPS as f64;
        let g = if i == 0 { 1.0 } else { x / (1.0 - (-x).exp()) };
        (g * one).round() as u32
    });
    quantiles.chain(weights).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use leaktrace_ebpf::{sample_count, sample_countdown, sample_weight};

    /// xorshift64*: a fixed stream, so the test is repeatable.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
        }
    }

    #[test]
    fn weights_match_the_sampling_probability() {
        let t = table();
        let rate = 512 * 1024;
        let at = |i: u32| u64::from(t[(SAMPLE_EXP_POINTS + i) as usize]);
        for size in [
            1u64,
            16,
            100,
            4096,
            65_536,
            300_000,
            524_288,
            2_000_000,
            8 << 20,
        ] {
            let p = 1.0 - (-(size as f64) / rate as f64).exp();
            let exact = size as f64 / p;
            let w = sample_weight(size, rate, at) as f64;
            assert!(
                (w / exact - 1.0).abs() < 2e-4,
                "size {size}: {w} vs {exact}"
            );
        }
    }

    /// The kernel's algorithm, run on a known stream of allocations: the estimates of bytes
    /// and blocks land on the truth.
    #[test]
    fn estimates_are_unbiased() {
        let t = table();
        let rate = 64 * 1024;
        let at = |i: u32| u64::from(t[(SAMPLE_EXP_POINTS + i) as usize]);
        let draw = |r: u32| {
            let cell = (r >> 20) as usize;
            sample_countdown(rate, u64::from(t[cell]), u64::from(t[cell + 1]), r)
        };
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut left = 0u64;
        let (mut est_bytes, mut est_count, mut true_bytes, mut true_count) =
            (0u64, 0u64, 0u64, 0u64);
        let sizes = [24u64, 64, 200, 1000, 10_000, 100_000, 1_000_000];
        for n in 0..2_000_000u64 {
            let size = sizes[(n % sizes.len() as u64) as usize];
            true_bytes += size;
            true_count += 1;
            if left == 0 {
                left = draw(rng.next());
            }
            if size < left {
                left -= size;
                continue;
            }
            left = draw(rng.next());
            let w = sample_weight(size, rate, at);
            est_bytes += w;
            est_count += sample_count(w, size, rng.next());
        }
        let eb = est_bytes as f64 / true_bytes as f64;
        let ec = est_count as f64 / true_count as f64;
        assert!((eb - 1.0).abs() < 0.01, "bytes estimate off by {eb}");
        // Counts are dominated by the rarely sampled small blocks: 1.7 % standard deviation
        // here (40 seeds averaged 1.006 ± 0.003).
        assert!((ec - 1.0).abs() < 0.06, "count estimate off by {ec}");
    }

    #[test]
    fn countdown_is_never_zero_and_averages_the_rate() {
        let t = table();
        let rate = 1 << 20;
        // Every cell at 16 points within it.
        let draws: Vec<f64> = (0..SAMPLE_EXP_SLOTS << 4)
            .map(|k| {
                let r = (k << 16) | ((k & 15) << 12 | 0x800);
                let cell = (r >> 20) as usize;
                sample_countdown(rate, u64::from(t[cell]), u64::from(t[cell + 1]), r) as f64
            })
            .collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean / rate as f64 - 1.0).abs() < 0.002, "mean {mean}");
        // The small end is as likely as the exponential says: P(X < rate / 1000) = 0.1 %.
        let small = draws.iter().filter(|d| **d < rate as f64 / 1000.0).count();
        let p = small as f64 / draws.len() as f64;
        assert!(
            (p / (1.0 - (-0.001f64).exp()) - 1.0).abs() < 0.05,
            "P(small) {p}"
        );
        assert!(sample_countdown(1, 0, 0, 0) >= 1);
    }
}
