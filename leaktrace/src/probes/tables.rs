//! The kernel's maps as a session reads and writes them: traced processes and their flags,
//! Python walk parameters and thread states, unwind rows, counters and the live table.

use std::collections::{HashMap, HashSet};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use leaktrace_ebpf::{
    map, AllocFn, Counter, DeathInfo, LiveAlloc, LiveKey, PyOffsets, SiteStats, UnwindKey,
    UnwindRow, NUM_COUNTERS, TARGET_FOLLOW_FORKS, TARGET_FORKED_CHILD, TARGET_HELD, TARGET_PAUSE,
    TARGET_TRACED, UNWIND_ROWS,
};

use super::loader::{bpf_err, Tracer};
use crate::error::{Error, Result};

/// Counter values summed over CPUs, indexed by `Counter`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; NUM_COUNTERS as usize]);

impl Counters {
    /// One counter's value.
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }

    /// Every counter by name, as reports list them.
    pub fn named(&self) -> std::collections::BTreeMap<String, u64> {
        Counter::ALL
            .iter()
            .map(|c| (c.name().to_string(), self.get(*c)))
            .collect()
    }

    /// Total of all drop counters.
    pub fn drops(&self) -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.is_drop())
            .map(|c| self.get(*c))
            .sum()
    }
}

/// One block of the kernel's live table.
#[derive(Clone, Copy, Debug)]
pub struct LiveBlock {
    pub addr: u64,
    pub size: u64,
    pub site: u64,
    /// The function that allocated it (`None`: an unknown value).
    pub func: Option<AllocFn>,
}

impl Tracer {
    /// How process `tgid` died, as far as the kernel saw.
    pub fn death(&self, tgid: u32) -> Option<DeathInfo> {
        let map = self.map(map::DEATHS).ok()?;
        let deaths = BpfHashMap::<&MapData, u32, DeathInfo>::try_from(map).ok()?;
        deaths.get(&tgid, 0).ok()
    }

    /// Marks a process as traced (the programs ignore every other process); `pause`: stop it
    /// at its interpreter's lifecycle points (`run`'s child, which leaktrace ptraces).
    pub fn add_target(&mut self, tgid: u32, pause: bool) -> Result<()> {
        let mut flags = TARGET_TRACED;
        if pause {
            flags |= TARGET_PAUSE;
        }
        if self.follow_forks {
            flags |= TARGET_FOLLOW_FORKS;
        }
        let mut targets = self.targets_mut()?;
        // A child the kernel already took in (forked while leaktrace was setting up) keeps what
        // the kernel knows of it: held, and followed since its fork.
        let kept = targets.get(&tgid, 0).unwrap_or(0) & (TARGET_HELD | TARGET_FORKED_CHILD);
        targets
            .insert(tgid, flags | kept, 0)
            .map_err(|e| bpf_err("adding the target", e))
    }

    /// Stops tracing process `tgid` (a followed child that exec'd): its probes stay attached
    /// until leaktrace detaches, but the programs ignore it.
    pub fn remove_target(&mut self, tgid: u32) -> Result<()> {
        self.targets_mut()?
            .remove(&tgid)
            .map_err(|e| bpf_err("removing a target", e))
    }

    /// Tells the kernel process `tgid`'s program break (growth mode: a lower one later gives
    /// pages back).
    pub fn set_brk(&mut self, tgid: u32, brk: u64) -> Result<()> {
        let mut m: BpfHashMap<&mut MapData, u32, u64> =
            BpfHashMap::try_from(self.map_mut(map::BRKS)?).map_err(|e| bpf_err(map::BRKS, e))?;
        m.insert(tgid, brk, 0)
            .map_err(|e| bpf_err("setting the program break", e))
    }

    /// The map of traced processes (tgid → `TARGET_*` flags), for changing.
    pub(super) fn targets_mut(&mut self) -> Result<BpfHashMap<&mut MapData, u32, u32>> {
        BpfHashMap::try_from(self.map_mut(map::TARGETS)?).map_err(|e| bpf_err(map::TARGETS, e))
    }

    /// Clears `mask` from process `tgid`'s `TARGET_*` flags.
    pub fn clear_flags(&mut self, tgid: u32, mask: u32) -> Result<()> {
        let mut targets = self.targets_mut()?;
        let Ok(flags) = targets.get(&tgid, 0) else {
            return Ok(());
        };
        targets
            .insert(tgid, flags & !mask, 0)
            .map_err(|e| bpf_err("clearing a target's flags", e))
    }

    /// Process `tgid`'s `TARGET_*` flags (0 when it is not traced). Read from the map, so they
    /// hold even when the ring buffer had no room to announce what set them.
    pub fn flags(&self, tgid: u32) -> u32 {
        let Ok(map) = self.map(map::TARGETS) else {
            return 0;
        };
        let Ok(targets) = BpfHashMap::<&MapData, u32, u32>::try_from(map) else {
            return 0;
        };
        targets.get(&tgid, 0).unwrap_or(0)
    }

    /// Tells the kernel how to walk process `tgid`'s Python frames.
    pub fn set_python(&mut self, tgid: u32, offsets: &PyOffsets) -> Result<()> {
        let mut m: BpfHashMap<&mut MapData, u32, PyOffsets> =
            BpfHashMap::try_from(self.map_mut(map::PYPROCS)?)
                .map_err(|e| bpf_err(map::PYPROCS, e))?;
        m.insert(tgid, *offsets, 0)
            .map_err(|e| bpf_err("setting Python offsets", e))
    }

    /// Replaces process `tgid`'s thread → thread-state entries.
    pub fn set_threads(&mut self, tgid: u32, threads: &[(u32, u64)]) -> Result<()> {
        let known = self.threads.entry(tgid).or_default().clone();
        let now: HashSet<u32> = threads.iter().map(|(t, _)| *t).collect();
        // aya's HashMap serves LRU hash maps too.
        let mut m: BpfHashMap<&mut MapData, u32, u64> =
            BpfHashMap::try_from(self.map_mut(map::THREADS)?)
                .map_err(|e| bpf_err(map::THREADS, e))?;
        for gone in known.difference(&now) {
            let _ = m.remove(gone);
        }
        for (tid, tstate) in threads {
            // A full map only costs stacks for threads that allocate without the GIL.
            let _ = m.insert(*tid, *tstate, 0);
        }
        self.threads.insert(tgid, now);
        Ok(())
    }

    /// Forgets everything recorded for process `tgid` (it exec'd: its old address space is gone).
    pub fn forget_process(&mut self, tgid: u32) -> Result<()> {
        self.forget_semaphores(tgid);
        {
            let mut live: BpfHashMap<&mut MapData, LiveKey, LiveAlloc> =
                BpfHashMap::try_from(self.map_mut(map::LIVE)?)
                    .map_err(|e| bpf_err(map::LIVE, e))?;
            let keys: Vec<LiveKey> = live
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.tgid == tgid)
                .collect();
            for k in keys {
                let _ = live.remove(&k);
            }
        }
        let mut sites: BpfHashMap<&mut MapData, u64, SiteStats> =
            BpfHashMap::try_from(self.map_mut(map::SITES)?).map_err(|e| bpf_err(map::SITES, e))?;
        let doomed: Vec<u64> = sites
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, v)| v.tgid == tgid)
            .map(|(k, _)| k)
            .collect();
        for k in doomed {
            let _ = sites.remove(&k);
        }
        {
            let mut rows: BpfHashMap<&mut MapData, UnwindKey, UnwindRow> =
                BpfHashMap::try_from(self.map_mut(map::UNWIND)?)
                    .map_err(|e| bpf_err(map::UNWIND, e))?;
            let keys: Vec<UnwindKey> = rows
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.tgid == tgid)
                .collect();
            for k in keys {
                let _ = rows.remove(&k);
            }
            self.taught.retain(|(t, _)| *t != tgid);
        }
        let mut py: BpfHashMap<&mut MapData, u32, PyOffsets> =
            BpfHashMap::try_from(self.map_mut(map::PYPROCS)?)
                .map_err(|e| bpf_err(map::PYPROCS, e))?;
        let _ = py.remove(&tgid);
        self.set_threads(tgid, &[])
    }

    /// Teaches the kernel the unwind rows of return addresses of process `tgid`, so it can
    /// follow those call paths into site ids.
    pub fn learn_rows(&mut self, tgid: u32, rows: &[(u64, UnwindRow)]) -> Result<()> {
        // The kernel's map is LRU: past half its size, forget what was taught so rows the kernel
        // evicted are taught again.
        if self.taught.len() >= UNWIND_ROWS as usize / 2 {
            self.taught.clear();
        }
        let taught = &mut self.taught;
        let map = self
            .ebpf
            .map_mut(map::UNWIND)
            .ok_or_else(|| Error::Bpf("map UNWIND missing from the object".into()))?;
        let mut m: BpfHashMap<&mut MapData, UnwindKey, UnwindRow> =
            BpfHashMap::try_from(map).map_err(|e| bpf_err(map::UNWIND, e))?;
        for (pc, row) in rows {
            if !taught.insert((tgid, *pc)) {
                continue;
            }
            let key = UnwindKey {
                tgid,
                _pad: 0,
                pc: *pc,
            };
            m.insert(key, *row, 0)
                .map_err(|e| bpf_err("teaching unwind rows", e))?;
        }
        Ok(())
    }

    pub(super) fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| Error::Bpf(format!("map {name} missing from the object")))
    }

    pub(super) fn map(&self, name: &str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or_else(|| Error::Bpf(format!("map {name} missing from the object")))
    }

    /// Takes the ring buffer of new-site records (once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(map::EVENTS)
            .ok_or_else(|| Error::Bpf("ring buffer EVENTS already taken".into()))?;
        RingBuf::try_from(map).map_err(|e| bpf_err(map::EVENTS, e))
    }

    /// Event and drop counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(map::COUNTERS)?)
            .map_err(|e| bpf_err(map::COUNTERS, e))?;
        let mut out = Counters::default();
        for c in Counter::ALL {
            let vals = arr
                .get(&(c as u32), 0)
                .map_err(|e| bpf_err("reading COUNTERS", e))?;
            out.0[c as usize] = vals.iter().fold(0u64, |a, v| a.wrapping_add(*v));
        }
        Ok(out)
    }

    /// Calls `f` with every entry of the kernel's live table (an entry removed during the walk
    /// is skipped).
    fn each_live(&self, mut f: impl FnMut(&LiveKey, &LiveAlloc)) -> Result<()> {
        let map: BpfHashMap<&MapData, LiveKey, LiveAlloc> =
            BpfHashMap::try_from(self.map(map::LIVE)?).map_err(|e| bpf_err(map::LIVE, e))?;
        for (k, v) in map.iter().filter_map(|item| item.ok()) {
            f(&k, &v);
        }
        Ok(())
    }

    /// The live blocks of process `tgid`: (address, size, site id).
    pub fn live_blocks(&self, tgid: u32) -> Result<Vec<LiveBlock>> {
        let mut out = Vec::new();
        self.each_live(|k, v| {
            if k.tgid == tgid {
                out.push(LiveBlock {
                    addr: k.addr,
                    size: v.size,
                    site: v.site_id,
                    func: AllocFn::from_u8(v.func),
                });
            }
        })?;
        Ok(out)
    }

    /// Every live block of every traced process: (process, address, size, site id, allocation
    /// time in the kernel's monotonic nanoseconds).
    pub fn live_table(&self) -> Result<Vec<[u64; 5]>> {
        let mut out = Vec::new();
        self.each_live(|k, v| out.push([k.tgid as u64, k.addr, v.size, v.site_id, v.ts_ns]))?;
        Ok(out)
    }

    /// Per site, the bytes and blocks allocated at or after `since_ns` (the kernel's monotonic
    /// clock) and live now, in every traced process; sampled blocks count for what they stand
    /// for.
    pub fn live_since(&self, since_ns: u64) -> Result<HashMap<u64, (u64, u64)>> {
        let mut out: HashMap<u64, (u64, u64)> = HashMap::new();
        self.each_live(|_, v| {
            if v.ts_ns >= since_ns {
                let e = out.entry(v.site_id).or_default();
                e.0 += v.weight.max(v.size);
                e.1 += u64::from(v.count.max(1));
            }
        })?;
        Ok(out)
    }

    /// Every site with its counters.
    pub fn sites(&self) -> Result<Vec<(u64, SiteStats)>> {
        let map: BpfHashMap<&MapData, u64, SiteStats> =
            BpfHashMap::try_from(self.map(map::SITES)?).map_err(|e| bpf_err(map::SITES, e))?;
        // A site removed between the key walk and the lookup is simply skipped.
        Ok(map.iter().filter_map(|item| item.ok()).collect())
    }
}
