//! The one-file HTML report: summary, leak suspects first with their classification, the
//! interactive flamegraph, a chart of RSS and live bytes over time with the top suspects'
//! growth, and the type census. Everything is inline: it opens with no network.

use std::fmt::Write;

use super::frames::{short_name, shown};
use super::{human_bytes, Report, SiteReport};
use crate::analysis::census::TypeCensus;

/// A line of the chart: its name, colour and values (one per point of the series).
pub struct Line {
    pub name: String,
    pub color: &'static str,
    pub values: Vec<Option<u64>>,
}

/// Colours of the chart's lines: RSS, live bytes, the suspects, and pymalloc's arenas last.
pub const COLORS: [&str; 7] = [
    "#444444", "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b",
];

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders the page. `flamegraph` is inferno's SVG; `times` and `lines` make the chart.
pub fn render(r: &Report, flamegraph: &[u8], times: &[f64], lines: &[Line], all: bool) -> String {
    let mut o = String::new();
    summary(&mut o, r);
    for n in r.notes.iter().chain(&r.heap_vs_rss.note) {
        let _ = writeln!(o, "<p class=\"note\">{}</p>", esc(n));
    }
    sites_table(&mut o, r, all);
    // The flamegraph's script takes the document's first <svg> as its own: it comes first.
    o.push_str("<h2>Unfreed memory by stack</h2>\n<div id=\"flamegraph\">");
    let svg = String::from_utf8_lossy(flamegraph);
    o.push_str(svg.find("<svg").map_or(&svg[..], |i| &svg[i..]));
    o.push_str("</div>\n<h2>Memory over time</h2>\n");
    o.push_str(&chart(times, lines));
    if let Some(c) = &r.type_census {
        census_table(&mut o, c);
    }
    o.push_str("<h2>Counters</h2>\n<table class=\"kv\">");
    for (k, v) in &r.counters {
        let _ = write!(o, "<tr><th>{}</th><td>{v}</td></tr>", esc(k));
    }
    o.push_str("</table>\n</body></html>\n");
    o
}

/// The document's head and the summary table: what was traced, how, and what is left.
fn summary(o: &mut String, r: &Report) {
    let t = &r.target;
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>leaktrace — pid {} ({})</title><style>{STYLE}</style></head><body>\n",
        t.pid,
        esc(&t.command)
    );
    let _ = write!(
        o,
        "<h1>leaktrace report</h1>\n<table class=\"kv\" id=\"summary\">\
         <tr><th>target</th><td>pid {} — <code>{}</code></td></tr>\
         <tr><th>ended</th><td>{}</td></tr>\
         <tr><th>traced</th><td>{:.1} s in {} mode{}</td></tr>\
         <tr><th>python</th><td>{}</td></tr>\
         <tr><th>unfreed</th><td>{} in {} blocks ({} allocations, {} frees traced)</td></tr>\
         <tr><th>leak suspects</th><td>{} holding {}</td></tr>\
         <tr><th>dropped</th><td>{}</td></tr></table>\n",
        t.pid,
        esc(&t.command),
        esc(&t.end),
        r.duration_s,
        esc(&r.mode.to_string()),
        r.sample_rate
            .map(|s| format!(", one sample per {}", human_bytes(s)))
            .unwrap_or_default(),
        esc(t.python.as_deref().unwrap_or("not a Python process")),
        human_bytes(r.totals.unfreed_bytes),
        r.totals.unfreed_count,
        r.totals.allocs,
        r.totals.frees,
        r.suspects,
        human_bytes(r.suspect_bytes),
        if r.dropped == 0 {
            "nothing".to_string()
        } else {
            format!("<b>{} events lost</b> (see counters)", r.dropped)
        },
    );
}

/// The sites listed, suspects first, and how many more only the flamegraph shows.
fn sites_table(o: &mut String, r: &Report, all: bool) {
    o.push_str("<h2>Stacks holding memory</h2>\n<table id=\"sites\"><tr><th>unfreed</th>\
                <th>blocks</th><th>verdict</th><th>growth</th><th>stack (outermost first)</th></tr>\n");
    for s in &r.sites {
        site_row(o, s, all);
    }
    o.push_str("</table>\n");
    if r.sites_omitted > 0 {
        let _ = writeln!(
            o,
            "<p class=\"note\">{} smaller stacks not listed (they are in the flamegraph).</p>",
            r.sites_omitted
        );
    }
}

/// One site's row: its figures and verdict, with the stack folded under its short name.
fn site_row(o: &mut String, s: &SiteReport, all: bool) {
    let a = &s.analysis;
    let class = if a.is_suspect() { "suspect" } else { "" };
    let frames: Vec<String> = shown(s, all)
        .iter()
        .map(|f| {
            let kind = if f.python { "py" } else { "c" };
            format!("<li class=\"{kind}\">{}</li>", esc(&f.label()))
        })
        .collect();
    let types = if s.types.is_empty() {
        String::new()
    } else {
        let t: Vec<String> = s.types.iter().map(|(n, c)| format!("{c} {n}")).collect();
        format!("<div class=\"types\">objects: {}</div>", esc(&t.join(", ")))
    };
    let _ = writeln!(
        o,
        "<tr class=\"{class}\"><td>{}</td><td>{}</td><td title=\"{}\">{} ({:.2})</td>\
         <td>{}/s</td><td><details><summary>{}</summary><ol>{}</ol>{types}\
         <div class=\"ev\">{}</div></details></td></tr>",
        human_bytes(s.unfreed_bytes),
        s.unfreed_count,
        esc(&a.evidence),
        a.class.name(),
        a.confidence,
        human_bytes(a.growth_bytes_per_s.max(0.0) as u64),
        esc(&short_name(s)),
        frames.join(""),
        esc(&a.evidence),
    );
}

/// The type census: every type with its count, bytes and growth.
fn census_table(o: &mut String, c: &TypeCensus) {
    let _ = write!(
        o,
        "<h2>Live Python objects by type</h2>\n<table id=\"census\"><tr><th>type</th>\
         <th>objects</th><th>bytes</th><th>growth (objects)</th><th>growth (bytes)</th></tr>"
    );
    for ty in &c.types {
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:+}</td><td>{:+}</td></tr>",
            esc(&ty.name),
            ty.count,
            human_bytes(ty.bytes),
            ty.growth_count,
            ty.growth_bytes
        );
    }
    let _ = writeln!(
        o,
        "</table><p class=\"note\">{} objects; {} blocks hold no Python object; {} could \
         not be read.</p>",
        c.objects, c.not_objects, c.unreadable
    );
}

/// An SVG line chart of byte series over time, with axes and a legend.
fn chart(times: &[f64], lines: &[Line]) -> String {
    const W: f64 = 960.0;
    const H: f64 = 320.0;
    const L: f64 = 80.0; // room for the y labels
    const B: f64 = 30.0;
    const T: f64 = 10.0;
    let t_max = times.iter().copied().fold(0.0f64, f64::max).max(1e-9);
    let y_max = lines
        .iter()
        .flat_map(|l| l.values.iter().flatten())
        .copied()
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let x = |t: f64| L + t / t_max * (W - L - 10.0);
    let y = |v: u64| T + (1.0 - v as f64 / y_max) * (H - T - B);
    let mut o = format!(
        "<svg id=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" \
         viewBox=\"0 0 {W} {}\" font-family=\"sans-serif\" font-size=\"11\">",
        H + 20.0 * lines.len() as f64,
        H + 20.0 * lines.len() as f64
    );
    for i in 0..=4 {
        let v = (y_max * i as f64 / 4.0) as u64;
        let (x2, yv, lx, label) = (W - 10.0, y(v), L - 4.0, human_bytes(v));
        let _ = write!(
            o,
            "<line x1=\"{L}\" x2=\"{x2}\" y1=\"{yv:.1}\" y2=\"{yv:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{lx}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>",
            yv + 4.0
        );
        let tv = t_max * i as f64 / 4.0;
        let _ = write!(
            o,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{tv:.0} s</text>",
            x(tv),
            H - B + 16.0
        );
    }
    for (i, l) in lines.iter().enumerate() {
        let pts: Vec<String> = times
            .iter()
            .zip(&l.values)
            .filter_map(|(t, v)| v.map(|v| format!("{:.1},{:.1}", x(*t), y(v))))
            .collect();
        let _ = write!(
            o,
            "<polyline class=\"series\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" \
             points=\"{}\"><title>{}</title></polyline>\
             <rect x=\"{L}\" y=\"{:.1}\" width=\"12\" height=\"3\" fill=\"{0}\"/>\
             <text x=\"{}\" y=\"{:.1}\">{}</text>",
            l.color,
            pts.join(" "),
            esc(&l.name),
            H + 20.0 * i as f64 + 4.0,
            L + 18.0,
            H + 20.0 * i as f64 + 9.0,
            esc(&l.name)
        );
    }
    o.push_str("</svg>\n");
    o
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;max-width:1200px}\
table{border-collapse:collapse;margin:.5em 0}td,th{border-bottom:1px solid #ddd;padding:3px 8px;\
text-align:left;vertical-align:top}.kv th{width:10em}tr.suspect{background:#fde8e8}\
li.py{color:#1a5fb4}li.c{color:#555}ol{margin:.3em 0;font-family:monospace;font-size:12px}\
.note{color:#8a4b00}.ev,.types{font-size:12px;color:#333}summary{cursor:pointer}\
#flamegraph svg{width:100%;height:auto}#sites td:nth-child(-n+4){white-space:nowrap}";
