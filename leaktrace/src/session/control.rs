//! `--control`: a tool that drives leaktrace (the pytest plugin) asks questions while tracing
//! goes on — one request a line on standard input, one JSON line each on standard output
//! (docs/control.md). The main question: which allocations made since a mark are still live,
//! grouped by stack, as a report of its own.

use std::collections::HashMap;
use std::io::{BufRead, Write};

use serde_json::json;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::watch::Watch;
use super::Session;
use crate::error::Result;

/// One request of the controlling client.
#[derive(Debug, PartialEq)]
pub(super) enum Request {
    /// The kernel's clock now (`CLOCK_MONOTONIC`, as allocation times are stamped).
    Mark,
    /// The target's allocations made at or after `since` (a mark) and still live.
    Live { since: u64, top: usize },
    /// Point the interpreter's object and mem allocator tables at the raw allocator, so every
    /// Python object made from now on is a probed malloc (`probes::redirect`).
    Redirect,
    /// Put pymalloc back.
    Restore,
    /// End the session (also sent when the input ends: the client is gone).
    Stop(&'static str),
    /// A line that is none of the above; answered with an error, tracing goes on.
    Bad(String),
}

impl Request {
    /// Parses one input line.
    pub(super) fn parse(line: &str) -> Request {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["mark"] => Request::Mark,
            ["redirect"] => Request::Redirect,
            ["restore"] => Request::Restore,
            ["stop"] => Request::Stop("stopped by the controlling client"),
            ["live", since] | ["live", since, _] => {
                let top = match words.get(2) {
                    Some(t) => match t.parse() {
                        Ok(n) => n,
                        Err(_) => return Request::Bad(format!("live: bad TOP {t:?}")),
                    },
                    None => 10,
                };
                match since.parse() {
                    Ok(since) => Request::Live { since, top },
                    Err(_) => Request::Bad(format!("live: bad SINCE_NS {since:?}")),
                }
            }
            _ => Request::Bad(format!(
                "unknown request {line:?} (mark | live SINCE_NS [TOP] | redirect | restore | stop)"
            )),
        }
    }
}

/// Reads standard input on a thread of its own, a request a line. (Not a runtime task: a
/// blocked read would hold the runtime's shutdown until the client writes again; the thread
/// ends with the process.)
pub(super) fn requests() -> UnboundedReceiver<Request> {
    let (tx, rx) = unbounded_channel();
    std::thread::spawn(move || {
        let mut lines = std::io::stdin().lock().lines();
        loop {
            let req = match lines.next() {
                Some(Ok(line)) if line.trim().is_empty() => continue,
                Some(Ok(line)) => Request::parse(&line),
                Some(Err(_)) | None => Request::Stop("detached: the controlling client went away"),
            };
            let last = matches!(req, Request::Stop(_));
            if tx.send(req).is_err() || last {
                return;
            }
        }
    });
    rx
}

/// The next request, or never when there is no client.
pub(super) async fn next(control: &mut Option<UnboundedReceiver<Request>>) -> Request {
    match control {
        Some(rx) => match rx.recv().await {
            Some(r) => r,
            None => {
                *control = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// Writes one answer line; a client that stopped reading is not an error of the trace.
pub(super) fn answer(value: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` stamps allocations with.
fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always readable");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

impl Session<'_> {
    /// Answers one request; `Some(why)` when it ends the session.
    pub(super) fn on_request(
        &mut self,
        w: &mut Watch,
        req: Request,
    ) -> Result<Option<&'static str>> {
        match req {
            Request::Mark => answer(&json!({ "mark_ns": monotonic_ns() })),
            // A failed request is answered; tracing goes on.
            Request::Live { since, top } => answer(&match self.live_since(w, since, top) {
                Ok(v) => json!({ "live": v }),
                Err(e) => json!({ "error": format!("live: {e}") }),
            }),
            Request::Redirect => answer(&match self.redirect_now() {
                Ok(slots) => json!({ "redirected": slots }),
                Err(e) => json!({ "error": e.to_string() }),
            }),
            Request::Restore if self.opts.redirect_pymalloc => answer(&json!({
                "error": "restore: --redirect-pymalloc holds the tables switched for the whole session"
            })),
            Request::Restore => {
                let left = self.redirect.take().map_or(0, |mut r| r.restore());
                answer(&json!({ "restored": left == 0 }));
            }
            Request::Stop(why) => return Ok(Some(why)),
            Request::Bad(e) => answer(&json!({ "error": e })),
        }
        Ok(None)
    }

    /// The report of what was allocated at or after `since` and is live now, in every traced
    /// process: the kernel's records read first, so every stack in it is known.
    fn live_since(&mut self, w: &mut Watch, since: u64, top: usize) -> Result<serde_json::Value> {
        self.catch_up(&mut w.reader)?;
        let per_site: HashMap<u64, (u64, u64)> = self.tracer.live_since(since)?;
        let (bytes, blocks) = per_site
            .values()
            .fold((0u64, 0u64), |(b, n), (sb, sn)| (b + sb, n + sn));
        let sub = self.heap.restricted(&per_site);
        let (meta, opts) = self.running_report(top);
        let report = crate::report::Report::build(&sub, &mut self.sym, meta, opts);
        Ok(json!({
            "since_ns": since,
            "bytes": bytes,
            "blocks": blocks,
            "report": report,
        }))
    }

    /// Switches the allocator tables (found once, checked again at each switch); the number of
    /// slots switched.
    fn redirect_now(&mut self) -> Result<usize> {
        if let Some(r) = &self.redirect {
            return Ok(r.slots().len());
        }
        let Some(py) = &self.plan.python else {
            return Err(crate::Error::Usage(
                "redirect: the target runs no Python interpreter leaktrace knows".into(),
            ));
        };
        if self.tables.is_none() {
            let modules = self.proc.module_map()?;
            self.tables = Some(crate::probes::plan::allocator_tables(
                self.proc.pid,
                py,
                &modules,
            )?);
        }
        let applied = self.tables.as_ref().expect("found above").apply()?;
        let n = applied.slots().len();
        self.redirect = Some(applied);
        Ok(n)
    }

    /// Says the probes are in, once, before the first request is read.
    pub(super) fn announce_ready(&self) {
        answer(&json!({
            "ready": {
                "pid": self.proc.pid,
                "mode": self.opts.mode.kind(),
                "mark_ns": monotonic_ns(),
            }
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(Request::parse("mark"), Request::Mark);
        assert_eq!(
            Request::parse(" live 123 5 "),
            Request::Live { since: 123, top: 5 }
        );
        assert_eq!(
            Request::parse("live 7"),
            Request::Live { since: 7, top: 10 }
        );
        assert!(matches!(Request::parse("stop"), Request::Stop(_)));
        for bad in [
            "live",
            "live x",
            "live 1 y",
            "live 1 2 3",
            "snapshot",
            "mark now",
        ] {
            assert!(
                matches!(Request::parse(bad), Request::Bad(_)),
                "{bad:?} parsed"
            );
        }
    }

    #[test]
    fn marks_increase_on_the_kernels_clock() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
    }
}
