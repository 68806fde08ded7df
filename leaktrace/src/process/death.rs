//! How a traced process ended, from what the kernel recorded (`DEATHS`) and, for `run`, the
//! child's wait status: the cause a post-mortem report names.

use leaktrace_ebpf::{death, DeathInfo};
use nix::sys::signal::Signal;
use serde::Serialize;

use super::spawn::ExitKind;

/// What ended a traced process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The kernel's OOM killer.
    OomKill,
    /// A fatal signal.
    Signal,
    /// `exit_group` (a return from main, `exit`, `_exit`).
    Exit,
}

/// The cause of a traced process's end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Death {
    pub cause: Cause,
    /// The fatal signal's name, when a signal ended it.
    pub signal: Option<String>,
    pub exit_code: Option<i32>,
    /// Who sent the fatal signal: "pid 1234 (bash)".
    pub sender: Option<String>,
}

impl Death {
    /// Combines the kernel's record with the wait status (`run` only; the wait status wins).
    pub fn of(info: Option<DeathInfo>, waited: Option<ExitKind>) -> Option<Death> {
        let info = info.unwrap_or_default();
        let oom = info.flags & death::OOM_VICTIM != 0;
        let signaled = info.flags & death::SIGNALED != 0;
        let exited = info.flags & death::EXITED != 0;
        // `exit_group` ends the other threads with SIGKILL, which the kernel shows as delivered:
        // that is an exit. And a fatal signal nobody handles (SIGTERM, SIGINT, SIGHUP…) is turned
        // by the kernel into a SIGKILL of the whole group before any thread takes it: the
        // signal that was sent is the cause.
        let sigkill = signaled && info.signal == 9;
        let (signal, exit_code) = match waited {
            Some(ExitKind::Signal(s)) => (Some(s as u32), None),
            Some(ExitKind::Code(c)) => (None, Some(c)),
            None if sigkill && exited && !oom => (None, Some(info.exit_code)),
            None if sigkill && info.sent_signal != 0 && !oom => (Some(info.sent_signal), None),
            None if signaled => (Some(info.signal), None),
            None if exited => (None, Some(info.exit_code)),
            None if oom => (Some(9), None),
            None => return None,
        };
        let sender = match signal {
            Some(s) if info.sender_tgid != 0 && info.sent_signal == s && !oom => {
                let end = info.sender_comm.iter().position(|b| *b == 0);
                let comm = String::from_utf8_lossy(&info.sender_comm[..end.unwrap_or(16)]);
                Some(format!("pid {} ({comm})", info.sender_tgid))
            }
            _ => None,
        };
        Some(Death {
            cause: if oom {
                Cause::OomKill
            } else if signal.is_some() {
                Cause::Signal
            } else {
                Cause::Exit
            },
            signal: signal.map(signal_name),
            exit_code,
            sender,
        })
    }

    /// "killed by the OOM killer (SIGKILL)", "killed by SIGTERM from pid 7 (bash)", "exited
    /// with code 1".
    pub fn describe(&self) -> String {
        let sig = self.signal.as_deref().unwrap_or("?");
        match (self.cause, &self.sender) {
            (Cause::OomKill, _) => format!("killed by the kernel's OOM killer ({sig})"),
            (Cause::Signal, Some(from)) => format!("killed by {sig} from {from}"),
            (Cause::Signal, None) => format!("killed by {sig}"),
            (Cause::Exit, _) => format!("exited with code {}", self.exit_code.unwrap_or(0)),
        }
    }
}

fn signal_name(s: u32) -> String {
    Signal::try_from(s as i32)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {s}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comm(s: &str) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..s.len()].copy_from_slice(s.as_bytes());
        c
    }

    #[test]
    fn names_the_cause() {
        let oom = DeathInfo {
            flags: death::OOM_VICTIM | death::SIGNALED,
            signal: 9,
            sender_tgid: 77,
            sent_signal: 9,
            sender_comm: comm("python3"),
            ..Default::default()
        };
        let d = Death::of(Some(oom), None).unwrap();
        assert_eq!(d.cause, Cause::OomKill);
        assert_eq!(d.describe(), "killed by the kernel's OOM killer (SIGKILL)");

        let killed = DeathInfo {
            flags: death::SIGNALED,
            signal: 15,
            sender_tgid: 42,
            sent_signal: 15,
            sender_comm: comm("bash"),
            ..Default::default()
        };
        assert_eq!(
            Death::of(Some(killed), None).unwrap().describe(),
            "killed by SIGTERM from pid 42 (bash)"
        );
        // A handled SIGINT was sent, but a SIGSEGV ended it.
        let segv = DeathInfo {
            signal: 11,
            sent_signal: 2,
            ..killed
        };
        assert_eq!(
            Death::of(Some(segv), None).unwrap().describe(),
            "killed by SIGSEGV"
        );
        let exit = DeathInfo {
            flags: death::EXITED,
            exit_code: 3,
            ..Default::default()
        };
        assert_eq!(
            Death::of(Some(exit), None).unwrap().describe(),
            "exited with code 3"
        );
        // SIGTERM with no handler: the kernel delivers it as a group SIGKILL.
        let term = DeathInfo {
            flags: death::SIGNALED,
            signal: 9,
            sender_tgid: 42,
            sent_signal: 15,
            sender_comm: comm("bash"),
            ..Default::default()
        };
        assert_eq!(
            Death::of(Some(term), None).unwrap().describe(),
            "killed by SIGTERM from pid 42 (bash)"
        );
        // A threaded process calling exit_group: its other threads take SIGKILL.
        let threaded_exit = DeathInfo {
            flags: death::EXITED | death::SIGNALED,
            signal: 9,
            exit_code: 0,
            ..Default::default()
        };
        assert_eq!(
            Death::of(Some(threaded_exit), None).unwrap().describe(),
            "exited with code 0"
        );
        // A real SIGKILL is still one.
        let kill9 = DeathInfo {
            sent_signal: 9,
            ..term
        };
        assert_eq!(
            Death::of(Some(kill9), None).unwrap().describe(),
            "killed by SIGKILL from pid 42 (bash)"
        );
        // `run`'s wait status wins; the kernel adds the OOM killer.
        let d = Death::of(Some(oom), Some(ExitKind::Signal(9))).unwrap();
        assert_eq!(d.cause, Cause::OomKill);
        assert_eq!(Death::of(None, None), None);
    }
}
