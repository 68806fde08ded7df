//! The time series as CSV: one row per interval — time, RSS, live bytes and objects, counters —
//! and one column of live bytes per top stack, for pandas or a spreadsheet.

use std::fmt::Write;

use super::frames::short_name;
use super::Report;
use crate::heap::Sample;

/// Renders the series; `stacks` are the columns: (site, its live bytes at each point).
pub fn render(series: &[Sample], stacks: &[(&super::SiteReport, Vec<u64>)]) -> String {
    let mut o = String::from(
        "t_s,rss_bytes,live_bytes,live_objects,pymalloc_arena_bytes,allocs,frees,drops",
    );
    for (site, _) in stacks {
        let _ = write!(o, ",{}", quote(&short_name(site)));
    }
    o.push('\n');
    for (i, p) in series.iter().enumerate() {
        let opt = |v: Option<u64>| v.map(|r| r.to_string()).unwrap_or_default();
        let _ = write!(
            o,
            "{:.3},{},{},{},{},{},{},{}",
            p.t,
            opt(p.rss_bytes),
            p.live_bytes,
            p.live_count,
            opt(p.arena_bytes),
            p.allocs,
            p.frees,
            p.drops
        );
        for (_, v) in stacks {
            let _ = write!(o, ",{}", v.get(i).copied().unwrap_or(0));
        }
        o.push('\n');
    }
    o
}

/// RFC 4180 quoting: a field with a comma, quote or line break is quoted, quotes doubled.
fn quote(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The sites that get a column: the first `n` of the report (suspects first, then by bytes).
pub fn columns(r: &Report, n: usize) -> Vec<&super::SiteReport> {
    r.sites.iter().take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_what_needs_it() {
        assert_eq!(quote("a.py:3 in f → g"), "a.py:3 in f → g");
        assert_eq!(quote("f(a, b)"), "\"f(a, b)\"");
        assert_eq!(quote("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
