//! Pools of worker processes: one per pool name, started on first use, never tied to a
//! Tokio runtime.
//!
//! A pool has one *slot* per worker and a semaphore with one permit per slot. A call takes a
//! permit (waiting in FIFO order when all workers are busy: that is the queue), then takes a
//! slot: a ready worker, a worker still starting, or an empty slot to start one in. It gives
//! the slot back when done, or, if the worker died or was killed, puts a replacement that is
//! already starting in its place. So the pool heals itself and never gets stuck broken.

pub(crate) mod supervisor;

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use self::supervisor::{Ending, ExitInfo, Worker};
use crate::registry::PoolSettings;

/// The pool serving `key`, started with `settings` if it is the first use.
pub(crate) fn get_or_start(key: &'static str, settings: PoolSettings) -> Arc<Pool> {
    static POOLS: LazyLock<Mutex<HashMap<&'static str, Arc<Pool>>>> = LazyLock::new(Default::default);
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    Arc::clone(pools.entry(key).or_insert_with(|| Pool::start(key, settings)))
}

pub(crate) struct Pool {
    name: &'static str,
    /// Proves to the pool that a worker is one of its own.
    secret: [u8; 16],
    permits: Arc<Semaphore>,
    slots: Mutex<Vec<Slot>>,
}

enum Slot {
    Ready(Worker),
    Starting(oneshot::Receiver<io::Result<Worker>>),
    /// Its last start failed; the next call tries again.
    Empty,
}

/// Why a call could not get a worker.
#[derive(Debug)]
pub(crate) enum AcquireError {
    Spawn(io::Error),
}

impl Pool {
    fn start(name: &'static str, settings: PoolSettings) -> Arc<Pool> {
        let size = settings.workers.resolve();
        let mut secret = [0u8; 16];
        fill_random(&mut secret);
        let slots = (0..size.get()).map(|_| Slot::Starting(supervisor::spawn(secret))).collect();
        tracing::info!(pool = name, workers = size.get(), "offload pool starting");
        Arc::new(Pool {
            name,
            secret,
            permits: Arc::new(Semaphore::new(size.get())),
            slots: Mutex::new(slots),
        })
    }

    fn slots(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a free worker, starting one if its slot is empty. Cancel-safe: a dropped
    /// future gives back its permit and its slot.
    pub(crate) async fn acquire(self: &Arc<Self>) -> Result<Lease, AcquireError> {
        let permit =
            Arc::clone(&self.permits).acquire_owned().await.expect("the pool's semaphore is never closed");
        let slot = self.slots().pop().expect("a permit guarantees a slot");
        let mut held = HeldSlot { pool: self, slot: Some(slot) };
        loop {
            let slot = held.slot.as_mut().expect("held until taken");
            match slot {
                Slot::Ready(worker) if !worker.channel.is_broken() => break,
                Slot::Ready(_) => {
                    let Some(Slot::Ready(dead)) =
                        held.slot.replace(Slot::Starting(supervisor::spawn(self.secret)))
                    else {
                        unreachable!()
                    };
                    tracing::warn!(
                        pool = self.name,
                        pid = dead.pid,
                        "offload worker died while idle; replacing it"
                    );
                    drop(dead.end(Ending::Exited));
                }
                Slot::Starting(starting) => match starting.await {
                    Ok(Ok(worker)) => *slot = Slot::Ready(worker),
                    Ok(Err(e)) => {
                        *slot = Slot::Empty;
                        return Err(AcquireError::Spawn(e));
                    }
                    Err(_) => {
                        *slot = Slot::Empty;
                        return Err(AcquireError::Spawn(io::Error::other(
                            "the offload spawner thread is gone",
                        )));
                    }
                },
                Slot::Empty => *slot = Slot::Starting(supervisor::spawn(self.secret)),
            }
        }
        let Some(Slot::Ready(worker)) = held.slot.take() else { unreachable!() };
        Ok(Lease { pool: Arc::clone(self), worker: Some(worker), _permit: permit })
    }
}

/// A slot taken from the pool while a call looks for its worker; given back on drop.
struct HeldSlot<'p> {
    pool: &'p Pool,
    slot: Option<Slot>,
}

impl Drop for HeldSlot<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.pool.slots().push(slot);
        }
    }
}

/// One worker, lent to one call. Dropping the lease without [`Lease::release`] or
/// [`Lease::end`] (the call's future was dropped mid-call) kills the worker, because
/// its state is unknown, and starts a replacement.
pub(crate) struct Lease {
    pool: Arc<Pool>,
    worker: Option<Worker>,
    // Dropped after `Drop::drop` has put the slot back.
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    pub(crate) fn worker(&mut self) -> &mut Worker {
        self.worker.as_mut().expect("present until the lease ends")
    }

    /// The call went well: the worker goes back to the pool.
    pub(crate) fn release(mut self) {
        let worker = self.worker.take().expect("present until the lease ends");
        self.pool.slots().push(Slot::Ready(worker));
    }

    /// The worker must go: end it as `how` says and start its replacement.
    pub(crate) fn end(mut self, how: Ending) -> oneshot::Receiver<ExitInfo> {
        let worker = self.worker.take().expect("present until the lease ends");
        self.replace();
        worker.end(how)
    }

    fn replace(&self) {
        self.pool.slots().push(Slot::Starting(supervisor::spawn(self.pool.secret)));
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(worker) = self.worker.take() {
            tracing::warn!(
                pool = self.pool.name,
                pid = worker.pid,
                "offload call abandoned; killing its worker"
            );
            drop(worker.end(Ending::Kill));
            self.replace();
        }
    }
}

fn fill_random(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        match rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            // Without the kernel's randomness, fall back to what std seeds its hashers with.
            Err(_) => {
                use std::hash::{BuildHasher, RandomState};
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = RandomState::new().hash_one(i) as u8;
                }
                return;
            }
        }
    }
}
