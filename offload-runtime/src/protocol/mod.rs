//! What crosses the process boundary: frames, their tags, and the encoding of arguments and
//! return values. No internal dependencies beyond the error types.
//!
//! A frame is `[len: u32 LE][tag: u8][body]`, where `len` counts the tag and the body and is
//! at most [`MAX_FRAME`]. Bodies are postcard. A call frame carries the entry name followed by
//! the arguments, encoded straight into the frame buffer so the payload is never copied to
//! build the frame; a reply carries the return value the same way.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Payload, ProtocolError};

pub(crate) mod batch;
pub(crate) mod env;
pub(crate) mod reader;

/// Bumped whenever the frame layout or a message changes.
pub(crate) const PROTOCOL_VERSION: u32 = 5;

/// The largest frame the length prefix can describe, tag included. Pools enforce their own,
/// smaller `max_payload` on top of it.
pub(crate) const MAX_FRAME: usize = u32::MAX as usize;

/// Room for a frame's own bytes beyond its payload: header, entry name, log frames.
pub(crate) const FRAME_SLACK: usize = 1 << 20;

/// Bytes before a frame's body: the length and the tag.
pub(crate) const HEADER: usize = 5;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Tag {
    /// Worker to parent, once, first: [`Hello`].
    Hello = 1,
    /// Parent to worker: `[name_len: u16 LE][name][arguments]`.
    Call = 2,
    /// Worker to parent: the encoded return value.
    Return = 3,
    /// Worker to parent: [`PanicReport`].
    Panicked = 4,
    /// Worker to parent: a [`ProtocolError`] about the call (bad arguments, unknown entry,
    /// return value that does not encode).
    Fault = 5,
    /// Worker to parent, before the reply: [`LogRecord`]s the function emitted.
    Log = 6,
    /// Parent to worker, before a call: the raw bytes of one of its large byte-vector
    /// arguments; see [`bulk`].
    Bulk = 7,
    /// Worker to parent, during a call: a [`ProgressReport`] the function made.
    Progress = 8,
    /// Parent to worker: many calls of one function, answered by one [`Tag::Return`]; see
    /// [`batch`].
    Batch = 9,
    /// Worker to parent, during a call of a function that streams: one item it yielded,
    /// encoded as a return value is.
    Item = 10,
    /// Parent to worker, before a call, to a worker that reads its parent's memory
    /// ([`Hello::reads_parent`]): where one of the call's large byte-vector arguments is in
    /// the parent (its address, then its length, 8 bytes each, little-endian); see
    /// [`crate::lend`].
    BulkAt = 11,
    /// Worker to parent, just before a reply to a call that came with shared buffers: the
    /// worker holds none of the shared buffers it was ever sent, and sent none of them back,
    /// so the parent may use them again (see `crate::shm`).
    Released = 12,
}

impl Tag {
    pub(crate) fn from_u8(b: u8) -> Option<Tag> {
        Some(match b {
            1 => Tag::Hello,
            2 => Tag::Call,
            3 => Tag::Return,
            4 => Tag::Panicked,
            5 => Tag::Fault,
            6 => Tag::Log,
            7 => Tag::Bulk,
            8 => Tag::Progress,
            9 => Tag::Batch,
            10 => Tag::Item,
            11 => Tag::BulkAt,
            12 => Tag::Released,
            _ => return None,
        })
    }
}

/// The worker's first frame: who it is and what it was built from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Hello {
    pub(crate) version: u32,
    pub(crate) pid: u32,
    /// The per-pool secret the parent handed to this worker.
    pub(crate) secret: [u8; 16],
    /// [`crate::registry::Registry::hash`] of the worker's build.
    pub(crate) registry: u64,
    /// The worker can read its parent's memory: large byte vectors may be lent to it
    /// ([`Tag::BulkAt`]).
    pub(crate) reads_parent: bool,
}

/// A panic in the user's function.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct PanicReport {
    pub(crate) message: String,
    pub(crate) location: Option<String>,
}

/// A `tracing` event emitted in the worker, forwarded to the parent's subscriber.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct LogRecord {
    /// 1 = error .. 5 = trace.
    pub(crate) level: u8,
    pub(crate) target: String,
    pub(crate) message: String,
    /// The event's other fields, as `name=value` pairs separated by spaces.
    pub(crate) fields: String,
}

pub(crate) mod level {
    //! `tracing` levels on the wire: the one table both sides use. 0 is off; 1 to 5 are
    //! error to trace.

    use tracing::Level;
    use tracing::level_filters::LevelFilter;

    pub(crate) fn of_level(level: Level) -> u8 {
        match level {
            Level::ERROR => 1,
            Level::WARN => 2,
            Level::INFO => 3,
            Level::DEBUG => 4,
            Level::TRACE => 5,
        }
    }

    /// The most verbose level `filter` lets through; 0 for none.
    pub(crate) fn of_filter(filter: LevelFilter) -> u8 {
        filter.into_level().map_or(0, of_level)
    }

    /// The level a wire value names; anything past debug is trace.
    pub(crate) fn to_level(wire: u8) -> Level {
        match wire {
            0 | 1 => Level::ERROR,
            2 => Level::WARN,
            3 => Level::INFO,
            4 => Level::DEBUG,
            _ => Level::TRACE,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn levels_round_trip() {
            for level in [Level::ERROR, Level::WARN, Level::INFO, Level::DEBUG, Level::TRACE] {
                assert_eq!(to_level(of_level(level)), level);
                assert_eq!(of_filter(LevelFilter::from_level(level)), of_level(level));
            }
            assert_eq!(of_filter(LevelFilter::OFF), 0);
        }
    }
}

/// A [`Tag::Progress`] frame's body: how far the running call is.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct ProgressReport {
    pub(crate) done: u64,
    pub(crate) total: u64,
    pub(crate) message: Option<String>,
}

/// A [`Tag::Fault`] frame's body: a [`ProtocolError`] as it crosses the boundary, apart from
/// the public type, so that the two can change on their own.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) enum Fault {
    Encode { what: u8, message: String },
    Decode { what: u8, message: String },
    PayloadTooLarge { what: u8, len: u64, max: u64 },
    FrameTooLarge { len: u64, max: u64 },
    Invalid(String),
}

impl Fault {
    fn payload(what: Payload) -> u8 {
        match what {
            Payload::Arguments => 0,
            Payload::ReturnValue => 1,
            Payload::Message => 2,
        }
    }

    fn what(wire: u8) -> Payload {
        match wire {
            0 => Payload::Arguments,
            1 => Payload::ReturnValue,
            _ => Payload::Message,
        }
    }
}

impl From<&ProtocolError> for Fault {
    fn from(error: &ProtocolError) -> Fault {
        match error.clone() {
            ProtocolError::Encode { what, message } => Fault::Encode { what: Fault::payload(what), message },
            ProtocolError::Decode { what, message } => Fault::Decode { what: Fault::payload(what), message },
            ProtocolError::PayloadTooLarge { what, len, max } => {
                Fault::PayloadTooLarge { what: Fault::payload(what), len, max }
            }
            ProtocolError::FrameTooLarge { len, max } => Fault::FrameTooLarge { len, max },
            ProtocolError::Invalid(message) => Fault::Invalid(message),
        }
    }
}

impl From<Fault> for ProtocolError {
    fn from(fault: Fault) -> ProtocolError {
        match fault {
            Fault::Encode { what, message } => ProtocolError::Encode { what: Fault::what(what), message },
            Fault::Decode { what, message } => ProtocolError::Decode { what: Fault::what(what), message },
            Fault::PayloadTooLarge { what, len, max } => {
                ProtocolError::PayloadTooLarge { what: Fault::what(what), len, max }
            }
            Fault::FrameTooLarge { len, max } => ProtocolError::FrameTooLarge { len, max },
            Fault::Invalid(message) => ProtocolError::Invalid(message),
        }
    }
}

/// A frame being built: header space reserved, body appended, length filled in by
/// [`FrameBuf::finish`].
pub(crate) struct FrameBuf(Vec<u8>);

impl FrameBuf {
    pub(crate) fn new(tag: Tag) -> FrameBuf {
        FrameBuf::reuse(Vec::with_capacity(64), tag)
    }

    /// Starts a frame in `buf`, keeping its allocation.
    pub(crate) fn reuse(mut buf: Vec<u8>, tag: Tag) -> FrameBuf {
        buf.clear();
        buf.extend_from_slice(&[0, 0, 0, 0, tag as u8]);
        FrameBuf(buf)
    }

    pub(crate) fn body(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }

    /// The buffer, for reuse.
    pub(crate) fn into_inner(self) -> Vec<u8> {
        self.0
    }

    /// Fills in the length; fails if the frame is over [`MAX_FRAME`].
    pub(crate) fn finish(mut self) -> Result<Vec<u8>, ProtocolError> {
        fill_length(&mut self.0)?;
        Ok(self.0)
    }
}

/// Writes the length of `frame` (header included) into its first four bytes; fails if the
/// frame is over [`MAX_FRAME`].
pub(crate) fn fill_length(frame: &mut [u8]) -> Result<(), ProtocolError> {
    let len = frame.len() - 4;
    if len > MAX_FRAME {
        return Err(ProtocolError::FrameTooLarge { len: len as u64, max: MAX_FRAME as u64 });
    }
    frame[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Reads a frame header: the body length (without the tag) and the tag. A frame longer than
/// `max` is refused before anything is allocated for it.
pub(crate) fn parse_header(header: [u8; HEADER], max: usize) -> Result<(usize, Tag), ProtocolError> {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > max {
        return Err(ProtocolError::FrameTooLarge { len: len as u64, max: max as u64 });
    }
    if len == 0 {
        return Err(ProtocolError::Invalid("empty frame".into()));
    }
    let tag = Tag::from_u8(header[4])
        .ok_or_else(|| ProtocolError::Invalid(format!("unknown frame tag {}", header[4])))?;
    Ok((len - 1, tag))
}

/// A call frame, the descriptors of the shared buffers among its arguments, and the outings
/// of those made in this process (see [`fds::Outing`]).
pub(crate) type EncodedCall = (Vec<u8>, Vec<std::os::fd::OwnedFd>, Vec<fds::Outing>);

/// A call frame for `name` with `args`; the worker forwards `tracing` events up to `log_level`
/// (see [`level`]). `size` is the arguments' encoded size if it is known already (see
/// [`size_within`]). Arguments that encode to more than `max_payload` bytes, counting the
/// `bulk` bytes that travel in frames of their own, are refused before the frame is
/// allocated.
pub(crate) fn encode_call<A: Serialize>(
    name: &str,
    log_level: u8,
    args: &A,
    size: Option<usize>,
    bulk: u64,
    max_payload: u64,
) -> Result<EncodedCall, ProtocolError> {
    let size = match size {
        Some(size) => size,
        None => encoded_size(args, Payload::Arguments)?,
    };
    let total = (size as u64).saturating_add(bulk);
    if total > max_payload {
        return Err(ProtocolError::PayloadTooLarge {
            what: Payload::Arguments,
            len: total,
            max: max_payload,
        });
    }
    let mut frame = FrameBuf::reuse(Vec::with_capacity(HEADER + 3 + name.len() + size), Tag::Call);
    let name_len = u16::try_from(name.len())
        .map_err(|_| ProtocolError::Invalid(format!("entry name of {} bytes", name.len())))?;
    frame.body().extend_from_slice(&name_len.to_le_bytes());
    frame.body().extend_from_slice(name.as_bytes());
    frame.body().push(log_level);
    let (appended, fds, outings) = fds::collecting_outings(|| append(frame.body(), args, Payload::Arguments));
    appended?;
    Ok((frame.finish()?, fds, outings))
}

/// A call frame's parts.
#[derive(Clone, Copy)]
pub(crate) struct CallFrame<'a> {
    pub(crate) name: &'a str,
    pub(crate) log_level: u8,
    pub(crate) args: &'a [u8],
}

/// Splits a call body into the entry name, the log level and the encoded arguments.
pub(crate) fn split_call(body: &[u8]) -> Result<CallFrame<'_>, ProtocolError> {
    let bad = || ProtocolError::Invalid("truncated call frame".into());
    let (len, rest) = body.split_first_chunk::<2>().ok_or_else(bad)?;
    let len = u16::from_le_bytes(*len) as usize;
    if rest.len() <= len {
        return Err(bad());
    }
    let (name, rest) = rest.split_at(len);
    let name =
        std::str::from_utf8(name).map_err(|_| ProtocolError::Invalid("entry name is not UTF-8".into()))?;
    Ok(CallFrame { name, log_level: rest[0], args: &rest[1..] })
}

/// The encoded size of `value`, or an error if it is over `max` bytes.
pub(crate) fn checked_size<T: Serialize + ?Sized>(
    value: &T,
    what: Payload,
    max: u64,
) -> Result<usize, ProtocolError> {
    let size = encoded_size(value, what)?;
    if size as u64 > max {
        return Err(ProtocolError::PayloadTooLarge { what, len: size as u64, max });
    }
    Ok(size)
}

/// The encoded size of `value`.
fn encoded_size<T: Serialize + ?Sized>(value: &T, what: Payload) -> Result<usize, ProtocolError> {
    refusal::clear();
    fds::counting(|| {
        postcard::serialize_with_flavor::<T, _, usize>(value, postcard::ser_flavors::Size::default())
    })
    .map_err(|e| ProtocolError::Encode { what, message: refusal::describe(e) })
}

/// The encoded size of `value` if it is at most `limit` bytes, `None` if it is more.
/// Counting stops past `limit`, so this costs at most about `limit` bytes' worth of work,
/// however large the value is.
pub(crate) fn size_within<T: Serialize + ?Sized>(
    value: &T,
    what: Payload,
    limit: usize,
) -> Result<Option<usize>, ProtocolError> {
    /// Counts bytes, and fails as soon as there are more than `limit`.
    struct Bounded {
        count: usize,
        limit: usize,
    }

    impl postcard::ser_flavors::Flavor for &mut Bounded {
        type Output = ();

        fn try_push(&mut self, _: u8) -> postcard::Result<()> {
            self.try_extend(&[0])
        }

        fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
            self.count = self.count.saturating_add(bytes.len());
            if self.count > self.limit { Err(postcard::Error::SerializeBufferFull) } else { Ok(()) }
        }

        fn finalize(self) -> postcard::Result<()> {
            Ok(())
        }
    }

    let mut bounded = Bounded { count: 0, limit };
    refusal::clear();
    match fds::counting(|| postcard::serialize_with_flavor(value, &mut bounded)) {
        Ok(()) => Ok(Some(bounded.count)),
        Err(postcard::Error::SerializeBufferFull) => Ok(None),
        Err(e) => Err(ProtocolError::Encode { what, message: refusal::describe(e) }),
    }
}

/// Appends `value` to `out` in postcard.
pub(crate) fn append<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    value: &T,
    what: Payload,
) -> Result<(), ProtocolError> {
    refusal::clear();
    postcard::serialize_with_flavor(value, Append(out))
        .map_err(|e| ProtocolError::Encode { what, message: refusal::describe(e) })
}

/// A postcard output that appends to a `Vec` with `extend_from_slice`: byte strings are
/// copied with one `memcpy`, not byte by byte.
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.push(byte);
        Ok(())
    }

    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// The text of offload's own serde errors. postcard, the wire format, keeps no text of a
/// custom serde error (`Error::custom` makes a unit variant), so offload's own impls (shared
/// buffers, bulk bytes) leave their message here, and the error that reaches the caller
/// takes it back. A user's impl that fails with `custom(...)` has its text dropped by
/// postcard: its error says so.
pub(crate) mod refusal {
    use std::cell::RefCell;
    use std::fmt::Display;

    thread_local! {
        static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
    }

    /// Said of a failed `Serialize` or `Deserialize` impl whose message postcard dropped.
    const DROPPED: &str = "a `Serialize` or `Deserialize` impl failed with a custom error; postcard, \
        offload's wire format, does not keep its message";

    /// A decoding error that says `message`.
    pub(crate) fn de<E: serde::de::Error>(message: impl Display) -> E {
        let message = message.to_string();
        let error = E::custom(&message);
        LAST.with(|last| *last.borrow_mut() = Some(message));
        error
    }

    /// An encoding error that says `message`.
    pub(crate) fn ser<E: serde::ser::Error>(message: impl Display) -> E {
        let message = message.to_string();
        let error = E::custom(&message);
        LAST.with(|last| *last.borrow_mut() = Some(message));
        error
    }

    /// Forgets a message left by an earlier pass.
    pub(crate) fn clear() {
        LAST.with(|last| last.borrow_mut().take());
    }

    /// What a postcard error says, with the message of offload's own custom error put back.
    pub(crate) fn describe(error: postcard::Error) -> String {
        match error {
            postcard::Error::SerdeSerCustom | postcard::Error::SerdeDeCustom => {
                LAST.with(|last| last.borrow_mut().take()).unwrap_or_else(|| DROPPED.to_owned())
            }
            other => other.to_string(),
        }
    }
}

/// Decodes `bytes`, which must hold exactly one value: trailing bytes mean the two sides
/// disagree about the type (for example a field skipped by `skip_serializing_if`).
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], what: Payload) -> Result<T, ProtocolError> {
    refusal::clear();
    match postcard::take_from_bytes(bytes) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(ProtocolError::Decode {
            what,
            message: format!(
                "{} bytes left over; the type serializes differently from how it deserializes \
                 (postcard does not support `skip_serializing_if`, `flatten` or `untagged`)",
                rest.len()
            ),
        }),
        Err(e) => Err(ProtocolError::Decode { what, message: refusal::describe(e) }),
    }
}

/// The header of a [`Tag::Bulk`] frame of `len` bytes.
pub(crate) fn bulk_header(len: usize) -> Result<[u8; HEADER], ProtocolError> {
    let framed = len.checked_add(1).filter(|&n| n <= MAX_FRAME);
    let framed = framed.ok_or(ProtocolError::FrameTooLarge { len: len as u64, max: MAX_FRAME as u64 })?;
    let [a, b, c, d] = (framed as u32).to_le_bytes();
    Ok([a, b, c, d, Tag::Bulk as u8])
}

/// A [`Tag::BulkAt`] frame: `len` bytes at `address` in this process.
pub(crate) fn bulk_at_frame(address: u64, len: u64) -> [u8; HEADER + 16] {
    let mut frame = [0u8; HEADER + 16];
    frame[..4].copy_from_slice(&17u32.to_le_bytes());
    frame[4] = Tag::BulkAt as u8;
    frame[HEADER..HEADER + 8].copy_from_slice(&address.to_le_bytes());
    frame[HEADER + 8..].copy_from_slice(&len.to_le_bytes());
    frame
}

/// The address and length in a [`Tag::BulkAt`] frame's body.
pub(crate) fn parse_bulk_at(body: &[u8]) -> Result<(u64, u64), ProtocolError> {
    let body: &[u8; 16] = body
        .try_into()
        .map_err(|_| ProtocolError::Invalid(format!("a lent-bytes frame of {} bytes, not 16", body.len())))?;
    let (address, len) = body.split_at(8);
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    Ok((word(address), word(len)))
}

/// Large byte-vector arguments (top-level `Vec<u8>` arguments of at least [`bulk::MIN`]
/// bytes) travel in [`Tag::Bulk`] frames of their own, sent before the call frame: written
/// from the caller's vector as it is, and read by the worker straight into the vector it
/// hands the function. Neither side copies them in user space, and the worker's vector is
/// the only allocation. The call frame carries a marker in their place (see
/// [`SendBytes`]), and the worker's decoding takes the bulk frames in order. To a worker
/// that reads its parent's memory, a [`Tag::BulkAt`] frame goes in place of each bulk
/// frame, and the worker reads the bytes from where they are (see [`crate::lend`]).
pub(crate) mod bulk {
    use std::cell::{Cell, RefCell};
    use std::collections::VecDeque;

    /// Byte vectors at least this long go in bulk frames; shorter ones in the call frame.
    pub(crate) const MIN: usize = 64 << 10;

    /// Whether a byte-vector argument of `len` bytes goes in a bulk frame.
    pub(crate) fn is_bulk(len: usize) -> bool {
        len >= MIN
    }

    thread_local! {
        /// The bulk frames of the call being decoded, in the order they came.
        static SUPPLY: RefCell<VecDeque<Vec<u8>>> = const { RefCell::new(VecDeque::new()) };
        /// Set while encoding a batch item, which travels inline whatever its size.
        static INLINE: Cell<bool> = const { Cell::new(false) };
    }

    /// Whether a byte vector of `len` bytes being encoded now goes in a bulk frame: a long
    /// one, unless [`inline`] says otherwise.
    pub(crate) fn goes_in_bulk(len: usize) -> bool {
        is_bulk(len) && !INLINE.get()
    }

    /// Whether an encoding pass of [`inline`] is running.
    pub(crate) fn inlining() -> bool {
        INLINE.get()
    }

    /// Runs an encoding pass in which every byte vector goes inline (a batch item: see
    /// [`super::batch`]).
    pub(crate) fn inline<R>(f: impl FnOnce() -> R) -> R {
        /// Restores the mode even if `f` panics (a user's `Serialize` may).
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                INLINE.set(self.0);
            }
        }
        let _restore = Restore(INLINE.replace(true));
        f()
    }

    /// Runs a decoding pass with the bulk frames that came before the call frame; those it
    /// does not take are dropped.
    pub(crate) fn supplying<R>(frames: Vec<Vec<u8>>, f: impl FnOnce() -> R) -> R {
        /// Puts the previous supply back even if `f` panics (a user's `Deserialize` may).
        struct Restore(VecDeque<Vec<u8>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let previous = std::mem::take(&mut self.0);
                SUPPLY.with(|s| *s.borrow_mut() = previous);
            }
        }
        let _restore = Restore(SUPPLY.with(|s| std::mem::replace(&mut *s.borrow_mut(), frames.into())));
        f()
    }

    /// Takes the next bulk frame of the call being decoded.
    pub(crate) fn take() -> Option<Vec<u8>> {
        SUPPLY.with(|s| s.borrow_mut().pop_front())
    }
}

/// A byte-vector argument as the caller encodes it: its bytes, if it is short; if it goes in
/// a bulk frame, only its length. Not public API.
pub struct SendBytes<'a>(pub &'a [u8]);

/// The wire form of [`SendBytes`] and [`RecvBytes`].
#[derive(serde::Serialize)]
#[serde(rename = "offload::Bytes")]
enum WireBytes<'a> {
    Inline(#[serde(with = "serde_bytes")] &'a [u8]),
    Bulk(u64),
}

impl Serialize for SendBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if bulk::goes_in_bulk(self.0.len()) {
            WireBytes::Bulk(self.0.len() as u64).serialize(serializer)
        } else {
            WireBytes::Inline(self.0).serialize(serializer)
        }
    }
}

/// A byte-vector argument as the worker decodes it: from the call frame, or the next bulk
/// frame. Not public API.
pub struct RecvBytes(Vec<u8>);

impl RecvBytes {
    /// The bytes.
    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

impl<'de> serde::Deserialize<'de> for RecvBytes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<RecvBytes, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(rename = "offload::Bytes")]
        enum WireBytes {
            Inline(serde_bytes::ByteBuf),
            Bulk(u64),
        }

        match WireBytes::deserialize(deserializer)? {
            WireBytes::Inline(bytes) => Ok(RecvBytes(bytes.into_vec())),
            WireBytes::Bulk(len) => {
                let bytes =
                    bulk::take().ok_or_else(|| refusal::de::<D::Error>("a bulk argument did not arrive"))?;
                if bytes.len() as u64 != len {
                    return Err(refusal::de::<D::Error>(format!(
                        "a bulk argument of {} bytes arrived for one of {len}",
                        bytes.len()
                    )));
                }
                Ok(RecvBytes(bytes))
            }
        }
    }
}

/// What travels beside a frame's body: the descriptors of shared buffers and the bulk frames
/// that came before it.
#[derive(Default)]
pub(crate) struct Attached {
    pub(crate) fds: Vec<std::os::fd::OwnedFd>,
    pub(crate) bulk: Vec<Vec<u8>>,
}

impl Attached {
    /// Runs a decoding pass that takes its shared buffers and bulk byte vectors from these;
    /// what it does not take is dropped.
    pub(crate) fn supplying<R>(self, f: impl FnOnce() -> R) -> R {
        bulk::supplying(self.bulk, || fds::supplying(self.fds, f))
    }
}

/// Descriptors that travel with a frame (`SCM_RIGHTS`): the shared buffers among the
/// arguments or the return value. Encoding collects them, decoding hands them out by index,
/// through a per-thread mode set around the (de)serialization.
pub(crate) mod fds {
    use std::cell::RefCell;
    use std::os::fd::OwnedFd;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// The most descriptors one frame may carry: what one `SCM_RIGHTS` message carries.
    pub(crate) const MAX: usize = 253;

    enum Mode {
        /// Not inside an offload call: shared buffers cannot be serialized.
        Off,
        /// Measuring the encoded size: placeholder indexes.
        Count,
        /// Encoding for real: each buffer's descriptor is duplicated onto the list, and the
        /// buffers of this process that have a [`Sent`] record go out with the call.
        Collect(Vec<OwnedFd>, Vec<Outing>),
        /// Decoding: the descriptors that came with the frame.
        Supply(Vec<Option<OwnedFd>>),
    }

    thread_local! {
        static MODE: RefCell<Mode> = const { RefCell::new(Mode::Off) };
    }

    fn with_mode<R>(mode: Mode, f: impl FnOnce() -> R) -> (R, Mode) {
        /// Puts the previous mode back even if `f` panics (a user's `Serialize` may), so the
        /// thread is not left collecting or supplying descriptors.
        struct Restore(Option<Mode>);
        impl Drop for Restore {
            fn drop(&mut self) {
                if let Some(previous) = self.0.take() {
                    MODE.with(|m| *m.borrow_mut() = previous);
                }
            }
        }
        let mut restore = Restore(Some(MODE.with(|m| std::mem::replace(&mut *m.borrow_mut(), mode))));
        let result = f();
        let previous = restore.0.take().expect("taken only here or in drop");
        let mode = MODE.with(|m| std::mem::replace(&mut *m.borrow_mut(), previous));
        (result, mode)
    }

    /// Runs an encoding pass that only measures.
    pub(crate) fn counting<R>(f: impl FnOnce() -> R) -> R {
        with_mode(Mode::Count, f).0
    }

    /// Runs an encoding pass; returns the descriptors it attached.
    pub(crate) fn collecting<R>(f: impl FnOnce() -> R) -> (R, Vec<OwnedFd>) {
        let (result, fds, _outings) = collecting_outings(f);
        (result, fds)
    }

    /// [`collecting`], with the outings of the buffers of this process that went with it.
    pub(crate) fn collecting_outings<R>(f: impl FnOnce() -> R) -> (R, Vec<OwnedFd>, Vec<Outing>) {
        match with_mode(Mode::Collect(Vec::new(), Vec::new()), f) {
            (result, Mode::Collect(fds, outings)) => (result, fds, outings),
            (result, _) => (result, Vec::new(), Vec::new()),
        }
    }

    /// What a shared buffer made in this process knows of the calls it went out with: how
    /// many are under way, and whether a worker may have kept it. Only a buffer no call has
    /// and no worker kept may be used again for another (see `crate::shm`).
    #[derive(Debug, Default)]
    pub(crate) struct Sent {
        in_flight: AtomicU32,
        kept: AtomicBool,
    }

    impl Sent {
        /// Whether the buffer is back for good: no call has it, no worker kept it.
        pub(crate) fn is_back(&self) -> bool {
            self.in_flight.load(Ordering::Acquire) == 0 && !self.kept.load(Ordering::Acquire)
        }
    }

    /// One call a buffer went out with. Dropped without [`Outing::returned`] (the call failed,
    /// or its worker did not say it let go of every buffer it was sent), the buffer counts as
    /// kept by a worker, for good.
    #[derive(Debug)]
    pub(crate) struct Outing {
        sent: Arc<Sent>,
        returned: bool,
    }

    impl Outing {
        /// The call succeeded, and its worker holds none of the buffers it was ever sent.
        pub(crate) fn returned(&mut self) {
            self.returned = true;
        }
    }

    impl Drop for Outing {
        fn drop(&mut self) {
            if !self.returned {
                self.sent.kept.store(true, Ordering::Release);
            }
            self.sent.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Runs a decoding pass with the descriptors that came with the frame; those it does not
    /// take are closed.
    pub(crate) fn supplying<R>(fds: Vec<OwnedFd>, f: impl FnOnce() -> R) -> R {
        with_mode(Mode::Supply(fds.into_iter().map(Some).collect()), f).0
    }

    /// Attaches `fd` to the frame being encoded; its index in the frame's list. `sent` is the
    /// record of a buffer made in this process.
    pub(crate) fn attach(fd: &OwnedFd, sent: Option<&Arc<Sent>>) -> Result<u32, String> {
        MODE.with(|m| match &mut *m.borrow_mut() {
            Mode::Count => Ok(0),
            Mode::Collect(list, outings) => {
                if list.len() >= MAX {
                    return Err(format!("more than {MAX} shared buffers in one payload"));
                }
                list.push(fd.try_clone().map_err(|e| format!("could not duplicate a shared buffer: {e}"))?);
                if let Some(sent) = sent {
                    sent.in_flight.fetch_add(1, Ordering::AcqRel);
                    outings.push(Outing { sent: Arc::clone(sent), returned: false });
                }
                Ok(list.len() as u32 - 1)
            }
            Mode::Off | Mode::Supply(_) => Err("shared buffers can only be serialized as an argument or \
                                                return value of an `#[offload]` function"
                .to_owned()),
        })
    }

    /// Takes the descriptor at `index` of the frame being decoded.
    pub(crate) fn take(index: u32) -> Option<OwnedFd> {
        MODE.with(|m| match &mut *m.borrow_mut() {
            Mode::Supply(list) => list.get_mut(index as usize).and_then(Option::take),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_pass_leaves_the_thread_out_of_descriptor_mode() {
        let fd: std::os::fd::OwnedFd = std::fs::File::open("/proc/self/exe").unwrap().into();
        let panicked =
            std::panic::catch_unwind(|| fds::collecting(|| -> () { panic!("a user's Serialize") }));
        assert!(panicked.is_err());
        // Outside any pass, attaching is refused, as it is on a fresh thread.
        assert!(fds::attach(&fd, None).is_err(), "the thread was left collecting descriptors");
    }

    #[test]
    fn a_panicking_pass_leaves_no_bulk_frames_behind() {
        let panicked =
            std::panic::catch_unwind(|| bulk::supplying(vec![vec![1; 8]], || -> () { panic!("oops") }));
        assert!(panicked.is_err());
        assert_eq!(bulk::take(), None, "the supply of a panicked pass outlived it");
    }

    #[test]
    fn call_frame_round_trips() {
        let (frame, _, _) =
            encode_call("a::b#1", 3, &(serde_bytes::Bytes::new(&[1, 2, 3]), 7u32), None, 0, 1 << 20).unwrap();
        let (len, tag) = parse_header(frame[..HEADER].try_into().unwrap(), MAX_FRAME).unwrap();
        assert_eq!(tag, Tag::Call);
        assert_eq!(len, frame.len() - HEADER);
        let call = split_call(&frame[HEADER..]).unwrap();
        assert_eq!((call.name, call.log_level), ("a::b#1", 3));
        let (bytes, n): (serde_bytes::ByteBuf, u32) = decode(call.args, Payload::Arguments).unwrap();
        assert_eq!((bytes.into_vec(), n), (vec![1, 2, 3], 7));
    }

    #[test]
    fn bytes_are_not_encoded_element_by_element() {
        let data = vec![200u8; 1000];
        let (frame, _, _) =
            encode_call("x", 0, &(serde_bytes::Bytes::new(&data),), None, 0, 1 << 20).unwrap();
        // 5 header + 2 name length + 1 name + 1 log level + 2 varint length + 1000 raw bytes.
        assert_eq!(frame.len(), 5 + 2 + 1 + 1 + 2 + 1000);
    }

    #[test]
    fn bad_headers_are_errors() {
        assert!(matches!(
            parse_header([0xff, 0xff, 0xff, 0xff, 2], 1 << 30),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        assert!(matches!(parse_header([0, 0, 0, 0, 2], MAX_FRAME), Err(ProtocolError::Invalid(_))));
        assert!(matches!(parse_header([1, 0, 0, 0, 99], MAX_FRAME), Err(ProtocolError::Invalid(_))));
        assert!(split_call(&[5, 0, b'a']).is_err());
        assert!(split_call(&[1, 0, b'a']).is_err(), "no log level");
    }

    #[test]
    fn oversized_arguments_are_refused_before_allocating() {
        let data = vec![0u8; 2000];
        let err = encode_call("x", 0, &(serde_bytes::Bytes::new(&data),), None, 0, 1000).unwrap_err();
        assert_eq!(err, ProtocolError::PayloadTooLarge { what: Payload::Arguments, len: 2002, max: 1000 });
    }

    #[test]
    fn byte_arguments_go_inline_or_in_bulk() {
        let short = vec![5u8; 10];
        let long = vec![6u8; bulk::MIN];
        let (frame, _, _) = encode_call(
            "x",
            0,
            &(SendBytes(&short), SendBytes(&long), 9u8),
            None,
            long.len() as u64,
            1 << 20,
        )
        .unwrap();
        let call = split_call(&frame[HEADER..]).unwrap();
        // Inline: variant 0, length 10, the bytes; bulk: variant 1 and the length only.
        assert_eq!(call.args.len(), 1 + 1 + 10 + 1 + 3 + 1);
        let (a, b, n): (RecvBytes, RecvBytes, u8) =
            bulk::supplying(vec![long.clone()], || decode(call.args, Payload::Arguments)).unwrap();
        assert_eq!((a.into_vec(), b.into_vec(), n), (short, long.clone(), 9));

        let missing = decode::<(RecvBytes, RecvBytes, u8)>(call.args, Payload::Arguments);
        // offload's own messages survive postcard, which keeps no text of a custom error.
        assert!(
            matches!(&missing, Err(ProtocolError::Decode { message, .. }) if message == "a bulk argument did not arrive"),
            "{:?}",
            missing.err()
        );
        let wrong = bulk::supplying(vec![vec![0; 3]], || {
            decode::<(RecvBytes, RecvBytes, u8)>(call.args, Payload::Arguments)
        });
        assert!(
            matches!(&wrong, Err(ProtocolError::Decode { message, .. }) if message.contains("of 3 bytes arrived")),
            "{:?}",
            wrong.err()
        );
    }

    #[test]
    fn bulk_bytes_count_against_the_limit() {
        let err = encode_call("x", 0, &(SendBytes(&[0; 100]),), Some(102), 2000, 1000).unwrap_err();
        assert!(matches!(err, ProtocolError::PayloadTooLarge { len, max: 1000, .. } if len > 2000), "{err}");
        assert_eq!(bulk_header(3).unwrap(), [4, 0, 0, 0, Tag::Bulk as u8]);
    }

    #[test]
    fn size_within_stops_at_the_limit() {
        let bytes = (serde_bytes::Bytes::new(&[0; 100]),);
        assert_eq!(size_within(&bytes, Payload::Arguments, 101), Ok(Some(101)));
        assert_eq!(size_within(&bytes, Payload::Arguments, 100), Ok(None));
        // Element by element: 10,000 one-byte varints after a 2-byte length.
        let many = vec![1u32; 10_000];
        assert_eq!(size_within(&many, Payload::Arguments, 10_002), Ok(Some(10_002)));
        assert_eq!(size_within(&many, Payload::Arguments, 10_001), Ok(None));
        assert_eq!(size_within(&(), Payload::Arguments, 0), Ok(Some(0)));
        assert_eq!(
            size_within(&bytes, Payload::Arguments, 101),
            Ok(Some(encoded_size(&bytes, Payload::Arguments).unwrap()))
        );
    }

    #[test]
    fn trailing_bytes_are_a_decode_error() {
        let err = decode::<u8>(&[1, 2], Payload::Arguments).unwrap_err();
        assert!(matches!(err, ProtocolError::Decode { .. }), "{err}");
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;

    struct Refuses;

    impl Serialize for Refuses {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("the user's own words"))
        }
    }

    #[test]
    fn a_users_custom_error_says_its_text_was_dropped() {
        let error = append(&mut Vec::new(), &Refuses, Payload::Arguments).unwrap_err();
        assert!(error.to_string().contains("does not keep its message"), "{error}");
    }
}

#[cfg(test)]
mod fault_tests {
    use super::*;

    #[test]
    fn every_protocol_error_crosses_as_a_fault_and_back() {
        let errors = [
            ProtocolError::Encode { what: Payload::Arguments, message: "a".into() },
            ProtocolError::Decode { what: Payload::ReturnValue, message: "b".into() },
            ProtocolError::PayloadTooLarge { what: Payload::Message, len: 3, max: 2 },
            ProtocolError::FrameTooLarge { len: 5, max: 4 },
            ProtocolError::Invalid("c".into()),
        ];
        for error in errors {
            let mut body = Vec::new();
            append(&mut body, &Fault::from(&error), Payload::Message).unwrap();
            let back: Fault = decode(&body, Payload::Message).unwrap();
            assert_eq!(ProtocolError::from(back), error);
        }
    }
}
