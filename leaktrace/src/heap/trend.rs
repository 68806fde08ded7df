//! A site's live bytes over time, kept as running statistics (a few dozen bytes per site, however
//! long the trace): how often they grew or shrank between samples, when they last reached a new
//! maximum, and a least-squares slope.

use serde::Serialize;

/// Running statistics of one site's live bytes, one observation per interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Trend {
    /// Observations (intervals the site existed in).
    pub n: u32,
    /// Intervals whose live bytes ended higher, and lower, than the previous one.
    pub grew: u32,
    pub shrank: u32,
    pub first_t: f64,
    pub first_bytes: u64,
    pub last_t: f64,
    pub last_bytes: u64,
    pub max_bytes: u64,
    /// When `max_bytes` was first reached.
    pub max_t: f64,
    sum_t: f64,
    sum_y: f64,
    sum_ty: f64,
    sum_tt: f64,
}

impl Trend {
    /// Adds the live bytes seen at `t` seconds.
    pub fn observe(&mut self, t: f64, live_bytes: u64) {
        if self.n == 0 {
            self.first_t = t;
            self.first_bytes = live_bytes;
            self.max_bytes = live_bytes;
            self.max_t = t;
        } else {
            match live_bytes.cmp(&self.last_bytes) {
                std::cmp::Ordering::Greater => self.grew += 1,
                std::cmp::Ordering::Less => self.shrank += 1,
                std::cmp::Ordering::Equal => {}
            }
            if live_bytes > self.max_bytes {
                self.max_bytes = live_bytes;
                self.max_t = t;
            }
        }
        self.n += 1;
        self.last_t = t;
        self.last_bytes = live_bytes;
        let y = live_bytes as f64;
        self.sum_t += t;
        self.sum_y += y;
        self.sum_ty += t * y;
        self.sum_tt += t * t;
    }

    /// Least-squares slope of live bytes over time, bytes per second (0 with under two
    /// observations).
    pub fn slope(&self) -> f64 {
        let n = f64::from(self.n);
        let den = n * self.sum_tt - self.sum_t * self.sum_t;
        if self.n < 2 || den.abs() < f64::EPSILON {
            return 0.0;
        }
        (n * self.sum_ty - self.sum_t * self.sum_y) / den
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_growth_and_fits_the_slope() {
        let mut t = Trend::default();
        for i in 0..10 {
            t.observe(f64::from(i), 1000 + 500 * u64::from(i as u32));
        }
        assert_eq!((t.n, t.grew, t.shrank), (10, 9, 0));
        assert!((t.slope() - 500.0).abs() < 1e-6);
        assert_eq!((t.max_bytes, t.max_t), (5500, 9.0));
        let mut flat = Trend::default();
        for i in 0..10 {
            flat.observe(f64::from(i), if i < 3 { 100 * (i as u64 + 1) } else { 300 });
        }
        assert_eq!((flat.grew, flat.max_t), (2, 2.0));
    }
}
