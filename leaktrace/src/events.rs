//! Reading the kernel's ring buffer of new-site records.

use aya::maps::{MapData, RingBuf};
use leaktrace_ebpf::{FinalizeEvent, NewSiteEvent, EVENT_FINALIZE, EVENT_NEW_SITE};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::error::{Error, Result};

/// A record from the kernel.
#[derive(Clone, Debug)]
pub enum Event {
    NewSite(Box<NewSiteEvent>),
    Finalize(FinalizeEvent),
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

    /// Waits until records are available, then returns all of them.
    pub async fn next_batch(&mut self) -> Vec<Event> {
        loop {
            let Ok(mut guard) = self.fd.readable_mut().await else {
                return Vec::new();
            };
            let batch = drain(guard.get_inner_mut());
            if !batch.is_empty() {
                // Readiness stays set: the next call drains again. The kernel wakes a reader
                // only when a record lands in an *empty* buffer, so clearing readiness after a
                // drain that raced with a new record would leave the buffer unread for good.
                return batch;
            }
            guard.clear_ready();
        }
    }

    /// Returns whatever is available now, without waiting.
    pub fn drain_now(&mut self) -> Vec<Event> {
        drain(self.fd.get_mut())
    }
}

fn drain(rb: &mut RingBuf<MapData>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(item) = rb.next() {
        if let Some(ev) = parse(&item) {
            out.push(ev);
        }
    }
    out
}

/// Decodes one record; records of unknown kinds or short ones are ignored.
pub fn parse(bytes: &[u8]) -> Option<Event> {
    let kind = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    match kind {
        EVENT_NEW_SITE => read_new_site(bytes).map(|e| Event::NewSite(Box::new(e))),
        EVENT_FINALIZE => read_pod::<FinalizeEvent>(bytes).map(Event::Finalize),
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
}
