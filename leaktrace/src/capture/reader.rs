//! Reads a capture back into the heap model, and rebuilds reports from it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;

use flate2::read::MultiGzDecoder;

use leaktrace_ebpf::{AllocFn, Counter, SiteStats};

use super::{Header, Record, FORMAT, VERSION};
use crate::error::{Error, Result};
use crate::heap::trend::Trend;
use crate::heap::{Heap, Sample, Site};
use crate::report::{Report, ReportMeta, ReportOptions, TargetInfo};
use crate::stacks::python::PyFrame;
use crate::stacks::symbolize::{Frame, FrameSource};

/// The frames a capture named while the process lived.
#[derive(Default)]
pub struct CapturedFrames(HashMap<(u32, u64), Frame>);

impl FrameSource for CapturedFrames {
    fn return_address(&mut self, pid: u32, addr: u64) -> Frame {
        self.0.get(&(pid, addr)).cloned().unwrap_or(Frame {
            address: addr,
            ..Frame::default()
        })
    }

    fn resolve(&mut self, pid: u32, frame: &mut Frame) {
        if let Some(f) = self.0.get(&(pid, frame.address)) {
            let eval = frame.eval;
            *frame = f.clone();
            frame.eval = eval;
        }
    }
}

/// The call trees sites refer to.
#[derive(Default)]
struct Trees {
    /// Frame id → (address, eval loop).
    frames: HashMap<u32, (u64, bool)>,
    /// Native node → (parent, frame id).
    nodes: HashMap<u32, (u32, u32)>,
    py: HashMap<u32, PyFrame>,
    /// Python node → (parent, frame id, entry).
    py_nodes: HashMap<u32, (u32, u32, bool)>,
}

/// Deepest stack followed up a tree (a corrupt file cannot loop forever).
const MAX_DEPTH: usize = 4096;

impl Trees {
    /// The native stack ending at `leaf`, innermost first, with the eval-loop flags.
    fn native(&self, leaf: u32) -> (Vec<u64>, Vec<bool>) {
        let (mut pcs, mut eval) = (Vec::new(), Vec::new());
        let mut n = leaf;
        while let Some((parent, frame)) = self.nodes.get(&n) {
            let (pc, ev) = self.frames.get(frame).copied().unwrap_or((0, false));
            pcs.push(pc);
            eval.push(ev);
            if pcs.len() >= MAX_DEPTH {
                break;
            }
            n = *parent;
        }
        (pcs, eval)
    }

    /// The Python stack ending at `leaf`, innermost first, with the entry flags.
    fn python(&self, leaf: u32) -> (Vec<PyFrame>, Vec<bool>) {
        let (mut frames, mut entry) = (Vec::new(), Vec::new());
        let mut n = leaf;
        while let Some((parent, py, e)) = self.py_nodes.get(&n) {
            frames.push(self.py.get(py).cloned().unwrap_or_else(PyFrame::unknown));
            entry.push(*e);
            if frames.len() >= MAX_DEPTH {
                break;
            }
            n = *parent;
        }
        (frames, entry)
    }
}

/// A capture, read.
pub struct Capture {
    pub header: Header,
    pub heap: Heap,
    pub frames: CapturedFrames,
    /// How tracing ended (`None`: the capture stops abruptly; leaktrace did not finish it).
    pub end: Option<ReportMeta>,
    /// Live blocks at the end: `[pid, address, size, site id, allocated at (ns)]`.
    pub live: Vec<[u64; 5]>,
    /// A last line cut short (the writer was killed mid-line); it was skipped.
    pub torn_tail: bool,
    /// Per interval of the series, the sites whose live bytes changed: (site id, live bytes).
    changes: Vec<Vec<(u64, u64)>>,
    /// Read only up to this many seconds into the trace.
    until: Option<f64>,
}

/// The lines of a capture file, gzipped (as written) or plain (zcat'd, edited).
fn open_lines(path: &Path) -> Result<std::io::Lines<BufReader<Box<dyn std::io::Read>>>> {
    let file = std::fs::File::open(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut file = BufReader::new(file);
    let gzipped = file.fill_buf().is_ok_and(|b| b.starts_with(&[0x1f, 0x8b]));
    let text: Box<dyn std::io::Read> = if gzipped {
        Box::new(MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok(BufReader::with_capacity(1 << 20, text).lines())
}

impl Capture {
    /// Reads `path`; with `until`, only the intervals up to that many seconds into the trace
    /// (the heap as it was then).
    pub fn read(path: &Path, until: Option<f64>) -> Result<Capture> {
        let bad = |detail: String| Error::BadInput {
            path: path.to_path_buf(),
            detail,
        };
        let read_err = |source| Error::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut lines = open_lines(path)?.peekable();
        let header = match lines.next() {
            Some(Ok(first)) => match serde_json::from_str::<Record>(&first) {
                Ok(Record::Header(h)) if h.format == FORMAT => h,
                _ => return Err(bad("not a leaktrace capture (no capture header)".into())),
            },
            Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(bad("not a leaktrace capture (not text)".into()))
            }
            Some(Err(source)) => return Err(read_err(source)),
            None => return Err(bad("empty file, not a leaktrace capture".into())),
        };
        if header.version > VERSION {
            return Err(bad(format!(
                "capture format version {} is newer than this leaktrace reads ({VERSION})",
                header.version
            )));
        }
        let mut c = Capture {
            header,
            heap: Heap::default(),
            frames: CapturedFrames::default(),
            end: None,
            live: Vec::new(),
            torn_tail: false,
            changes: Vec::new(),
            until,
        };
        let mut tree = Trees::default();
        let mut n = 1;
        while let Some(line) = lines.next() {
            n += 1;
            let line = match line {
                Ok(l) => l,
                // A file cut after its last flush (the writer was killed): what came before
                // stands.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    c.torn_tail = true;
                    break;
                }
                Err(source) => return Err(read_err(source)),
            };
            let rec = match serde_json::from_str::<Record>(&line) {
                Ok(r) => r,
                // Only the last line may be torn: the writer died while writing it.
                Err(_) if lines.peek().is_none() => {
                    c.torn_tail = true;
                    break;
                }
                Err(e) => return Err(bad(format!("line {n}: {e}"))),
            };
            if let Record::Header(_) = rec {
                return Err(bad(format!("line {n}: a second header")));
            }
            c.apply(rec, &mut tree);
        }
        Ok(c)
    }

    /// Takes one record after the header into the model.
    fn apply(&mut self, rec: Record, tree: &mut Trees) {
        match rec {
            Record::Header(_) => {}
            Record::Frame { id, pid, eval, f } => {
                tree.frames.insert(id, (f.address, eval));
                self.frames.0.insert((pid, f.address), f);
            }
            Record::Node { id, parent, frame } => {
                tree.nodes.insert(id, (parent, frame));
            }
            Record::Py { id, f } => {
                tree.py.insert(id, f);
            }
            Record::PyNode {
                id,
                parent,
                py,
                entry,
            } => {
                tree.py_nodes.insert(id, (parent, py, entry));
            }
            Record::Site(s) => {
                let (native, native_eval) = tree.native(s.native);
                let (python, python_entry) = tree.python(s.python);
                self.heap.restore(Site {
                    id: s.id,
                    pid: s.pid,
                    func: AllocFn::from_u8(s.func).unwrap_or(AllocFn::Malloc),
                    caller: native.first().copied().unwrap_or(0),
                    native,
                    native_eval,
                    unplaced: false,
                    native_end: s.end,
                    python,
                    python_entry,
                    python_status: s.status,
                    python_truncated: s.truncated,
                    stats: SiteStats::default(),
                    trend: Trend::default(),
                });
            }
            Record::Tick(t) => {
                if self.until.is_some_and(|u| t.t > u) {
                    return;
                }
                self.changes
                    .push(t.sites.iter().map(|s| (s[0], s[1])).collect());
                self.set_counts(&t.sites);
                self.heap.push_sample(Sample {
                    t: t.t,
                    live_bytes: t.live_bytes,
                    live_count: t.live_count,
                    allocs: t.allocs,
                    frees: t.frees,
                    drops: t.drops,
                    rss_bytes: t.rss,
                    arena_bytes: t.arenas,
                });
            }
            // The counters at the end, not as of `until`.
            Record::Counts { sites } if self.until.is_none() => self.set_counts(&sites),
            Record::Counts { .. } => {}
            Record::Live { blocks } => self.live.extend(blocks),
            Record::End(meta) => self.end = Some(*meta),
        }
    }

    fn set_counts(&mut self, sites: &[super::SiteCounts]) {
        for s in sites {
            let prev = self.heap.stats(s[0]);
            self.heap.set_stats(
                s[0],
                SiteStats {
                    live_bytes: s[1],
                    live_count: s[2],
                    allocs: s[3],
                    alloc_bytes: s[4],
                    frees: s[5],
                    frees_old: s[6],
                    ..prev
                },
            );
        }
    }

    /// The summed live bytes of sites `ids` at each point of the series.
    pub fn series_of(&self, ids: &[u64]) -> Vec<u64> {
        let mut now: HashMap<u64, u64> = ids.iter().map(|id| (*id, 0)).collect();
        self.changes
            .iter()
            .map(|changed| {
                for (id, live) in changed {
                    if let Some(v) = now.get_mut(id) {
                        // A transient negative read (a free counted before its allocation).
                        *v = if *live < (1 << 62) { *live } else { 0 };
                    }
                }
                now.values().sum()
            })
            .collect()
    }

    /// Seconds of trace the capture covers.
    pub fn duration_s(&self) -> f64 {
        match &self.end {
            Some(m) => m.duration_s,
            None => self.heap.series().last().map_or(0.0, |s| s.t),
        }
    }

    /// How tracing ended, or what is known when the capture stops abruptly.
    pub fn meta(&self) -> ReportMeta {
        if let Some(m) = &self.end {
            return m.clone();
        }
        let h = &self.header;
        let t = self.duration_s();
        let end = format!(
            "state unknown: the capture stops at {t:.1} s, where leaktrace ended before \
             finishing it (killed or crashed); figures are as of its last interval"
        );
        let mut notes = vec![end.clone()];
        // The last interval's totals; the drop counters by kind are written only at the end.
        let mut counters = std::collections::BTreeMap::new();
        if let Some(last) = self.heap.series().last() {
            counters.insert(Counter::Allocs.name().to_string(), last.allocs);
            counters.insert(Counter::Frees.name().to_string(), last.frees);
            if last.drops > 0 {
                notes.push(format!(
                    "{} allocations or records were dropped by then (their kinds are written \
                     only when a capture ends)",
                    last.drops
                ));
            }
        }
        ReportMeta {
            target: TargetInfo {
                pid: h.pid,
                command: h.command.clone(),
                python: h.interpreter.as_deref().map(python_version_of),
                python_module: h.interpreter.clone(),
                end,
                ..TargetInfo::default()
            },
            mode: h.mode,
            sample_rate: h.sample_rate,
            duration_s: t,
            interpreter: h.interpreter.clone(),
            counters,
            notes,
            ..ReportMeta::default()
        }
    }

    /// The report the trace would have printed, with these options.
    pub fn report(&mut self, opts: ReportOptions) -> Report {
        let mut meta = self.meta();
        if let Some(u) = self.until {
            let t = self.heap.series().last().map_or(0.0, |p| p.t);
            meta.duration_s = t;
            meta.notes.push(format!(
                "as of {t:.1} s into the trace (--until {u}); per-site allocation and free \
                 counts are as last recorded by then"
            ));
        }
        if self.torn_tail {
            meta.notes
                .push("the capture's last line was cut short and was skipped".into());
        }
        Report::build(&self.heap, &mut self.frames, meta, opts)
    }
}

/// The Python version in an interpreter's file name (`libpython3.11.so.1.0` → `3.11`), or `?`.
fn python_version_of(module: &str) -> String {
    let name = module.rsplit('/').next().unwrap_or(module);
    name.find("python3.")
        .map(|i| {
            let v = &name[i + "python".len()..];
            let end = v[2..]
                .find(|c: char| !c.is_ascii_digit())
                .map_or(v.len(), |e| e + 2);
            v[..end].to_string()
        })
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn python_version_from_the_interpreter_file() {
        use super::python_version_of as v;
        assert_eq!(
            v("/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0"),
            "3.11"
        );
        assert_eq!(v("/usr/bin/python3.13"), "3.13");
        assert_eq!(v("/usr/bin/python3.14t"), "3.14");
        assert_eq!(v("/opt/app/bin/app"), "?");
    }
}
