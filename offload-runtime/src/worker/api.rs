//! What `#[offload]` expansions call on the worker side: decode the arguments, encode the
//! return value; and a fault-injection hook for tests. Not public API.

use std::sync::atomic::Ordering;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Payload, ProtocolError};
use crate::protocol::{self, FrameBuf, SendBytes, Tag};

use super::serve::{MAX_PAYLOAD, REPLY_BULK, REPLY_FDS};

/// Decodes an entry's arguments. Not public API: the macro's worker-side code calls it.
pub fn decode_args<T: DeserializeOwned>(input: &[u8]) -> Result<T, ProtocolError> {
    protocol::decode(input, Payload::Arguments)
}

/// Encodes an entry's return value onto the reply, refusing one over the pool's
/// `max_payload` before allocating for it. Not public API.
pub fn encode_return<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let size = protocol::checked_size(value, Payload::ReturnValue, MAX_PAYLOAD.load(Ordering::Relaxed))?;
    out.reserve(size);
    let (appended, fds) = protocol::fds::collecting(|| protocol::append(out, value, Payload::ReturnValue));
    appended?;
    REPLY_FDS.with(|f| *f.borrow_mut() = fds);
    Ok(())
}

/// Encodes a returned byte vector: in the reply if it is short, else in a bulk frame sent
/// before it, from the vector as it is. Not public API.
pub fn encode_return_bytes(value: Vec<u8>, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    if protocol::bulk::inlining() {
        // An item of a batch, decoded as the plain `Vec<u8>` it is: see `protocol::batch`.
        return encode_return(serde_bytes::Bytes::new(&value), out);
    }
    let bulk = protocol::bulk::goes_in_bulk(value.len());
    let max = MAX_PAYLOAD.load(Ordering::Relaxed);
    if bulk && value.len() as u64 > max {
        return Err(ProtocolError::PayloadTooLarge {
            what: Payload::ReturnValue,
            len: value.len() as u64,
            max,
        });
    }
    encode_return(&SendBytes(&value), out)?;
    if bulk {
        REPLY_BULK.with(|b| *b.borrow_mut() = Some(value));
    }
    Ok(())
}

/// Fault injection for tests: writes all of `bytes`, which need not be a frame, onto this worker's
/// channel, as a buggy worker might. The parent then sees a protocol violation, kills the
/// worker and fails the call with `Error::Protocol`. Does nothing outside a worker.
/// Not public API.
pub fn write_garbage_to_channel(bytes: &[u8]) {
    super::serve::send_now(bytes);
}

/// Sends each item of `items` to the caller as the function's iterator yields it, then
/// returns: the stub of a function that streams calls it, and encodes `()` as the reply.
/// Blocks while the caller is too far behind (the channel's socket buffer is full). Stops
/// early, without an error, once the call is cancelled (it timed out or the caller dropped
/// the stream, under `grace`). Not public API.
pub fn stream_items<T: Serialize>(items: impl IntoIterator<Item = T>) -> Result<(), ProtocolError> {
    let max = MAX_PAYLOAD.load(Ordering::Relaxed);
    let mut frame = FrameBuf::new(Tag::Item);
    for item in items {
        let size = protocol::checked_size(&item, Payload::ReturnValue, max)?;
        frame.body().reserve(size);
        let (appended, fds) =
            protocol::fds::collecting(|| protocol::append(frame.body(), &item, Payload::ReturnValue));
        appended?;
        if !fds.is_empty() {
            return Err(ProtocolError::Invalid(
                "a streamed item holds a shared buffer, which cannot be streamed; send its contents".into(),
            ));
        }
        let bytes = frame.finish()?;
        if !super::serve::send_now(&bytes) {
            return Err(ProtocolError::Invalid("the caller is gone".into()));
        }
        if super::cancelled() {
            break;
        }
        frame = FrameBuf::reuse(bytes, Tag::Item);
    }
    Ok(())
}
