//! The session's type censuses: a baseline early in the trace and one at the end (at
//! interpreter shutdown for `run`, while every object is intact).

use super::{Session, TraceMode};
use crate::analysis::census::Census;
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
}
