//! Writes a capture as tracing goes: new frames and sites, then each interval's changes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;

use super::{Header, Record, SiteCounts, SiteRecord, Tick, LIVE_CHUNK};
use crate::error::{Error, Result};
use crate::heap::{Heap, Sample, Site};
use crate::report::ReportMeta;
use crate::stacks::native::UnwindEnd;
use crate::stacks::python::PyFrame;
use crate::stacks::symbolize::Symbolizer;

/// Intervals between writes of the counters other than live bytes and blocks.
const FULL_EVERY: u64 = 30;

fn counts(site: &Site) -> SiteCounts {
    let st = &site.stats;
    [
        site.id,
        st.live_bytes,
        st.live_count,
        st.allocs,
        st.alloc_bytes,
        st.frees,
        st.frees_old,
    ]
}

/// What a site record said, to write it again only when its stack became more complete.
type Shape = (usize, UnwindEnd, Option<u8>, bool, usize);

fn shape(s: &Site) -> Shape {
    (
        s.native.len(),
        s.native_end,
        s.python_status,
        s.unplaced,
        s.python.len(),
    )
}

/// An open capture file.
pub struct CaptureWriter {
    /// gzip, sync-flushed every interval: what was flushed decompresses even if the file is
    /// cut after it.
    out: GzEncoder<BufWriter<File>>,
    path: PathBuf,
    /// Frame ids by (process, address), and whether the frame was placed when written.
    frames: HashMap<(u32, u64), (u32, bool)>,
    /// Native call-tree nodes by (parent, frame).
    nodes: HashMap<(u32, u32), u32>,
    py: HashMap<PyFrame, u32>,
    /// Python call-tree nodes by (parent, frame, entry).
    py_nodes: HashMap<(u32, u32, bool), u32>,
    sites: HashMap<u64, Shape>,
    /// Each site's counters as last written.
    counts: HashMap<u64, SiteCounts>,
    ticks: u64,
    /// The first write error: the capture stops there, tracing goes on.
    failed: Option<String>,
}

impl CaptureWriter {
    /// Creates (truncates) `path` and writes the header.
    pub fn create(path: &Path, header: Header) -> Result<Self> {
        let file = File::create(path).map_err(|e| Error::Write {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        let mut w = Self {
            out: GzEncoder::new(
                BufWriter::with_capacity(1 << 16, file),
                Compression::default(),
            ),
            path: path.to_path_buf(),
            frames: HashMap::new(),
            nodes: HashMap::new(),
            py: HashMap::new(),
            py_nodes: HashMap::new(),
            sites: HashMap::new(),
            counts: HashMap::new(),
            ticks: 0,
            failed: None,
        };
        w.put(&Record::Header(header));
        w.flush();
        match w.failed.take() {
            Some(e) => Err(Error::Write {
                path: path.to_path_buf(),
                detail: e,
            }),
            None => Ok(w),
        }
    }

    /// Why the capture stopped early, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failed
            .as_ref()
            .map(|e| format!("capture {} stopped early: {e}", self.path.display()))
    }

    fn put(&mut self, r: &Record) {
        if self.failed.is_some() {
            return;
        }
        let res = serde_json::to_writer(&mut self.out, r)
            .map_err(|e| e.to_string())
            .and_then(|_| self.out.write_all(b"\n").map_err(|e| e.to_string()));
        if let Err(e) = res {
            self.failed = Some(e);
        }
    }

    fn flush(&mut self) {
        if self.failed.is_none() {
            if let Err(e) = self.out.flush() {
                self.failed = Some(e.to_string());
            }
        }
    }

    /// Records one interval: sites that hold memory for the first time or whose stack became
    /// more complete (with their frames, named now, while the process's files are at hand), the
    /// counters that changed, and the point. Flushed, so a crash loses at most the interval
    /// being traced. A site that never holds memory at a tick (allocated and freed in between)
    /// is never written: most of a busy process's sites are such.
    pub fn tick(&mut self, heap: &Heap, sym: &mut Symbolizer, point: &Sample) {
        let mut changed = Vec::new();
        for site in heap.sites() {
            let held = site.stats.live_bytes > 0 && site.stats.live_bytes < (1 << 62);
            match self.sites.get(&site.id) {
                None if !held => continue,
                Some(s) if *s == shape(site) => {}
                _ => self.site(site, sym),
            }
            let c = counts(site);
            let last = self.counts.get(&site.id);
            // Live bytes and blocks go in every interval they change (trends are made of them);
            // the other counters, which a busy site bumps every interval, every `FULL_EVERY`.
            let due = match last {
                None => true,
                Some(l) if l[1..3] != c[1..3] => true,
                Some(l) => self.ticks.is_multiple_of(FULL_EVERY) && *l != c,
            };
            if due {
                self.counts.insert(site.id, c);
                changed.push(c);
            }
        }
        self.ticks += 1;
        changed.sort_unstable();
        self.put(&Record::Tick(Tick {
            t: point.t,
            rss: point.rss_bytes,
            arenas: point.arena_bytes,
            live_bytes: point.live_bytes,
            live_count: point.live_count,
            allocs: point.allocs,
            frees: point.frees,
            drops: point.drops,
            sites: changed,
        }));
        self.flush();
    }

    fn site(&mut self, site: &Site, sym: &mut Symbolizer) {
        // Outermost first: each frame's node hangs under its caller's.
        let mut native = 0;
        for (i, pc) in site.native.iter().enumerate().rev() {
            let eval = site.native_eval.get(i).copied().unwrap_or(false);
            let frame = self.frame(site.pid, *pc, eval, sym);
            native = self.node(native, frame);
        }
        let mut python = 0;
        for (i, f) in site.python.iter().enumerate().rev() {
            let next = self.py.len() as u32 + 1;
            let py = *self.py.entry(f.clone()).or_insert(next);
            if py == next {
                self.put(&Record::Py {
                    id: py,
                    f: f.clone(),
                });
            }
            let entry = site.python_entry.get(i).copied().unwrap_or(false);
            let next = self.py_nodes.len() as u32 + 1;
            let id = *self.py_nodes.entry((python, py, entry)).or_insert(next);
            if id == next {
                self.put(&Record::PyNode {
                    id,
                    parent: python,
                    py,
                    entry,
                });
            }
            python = id;
        }
        self.put(&Record::Site(SiteRecord {
            id: site.id,
            pid: site.pid,
            func: site.func as u8,
            native,
            end: site.native_end,
            python,
            status: site.python_status,
            truncated: site.python_truncated,
        }));
        self.sites.insert(site.id, shape(site));
    }

    /// The id of a native frame, written (named) the first time, and again once placed.
    fn frame(&mut self, pid: u32, pc: u64, eval: bool, sym: &mut Symbolizer) -> u32 {
        let known = self.frames.get(&(pid, pc)).copied();
        if let Some((id, true)) = known {
            return id;
        }
        let mut f = sym.return_address(pid, pc);
        let placed = f.module.is_some();
        if known.is_some() && !placed {
            return known.map_or(0, |(id, _)| id);
        }
        if placed {
            sym.resolve(pid, &mut f);
        }
        let id = known.map_or(self.frames.len() as u32 + 1, |(id, _)| id);
        self.frames.insert((pid, pc), (id, placed));
        self.put(&Record::Frame { id, pid, eval, f });
        id
    }

    fn node(&mut self, parent: u32, frame: u32) -> u32 {
        let next = self.nodes.len() as u32 + 1;
        let id = *self.nodes.entry((parent, frame)).or_insert(next);
        if id == next {
            self.put(&Record::Node { id, parent, frame });
        }
        id
    }

    /// Ends the capture: every counter not yet written, the live blocks, then how tracing
    /// ended. Returns the file's size.
    pub fn finish(mut self, heap: &Heap, meta: &ReportMeta, live: &[[u64; 5]]) -> Result<u64> {
        let mut left: Vec<SiteCounts> = heap
            .sites()
            .filter(|s| self.sites.contains_key(&s.id))
            .map(counts)
            .filter(|c| self.counts.get(&c[0]) != Some(c))
            .collect();
        left.sort_unstable();
        self.put(&Record::Counts { sites: left });
        for chunk in live.chunks(LIVE_CHUNK) {
            self.put(&Record::Live {
                blocks: chunk.to_vec(),
            });
        }
        self.put(&Record::End(Box::new(meta.clone())));
        self.flush();
        if let Some(e) = self.failure() {
            return Err(Error::Write {
                path: self.path.clone(),
                detail: e,
            });
        }
        let file = match self.out.finish() {
            Ok(mut w) => w.flush().map(|_| w),
            Err(e) => Err(e),
        };
        let size = file
            .and_then(|w| w.get_ref().metadata())
            .map(|m| m.len())
            .map_err(|e| Error::Write {
                path: self.path.clone(),
                detail: e.to_string(),
            })?;
        Ok(size)
    }
}
