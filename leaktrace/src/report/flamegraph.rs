//! Flamegraphs (SVG, drawn by inferno) of unfreed bytes, or of bytes gained between two
//! moments, by merged Python + native stack.

use std::collections::HashMap;

use inferno::flamegraph::{self, color::BasicPalette, Direction, Options, Palette};

use super::frames::shown;
use super::{human_bytes, Report};

/// Folded stacks (`outer;inner value`, what inferno reads), one per site with a positive
/// value; `value` gives a site's figure (unfreed bytes, or growth).
pub fn folded(r: &Report, all: bool, value: impl Fn(&super::SiteReport) -> i64) -> Vec<String> {
    let mut lines: HashMap<String, i64> = HashMap::new();
    for s in &r.sites {
        let v = value(s);
        if v <= 0 {
            continue;
        }
        let stack: Vec<String> = shown(s, all)
            .iter()
            // inferno splits frames on `;`.
            .map(|f| f.label().replace(';', ":"))
            .collect();
        *lines.entry(stack.join(";")).or_default() += v;
    }
    let mut v: Vec<String> = lines
        .into_iter()
        .map(|(stack, n)| format!("{stack} {n}"))
        .collect();
    v.sort();
    v
}

/// The SVG of `folded` lines; `title` heads it.
pub fn svg(lines: &[String], title: &str) -> crate::error::Result<Vec<u8>> {
    let mut opts = Options::default();
    opts.title = title.to_string();
    opts.count_name = "bytes".into();
    opts.name_type = "Frame:".into();
    opts.colors = Palette::Basic(BasicPalette::Mem);
    opts.min_width = 0.05;
    // An icicle: the program's entry on top, allocators at the bottom, so the short Python
    // stacks where leaks usually are show first.
    opts.direction = Direction::Inverted;
    let mut out = Vec::new();
    if lines.is_empty() {
        // inferno refuses empty input; an empty graph says "nothing" just as well.
        opts.title = format!("{title} — nothing to show");
        flamegraph::from_lines(&mut opts, ["(nothing) 1"].iter().copied(), &mut out)
    } else {
        flamegraph::from_lines(&mut opts, lines.iter().map(|s| s.as_str()), &mut out)
    }
    .map_err(|e| crate::error::Error::Internal(format!("drawing the flamegraph: {e}")))?;
    Ok(out)
}

/// The title of a flamegraph of report `r` (the command shortened to fit its width).
pub fn title(r: &Report, growth_since: Option<f64>) -> String {
    let mut cmd: String = r
        .target
        .command
        .split_whitespace()
        .map(|w| w.rsplit('/').next().unwrap_or(w))
        .collect::<Vec<_>>()
        .join(" ");
    if cmd.chars().count() > 48 {
        cmd = cmd.chars().take(47).collect::<String>() + "…";
    }
    match growth_since {
        Some(t) => format!(
            "Bytes gained from {t:.0} s to {:.0} s — pid {} ({cmd})",
            r.duration_s, r.target.pid
        ),
        None => format!(
            "Unfreed memory: {} — pid {} ({cmd}), {} mode, {:.0} s",
            human_bytes(r.totals.unfreed_bytes),
            r.target.pid,
            r.mode,
            r.duration_s
        ),
    }
}
