//! Calls sent ahead. When every worker of a pool is busy, a small call may be written to a
//! busy worker's socket behind the call it runs (one at most), so that the worker starts it
//! as soon as it has answered, instead of idling for a round trip to the caller and back.
//!
//! Nothing a caller sees changes:
//! - A call sent ahead passes the worker's [`Gate`] before it runs. Until the worker claims
//!   it, the caller can withdraw it exactly; a withdrawn call never runs (the worker reads
//!   its frame and drops it). So a call sent ahead is still a queued call: when the call
//!   before it times out, crashes or is cancelled, and its worker is killed, the call is
//!   withdrawn and looks for a worker again; if its deadline passes first, or its caller
//!   drops it, it is withdrawn and never runs.
//! - A call sent ahead behind a long call moves to a worker that becomes free.
//! - When the call before it ends, its worker passes to it in a [`Handover`], with the call
//!   before's permit, so the pool's figures, `max_tasks` and shutdown count it as the one
//!   call the worker runs. Calls waiting in the pool's queue are sent ahead in their order,
//!   before calls that come later.
//! - A call takes its place behind a busy worker's call (a reservation) before the checks a
//!   call makes when it gets a worker (its deadline, its breaker), and is written there only
//!   once they pass; a call that gives its place back was never sent.
//! - Only small calls go ahead: no shared buffers, no bulk frames, at most [`AHEAD_MAX`]
//!   bytes, so that they are written at once.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use std::future::Future;

use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::{Lease, Pool, lock};
use crate::error::{Failure, ProtocolError};
use crate::gate::Gate;
use crate::stats::RestartCause;
use crate::transport::TransportError;

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
    /// Call frames sent (or reserved) to the worker so far: the number of the last (see
    /// [`Gate`]).
    sent: u64,
    /// The number of the call the worker runs, or ran last.
    running: u64,
    /// The running call's message is written whole, and the worker takes one more behind
    /// it (it is not due for recycling after the running call).
    open: bool,
    behind: Option<Behind>,
}

/// The call sent ahead, as its worker's pipe knows it.
pub(crate) struct Behind {
    n: u64,
    hand: oneshot::Sender<Handover>,
    /// Its frame is written whole (until then, it holds only its number).
    written: bool,
    /// Its caller gave up on it after the worker claimed it (or after part of its frame
    /// went): the worker is killed when the call before it ends.
    gave_up: Option<RestartCause>,
}

/// What a call sent ahead learns when the call before it ends.
pub(crate) enum Handover {
    /// The worker is the call's: it runs it, or will.
    Lease(Lease),
    /// It was withdrawn before it started: it looks for a worker again.
    Again,
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
        let mut state = lock(&self.state);
        self.gate.accept(state.running);
        state.sent += 1;
        state.running = state.sent;
        state.open = false;
    }

    /// The reply to the running call was read whole and is well formed: the worker may
    /// start the call behind it.
    pub(crate) fn accept(&self) {
        let running = lock(&self.state).running;
        self.gate.accept(running);
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
    /// the call's number, and where its worker will be handed.
    fn reserve(&self) -> Option<(u64, oneshot::Receiver<Handover>)> {
        let mut state = lock(&self.state);
        if !state.open || state.behind.is_some() {
            return None;
        }
        state.sent += 1;
        state.open = false;
        let (hand, handed) = oneshot::channel();
        state.behind = Some(Behind { n: state.sent, hand, written: false, gave_up: None });
        Some((state.sent, handed))
    }

    /// Writes call `n`'s `message` into its reserved place. `Ok(None)`: written whole.
    /// `Ok(Some(()))`: the place is gone (the call before ended, and sent word). `Err`:
    /// nothing of it could go, and the place is given back; or only part of it, and the
    /// worker is ended after the running call.
    fn write(&self, n: u64, message: &[&[u8]]) -> Result<Option<()>, ()> {
        let mut state = lock(&self.state);
        let Some(behind) = state.behind.as_mut().filter(|b| b.n == n) else { return Ok(Some(())) };
        let total: usize = message.iter().map(|part| part.len()).sum();
        match crate::socket::send_with_fds(&self.writer, message, 0, &[], rustix::net::SendFlags::DONTWAIT) {
            Ok(written) if written == total => {
                behind.written = true;
                Ok(None)
            }
            Ok(0) | Err(_) => {
                // The socket is full, or the worker is gone (the running call finds out).
                state.behind = None;
                state.sent -= 1;
                Err(())
            }
            Ok(_) => {
                // The rest cannot follow now, and the worker would wait for it after the
                // running call: nothing can take part of a frame back.
                behind.written = true;
                behind.gave_up = Some(RestartCause::Protocol);
                Err(())
            }
        }
    }

    /// Writes call `n`'s `message` to the worker that was handed to it before it was
    /// written: how much went at once.
    fn write_handed(&self, message: &[&[u8]]) -> std::io::Result<usize> {
        match crate::socket::send_with_fds(&self.writer, message, 0, &[], rustix::net::SendFlags::DONTWAIT) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            other => other,
        }
    }

    /// Takes call `n` back if it is still the one waiting here and the worker has not
    /// claimed it: then it never runs. One not yet written gives its number back.
    fn withdraw(&self, n: u64) -> bool {
        let mut state = lock(&self.state);
        let Some(behind) = state.behind.as_ref().filter(|b| b.n == n) else { return false };
        if !behind.written {
            state.behind = None;
            state.sent -= 1;
            return true;
        }
        if self.gate.withdraw(n) {
            state.behind = None;
            true
        } else {
            false
        }
    }

    /// Marks call `n` as given up by its caller after it started: its worker is killed when
    /// the call before it ends. `false` if it was handed its worker already.
    fn give_up(&self, n: u64, cause: RestartCause) -> bool {
        let mut state = lock(&self.state);
        match state.behind.as_mut() {
            Some(behind) if behind.n == n => {
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
    /// for a worker again. `Ok(true)` if it had been written there; `Err(self)` if the
    /// worker claimed it already.
    pub(crate) fn withdraw(self, pipe: &Pipe) -> Result<bool, Behind> {
        if self.gave_up.is_some() || !self.written || pipe.gate.withdraw(self.n) {
            let _ = self.hand.send(Handover::Again);
            Ok(self.written && self.gave_up.is_none())
        } else {
            Err(self)
        }
    }

    /// Tells it how it goes on. If nobody waits for it any more, a worker handed to it is
    /// killed: it runs, or will run, a call nobody wants.
    pub(crate) fn hand(self, pipe: &Pipe, handover: Handover) {
        if matches!(handover, Handover::Lease(_)) {
            lock(&pipe.state).running = self.n;
        }
        drop(self.hand.send(handover));
    }
}

/// A call sent ahead to a busy worker, waiting for the call before it to end.
pub(crate) struct Ahead {
    pool: Arc<Pool>,
    pipe: Arc<Pipe>,
    pid: u32,
    n: u64,
    handed: oneshot::Receiver<Handover>,
    /// Word that came before the call was written: the worker, handed to it.
    early: Option<Handover>,
    /// Its place in a bounded queue, kept until it has its worker.
    admitted: Option<OwnedSemaphorePermit>,
    /// Its frame went to the worker.
    written: bool,
    settled: bool,
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

    /// Writes the call into its place behind the running call. `Err`: it could not go, and
    /// looks for a worker again.
    pub(crate) fn start(&mut self, message: &[&[u8]]) -> Result<usize, TransportError> {
        let total: usize = message.iter().map(|part| part.len()).sum();
        match self.pipe.write(self.n, message) {
            Ok(None) => {
                self.written = true;
                self.pool.metrics.sent_ahead();
                return Ok(total);
            }
            Err(()) => {
                self.settled = true;
                return Err(TransportError::NotSent);
            }
            Ok(Some(())) => {}
        }
        // The call before ended first: the worker is this call's, idle, or it was withdrawn.
        match self.handed.try_recv() {
            Ok(Handover::Lease(lease)) => {
                let sent = self.pipe.write_handed(message);
                self.written = true;
                self.early = Some(Handover::Lease(lease));
                sent.map_err(TransportError::from)
            }
            _ => {
                self.settled = true;
                Err(TransportError::NotSent)
            }
        }
    }

    /// Waits until the call before ends: then the worker is this call's, or the call was
    /// withdrawn and must look for a worker again. While it waits, a worker of the pool
    /// that becomes free takes it instead (it is withdrawn here to go there).
    pub(crate) async fn turn(&mut self) -> Handover {
        let handed = match self.early.take() {
            Some(early) => Ok(early),
            None => loop {
                let mut idle = std::pin::pin!(self.pool.idle.notified());
                idle.as_mut().enable();
                if self.pool.permits.available_permits() > 0 && self.pipe.withdraw(self.n) {
                    self.settled = true;
                    self.pool.metrics.withdrawn();
                    return Handover::Again;
                }
                let handed = std::future::poll_fn(|cx| match std::pin::Pin::new(&mut self.handed).poll(cx) {
                    Poll::Ready(handed) => Poll::Ready(Some(handed)),
                    Poll::Pending => idle.as_mut().poll(cx).map(|()| None),
                })
                .await;
                if let Some(handed) = handed {
                    break handed;
                }
            },
        };
        self.settled = true;
        match handed {
            Ok(Handover::Lease(mut lease)) => {
                lease.permits.as_mut().expect("a lease holds its permits").1 = self.admitted.take();
                Handover::Lease(lease)
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
        if self.pipe.withdraw(self.n) {
            if self.written {
                self.pool.metrics.withdrawn();
            }
            return GaveUp::Withdrawn;
        }
        if self.pipe.give_up(self.n, cause) {
            return GaveUp::Started(None);
        }
        // The call before ended and sent word: a worker that runs this call (or, if the call
        // was never written, an idle one), or word that it was withdrawn or lost.
        let handed = match self.early.take() {
            Some(early) => Ok(early),
            None => self.handed.try_recv(),
        };
        match handed {
            Ok(Handover::Lease(lease)) if !self.written => {
                lease.release_unused();
                GaveUp::Withdrawn
            }
            Ok(Handover::Lease(lease)) => GaveUp::Started(Some(Box::new(lease))),
            Ok(Handover::Again) => GaveUp::Withdrawn,
            Ok(Handover::Lost(_)) | Err(_) => GaveUp::Started(None),
        }
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        self.pool.waiting.fetch_sub(1, Ordering::Relaxed);
        if !self.settled {
            // Handed a worker that runs a call nobody wants: dropping the lease ends it.
            drop(self.abandon(RestartCause::Abandoned));
        }
    }
}

impl Pool {
    /// Reserves a place behind a busy worker's call that takes one, if there is one.
    pub(super) fn reserve_ahead(
        self: &Arc<Self>,
        admitted: &mut Option<OwnedSemaphorePermit>,
    ) -> Option<Ahead> {
        let pipes: Vec<(u32, Arc<Pipe>)> = lock(&self.open_pipes).clone();
        for (pid, pipe) in pipes {
            if let Some((n, handed)) = pipe.reserve() {
                lock(&self.open_pipes).retain(|(p, _)| *p != pid);
                // Counted as waiting until it has its worker; its drop uncounts it.
                self.waiting.fetch_add(1, Ordering::Relaxed);
                return Some(Ahead {
                    pool: Arc::clone(self),
                    pipe,
                    pid,
                    n,
                    handed,
                    early: None,
                    admitted: admitted.take(),
                    written: false,
                    settled: false,
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
