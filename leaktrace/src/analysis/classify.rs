//! Leak, cache, steady or start-up: what a stack's live memory is doing, with a confidence and
//! the evidence in one line (docs/analysis.md has the method and its assumptions).
//!
//! - **leak**: live bytes keep growing to the end of the trace. The confidence is a sign test:
//!   of the intervals in which the site's live bytes changed, how unlikely is it that so many
//!   grew if growth and shrinkage were equally likely (1 − P(X ≥ grew), X ~ Binomial(changed,
//!   ½)). Frees of blocks older than 5 s lower it: a leak's blocks are never freed.
//! - **cache**: at least doubled over two intervals or more, then stopped reaching new highs
//!   for the last third of the time it was seen (bounded, levelled off), or keeps evicting old
//!   blocks while holding its size.
//! - **steady**: allocated and freed at the same rate; no trend.
//! - **startup**: held since it was first seen, not growing.
//! - **unknown**: seen in fewer than three intervals.

use leaktrace_ebpf::SiteStats;
use serde::Serialize;

use crate::heap::trend::Trend;
use crate::units::human_bytes;

/// What a stack's live memory is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Leak,
    Cache,
    Steady,
    Startup,
    Unknown,
}

impl Class {
    /// The name shown in reports.
    pub fn name(self) -> &'static str {
        match self {
            Class::Leak => "leak",
            Class::Cache => "cache",
            Class::Steady => "steady",
            Class::Startup => "startup",
            Class::Unknown => "unknown",
        }
    }
}

/// The classification of one stack.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    pub class: Class,
    /// How sure, 0–1.
    pub confidence: f64,
    /// Least-squares growth of live bytes, bytes per second.
    pub growth_bytes_per_s: f64,
    /// The evidence, in one line.
    pub evidence: String,
}

impl Verdict {
    /// Whether the report lists it among the leak suspects.
    pub fn is_suspect(&self) -> bool {
        self.class == Class::Leak && self.confidence >= SUSPECT_CONFIDENCE
    }
}

/// Confidence from which a leak is a suspect (listed first, counted by `--fail-over`).
pub const SUSPECT_CONFIDENCE: f64 = 0.9;

/// Classifies a site from its trend and the kernel's counters.
pub fn classify(trend: &Trend, stats: &SiteStats) -> Verdict {
    let rate = trend.slope();
    let (class, confidence, evidence) = if trend.n < 3 {
        (
            Class::Unknown,
            0.0,
            format!("seen in {} interval(s): too short to tell", trend.n),
        )
    } else {
        let f = Facts::new(trend, stats);
        f.leak(rate)
            .or_else(|| f.cache())
            .or_else(|| f.steady())
            .or_else(|| f.evicting())
            .unwrap_or_else(|| f.startup())
    };
    Verdict {
        class,
        confidence: (confidence * 1000.0).round() / 1000.0,
        growth_bytes_per_s: rate.round(),
        evidence,
    }
}

/// Intervals a sampled site's live bytes must have changed in before its trend says anything.
pub const MIN_SAMPLED_CHANGES: u32 = 5;

/// The verdict on a site of sampled mode, whose live bytes move only when a sample lands: with
/// changes in fewer than `MIN_SAMPLED_CHANGES` intervals, a steady leak of a few samples reads
/// as state held since start-up, so anything but a leak is "too few samples to tell".
pub fn sampled(v: Verdict, trend: &Trend) -> Verdict {
    let changed = trend.grew + trend.shrank;
    if trend.n < 3 || v.class == Class::Leak || changed >= MIN_SAMPLED_CHANGES {
        return v;
    }
    Verdict {
        class: Class::Unknown,
        confidence: 0.0,
        evidence: format!(
            "its estimate changed in {changed} of {} intervals: too few samples to tell",
            trend.n - 1
        ),
        ..v
    }
}

/// A class, its confidence and the evidence in words.
type Finding = (Class, f64, String);

/// What the rules read of a site's series (at least three points) and counters.
struct Facts<'a> {
    trend: &'a Trend,
    stats: &'a SiteStats,
    /// Seconds from the first point to the last (0 if the clock went back).
    span: f64,
    /// Seconds per interval.
    step: f64,
    intervals: u32,
    /// Intervals in which the live bytes changed.
    changed: u32,
    /// "N frees of blocks older than 5 s".
    frees_old: String,
}

impl<'a> Facts<'a> {
    fn new(trend: &'a Trend, stats: &'a SiteStats) -> Self {
        let span = (trend.last_t - trend.first_t).max(0.0);
        let intervals = trend.n - 1;
        let old = stats.frees_old;
        Facts {
            trend,
            stats,
            span,
            step: span / f64::from(intervals),
            intervals,
            changed: trend.grew + trend.shrank,
            frees_old: if old == 1 {
                "1 free of a block older than 5 s".to_string()
            } else {
                format!("{old} frees of blocks older than 5 s")
            },
        }
    }

    /// Still reaching new highs in the last tenth of the time it was seen (at least the last
    /// two intervals), grown overall, more often up than down.
    fn leak(&self, rate: f64) -> Option<Finding> {
        let t = self.trend;
        let recent = (self.span / 10.0).max(2.0 * self.step);
        let still_growing = t.max_t >= t.last_t - recent - 1e-9;
        if !(still_growing && t.last_bytes > t.first_bytes && t.grew > t.shrank) {
            return None;
        }
        let mut confidence = sign_test(t.grew, self.changed);
        let live = self.stats.live_count.max(1);
        let old = self.stats.frees_old;
        if old > 0 {
            confidence *= live as f64 / (live as f64 + old as f64);
        }
        Some((
            Class::Leak,
            confidence,
            format!(
                "grew in {} of {} intervals ({}/s), {}",
                t.grew,
                self.intervals,
                human_bytes(rate.max(0.0) as u64),
                self.frees_old
            ),
        ))
    }

    /// A cache fills: it at least doubled, over two intervals or more, before levelling off
    /// (churn around a level never does).
    fn cache(&self) -> Option<Finding> {
        let t = self.trend;
        let plateau = t.last_t - t.max_t;
        let filled = t.grew >= 2 && t.max_bytes >= 2 * t.first_bytes.max(1);
        if !(filled && plateau >= self.span / 3.0) {
            return None;
        }
        // Intervals without a new high; a series whose clock went back has no step to count by.
        let flat = if self.step > 0.0 {
            (plateau / self.step).round().clamp(0.0, 1e12)
        } else {
            0.0
        };
        Some((
            Class::Cache,
            (flat + 1.0) / (flat + 2.0),
            format!(
                "grew to {}, then no new high for {plateau:.0} s; {}",
                human_bytes(t.max_bytes),
                self.frees_old
            ),
        ))
    }

    /// Many more frees than live blocks: churn around a level.
    fn steady(&self) -> Option<Finding> {
        let (t, s) = (self.trend, self.stats);
        if s.frees <= s.live_count.max(1).saturating_mul(4) {
            return None;
        }
        let confidence = 1.0 - sign_test(t.grew.max(t.shrank), self.changed);
        Some((
            Class::Steady,
            1.0 - confidence.min(1.0),
            format!(
                "{} allocations and {} frees for {} blocks live; grew in {} and shrank in {} \
                 of {} intervals",
                s.allocs, s.frees, s.live_count, t.grew, t.shrank, self.intervals
            ),
        ))
    }

    /// Frees old blocks while holding memory: a cache that evicts.
    fn evicting(&self) -> Option<Finding> {
        (self.stats.frees_old > 0 && self.trend.max_bytes > 0).then(|| {
            (
                Class::Cache,
                0.5,
                format!(
                    "holds {} while evicting: {}",
                    human_bytes(self.trend.last_bytes),
                    self.frees_old
                ),
            )
        })
    }

    /// Held since it was first seen and barely changed: state built at start-up.
    fn startup(&self) -> Finding {
        let unchanged = self.intervals.saturating_sub(self.changed);
        (
            Class::Startup,
            f64::from(unchanged + 1) / f64::from(self.intervals + 2),
            format!(
                "{} held since {:.0} s, unchanged in {unchanged} of {} intervals",
                human_bytes(self.trend.last_bytes),
                self.trend.first_t,
                self.intervals
            ),
        )
    }
}

/// 1 − P(X ≥ k) for X ~ Binomial(n, ½): how surely `k` growths in `n` changes are not chance.
fn sign_test(k: u32, n: u32) -> f64 {
    if n == 0 {
        return 0.0;
    }
    // P(X ≥ k) = Σ_{i=k..n} C(n, i) / 2^n, summed in logs to stay finite for long traces.
    let ln_c = |n: u32, i: u32| ln_fact(n) - ln_fact(i) - ln_fact(n - i);
    let tail: f64 = (k..=n)
        .map(|i| (ln_c(n, i) - f64::from(n) * std::f64::consts::LN_2).exp())
        .sum();
    (1.0 - tail).clamp(0.0, 1.0)
}

fn ln_fact(n: u32) -> f64 {
    (2..=n).map(|i| f64::from(i).ln()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trend(values: &[u64]) -> Trend {
        let mut t = Trend::default();
        for (i, v) in values.iter().enumerate() {
            t.observe(i as f64, *v);
        }
        t
    }

    fn stats(allocs: u64, frees: u64, live: u64, old: u64) -> SiteStats {
        SiteStats {
            allocs,
            frees,
            live_count: live,
            frees_old: old,
            ..SiteStats::default()
        }
    }

    #[test]
    fn growing_to_the_end_is_a_leak() {
        let v: Vec<u64> = (0..20).map(|i| 1_000_000 * i).collect();
        let d = classify(&trend(&v), &stats(2000, 0, 2000, 0));
        assert_eq!(d.class, Class::Leak);
        assert!(d.confidence >= 0.95, "{d:?}");
        assert!(
            d.evidence.starts_with("grew in 19 of 19 intervals"),
            "{d:?}"
        );
        assert!((d.growth_bytes_per_s - 1e6).abs() < 1.0);
    }

    #[test]
    fn a_bounded_cache_levels_off() {
        let v: Vec<u64> = (0..20).map(|i| 1000 * i.min(5)).collect();
        let d = classify(&trend(&v), &stats(5000, 4700, 300, 0));
        assert_eq!(d.class, Class::Cache, "{d:?}");
    }

    #[test]
    fn churn_is_steady_and_old_state_is_startup() {
        let v: Vec<u64> = (0..20).map(|i| 5000 + (i % 2) * 100).collect();
        let d = classify(&trend(&v), &stats(100_000, 99_950, 50, 0));
        assert_eq!(d.class, Class::Steady, "{d:?}");
        assert!(!d.is_suspect());
        let d = classify(&trend(&[8000; 20]), &stats(10, 0, 10, 0));
        assert_eq!(d.class, Class::Startup, "{d:?}");
        let d = classify(&trend(&[1, 2]), &stats(1, 0, 1, 0));
        assert_eq!(d.class, Class::Unknown);
    }

    /// Sampled: four samples over twenty intervals say nothing of a trend; twenty do.
    #[test]
    fn a_sampled_site_of_few_samples_is_not_called_startup() {
        let mut v = vec![0u64; 20];
        for (i, b) in v.iter_mut().enumerate() {
            *b = 524_288 * (i as u64 / 5 + 1);
        }
        let few = trend(&v);
        assert_eq!(classify(&few, &stats(4, 0, 4, 0)).class, Class::Startup);
        let d = sampled(classify(&few, &stats(4, 0, 4, 0)), &few);
        assert_eq!(d.class, Class::Unknown, "{d:?}");
        assert!(d.evidence.contains("too few samples"), "{d:?}");
        let many = trend(&(1..=20).map(|i| 524_288 * i).collect::<Vec<_>>());
        let d = sampled(classify(&many, &stats(20, 0, 20, 0)), &many);
        assert_eq!(d.class, Class::Leak, "{d:?}");
    }

    #[test]
    fn odd_series_are_classified_without_panicking() {
        let odd: [&[(f64, u64)]; 5] = [
            // The clock went back (a suspended VM, a capture edited by hand).
            &[
                (10.0, 0),
                (20.0, 5000),
                (5.0, 10_000),
                (30.0, 20_000),
                (6.0, 20_000),
            ],
            // All at one instant: no step at all.
            &[(3.0, 0), (3.0, 9000), (3.0, 9000), (3.0, 9000)],
            // Huge gaps and values.
            &[
                (0.0, 0),
                (1e-9, u64::MAX / 2),
                (1e300, u64::MAX / 2),
                (1e300, u64::MAX / 2),
            ],
            // Shrinking to nothing.
            &[(0.0, 1 << 40), (1.0, 1 << 20), (2.0, 1), (3.0, 0)],
            // NaN and infinite instants.
            &[
                (f64::NAN, 1),
                (f64::INFINITY, 2),
                (0.0, 3),
                (f64::NEG_INFINITY, 4),
            ],
        ];
        for series in odd {
            let mut t = Trend::default();
            for &(at, bytes) in series {
                t.observe(at, bytes);
            }
            let d = classify(&t, &stats(u64::MAX, u64::MAX, u64::MAX, u64::MAX));
            assert!(
                (0.0..=1.0).contains(&d.confidence) || d.confidence.is_nan(),
                "{d:?}"
            );
        }
    }

    #[test]
    fn noise_is_not_a_confident_leak() {
        // Up and down at random, ending a little higher.
        let v = [10, 12, 11, 13, 12, 11, 14, 13, 12, 15];
        let d = classify(&trend(&v), &stats(100, 90, 10, 0));
        assert!(!d.is_suspect(), "{d:?}");
    }

    #[test]
    fn sign_test_matches_the_binomial_tail() {
        assert!((sign_test(20, 20) - (1.0 - 0.5f64.powi(20))).abs() < 1e-12);
        assert!((sign_test(5, 10) - (1.0 - 0.623046875)).abs() < 1e-9);
        assert_eq!(sign_test(0, 0), 0.0);
    }
}
