//! `leaktrace report`: a capture rendered offline in any format.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use super::reader::Capture;
use crate::error::Result;
use crate::report::{csv, flamegraph, html, pprof, table, Report, ReportOptions, SiteReport};

/// What `leaktrace report` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The table `run` and `attach` print.
    Table,
    /// The JSON report (docs/json-schema.md).
    Json,
    /// SVG flamegraph of unfreed bytes (or of growth, with `--growth-since`).
    Flamegraph,
    /// One self-contained HTML page: summary, suspects, flamegraph, chart, type census.
    Html,
    /// gzipped pprof profile (`go tool pprof`, Pyroscope, Grafana).
    Pprof,
    /// CSV time series: one row per interval, one column per top stack.
    Csv,
}

impl Format {
    /// Whether the output is binary (not for a terminal).
    pub fn binary(self) -> bool {
        self == Format::Pprof
    }
}

/// What to render.
#[derive(Clone, Copy, Debug)]
pub struct RenderOptions {
    pub format: Format,
    pub report: ReportOptions,
    /// Flamegraph of the bytes gained since this many seconds into the trace.
    pub growth_since: Option<f64>,
    /// The report as of this many seconds into the trace.
    pub until: Option<f64>,
    pub verbose: bool,
}

/// Reads `path` and renders it.
pub fn render(path: &Path, o: RenderOptions) -> Result<Vec<u8>> {
    let progress = std::io::stderr().is_terminal();
    let started = Instant::now();
    let step = |what: &str| {
        if progress {
            eprintln!(
                "leaktrace: {what} ({:.1} s)",
                started.elapsed().as_secs_f64()
            );
        }
    };
    let mut cap = Capture::read(path, o.until)?;
    step(&format!(
        "read {} intervals, {} sites",
        cap.heap.series().len(),
        cap.heap.sites().count()
    ));
    let all = o.report.all_native_frames;
    let every = ReportOptions {
        top: usize::MAX,
        ..o.report
    };
    let out = match o.format {
        Format::Table => table::render(&cap.report(o.report), o.verbose, all).into_bytes(),
        Format::Json => cap.report(o.report).to_json().into_bytes(),
        Format::Flamegraph => flame(&mut cap, every, o.growth_since)?,
        Format::Pprof => pprof::profile(&cap.report(every), all, cap.header.started_unix_s),
        Format::Csv => {
            let r = cap.report(o.report);
            let cols = columns(&cap, csv::columns(&r, o.report.top));
            csv::render(cap.heap.series(), &cols).into_bytes()
        }
        Format::Html => {
            let svg = flame(&mut cap, every, None)?;
            let r = cap.report(o.report);
            let times: Vec<f64> = cap.heap.series().iter().map(|p| p.t).collect();
            let mut lines = vec![
                html::Line {
                    name: "RSS".into(),
                    color: html::COLORS[0],
                    values: cap.heap.series().iter().map(|p| p.rss_bytes).collect(),
                },
                html::Line {
                    name: "live traced bytes".into(),
                    color: html::COLORS[1],
                    values: cap
                        .heap
                        .series()
                        .iter()
                        .map(|p| Some(p.live_bytes))
                        .collect(),
                },
            ];
            if cap.heap.series().iter().any(|p| p.arena_bytes.is_some()) {
                lines.push(html::Line {
                    name: "pymalloc arenas".into(),
                    color: html::COLORS[6],
                    values: cap.heap.series().iter().map(|p| p.arena_bytes).collect(),
                });
            }
            let top: Vec<&SiteReport> = r
                .sites
                .iter()
                .filter(|s| s.analysis.is_suspect())
                .take(html::COLORS.len() - 3)
                .collect();
            for (i, (site, v)) in columns(&cap, top).into_iter().enumerate() {
                lines.push(html::Line {
                    name: format!("suspect: {}", crate::report::frames::short_name(site)),
                    color: html::COLORS[i + 2],
                    values: v.into_iter().map(Some).collect(),
                });
            }
            html::render(&r, &svg, &times, &lines, all).into_bytes()
        }
    };
    step("rendered");
    Ok(out)
}

/// The sites with their live bytes at each point of the series.
fn columns<'a>(cap: &Capture, sites: Vec<&'a SiteReport>) -> Vec<(&'a SiteReport, Vec<u64>)> {
    sites
        .into_iter()
        .map(|s| (s, cap.series_of(&s.kernel_site_ids)))
        .collect()
}

fn flame(cap: &mut Capture, every: ReportOptions, since: Option<f64>) -> Result<Vec<u8>> {
    let r: Report = cap.report(every);
    let all = every.all_native_frames;
    let lines = match since {
        None => flamegraph::folded(&r, all, |s| s.unfreed_bytes as i64),
        Some(t0) => {
            // The last point at or before `t0`: what each stack held then.
            let at = cap.heap.series().iter().rposition(|p| p.t <= t0);
            flamegraph::folded(&r, all, |s| {
                let then = at.map_or(0, |i| cap.series_of(&s.kernel_site_ids)[i]);
                s.unfreed_bytes as i64 - then as i64
            })
        }
    };
    flamegraph::svg(&lines, &flamegraph::title(&r, since))
}
