//! Attaching the heap-sampling USDTs: each site's argument spec goes into `USDT_SPECS` under a
//! cookie of its own, then the probe, then the provider's semaphore is raised so the process's
//! sampler starts firing. aya 0.14 cannot pass the kernel a semaphore offset (`ref_ctr_offset`),
//! so leaktrace raises and lowers the 16-bit count itself, as bcc did before the kernel could.

use aya::maps::HashMap as BpfHashMap;
use aya::programs::uprobe::UProbeScope;
use leaktrace_ebpf::{map, program, UsdtSpec};

use super::loader::{bpf_err, Tracer};
use super::usdt::UsdtPoint;
use crate::error::{Error, Result};
use crate::process::remote::Remote;

/// What leaktrace gave out for the USDTs: cookies, and the semaphores it raised.
#[derive(Default)]
pub struct UsdtState {
    /// The cookie of each site (file, offset) already given a spec: one `USDT_SPECS` entry per
    /// site however many processes map it.
    cookies: std::collections::HashMap<(std::path::PathBuf, u64), u64>,
    /// Each semaphore raised by one.
    raised: Vec<Raised>,
    /// Semaphores that could not be raised, with why.
    problems: Vec<String>,
}

/// A semaphore leaktrace raised by one: in which process, where, and in which file (its
/// inode), so that it is lowered only in the image it was raised in, not in a program the
/// process exec'd since or in another process that got its pid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Raised {
    pub pid: u32,
    pub addr: u64,
    /// 0 when the file could not be looked at: then any writable mapping there will do.
    pub inode: u64,
}

impl Raised {
    /// Lowers it by `n`, if it is still where it was raised; never below 0.
    pub fn lower(&self, n: u16) -> std::result::Result<(), String> {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid))
            .map_err(|e| format!("process gone ({e})"))?;
        let there = crate::process::maps::parse_maps(&maps).iter().any(|m| {
            m.start <= self.addr
                && self.addr.saturating_add(2) <= m.end
                && m.perms.starts_with("rw")
                && (self.inode == 0 || m.inode == self.inode)
        });
        if !there {
            return Err("no longer mapped from the file it was raised in".into());
        }
        add_to_semaphore(self.pid, self.addr, -i32::from(n))
    }
}

impl UsdtState {
    /// Process `pid` exec'd: the semaphores raised in its old image went with it. Returns them.
    fn forget(&mut self, pid: u32) -> Vec<Raised> {
        let (gone, kept) = std::mem::take(&mut self.raised)
            .into_iter()
            .partition(|r| r.pid == pid);
        self.raised = kept;
        gone
    }
}

impl Tracer {
    /// Attaches every heap-sampling site of process `pid`, then raises their semaphores.
    pub(super) fn attach_usdt(
        &mut self,
        points: &[UsdtPoint],
        pid: u32,
        scope: UProbeScope,
    ) -> Result<()> {
        for p in points {
            let cookie = self.usdt_cookie(p)?;
            let what = || format!("{} USDT in {}", p.provider, p.module);
            let at = (&p.host_path, p.file_offset, cookie);
            self.attach_point(pid, scope, &[program::USDT_ENTER], at, what)?;
        }
        let mut semaphores: Vec<Raised> = points
            .iter()
            .filter_map(|p| {
                use std::os::unix::fs::MetadataExt;
                let inode = std::fs::metadata(&p.host_path).map_or(0, |m| m.ino());
                let addr = p.semaphore?;
                Some(Raised { pid, addr, inode })
            })
            .collect();
        semaphores.sort_unstable_by_key(|r| r.addr);
        semaphores.dedup();
        for r in semaphores {
            let addr = r.addr;
            if self
                .usdt
                .raised
                .iter()
                .any(|q| q.pid == pid && q.addr == addr)
            {
                continue;
            }
            match add_to_semaphore(pid, addr, 1) {
                Ok(()) => {
                    self.usdt.raised.push(r);
                    self.journal(true, r);
                }
                Err(e) => self.usdt.problems.push(format!(
                    "process {pid}: the sampler's semaphore at {addr:#x} could not be raised \
                     ({e}); it samples only if something else turned it on"
                )),
            }
        }
        Ok(())
    }

    /// Attaches sites found once the session was under way (in a library the program loaded
    /// later), scoped to process `pid`, and raises their semaphores.
    pub fn attach_late_usdt(&mut self, points: &[UsdtPoint], pid: u32) -> Result<()> {
        let pid_nz = std::num::NonZeroU32::new(pid).ok_or(Error::NoSuchProcess(pid))?;
        self.attach_usdt(points, pid, UProbeScope::OneProcess(pid_nz))
    }

    /// A child forked by `parent` holds a copy of the semaphores leaktrace raised there: they
    /// count as raised in the child too (lowered at the end, not raised again). A child that
    /// exec'd has a new image: what it inherited is forgotten.
    pub fn inherit_semaphores(&mut self, parent: u32, child: u32) {
        self.forget_semaphores(child);
        let copied: Vec<Raised> = self
            .usdt
            .raised
            .iter()
            .filter(|r| r.pid == parent)
            .map(|r| Raised { pid: child, ..*r })
            .collect();
        for &r in &copied {
            self.journal(true, r);
        }
        self.usdt.raised.extend(copied);
    }

    /// Tells the guardian, which lowers what is still raised should leaktrace die.
    fn journal(&self, raised: bool, r: Raised) {
        if let Some(g) = &self.guardian {
            g.note_semaphore(raised, r);
        }
    }

    /// The cookie of `p`'s site, its spec put in `USDT_SPECS` the first time.
    fn usdt_cookie(&mut self, p: &UsdtPoint) -> Result<u64> {
        let site = (p.host_path.clone(), p.file_offset);
        if let Some(cookie) = self.usdt.cookies.get(&site) {
            return Ok(*cookie);
        }
        let cookie = self.usdt.cookies.len() as u64;
        let mut specs: BpfHashMap<_, u64, UsdtSpec> = BpfHashMap::try_from(
            self.ebpf
                .map_mut(map::USDT_SPECS)
                .ok_or_else(|| crate::error::Error::Bpf(format!("no {} map", map::USDT_SPECS)))?,
        )
        .map_err(|e| bpf_err(map::USDT_SPECS, e))?;
        specs
            .insert(cookie, p.spec, 0)
            .map_err(|e| bpf_err("adding a USDT site", e))?;
        self.usdt.cookies.insert(site, cookie);
        Ok(cookie)
    }

    /// Process `pid` exec'd another program: what was raised in its old image is gone.
    pub fn forget_semaphores(&mut self, pid: u32) {
        for r in self.usdt.forget(pid) {
            self.journal(false, r);
        }
    }

    /// What went wrong with semaphores since the last call, for the report's notes.
    pub fn take_usdt_problems(&mut self) -> Vec<String> {
        std::mem::take(&mut self.usdt.problems)
    }

    /// Lowers every semaphore leaktrace raised (processes that are gone are skipped).
    pub(super) fn lower_semaphores(&mut self) {
        for r in std::mem::take(&mut self.usdt.raised) {
            if let Err(e) = r.lower(1) {
                log::debug!("semaphore {:#x} of {} not lowered: {e}", r.addr, r.pid);
            }
            // Lowered first: should leaktrace die between the two, the guardian lowers it
            // again (never below 0) rather than leave it raised.
            self.journal(false, r);
        }
    }
}

/// Adds `delta` to the 16-bit use count at `addr` in process `pid`, never below zero.
fn add_to_semaphore(pid: u32, addr: u64, delta: i32) -> std::result::Result<(), String> {
    let r = Remote { pid };
    let now = r.read(addr, 2).ok_or("unreadable")?;
    let now = u16::from_le_bytes([now[0], now[1]]);
    let new = (i32::from(now) + delta).clamp(0, i32::from(u16::MAX)) as u16;
    r.write(addr, &new.to_le_bytes())
}
