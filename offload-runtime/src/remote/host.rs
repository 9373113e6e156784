//! Serve mode: the same binary, started with `OFFLOAD_SERVE=nats://broker:4222`, does not
//! run `main`. Before `main`, it starts its local pools (its own settings and environment),
//! says it is there, and runs the calls that come to it until SIGTERM or SIGINT; then it
//! stops taking calls, gives the running ones `OFFLOAD_SERVE_GRACE` (10 s unless set) to
//! end, stops the rest, and exits.
//!
//! A call runs through [`call::run`] on this host's local pool, as a local call does, under
//! the caller's deadline; what its worker sends (logs, progress, items, the reply) is relayed
//! to the caller as it comes.

use std::collections::HashMap;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, Message};
use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::AbortHandle;

use super::caller::frame_answer;
use super::wire::{self, Answer, CallHead, Failure, Presence};
use super::{Config, PREFETCH, PRESENCE_EVERY};
use crate::call::{self, Decode};
use crate::error::{Error, ProtocolError};
use crate::executor::{self, Pace};
use crate::protocol::{Attached, PanicReport, Tag};
use crate::registry::{Entry, Registry};

/// The variable that starts serve mode.
const SERVE: &str = "OFFLOAD_SERVE";
/// After how long a running call tells its caller which worker runs it.
const STARTED_AFTER: Duration = Duration::from_millis(5);
/// How many calls cancelled before they came are remembered.
const EARLY_CANCELS: usize = 1024;
/// How long running calls get to end after SIGTERM.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// Serves calls and exits, if `OFFLOAD_SERVE` is set; returns otherwise. Runs before `main`,
/// while the process has one thread.
pub(crate) fn serve_if_asked() {
    let Some(url) = std::env::var_os(SERVE) else {
        return;
    };
    // SAFETY: this runs before `main`, when the process has a single thread, so nothing
    // reads the environment concurrently. The workers this host starts must not serve too.
    unsafe { std::env::remove_var(SERVE) };
    // A setuid, setgid or file-capabilities program must not take calls from a broker that
    // whoever runs it names.
    // SAFETY: a plain query of the auxiliary vector.
    if unsafe { libc::getauxval(libc::AT_SECURE) } != 0 {
        eprintln!(
            "offload: {SERVE} is set, but this program runs with elevated privileges (setuid, setgid or file \
             capabilities: AT_SECURE), and such a program never serves calls"
        );
        std::process::exit(1);
    }
    crate::role::become_host();
    let code = match url.to_str().map(str::trim) {
        Some(url) if !url.is_empty() => match run(url) {
            Ok(()) => 0,
            Err(message) => {
                eprintln!("offload: this host cannot serve: {message}");
                1
            }
        },
        _ => {
            eprintln!("offload: {SERVE} must be the broker's URL, such as nats://broker:4222");
            1
        }
    };
    std::process::exit(code);
}

fn run(url: &str) -> Result<(), String> {
    let config = Config::from_env(url)?;
    let grace = match std::env::var("OFFLOAD_SERVE_GRACE") {
        Ok(text) => Duration::from_millis(
            offload_spec::parse_millis(&text, "OFFLOAD_SERVE_GRACE")
                .map_err(|e| format!("environment variable OFFLOAD_SERVE_GRACE: {e}"))?,
        ),
        Err(_) => DEFAULT_GRACE,
    };
    // One thread: the host relays frames, its workers do the work; on one thread no frame
    // waits for another thread to wake.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build its async runtime: {e}"))?;
    runtime.block_on(serve(config, grace))
}

/// This host, as its calls' tasks see it.
struct Host {
    client: Client,
    config: Config,
    presence: Mutex<Presence>,
    /// Answers to send, in order.
    outbox: mpsc::UnboundedSender<(String, Bytes)>,
    /// Room for calls, by pool key: its workers and [`PREFETCH`].
    room: HashMap<&'static str, Arc<Semaphore>>,
    /// The calls running, by their reply subject, with the room each takes.
    running: Mutex<HashMap<String, (AbortHandle, OwnedSemaphorePermit)>>,
    /// Fires when a call ends.
    ended: Notify,
    /// The last calls cancelled before they came, by reply subject.
    cancelled_early: Mutex<std::collections::VecDeque<String>>,
    draining: AtomicBool,
}

async fn serve(config: Config, grace: Duration) -> Result<(), String> {
    let client = config
        .connect("offload host", |event| match event {
            async_nats::Event::Connected => eprintln!("offload: host connected to the broker"),
            async_nats::Event::Disconnected => eprintln!("offload: host lost the broker; reconnecting"),
            _ => {}
        })
        .await?;
    let registry = Registry::get();
    let build = registry.hash();
    // A host is there to serve: its workers start now, not at the first call.
    if let Err(error) = executor::warm_up_all().await {
        eprintln!("offload: {error}");
    }
    let mut room = HashMap::new();
    let mut pools = Vec::new();
    for entry in registry.entries() {
        if room.contains_key(entry.pool_key()) {
            continue;
        }
        let Ok((executor, _)) = call::preflight(entry) else { continue };
        let limit = executor.places() as u32 + PREFETCH;
        room.insert(entry.pool_key(), Arc::new(Semaphore::new(limit as usize)));
        pools.push((entry.pool_key().to_owned(), limit));
    }
    let (id, name) = identity()?;
    let presence = Presence {
        version: wire::VERSION,
        id: id.clone(),
        name: name.clone(),
        build,
        pools,
        draining: false,
    };

    let subscribe_error = |e: async_nats::SubscribeError| format!("cannot subscribe at the broker: {e}");
    let mut calls =
        client.subscribe(wire::call_subject(&config.prefix, &id)).await.map_err(subscribe_error)?;
    let mut cancels =
        client.subscribe(wire::cancel_subject(&config.prefix, &id)).await.map_err(subscribe_error)?;
    let (outbox, mut outgoing) = mpsc::unbounded_channel::<(String, Bytes)>();
    let sender = {
        let client = client.clone();
        tokio::spawn(async move {
            while let Some((subject, payload)) = outgoing.recv().await {
                if let Err(error) = client.publish(subject, payload).await {
                    eprintln!("offload: host could not send an answer: {error}");
                }
            }
        })
    };
    let host = Arc::new(Host {
        client: client.clone(),
        config,
        presence: Mutex::new(presence),
        outbox,
        room,
        running: Mutex::new(HashMap::new()),
        ended: Notify::new(),
        cancelled_early: Mutex::new(std::collections::VecDeque::new()),
        draining: AtomicBool::new(false),
    });
    let announcer = {
        let host = Arc::clone(&host);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(PRESENCE_EVERY);
            loop {
                every.tick().await;
                host.announce().await;
            }
        })
    };
    eprintln!(
        "offload: serving {} (build {build:016x}) as host {name} at {} under `{}`",
        match registry.entries().count() {
            1 => "1 function".to_owned(),
            n => format!("{n} functions"),
        },
        host.config.shown(),
        host.config.prefix
    );

    use tokio::signal::unix::{SignalKind, signal};
    let signal_error = |e: std::io::Error| format!("cannot watch for SIGTERM: {e}");
    let mut sigterm = signal(SignalKind::terminate()).map_err(signal_error)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(signal_error)?;
    loop {
        tokio::select! {
            // Cancels before calls: a cancel frees room that the caller's next call, sent
            // right after it, may need (a cancel that beats its call is remembered).
            biased;
            Some(message) = super::next(&mut cancels) => host.cancel(&message),
            Some(message) = super::next(&mut calls) => host.take(message),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }

    // Drain: no new calls (they are turned away, and callers stop sending), the running
    // ones get the grace period.
    host.draining.store(true, Ordering::Release);
    host.announce().await;
    let running = host.running.lock().unwrap_or_else(|p| p.into_inner()).len();
    eprintln!("offload: host {name} stops taking calls; {running} running get up to {grace:?} to end");
    let until = tokio::time::Instant::now() + grace;
    loop {
        let ended = host.ended.notified();
        let mut ended = std::pin::pin!(ended);
        ended.as_mut().enable();
        if host.running.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            break;
        }
        tokio::select! {
            // The grace period ends even while calls keep coming.
            biased;
            () = tokio::time::sleep_until(until) => break,
            Some(message) = super::next(&mut cancels) => host.cancel(&message),
            Some(message) = super::next(&mut calls) => host.take(message),
            () = &mut ended => {}
        }
    }
    // From now on a call sent here is answered "no responders" by the broker, and goes to
    // another host; those already on their way are turned away.
    if calls.drain().await.is_ok() {
        let drained_by = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Some(message)) = tokio::time::timeout_at(drained_by, super::next(&mut calls)).await {
            host.take(message);
        }
    }
    // What still runs is stopped; its callers are told.
    executor::shutdown(Duration::ZERO).await;
    let stopped_by = tokio::time::Instant::now() + Duration::from_secs(2);
    while !host.running.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
        && tokio::time::Instant::now() < stopped_by
    {
        let _ = tokio::time::timeout_at(stopped_by, host.ended.notified()).await;
    }
    announcer.abort();
    drop(host);
    let _ = tokio::time::timeout(Duration::from_secs(2), sender).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    eprintln!("offload: host {name} stopped");
    Ok(())
}

/// A subject token unique to this host, and a name for people.
fn identity() -> Result<(String, String), String> {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    let pid = std::process::id();
    let mut random = [0u8; 4];
    rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty())
        .map_err(|e| format!("no randomness for the host's name (getrandom: {e})"))?;
    let token: String =
        hostname.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    Ok((format!("{token}-{pid}-{:08x}", u32::from_le_bytes(random)), format!("{hostname} (pid {pid})")))
}

impl Host {
    fn send(&self, to: String, answer: Vec<u8>) {
        let _ = self.outbox.send((to, answer.into()));
    }

    async fn announce(&self) {
        let mut presence = self.presence.lock().unwrap_or_else(|p| p.into_inner()).clone();
        presence.draining = self.draining.load(Ordering::Acquire);
        let subject = wire::presence_subject(&self.config.prefix);
        let _ = self.client.publish(subject, wire::encode(&presence, &[]).into()).await;
    }

    /// A call came: run it if it may run here, or say why not.
    fn take(self: &Arc<Self>, message: Message) {
        let Some(reply) = message.reply.as_ref().map(|subject| subject.to_string()) else {
            return;
        };
        let failed = |failure| wire::encode(&Answer::Failed { pid: None, failure }, &[]);
        let (head, at) = match wire::decode::<CallHead>(&message.payload) {
            Ok(decoded) => decoded,
            Err(error) => return self.send(reply, failed(Failure::Protocol { message: error.to_string() })),
        };
        let build = Registry::get().hash();
        if head.version != wire::VERSION || head.build != build {
            let message =
                format!("this host runs build {build:016x}; the call is for build {:016x}", head.build);
            return self.send(reply, failed(Failure::Config { message }));
        }
        let Some(entry) = Registry::get().lookup(&head.entry) else {
            let message = format!("this host has no function `{}`", head.entry);
            return self.send(reply, failed(Failure::Config { message }));
        };
        if self.draining.load(Ordering::Acquire) {
            return self.send(reply, wire::encode(&Answer::Busy, &[]));
        }
        // The earlier of the caller's deadline on this clock and the time it had left.
        let left = wire::until_epoch_ms(head.deadline_ms).min(Duration::from_millis(head.budget_ms));
        if left < Duration::from_millis(1) {
            return self.send(reply, failed(Failure::Expired));
        }
        {
            let mut early = self.cancelled_early.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(at) = early.iter().position(|cancelled| *cancelled == reply) {
                // Its caller gave it up already.
                early.remove(at);
                return;
            }
        }
        let Some(Ok(permit)) =
            self.room.get(entry.pool_key()).map(|room| Arc::clone(room).try_acquire_owned())
        else {
            return self.send(reply, wire::encode(&Answer::Busy, &[]));
        };
        let frame = message.payload.slice(at..);
        let host = Arc::clone(self);
        // Held while the task is spawned, so that the task, which takes it to say it ended,
        // finds itself in the table.
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let task = tokio::spawn({
            let reply = reply.clone();
            async move {
                let (answer, relayed) = host.run(entry, frame, left, head.streams, &reply).await;
                // Its room is free before its caller hears of it and sends the next call.
                host.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&reply);
                if relayed {
                    // After the frames relayed before it, which the outbox sends in order.
                    host.send(reply.clone(), answer);
                } else if let Err(error) = host.client.publish(reply.clone(), answer.into()).await {
                    eprintln!("offload: host could not send an answer: {error}");
                }
                host.ended.notify_waiters();
            }
        });
        running.insert(reply, (task.abort_handle(), permit));
    }

    /// A caller gave a call up: dropping its task kills the worker that runs it.
    fn cancel(&self, message: &Message) {
        // A reply subject is short; anything long is not a cancel of ours.
        if message.payload.len() > 256 {
            return;
        }
        let Ok(reply) = std::str::from_utf8(&message.payload) else { return };
        let task = self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(reply);
        match task {
            // Its room is free at once.
            Some((task, _room)) => {
                task.abort();
                self.ended.notify_waiters();
            }
            // Its call has not come (or has ended): if it comes, it does not run.
            None => {
                let mut early = self.cancelled_early.lock().unwrap_or_else(|p| p.into_inner());
                if early.len() == EARLY_CANCELS {
                    early.pop_front();
                }
                early.push_back(reply.to_owned());
            }
        }
    }

    /// Runs a call on the local pool; the answer that ends it, and whether frames were
    /// relayed before it.
    async fn run(
        &self,
        entry: &'static Entry,
        frame: Bytes,
        left: Duration,
        streams: bool,
        reply: &str,
    ) -> (Vec<u8>, bool) {
        let failed = |error: &Error| {
            let (pid, failure) = Failure::of(error);
            wire::encode(&Answer::Failed { pid, failure }, &[])
        };
        let (executor, breaker) = match call::preflight(entry) {
            Ok(found) => found,
            Err(error) => return (failed(&error), false),
        };
        let pid = AtomicU32::new(0);
        let too_large = Notify::new();
        let mut relay = Relay {
            host: self,
            reply,
            pid: &pid,
            streams,
            answer: None,
            relayed: false,
            too_large: None,
            stop: &too_large,
        };
        let deadline = std::time::Instant::now() + left;
        let parts = [&frame[..]];
        let message = crate::lend::Message::whole(&parts);
        let mut started = false;
        let result = {
            let call = crate::deadline::with_deadline(
                deadline,
                call::run(entry, executor, breaker, &message, &[], &mut relay),
            );
            let mut call = std::pin::pin!(call);
            // A call that runs a while tells its caller which worker runs it (its errors and
            // span name it); a short one says so with its answer.
            loop {
                tokio::select! {
                    result = &mut call => break result,
                    // A streamed item over the broker's limit ends the call (its worker is
                    // stopped as for a dropped call).
                    () = too_large.notified() => break Ok(()),
                    () = tokio::time::sleep(STARTED_AFTER), if !started => {
                        let pid = pid.load(Ordering::Relaxed);
                        if pid != 0 {
                            self.send(reply.to_owned(), wire::encode(&Answer::Started { pid }, &[]));
                            started = true;
                        }
                    }
                }
            }
        };
        let answer = match (result, relay.too_large) {
            (_, Some((len, max))) => {
                let failure = Failure::PayloadTooLarge { return_value: true, len, max };
                wire::encode(&Answer::Failed { pid: Some(pid.load(Ordering::Relaxed)), failure }, &[])
            }
            (Ok(()), None) => relay.answer.take().expect("the reply was decoded"),
            (Err(Error::Panicked { pid, message, location, .. }), None) => {
                let report =
                    postcard::to_stdvec(&PanicReport { message, location }).expect("a report encodes");
                frame_answer(pid, Tag::Panicked, &report, &[])
            }
            (Err(error), None) => failed(&error),
        };
        (answer, started || relay.relayed)
    }
}

/// Takes a call's frames as the local pool delivers them, and relays them to the caller.
struct Relay<'a> {
    host: &'a Host,
    reply: &'a str,
    /// The worker that runs the call, once it has one.
    pid: &'a AtomicU32,
    streams: bool,
    answer: Option<Vec<u8>>,
    /// Frames went to the caller before the answer.
    relayed: bool,
    /// A streamed item was over the broker's limit (its size, the limit): the call ends
    /// with that error.
    too_large: Option<(u64, u64)>,
    /// Told when an item is over the limit.
    stop: &'a Notify,
}

impl Relay<'_> {
    fn answer_with(&mut self, body: &[u8], attached: Attached) -> Result<(), ProtocolError> {
        if !attached.fds.is_empty() {
            return Err(ProtocolError::Invalid(
                "the function returned a `SharedBytes` or `SharedSlice`, which cannot go to another host"
                    .into(),
            ));
        }
        let pid = self.pid.load(Ordering::Relaxed);
        let answer = frame_answer(pid, Tag::Return, body, &attached.bulk);
        let max = self.host.client.max_payload();
        let too_large = self.too_large.or((answer.len() > max).then_some((answer.len() as u64, max as u64)));
        self.answer = Some(match too_large {
            Some((len, max)) => {
                let failure = Failure::PayloadTooLarge { return_value: true, len, max };
                wire::encode(&Answer::Failed { pid: Some(pid), failure }, &[])
            }
            None => answer,
        });
        Ok(())
    }
}

impl Decode for Relay<'_> {
    fn decode(&mut self, body: &[u8], attached: Attached) -> Result<(), ProtocolError> {
        self.answer_with(body, attached)
    }

    fn decode_off_runtime(
        &mut self,
        frame: Vec<u8>,
        body: Range<usize>,
        attached: Attached,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<(), ProtocolError>> + Send + '_>> {
        Box::pin(async move { self.answer_with(&frame[body], attached) })
    }

    fn streams(&self) -> bool {
        self.streams
    }

    fn may_retry(&self) -> bool {
        // The caller retries, on whichever host: one count of attempts across hosts.
        false
    }

    fn placed(&mut self, pid: u32) {
        self.pid.store(pid, Ordering::Relaxed);
    }

    fn item(&mut self, body: &[u8]) -> Pace {
        if self.too_large.is_some() {
            // An item before could not go: the stream ends with that error, without a gap.
            return Pace::Continue;
        }
        let answer = frame_answer(self.pid.load(Ordering::Relaxed), Tag::Item, body, &[]);
        let max = self.host.client.max_payload();
        if answer.len() > max {
            self.too_large = Some((answer.len() as u64, max as u64));
            self.stop.notify_one();
            return Pace::Continue;
        }
        self.relayed = true;
        self.host.send(self.reply.to_owned(), answer);
        Pace::Continue
    }

    fn relay(&mut self, tag: Tag, body: &[u8]) -> bool {
        let answer = frame_answer(self.pid.load(Ordering::Relaxed), tag, body, &[]);
        if answer.len() > self.host.client.max_payload() {
            eprintln!(
                "offload: host dropped a {tag:?} frame of {} bytes, over the broker's limit",
                answer.len()
            );
            return true;
        }
        self.relayed = true;
        self.host.send(self.reply.to_owned(), answer);
        true
    }
}
