//! The session's loop: the kernel's records, the interval, the window, signals, the live view
//! and the target's own life (its pidfd, or `run`'s ptrace events), until tracing ends.

use std::os::fd::OwnedFd;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc::UnboundedReceiver;

use super::live::LiveView;
use super::signals::{Interrupt, Interrupts};
use super::waiting::{child_event, pid_exit, progress_line, reply, sleep_until};
use super::{census, control, quit_requested, Child, Session};
use crate::error::{Error, Result, EXIT_TARGET_EXITED_DURING_TRACE};
use crate::events::{parse, EventReader};
use crate::process::spawn::{Control, ExitKind, SpawnEvent};

/// SIGINT and SIGTERM, caught from the session's very start: one that comes while the probes
/// are still loading or attaching is taken once tracing starts, and ends the session as it
/// would then. Caught only from the trace loop on, it killed leaktrace outright (its default
/// action), which lets no held child go and writes no report.
pub(super) struct Signals {
    sigint: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (inside the runtime).
    pub(super) fn catch() -> Result<Self> {
        let handler =
            |e: std::io::Error| Error::Internal(format!("installing a signal handler: {e}"));
        Ok(Self {
            sigint: signal(SignalKind::interrupt()).map_err(handler)?,
            sigterm: signal(SignalKind::terminate()).map_err(handler)?,
        })
    }
}

/// What the loop watches besides the session's own state.
pub(super) struct Watch {
    pub(super) reader: EventReader,
    /// `run`: the ptrace thread's channels.
    pub(super) child: Child,
    /// `attach`: readable when the target exits.
    pub(super) pidfd: Option<AsyncFd<OwnedFd>>,
    /// `top`: the view asks to quit.
    pub(super) quit: Option<UnboundedReceiver<()>>,
    /// The target's command line (again after an exec).
    pub(super) command: String,
    pub(super) interrupts: Interrupts,
    /// `--control`: the client's requests.
    pub(super) control: Option<UnboundedReceiver<control::Request>>,
}

/// How tracing ended.
pub(super) struct Ending {
    /// In words, for the report's header.
    pub(super) why: String,
    pub(super) exit_code: i32,
    /// Set when the target died: `run`'s wait status, if it had one.
    pub(super) died: Option<Option<ExitKind>>,
}

impl Ending {
    fn detached(why: impl Into<String>) -> Self {
        Ending {
            why: why.into(),
            exit_code: 0,
            died: None,
        }
    }

    fn target_exited(waited: Option<ExitKind>) -> Self {
        Ending {
            why: waited.map_or("exited during tracing".into(), |k| k.to_string()),
            // `run` ends with its program's status, as `strace`, `valgrind` and `timeout` do:
            // `leaktrace run -- pytest` in CI must fail when the tests fail.
            exit_code: match waited {
                Some(ExitKind::Code(c)) => c,
                Some(ExitKind::Signal(s)) => 128 + s,
                None => EXIT_TARGET_EXITED_DURING_TRACE,
            },
            died: Some(waited),
        }
    }
}

impl Session<'_> {
    /// Traces until the target exits, the window ends, or the user interrupts.
    pub(super) async fn trace(
        &mut self,
        w: &mut Watch,
        live: &Option<LiveView>,
        signals: &mut Signals,
    ) -> Result<Ending> {
        let opts = self.opts;
        let pid = self.proc.pid;
        let mut tick = tokio::time::interval(opts.interval.unwrap_or(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
        let Signals { sigint, sigterm } = signals;
        let own = w.child.is_some();
        if w.control.is_some() {
            self.announce_ready();
        }
        loop {
            tokio::select! {
                first = w.reader.next_record() => {
                    if let Some(ev) = parse(&first) {
                        self.absorb(ev);
                    }
                    w.reader.drain(|ev| self.absorb(ev));
                }
                _ = tick.tick() => {
                    let sample = self.refresh()?;
                    self.publish(&sample, live);
                    if opts.interval.is_some() {
                        eprintln!("{}", progress_line(&sample));
                    } else if self.live_progress {
                        eprint!("\r\x1b[K{}", progress_line(&sample));
                    }
                    if w.pidfd.is_none() && !own && !self.proc.alive() {
                        return Ok(Ending::target_exited(None));
                    }
                }
                _ = sleep_until(deadline) => {
                    return Ok(Ending::detached("still running; detached at the end of the window"));
                }
                _ = sigint.recv() => {
                    if let Interrupt::Detach(why) = w.interrupts.received(Signal::SIGINT, own) {
                        return Ok(Ending::detached(why));
                    }
                }
                _ = sigterm.recv() => {
                    if let Interrupt::Detach(why) = w.interrupts.received(Signal::SIGTERM, own) {
                        return Ok(Ending::detached(why));
                    }
                }
                _ = sleep_until(w.interrupts.due()) => w.interrupts.pass_on(pid),
                _ = quit_requested(&mut w.quit) => {
                    return Ok(Ending::detached("still running; detached (quit from the live view)"));
                }
                req = control::next(&mut w.control) => {
                    if let Some(why) = self.on_request(w, req)? {
                        return Ok(Ending::detached(why));
                    }
                }
                _ = pid_exit(&w.pidfd) => return Ok(Ending::target_exited(None)),
                ev = child_event(&mut w.child) => {
                    if let Some(end) = self.on_child_event(w, ev)? {
                        return Ok(end);
                    }
                }
            }
        }
    }

    /// One ptrace event of `run`'s child; `Some` when it ends tracing.
    fn on_child_event(&mut self, w: &mut Watch, ev: Option<SpawnEvent>) -> Result<Option<Ending>> {
        let pid = self.proc.pid;
        match ev {
            Some(SpawnEvent::Exiting) => {
                // Its maps are still there: read everything it announced and symbolize it.
                log::debug!("target exiting; catching up");
                self.catch_up(&mut w.reader)?;
                log::debug!("caught up");
                reply(&w.child, Control::Release);
            }
            Some(SpawnEvent::Stopped) => {
                // Ours if the interpreter just reached a lifecycle point (the kernel set its
                // flag before stopping it); anyone else's is passed on.
                let ours = self.take_pause(&mut w.reader)?;
                reply(
                    &w.child,
                    if ours {
                        Control::Release
                    } else {
                        Control::Deliver
                    },
                );
            }
            Some(SpawnEvent::Exec) => {
                // A wrapper exec'd the real program: the old address space and everything
                // recorded in it are gone; probe the new program's libraries.
                self.catch_up(&mut w.reader)?;
                self.tracer.forget_process(pid)?;
                self.heap.forget_process(pid);
                self.sym.forget_process(pid);
                self.sym.refresh(pid);
                w.command = self.proc.cmdline();
                // A new interpreter starts and ends afresh: its pauses are still to come.
                self.paused = Some(census::Pauses::default());
                (self.main_at, self.finalized_at, self.census_base) = (None, None, None);
                let replanned = self
                    .tracer
                    .add_target(pid, true)
                    .and_then(|_| self.setup_probes());
                reply(&w.child, Control::Go);
                replanned?;
            }
            Some(SpawnEvent::Signal(sig)) => w.interrupts.child_took(sig),
            Some(SpawnEvent::Exited(kind)) => return Ok(Some(Ending::target_exited(Some(kind)))),
            Some(SpawnEvent::Failed(e)) => return Err(e),
            Some(SpawnEvent::Ready(_)) | None => {
                return Ok(Some(Ending::detached("lost track of the child")))
            }
        }
        Ok(None)
    }
}
