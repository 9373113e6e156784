//! Reading frames out of a byte stream, for both ends of a channel: what came in is appended
//! to the reader's buffer (by whoever reads the socket, blocking or not), and the reader
//! hands out whole frames, or the header of a bulk frame whose body the caller reads into a
//! vector of its own. No I/O here.

use std::ops::Range;
use std::os::fd::OwnedFd;

use crate::error::ProtocolError;

use super::{HEADER, Tag, parse_header};

/// Read buffers above this size are released once the frame in them is handled rather than
/// kept for the next one.
pub(crate) const KEEP_BUFFER: usize = 1 << 20;

/// The least room a read gets: a frame of up to this size takes one system call.
const MIN_READ: usize = 64 << 10;

/// What comes next in a [`FrameReader`].
pub(crate) enum Next {
    /// A whole frame: its tag, and where its body is (see [`FrameReader::frame`]).
    Frame(Tag, Range<usize>),
    /// The header of a bulk frame of this many bytes; [`FrameReader::take_bulk`] takes what
    /// the buffer holds of them.
    Bulk(usize),
}

/// Bytes read from a channel, and the descriptors that came with them.
///
/// Descriptors belong to frames: a sender attaches them to the first byte of the frames it
/// writes in one go, and a receive that brings descriptors ends right after the bytes they
/// came with (Linux never reads past them in the same call). So the descriptors of one
/// receive belong to the last frame that begins in its bytes; the reader notes that frame's
/// place in the stream, and hands the descriptors out with it, not with a frame before it
/// (a reply read in the same receive as the start of the next call's, when calls are sent
/// ahead).
#[derive(Default)]
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    /// Descriptors received and not yet taken, oldest first.
    fds: Vec<OwnedFd>,
    /// For the descriptors in `fds`, in order: where in the stream the frame they belong to
    /// begins, and how many are its.
    owners: Vec<(u64, usize)>,
    /// Where in the stream `buf[0]` is.
    base: u64,
    /// Valid bytes in `buf`.
    filled: usize,
    /// Length of the frame last handed out, dropped from the front on the next call.
    consumed: usize,
}

impl FrameReader {
    /// The next complete frame, or the header of a bulk frame; `None` until more is read.
    /// A frame longer than `max` is an error.
    pub(crate) fn next(&mut self, max: usize) -> Result<Option<Next>, ProtocolError> {
        if self.consumed > 0 {
            self.buf.copy_within(self.consumed..self.filled, 0);
            self.filled -= self.consumed;
            self.base += self.consumed as u64;
            self.consumed = 0;
        }
        if self.filled < HEADER {
            return Ok(None);
        }
        let header: [u8; HEADER] = self.buf[..HEADER].try_into().expect("header length");
        let (len, tag) = parse_header(header, max)?;
        if tag == Tag::Bulk {
            return Ok(Some(Next::Bulk(len)));
        }
        let total = HEADER + len;
        if self.filled < total {
            if self.buf.len() < total {
                grow(&mut self.buf, self.filled, total);
            }
            return Ok(None);
        }
        self.consumed = total;
        Ok(Some(Next::Frame(tag, HEADER..total)))
    }

    /// The body of the frame [`FrameReader::next`] handed out at `range`.
    pub(crate) fn frame(&self, range: Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    /// Takes the bulk frame whose header [`FrameReader::next`] found: copies what the buffer
    /// holds of its body into the start of `bytes`, and returns how much that was.
    pub(crate) fn take_bulk(&mut self, bytes: &mut [u8]) -> usize {
        let have = (self.filled - HEADER).min(bytes.len());
        bytes[..have].copy_from_slice(&self.buf[HEADER..HEADER + have]);
        self.consumed = HEADER + have;
        have
    }

    /// Where the next read goes, and where the descriptors that come with it go; then
    /// [`FrameReader::advance`] by what was read.
    pub(crate) fn space(&mut self) -> (&mut [u8], &mut Vec<OwnedFd>) {
        let want = self.filled + MIN_READ.min(KEEP_BUFFER);
        if self.buf.len() < want {
            grow(&mut self.buf, self.filled, want);
        }
        (&mut self.buf[self.filled..], &mut self.fds)
    }

    /// Counts `n` more bytes read into [`FrameReader::space`], with the descriptors that
    /// came with them.
    pub(crate) fn advance(&mut self, n: usize) {
        let before = self.filled;
        self.filled += n;
        let start = self.last_frame_start(before).unwrap_or(before);
        self.own_new_fds(self.base + start as u64);
    }

    /// Where the last frame that begins at or after `from` begins in `buf`, walking the
    /// frames from the next one to hand out.
    fn last_frame_start(&self, from: usize) -> Option<usize> {
        let (mut at, mut last) = (self.consumed, None);
        while at < self.filled {
            if at >= from {
                last = Some(at);
            }
            let Some(header) = self.buf.get(at..at + HEADER) else { break };
            // The length counts the tag and the body, not itself.
            let len = u32::from_le_bytes(header[..4].try_into().expect("four bytes")) as usize;
            at = at.saturating_add(4).saturating_add(len);
        }
        last
    }

    /// Notes that the descriptors received last, and not yet noted, belong to the frame
    /// that begins at `owner` in the stream.
    fn own_new_fds(&mut self, owner: u64) {
        let noted: usize = self.owners.iter().map(|&(_, n)| n).sum();
        if self.fds.len() > noted {
            self.owners.push((owner, self.fds.len() - noted));
        }
    }

    /// Where descriptors that come with a bulk frame's body go; they belong to the bulk
    /// frame being read.
    pub(crate) fn fds_mut(&mut self) -> &mut Vec<OwnedFd> {
        &mut self.fds
    }

    /// The descriptors of the frame last handed out (and of any frame before it that left
    /// its own), not those of frames after it.
    pub(crate) fn take_fds(&mut self) -> Vec<OwnedFd> {
        self.own_new_fds(self.base);
        let mine = self.owners.iter().take_while(|&&(owner, _)| owner <= self.base).count();
        let count: usize = self.owners.drain(..mine).map(|(_, n)| n).sum();
        self.fds.drain(..count).collect()
    }

    /// Refuses more descriptors than one frame may carry, so that a peer cannot make this
    /// side hold an unbounded number of them.
    pub(crate) fn check_fds(&mut self) -> Result<(), ProtocolError> {
        // Those that came with a bulk frame's body belong to that frame, at the front.
        self.own_new_fds(self.base);
        if self.fds.len() > super::fds::MAX {
            return Err(ProtocolError::Invalid(format!(
                "the worker sent {} descriptors with one reply, over the {} one reply may carry",
                self.fds.len(),
                super::fds::MAX
            )));
        }
        Ok(())
    }

    /// Whether bytes beyond the last frame handed out are waiting.
    pub(crate) fn pending(&self) -> bool {
        self.filled > self.consumed
    }

    /// Lets go of a large buffer once the frame in it is handled and nothing follows it.
    pub(crate) fn shrink(&mut self) {
        if self.buf.len() > KEEP_BUFFER && !self.pending() {
            *self = FrameReader::default();
        }
    }

    /// Takes the buffer that holds the frame last handed out, so that it can be decoded
    /// elsewhere; the reader keeps any bytes that followed it, in a new buffer.
    pub(crate) fn take_buffer(&mut self) -> Vec<u8> {
        let rest = self.buf[self.consumed..self.filled].to_vec();
        let buf = std::mem::take(&mut self.buf);
        self.filled = rest.len();
        self.base += self.consumed as u64;
        self.consumed = 0;
        self.buf = rest;
        buf
    }
}

/// Grows a read buffer holding `filled` bytes to `len`. A large one is a fresh allocation
/// with the bytes copied over: it comes from the system untouched (growing in place would
/// first write zeros over all of it) and goes back to it when dropped, where a buffer grown
/// in place can stay in the allocator's heap for the life of the process.
pub(crate) fn grow(buf: &mut Vec<u8>, filled: usize, len: usize) {
    if len <= KEEP_BUFFER {
        buf.resize(len, 0);
        return;
    }
    let mut fresh = fresh_bytes(len);
    fresh[..filled].copy_from_slice(&buf[..filled]);
    *buf = fresh;
}

/// A zeroed vector of `len` bytes to read into: fresh from the system and untouched (the
/// read touches each page once), backed by transparent huge pages where the system allows,
/// which makes filling a large one several times cheaper (32 page faults for 64 MiB instead
/// of 16,384).
pub(crate) fn fresh_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    advise_huge_pages(&mut bytes);
    bytes
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(bytes: &mut [u8]) {
    const HUGE: usize = 2 << 20;
    if bytes.len() < HUGE {
        return;
    }
    let page = rustix::param::page_size();
    let start = (bytes.as_ptr() as usize).next_multiple_of(page);
    let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
    // SAFETY: the range lies within `bytes`, which this function borrows mutably, and the
    // advice does not change its contents. A hint: nothing changes if it is not taken.
    let _ = unsafe {
        rustix::mm::madvise(start as *mut std::ffi::c_void, end - start, rustix::mm::Advice::LinuxHugepage)
    };
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_: &mut [u8]) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(reader: &mut FrameReader, bytes: &[u8]) {
        let (space, _) = reader.space();
        space[..bytes.len()].copy_from_slice(bytes);
        reader.advance(bytes.len());
    }

    #[test]
    fn frames_come_whole_and_bulk_bodies_are_taken() {
        let mut reader = FrameReader::default();
        assert!(reader.next(100).unwrap().is_none());
        // Half a return frame, then the rest and a bulk frame after it.
        feed(&mut reader, &[4, 0, 0, 0, Tag::Return as u8, 1]);
        assert!(reader.next(100).unwrap().is_none());
        feed(&mut reader, &[2, 3, 4, 0, 0, 0, Tag::Bulk as u8, 9, 8]);
        let Some(Next::Frame(Tag::Return, range)) = reader.next(100).unwrap() else { panic!("a frame") };
        assert_eq!(reader.frame(range), &[1, 2, 3]);
        let Some(Next::Bulk(3)) = reader.next(100).unwrap() else { panic!("a bulk header") };
        let mut body = [0; 3];
        assert_eq!(reader.take_bulk(&mut body), 2);
        assert_eq!(&body[..2], &[9, 8]);
        assert!(!reader.pending());
        assert!(matches!(reader.next(2), Ok(None)));
        feed(&mut reader, &[9, 0, 0, 0, Tag::Return as u8]);
        assert!(matches!(reader.next(2), Err(ProtocolError::FrameTooLarge { len: 9, max: 2 })));
    }

    /// A receive that ends a reply and brings the whole next one, with the next one's
    /// descriptors: they go with the next reply, not with the first.
    #[test]
    fn descriptors_go_with_the_frame_they_came_with() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut reader = FrameReader::default();
        feed(&mut reader, &[3, 0, 0, 0, Tag::Return as u8, 1]);
        assert!(reader.next(100).unwrap().is_none());
        // The rest of the first, and all of the second, with two descriptors.
        let (space, fds) = reader.space();
        let bytes = [2, 2, 0, 0, 0, Tag::Return as u8, 7];
        space[..bytes.len()].copy_from_slice(&bytes);
        fds.extend((0..2).map(|_| OwnedFd::from(null.try_clone().unwrap())));
        reader.advance(bytes.len());
        let Some(Next::Frame(Tag::Return, range)) = reader.next(100).unwrap() else { panic!("a frame") };
        assert_eq!(reader.frame(range), &[1, 2]);
        assert!(reader.take_fds().is_empty(), "the first reply came without descriptors");
        let Some(Next::Frame(Tag::Return, range)) = reader.next(100).unwrap() else { panic!("a frame") };
        assert_eq!(reader.frame(range), &[7]);
        assert_eq!(reader.take_fds().len(), 2);
        // Descriptors with the first bytes of a frame are its own.
        let (space, fds) = reader.space();
        let bytes = [2, 0, 0, 0, Tag::Return as u8, 9];
        space[..bytes.len()].copy_from_slice(&bytes);
        fds.push(OwnedFd::from(null.try_clone().unwrap()));
        reader.advance(bytes.len());
        let Some(Next::Frame(Tag::Return, _)) = reader.next(100).unwrap() else { panic!("a frame") };
        assert_eq!(reader.take_fds().len(), 1);
    }

    #[test]
    fn more_descriptors_than_one_reply_may_carry_are_refused() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut reader = FrameReader::default();
        reader
            .fds_mut()
            .extend((0..super::super::fds::MAX).map(|_| OwnedFd::from(null.try_clone().unwrap())));
        assert!(reader.check_fds().is_ok());
        reader.fds_mut().push(OwnedFd::from(null.try_clone().unwrap()));
        let error = reader.check_fds().unwrap_err();
        assert!(error.to_string().contains("254 descriptors"), "{error}");
    }
}
