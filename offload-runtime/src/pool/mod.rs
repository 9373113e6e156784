//! Pools of worker processes: one per pool name, started on first use, never tied to a
//! Tokio runtime.
//!
//! A pool has one *slot* per worker and a semaphore with one permit per slot. A call takes a
//! permit (waiting in FIFO order when all workers are busy), then takes a slot: a ready
//! worker, a worker still starting, or an empty slot to start one in. It gives the slot back
//! when done, or, if the worker died, was killed or is due for recycling, puts a replacement
//! that is already starting in its place. So the pool heals itself and never stays broken.
//!
//! With a bounded queue, a second semaphore admits at most `workers + queue` calls; the
//! overload policy says whether a call that finds it full waits (backpressure) or is refused
//! (load shedding).

pub(crate) mod pipe;
pub(crate) mod supervisor;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError, oneshot};

use self::pipe::{Ahead, Behind, Carried, Handover, Pipe, TakenBack, Turn};
use self::supervisor::{Cause, Ending, ExitInfo, Worker, WorkerConfig};
use crate::error::{Error, ExitReason, Failure, ProtocolError};
use crate::executor::Failed;
use crate::lend::Message;
use crate::protocol::Tag;
use crate::settings::{Overload, PoolSettings};
use crate::stats::{BreakerState, PoolMetrics, PoolShape, PoolStats, RestartCause};
use crate::transport::{Reply, TransportError};

/// First pause after a worker failed to start; doubles with each failure in a row.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest pause between attempts to start a worker.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// How long shutdown waits, after killing, for every worker to be reaped: an idle worker
/// gets `EXIT_GRACE` (2 s) to exit, and the rest is margin.
const REAP_PATIENCE: Duration = Duration::from_secs(4);

static POOLS: LazyLock<Mutex<HashMap<&'static str, Arc<Pool>>>> = LazyLock::new(Default::default);
static SHUT_DOWN: AtomicBool = AtomicBool::new(false);

/// The pool named `key`, started with `settings` (and named `label` for people) if it is not
/// running yet.
pub(crate) fn get_or_start(key: &'static str, label: &'static str, settings: PoolSettings) -> Arc<Pool> {
    let mut pools = lock(&POOLS);
    if let Some(pool) = pools.get(key) {
        return Arc::clone(pool);
    }
    let pool = Pool::start(key, label, settings);
    pools.insert(key, Arc::clone(&pool));
    pool
}

/// Whether [`shutdown`] has begun.
pub(crate) fn is_shut_down() -> bool {
    SHUT_DOWN.load(Ordering::Acquire)
}

/// Stops every pool: refuses new calls, lets running ones finish for up to `grace`, kills
/// what still runs, and returns once every worker process has been reaped.
pub(crate) async fn shutdown(grace: Duration) {
    SHUT_DOWN.store(true, Ordering::Release);
    let pools: Vec<Arc<Pool>> = lock(&POOLS).values().cloned().collect();
    tracing::info!(target: "offload::pool", pools = pools.len(), ?grace, "offload shutting down");
    for pool in &pools {
        pool.close();
    }
    // Only now: a start refused by the spawner must find its pool closed, so that its call
    // gets `Error::Shutdown`, not a spawn failure that feeds the crash-loop backoff.
    supervisor::stop_spawning();
    let deadline = tokio::time::Instant::now() + grace;
    for pool in &pools {
        let _ = tokio::time::timeout_at(deadline, pool.calls_finished()).await;
    }
    for pool in &pools {
        pool.stop_workers();
    }
    // Killed workers are reaped when the calls that hold them notice; bound the wait in case
    // such a call is never polled again, and kill what it holds: a worker it was waiting for
    // may have started since. Such a process stays a zombie until the call is dropped.
    if tokio::time::timeout(REAP_PATIENCE, supervisor::all_reaped()).await.is_err() {
        let killed = supervisor::kill_unreaped();
        tracing::warn!(target: "offload::pool",
            killed,
            "offload shutdown: workers held by calls that are no longer polled were not reaped \
             within {REAP_PATIENCE:?}; killed them"
        );
    }
    tracing::info!(target: "offload::pool", "offload shut down");
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct Pool {
    /// The pool's name, or the function's path for a pool of its own.
    name: &'static str,
    /// The pool's key in the registry: what its workers build states for.
    key: &'static str,
    pub(crate) settings: PoolSettings,
    /// `workers + queue` permits when the queue is bounded.
    admission: Option<Arc<Semaphore>>,
    /// One permit per slot.
    permits: Arc<Semaphore>,
    slots: Mutex<Vec<Slot>>,
    /// Workers lent to calls, by pid. A pid is removed, under this lock, before its process
    /// is handed to the reaper, so every pid here names a live or unreaped child.
    leased: Mutex<HashMap<u32, Arc<Pipe>>>,
    /// Signalled when a lease ends.
    returned: Notify,
    backoff: Mutex<Backoff>,
    closed: AtomicBool,
    /// Shutdown's grace is over and the workers still running calls were killed.
    stopped: AtomicBool,
    /// Calls waiting for admission or a worker (calls sent ahead included).
    waiting: AtomicUsize,
    /// Busy workers that take a call ahead now (see [`pipe`]), by pid.
    open_pipes: Mutex<Vec<(u32, Arc<Pipe>)>>,
    /// Signalled, one waiter at a time, when a busy worker starts to take a call ahead.
    opened: Notify,
    /// Calls that wait for a worker to send their call ahead to.
    seeking_ahead: AtomicUsize,
    /// Calls that wait for a worker and cannot go ahead (large ones): while there are any,
    /// no call goes ahead, so that workers come free for them.
    plain_waiting: AtomicUsize,
    /// Calls taken back from a worker that went away, waiting for a worker's permit before
    /// any other call, in their order (see [`pipe::Turn::Line`]); and how many.
    line: Mutex<VecDeque<oneshot::Sender<OwnedSemaphorePermit>>>,
    in_line: AtomicUsize,
    /// Signalled, one waiter at a time, when a call's lease ends and frees its worker's
    /// permit (the worker went back to its slot, or was replaced): a call sent ahead behind a
    /// long one moves there.
    idle: Notify,
    /// When the pool was made: what `next_move_check` counts from.
    born: tokio::time::Instant,
    /// When calls waiting behind a long call are next looked for, in ms since `born` (see
    /// [`Pool::move_off_long_calls`]).
    next_move_check: AtomicU64,
    pub(crate) metrics: PoolMetrics,
}

/// What a call gets from [`Pool::acquire`].
pub(crate) enum Acquired {
    /// A worker of its own, its call not yet sent.
    Lease(Lease),
    /// Its call sent ahead to a busy worker.
    Ahead(Ahead),
}

// One slot per worker: boxing the worker would save little memory and cost an allocation
// each time a call gives its worker back.
#[allow(clippy::large_enum_variant)]
enum Slot {
    Ready(Worker),
    Starting(oneshot::Receiver<io::Result<Worker>>),
    /// Nothing runs here: the last start failed, or the pool is shut down.
    Empty,
}

/// Why a call could not get a worker.
#[derive(Debug)]
pub(crate) enum AcquireError {
    Spawn(io::Error),
    /// The queue is full and the policy is to refuse.
    Overloaded(u64),
    Shutdown,
    /// No remote host can take the call, and why.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    Unavailable(String),
}

impl AcquireError {
    pub(crate) fn into_error(self, entry: &'static str) -> Error {
        match self {
            AcquireError::Spawn(source) => Error::Spawn { entry, source },
            AcquireError::Overloaded(queue) => Error::Overloaded { entry, queue },
            AcquireError::Shutdown => Error::Shutdown { entry },
            AcquireError::Unavailable(reason) => Error::Unavailable { entry, reason },
        }
    }
}

/// A snapshot of every pool started so far, sorted by name, with the breaker states that
/// `breakers` gives for a pool's key.
pub(crate) fn stats(breakers: impl Fn(&str) -> Vec<(&'static str, BreakerState)>) -> Vec<PoolStats> {
    let pools: Vec<(&'static str, Arc<Pool>)> =
        lock(&POOLS).iter().map(|(k, p)| (*k, Arc::clone(p))).collect();
    let mut all: Vec<PoolStats> = pools.iter().map(|(key, pool)| pool.stats(breakers(key))).collect();
    all.sort_by_key(|s| s.name);
    all
}

/// Consecutive failures to start a worker, and when to try again.
#[derive(Default)]
struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
}

impl Backoff {
    fn failed(&mut self, error: &io::Error) {
        self.failures = self.failures.saturating_add(1);
        let pause = BACKOFF_START.saturating_mul(1 << (self.failures - 1).min(16)).min(BACKOFF_MAX);
        self.retry_at = Some(Instant::now() + pause);
        self.last_error = error.to_string();
    }

    fn succeeded(&mut self) {
        *self = Backoff::default();
    }

    /// The error for a call that arrives while the pool waits before trying again. A single
    /// failure is retried at once: only failures in a row make calls wait.
    fn refusal(&self) -> Option<io::Error> {
        if self.failures < 2 {
            return None;
        }
        let left = self.retry_at?.checked_duration_since(Instant::now())?;
        Some(io::Error::other(format!(
            "workers of this pool failed to start {} times in a row (last: {}); the next attempt \
             is in {}ms",
            self.failures,
            self.last_error,
            left.as_millis()
        )))
    }
}

impl Pool {
    fn start(key: &'static str, name: &'static str, settings: PoolSettings) -> Arc<Pool> {
        let workers = settings.workers.get();
        let admission = settings.queue.map(|queue| {
            let permits = usize::try_from(queue).unwrap_or(usize::MAX).saturating_add(workers);
            Arc::new(Semaphore::new(permits.min(Semaphore::MAX_PERMITS)))
        });
        tracing::info!(target: "offload::pool", pool = name, %settings, "offload pool starting");
        let pool = Arc::new(Pool {
            name,
            key,
            admission,
            permits: Arc::new(Semaphore::new(workers)),
            slots: Mutex::new(Vec::with_capacity(workers)),
            leased: Mutex::new(HashMap::new()),
            returned: Notify::new(),
            backoff: Mutex::new(Backoff::default()),
            closed: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            open_pipes: Mutex::new(Vec::new()),
            opened: Notify::new(),
            seeking_ahead: AtomicUsize::new(0),
            plain_waiting: AtomicUsize::new(0),
            line: Mutex::new(VecDeque::new()),
            in_line: AtomicUsize::new(0),
            idle: Notify::new(),
            born: tokio::time::Instant::now(),
            next_move_check: AtomicU64::new(0),
            metrics: PoolMetrics::new(name),
            settings,
        });
        let slots = (0..workers).map(|_| pool.start_worker()).collect();
        *lock(&pool.slots) = slots;
        pool
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Whether shutdown has killed the workers that were still running calls: a call whose
    /// worker is gone after this was stopped by shutdown, not by a crash.
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    fn start_worker(&self) -> Slot {
        if self.is_closed() {
            return Slot::Empty;
        }
        Slot::Starting(supervisor::spawn(WorkerConfig {
            pool: self.name,
            key: self.key,
            memory: self.settings.memory,
            max_payload: self.settings.max_payload,
            spin_us: self.settings.spin_us,
        }))
    }

    /// Waits for admission and a free worker, starting one if its slot is empty; or, if the
    /// call `may_go_ahead` (it is small), a place behind a busy worker's call when no worker
    /// is free (see [`pipe`]). Cancel-safe: a dropped future gives back its permits and its
    /// slot, and a call that was only queued never reaches a worker.
    /// A call withdrawn from a worker it was sent ahead to brings what it kept of its place
    /// in line (`carried`): it does not queue again for that.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        may_go_ahead: bool,
        carried: Carried,
    ) -> Result<Acquired, AcquireError> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Decrement(&self.waiting);
        let mut admitted = match (&self.admission, carried.admitted) {
            (None, _) => None,
            (Some(_), Some(kept)) => Some(kept),
            (Some(admission), None) => Some(match self.settings.overload {
                Overload::Wait => {
                    Arc::clone(admission).acquire_owned().await.map_err(|_| AcquireError::Shutdown)?
                }
                Overload::Reject => Arc::clone(admission).try_acquire_owned().map_err(|e| match e {
                    TryAcquireError::Closed => AcquireError::Shutdown,
                    TryAcquireError::NoPermits => AcquireError::Overloaded(self.settings.queue.unwrap_or(0)),
                })?,
            }),
        };
        let permit = if let Some(turn) = carried.turn {
            match turn {
                Turn::Permit(kept) => kept,
                Turn::Line(turn) => self.permit_from_line(turn).await?,
            }
        } else if may_go_ahead {
            match self.permit_or_ahead(&mut admitted).await? {
                Ok(permit) => permit,
                Err(ahead) => return Ok(Acquired::Ahead(ahead)),
            }
        } else {
            self.plain_waiting.fetch_add(1, Ordering::Relaxed);
            let _plain = Decrement(&self.plain_waiting);
            Arc::clone(&self.permits).acquire_owned().await.map_err(|_| AcquireError::Shutdown)?
        };
        let slot = take_slot(&mut lock(&self.slots));
        let mut held = HeldSlot { pool: self, slot: Some(slot) };
        let worker = self.ready_worker(&mut held).await?;
        {
            // Checked under the lease lock that shutdown's wait for running calls takes after
            // closing the pool: a call either counts as running or never runs. A worker that
            // finished starting after shutdown began is retired, not used.
            let mut leased = lock(&self.leased);
            if self.is_closed() {
                drop(leased);
                drop(worker.end(Ending::Retire, Cause::Shutdown));
                return Err(AcquireError::Shutdown);
            }
            leased.insert(worker.pid, Arc::clone(worker.pipe()));
        }
        Ok(Acquired::Lease(Lease {
            pool: Arc::clone(self),
            worker: Some(worker),
            permits: Some((permit, admitted)),
            graced: false,
        }))
    }

    /// Waits for a worker's permit at the front of the line: passed on by a call that ends,
    /// or, if one is let go some other way, from the pool.
    async fn permit_from_line(
        &self,
        turn: oneshot::Receiver<OwnedSemaphorePermit>,
    ) -> Result<OwnedSemaphorePermit, AcquireError> {
        let mut turn = std::pin::pin!(turn);
        let mut free = std::pin::pin!(Arc::clone(&self.permits).acquire_owned());
        std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(passed) = turn.as_mut().poll(cx) {
                return std::task::Poll::Ready(passed.map_err(|_| AcquireError::Shutdown));
            }
            free.as_mut().poll(cx).map(|free| free.map_err(|_| AcquireError::Shutdown))
        })
        .await
    }

    /// Waits for a free worker's permit, or a place behind a busy worker's call, whichever
    /// comes first. Calls that wait take their turn to go ahead in the order they came; a
    /// call that finds others waiting waits behind them.
    async fn permit_or_ahead(
        self: &Arc<Self>,
        admitted: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<Result<OwnedSemaphorePermit, Ahead>, AcquireError> {
        if self.seeking_ahead.load(Ordering::Relaxed) == 0
            && self.permits.available_permits() == 0
            && let Some(ahead) = self.reserve_ahead(admitted)
        {
            return Ok(Err(ahead));
        }
        self.seeking_ahead.fetch_add(1, Ordering::Relaxed);
        let _seeking = Decrement(&self.seeking_ahead);
        let mut acquire = std::pin::pin!(Arc::clone(&self.permits).acquire_owned());
        loop {
            let mut opened = std::pin::pin!(self.opened.notified());
            let permit = std::future::poll_fn(|cx| match acquire.as_mut().poll(cx) {
                std::task::Poll::Ready(permit) => std::task::Poll::Ready(Some(permit)),
                std::task::Poll::Pending => opened.as_mut().poll(cx).map(|()| None),
            })
            .await;
            match permit {
                // A turn to go ahead that came with the permit passes to the next call as
                // `opened` is dropped (Tokio's `Notified` does that).
                Some(permit) => return Ok(Ok(permit.map_err(|_| AcquireError::Shutdown)?)),
                None => {
                    if let Some(ahead) = self.reserve_ahead(admitted) {
                        return Ok(Err(ahead));
                    }
                }
            }
        }
    }

    /// Turns the held slot into a live worker.
    async fn ready_worker(&self, held: &mut HeldSlot<'_>) -> Result<Worker, AcquireError> {
        loop {
            let slot = held.slot.as_mut().expect("held until taken");
            match slot {
                Slot::Ready(worker) if !worker.is_broken() => break,
                Slot::Ready(_) => {
                    let Some(Slot::Ready(dead)) = held.slot.replace(self.start_worker()) else {
                        unreachable!()
                    };
                    tracing::warn!(target: "offload::pool",
                        pool = self.name,
                        pid = dead.pid,
                        "offload worker sent data nobody asked for; replacing it"
                    );
                    self.metrics.restarted(RestartCause::Protocol);
                    drop(dead.end(Ending::Kill, Cause::Restart(RestartCause::Protocol)));
                }
                Slot::Starting(starting) => {
                    let started = starting
                        .await
                        .unwrap_or_else(|_| Err(io::Error::other("the spawner thread is gone")));
                    match started {
                        Ok(worker) => {
                            lock(&self.backoff).succeeded();
                            *slot = Slot::Ready(worker);
                        }
                        Err(e) => {
                            *slot = Slot::Empty;
                            if self.is_closed() {
                                return Err(AcquireError::Shutdown);
                            }
                            lock(&self.backoff).failed(&e);
                            tracing::error!(target: "offload::pool", pool = self.name, error = %e, "offload worker failed to start");
                            return Err(AcquireError::Spawn(e));
                        }
                    }
                }
                Slot::Empty if self.is_closed() => return Err(AcquireError::Shutdown),
                Slot::Empty => {
                    if let Some(refusal) = lock(&self.backoff).refusal() {
                        return Err(AcquireError::Spawn(refusal));
                    }
                    *slot = self.start_worker();
                }
            }
        }
        let Some(Slot::Ready(worker)) = held.slot.take() else { unreachable!() };
        Ok(worker)
    }

    /// Starts every worker now and waits until all have completed their handshake.
    pub(crate) async fn warm_up(self: &Arc<Self>) -> Result<(), AcquireError> {
        let workers = u32::try_from(self.settings.workers.get()).unwrap_or(u32::MAX);
        let _all = Arc::clone(&self.permits)
            .acquire_many_owned(workers)
            .await
            .map_err(|_| AcquireError::Shutdown)?;
        let slots: Vec<Slot> = std::mem::take(&mut *lock(&self.slots));
        let mut result = Ok(());
        for slot in slots {
            let mut held = HeldSlot { pool: self, slot: Some(slot) };
            match self.ready_worker(&mut held).await {
                Ok(worker) => held.slot = Some(Slot::Ready(worker)),
                Err(e) => result = result.and(Err(e)),
            }
        }
        result
    }

    /// Refuses new calls and wakes queued ones with [`AcquireError::Shutdown`].
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(admission) = &self.admission {
            admission.close();
        }
        self.permits.close();
        // Calls in the line, and calls sent ahead that have not started, end as queued calls
        // do.
        lock(&self.line).clear();
        self.in_line.store(0, Ordering::Relaxed);
        lock(&self.open_pipes).clear();
        let pipes: Vec<Arc<Pipe>> = lock(&self.leased).values().cloned().collect();
        for pipe in pipes {
            for _ in 0..pipe.give_way() {
                self.metrics.withdrawn();
            }
        }
    }

    /// Resolves when no call holds a worker.
    async fn calls_finished(&self) {
        loop {
            let returned = self.returned.notified();
            if lock(&self.leased).is_empty() {
                return;
            }
            returned.await;
        }
    }

    /// Kills workers still lent to calls and ends idle ones.
    fn stop_workers(&self) {
        self.stopped.store(true, Ordering::Release);
        for &pid in lock(&self.leased).keys() {
            supervisor::kill(pid);
        }
        for slot in std::mem::take(&mut *lock(&self.slots)) {
            match slot {
                // Closing its channel tells an idle worker to exit.
                Slot::Ready(worker) => drop(worker.end(Ending::Retire, Cause::Shutdown)),
                // The spawner kills a worker nobody waits for.
                Slot::Starting(_) | Slot::Empty => {}
            }
        }
    }

    /// A snapshot of this pool's figures.
    fn stats(&self, breakers: Vec<(&'static str, BreakerState)>) -> PoolStats {
        let alive = lock(&self.slots).iter().filter(|s| matches!(s, Slot::Ready(_))).count();
        let busy = lock(&self.leased).len();
        let shape = PoolShape {
            name: self.name,
            workers: self.settings.workers.get(),
            alive: alive + busy,
            busy,
            queued: self.waiting.load(Ordering::Relaxed),
            hosts: Vec::new(),
        };
        self.metrics.snapshot(shape, breakers)
    }

    /// A worker done with its call goes back to its slot, or, once shutdown has emptied the
    /// slots, is retired. Checked under the slots lock, which shutdown's emptying takes too.
    fn put_back(&self, worker: Worker) {
        let mut slots = lock(&self.slots);
        if self.is_closed() {
            drop(slots);
            drop(worker.end(Ending::Retire, Cause::Shutdown));
        } else {
            slots.push(Slot::Ready(worker));
        }
    }

    fn unlease(&self, pid: u32) {
        lock(&self.leased).remove(&pid);
        // Only shutdown waits for leases to end, and only after closing the pool.
        if self.is_closed() {
            self.returned.notify_waiters();
        }
    }
}

/// Decrements its counter when dropped.
struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The slot a call should take: the idle worker used last (its caches are warm), else the
/// worker whose start was asked for first (it is ready soonest: the spawner starts workers
/// one after another), else an empty slot.
fn take_slot(slots: &mut Vec<Slot>) -> Slot {
    let ready = slots.iter().rposition(|s| matches!(s, Slot::Ready(_)));
    let index = ready
        .or_else(|| slots.iter().position(|s| matches!(s, Slot::Starting(_))))
        .unwrap_or_else(|| slots.len().checked_sub(1).expect("a permit guarantees a slot"));
    slots.remove(index)
}

/// A slot taken from the pool while a call looks for its worker; given back on drop.
struct HeldSlot<'p> {
    pool: &'p Pool,
    slot: Option<Slot>,
}

impl Drop for HeldSlot<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            lock(&self.pool.slots).push(slot);
        }
    }
}

/// One worker, lent to one call. Dropping the lease without [`Lease::release`] or
/// [`Lease::end`] (the call's future was dropped mid-call) kills the worker, because its
/// state is unknown, and starts a replacement; with a `grace` period, the worker is told
/// first and given the period to return (see [`Lease::try_grace`]).
pub(crate) struct Lease {
    pool: Arc<Pool>,
    worker: Option<Worker>,
    /// The slot's permit and the queue's. Dropped after `Drop::drop` has put the slot back;
    /// moved with the worker when it is given its grace period.
    permits: Option<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>)>,
    /// The worker was given its grace period already: the next end is final.
    graced: bool,
}

impl Lease {
    fn worker(&mut self) -> &mut Worker {
        self.worker.as_mut().expect("present until the lease ends")
    }

    pub(crate) fn pid(&self) -> u32 {
        self.worker.as_ref().expect("present until the lease ends").pid
    }

    /// Sends as much of `message` as the socket takes now: its large byte vectors lent, if
    /// the worker reads this process (see [`crate::lend`]).
    pub(crate) fn start(&mut self, message: &Message<'_>, fds: &[OwnedFd]) -> Result<usize, TransportError> {
        let worker = self.worker();
        worker.pipe().sending();
        let (parts, lent) = message.for_worker(worker.lends());
        if lent {
            self.pool.metrics.lent();
        }
        self.worker().channel().start_send(parts, fds)
    }

    /// Sends the rest of `message` and waits for the reply. Once the call is whole in the
    /// worker's hands, the worker takes a call ahead (see [`pipe`]), unless it is due for
    /// recycling after this one.
    pub(crate) async fn reply(
        &mut self,
        message: &Message<'_>,
        fds: &[OwnedFd],
        sent: usize,
        on_frame: &mut (dyn FnMut(crate::protocol::Tag, &[u8]) -> crate::transport::Pace + Send),
    ) -> Result<Reply<'_>, TransportError> {
        let (parts, _) = message.for_worker(self.worker().lends());
        self.worker().channel().finish_send(parts, fds, sent).await?;
        // Calls that may wait behind this one: as many as the worker runs before `max_tasks`
        // recycles it, after this one (and none once `max_rss` will, see `Pipe::retire`).
        let room = match self.pool.settings.max_tasks {
            _ if self.pool.is_closed() => 0,
            None => usize::MAX,
            Some(max) => usize::try_from(max.saturating_sub(self.worker().calls + 1)).unwrap_or(usize::MAX),
        };
        let (pid, pipe) = (self.pid(), Arc::clone(self.worker().pipe()));
        // Not while calls taken back from a worker wait in the line: they go first, and a
        // call woken to go ahead that may not would lose its place among those waiting.
        if pipe.open(room) && self.pool.in_line.load(Ordering::Relaxed) == 0 {
            let mut open = lock(&self.pool.open_pipes);
            // Checked under the lock that shutdown takes to empty the list once closed.
            if !self.pool.is_closed() && !open.iter().any(|(p, _)| *p == pid) {
                open.push((pid, Arc::clone(&pipe)));
            }
            drop(open);
            self.pool.opened.notify_one();
        }
        let pool = Arc::clone(&self.pool);
        // Taken only when there is something to let go: not a cost of every call.
        let lent = self.worker().lends().filter(|lent| lent.holds()).cloned();
        let reply = self.worker().channel().read_reply(on_frame).await?;
        if matches!(reply.tag, Tag::Return | Tag::Panicked | Tag::Fault) {
            pipe.accept();
            message.answered();
            // It has read whatever it was lent for this call and those before: what calls
            // that ended without its answer left with it may go (see `crate::lend`).
            if let Some(lent) = lent {
                lent.release();
            }
            if pool.plain_waiting.load(Ordering::Relaxed) > 0 {
                // Calls that cannot go ahead wait for a worker: those sent ahead here give way.
                for _ in 0..pipe.give_way() {
                    pool.metrics.withdrawn();
                }
            }
        }
        Ok(reply)
    }

    /// The call ends: no call goes ahead to its worker until the next call's message is
    /// whole.
    fn close_pipe(&mut self) -> Arc<Pipe> {
        let pid = self.pid();
        lock(&self.pool.open_pipes).retain(|(p, _)| *p != pid);
        Arc::clone(self.worker().pipe())
    }

    /// Hands the worker, with this call's permits, to the call sent ahead to it: to run it,
    /// or, if its caller gave up on it once it had started, to end it.
    fn hand_to(&mut self, behind: Behind) {
        self.worker().pipe().passing_to(&behind);
        let lease = Lease {
            pool: Arc::clone(&self.pool),
            worker: self.worker.take(),
            permits: self.permits.take(),
            graced: false,
        };
        match behind.gave_up() {
            None => behind.hand(Handover::Lease(lease)),
            Some(cause) => lease.given_up(cause),
        }
    }

    /// The call the worker passed to was given up on after it started (or part of its frame
    /// went): the worker is ended, unless it is past the call already.
    fn given_up(mut self, cause: RestartCause) {
        if self.settle_ahead(cause != RestartCause::Protocol) {
            return;
        }
        drop(self.end(Ending::Kill, cause));
    }

    /// This call ends without its reply, and its worker would go. The calls sent ahead to
    /// it are taken back (see [`Pipe::take_back`]): those the worker has not claimed look for
    /// a worker again, the first with the worker's permit. If the worker has claimed one,
    /// it is past this call (see [`crate::gate`]): with `may_go_on`, this call's reply is set
    /// aside when it comes, the worker passes to that call, and `true` is returned; without
    /// (the worker broke the protocol or died), the calls it claimed are lost with it.
    fn settle_ahead(&mut self, may_go_on: bool) -> bool {
        let pipe = self.close_pipe();
        // Set aside a reply only from where a frame starts.
        let may_go_on = may_go_on && self.worker().channel().at_frame_start();
        let TakenBack { withdrawn, mut claimed } = pipe.take_back(!may_go_on);
        let goes_on = may_go_on && !claimed.is_empty();
        if withdrawn.iter().any(Behind::partly_sent) {
            // Part of a frame is on the socket: the worker gets no grace period.
            self.graced = true;
        }
        if goes_on {
            self.pool.back_in_line(withdrawn, None);
        } else {
            // Once the worker's replacement has its slot (see `Lease::return_withdrawn`).
            pipe.returning(withdrawn);
            for behind in claimed {
                // The worker runs another call now: no grace period for this one.
                self.graced = true;
                let lost = ProtocolError::Invalid("the worker was lost with the call before this one".into());
                behind.hand(Handover::Lost(Failure::Broken(lost)));
            }
            return false;
        }
        let next = claimed.pop().expect("checked above");
        self.worker().channel().skip_reply();
        self.worker().calls += 1;
        self.hand_to(next);
        true
    }

    /// The worker's replacement has its slot: the calls taken back from the worker look for
    /// a worker again, the first with its permit, keeping its place in line.
    fn return_withdrawn(&mut self, pipe: &Pipe) {
        let returning = pipe.take_returning();
        if returning.is_empty() {
            return;
        }
        let permit = self.permits.as_mut().and_then(|(permit, _)| permit.split(1));
        self.pool.back_in_line(returning, permit);
    }

    /// The buffer that holds the last reply.
    pub(crate) fn take_reply(&mut self) -> Vec<u8> {
        self.worker().channel().take_reply()
    }

    /// The worker was found dead when the call was to be sent: replace it.
    pub(crate) fn died_idle(self) {
        tracing::warn!(target: "offload::pool", pid = self.pid(), "offload worker died while idle; replacing it");
        drop(self.end(Ending::Exited, RestartCause::DiedIdle));
    }

    /// The call ran past its deadline: kill the worker and replace it, or, with a grace
    /// period, give it the period to return in the background.
    pub(crate) async fn timed_out(mut self, may_grace: bool) {
        if self.settle_ahead(true) {
            return;
        }
        let lease = if may_grace { self.try_grace(RestartCause::Timeout) } else { Some(self) };
        if let Some(lease) = lease {
            let _ended = lease.end(Ending::Kill, RestartCause::Timeout).await;
        }
    }

    /// With a `grace` period, and the call in the worker's hands: tells the worker its call
    /// is cancelled (`offload::cancelled()` turns true there), and gives it the period to
    /// return, in a task of its own, so that the caller does not wait for it. A worker that
    /// returns in time serves the next call (its reply is set aside); one that does not is
    /// killed, as it is at once without a grace period. The kill does not depend on that task
    /// being polled: a thread of its own kills the worker when the period is over, unless the
    /// task took it back first. Gives the lease back when there is nothing to wait for: no
    /// grace period, no runtime to wait on, a call not yet whole in the worker's hands, a pool
    /// that is stopping.
    fn try_grace(mut self, cause: RestartCause) -> Option<Lease> {
        let Some(grace) = self.pool.settings.grace else { return Some(self) };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return Some(self) };
        if self.graced || self.pool.is_closed() || !self.worker().channel().awaiting_reply() {
            return Some(self);
        }
        let pid = self.pid();
        // Set by whoever acts first: the task (the worker returned, or it ends it) or the
        // thread (the period is over). Under this lock the worker is never reaped, so the
        // thread's kill cannot reach another process.
        let settled = Arc::new(Mutex::new(false));
        let theirs = Arc::clone(&settled);
        let watch = std::thread::Builder::new().name("offload-grace".into()).spawn(move || {
            std::thread::sleep(grace);
            let mut settled = lock(&theirs);
            if !*settled {
                *settled = true;
                supervisor::kill(pid);
            }
        });
        if watch.is_err() {
            // No thread to enforce the period: no period.
            return Some(self);
        }
        self.graced = true;
        // The worker stays this call's for the period: the calls taken back from it look for
        // another now.
        let returning = self.worker().pipe().take_returning();
        self.pool.back_in_line(returning, None);
        supervisor::signal_cancel(pid);
        runtime.spawn(async move {
            let returned = tokio::time::timeout(grace, async {
                self.worker()
                    .channel()
                    .read_reply(&mut |_, _| crate::transport::Pace::Continue)
                    .await
                    .is_ok_and(|reply| matches!(reply.tag, Tag::Return | Tag::Panicked | Tag::Fault))
            })
            .await;
            let kept = {
                let mut settled = lock(&settled);
                let kept = !*settled && returned == Ok(true);
                *settled = true;
                kept
            };
            if kept {
                // The reply is set aside, and the worker serves the next call.
                if let Some(lent) = self.worker().lends() {
                    lent.release();
                }
                self.worker().pipe().accept();
                self.release();
            } else {
                tracing::warn!(target: "offload::pool", pool = self.pool.name, pid, ?grace,
                    "offload worker did not return a reply within its grace period; killed");
                drop(self.end(Ending::Kill, cause));
            }
        });
        None
    }

    /// The worker sent a frame the protocol does not allow here: kill it and replace it.
    pub(crate) fn broke_protocol(mut self) {
        self.settle_ahead(false);
        drop(self.end(Ending::Kill, RestartCause::Protocol));
    }

    /// Ends the worker after the exchange failed with `error`, and says how it failed; or,
    /// with `may_look_again`, that the worker died before it claimed the call (see
    /// [`crate::gate`]): then the call never started, and looks for another worker, first in
    /// line, with the permit of this one, whose replacement is the call's.
    pub(crate) async fn failed(mut self, error: TransportError, may_look_again: bool) -> Failed {
        let closed = matches!(error, TransportError::Closed | TransportError::NotSent);
        if closed && may_look_again && !self.pool.is_closed() && self.worker().pipe().unstarted() {
            let carried = Carried {
                turn: self.permits.as_mut().and_then(|(permit, _)| permit.split(1)).map(Turn::Permit),
                admitted: self.permits.as_mut().and_then(|(_, admitted)| admitted.take()),
            };
            tracing::warn!(target: "offload::pool", pid = self.pid(), "offload worker died between calls; replacing it");
            // The calls sent ahead behind this one never started either.
            self.settle_ahead(false);
            drop(self.end(Ending::Exited, RestartCause::DiedIdle));
            return Failed::NotStarted(carried);
        }
        self.settle_ahead(false);
        let pid = self.pid();
        if self.pool.is_stopped() {
            // Killed by shutdown once its grace was over. (A worker that dies on its own
            // during the grace period is a crash, reported as one below.)
            drop(self.end(Ending::Kill, RestartCause::Crashed));
            return Failed::Ended(Failure::Stopped);
        }
        Failed::Ended(match error {
            TransportError::Closed | TransportError::NotSent => self.crashed().await,
            TransportError::Io(e) => {
                drop(self.end(Ending::Kill, RestartCause::Protocol));
                Failure::Broken(ProtocolError::Invalid(format!("the channel to worker {pid} failed: {e}")))
            }
            TransportError::Protocol(kind) => {
                drop(self.end(Ending::Kill, RestartCause::Protocol));
                tracing::error!(target: "offload::pool", %kind, "offload worker broke the protocol; killed");
                Failure::Broken(kind)
            }
        })
    }

    /// The worker's channel closed mid-call: wait for it to end and say how.
    async fn crashed(self) -> Failure {
        let pool = Arc::clone(&self.pool);
        let (exit, stderr, out_of_memory) = match self.end_crashed().await {
            Ok(info) => {
                let out_of_memory = info.ran_out_of_memory();
                (info.reason, info.stderr, out_of_memory)
            }
            Err(_) => (ExitReason::Unknown, Vec::new(), false),
        };
        if let Some(limit) = pool.settings.memory
            && out_of_memory
        {
            pool.metrics.restarted(RestartCause::MemoryLimit);
            tracing::error!(target: "offload::pool", limit, "offload worker ran out of memory");
            return Failure::MemoryLimit { limit };
        }
        pool.metrics.restarted(RestartCause::Crashed);
        tracing::error!(target: "offload::pool", %exit, "offload worker crashed");
        Failure::Crashed { exit, stderr }
    }

    /// The call went well: the worker goes back to the pool, or is replaced if it has served
    /// `max_tasks` calls or its resident memory is above `max_rss`.
    pub(crate) fn release(mut self) {
        let pipe = self.close_pipe();
        self.worker().calls += 1;
        let worker = self.worker.as_ref().expect("present until the lease ends");
        let settings = &self.pool.settings;
        let worn_out = settings.max_tasks.is_some_and(|max| worker.calls >= max);
        let bloated =
            settings.max_rss.is_some_and(|max| worker.resident_bytes().is_some_and(|rss| rss > max));
        // Retiring: found due for recycling after an earlier call, whose calls sent ahead
        // ran first.
        let worn_out = worn_out || pipe.retiring();
        if worn_out || bloated || self.pool.is_closed() {
            // The worker goes: the calls sent ahead to it look for another, but for those it
            // has claimed, which it runs first.
            pipe.retire();
            // The worker's permit, freed as the lease ends, goes to the first of them.
            self.pool.back_in_line(pipe.unclaimed(), None);
        }
        loop {
            let (next, others) = pipe.close(&self.pool.metrics);
            self.pool.back_in_line(others, None);
            let Some(next) = next else { break };
            // Only part of its frame went: the worker is ended when it comes to it, whatever
            // became of the call.
            if next.partly_sent() || pipe.runs(&next) {
                return self.hand_to(next);
            }
            // Its deadline passed before the worker came to it: it never runs, and ends as a
            // queued call does.
            self.pool.metrics.withdrawn();
            next.hand(Handover::Again(None));
        }
        let worker = self.worker.take().expect("present until the lease ends");
        let pid = worker.pid;
        if (worn_out || bloated) && !self.pool.is_closed() {
            tracing::info!(target: "offload::pool",
                pool = self.pool.name,
                pid = worker.pid,
                calls = worker.calls,
                cause = if worn_out { "max_tasks" } else { "max_rss" },
                "offload worker recycled"
            );
            self.pool.metrics.restarted(RestartCause::Recycled);
            lock(&self.pool.slots).push(self.pool.start_worker());
            drop(worker.end(Ending::Retire, Cause::Restart(RestartCause::Recycled)));
        } else {
            self.pool.put_back(worker);
        }
        // Last: shutdown, woken by this, must find the worker in its slot or already ended.
        self.pool.unlease(pid);
    }

    /// The call never used the worker (its deadline passed as it got one): give it back
    /// without counting a call.
    pub(crate) fn release_unused(mut self) {
        let worker = self.worker.take().expect("present until the lease ends");
        let pid = worker.pid;
        self.pool.put_back(worker);
        self.pool.unlease(pid);
    }

    /// The worker must go: end it as `how` says, count the restart, and start its
    /// replacement.
    fn end(self, how: Ending, cause: RestartCause) -> oneshot::Receiver<ExitInfo> {
        if !self.pool.is_closed() {
            self.pool.metrics.restarted(cause);
        }
        self.replace(how, Cause::Restart(cause))
    }

    /// The worker's channel closed mid-call: wait for it to exit and start its replacement.
    /// The caller counts the restart once it knows from the exit whether it was a crash or
    /// the memory limit.
    fn end_crashed(self) -> oneshot::Receiver<ExitInfo> {
        self.replace(Ending::Exited, Cause::Restart(RestartCause::Crashed))
    }

    fn replace(mut self, how: Ending, cause: Cause) -> oneshot::Receiver<ExitInfo> {
        let pipe = Arc::clone(self.worker().pipe());
        let worker = self.worker.take().expect("present until the lease ends");
        let pid = worker.pid;
        lock(&self.pool.slots).push(self.pool.start_worker());
        self.return_withdrawn(&pipe);
        let ended = worker.end(how, cause);
        self.pool.unlease(pid);
        ended
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.end_lease();
        // The worker's permit is free now (unless it went to a call sent ahead): a call sent
        // ahead behind a long call elsewhere may take it.
        if let Some((permit, admitted)) = self.permits.take() {
            drop(admitted);
            self.pool.free_permit(permit);
        }
    }
}

impl Lease {
    fn end_lease(&mut self) {
        if let Some(worker) = self.worker.take() {
            let mut lease = Lease {
                pool: Arc::clone(&self.pool),
                worker: Some(worker),
                permits: self.permits.take(),
                graced: self.graced,
            };
            if lease.settle_ahead(true) {
                return;
            }
            if let Some(lease) = lease.try_grace(RestartCause::Abandoned) {
                lease.abandon();
            }
        }
    }
}

impl Lease {
    /// The call's future was dropped mid-call: kill the worker, whose state is unknown.
    fn abandon(mut self) {
        let worker = self.worker.take().expect("present until the lease ends");
        tracing::warn!(target: "offload::pool",
            pool = self.pool.name,
            pid = worker.pid,
            "offload call abandoned; killing its worker"
        );
        let pid = worker.pid;
        self.pool.metrics.restarted(RestartCause::Abandoned);
        lock(&self.pool.slots).push(self.pool.start_worker());
        self.return_withdrawn(worker.pipe());
        drop(worker.end(Ending::Kill, Cause::Restart(RestartCause::Abandoned)));
        self.pool.unlease(pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_bounded() {
        let mut backoff = Backoff::default();
        assert!(backoff.refusal().is_none());
        let error = io::Error::other("boom");
        backoff.failed(&error);
        assert!(backoff.refusal().is_none(), "one failure is retried at once");
        let first = backoff.retry_at.unwrap().duration_since(Instant::now());
        assert!(first <= BACKOFF_START, "{first:?}");
        for _ in 0..40 {
            backoff.failed(&error);
        }
        let last = backoff.retry_at.unwrap().duration_since(Instant::now());
        assert!(last <= BACKOFF_MAX && last > BACKOFF_MAX / 2, "{last:?}");
        let refusal = backoff.refusal().unwrap().to_string();
        assert!(refusal.contains("failed to start 41 times in a row (last: boom)"), "{refusal}");
        backoff.succeeded();
        assert!(backoff.refusal().is_none());
    }
}
