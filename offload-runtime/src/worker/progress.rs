//! Progress reports from the running call: [`progress`] sends one to the caller now and then
//! (at most about every 20 ms, and always the one that says the work is done), so calling it
//! on every step of a hot loop costs next to nothing. The caller sees them with
//! `offload::with_progress`.

use std::cell::Cell;
use std::time::{Duration, Instant};

use crate::error::Payload;
use crate::protocol::{self, FrameBuf, ProgressReport, Tag};

/// Reports sent closer together than this are skipped, but for the last one.
const INTERVAL: Duration = Duration::from_millis(20);
/// Between reports, the clock is read only every this many calls.
const CALLS_PER_CLOCK_READ: u32 = 64;

thread_local! {
    /// When the running call last sent a report, and the calls since the clock was read.
    static LAST: Cell<(Option<Instant>, u32)> = const { Cell::new((None, 0)) };
}

/// Reports that the running offloaded call has done `done` of `total` units of work. Cheap:
/// most calls only count; a report goes to the caller at most about every 20 ms, and always
/// when `done` reaches `total`. Does nothing outside a worker, or outside a call (in a state
/// builder). A thread the function starts may report too, while the call runs.
pub fn progress(done: u64, total: u64) {
    report(done, total, None::<fn() -> String>);
}

/// [`progress`], with a message. `message` is only called when a report is sent.
pub fn progress_message<M: Into<String>>(done: u64, total: u64, message: impl FnOnce() -> M) {
    report(done, total, Some(|| message().into()));
}

fn report(done: u64, total: u64, message: Option<impl FnOnce() -> String>) {
    // Outside a call (in a state builder, or a thread that outlived its call) a report
    // would belong to no call.
    if !crate::role::is_worker() || !super::serve::in_call() {
        return;
    }
    let due = LAST.with(|last| {
        let (sent, calls) = last.get();
        let finished = done >= total;
        if !finished && sent.is_some() && calls + 1 < CALLS_PER_CLOCK_READ {
            last.set((sent, calls + 1));
            return false;
        }
        let now = Instant::now();
        let due = finished || sent.is_none_or(|at| now.duration_since(at) >= INTERVAL);
        last.set((if due { Some(now) } else { sent }, 0));
        due
    });
    if !due {
        return;
    }
    let report = ProgressReport { done, total, message: message.map(|m| m()) };
    let mut frame = FrameBuf::new(Tag::Progress);
    if protocol::append(frame.body(), &report, Payload::Message).is_ok()
        && let Ok(frame) = frame.finish()
    {
        super::serve::send_now(&frame);
    }
}

/// A call begins: its first report goes out at once.
pub(super) fn reset() {
    LAST.with(|last| last.set((None, 0)));
}
