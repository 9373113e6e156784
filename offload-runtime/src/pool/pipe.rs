//! Calls sent ahead. When every worker of a pool is busy, a small call may be written to a
//! busy worker's socket behind the call it runs (one at most), so that the worker starts it
//! as soon as it has answered, instead of idling for a round trip to the caller and back.
//!
//! Nothing a caller sees changes:
//! - A call sent ahead passes the worker's [`Gate`] before it runs. Until the worker claims
//!   it, the caller can withdraw it exactly; a withdrawn call never runs (the worker reads
//!   its frame and drops it). So a call sent ahead is still a queued call: when the call
//!   before it times out, crashes or is cancelled, and its worker is killed, the call is
//!   withdrawn and looks for a worker again, keeping its place in line ([`Carried`]); if its
//!   deadline passes first, or its caller drops it, it is withdrawn and never runs.
//! - A call sent ahead behind a long call moves to a worker that becomes free.
//! - While a call that cannot go ahead waits for a worker, no call goes ahead of it.
//! - When the call before it ends, its worker passes to it in a [`Handover`], with the call
//!   before's permit, so the pool's figures, `max_tasks` and shutdown count it as the one
//!   call the worker runs. Calls waiting in the pool's queue are sent ahead in their order,
//!   before calls that come later.
//! - A call takes its place behind a busy worker's call (a reservation) before the checks a
//!   call makes when it gets a worker (its deadline, its breaker), and is written there only
//!   once they pass; a call that gives its place back was never sent.
//! - Only small calls go ahead: no shared buffers, no bulk frames, at most [`AHEAD_MAX`]
//!   bytes, so that they are written at once.

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
use crate::gate::{Gate, Withdrawal};
use crate::stats::RestartCause;

/// The longest call message sent ahead: one that a socket takes whole at once.
pub(crate) const AHEAD_MAX: usize = 16 << 10;

/// A worker's side for calls sent ahead: its gate, a second handle on its socket to write
/// them while the call before holds the channel, and the call sent ahead, if any.
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
    /// The number of the call the worker runs, or ran last.
    running: u64,
    /// The running call's message is written whole, and the worker takes one more behind
    /// it (it is not due for recycling after the running call).
    open: bool,
    /// Places reserved so far: names each.
    reserved: u64,
    behind: Option<Behind>,
    /// A call sent ahead and taken back before the worker had decided the call before it:
    /// withdrawn in the gate before the next acceptance (see [`Withdrawal::Undecided`]).
    veto: Option<u64>,
}

impl PipeState {
    /// Makes a pending withdrawal in the gate, before anything is accepted: the worker has
    /// decided the call before it by then (its reply is in), so it cannot fail.
    fn apply_veto(&mut self, gate: &Gate) {
        if let Some(n) = self.veto.take() {
            let done = gate.withdraw(n);
            debug_assert_eq!(done, Withdrawal::Withdrawn, "call {n} was started before the veto");
        }
    }

    /// Takes call `n` back in the gate, now or before the next acceptance; whether it will
    /// not run.
    fn take_back(&mut self, gate: &Gate, n: u64) -> bool {
        match gate.withdraw(n) {
            Withdrawal::Withdrawn => true,
            Withdrawal::Undecided => {
                self.veto = Some(n);
                true
            }
            Withdrawal::Claimed => false,
        }
    }
}

/// The call sent ahead, as its worker's pipe knows it.
pub(crate) struct Behind {
    /// Its reservation.
    id: u64,
    /// Its number, once its frame is written.
    n: Option<u64>,
    hand: oneshot::Sender<Handover>,
    /// When its caller gives up on it: it is not started after that.
    deadline: Option<Instant>,
    /// Its caller gave up on it after the worker claimed it (or after part of its frame
    /// went): the worker is killed when the call before it ends.
    gave_up: Option<RestartCause>,
}

/// What a call sent ahead learns when the call before it ends.
pub(crate) enum Handover {
    /// The worker is the call's: it runs it, or will; or, if its frame was not written yet,
    /// the worker is idle and the call is to be sent to it the ordinary way.
    Lease(Lease),
    /// It was withdrawn before it started: it looks for a worker again, keeping its place
    /// in line: with the permit of the worker it was behind, if that worker went away.
    Again(Option<OwnedSemaphorePermit>),
    /// It started, and the worker was lost under it.
    Lost(Failure),
}

impl Pipe {
    pub(crate) fn new(gate: Gate, writer: UnixStream) -> Pipe {
        Pipe { gate, writer, state: Mutex::new(PipeState::default()) }
    }

    /// A call's frame goes to the worker the ordinary way: count it. The worker was idle, so
    /// the call before is over: accepted, if nobody said so yet.
    pub(crate) fn sending(&self) {
        let previous = {
            let mut state = lock(&self.state);
            state.apply_veto(&self.gate);
            let previous = state.running;
            state.sent += 1;
            state.running = state.sent;
            state.open = false;
            previous
        };
        self.gate.accept(previous);
    }

    /// The reply to the running call was read whole and is well formed: the worker may
    /// start the call behind it. A call behind that must not start any more (its deadline
    /// passed, or `yield_to_others`: calls that cannot go ahead wait for this worker) is
    /// withdrawn first; says whether one was.
    pub(crate) fn accept(&self, yield_to_others: bool) -> bool {
        let (running, withdrawn) = {
            let mut state = lock(&self.state);
            state.apply_veto(&self.gate);
            let late = |b: &Behind| yield_to_others || b.deadline.is_some_and(|d| Instant::now() >= d);
            let withdrawn = match state.behind.as_ref() {
                Some(b) if b.gave_up.is_none() && b.n.is_some() && late(b) => {
                    // The worker claims it only after the acceptance below: this cannot fail.
                    let n = b.n.expect("checked");
                    if state.take_back(&self.gate, n) { state.behind.take() } else { None }
                }
                _ => None,
            };
            (state.running, withdrawn)
        };
        self.gate.accept(running);
        match withdrawn {
            Some(behind) => {
                drop(behind.hand.send(Handover::Again(None)));
                true
            }
            None => false,
        }
    }

    /// The running call's message is whole: with `accepting`, the worker may take a call
    /// ahead. Says whether it does.
    pub(crate) fn open(&self, accepting: bool) -> bool {
        let mut state = lock(&self.state);
        state.open = accepting && state.behind.is_none();
        state.open
    }

    /// The running call ends: no call goes ahead any more; the one that did, if any.
    pub(crate) fn close(&self) -> Option<Behind> {
        let mut state = lock(&self.state);
        state.open = false;
        state.behind.take()
    }

    /// Reserves the place behind the running call, if the worker takes a call ahead now:
    /// the reservation, and where its worker will be handed.
    fn reserve(&self) -> Option<(u64, oneshot::Receiver<Handover>)> {
        let mut state = lock(&self.state);
        if !state.open || state.behind.is_some() {
            return None;
        }
        state.open = false;
        state.reserved += 1;
        let (hand, handed) = oneshot::channel();
        state.behind = Some(Behind { id: state.reserved, n: None, hand, deadline: None, gave_up: None });
        Some((state.reserved, handed))
    }

    /// Writes reservation `id`'s `message` into its place, and numbers it. `Ok(true)`:
    /// written whole. `Ok(false)`: the place is gone (the call before ended, and sends word).
    /// `Err`: nothing of it could go, and the place is given back; or only part of it, and
    /// the worker is ended after the running call.
    fn write(&self, id: u64, message: &[&[u8]], deadline: Instant) -> Result<bool, ()> {
        let mut state = lock(&self.state);
        if state.behind.as_ref().is_none_or(|b| b.id != id) {
            return Ok(false);
        }
        let total: usize = message.iter().map(|part| part.len()).sum();
        let sent =
            crate::socket::send_with_fds(&self.writer, message, 0, &[], rustix::net::SendFlags::DONTWAIT);
        let n = state.sent + 1;
        let behind = state.behind.as_mut().expect("checked above");
        match sent {
            Ok(written) if written == total => {
                behind.n = Some(n);
                behind.deadline = Some(deadline);
                state.sent = n;
                Ok(true)
            }
            Ok(0) | Err(_) => {
                // The socket is full, or the worker is gone (the running call finds out).
                state.behind = None;
                Err(())
            }
            Ok(_) => {
                // The rest cannot follow now, and the worker would wait for it after the
                // running call: nothing can take part of a frame back.
                behind.n = Some(n);
                behind.gave_up = Some(RestartCause::Protocol);
                state.sent = n;
                Err(())
            }
        }
    }

    /// Takes reservation `id` back if it is still the one waiting here and the worker has
    /// not claimed its call: then it never runs. Says whether its frame had been written.
    fn withdraw(&self, id: u64) -> Option<bool> {
        let mut state = lock(&self.state);
        let n = state.behind.as_ref().filter(|b| b.id == id)?.n;
        match n {
            None => {
                state.behind = None;
                Some(false)
            }
            Some(n) if state.take_back(&self.gate, n) => {
                state.behind = None;
                Some(true)
            }
            Some(_) => None,
        }
    }

    /// Marks reservation `id` as given up by its caller after its call started: its worker
    /// is killed when the call before it ends. `false` if it was taken off the pipe already.
    fn give_up(&self, id: u64, cause: RestartCause) -> bool {
        let mut state = lock(&self.state);
        match state.behind.as_mut() {
            Some(behind) if behind.id == id => {
                behind.gave_up = Some(cause);
                true
            }
            _ => false,
        }
    }
}

impl Behind {
    /// Whether its caller gave up on it, and why.
    pub(crate) fn gave_up(&self) -> Option<RestartCause> {
        self.gave_up
    }

    /// Withdraws it from `pipe`'s worker, which is going away or may not run it: it looks
    /// for a worker again, with the permit `permit` gives (that worker's, when it goes away),
    /// if any. `Ok(true)` if its frame had been written there; `Err(self)` if the worker
    /// claimed it already.
    pub(crate) fn withdraw(
        self,
        pipe: &Pipe,
        permit: impl FnOnce() -> Option<OwnedSemaphorePermit>,
    ) -> Result<bool, Behind> {
        let taken_back = match self.n {
            None => true,
            Some(n) => self.gave_up.is_some() || lock(&pipe.state).take_back(&pipe.gate, n),
        };
        if taken_back {
            let written = self.n.is_some() && self.gave_up.is_none();
            drop(self.hand.send(Handover::Again(permit())));
            Ok(written)
        } else {
            Err(self)
        }
    }

    /// Tells it how it goes on. If nobody waits for it any more, a worker handed to it is
    /// ended: it runs, or will run, a call nobody wants (or, if the call was never written,
    /// the lease's end puts it back; see `Ahead`'s drop).
    pub(crate) fn hand(self, pipe: &Pipe, handover: Handover) {
        if let (Handover::Lease(_), Some(n)) = (&handover, self.n) {
            lock(&pipe.state).running = n;
        }
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
    /// Its frame went to the worker.
    written: bool,
    settled: bool,
    /// What it keeps of its place in line when it is withdrawn (see [`Ahead::carried`]).
    carried: Option<Carried>,
}

/// What a call withdrawn from a worker it was sent ahead to keeps of its place in line as it
/// looks for a worker again: its place in a bounded queue, and the permit of the worker it
/// was behind, if that worker went away.
#[derive(Default)]
pub(crate) struct Carried {
    pub(super) permit: Option<OwnedSemaphorePermit>,
    pub(super) admitted: Option<OwnedSemaphorePermit>,
}

/// What [`Ahead::start`] did.
pub(crate) enum Start {
    /// The call was written behind the running one: this many bytes.
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

    /// Writes the call into its place behind the running call; the call's `deadline` goes
    /// with it (it is not started after that).
    pub(crate) fn start(&mut self, message: &[&[u8]], deadline: Instant) -> Start {
        match self.pipe.write(self.id, message, deadline) {
            Ok(true) => {
                self.written = true;
                self.pool.metrics.sent_ahead();
                return Start::Written(message.iter().map(|part| part.len()).sum());
            }
            Err(()) => {
                self.settled = true;
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
                if self.pipe.withdraw(self.id).is_some() {
                    self.settled = true;
                    self.pool.metrics.withdrawn();
                    self.carried = Some(Carried { permit: None, admitted: self.admitted.take() });
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
            Ok(Handover::Again(permit)) => {
                self.carried = Some(Carried { permit, admitted: self.admitted.take() });
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
        if let Some(written) = self.pipe.withdraw(self.id) {
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
            Ok(Handover::Again(_)) => GaveUp::Withdrawn,
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
        if self.plain_waiting.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let pipes: Vec<(u32, Arc<Pipe>)> = lock(&self.open_pipes).clone();
        for (pid, pipe) in pipes {
            if let Some((id, handed)) = pipe.reserve() {
                lock(&self.open_pipes).retain(|(p, _)| *p != pid);
                // Counted as waiting until it has its worker; its drop uncounts it.
                self.waiting.fetch_add(1, Ordering::Relaxed);
                return Some(Ahead {
                    pool: Arc::clone(self),
                    pipe,
                    pid,
                    id,
                    handed,
                    admitted: admitted.take(),
                    written: false,
                    settled: false,
                    carried: None,
                });
            }
        }
        None
    }
}

/// Whether a call's message may go ahead: small, with no descriptors.
pub(crate) fn may_go_ahead(message: &[&[u8]], fds: &[OwnedFd]) -> bool {
    fds.is_empty() && message.len() == 1 && message[0].len() <= AHEAD_MAX
}
