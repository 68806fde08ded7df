//! The CI gate (`--fail-over SIZE [--suppressions FILE]`): fail the run when leak suspects hold
//! more than SIZE, after suppressions — glob patterns matched against each frame of a stack, as
//! in Valgrind's and LeakSanitizer's suppression files.

use std::fmt::Write;
use std::path::Path;

use super::{Report, SiteReport};
use crate::stacks::merge::StackEntry;
use crate::units::human_bytes;

/// Exit status when leak suspects hold more than `--fail-over`.
pub const EXIT_LEAKS_OVER_LIMIT: i32 = 10;

/// Frame patterns whose stacks the gate ignores.
#[derive(Clone, Debug, Default)]
pub struct Suppressions(Vec<String>);

impl Suppressions {
    /// Reads a suppressions file: one glob per line (`*` any run of characters, `?` one), `#`
    /// comments; LeakSanitizer's `leak:` prefix is accepted. A pattern matches a frame written
    /// as `file:line in function` (Python) or `function (file:line) in module` (native), or its
    /// function name alone.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string(path)?))
    }

    /// Parses the text of a suppressions file.
    pub fn parse(text: &str) -> Self {
        Suppressions(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| l.strip_prefix("leak:").unwrap_or(l).trim().to_string())
                .collect(),
        )
    }

    /// The first pattern matching a frame of the site, if any.
    pub fn matching(&self, site: &SiteReport) -> Option<&str> {
        let frames: Vec<(String, String)> = site.stack.iter().map(frame_texts).collect();
        self.0
            .iter()
            .find(|p| {
                frames
                    .iter()
                    .any(|(full, func)| glob(p, full) || glob(p, func))
            })
            .map(String::as_str)
    }
}

/// A frame as suppressions see it: the whole frame, and its function name.
fn frame_texts(e: &StackEntry) -> (String, String) {
    match e {
        StackEntry::Python { frame } => (
            format!(
                "{}:{} in {}",
                frame.filename,
                frame.line.map(|l| l.to_string()).unwrap_or_default(),
                frame.function
            ),
            frame.function.to_string(),
        ),
        StackEntry::Native { frame, .. } => {
            let func = frame.function.as_deref().unwrap_or_default().to_string();
            let module = frame
                .module
                .as_deref()
                .map(|m| m.rsplit('/').next().unwrap_or(m))
                .unwrap_or("?");
            let place = match (&frame.file, frame.line) {
                (Some(f), Some(l)) => format!(" ({f}:{l})"),
                _ => String::new(),
            };
            (format!("{func}{place} in {module}"), func)
        }
    }
}

/// Shell-style match of the whole text: `*` any run of characters, `?` any one.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The gate's verdict on a report.
#[derive(Clone, Debug)]
pub struct GateResult {
    pub failed: bool,
    /// Unfreed bytes counted against the limit.
    pub counted_bytes: u64,
    /// What to print: the offending stacks, or why the run passed.
    pub message: String,
}

/// Checks a report against `--fail-over LIMIT`. Counted: leak suspects not suppressed; when the
/// trace was too short to classify (under three intervals), every unfreed site not suppressed,
/// since a short run cannot tell a leak from state it keeps.
pub fn check(report: &Report, limit: u64, sup: &Suppressions) -> GateResult {
    let short = report.series.len() < 3;
    let mut counted = 0u64;
    let mut offenders = Vec::new();
    let mut suppressed = 0u64;
    for s in &report.sites {
        if !(s.analysis.is_suspect() || short) {
            continue;
        }
        if sup.matching(s).is_some() {
            suppressed += s.unfreed_bytes;
            continue;
        }
        counted += s.unfreed_bytes;
        offenders.push(s);
    }
    if short && report.sites_omitted > 0 {
        // Sites past `--top` are counted too: unseen, they cannot be matched to suppressions.
        let listed: u64 = report.sites.iter().map(|s| s.unfreed_bytes).sum();
        counted += report.totals.unfreed_bytes.saturating_sub(listed);
    }
    let failed = counted > limit;
    let mut m = String::new();
    let what = if short {
        "unfreed (the trace was too short to tell leaks from kept state)"
    } else {
        "in leak suspects"
    };
    let _ = writeln!(
        m,
        "leaktrace: {} {what}, limit {}{}: {}",
        human_bytes(counted),
        human_bytes(limit),
        if suppressed > 0 {
            format!(" ({} suppressed)", human_bytes(suppressed))
        } else {
            String::new()
        },
        if failed { "FAILED" } else { "passed" }
    );
    if failed {
        for s in offenders {
            let inner: Vec<String> = s
                .stack
                .iter()
                .filter(|e| !e.hidden())
                .rev()
                .take(4)
                .map(|e| frame_texts(e).0)
                .collect();
            let _ = writeln!(
                m,
                "  {} in {} blocks ({}): {}",
                human_bytes(s.unfreed_bytes),
                s.unfreed_count,
                s.analysis.class.name(),
                inner.join(" ← ")
            );
        }
    }
    GateResult {
        failed,
        counted_bytes: counted,
        message: m,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("leak_*", "leak_malloc"));
        assert!(glob(
            "*leakyext.c:2?)*",
            "leak_malloc (leakyext.c:22) in leakyext.so"
        ));
        assert!(glob("*", ""));
        assert!(!glob("leak_?", "leak_malloc"));
        assert!(glob("a*b*c", "aXXbYYc"));
        assert!(!glob("a*b*c", "aXXbYY"));
    }

    #[test]
    fn parses_suppression_files() {
        let s = Suppressions::parse("# ours\nleak:known_cache\n\n  *vendor/*  \n");
        assert_eq!(s.0, ["known_cache", "*vendor/*"]);
    }
}
