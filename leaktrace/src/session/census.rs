//! The session's type censuses: a baseline early in the trace and one at the end (at
//! interpreter shutdown for `run`, while every object is intact), put into the report.

use std::collections::HashMap;

use super::{Session, TraceMode};
use crate::analysis::census::{Census, TypeCensus};
use crate::report::Report;
use crate::stacks::python::objects::TypeReader;

impl Session<'_> {
    /// Counts the target's live Python objects by type (`None` for growth mode, a process that
    /// is not Python, or an interpreter without `PyType_Type`).
    pub(super) fn take_census(&mut self) -> Option<Census> {
        if let TraceMode::Growth { .. } = self.opts.mode {
            return None;
        }
        let py = self.py.as_ref()?;
        let mut reader = TypeReader::new(self.proc.pid, py.type_type?, py.layout.version);
        let blocks = match self.tracer.live_blocks(self.proc.pid) {
            Ok(b) => b,
            Err(e) => {
                log::warn!("reading live blocks for the type census: {e}");
                return None;
            }
        };
        Some(Census::take(&mut reader, &blocks))
    }

    /// Takes the baseline once the trace has run its first second.
    pub(super) fn baseline_census(&mut self) {
        if self.census_base.is_some() || self.census_end.is_some() {
            return;
        }
        let t = self.start.elapsed().as_secs_f64();
        if t >= 1.0 {
            if let Some(c) = self.take_census() {
                self.census_base = Some((t, c));
            }
        }
    }

    /// Puts the census into the report: overall, and the top types of each site shown.
    pub(super) fn census_into(&self, report: &mut Report) {
        let Some(end) = &self.census_end else { return };
        let base = self.census_base.as_ref().map(|(t, c)| (*t, c));
        report.type_census = Some(TypeCensus::of(end, base));
        for site in report.sites.iter_mut() {
            let mut types: HashMap<&str, u64> = HashMap::new();
            for id in &site.kernel_site_ids {
                for (name, n) in end.by_site.get(id).into_iter().flatten() {
                    *types.entry(name).or_default() += n;
                }
            }
            let mut v: Vec<(String, u64)> =
                types.into_iter().map(|(k, n)| (k.to_string(), n)).collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            v.truncate(3);
            site.types = v;
        }
    }
}
