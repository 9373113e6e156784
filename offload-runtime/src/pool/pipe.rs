//! Calls sent ahead. When every worker of a pool is busy, a small call may be written to a
//! busy worker's socket behind the call it runs (up to [`MAX_AHEAD`] of them), so that the
//! worker starts each as soon as it has answered the one before, instead of idling for a
//! round trip to the caller and back.
//!
//! Nothing a caller sees changes:
//! - A call sent ahead passes the worker's [`Gate`] before it runs. Until the worker claims
//!   it, the caller can withdraw it exactly; a withdrawn call never runs (the worker reads
//!   its frame and drops it). So a call sent ahead is still a queued call: when a call before
//!   it times out, crashes or is cancelled, and its worker is killed, the call is withdrawn
//!   and looks for a worker again, keeping its place in line ([`Carried`], [`Turn`]); if its
//!   deadline passes first, or its caller drops it, it is withdrawn and never runs (the worker
//!   reads the deadline in the gate too, so a busy caller cannot let it start late).
//! - The worker claims a call only once it has written its reply to the call before (and,
//!   after a reply the caller might reject, once the caller has accepted it; see [`Gate`]).
//!   So when a call ends without its reply (its deadline passed, its caller dropped it) and
//!   its worker has claimed the call behind it, that call was over: its reply is set aside,
//!   and the worker is not killed for it.
//! - A call sent ahead behind a long call moves to a worker that becomes free, and calls go
//!   ahead behind a call that has run for [`LONG_CALL`] only if every worker runs one. Calls
//!   that went ahead before the call in front turned out long go back in line (before the
//!   pool's queue) once it has run for [`MOVE_AFTER`], if another worker is idle or runs a
//!   call that is not long (see [`Pool::move_off_long_calls`]).
//! - A worker due for recycling (`max_tasks`, `max_rss`) or a pool shutting down takes no
//!   more calls ahead, and those it has not claimed look for another worker.
//! - While a call that cannot go ahead waits for a worker, no call goes ahead of it, and the
//!   calls already sent ahead are withdrawn as their worker answers, so that it comes free.
//! - When the call before it ends, its worker passes to it in a [`Handover`], with the call
//!   before's permit, so the pool's figures, `max_tasks` and shutdown count it as the one
//!   call the worker runs. Calls waiting in the pool's queue are sent ahead in their order,
//!   before calls that come later.
//! - A call takes its place behind a busy worker's call (a reservation) before the checks a
//!   call makes when it gets a worker (its deadline, its breaker), and is written there only
//!   once they pass; a call that gives its place back was never sent.
//! - Only small calls go ahead: no shared buffers, no bulk frames, at most [`AHEAD_MAX`]
//!   bytes, so that they are written at once.
//! - Calls sent ahead are written to the worker's socket while fewer than [`WRITE_BELOW`]
//!   wait there; the others wait in the caller, and go together, in writes of at most
//!   [`AHEAD_MAX`] bytes. A call is numbered (see [`Gate`]) as its frame is written: one
//!   taken back before that never reaches the worker at all.

use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio::time::Instant;

use super::{Lease, Pool, lock};
use crate::error::{Failure, ProtocolError};
use crate::gate::{Gate, MAX_AHEAD, Withdrawal};
use crate::stats::{PoolMetrics, RestartCause};

/// The longest call message sent ahead: one that a socket takes whole at once.
pub(crate) const AHEAD_MAX: usize = 16 << 10;

/// Calls sent ahead are written to the worker's socket at once while fewer than this many
/// wait there; the others wait in the caller, and go together when the worker comes near
/// them (see [`Pipe::flush`]). A write per call was a fifth of the caller's time in the
/// throughput bench; and with this many waiting, a worker that ends a call has the next one
/// at hand while the caller takes in the reply.
const WRITE_BELOW: usize = 2;

/// How long a call runs before calls go ahead to other workers first: longer than a short
/// call.
const LONG_CALL: std::time::Duration = std::time::Duration::from_millis(10);

/// How long a call runs before the calls that went ahead behind it, and have not started,
/// go back in line (before the pool's queue), while another worker is idle or runs a call
/// that is not long (see [`Pool::move_off_long_calls`]): a call that went ahead just before
/// the call in front of it turned out long waits about this long for it, not for the whole
/// call. Ten times [`LONG_CALL`], so that calls of about that length do not keep taking
/// calls back.
const MOVE_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// A worker's side for calls sent ahead: its gate, a second handle on its socket to write
/// them while the call before holds the channel, and the calls sent ahead.
pub(crate) struct Pipe {
    gate: Gate,
    writer: UnixStream,
    state: Mutex<PipeState>,
}

#[derive(Default)]
struct PipeState {
    /// Call frames written to the worker so far: the number of the last (see [`Gate`]). A
    /// call sent ahead gets its number only when its frame is written.
    sent: u64,
    /// The number of the call whose reply comes next.
    running: u64,
    /// When that call was sent, or came next (`None` from when the call before ends until
    /// then): calls go ahead behind it only if every other worker has run its call as long
    /// (see [`LONG_CALL`]).
    since: Option<Instant>,
    /// How many calls may wait behind the running one now: none until the running call's
    /// message is whole, nor once the worker is due for recycling (see [`Pipe::retire`]) or
    /// part of a frame went.
    room: usize,
    /// Part of a frame went: nothing more may follow it.
    broken: bool,
    /// The worker goes once the calls it has claimed are over.
    retiring: bool,
    /// Places reserved so far: names each.
    reserved: u64,
    /// Calls taken back as the worker goes, to be told once its replacement has its slot.
    returning: Vec<Behind>,
    /// The calls sent ahead, in the order their replies will come: those written, by number,
    /// then those not written yet, in the order they reserved their places.
    behind: VecDeque<Behind>,
}

impl PipeState {
    fn position(&self, id: u64) -> Option<usize> {
        self.behind.iter().position(|b| b.id == id)
    }

    /// Calls sent ahead whose frames are on the worker's socket (or were read already).
    fn written(&self) -> usize {
        self.behind.iter().filter(|b| b.n.is_some()).count()
    }
}

/// A call sent ahead, as its worker's pipe knows it.
pub(crate) struct Behind {
    /// Its reservation.
    id: u64,
    /// Its number, once its frame is written.
    n: Option<u64>,
    hand: oneshot::Sender<Handover>,
    /// Its caller gave up on it after the worker claimed it (or after part of its frame
    /// went): the worker is killed when it comes to it, unless it is over by then.
    gave_up: Option<RestartCause>,
    /// When its caller gives up on it, once it is written or waits to be.
    deadline: Option<Instant>,
    /// Its call's frame, while it waits in the caller to be written with the next ones (see
    /// [`WRITE_BELOW`]).
    frame: Option<Vec<u8>>,
}

/// What a call sent ahead learns when the calls before it end.
pub(crate) enum Handover {
    /// The worker is the call's: it runs it, or will; or, if its frame was not written yet,
    /// the worker is idle and the call is to be sent to it the ordinary way.
    Lease(Lease),
    /// It was withdrawn before it started: it looks for a worker again, keeping its place
    /// in line if it has a [`Turn`].
    Again(Option<Turn>),
    /// It started, and the worker was lost under it.
    Lost(Failure),
}

/// How a call taken back from a worker keeps its place in line as it looks for a worker
/// again.
pub(crate) enum Turn {
    /// The permit of the worker it was behind, which went away: its replacement is the
    /// call's.
    Permit(OwnedSemaphorePermit),
    /// A place at the front of the pool's line: the next worker's permit freed goes to the
    /// first there, before any call that waits in the pool's queue.
    Line(oneshot::Receiver<OwnedSemaphorePermit>),
}

/// What [`Pipe::take_back`] found.
pub(crate) struct TakenBack {
    /// Calls that will not run: they look for a worker again.
    pub(crate) withdrawn: Vec<Behind>,
    /// The calls the worker claimed: it went on to the first of them, so the call before is
    /// over. Taking back stops at the first unless asked to go through.
    pub(crate) claimed: Vec<Behind>,
}

impl Pipe {
    pub(crate) fn new(gate: Gate, writer: UnixStream) -> Pipe {
        Pipe { gate, writer, state: Mutex::new(PipeState::default()) }
    }

    /// A call's frame goes to the worker the ordinary way: number it. The worker was idle,
    /// so no call waits behind it yet.
    pub(crate) fn sending(&self) {
        let mut state = lock(&self.state);
        debug_assert!(state.behind.is_empty(), "a call sent the ordinary way to a worker with calls queued");
        state.sent += 1;
        state.running = state.sent;
        state.since = Some(Instant::now());
        state.room = 0;
        self.gate.pending(state.sent, None);
    }

    /// The reply to the running call was read whole and is well formed: a worker that waits
    /// for that before it starts the next call may (see [`Gate`]).
    pub(crate) fn accept(&self) {
        let running = lock(&self.state).running;
        self.gate.accept(running);
    }

    /// The worker's channel closed before the running call's reply came: whether the worker
    /// never claimed the call (it died between calls, see [`Gate`]). Then the call is
    /// withdrawn, and never runs.
    pub(crate) fn unstarted(&self) -> bool {
        let running = lock(&self.state).running;
        self.gate.withdraw(running) == Withdrawal::Withdrawn
    }

    /// Settles whether `behind`'s call runs, now that its reply is to come next: `true` if it
    /// does (the worker claimed it, or will even if its deadline passes from now on; or it
    /// was never written); `false` if it never will (its deadline passed: it is withdrawn,
    /// unless the worker withdrew it already), and no reply comes for it.
    pub(crate) fn runs(&self, behind: &Behind) -> bool {
        let Some(n) = behind.n else { return true };
        if behind.deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            self.gate.withdraw(n) == Withdrawal::Claimed
        } else {
            self.gate.firm(n)
        }
    }

    /// The worker passes to `behind`: its reply comes next.
    pub(crate) fn passing_to(&self, behind: &Behind) {
        let mut state = lock(&self.state);
        if let Some(n) = behind.n {
            state.running = n;
        }
        state.since = Some(Instant::now());
    }

    /// How long the running call has run by `now` (as far as the pipe knows: since it was
    /// sent, or came next; not known while the next comes), and how many calls wait behind
    /// it.
    fn running_for(&self, now: Instant) -> (Option<std::time::Duration>, usize) {
        let state = lock(&self.state);
        (state.since.map(|since| now.saturating_duration_since(since)), state.behind.len())
    }

    /// Whether the worker goes once the calls it has claimed are over.
    pub(crate) fn retiring(&self) -> bool {
        lock(&self.state).retiring
    }

    /// The worker goes once the calls it has claimed are over: none goes ahead to it any more.
    pub(crate) fn retire(&self) {
        let mut state = lock(&self.state);
        state.retiring = true;
        state.room = 0;
    }

    /// The running call's message is whole: up to `room` calls may wait behind it (none
    /// when the worker is due for recycling). Says whether one more may go ahead now.
    pub(crate) fn open(&self, room: usize) -> bool {
        let mut state = lock(&self.state);
        state.room = if state.broken || state.retiring { 0 } else { room.min(MAX_AHEAD) };
        state.behind.len() < state.room
    }

    /// The running call ends: the call the worker passes to, if any: the next sent ahead
    /// (or, if none was written yet, the first to have reserved a place, to send its call
    /// the ordinary way; then the others are given back, to look for a worker again). No
    /// call goes ahead until the next call's message is whole.
    pub(crate) fn close(&self, metrics: &PoolMetrics) -> (Option<Behind>, Vec<Behind>) {
        let mut state = lock(&self.state);
        state.room = 0;
        // The calls waiting in the caller go when few are left on the socket: at the latest,
        // before the first of them would come next.
        let mut others =
            if state.written() <= WRITE_BELOW { self.flush(&mut state, metrics) } else { Vec::new() };
        let next = state.behind.pop_front();
        if next.is_some() {
            // Not known until it comes next (see `Pipe::passing_to`): the call that ends is
            // not the one behind which calls wait now.
            state.since = None;
        }
        if next.as_ref().is_some_and(|next| next.n.is_none()) {
            others.extend(state.behind.drain(..));
        }
        (next, others)
    }

    /// Takes back the calls sent ahead, in their order: each one the worker has not claimed
    /// is withdrawn. Stops at the first it claimed (the calls after it stay queued behind
    /// it), unless `through`. No call goes ahead any more until the next call's message is
    /// whole. For a call that ended without its reply: front first, because what matters is
    /// whether the worker went past that call, which the first claimed call behind it says;
    /// [`Pipe::unclaimed`] goes last first, keeping the calls the worker has started.
    pub(crate) fn take_back(&self, through: bool) -> TakenBack {
        let mut state = lock(&self.state);
        state.room = 0;
        let mut taken = TakenBack { withdrawn: Vec::new(), claimed: Vec::new() };
        while let Some(behind) = state.behind.pop_front() {
            let claimed = match (behind.n, behind.gave_up) {
                (None, _) => false,
                // Part of its frame went: the worker never reads it whole.
                (Some(_), Some(RestartCause::Protocol)) => false,
                // Given up on once the worker had claimed it.
                (Some(_), Some(_)) => true,
                (Some(n), None) => self.gate.withdraw(n) == Withdrawal::Claimed,
            };
            if claimed {
                taken.claimed.push(behind);
                if !through {
                    break;
                }
            } else {
                taken.withdrawn.push(behind);
            }
        }
        taken
    }

    /// Calls that cannot go ahead wait for a worker: the calls sent ahead here that the
    /// worker has not claimed are withdrawn (see [`Pipe::unclaimed`]), so that it comes free
    /// sooner; they look for a worker again. Says how many of them had been sent.
    pub(crate) fn give_way(&self) -> usize {
        let withdrawn = self.unclaimed();
        let sent = withdrawn.iter().filter(|b| b.n.is_some()).count();
        for behind in withdrawn {
            drop(behind.hand.send(Handover::Again(None)));
        }
        sent
    }

    /// Withdraws the calls sent ahead here that the worker has not claimed, last first (the
    /// calls it claimed come first: it claims them in order), and returns them in their
    /// order. No call goes ahead until the next call's message is whole.
    pub(crate) fn unclaimed(&self) -> Vec<Behind> {
        self.unclaimed_in(&mut lock(&self.state))
    }

    /// [`Pipe::unclaimed`], if the running call has run for [`MOVE_AFTER`] by `now`: looked
    /// at again under the pipe's lock, since that call may have ended, and the next come,
    /// since it was last looked at.
    fn unclaimed_behind_long(&self, now: Instant) -> Vec<Behind> {
        let mut state = lock(&self.state);
        let long = state.since.is_some_and(|since| now.saturating_duration_since(since) >= MOVE_AFTER);
        if !long || state.behind.is_empty() {
            return Vec::new();
        }
        self.unclaimed_in(&mut state)
    }

    fn unclaimed_in(&self, state: &mut PipeState) -> Vec<Behind> {
        state.room = 0;
        let mut withdrawn = Vec::new();
        let mut partial = None;
        while let Some(behind) = state.behind.pop_back() {
            let taken = match (behind.n, behind.gave_up) {
                (None, _) => true,
                // Part of its frame went: the worker never claims it, and it stays (the
                // worker is ended when it comes to it).
                (Some(_), Some(RestartCause::Protocol)) => {
                    partial = Some(behind);
                    continue;
                }
                (Some(n), None) => self.gate.withdraw(n) == Withdrawal::Withdrawn,
                // Given up on after it started: it stays, and so do those before it.
                (Some(_), Some(_)) => false,
            };
            if !taken {
                state.behind.push_back(behind);
                break;
            }
            withdrawn.push(behind);
        }
        state.behind.extend(partial);
        withdrawn.reverse();
        withdrawn
    }

    /// Keeps `behinds`, taken back as the worker goes, until [`Pipe::take_returning`].
    pub(crate) fn returning(&self, behinds: Vec<Behind>) {
        lock(&self.state).returning.extend(behinds);
    }

    /// The calls taken back as the worker goes, kept by [`Pipe::returning`].
    pub(crate) fn take_returning(&self) -> Vec<Behind> {
        std::mem::take(&mut lock(&self.state).returning)
    }

    /// Reserves a place behind the running call (and the calls sent ahead already), if the
    /// worker takes one more now: the reservation, where its worker will be handed, and
    /// whether the worker takes yet another after it.
    fn reserve(&self) -> Option<(u64, oneshot::Receiver<Handover>, bool)> {
        let mut state = lock(&self.state);
        if state.behind.len() >= state.room {
            return None;
        }
        state.reserved += 1;
        let (hand, handed) = oneshot::channel();
        let id = state.reserved;
        state.behind.push_back(Behind { id, n: None, hand, gave_up: None, deadline: None, frame: None });
        Some((id, handed, state.behind.len() < state.room))
    }

    /// Puts reservation `id`'s `message` in its place; it is not to start after `deadline`
    /// (see [`Gate::pending`]). It is written to the worker now if few calls wait on its
    /// socket, or later, with the calls after it (see [`WRITE_BELOW`]); numbered as it is
    /// written. `Ok(true)`: in its place. `Ok(false)`: the place is gone (the calls before
    /// ended, or it could not be written now and is among the calls returned, to go back in
    /// line), and word is on its way. `Err`: the pipe takes no more calls, and the place is
    /// given back; or only part of it went, and the worker is ended when it comes to it.
    fn write(
        &self,
        id: u64,
        message: &[&[u8]],
        deadline: Instant,
        metrics: &PoolMetrics,
    ) -> (Result<bool, ()>, Vec<Behind>) {
        let mut state = lock(&self.state);
        let Some(at) = state.position(id) else { return (Ok(false), Vec::new()) };
        if state.broken {
            state.behind.remove(at);
            return (Err(()), Vec::new());
        }
        let behind = &mut state.behind[at];
        behind.frame = Some(message.concat());
        behind.deadline = Some(deadline);
        let given_back =
            if state.written() < WRITE_BELOW { self.flush(&mut state, metrics) } else { Vec::new() };
        let done = match state.position(id).map(|at| &state.behind[at]) {
            Some(behind) if !behind.partly_sent() => Ok(true),
            Some(_) => Err(()),
            // Given back with the calls after it (the socket was full, or the worker gone):
            // word is on its way, with its place in line.
            None => Ok(false),
        };
        (done, given_back)
    }

    /// Writes the frames of the calls that wait in the caller, numbering them in their order:
    /// as many at a time as make at most [`AHEAD_MAX`] bytes, which a socket takes whole or
    /// not at all. The calls whose frames could not go (the socket is full, the worker gone,
    /// the gate's ring full) are returned, to look for a worker again, keeping their place in
    /// line ([`Pool::back_in_line`], once the pipe's lock is let go); no call goes ahead here
    /// then until the next call's message is whole. Should a write still stop inside a frame,
    /// that call is given back too, and stays: nothing more may follow it, and the worker is
    /// ended when it comes to it.
    #[must_use = "the calls given back must look for a worker again"]
    fn flush(&self, state: &mut PipeState, metrics: &PoolMetrics) -> Vec<Behind> {
        // Taken out in their order; those written go back ahead of the calls not written.
        let mut waiting = VecDeque::new();
        let mut at = 0;
        while at < state.behind.len() {
            if state.behind[at].frame.is_some() {
                waiting.push_back(state.behind.remove(at).expect("in range"));
            } else {
                at += 1;
            }
        }
        let mut place = state.behind.iter().position(|b| b.n.is_none()).unwrap_or(state.behind.len());
        while !waiting.is_empty() && !state.broken {
            // Calls sent and taken back behind a long call fill the gate's ring: those past it
            // do not go.
            let mut batch = 0;
            let mut bytes = 0;
            for behind in &waiting {
                let len = behind.frame.as_ref().expect("waiting").len();
                let fits = Gate::fits(state.sent + batch as u64 + 1, state.running);
                if !fits || (batch > 0 && bytes + len > AHEAD_MAX) {
                    break;
                }
                batch += 1;
                bytes += len;
            }
            if batch == 0 {
                break;
            }
            for (k, behind) in (1..).zip(waiting.iter().take(batch)) {
                let deadline = behind.deadline.expect("set with its frame");
                self.gate.pending(state.sent + k, Some(deadline.into_std()));
            }
            let frames: Vec<&[u8]> =
                waiting.iter().take(batch).map(|behind| behind.frame.as_deref().expect("waiting")).collect();
            let sent =
                crate::socket::send_with_fds(&self.writer, &frames, 0, &[], rustix::net::SendFlags::DONTWAIT);
            let mut written = sent.unwrap_or(0);
            if written == 0 {
                break;
            }
            while written > 0 {
                let mut behind = waiting.pop_front().expect("no more written than the batch");
                let len = behind.frame.take().expect("waiting").len();
                state.sent += 1;
                behind.n = Some(state.sent);
                if written < len {
                    // The rest cannot follow now, and the worker would wait for it: nothing
                    // can take part of a frame back, and nothing may follow it. Its call
                    // looks for a worker again; it stays, to end the worker when it comes to
                    // it.
                    written = 0;
                    behind.gave_up = Some(RestartCause::Protocol);
                    state.broken = true;
                    let (stays, _) = oneshot::channel();
                    drop(std::mem::replace(&mut behind.hand, stays).send(Handover::Again(None)));
                } else {
                    written -= len;
                    metrics.sent_ahead();
                }
                // Its reply comes after those of the calls written before it.
                state.behind.insert(place, behind);
                place += 1;
            }
        }
        if !waiting.is_empty() || state.broken {
            // The socket is full, or the worker is gone (the running call finds out): no call
            // goes ahead here until the next call's message is whole.
            state.room = 0;
        }
        waiting
            .into_iter()
            .map(|mut behind| {
                behind.frame = None;
                behind
            })
            .collect()
    }

    /// Takes reservation `id` back if it is still queued here and the worker has not
    /// claimed its call: then it never runs. Says whether its frame had been written.
    fn withdraw(&self, id: u64, pool: &Pool) -> Option<bool> {
        let mut state = lock(&self.state);
        let at = state.position(id)?;
        let behind = &state.behind[at];
        match behind.n {
            Some(n) if behind.gave_up.is_some() || self.gate.withdraw(n) == Withdrawal::Claimed => None,
            n => {
                state.behind.remove(at);
                // The calls waiting in the caller take its place on the socket.
                if n.is_some() && state.written() < WRITE_BELOW {
                    let given_back = self.flush(&mut state, &pool.metrics);
                    drop(state);
                    pool.back_in_line(given_back, None);
                }
                Some(n.is_some())
            }
        }
    }

    /// Marks reservation `id` as given up by its caller after its call started: its worker
    /// is killed when it comes to it, unless it is over by then. `false` if it was taken
    /// off the pipe already.
    fn give_up(&self, id: u64, cause: RestartCause) -> bool {
        let mut state = lock(&self.state);
        match state.position(id) {
            Some(at) => {
                // A call only part of whose frame went stays marked so: the worker is ended
                // when it comes to it, whatever became of the call.
                state.behind[at].gave_up.get_or_insert(cause);
                true
            }
            None => false,
        }
    }
}

impl Behind {
    /// Whether its caller gave up on it, and why.
    pub(crate) fn gave_up(&self) -> Option<RestartCause> {
        self.gave_up
    }

    /// Whether only part of its frame went: its call already looks for another worker.
    pub(crate) fn partly_sent(&self) -> bool {
        self.gave_up == Some(RestartCause::Protocol)
    }

    /// Whether its frame went whole to the worker: it was sent ahead, and is counted as
    /// withdrawn if it is taken back.
    pub(crate) fn was_sent(&self) -> bool {
        self.n.is_some() && self.gave_up.is_none()
    }

    /// Tells it how it goes on. If nobody waits for it any more, a worker handed to it is
    /// ended: it runs, or will run, a call nobody wants (or, if the call was never written,
    /// the lease's end puts it back; see `Ahead`'s drop).
    pub(crate) fn hand(self, handover: Handover) {
        drop(self.hand.send(handover));
    }
}

/// A call sent ahead to a busy worker, waiting for the call before it to end.
pub(crate) struct Ahead {
    pool: Arc<Pool>,
    pipe: Arc<Pipe>,
    pid: u32,
    /// Its reservation on the pipe.
    id: u64,
    handed: oneshot::Receiver<Handover>,
    /// Its place in a bounded queue, kept until it has its worker.
    admitted: Option<OwnedSemaphorePermit>,
    /// Its frame is the pipe's: written to the worker, or waiting in the caller to be, and
    /// written before its turn comes (see [`Pipe::flush`]).
    written: bool,
    settled: bool,
    /// What it keeps of its place in line when it is withdrawn (see [`Ahead::carried`]).
    carried: Option<Carried>,
}

/// What a call withdrawn from a worker it was sent ahead to keeps of its place in line as it
/// looks for a worker again: its place in a bounded queue, and its turn for a worker.
#[derive(Default)]
pub(crate) struct Carried {
    pub(super) turn: Option<Turn>,
    pub(super) admitted: Option<OwnedSemaphorePermit>,
}

/// What [`Ahead::start`] did.
pub(crate) enum Start {
    /// The call has its place behind the running one, its frame written to the worker or
    /// waiting in the caller to be (see [`Pipe::flush`]): this many bytes, all of which go.
    Written(usize),
    /// The call before ended first: the worker is idle and the call's, to send it to.
    Handed(Box<Lease>),
    /// It could not go: it looks for a worker again.
    NotSent,
}

/// How a call sent ahead ended when its caller gave up on it.
pub(crate) enum GaveUp {
    /// It was withdrawn: it never runs.
    Withdrawn,
    /// It runs or ran; the worker, if it has come, is to be ended.
    Started(Option<Box<Lease>>),
}

impl Ahead {
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// After [`Ahead::turn`] said [`Handover::Again`]: what the call keeps of its place in
    /// line, for its next [`Pool::acquire`].
    pub(crate) fn carried(&mut self) -> Carried {
        self.carried.take().unwrap_or_default()
    }

    /// Puts the call in its place behind the running call, to be written now or with the
    /// calls after it (see [`Pipe::write`]); its `deadline` goes with it (the worker does not
    /// start it after that).
    pub(crate) fn start(&mut self, message: &[&[u8]], deadline: Instant) -> Start {
        let (written, given_back) = self.pipe.write(self.id, message, deadline, &self.pool.metrics);
        self.pool.back_in_line(given_back, None);
        match written {
            Ok(true) => {
                self.written = true;
                return Start::Written(message.iter().map(|part| part.len()).sum());
            }
            Err(()) => {
                self.settled = true;
                self.carried = Some(Carried { turn: None, admitted: self.admitted.take() });
                return Start::NotSent;
            }
            Ok(false) => {}
        }
        // The call before ended first and took the place off the pipe: word is on its way.
        self.settled = true;
        match self.handed_now() {
            Ok(Handover::Lease(mut lease)) => {
                lease.permits.as_mut().expect("a lease holds its permits").1 = self.admitted.take();
                Start::Handed(Box::new(lease))
            }
            Ok(Handover::Again(turn)) => {
                // Given back before it was written: it keeps its place in line.
                self.carried = Some(Carried { turn, admitted: self.admitted.take() });
                Start::NotSent
            }
            _ => Start::NotSent,
        }
    }

    /// The word the call before sent, once it has taken this call's place off the pipe.
    /// It sends it at once, in the same stretch of code (on another thread, where the
    /// runtime has several): wait for it rather than take "not yet" for an answer.
    fn handed_now(&mut self) -> Result<Handover, oneshot::error::TryRecvError> {
        loop {
            match self.handed.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => std::thread::yield_now(),
                other => return other,
            }
        }
    }

    /// Waits until the call before ends: then the worker is this call's, or the call was
    /// withdrawn and must look for a worker again. While it waits, a worker of the pool
    /// that becomes free takes it instead (it is withdrawn here to go there).
    pub(crate) async fn turn(&mut self) -> Handover {
        // Until the worker claims the call: then it stays, and a free worker is another's.
        let mut may_move = true;
        let handed = loop {
            let mut idle = std::pin::pin!(self.pool.idle.notified());
            idle.as_mut().enable();
            if may_move && self.pool.permits.available_permits() > 0 {
                if let Some(written) = self.pipe.withdraw(self.id, &self.pool) {
                    self.settled = true;
                    if written {
                        self.pool.metrics.withdrawn();
                    }
                    self.carried = Some(Carried { turn: None, admitted: self.admitted.take() });
                    return Handover::Again(None);
                }
                // Claimed: the free worker is for another call sent ahead.
                may_move = false;
                self.pool.idle.notify_one();
            }
            let handed = std::future::poll_fn(|cx| match std::pin::Pin::new(&mut self.handed).poll(cx) {
                Poll::Ready(handed) => Poll::Ready(Some(handed)),
                Poll::Pending if may_move => idle.as_mut().poll(cx).map(|()| None),
                Poll::Pending => Poll::Pending,
            })
            .await;
            if let Some(handed) = handed {
                break handed;
            }
        };
        self.settled = true;
        match handed {
            Ok(Handover::Lease(mut lease)) => {
                lease.permits.as_mut().expect("a lease holds its permits").1 = self.admitted.take();
                Handover::Lease(lease)
            }
            Ok(Handover::Again(turn)) => {
                self.carried = Some(Carried { turn, admitted: self.admitted.take() });
                Handover::Again(None)
            }
            Ok(other) => other,
            Err(_) => Handover::Lost(Failure::Broken(ProtocolError::Invalid(
                "the call before this one on its worker ended without a word".into(),
            ))),
        }
    }

    /// Its caller gives up on it (its deadline passed, its breaker opened, or its future was
    /// dropped).
    pub(crate) fn give_up(mut self, cause: RestartCause) -> GaveUp {
        self.settled = true;
        self.abandon(cause)
    }

    fn abandon(&mut self, cause: RestartCause) -> GaveUp {
        if let Some(written) = self.pipe.withdraw(self.id, &self.pool) {
            if written {
                self.pool.metrics.withdrawn();
            }
            return GaveUp::Withdrawn;
        }
        if self.written && self.pipe.give_up(self.id, cause) {
            return GaveUp::Started(None);
        }
        // The call before ended and took this call off the pipe: a worker that runs it (or,
        // if it was never written, an idle one), or word that it was withdrawn or lost.
        match self.handed_now() {
            Ok(Handover::Lease(lease)) if !self.written => {
                lease.release_unused();
                GaveUp::Withdrawn
            }
            Ok(Handover::Lease(lease)) => GaveUp::Started(Some(Box::new(lease))),
            Ok(Handover::Again(turn)) => {
                if let Some(Turn::Permit(permit)) = turn {
                    // Its worker's permit, which it will not use: to the next call in line.
                    self.pool.free_permit(permit);
                }
                GaveUp::Withdrawn
            }
            Ok(Handover::Lost(_)) | Err(_) => GaveUp::Started(None),
        }
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        self.pool.waiting.fetch_sub(1, Ordering::Relaxed);
        if !self.settled {
            // A worker handed to a call that started, and that nobody wants now, is ended
            // with the lease dropped here.
            drop(self.abandon(RestartCause::Abandoned));
        }
    }
}

impl Pool {
    /// Reserves a place behind a busy worker's call that takes one, if there is one and no
    /// call that cannot go ahead waits for a worker.
    pub(super) fn reserve_ahead(
        self: &Arc<Self>,
        admitted: &mut Option<OwnedSemaphorePermit>,
    ) -> Option<Ahead> {
        if self.plain_waiting.load(Ordering::Relaxed) > 0 || self.in_line.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let now = Instant::now();
        if self.move_off_long_calls(Some(now)) {
            // They go first.
            return None;
        }
        let mut open = lock(&self.open_pipes);
        if self.is_closed() {
            return None;
        }
        // The worker with the fewest calls waiting, so that they spread; behind a long call
        // only if every worker runs one.
        let (pid, pipe, (id, handed, more), at) = loop {
            let (long, _, at) = open
                .iter()
                .enumerate()
                .map(|(at, (_, pipe))| {
                    let (ran, behind) = pipe.running_for(now);
                    (ran.is_some_and(|ran| ran >= LONG_CALL), behind, at)
                })
                .min()?;
            if long && self.short_elsewhere(now) {
                // A worker that takes no call ahead now runs a short call: it will take one
                // (see `opened`), or come free, sooner.
                return None;
            }
            match open[at].1.reserve() {
                Some(reserved) => break (open[at].0, Arc::clone(&open[at].1), reserved, at),
                // It takes no more now: it is listed again when it does.
                None => drop(open.swap_remove(at)),
            }
        };
        if !more {
            open.swap_remove(at);
        }
        drop(open);
        if more {
            // The turn to go ahead passes to the next call that waits for one.
            self.opened.notify_one();
        }
        // Counted as waiting until it has its worker; its drop uncounts it.
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Some(Ahead {
            pool: Arc::clone(self),
            pipe,
            pid,
            id,
            handed,
            admitted: admitted.take(),
            written: false,
            settled: false,
            carried: None,
        })
    }
}

impl Pool {
    /// Calls that went ahead behind a call that has run for [`MOVE_AFTER`], and that its
    /// worker has not claimed, are taken back, into the pool's line (see [`Turn::Line`]), if
    /// another worker is idle, comes free, or runs a call that is not long (see
    /// [`LONG_CALL`]): the workers that come free take them, in their order, before any call
    /// of the pool's queue, and no call goes ahead until they have. Looked at, at most once
    /// per [`LONG_CALL`], as a call looks for a place ahead (at `now`, when it read the
    /// clock) and as a worker comes free (`None`: no call looks, the clock is read here if
    /// any call waits). Whether any moved: then they go before the call that looked.
    pub(super) fn move_off_long_calls(&self, now: Option<Instant>) -> bool {
        let freeing = now.is_none();
        if freeing && self.waiting.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let now = now.unwrap_or_else(Instant::now);
        let at = u64::try_from(now.saturating_duration_since(self.born).as_millis()).unwrap_or(u64::MAX);
        let due = self.next_move_check.load(Ordering::Relaxed);
        // Put off only by a look that could have moved calls: one that found no better place
        // for them does not keep a worker that comes free from looking.
        if at < due || (!freeing && !self.short_elsewhere(now)) {
            return false;
        }
        let next = at.saturating_add(LONG_CALL.as_millis() as u64);
        if self.next_move_check.compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return false;
        }
        let pipes: Vec<Arc<Pipe>> = lock(&self.leased).values().cloned().collect();
        let mut moved = false;
        for pipe in pipes {
            if let (Some(ran), behind) = pipe.running_for(now)
                && ran >= MOVE_AFTER
                && behind > 0
            {
                let taken = pipe.unclaimed_behind_long(now);
                moved |= !taken.is_empty();
                self.back_in_line(taken, None);
            }
        }
        moved
    }

    /// Whether a worker is idle, or runs a call that has not run for [`LONG_CALL`] by `now`:
    /// a better place for a call than behind a long one.
    fn short_elsewhere(&self, now: Instant) -> bool {
        self.permits.available_permits() > 0
            || lock(&self.leased)
                .values()
                .any(|pipe| pipe.running_for(now).0.is_some_and(|ran| ran < LONG_CALL))
    }

    /// Calls taken back from a worker look for a worker again, keeping their place in line:
    /// the first with `permit`, if there is one; the others, in their order, at the front of
    /// the pool's line (see [`Turn::Line`]). Those that had been sent count as withdrawn.
    pub(super) fn back_in_line(
        &self,
        behinds: impl IntoIterator<Item = Behind>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let mut permit = permit.filter(|p| p.num_permits() > 0);
        let mut behinds = behinds.into_iter().peekable();
        if permit.is_none() && behinds.peek().is_none() {
            return;
        }
        {
            let mut line = lock(&self.line);
            // Checked under the line's lock, which shutdown takes to empty it once closed.
            let closed = self.is_closed();
            // A call only part of whose frame went looks for a worker already.
            for behind in behinds.filter(|b| !b.partly_sent()) {
                if behind.was_sent() {
                    self.metrics.withdrawn();
                }
                let turn = match permit.take() {
                    // Refused as it looks for a worker, as a queued call is.
                    _ if closed => {
                        behind.hand(Handover::Again(None));
                        continue;
                    }
                    Some(permit) => Turn::Permit(permit),
                    None => {
                        let (give, take) = oneshot::channel();
                        line.push_back(give);
                        Turn::Line(take)
                    }
                };
                behind.hand(Handover::Again(Some(turn)));
            }
            self.in_line.store(line.len(), Ordering::Relaxed);
        }
        // Workers idle now take calls from the line at once.
        while self.in_line.load(Ordering::Relaxed) > 0 {
            let Ok(free) = Arc::clone(&self.permits).try_acquire_owned() else { break };
            if let Some(free) = self.pass_permit(free) {
                drop(free);
                break;
            }
        }
    }

    /// A worker's permit that no call uses any more: to the first call in the pool's line,
    /// or back to the pool, where a call sent ahead behind a long call may take it.
    pub(crate) fn free_permit(&self, permit: OwnedSemaphorePermit) {
        if permit.num_permits() > 0 {
            // A worker comes free: calls that wait behind a call elsewhere that turned out
            // long may take it, before any other.
            self.move_off_long_calls(None);
        }
        if let Some(permit) = self.pass_permit(permit) {
            drop(permit);
            self.idle.notify_one();
        }
    }

    /// A worker's permit, freed: it goes to the first call in the pool's line, if one waits
    /// there; else it is given back.
    pub(super) fn pass_permit(&self, permit: OwnedSemaphorePermit) -> Option<OwnedSemaphorePermit> {
        if permit.num_permits() == 0 || self.in_line.load(Ordering::Relaxed) == 0 {
            return Some(permit);
        }
        let mut line = lock(&self.line);
        if self.is_closed() {
            return Some(permit);
        }
        let mut permit = Some(permit);
        while let Some(give) = line.pop_front() {
            // An error gives it back: the call was given up on.
            match give.send(permit.take().expect("held until passed")) {
                Ok(()) => break,
                Err(back) => permit = Some(back),
            }
        }
        self.in_line.store(line.len(), Ordering::Relaxed);
        if line.is_empty() {
            // Calls may go ahead again: to a busy worker that took one when they last could.
            self.opened.notify_one();
        }
        permit
    }
}

/// Whether a call's message may go ahead: small, with no descriptors.
pub(crate) fn may_go_ahead(message: &[&[u8]], fds: &[OwnedFd]) -> bool {
    fds.is_empty() && message.len() == 1 && message[0].len() <= AHEAD_MAX
}
