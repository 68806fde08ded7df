//! Sites whose id the kernel cut at an untaught return address (`NewSiteEvent::id_cut`): until
//! the rows past it are learned, every call path through the frames walked gets that id, and
//! a stack copy shows only the path of the allocation it was taken at.
//!
//! The kernel sends copies of a cut site's 1st, 2nd, 4th, 8th, ... allocation. The first
//! copy's stack is shown; if a later one took another path, the site goes back to the frames
//! the kernel walked, marked `unlearned`, so that no path is charged with another's blocks
//! (docs/native-stacks.md, "Stable sites"). Paths are compared as the report tells them apart
//! (`path_key`): the interpreter's call plumbing into an extension, which changes as the
//! adaptive interpreter specializes a call, is not a path of its own.

use std::collections::HashMap;

use crate::stacks::native::NativeStack;

/// What a cut site's copies showed so far.
struct CutSite {
    /// Its process.
    pid: u32,
    /// The frames the kernel walked: what the site shows once its copies disagree.
    kernel: NativeStack,
    /// The first copy's `path_key`.
    shown: Option<Vec<u64>>,
    mixed: bool,
}

/// What to do with a cut site's stack copy.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum CopyVerdict {
    /// Not a cut site, or its first copy: show the copy's stack.
    Show,
    /// The same path as the copy shown: nothing changes.
    Agrees,
    /// Another path than the copy shown: the site shows the kernel's frames from now on.
    Mixed(NativeStack),
    /// Known to mix paths already.
    StillMixed,
}

/// The cut sites of a session.
#[derive(Default)]
pub(super) struct CutSites(HashMap<u64, CutSite>);

impl CutSites {
    /// Notes a cut site of process `pid` from its record: `kernel` holds the frames the kernel
    /// walked.
    pub(super) fn note(&mut self, id: u64, pid: u32, kernel: NativeStack) {
        self.0.entry(id).or_insert(CutSite {
            pid,
            kernel,
            shown: None,
            mixed: false,
        });
    }

    /// Judges a stack copy of site `id`; `key` gives its path (`path_key`), asked for only
    /// where there is something to compare.
    pub(super) fn copy(&mut self, id: u64, key: impl FnOnce() -> Vec<u64>) -> CopyVerdict {
        let Some(cut) = self.0.get_mut(&id) else {
            return CopyVerdict::Show;
        };
        if cut.mixed {
            return CopyVerdict::StillMixed;
        }
        let key = key();
        let Some(shown) = &cut.shown else {
            cut.shown = Some(key);
            return CopyVerdict::Show;
        };
        // Two copies of one path agree frame by frame as far as both reach (a copy can end
        // sooner, cut by the stack's mapping or `--stack-copy`).
        if shown.iter().zip(&key).all(|(a, b)| a == b) {
            return CopyVerdict::Agrees;
        }
        cut.mixed = true;
        CopyVerdict::Mixed(cut.kernel.clone())
    }
}

impl CutSites {
    /// The cut sites not yet known to mix paths that `missed` says could not send a copy of a
    /// later allocation (`SITE_COPY_MISSED`): their paths cannot be told to be one. Each is
    /// marked mixed, and given back with its process and the kernel's frames to show instead.
    pub(super) fn take_missed(
        &mut self,
        missed: impl Fn(u64) -> bool,
    ) -> Vec<(u64, u32, NativeStack)> {
        self.0
            .iter_mut()
            .filter(|(id, c)| !c.mixed && missed(**id))
            .map(|(id, c)| {
                c.mixed = true;
                (*id, c.pid, c.kernel.clone())
            })
            .collect()
    }
}

/// The return addresses that tell a stack's path apart, innermost first: those up to the
/// innermost eval loop, less the interpreter's frames (`interp`) past the extension's: the
/// interpreter's call plumbing into an extension, and what lies beyond it, which the site's
/// Python frames (part of its id) stand for. An interpreter's function the extension called
/// (`PyBytes_FromStringAndSize`) stays; an allocation the interpreter itself makes keeps all
/// its frames up to the eval loop, or every frame where no eval loop was recognised.
pub(super) fn path_key(stack: &NativeStack, mut interp: impl FnMut(u64) -> bool) -> Vec<u64> {
    let eval = stack
        .eval
        .iter()
        .position(|e| *e)
        .unwrap_or(stack.pcs.len());
    let inner = &stack.pcs[..eval.min(stack.pcs.len())];
    let end = match inner.iter().position(|pc| !interp(*pc)) {
        Some(ext) => inner[ext..]
            .iter()
            .position(|pc| interp(*pc))
            .map_or(inner.len(), |n| ext + n),
        None => inner.len(),
    };
    inner[..end].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stacks::native::UnwindEnd;

    fn stack(pcs: &[u64], end: UnwindEnd) -> NativeStack {
        NativeStack {
            pcs: pcs.to_vec(),
            eval: vec![false; pcs.len()],
            end,
        }
    }

    /// The first copy is shown; copies of the same path agree, even one cut shorter; the first
    /// copy of another path sends the site back to the kernel's frames, for good.
    #[test]
    fn a_cut_site_shows_its_path_until_a_copy_shows_another() {
        let mut cut = CutSites::default();
        let kernel = stack(&[0x10], UnwindEnd::Unlearned);
        cut.note(7, 42, kernel.clone());
        let a = vec![0x10, 0x20, 0x30, 0x40];
        assert_eq!(cut.copy(7, || a.clone()), CopyVerdict::Show);
        assert_eq!(cut.copy(7, || a.clone()), CopyVerdict::Agrees);
        assert_eq!(cut.copy(7, || vec![0x10, 0x20]), CopyVerdict::Agrees);
        let b = vec![0x10, 0x50, 0x30, 0x40];
        assert_eq!(
            cut.copy(7, || b.clone()),
            CopyVerdict::Mixed(kernel.clone())
        );
        assert_eq!(
            cut.copy(7, || unreachable!("no path to compare")),
            CopyVerdict::StillMixed
        );
        assert!(cut.take_missed(|_| true).is_empty(), "mixed already");
        cut.note(9, 42, kernel.clone());
        cut.note(10, 43, kernel.clone());
        assert_eq!(cut.take_missed(|id| id == 9), vec![(9, 42, kernel.clone())]);
        assert_eq!(cut.copy(9, || vec![0x10]), CopyVerdict::StillMixed);
        assert_eq!(cut.copy(10, || vec![0x10]), CopyVerdict::Show);
        // A site whose id was whole: every copy is shown, and no path is asked for.
        let none = || unreachable!("not a cut site");
        assert_eq!(cut.copy(8, none), CopyVerdict::Show);
        assert_eq!(cut.copy(8, none), CopyVerdict::Show);
    }

    /// Interpreter frames between an extension and the eval loop (vectorcall plumbing, which
    /// specialization changes) and frames past the eval loop are not part of the path; an
    /// interpreter function the extension called is; an allocation the interpreter makes
    /// keeps its frames.
    #[test]
    fn path_keys_leave_out_the_plumbing_into_an_extension() {
        let interp = |pc: u64| pc >= 0x1000;
        let with = |pcs: &[u64], eval_at: usize| NativeStack {
            pcs: pcs.to_vec(),
            eval: (0..pcs.len()).map(|i| i == eval_at).collect(),
            end: UnwindEnd::Complete,
        };
        let generic = with(&[0x10, 0x20, 0x1100, 0x1200, 0x1300, 0x1400], 3);
        let specialized = with(&[0x10, 0x20, 0x1500, 0x1300, 0x1400], 3);
        assert_eq!(path_key(&generic, interp), vec![0x10, 0x20]);
        assert_eq!(path_key(&specialized, interp), vec![0x10, 0x20]);
        let own = with(&[0x1100, 0x1600, 0x1200, 0x1300], 2);
        assert_eq!(path_key(&own, interp), vec![0x1100, 0x1600]);
        let helper = with(&[0x1100, 0x10, 0x20, 0x1200, 0x1300, 0x1400], 4);
        assert_eq!(path_key(&helper, interp), vec![0x1100, 0x10, 0x20]);
        // No eval loop recognised (a build whose eval loop leaktrace does not know).
        let no_eval = with(&[0x10, 0x20, 0x1100, 0x1200], 9);
        assert_eq!(path_key(&no_eval, interp), vec![0x10, 0x20]);
        let interp_only = with(&[0x1100, 0x1700], 9);
        assert_eq!(path_key(&interp_only, interp), vec![0x1100, 0x1700]);
    }
}
