//! A buffer for the next large byte-vector argument, made ready while the worker waits.
//!
//! A large byte vector is read into a vector the worker allocates, and writing into fresh
//! memory costs more than the copy itself: each page is faulted in and zeroed first (for 64
//! MiB, about three times a copy into memory already faulted in). So a worker that was just
//! given a byte vector of at least [`MIN`] bytes allocates one of the same size for the next
//! call and faults its pages in while it waits for that call, a chunk at a time, stopping as
//! soon as a call comes. The next call's vector of that size, or up to half that size, is
//! this one.
//!
//! The cost is memory: between calls the worker keeps one vector of the size of the last
//! large argument. It keeps none after a call that took no large argument, and none larger
//! than an eighth of its `memory` limit, if it has one.

use std::cell::RefCell;

use crate::protocol::reader::fresh_bytes;

/// Byte vectors shorter than this are not worth a spare: their pages fault in quickly.
pub(super) const MIN: usize = 1 << 20;

/// How much of the spare is faulted in between two checks for a call: one huge page, well
/// under a millisecond.
const CHUNK: usize = 2 << 20;

#[derive(Default)]
struct Spare {
    /// The spare, zeroed (by the allocator, which takes fresh pages from the kernel), with
    /// its first `ready` bytes faulted in.
    bytes: Option<Vec<u8>>,
    ready: usize,
    /// The size of the spare to make: that of the last large argument, or 0.
    wanted: usize,
    /// This call took a large argument.
    used: bool,
}

thread_local! {
    static SPARE: RefCell<Spare> = RefCell::default();
}

/// The largest spare a worker keeps: an eighth of its address-space limit, if it has one.
fn largest() -> usize {
    use std::sync::OnceLock;
    static LARGEST: OnceLock<usize> = OnceLock::new();
    *LARGEST.get_or_init(|| {
        #[cfg(target_os = "linux")]
        if let Some(limit) = rustix::process::getrlimit(rustix::process::Resource::As).current {
            return usize::try_from(limit / 8).unwrap_or(usize::MAX);
        }
        usize::MAX
    })
}

/// A zeroed vector of `len` bytes for a byte-vector argument: the spare if it fits, else a
/// fresh one. A large one asks for a spare of its size for the next call.
pub(super) fn vector(len: usize) -> Vec<u8> {
    if len < MIN {
        return fresh_bytes(len);
    }
    SPARE.with_borrow_mut(|spare| {
        spare.used = true;
        spare.wanted = if len <= largest() { len } else { 0 };
        match spare.bytes.take() {
            Some(mut bytes) if bytes.len() >= len && bytes.len() / 2 <= len => {
                spare.ready = 0;
                bytes.truncate(len);
                bytes
            }
            other => {
                // The wrong size: let it go, and make one of the size now wanted.
                drop(other);
                spare.ready = 0;
                fresh_bytes(len)
            }
        }
    })
}

/// A call is over: a spare is kept for the next only if this one took a large argument.
pub(super) fn call_done() {
    SPARE.with_borrow_mut(|spare| {
        if !std::mem::take(&mut spare.used) {
            spare.wanted = 0;
            spare.bytes = None;
            spare.ready = 0;
        }
    });
}

/// Whether a spare is wanted and not yet ready: a check without a system call, made before
/// every wait for a call.
pub(super) fn unready() -> bool {
    SPARE.with_borrow(|spare| spare.wanted > 0 && spare.bytes.as_ref().is_none_or(|b| spare.ready < b.len()))
}

/// Makes one more chunk of the spare ready, if it is [`unready`].
pub(super) fn prepare() {
    SPARE.with_borrow_mut(|spare| {
        if spare.wanted == 0 {
            return;
        }
        let wanted = spare.wanted;
        let bytes = spare.bytes.get_or_insert_with(|| fresh_bytes(wanted));
        let end = bytes.len().min(spare.ready + CHUNK);
        populate(&mut bytes[spare.ready..end]);
        spare.ready = end;
    })
}

/// Faults `bytes` in, keeping their contents (zero).
fn populate(bytes: &mut [u8]) {
    #[cfg(target_os = "linux")]
    {
        let page = rustix::param::page_size();
        let start = (bytes.as_ptr() as usize).next_multiple_of(page);
        let end = (bytes.as_ptr() as usize + bytes.len()).next_multiple_of(page);
        // SAFETY: the range is within the pages `bytes` lies in, which are mapped, writable
        // memory of this process (the last may hold other data too), and populating pages
        // for writing does not change what any of them hold.
        let populated = unsafe {
            rustix::mm::madvise(
                start as *mut std::ffi::c_void,
                end - start,
                rustix::mm::Advice::LinuxPopulateWrite,
            )
        };
        if populated.is_ok() {
            return;
        }
    }
    // Before Linux 5.14: a write to each page faults it in.
    let page = 4096;
    for i in (0..bytes.len()).step_by(page) {
        // SAFETY: `i` is within `bytes`; a volatile write, so that it is not left out.
        unsafe { std::ptr::write_volatile(bytes.as_mut_ptr().add(i), 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> usize {
        while unready() {
            prepare();
        }
        SPARE.with_borrow(|spare| spare.bytes.as_ref().map_or(0, Vec::len))
    }

    #[test]
    fn a_spare_is_made_after_a_large_argument_and_used_by_the_next() {
        // Small vectors make no spare.
        assert_eq!(vector(1000).len(), 1000);
        call_done();
        assert_eq!(ready(), 0);

        let first = vector(4 * MIN);
        assert!(first.len() == 4 * MIN && first.iter().all(|&b| b == 0));
        call_done();
        assert_eq!(ready(), 4 * MIN);
        let address = SPARE.with_borrow(|spare| spare.bytes.as_ref().unwrap().as_ptr());

        // A little shorter: the spare, cut to size.
        let second = vector(3 * MIN);
        assert_eq!(second.as_ptr(), address);
        assert!(second.len() == 3 * MIN && second.iter().all(|&b| b == 0));
        call_done();
        assert_eq!(ready(), 3 * MIN, "the next spare has the size last asked for");

        // Less than half: a fresh one, and the spare goes.
        let third = vector(MIN);
        assert!(third.len() == MIN && third.capacity() == MIN);
        call_done();
        assert_eq!(ready(), MIN);

        // A call with no large argument: no spare kept.
        call_done();
        assert_eq!(ready(), 0);
    }
}
