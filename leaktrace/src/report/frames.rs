//! Frames as the exported formats name them: one label per frame, outermost first.

use super::SiteReport;
use crate::stacks::merge::StackEntry;

/// One frame of a site's stack, as exports show it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Named {
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// A Python frame (else native).
    pub python: bool,
    /// The native frame's module (file name only).
    pub module: Option<String>,
}

impl Named {
    /// `handle (app.py:12)` for Python, `leak_malloc (leaky.c:12) [leaky.so]` for native.
    pub fn label(&self) -> String {
        let mut s = self.function.clone();
        if let Some(f) = &self.file {
            let short = f.rsplit('/').next().unwrap_or(f);
            match self.line {
                Some(l) => s.push_str(&format!(" ({short}:{l})")),
                None => s.push_str(&format!(" ({short})")),
            }
        }
        if let Some(m) = &self.module {
            s.push_str(&format!(" [{m}]"));
        }
        s
    }
}

/// The frames of a site a report shows (every native frame with `all`), outermost first,
/// ending with the allocator itself.
pub fn shown(site: &SiteReport, all: bool) -> Vec<Named> {
    let mut v: Vec<Named> = site
        .stack
        .iter()
        .filter(|e| all || !e.hidden())
        .map(|e| match e {
            StackEntry::Python { frame } => Named {
                function: frame.function.to_string(),
                file: Some(frame.filename.to_string()),
                line: frame.line,
                python: true,
                module: None,
            },
            StackEntry::Native { frame, .. } => {
                let module = frame
                    .module
                    .as_deref()
                    .map(|m| m.rsplit('/').next().unwrap_or(m).to_string());
                let function = match (&frame.function, frame.file_offset) {
                    (Some(f), _) => frame.inlined.last().unwrap_or(f).to_string(),
                    (None, Some(off)) => format!("{off:#x}"),
                    (None, None) => format!("{:#x}", frame.address),
                };
                Named {
                    function,
                    file: frame.file.as_deref().map(str::to_string),
                    line: frame.line,
                    python: false,
                    module,
                }
            }
        })
        .collect();
    v.push(Named {
        function: site.allocator.clone(),
        file: None,
        line: None,
        python: false,
        module: None,
    });
    v
}

/// A short name for a site: its innermost Python frame and the native function that called
/// the allocator (`app.py:12 in handle → leak_malloc`).
pub fn short_name(site: &SiteReport) -> String {
    let py = site.python_stack.last().map(|f| f.display());
    // The site's caller: the first frame outside CPython's allocator layer.
    let native = site
        .caller
        .function
        .as_deref()
        .map(str::to_string)
        .unwrap_or_else(|| site.allocator.clone());
    match py {
        Some(p) => format!("{p} → {native}"),
        None => native,
    }
}
