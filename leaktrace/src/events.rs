//! Reading the kernel's ring buffer of new-site records.

use aya::maps::{MapData, RingBuf};
use leaktrace_ebpf::{
    ForkEvent, FrameRegs, LifecycleEvent, NewSiteEvent, StackEvent, EVENT_EXEC, EVENT_FINALIZE,
    EVENT_FORK, EVENT_MAIN, EVENT_NEW_SITE, EVENT_STACK, STACK_EVENT_HEADER,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::error::{Error, Result};

/// A record from the kernel; a stack copy is read in place from the ring buffer.
#[derive(Clone, Debug)]
pub enum Event<'a> {
    NewSite(Box<NewSiteEvent>),
    Stack(StackCopy<'a>),
    /// The interpreter finished starting up and is about to run the main module.
    MainStart(LifecycleEvent),
    /// The interpreter began shutting down.
    Finalize(LifecycleEvent),
    /// A followed process forked a child, stopped until its probes are attached.
    Fork(ForkEvent),
    /// A followed child exec'd (`child`).
    Exec(ForkEvent),
}

/// A new site's stack copy: the caller's registers and the stack bytes above its `sp`.
#[derive(Clone, Debug)]
pub struct StackCopy<'a> {
    pub tgid: u32,
    pub site_id: u64,
    pub regs: FrameRegs,
    /// Bytes asked for (`--stack-copy`); `data` is shorter when the stack ended sooner.
    pub wanted: u32,
    pub data: &'a [u8],
}

/// Async reader of `EVENTS`.
pub struct EventReader {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl EventReader {
    /// Wraps the ring buffer for readiness notifications.
    pub fn new(rb: RingBuf<MapData>) -> Result<Self> {
        // SAFETY: the ring buffer owns its fd for as long as the AsyncFd holds it.
        let fd =
            unsafe { AsyncFd::register_with_interest(rb, Interest::READABLE) }.map_err(|e| {
                Error::Bpf(format!(
                    "polling the ring buffer: {}",
                    std::io::Error::from(e)
                ))
            })?;
        Ok(Self { fd })
    }

    /// Waits until a record is available and returns it (owned); `drain` takes the rest.
    pub async fn next_record(&mut self) -> Vec<u8> {
        loop {
            let Ok(mut guard) = self.fd.readable_mut().await else {
                // The ring buffer's fd failed: nothing more will come.
                return std::future::pending().await;
            };
            if let Some(item) = guard.get_inner_mut().next() {
                // Readiness stays set: the next call reads again. The kernel wakes a reader
                // only when a record lands in an *empty* buffer, so clearing readiness after a
                // read that raced with a new record would leave the buffer unread for good.
                return item.to_vec();
            }
            guard.clear_ready();
        }
    }

    /// Hands every record available now to `f`, read in place; returns how many.
    pub fn drain(&mut self, mut f: impl FnMut(Event<'_>)) -> usize {
        let rb = self.fd.get_mut();
        let mut n = 0;
        while let Some(item) = rb.next() {
            n += 1;
            if let Some(ev) = parse(&item) {
                f(ev);
            }
        }
        n
    }
}

/// Decodes one record; records of unknown kinds or short ones are ignored.
pub fn parse(bytes: &[u8]) -> Option<Event<'_>> {
    let kind = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    match kind {
        EVENT_NEW_SITE => read_new_site(bytes).map(|e| Event::NewSite(Box::new(e))),
        EVENT_FINALIZE => read_pod::<LifecycleEvent>(bytes).map(Event::Finalize),
        EVENT_MAIN => read_pod::<LifecycleEvent>(bytes).map(Event::MainStart),
        EVENT_STACK => read_stack(bytes).map(Event::Stack),
        EVENT_FORK => read_pod::<ForkEvent>(bytes).map(Event::Fork),
        EVENT_EXEC => read_pod::<ForkEvent>(bytes).map(Event::Exec),
        _ => None,
    }
}

/// A new-site record carries only the Python frames walked: the rest of the struct is zero.
fn read_new_site(bytes: &[u8]) -> Option<NewSiteEvent> {
    let header = std::mem::offset_of!(NewSiteEvent, py_frames);
    if bytes.len() < header {
        return None;
    }
    let mut ev = NewSiteEvent::default();
    let n = bytes.len().min(std::mem::size_of::<NewSiteEvent>());
    // SAFETY: NewSiteEvent is plain old data and `n` bytes fit in it.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            (&mut ev as *mut NewSiteEvent).cast::<u8>(),
            n,
        )
    };
    let frames = (n - header) / std::mem::size_of::<leaktrace_ebpf::PyFrameRec>();
    ev.py_depth = ev.py_depth.min(frames as u32);
    Some(ev)
}

/// A stack record carries only the bytes copied.
fn read_stack(bytes: &[u8]) -> Option<StackCopy<'_>> {
    let head = bytes.get(..STACK_EVENT_HEADER)?;
    let u32_at = |o: usize| u32::from_ne_bytes(head[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_ne_bytes(head[o..o + 8].try_into().unwrap());
    use std::mem::offset_of;
    let len = u32_at(offset_of!(StackEvent, len)) as usize;
    let data = bytes.get(STACK_EVENT_HEADER..)?;
    Some(StackCopy {
        tgid: u32_at(offset_of!(StackEvent, tgid)),
        site_id: u64_at(offset_of!(StackEvent, site_id)),
        regs: FrameRegs {
            pc: u64_at(offset_of!(StackEvent, pc)),
            sp: u64_at(offset_of!(StackEvent, sp)),
            bp: u64_at(offset_of!(StackEvent, bp)),
        },
        wanted: u32_at(offset_of!(StackEvent, wanted)),
        data: &data[..len.min(data.len())],
    })
}

fn read_pod<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; T is plain old data.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_whole_new_site_records() {
        let ev = NewSiteEvent {
            kind: EVENT_NEW_SITE,
            tgid: 9,
            site_id: 77,
            ..Default::default()
        };
        // SAFETY: viewing a POD value as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&ev as *const NewSiteEvent).cast::<u8>(),
                std::mem::size_of::<NewSiteEvent>(),
            )
        };
        let Some(Event::NewSite(back)) = parse(bytes) else {
            panic!("not parsed")
        };
        assert_eq!((back.tgid, back.site_id), (9, 77));
        assert!(parse(&bytes[..8]).is_none());
        let mut other = bytes.to_vec();
        other[0] = 99;
        assert!(parse(&other).is_none());
    }

    #[test]
    fn parses_stack_copies_of_any_length() {
        let mut rec = vec![0u8; STACK_EVENT_HEADER + 24];
        rec[..4].copy_from_slice(&EVENT_STACK.to_ne_bytes());
        let len_at = std::mem::offset_of!(StackEvent, len);
        rec[len_at..len_at + 4].copy_from_slice(&24u32.to_ne_bytes());
        let sp_at = std::mem::offset_of!(StackEvent, sp);
        rec[sp_at..sp_at + 8].copy_from_slice(&0x7fff_0000u64.to_ne_bytes());
        rec[STACK_EVENT_HEADER] = 0xab;
        let Some(Event::Stack(s)) = parse(&rec) else {
            panic!("not parsed")
        };
        assert_eq!(
            (s.regs.sp, s.data.len(), s.data[0]),
            (0x7fff_0000, 24, 0xab)
        );
        assert!(parse(&rec[..STACK_EVENT_HEADER - 1]).is_none());
    }
}
