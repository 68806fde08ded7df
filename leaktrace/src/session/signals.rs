//! SIGINT and SIGTERM sent to leaktrace while `run` traces its child. leaktrace never ends the
//! child for them: as `timeout` and strace do, the signal is passed on once — unless the child
//! took it already, as it does when a terminal's Ctrl-C goes to the whole process group — and
//! tracing goes on until the child exits, so its handlers and atexit run and the report says how
//! it ended. A second signal detaches: leaktrace reports and leaves, the child runs on.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// How long leaktrace waits to see whether the child took the same signal itself (a terminal's
/// Ctrl-C reaches both at once) before passing it on.
const SAME_SIGNAL_WINDOW: Duration = Duration::from_millis(100);

/// What the session does about a signal leaktrace received.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Interrupt {
    /// Keep tracing: the child got the signal, or will in a moment.
    Wait,
    /// Stop tracing and detach, for this reason.
    Detach(String),
}

/// `run`'s record of the signals sent to leaktrace and to its child.
#[derive(Debug, Default)]
pub(super) struct Interrupts {
    /// When the child last took each signal (its tracer sees every one).
    child_got: HashMap<Signal, Instant>,
    /// A signal leaktrace received and when, to pass on unless the child takes it too.
    pending: Option<(Signal, Instant)>,
    /// Signals passed on to the child.
    pub passed_on: Vec<Signal>,
    /// Whether leaktrace was signalled before.
    signalled: bool,
}

impl Interrupts {
    /// The child is taking signal `sig`.
    pub fn child_took(&mut self, sig: Signal) {
        self.child_got.insert(sig, Instant::now());
    }

    /// leaktrace received `sig`; `run` is whether there is a child to pass it on to.
    pub fn received(&mut self, sig: Signal, run: bool) -> Interrupt {
        let how = match sig {
            Signal::SIGINT => "Ctrl-C (SIGINT)",
            _ => sig.as_str(),
        };
        if !run {
            return Interrupt::Detach(format!("still running; detached on {how}"));
        }
        if self.signalled {
            return Interrupt::Detach(format!(
                "still running; detached on a second {how} (the child runs on, untraced)"
            ));
        }
        self.signalled = true;
        self.pending = Some((sig, Instant::now()));
        Interrupt::Wait
    }

    /// When the pending signal is due to be passed on.
    pub fn due(&self) -> Option<tokio::time::Instant> {
        self.pending
            .map(|(_, at)| tokio::time::Instant::from_std(at + SAME_SIGNAL_WINDOW))
    }

    /// Passes the pending signal on to `pid` unless it took it already.
    pub fn pass_on(&mut self, pid: u32) {
        let Some((sig, at)) = self.pending.take() else {
            return;
        };
        // Taken within the window before or after leaktrace got it: the same Ctrl-C.
        let took = self
            .child_got
            .get(&sig)
            .is_some_and(|t| *t + SAME_SIGNAL_WINDOW >= at);
        if took {
            log::debug!("the child took {sig} itself");
            return;
        }
        // SAFETY: a plain syscall.
        unsafe { libc::kill(pid as i32, sig as i32) };
        self.passed_on.push(sig);
    }

    /// The report's note, if a signal was passed on.
    pub fn note(&self) -> Option<String> {
        (!self.passed_on.is_empty()).then(|| {
            let names: Vec<&str> = self.passed_on.iter().map(|s| s.as_str()).collect();
            format!(
                "leaktrace passed on the {} it received to the target",
                names.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_detaches_at_once() {
        let mut i = Interrupts::default();
        assert!(matches!(
            i.received(Signal::SIGTERM, false),
            Interrupt::Detach(_)
        ));
    }

    #[test]
    fn run_waits_then_detaches_on_the_second_signal() {
        let mut i = Interrupts::default();
        assert_eq!(i.received(Signal::SIGTERM, true), Interrupt::Wait);
        assert!(i.due().is_some());
        match i.received(Signal::SIGINT, true) {
            Interrupt::Detach(why) => assert!(why.contains("second Ctrl-C"), "{why}"),
            Interrupt::Wait => panic!("a second signal must detach"),
        }
    }

    #[test]
    fn a_signal_the_child_took_is_not_passed_on() {
        let mut i = Interrupts::default();
        i.child_took(Signal::SIGINT);
        assert_eq!(i.received(Signal::SIGINT, true), Interrupt::Wait);
        // A pid no process can have (above the kernel's largest pid_max), in case it were sent.
        i.pass_on(4_194_400);
        assert!(i.passed_on.is_empty());
        assert!(i.note().is_none());
        assert!(i.due().is_none());
    }
}
