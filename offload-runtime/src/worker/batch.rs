//! A batch of calls of one function (`offload::map`): each item runs as a call would, with its
//! own panic caught, and its result goes in one reply; see `protocol::batch`.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::error::{Payload, ProtocolError};
use crate::protocol::batch::{self, Outcome, REPLY_HEAD, Records, ReplyHead};
use crate::protocol::{self, FrameBuf, Tag};
use crate::registry::Invoke;

use super::serve::{MAX_PAYLOAD, REPLY_FDS, Ran, fault_frame, invoke_caught};

/// Runs every item of the batch `body` and builds the reply in `buf`. Stops early, with a
/// shorter reply, when the call is cancelled (its caller gave up on the batch).
pub(super) fn run(invoke: Invoke, body: &[u8], buf: Vec<u8>) -> Vec<u8> {
    let started = Instant::now();
    let mut items = match batch::items(body) {
        Ok(items) => items,
        Err(fault) => return fault_frame(buf, &fault),
    };
    let max = MAX_PAYLOAD.load(Ordering::Relaxed);
    let mut frame = FrameBuf::reuse(buf, Tag::Return);
    let head_at = frame.body().len();
    frame.body().extend_from_slice(&[0; REPLY_HEAD]);
    let mut count = 0u32;
    let mut stopped = false;
    while let Some(args) = items.next_record() {
        let args = match args {
            Ok(args) => args,
            Err(fault) => return fault_frame(frame.into_inner(), &fault),
        };
        let out = frame.body();
        let at = Records::open(out);
        out.push(Outcome::Returned as u8);
        let mut ran = protocol::bulk::inline(|| invoke_caught(invoke, args, out));
        if REPLY_FDS.with(|fds| !std::mem::take(&mut *fds.borrow_mut()).is_empty()) {
            ran = Ran::Faulted(ProtocolError::Invalid(
                "a mapped call returned a shared buffer, which a batch cannot carry; return its \
                 contents, or call the function on its own"
                    .into(),
            ));
        }
        let reply_len = (out.len() - head_at) as u64;
        if matches!(ran, Ran::Returned) && reply_len > max {
            ran = Ran::Faulted(ProtocolError::PayloadTooLarge {
                what: Payload::ReturnValue,
                len: reply_len,
                max,
            });
        }
        match ran {
            Ran::Returned => {}
            Ran::Faulted(fault) => {
                fail(out, at, Outcome::Faulted, &protocol::Fault::from(&fault));
            }
            Ran::Panicked(report) => fail(out, at, Outcome::Panicked, &report),
        }
        Records::close(out, at);
        count += 1;
        if super::cancelled() {
            stopped = true;
            break;
        }
    }
    if !stopped && !items.is_exhausted() {
        return fault_frame(
            frame.into_inner(),
            &ProtocolError::Invalid("trailing bytes after a batch".into()),
        );
    }
    let busy_ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    ReplyHead { pid: std::process::id(), busy_ns, count }.write(&mut frame.body()[head_at..]);
    match frame.finish() {
        Ok(bytes) => bytes,
        Err(too_large) => fault_frame(Vec::new(), &too_large),
    }
}

/// Replaces what the item at `at` wrote with `outcome` and `report`.
fn fail<T: serde::Serialize>(out: &mut Vec<u8>, at: usize, outcome: Outcome, report: &T) {
    Records::abandon(out, at + 4);
    out.push(outcome as u8);
    protocol::append(out, report, Payload::Message).expect("a report always encodes");
}
