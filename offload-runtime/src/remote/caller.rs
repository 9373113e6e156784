//! A pool whose calls go to other hosts: it picks a host of this build with room for one
//! more call, sends the call there, and reads the answers.
//!
//! A host takes at most its workers and [`super::PREFETCH`] calls of a pool at once, and
//! says so in its presence; this caller counts what it holds on each host and sends only to
//! hosts with room. Other callers share the hosts, so a host may still be full: it answers
//! [`Answer::Busy`] at once, and the call goes to another (or waits for room).

use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::Message;
use tokio::sync::{Notify, mpsc};

use super::link::{Host, Link};
use super::wire::{self, Answer, CallHead};
use super::{LOST_AFTER, PRESENCE_EVERY};
use crate::error::{Error, ExitReason, Failure, Payload, ProtocolError};
use crate::pool::AcquireError;
use crate::protocol::{Attached, Tag};
use crate::registry::{Entry, Registry};
use crate::settings::{Overload, PoolSettings};
use crate::stats::{BreakerState, HostStats, PoolMetrics, PoolShape, PoolStats};
use crate::transport::{Pace, Reply};

pub(crate) struct Pool {
    key: &'static str,
    name: &'static str,
    link: Arc<Link>,
    settings: PoolSettings,
    metrics: PoolMetrics,
    /// Calls waiting for a host with room.
    waiting: AtomicUsize,
    /// [`shutdown`] began: no new calls.
    closed: AtomicBool,
    /// [`shutdown`]'s grace period is over: the calls still out end.
    stopped: AtomicBool,
    stop: Notify,
}

static POOLS: Mutex<Vec<Arc<Pool>>> = Mutex::new(Vec::new());

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Stops every remote pool: new calls fail with `Error::Shutdown`; the calls out get until
/// `deadline` to end, then end with `Error::Shutdown` too, and their hosts are told to stop
/// them. See [`crate::shutdown`].
pub(crate) async fn shutdown(deadline: tokio::time::Instant) {
    let pools: Vec<Arc<Pool>> = lock(&POOLS).clone();
    for pool in &pools {
        pool.closed.store(true, Ordering::Release);
        pool.link.changed.notify_waiters();
    }
    for pool in &pools {
        loop {
            let changed = pool.link.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if pool.holding() == 0 || tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
    }
    for pool in &pools {
        pool.stopped.store(true, Ordering::Release);
        pool.stop.notify_waiters();
    }
}

/// Every remote pool's figures; see [`crate::stats`].
pub(crate) fn stats(breakers: impl Fn(&str) -> Vec<(&'static str, BreakerState)>) -> Vec<PoolStats> {
    let pools: Vec<Arc<Pool>> = lock(&POOLS).clone();
    pools.iter().map(|pool| pool.stats(breakers(pool.key))).collect()
}

impl Pool {
    /// The remote pool `key`, started on first use.
    pub(crate) fn get_or_start(
        key: &'static str,
        name: &'static str,
        url: &str,
        settings: PoolSettings,
    ) -> Result<Arc<Pool>, String> {
        let mut pools = lock(&POOLS);
        if let Some(pool) = pools.iter().find(|pool| pool.key == key) {
            return Ok(Arc::clone(pool));
        }
        let link = Link::get(url)?;
        tracing::info!(target: "offload::pool", pool = name, broker = %link.config.shown(), "offload pool sends its calls to other hosts");
        let pool = Arc::new(Pool {
            key,
            name,
            link,
            settings,
            metrics: PoolMetrics::new(name),
            waiting: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            stop: Notify::new(),
        });
        pools.push(Arc::clone(&pool));
        Ok(pool)
    }

    pub(crate) fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    pub(crate) fn metrics(&self) -> &PoolMetrics {
        &self.metrics
    }

    /// This caller's calls out on hosts.
    fn holding(&self) -> u32 {
        self.link.hosts().iter().map(|host| host.view().holding.get(self.key).copied().unwrap_or(0)).sum()
    }

    /// Waits until [`shutdown`]'s grace period is over.
    async fn stopped(&self) {
        loop {
            let stop = self.stop.notified();
            let mut stop = std::pin::pin!(stop);
            stop.as_mut().enable();
            if self.stopped.load(Ordering::Acquire) {
                return;
            }
            stop.await;
        }
    }

    /// The hosts of this build, not lost.
    fn our_hosts(&self) -> Vec<Arc<Host>> {
        let build = Registry::get().hash();
        self.link.hosts().into_iter().filter(|host| host.build == build && !host.is_lost()).collect()
    }

    /// How many of this pool's calls the hosts of this build take at once (at least one).
    pub(crate) fn places(&self) -> usize {
        let slots: u32 =
            self.our_hosts().iter().map(|host| host.view().limits.get(self.key).copied().unwrap_or(0)).sum();
        (slots as usize).max(1)
    }

    fn stats(&self, breakers: Vec<(&'static str, BreakerState)>) -> PoolStats {
        let mut hosts: Vec<HostStats> = self
            .our_hosts()
            .iter()
            .map(|host| {
                let view = host.view();
                HostStats {
                    name: host.name.clone(),
                    slots: view.limits.get(self.key).copied().unwrap_or(0) as usize,
                    running: view.holding.get(self.key).copied().unwrap_or(0) as usize,
                    calls: view.calls.get(self.key).copied().unwrap_or(0),
                }
            })
            .collect();
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        let slots = hosts.iter().map(|h| h.slots).sum();
        let busy = hosts.iter().map(|h| h.running).sum();
        let shape = PoolShape {
            name: self.name,
            workers: slots,
            alive: slots,
            busy,
            queued: self.waiting.load(Ordering::Relaxed),
            hosts,
        };
        self.metrics.snapshot(shape, breakers)
    }

    /// Waits for a host with room for a call. Cancel-safe.
    pub(crate) async fn acquire(self: &Arc<Self>) -> Result<Lease, AcquireError> {
        let slot = self.slot().await?;
        let (call, reply_to, answers) = self.link.open_call();
        Ok(Lease {
            pool: Arc::clone(self),
            slot,
            call,
            reply_to,
            answers,
            message: None,
            entry: "",
            pid: 0,
            reply: None,
            sent: false,
            ended: false,
        })
    }

    /// Waits for a host with room for one more call, and takes that room.
    async fn slot(self: &Arc<Self>) -> Result<Slot, AcquireError> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Decrement(&self.waiting);
        loop {
            let changed = self.link.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if self.closed.load(Ordering::Acquire) {
                return Err(AcquireError::Shutdown);
            }
            // Counted before the connection is looked at: a loss after this is seen.
            let downs = self.link.downs();
            let connected = self.link.is_connected();
            if connected && let Some(slot) = self.take_room(downs) {
                return Ok(slot);
            }
            let hosts = self.our_hosts();
            if !connected {
                // Once it was up, or it had time to come up: the broker is out of reach.
                if self.settings.overload == Overload::Reject
                    && (self.link.was_up() || self.link.age() >= super::DISCOVERY)
                {
                    let reason = format!("the broker at {} cannot be reached", self.link.config.shown());
                    return Err(AcquireError::Unavailable(reason));
                }
            } else if self.link.has_looked() && hosts.is_empty() {
                return Err(AcquireError::Unavailable(self.no_host()));
            } else if self.settings.overload == Overload::Reject && !hosts.is_empty() {
                let waiting = self.waiting.load(Ordering::Relaxed) as u64;
                let queue = self.settings.queue.unwrap_or(0);
                if waiting > queue {
                    return Err(AcquireError::Overloaded(queue));
                }
            }
            // Also look again now and then: discovery ends, and an outage may end, without
            // a word from any host.
            let _ = tokio::time::timeout(PRESENCE_EVERY, changed).await;
        }
    }

    /// Takes room on the host of this build with the most.
    fn take_room(self: &Arc<Self>, downs: u64) -> Option<Slot> {
        let mut hosts = self.our_hosts();
        loop {
            let (at, _) = hosts
                .iter()
                .enumerate()
                .map(|(at, host)| (at, host.view().room(self.key)))
                .filter(|(_, room)| *room > 0)
                .max_by_key(|(_, room)| *room)?;
            let host = hosts.swap_remove(at);
            let mut view = host.view();
            // Another call may have taken the room since it was counted.
            if view.room(self.key) > 0 {
                *view.holding.entry(self.key).or_default() += 1;
                *view.calls.entry(self.key).or_default() += 1;
                drop(view);
                return Some(Slot { pool: Arc::clone(self), host, holds: true, downs });
            }
        }
    }

    /// Why no host can take this pool's calls: the builds seen instead.
    fn no_host(&self) -> String {
        let build = Registry::get().hash();
        let others: Vec<String> = self
            .link
            .hosts()
            .iter()
            .filter(|host| !host.is_lost())
            .map(|host| format!("build {:016x} on {}", host.build, host.name))
            .collect();
        let seen = if others.is_empty() {
            format!(
                "no host answers at {} under the subject prefix `{}` (start one with OFFLOAD_SERVE)",
                self.link.config.shown(),
                self.link.config.prefix
            )
        } else {
            format!("hosts seen: {}", others.join(", "))
        };
        format!("no host serves build {build:016x} (this program's); {seen}")
    }
}

struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Room for one call on one host, given back when dropped.
struct Slot {
    pool: Arc<Pool>,
    host: Arc<Host>,
    /// Whether this holds the room (see [`Slot::take`]).
    holds: bool,
    /// The connection's losses before the room was taken: a call sent with it lost its
    /// answers if the count moves.
    downs: u64,
}

impl Slot {
    /// The host said it had no room: none is taken there until it says how much it has.
    fn full(&self) {
        let mut view = self.host.view();
        if !view.full.contains(&self.pool.key) {
            view.full.push(self.pool.key);
        }
    }

    /// The room, to give back elsewhere; this slot no longer holds it.
    fn take(&mut self) -> Slot {
        let holds = std::mem::replace(&mut self.holds, false);
        Slot { pool: Arc::clone(&self.pool), host: Arc::clone(&self.host), holds, downs: self.downs }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.holds {
            return;
        }
        if let Some(holding) = self.host.view().holding.get_mut(self.pool.key) {
            *holding = holding.saturating_sub(1);
        }
        self.pool.link.changed.notify_waiters();
    }
}

/// One call on a host: sent, then its answers read. Dropped before it is answered, the host
/// is told to stop the call.
pub(crate) struct Lease {
    pool: Arc<Pool>,
    slot: Slot,
    call: u64,
    reply_to: String,
    answers: mpsc::UnboundedReceiver<Message>,
    /// The call's message, once made: sent again if a host turns it away.
    message: Option<bytes::Bytes>,
    entry: &'static str,
    pid: u32,
    /// The answer that holds the reply, and where its body is.
    reply: Option<(bytes::Bytes, Range<usize>)>,
    sent: bool,
    ended: bool,
}

impl Lease {
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn host(&self) -> &str {
        &self.slot.host.name
    }

    /// Makes the call's message: a call of `function` due by `end`, which streams items if
    /// `streams`. Nothing is sent yet: that is [`Lease::reply`]'s, which can wait for the
    /// broker.
    pub(crate) fn start(
        &mut self,
        message: &[&[u8]],
        fds: &[OwnedFd],
        (function, end, streams): (&'static Entry, tokio::time::Instant, bool),
    ) -> Result<usize, Failure> {
        let entry = function.name();
        self.entry = entry;
        if !fds.is_empty() {
            return Err(Failure::Error(Error::Config {
                entry,
                message:
                    "a `SharedBytes` or `SharedSlice` argument cannot go to another host: its pool's calls \
                          go to remote hosts (OFFLOAD_REMOTE); pass the bytes by value"
                        .into(),
            }));
        }
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        let head = CallHead {
            version: wire::VERSION,
            build: Registry::get().hash(),
            entry: function.key.to_owned(),
            deadline_ms: wire::epoch_ms_after(left),
            budget_ms: left.as_millis().try_into().unwrap_or(u64::MAX),
            streams,
        };
        let bytes = wire::encode(&head, message);
        let max = self.pool.link.client.max_payload();
        if bytes.len() > max {
            return Err(Failure::Error(Error::PayloadTooLarge {
                entry,
                what: Payload::Arguments,
                len: bytes.len() as u64,
                max: max as u64,
            }));
        }
        self.message = Some(bytes.into());
        Ok(0)
    }

    /// Sends the call and reads its answers until the reply; log, progress and item frames
    /// before it go to `on_frame` (a remote stream is not paced: the host sends its items
    /// as they come).
    pub(crate) async fn reply(
        &mut self,
        on_frame: &mut (dyn FnMut(Tag, &[u8]) -> Pace + Send),
    ) -> Result<Reply<'_>, Failure> {
        loop {
            if !self.sent {
                let message = self.message.clone().expect("made by start");
                let subject = wire::call_subject(&self.pool.link.config.prefix, &self.slot.host.id);
                self.pool
                    .link
                    .client
                    .publish_with_reply(subject, self.reply_to.clone(), message)
                    .await
                    .map_err(|e| self.unavailable(format!("the broker did not take the call: {e}")))?;
                self.sent = true;
            }
            let (host, pool) = (Arc::clone(&self.slot.host), Arc::clone(&self.pool));
            let downs = self.slot.downs;
            let answer = tokio::select! {
                // An answer that came wins over a loss noticed at the same time.
                biased;
                answer = self.answers.recv() => answer,
                () = host.lost() => None,
                () = pool.link.went_down_since(downs) => None,
                // Dropped unanswered, the lease tells the host to stop the call.
                () = pool.stopped() => return Err(Failure::Stopped),
            };
            let Some(answer) = answer else {
                return Err(self.host_lost());
            };
            if answer.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                // The host is gone (it has not been missed long enough to be lost): the call
                // did not reach it, and goes to another.
                self.resend_elsewhere().await?;
                continue;
            }
            let (head, at) = wire::decode::<Answer>(&answer.payload).map_err(Failure::Broken)?;
            match head {
                Answer::Started { pid } => self.ran_in(pid),
                Answer::Frame { pid, tag, bulk } => {
                    self.ran_in(pid);
                    let tag = Tag::from_u8(tag).ok_or_else(|| {
                        Failure::Broken(ProtocolError::Invalid(format!("a host sent a frame tagged {tag}")))
                    })?;
                    match tag {
                        Tag::Log | Tag::Progress | Tag::Item => {
                            on_frame(tag, &answer.payload[at..]);
                        }
                        Tag::Return | Tag::Panicked | Tag::Fault => {
                            self.ended = true;
                            let (range, bulk) =
                                split_bulk(&answer.payload, at, &bulk).map_err(Failure::Broken)?;
                            self.reply = Some((answer.payload, range.clone()));
                            let (payload, _) = self.reply.as_ref().expect("just set");
                            return Ok(Reply {
                                tag,
                                body: &payload[range.clone()],
                                range,
                                attached: Attached { fds: Vec::new(), bulk },
                                pid: Some(pid),
                            });
                        }
                        other => {
                            return Err(Failure::Broken(ProtocolError::Invalid(format!(
                                "a host sent an unexpected {other:?} frame"
                            ))));
                        }
                    }
                }
                Answer::Failed { pid, failure } => {
                    self.ended = true;
                    self.pid = pid.unwrap_or(self.pid);
                    return Err(match failure {
                        wire::Failure::TimedOut => Failure::TimedOut { started: pid.is_some() },
                        wire::Failure::Expired => Failure::TimedOut { started: false },
                        failure => Failure::Error(
                            failure
                                .into_error(self.entry, self.pid, &self.slot.host.name)
                                .expect("not a timeout"),
                        ),
                    });
                }
                // The call did not start there: another host, or this one once it has room.
                Answer::Busy => self.resend_elsewhere().await?,
            }
        }
    }

    /// The call runs in worker `pid` of its host.
    fn ran_in(&mut self, pid: u32) {
        if self.pid != pid {
            // The call's span (this future runs in it) gets the remote worker.
            tracing::Span::current().record("pid", pid);
            self.pid = pid;
        }
    }

    /// The call's host did not take it: it goes to a host with room, none taken on this one
    /// until it says how much it has.
    async fn resend_elsewhere(&mut self) -> Result<(), Failure> {
        self.slot.full();
        // The room it held is given back before it waits for room: calls turned away must
        // not hold the room they wait for.
        drop(self.slot.take());
        let slot = self.pool.slot().await.map_err(|e| Failure::Error(e.into_error(self.entry)))?;
        self.slot = slot;
        self.sent = false;
        // The call's span names the host it went to.
        tracing::Span::current().record("host", self.slot.host.name.as_str());
        Ok(())
    }

    fn unavailable(&self, reason: String) -> Failure {
        Failure::Error(Error::Unavailable { entry: self.entry, reason })
    }

    fn host_lost(&mut self) -> Failure {
        if self.pool.link.downs() != self.slot.downs || !self.pool.link.is_connected() {
            // The host may still run the call: it is told to stop (once the connection is
            // back) when the lease is dropped.
            let broker = self.pool.link.config.shown();
            return self.unavailable(format!("lost the broker at {broker} while the call ran"));
        }
        self.ended = true;
        Failure::Error(Error::Crashed {
            entry: self.entry,
            pid: self.pid,
            exit: ExitReason::HostLost,
            stderr: vec![format!(
                "offload: lost host {}: no word from it for {LOST_AFTER:?} while it held the call",
                self.slot.host.name
            )],
            earlier_attempts: Vec::new(),
        })
    }

    /// The whole answer that holds the reply (its body at the range [`Lease::reply`] gave).
    pub(crate) fn take_reply(&mut self) -> Vec<u8> {
        // Without a copy where the answer's bytes are its own allocation.
        self.reply.take().map(|(payload, _)| Vec::from(payload)).unwrap_or_default()
    }

    /// The call is over, answered or not sent: its room is given back.
    pub(crate) fn release(mut self) {
        self.ended = true;
    }

    /// The call is given up (its deadline passed, it failed here): its host is told to stop
    /// it, unless the host ended it or never had it.
    pub(crate) fn cancel(self) {
        // Dropping does it.
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.link.close_call(self.call);
        if self.sent && !self.ended {
            let client = self.pool.link.client.clone();
            let subject = wire::cancel_subject(&self.pool.link.config.prefix, &self.slot.host.id);
            let call = bytes::Bytes::from(self.reply_to.clone().into_bytes());
            // The room is given back once the host is told, so that the next call does not
            // reach the host before the cancel.
            let slot = self.slot.take();
            super::runtime().spawn(async move {
                let _ = client.publish(subject, call).await;
                drop(slot);
            });
        }
    }
}

/// The body of a reply answer that starts at `at`, and the bulk byte vectors of `lens`
/// after it.
fn split_bulk(
    payload: &[u8],
    at: usize,
    lens: &[u64],
) -> Result<(Range<usize>, Vec<Vec<u8>>), ProtocolError> {
    let bad = || ProtocolError::Invalid("a host's reply does not hold the bulk frames it announces".into());
    let bulk_len = lens.iter().try_fold(0u64, |sum, &len| sum.checked_add(len)).ok_or_else(bad)?;
    let body_end =
        (payload.len() as u64).checked_sub(bulk_len).filter(|end| *end >= at as u64).ok_or_else(bad)?;
    // Every length fits: together they are at most the payload's.
    let mut from = body_end as usize;
    let mut bulk = Vec::with_capacity(lens.len());
    for &len in lens {
        let to = from + len as usize;
        bulk.push(payload[from..to].to_vec());
        from = to;
    }
    Ok((at..body_end as usize, bulk))
}

/// Encodes a frame's answer: its body, then its bulk byte vectors.
pub(super) fn frame_answer(pid: u32, tag: Tag, body: &[u8], bulk: &[Vec<u8>]) -> Vec<u8> {
    let lens = bulk.iter().map(|b| b.len() as u64).collect();
    let mut parts: Vec<&[u8]> = vec![body];
    parts.extend(bulk.iter().map(Vec::as_slice));
    wire::encode(&Answer::Frame { pid, tag: tag as u8, bulk: lens }, &parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_carries_its_bulk_vectors() {
        let message = frame_answer(7, Tag::Return, b"body", &[b"one".to_vec(), b"three".to_vec()]);
        let (head, at) = wire::decode::<Answer>(&message).unwrap();
        let Answer::Frame { pid: 7, tag, bulk } = head else { panic!("{head:?}") };
        assert_eq!(tag, Tag::Return as u8);
        let (range, vectors) = split_bulk(&message, at, &bulk).unwrap();
        assert_eq!(&message[range], b"body");
        assert_eq!(vectors, [b"one".to_vec(), b"three".to_vec()]);
        assert!(split_bulk(&message, at, &[1 << 20]).is_err());
        // Lengths that overflow when added are refused, not a panic.
        assert!(split_bulk(&message, at, &[u64::MAX, 2]).is_err());
        assert!(split_bulk(&message, at, &[u64::MAX]).is_err());
    }
}
