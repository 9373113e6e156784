//! Batches: many calls of one function in one frame and their results in one reply, for
//! `offload::map`. One round trip then serves many small items.
//!
//! A [`Tag::Batch`] frame's body is a call frame's head (`[name_len: u16 LE][name][log_level]`)
//! followed by the items: `[count: u32 LE]`, then `[len: u32 LE][arguments]` for each. The
//! worker answers with a [`Tag::Return`] frame whose body is
//! `[pid: u32 LE][busy_ns: u64 LE][count: u32 LE]`, then `[outcome: u8][len: u32 LE][bytes]`
//! for each item, in order: the encoded return value, a [`PanicReport`] or a [`Fault`].
//! Items travel inline only: no bulk frames, no descriptors.

use super::{Fault, FrameBuf, PanicReport, Tag};
use crate::error::{Payload, ProtocolError};

/// Starts a batch frame for `name`'s calls, forwarding `tracing` events up to `log_level`:
/// records follow it ([`Records`]); [`finish`] fills in their count and the frame's length.
/// Returns the frame so far; its length is where the records start.
pub(crate) fn start(name: &str, log_level: u8) -> Result<Vec<u8>, ProtocolError> {
    let name_len = u16::try_from(name.len())
        .map_err(|_| ProtocolError::Invalid(format!("entry name of {} bytes", name.len())))?;
    let mut frame = FrameBuf::new(Tag::Batch).into_inner();
    frame.extend_from_slice(&name_len.to_le_bytes());
    frame.extend_from_slice(name.as_bytes());
    frame.push(log_level);
    frame.extend_from_slice(&[0; 4]);
    Ok(frame)
}

/// Completes a frame that [`start`] began and `count` records followed, which start at
/// `records`.
pub(crate) fn finish(frame: &mut [u8], records: usize, count: u32) -> Result<(), ProtocolError> {
    frame[records - 4..records].copy_from_slice(&count.to_le_bytes());
    super::fill_length(frame)
}

/// How an item ended, as the first byte of its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Outcome {
    /// The function returned: the bytes are its encoded return value.
    Returned = 0,
    /// The function panicked: a [`PanicReport`].
    Panicked = 1,
    /// The item could not run or its value could not be sent: a [`Fault`].
    Faulted = 2,
}

/// Length-prefixed records appended to a buffer: each is started, written, then closed,
/// which fills in its length.
pub(crate) struct Records;

impl Records {
    /// Starts a record in `out`; returns where it starts, for [`Records::close`] or
    /// [`Records::abandon`].
    pub(crate) fn open(out: &mut Vec<u8>) -> usize {
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        at
    }

    /// Fills in the length of the record that starts at `at`. Records are shorter than a
    /// frame, which [`MAX_FRAME`](super::MAX_FRAME) bounds to `u32`.
    pub(crate) fn close(out: &mut [u8], at: usize) {
        let len = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Drops the record that starts at `at`, and all after it.
    pub(crate) fn abandon(out: &mut Vec<u8>, at: usize) {
        out.truncate(at);
    }
}

/// The head of a batch reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReplyHead {
    /// The worker that ran the batch.
    pub(crate) pid: u32,
    /// How long the worker spent running the items, in nanoseconds.
    pub(crate) busy_ns: u64,
    pub(crate) count: u32,
}

/// Bytes of [`ReplyHead`] on the wire.
pub(crate) const REPLY_HEAD: usize = 16;

impl ReplyHead {
    /// Writes the head into the first [`REPLY_HEAD`] bytes of `out`.
    pub(crate) fn write(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.pid.to_le_bytes());
        out[4..12].copy_from_slice(&self.busy_ns.to_le_bytes());
        out[12..16].copy_from_slice(&self.count.to_le_bytes());
    }
}

/// Splits `body` into `count` length-prefixed records after a `count: u32` at its start.
pub(crate) fn items(body: &[u8]) -> Result<Items<'_>, ProtocolError> {
    let (count, rest) = body.split_first_chunk::<4>().ok_or_else(|| truncated("batch"))?;
    Ok(Items { rest, left: u32::from_le_bytes(*count) })
}

/// The records of a batch, in order; see [`items`].
pub(crate) struct Items<'a> {
    rest: &'a [u8],
    left: u32,
}

impl<'a> Items<'a> {
    /// The next record, or an error if the body ends before it does.
    pub(crate) fn next_record(&mut self) -> Option<Result<&'a [u8], ProtocolError>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let Some((len, rest)) = self.rest.split_first_chunk::<4>() else {
            return Some(Err(truncated("batch item")));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Some(Err(truncated("batch item")));
        }
        let (record, rest) = rest.split_at(len);
        self.rest = rest;
        Some(Ok(record))
    }

    /// Whether every byte was taken by a record.
    pub(crate) fn is_exhausted(&self) -> bool {
        self.left == 0 && self.rest.is_empty()
    }
}

/// Reads a batch reply's head; the rest of `body` is its items, one [`Outcome`] byte before
/// each record.
pub(crate) fn reply(body: &[u8]) -> Result<(ReplyHead, Items<'_>), ProtocolError> {
    if body.len() < REPLY_HEAD {
        return Err(truncated("batch reply"));
    }
    let head = ReplyHead {
        pid: u32::from_le_bytes(body[..4].try_into().expect("4 bytes")),
        busy_ns: u64::from_le_bytes(body[4..12].try_into().expect("8 bytes")),
        count: u32::from_le_bytes(body[12..16].try_into().expect("4 bytes")),
    };
    Ok((head, Items { rest: &body[REPLY_HEAD..], left: head.count }))
}

/// One item of a batch reply, split into its outcome and bytes.
pub(crate) fn outcome(record: &[u8]) -> Result<(Outcome, &[u8]), ProtocolError> {
    let (&first, bytes) = record.split_first().ok_or_else(|| truncated("batch result"))?;
    let outcome = match first {
        0 => Outcome::Returned,
        1 => Outcome::Panicked,
        2 => Outcome::Faulted,
        other => return Err(ProtocolError::Invalid(format!("unknown batch outcome {other}"))),
    };
    Ok((outcome, bytes))
}

/// What an item that did not return says: its panic or its fault.
pub(crate) enum Failed {
    Panicked(PanicReport),
    Faulted(ProtocolError),
}

/// Decodes the bytes of an item that did not return.
pub(crate) fn failed(outcome: Outcome, bytes: &[u8]) -> Result<Failed, ProtocolError> {
    match outcome {
        Outcome::Panicked => super::decode::<PanicReport>(bytes, Payload::Message).map(Failed::Panicked),
        Outcome::Faulted => {
            super::decode::<Fault>(bytes, Payload::Message).map(|f| Failed::Faulted(f.into()))
        }
        Outcome::Returned => Err(ProtocolError::Invalid("a returned item is not a failure".into())),
    }
}

fn truncated(what: &str) -> ProtocolError {
    ProtocolError::Invalid(format!("truncated {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let mut out = 3u32.to_le_bytes().to_vec();
        for word in ["a", "", "bcd"] {
            let at = Records::open(&mut out);
            out.extend_from_slice(word.as_bytes());
            Records::close(&mut out, at);
        }
        let mut items = items(&out).unwrap();
        let read: Vec<&[u8]> = std::iter::from_fn(|| items.next_record()).map(Result::unwrap).collect();
        assert_eq!(read, [&b"a"[..], b"", b"bcd"]);
        assert!(items.is_exhausted());
    }

    #[test]
    fn a_record_past_the_end_is_an_error() {
        let mut out = 2u32.to_le_bytes().to_vec();
        out.extend_from_slice(&10u32.to_le_bytes());
        out.extend_from_slice(b"short");
        let mut items = items(&out).unwrap();
        assert!(items.next_record().unwrap().is_err());
        assert!(matches!(reply(&[0; 3]), Err(ProtocolError::Invalid(_))));
        assert!(outcome(&[9]).is_err());
    }

    #[test]
    fn a_batch_frame_splits_like_a_call() {
        let mut frame = start("m::f", 3).unwrap();
        let records = frame.len();
        for args in [&b"xy"[..], b"z"] {
            let at = Records::open(&mut frame);
            frame.extend_from_slice(args);
            Records::close(&mut frame, at);
        }
        finish(&mut frame, records, 2).unwrap();
        let (len, tag) =
            super::super::parse_header(frame[..5].try_into().unwrap(), super::super::MAX_FRAME).unwrap();
        assert_eq!((len, tag), (frame.len() - 5, Tag::Batch));
        let call = super::super::split_call(&frame[5..]).unwrap();
        assert_eq!((call.name, call.log_level), ("m::f", 3));
        let mut items = items(call.args).unwrap();
        assert_eq!(items.next_record().unwrap().unwrap(), b"xy");
        assert_eq!(items.next_record().unwrap().unwrap(), b"z");
        assert!(items.is_exhausted());
    }

    #[test]
    fn reply_head_round_trips() {
        let head = ReplyHead { pid: 42, busy_ns: 1234, count: 0 };
        let mut body = vec![0; REPLY_HEAD];
        head.write(&mut body);
        let (read, items) = reply(&body).unwrap();
        assert_eq!(read, head);
        assert!(items.is_exhausted());
    }
}
