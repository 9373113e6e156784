//! The seam between what a call is and where it runs.
//!
//! [`crate::call`] owns what a call is: its encoding, deadline, breaker, fallback, figures,
//! span, and the errors its caller sees. An [`Executor`] owns where it runs: it finds a
//! [`Place`] for the call (a worker process of a local pool: [`crate::pool`]; or, with the
//! `nats` feature, a slot on another host: `crate::remote`), carries the frames there and
//! back, and, when the place fails, ends it and says how ([`Failure`]). Which executor
//! serves a pool is a matter of its settings ([`Placement`]).

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, ProtocolError};
use crate::lend::Message;
pub(crate) use crate::pool::pipe::Carried;
use crate::pool::pipe::{Ahead, GaveUp, Handover, Start};
use crate::pool::{self, Acquired, Lease, Pool};
use crate::registry::{Entry, Registry};
use crate::settings::{Placement, PoolSettings};
use crate::stats::{BreakerState, PoolMetrics, PoolStats};

pub(crate) use crate::error::Failure;
pub(crate) use crate::pool::AcquireError;
pub(crate) use crate::transport::{Pace, Reply};

/// Where one pool's calls run.
pub(crate) enum Executor {
    /// Worker processes of this process.
    Local(Arc<Pool>),
    /// Worker hosts, through a broker.
    #[cfg(feature = "nats")]
    Remote(Arc<crate::remote::Pool>),
}

/// The executor serving `entry`, started if it is not running yet, or why it cannot be (its
/// settings are bad or conflict with another function's in a shared pool).
pub(crate) fn for_entry(entry: &'static Entry) -> Result<Executor, String> {
    let options = Registry::get().options(entry)?;
    let settings = PoolSettings::resolve(entry.pool_label(), options)?;
    match &settings.placement {
        Placement::Local => {
            Ok(Executor::Local(pool::get_or_start(entry.pool_key(), entry.pool_label(), settings)))
        }
        #[cfg(feature = "nats")]
        Placement::Remote(url) => {
            let url = url.clone();
            crate::remote::Pool::get_or_start(entry.pool_key(), entry.pool_label(), &url, settings)
                .map(Executor::Remote)
        }
        #[cfg(not(feature = "nats"))]
        Placement::Remote(_) => Err(format!(
            "{} asks for remote hosts, but offload was built without its `nats` feature",
            crate::settings::remote_variable(entry.pool_label())
        )),
    }
}

/// Whether [`shutdown`] has begun.
pub(crate) fn is_shut_down() -> bool {
    pool::is_shut_down()
}

/// Stops every executor; see [`crate::shutdown`].
pub(crate) async fn shutdown(grace: Duration) {
    #[cfg(feature = "nats")]
    let deadline = tokio::time::Instant::now() + grace;
    pool::shutdown(grace).await;
    #[cfg(feature = "nats")]
    crate::remote::shutdown(deadline).await;
}

/// Starts every executor's workers now; see [`crate::warm_up`].
pub(crate) async fn warm_up_all() -> Result<(), Error> {
    let mut seen: Vec<Arc<Pool>> = Vec::new();
    for entry in Registry::get().entries() {
        let executor = for_entry(entry).map_err(|message| Error::Config { entry: entry.name(), message })?;
        #[allow(irrefutable_let_patterns)]
        let Executor::Local(pool) = executor else {
            // Remote hosts start their own workers.
            continue;
        };
        if seen.iter().any(|p| Arc::ptr_eq(p, &pool)) {
            continue;
        }
        pool.warm_up().await.map_err(|e| e.into_error(entry.name()))?;
        seen.push(pool);
    }
    Ok(())
}

/// Every executor's figures; see [`crate::stats`].
pub(crate) fn stats(breakers: impl Fn(&str) -> Vec<(&'static str, BreakerState)>) -> Vec<PoolStats> {
    #[allow(unused_mut)]
    let mut all = pool::stats(&breakers);
    #[cfg(feature = "nats")]
    {
        all.extend(crate::remote::stats(&breakers));
        all.sort_by_key(|s| s.name);
    }
    all
}

impl Executor {
    pub(crate) fn settings(&self) -> &PoolSettings {
        match self {
            Executor::Local(pool) => &pool.settings,
            #[cfg(feature = "nats")]
            Executor::Remote(pool) => pool.settings(),
        }
    }

    pub(crate) fn metrics(&self) -> &PoolMetrics {
        match self {
            Executor::Local(pool) => &pool.metrics,
            #[cfg(feature = "nats")]
            Executor::Remote(pool) => pool.metrics(),
        }
    }

    /// How many calls can run at once: how many places a call may find unusable before it
    /// gives up looking (every worker may have died while idle), and what a map keeps busy.
    pub(crate) fn places(&self) -> usize {
        match self {
            Executor::Local(pool) => pool.settings.workers.get(),
            #[cfg(feature = "nats")]
            Executor::Remote(pool) => pool.places(),
        }
    }

    /// Waits for a place to run a call: admission to the queue, then a free worker (or, for
    /// a small call when none is free, a busy worker it is sent ahead to: `message` goes
    /// there at once). Cancel-safe.
    /// A call withdrawn from a worker it was sent ahead to brings what it kept of its place
    /// in line (`carried`, from [`Place::turn`]).
    pub(crate) async fn acquire(
        &self,
        message: &Message<'_>,
        fds: &[OwnedFd],
        carried: Carried,
    ) -> Result<Place, AcquireError> {
        match self {
            Executor::Local(pool) => {
                pool.acquire(pool::pipe::may_go_ahead(message.whole, fds), carried).await.map(Place::local)
            }
            #[cfg(feature = "nats")]
            Executor::Remote(pool) => pool.acquire().await.map(Place::Remote),
        }
    }
}

/// Where one call runs: a worker lent to it. Dropped without [`Place::done`] or one of the
/// ways to end it (the call's future was dropped midway), it is killed and replaced.
pub(crate) enum Place {
    Local(Lease),
    /// Sent ahead to a busy local worker: the worker is the call's once the call before ends.
    Ahead(Ahead),
    #[cfg(feature = "nats")]
    Remote(crate::remote::Lease),
}

/// What a place that is not a local worker needs to know of the call it is sent.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "nats"), allow(dead_code))]
pub(crate) struct Sending {
    pub(crate) entry: &'static Entry,
    /// The call's deadline.
    pub(crate) end: Instant,
    /// The function streams items: a call of it must not run twice.
    pub(crate) streams: bool,
}

/// Why frames could not be exchanged with a [`Place`]; [`Place::failed`] says what it means.
pub(crate) enum Fault {
    Local(crate::transport::TransportError),
    /// A call sent ahead started, and its worker was lost with the call before it.
    Lost(Failure),
    #[cfg(feature = "nats")]
    Remote(Failure),
}

impl Fault {
    /// Nothing of the call reached the place: it was gone before the call came (a worker
    /// that died while idle), and another may take the call.
    pub(crate) fn nothing_sent(&self) -> bool {
        matches!(self, Fault::Local(crate::transport::TransportError::NotSent))
    }
}

impl Place {
    /// A place behind a busy worker's call: one that cannot take the call gives no sign
    /// that workers die while idle.
    pub(crate) fn is_ahead(&self) -> bool {
        matches!(self, Place::Ahead(_))
    }

    fn local(acquired: Acquired) -> Place {
        match acquired {
            Acquired::Lease(lease) => Place::Local(lease),
            Acquired::Ahead(ahead) => Place::Ahead(ahead),
        }
    }

    /// The worker's pid, for the call's span and errors; 0 while it has none.
    pub(crate) fn id(&self) -> u32 {
        match self {
            Place::Local(lease) => lease.pid(),
            Place::Ahead(ahead) => ahead.pid(),
            #[cfg(feature = "nats")]
            Place::Remote(lease) => lease.pid(),
        }
    }

    /// The host the call runs on, when it is not this one.
    pub(crate) fn host(&self) -> Option<&str> {
        match self {
            Place::Local(_) | Place::Ahead(_) => None,
            #[cfg(feature = "nats")]
            Place::Remote(lease) => Some(lease.host()),
        }
    }

    /// Gives the place back unused: the call will not run.
    pub(crate) fn give_back(self) {
        match self {
            Place::Local(lease) => lease.release_unused(),
            Place::Ahead(ahead) => {
                if let GaveUp::Started(Some(lease)) = ahead.give_up(crate::stats::RestartCause::Abandoned) {
                    drop(lease);
                }
            }
            #[cfg(feature = "nats")]
            Place::Remote(lease) => lease.release(),
        }
    }

    /// Sends as much of the call as can go at once; how many bytes that was.
    pub(crate) fn start(
        &mut self,
        message: &Message<'_>,
        fds: &[OwnedFd],
        sending: Sending,
    ) -> Result<usize, Fault> {
        match self {
            Place::Local(lease) => {
                let _ = sending;
                lease.start(message, fds).map_err(Fault::Local)
            }
            Place::Ahead(ahead) => match ahead.start(message.whole, sending.end) {
                Start::Written(sent) => Ok(sent),
                Start::NotSent => Err(Fault::Local(crate::transport::TransportError::NotSent)),
                // The call before ended first: the worker is idle, and takes the call the
                // ordinary way.
                Start::Handed(mut lease) => {
                    let sent = lease.start(message, fds).map_err(Fault::Local);
                    *self = Place::Local(*lease);
                    sent
                }
            },
            #[cfg(feature = "nats")]
            Place::Remote(lease) => {
                let Sending { entry, end, streams } = sending;
                lease.start(message.whole, fds, (entry, end, streams)).map_err(Fault::Remote)
            }
        }
    }

    /// Waits until the place is the call's own: at once, unless the call was sent ahead to a
    /// busy worker; then until the call before it there ends. `Some`: the call was withdrawn
    /// from there before it started, and looks for a place again with what it kept of its
    /// place in line.
    pub(crate) async fn turn(&mut self) -> Result<Option<Carried>, Fault> {
        let Place::Ahead(ahead) = self else { return Ok(None) };
        match ahead.turn().await {
            Handover::Lease(lease) => {
                *self = Place::Local(lease);
                Ok(None)
            }
            Handover::Again(_) => Ok(Some(ahead.carried())),
            Handover::Lost(failure) => Err(Fault::Lost(failure)),
        }
    }

    /// Sends the rest of the call and waits for its reply; log, progress and item frames
    /// before it go to `on_frame`.
    pub(crate) async fn reply(
        &mut self,
        message: &Message<'_>,
        fds: &[OwnedFd],
        sent: usize,
        on_frame: &mut (dyn FnMut(crate::protocol::Tag, &[u8]) -> Pace + Send),
    ) -> Result<Reply<'_>, Fault> {
        match self {
            Place::Local(lease) => lease.reply(message, fds, sent, on_frame).await.map_err(Fault::Local),
            Place::Ahead(_) => unreachable!("a call sent ahead has its worker before it reads"),
            #[cfg(feature = "nats")]
            Place::Remote(lease) => lease.reply(on_frame).await.map_err(Fault::Remote),
        }
    }

    /// Takes the buffer that holds the last reply, to decode it elsewhere.
    pub(crate) fn take_reply(&mut self) -> Vec<u8> {
        match self {
            Place::Local(lease) => lease.take_reply(),
            Place::Ahead(_) => {
                unreachable!("a reply comes from a worker of the call's own")
            }
            #[cfg(feature = "nats")]
            Place::Remote(lease) => lease.take_reply(),
        }
    }

    /// The call is answered: the place serves the next one.
    pub(crate) fn done(self) {
        match self {
            Place::Local(lease) => lease.release(),
            Place::Ahead(_) => {
                unreachable!("a reply comes from a worker of the call's own")
            }
            #[cfg(feature = "nats")]
            Place::Remote(lease) => lease.release(),
        }
    }

    /// The place was gone before the call reached it ([`Fault::nothing_sent`]). What a call
    /// sent ahead keeps of its place in line, for its next [`Executor::acquire`].
    pub(crate) fn discard_unused(self) -> Carried {
        match self {
            Place::Local(lease) => lease.died_idle(),
            Place::Ahead(mut ahead) => return ahead.carried(),
            #[cfg(feature = "nats")]
            Place::Remote(lease) => lease.release(),
        }
        Carried::default()
    }

    /// The call's deadline passed while it ran: the place is ended.
    /// With `may_grace`, the place may get a grace period to return (see `grace`). Says
    /// whether the call had started: a call sent ahead may not have.
    pub(crate) async fn timed_out(self, may_grace: bool) -> bool {
        match self {
            Place::Local(lease) => lease.timed_out(may_grace).await,
            Place::Ahead(ahead) => match ahead.give_up(crate::stats::RestartCause::Timeout) {
                GaveUp::Withdrawn => return false,
                GaveUp::Started(Some(lease)) => lease.timed_out(false).await,
                GaveUp::Started(None) => {}
            },
            #[cfg(feature = "nats")]
            Place::Remote(lease) => lease.cancel(),
        }
        true
    }

    /// The place sent something the protocol does not allow here: it is ended.
    pub(crate) fn broke_protocol(self) {
        match self {
            Place::Local(lease) => lease.broke_protocol(),
            Place::Ahead(_) => {
                unreachable!("a reply comes from a worker of the call's own")
            }
            #[cfg(feature = "nats")]
            Place::Remote(lease) => lease.cancel(),
        }
    }

    /// Ends a place whose exchange failed with `fault`, and says how it failed; or, with
    /// `may_look_again`, that the place was gone before the call started there (its worker
    /// died between calls), so that the call may look for another.
    pub(crate) async fn failed(self, fault: Fault, may_look_again: bool) -> Failed {
        match (self, fault) {
            (Place::Local(lease), Fault::Local(fault)) => lease.failed(fault, may_look_again).await,
            (_, Fault::Lost(failure)) => Failed::Ended(failure),
            // Not reached: a call sent ahead fails to start only with `NotSent`, which looks
            // for another place.
            (Place::Ahead(_), Fault::Local(fault)) => Failed::Ended(Failure::Broken(ProtocolError::Invalid(
                format!("a call sent ahead could not be sent: {fault:?}"),
            ))),
            #[cfg(feature = "nats")]
            (Place::Remote(lease), Fault::Remote(failure)) => {
                // Unless the host ended the call itself, it is told to stop it.
                lease.cancel();
                Failed::Ended(failure)
            }
            #[cfg(feature = "nats")]
            _ => unreachable!("a place's faults are its own kind"),
        }
    }
}

/// How a place whose exchange failed ended ([`Place::failed`]).
pub(crate) enum Failed {
    /// It failed the call.
    Ended(Failure),
    /// It was gone before the call started there: the call never ran, and looks for another
    /// place with what it keeps of its place in line.
    NotStarted(Carried),
}
