//! `--verbose` timing of a session's phases: where its fixed cost goes.

use std::time::Instant;

/// `--verbose`: how long each phase of a session took, printed as each ends.
pub struct Phases {
    last: std::cell::Cell<Option<Instant>>,
}

impl Phases {
    /// Starts the clock when `verbose`; otherwise every call does nothing.
    pub fn new(verbose: bool) -> Self {
        Self {
            last: std::cell::Cell::new(verbose.then(Instant::now)),
        }
    }

    /// Prints the time since the previous phase ended, and starts the next.
    pub fn done(&self, what: &str) {
        if let Some(t) = self.last.get() {
            eprintln!(
                "leaktrace: phase: {what}: {:.3} s",
                t.elapsed().as_secs_f64()
            );
            self.last.set(Some(Instant::now()));
        }
    }
}
