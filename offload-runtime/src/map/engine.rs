//! The batches of one map: take inputs while few enough batches are out, encode their calls
//! into the batch being filled, send it when it is full (or the inputs pause), run each batch
//! as one call on a task of its own, and hand out the results, in input order or as batches
//! finish.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};

use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
use tokio::task::{Id, JoinSet};

use super::size::Sizer;
use crate::breaker::Breaker;
use crate::call::{self, Decode};
use crate::error::{Error, Payload, ProtocolError};
use crate::executor::Executor;
use crate::lend::Message;
use crate::protocol::batch::{self, Failed, Outcome};
use crate::protocol::{self, Attached};
use crate::registry::Entry;

/// The most bytes of arguments one batch carries (less if the pool's `max_payload` is less).
const BATCH_BYTES: usize = 4 << 20;

/// Where the map's inputs come from, each turned into a call by the map's function.
pub(super) trait Inputs: Send {
    /// Polls for the next input; for one, takes the call the function makes with it as a
    /// batch item, encoded onto `out` (see [`call::as_batch_item`]).
    fn poll_item(&mut self, cx: &mut Context<'_>, out: &mut Vec<u8>) -> Poll<Option<Taken>>;
}

/// What became of one input.
pub(super) enum Taken {
    /// Its call, to this function, is the last record on the batch.
    Call(&'static Entry),
    /// Its call cannot go in a batch.
    Failed(Error),
    /// The map's function made no offloaded call with it.
    NoCall,
}

impl From<Option<Result<&'static Entry, Error>>> for Taken {
    fn from(taken: Option<Result<&'static Entry, Error>>) -> Taken {
        match taken {
            Some(Ok(entry)) => Taken::Call(entry),
            Some(Err(error)) => Taken::Failed(error),
            None => Taken::NoCall,
        }
    }
}

/// The function every call of the map goes to, and where its calls run.
#[derive(Clone, Copy)]
struct Route {
    entry: &'static Entry,
    executor: &'static Executor,
    breaker: &'static Breaker,
}

/// Where the map's calls go: not known before its first input.
enum Target {
    Unknown,
    Known(Route),
    /// The function's pool cannot take calls: every item fails with this.
    Broken(Error),
}

/// One input's place in a batch.
enum Slot {
    /// Its call is the next record of the batch.
    Sent(usize),
    /// It failed before it could be sent.
    Failed(usize, Error),
}

/// The batch being filled.
#[derive(Default)]
struct Filling {
    /// The frame so far: its head (once the target is known), then the records.
    frame: Vec<u8>,
    /// Where the records start in `frame`.
    records: usize,
    sent: usize,
    slots: Vec<Slot>,
}

/// A batch's results as the worker sent them, and how long it ran them.
struct Returned<R> {
    results: Vec<Result<R, Error>>,
    busy_ns: u64,
}

/// One input's result, with its position among the inputs.
pub(super) type Indexed<R> = (usize, Result<R, Error>);

pub(super) struct Engine<R> {
    inputs: Box<dyn Inputs>,
    pub(super) sizer: Sizer,
    pub(super) ordered: bool,
    target: Target,
    next_index: usize,
    exhausted: bool,
    filling: Filling,
    running: JoinSet<Result<Returned<R>, Error>>,
    /// The batch number and the slots of each running batch.
    slots: HashMap<Id, (u64, Vec<Slot>)>,
    next_batch: u64,
    /// In order: the batches finished ahead of the one whose results go out next.
    finished: BTreeMap<u64, Vec<Indexed<R>>>,
    next_out: u64,
    ready: VecDeque<Indexed<R>>,
    /// Fires when the batch sent last is in line for a worker: the next one asks then.
    last_in_line: Option<oneshot::Receiver<()>>,
}

impl<R: DeserializeOwned + Send + 'static> Engine<R> {
    pub(super) fn new(inputs: Box<dyn Inputs>) -> Engine<R> {
        Engine {
            inputs,
            sizer: Sizer::automatic(),
            ordered: true,
            target: Target::Unknown,
            next_index: 0,
            exhausted: false,
            filling: Filling::default(),
            running: JoinSet::new(),
            slots: HashMap::new(),
            next_batch: 0,
            finished: BTreeMap::new(),
            next_out: 0,
            ready: VecDeque::new(),
            last_in_line: None,
        }
    }

    pub(super) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Indexed<R>>> {
        loop {
            if let Some(result) = self.ready.pop_front() {
                return Poll::Ready(Some(result));
            }
            self.fill(cx);
            if !self.ready.is_empty() {
                continue;
            }
            match self.running.poll_join_next_with_id(cx) {
                Poll::Ready(Some(joined)) => self.collect(joined),
                Poll::Ready(None) if self.exhausted && self.filling.slots.is_empty() => {
                    debug_assert!(self.finished.is_empty());
                    return Poll::Ready(None);
                }
                // Waiting for inputs: `fill` left their waker.
                Poll::Ready(None) => return Poll::Pending,
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// How many batches may be out at once, running or finished ahead of their turn: two
    /// per worker, so that each has its next batch at hand when it answers.
    fn in_flight(&self) -> usize {
        match self.target {
            Target::Known(route) => {
                let workers = route.executor.places();
                // No more than a bounded queue takes: the rest would be refused.
                let queue = route.executor.settings().queue.map_or(usize::MAX, |q| q as usize);
                (2 * workers).min(workers.saturating_add(queue))
            }
            Target::Unknown | Target::Broken(_) => 1,
        }
    }

    /// From now on, results go out as batches finish; those already finished go out first.
    pub(super) fn unordered(&mut self) {
        self.ordered = false;
        for (_, batch) in std::mem::take(&mut self.finished) {
            self.ready.extend(batch);
        }
    }

    /// Takes inputs into batches and sends them, while few enough are out.
    fn fill(&mut self, cx: &mut Context<'_>) {
        while !self.exhausted && self.running.len() + self.finished.len() < self.in_flight() {
            let mark = self.filling.frame.len();
            match self.inputs.poll_item(cx, &mut self.filling.frame) {
                Poll::Ready(Some(taken)) => {
                    let index = self.next_index;
                    self.next_index += 1;
                    let slot = self.place(index, taken, mark);
                    self.filling.slots.push(slot);
                    if self.is_full() {
                        self.send();
                    }
                }
                Poll::Ready(None) => {
                    self.exhausted = true;
                    self.send();
                }
                Poll::Pending => {
                    self.send();
                    return;
                }
            }
            if !self.ready.is_empty() {
                // Results that need no worker (inputs that all failed): hand them out first.
                return;
            }
        }
    }

    /// Where the input `index` goes, now that its call was taken (its record, if any, starts
    /// at `mark` in the frame).
    fn place(&mut self, index: usize, taken: Taken, mark: usize) -> Slot {
        let failed = |frame: &mut Vec<u8>, error| {
            frame.truncate(mark);
            Slot::Failed(index, error)
        };
        let entry = match taken {
            Taken::Call(entry) => entry,
            Taken::Failed(error) => return failed(&mut self.filling.frame, error),
            Taken::NoCall => return failed(&mut self.filling.frame, no_call()),
        };
        if let Target::Unknown = self.target {
            self.target = match call::preflight(entry) {
                Ok((executor, breaker)) => Target::Known(Route { entry, executor, breaker }),
                Err(error) => Target::Broken(error),
            };
        }
        let route = match &self.target {
            Target::Known(route) => *route,
            Target::Broken(error) => return failed(&mut self.filling.frame, error.duplicate()),
            Target::Unknown => unreachable!("set above"),
        };
        if !std::ptr::eq(route.entry, entry) {
            let message = format!(
                "one `offload::map` calls one offloaded function: this input called `{}`, the \
                 others `{}`",
                entry.name(),
                route.entry.name()
            );
            return failed(&mut self.filling.frame, Error::Config { entry: entry.name(), message });
        }
        let max = route.executor.settings().max_payload;
        let len = (self.filling.frame.len() - mark - 4) as u64;
        if len > max {
            let error = Error::PayloadTooLarge { entry: entry.name(), what: Payload::Arguments, len, max };
            return failed(&mut self.filling.frame, error);
        }
        if self.filling.records == 0 {
            // The first record of the batch: the head goes before it.
            let log_level = protocol::level::of_filter(tracing::level_filters::LevelFilter::current());
            match batch::start(entry.key, log_level) {
                Ok(head) => {
                    self.filling.records = head.len();
                    self.filling.frame.splice(mark..mark, head);
                }
                Err(kind) => return failed(&mut self.filling.frame, call::protocol_error(entry, kind)),
            }
        }
        self.filling.sent += 1;
        Slot::Sent(index)
    }

    fn is_full(&self) -> bool {
        let bytes = match self.target {
            Target::Known(route) => BATCH_BYTES.min(route.executor.settings().max_payload as usize),
            _ => BATCH_BYTES,
        };
        self.filling.slots.len() >= self.sizer.size() || self.filling.frame.len() >= bytes
    }

    /// Sends the batch being filled, if it has any inputs.
    fn send(&mut self) {
        if self.filling.slots.is_empty() {
            return;
        }
        let Filling { mut frame, records, sent, slots } = std::mem::take(&mut self.filling);
        let number = self.next_batch;
        self.next_batch += 1;
        let route = match self.target {
            Target::Known(route) if sent > 0 => route,
            // Nothing to run: every input failed already.
            _ => return self.finish(number, slots, Ok(Returned { results: Vec::new(), busy_ns: 0 })),
        };
        if let Err(kind) = batch::finish(&mut frame, records, sent as u32) {
            let error = call::protocol_error(route.entry, kind);
            return self.finish(number, slots, Err(error));
        }
        // Under the deadlines of the task that polls the map, where the batch's calls come from.
        let scopes = crate::deadline::scopes();
        // The batches ask for workers in order: a hung batch never gets a worker ahead of
        // one before it, whose results the map hands out first.
        let (in_line, next) = oneshot::channel();
        let turn = Turn { after: self.last_in_line.replace(next), in_line: Some(in_line) };
        let task = self.running.spawn(scopes.apply(run::<R>(route, frame, sent, turn)));
        self.slots.insert(task.id(), (number, slots));
    }

    /// A batch's task ended.
    fn collect(&mut self, joined: Result<(Id, Result<Returned<R>, Error>), tokio::task::JoinError>) {
        let (id, outcome) = match joined {
            Ok((id, outcome)) => (id, outcome),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Only a runtime that shuts down cancels a batch's task while the map runs.
            Err(e) => {
                let entry = match self.target {
                    Target::Known(route) => route.entry.name(),
                    _ => "offload::map",
                };
                (e.id(), Err(Error::Shutdown { entry }))
            }
        };
        let (number, slots) = self.slots.remove(&id).expect("every task has its slots");
        self.finish(number, slots, outcome);
    }

    /// Gives each input of batch `number` its result, and hands them out when their turn comes.
    fn finish(&mut self, number: u64, slots: Vec<Slot>, outcome: Result<Returned<R>, Error>) {
        let sent = slots.iter().filter(|slot| matches!(slot, Slot::Sent(_))).count();
        let mut results = match outcome {
            Ok(returned) => {
                self.sizer.observe(sent, returned.busy_ns);
                Ok(returned.results.into_iter())
            }
            Err(error) => Err(error),
        };
        let indexed: Vec<Indexed<R>> = slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Failed(index, error) => (index, Err(error)),
                Slot::Sent(index) => match &mut results {
                    Ok(results) => (index, results.next().expect("the reply's count was checked")),
                    Err(error) => (index, Err(error.duplicate())),
                },
            })
            .collect();
        if !self.ordered {
            self.ready.extend(indexed);
            return;
        }
        self.finished.insert(number, indexed);
        while let Some(batch) = self.finished.remove(&self.next_out) {
            self.ready.extend(batch);
            self.next_out += 1;
        }
    }
}

fn no_call() -> Error {
    Error::Config {
        entry: "offload::map",
        message: "the function given to `offload::map` made no `#[offload]` call when first polled: \
                  give it the offloaded function itself, or a closure that calls one first thing"
            .into(),
    }
}

/// A batch's place in the order in which the map's batches ask for workers.
struct Turn {
    /// Fires (or is dropped) when the batch before this one is in line for a worker.
    after: Option<oneshot::Receiver<()>>,
    /// Fired when this batch is in line for a worker; dropped if it never asks.
    in_line: Option<oneshot::Sender<()>>,
}

/// Runs one batch as one call of its function.
async fn run<R: DeserializeOwned + Send + 'static>(
    route: Route,
    frame: Vec<u8>,
    sent: usize,
    turn: Turn,
) -> Result<Returned<R>, Error> {
    let mut decode = BatchDecode::<R> { entry: route.entry, sent, turn, returned: None };
    call::run(route.entry, route.executor, route.breaker, &Message::whole(&[&frame]), &[], &mut decode)
        .await?;
    Ok(decode.returned.expect("decoded on success"))
}

/// Decodes a batch reply: each item's return value, panic or fault.
struct BatchDecode<R> {
    entry: &'static Entry,
    sent: usize,
    turn: Turn,
    returned: Option<Returned<R>>,
}

impl<R: DeserializeOwned + Send + 'static> Decode for BatchDecode<R> {
    fn turn(&mut self) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
        let after = self.turn.after.take()?;
        Some(Box::pin(async move {
            // An error: the batch before got no worker and is done; this one's turn came.
            let _ = after.await;
        }))
    }

    fn in_line(&mut self) {
        if let Some(in_line) = self.turn.in_line.take() {
            let _ = in_line.send(());
        }
    }

    fn decode(&mut self, body: &[u8], _: Attached) -> Result<(), ProtocolError> {
        self.returned = Some(decode_reply(self.entry, self.sent, body)?);
        Ok(())
    }

    fn decode_off_runtime(
        &mut self,
        frame: Vec<u8>,
        body: Range<usize>,
        _: Attached,
    ) -> Pin<Box<dyn Future<Output = Result<(), ProtocolError>> + Send + '_>> {
        let (entry, sent) = (self.entry, self.sent);
        Box::pin(async move {
            self.returned = Some(
                call::decode_on_blocking_thread(move || decode_reply::<R>(entry, sent, &frame[body])).await?,
            );
            Ok(())
        })
    }
}

fn decode_reply<R: DeserializeOwned>(
    entry: &'static Entry,
    sent: usize,
    body: &[u8],
) -> Result<Returned<R>, ProtocolError> {
    let (head, mut items) = batch::reply(body)?;
    if head.count as usize != sent {
        return Err(ProtocolError::Invalid(format!(
            "a batch of {sent} calls was answered with {} results",
            head.count
        )));
    }
    let mut results = Vec::with_capacity(sent);
    while let Some(record) = items.next_record() {
        let (outcome, bytes) = batch::outcome(record?)?;
        results.push(match outcome {
            Outcome::Returned => protocol::decode::<R>(bytes, Payload::ReturnValue)
                .map_err(|kind| call::protocol_error(entry, kind)),
            failure => Err(match batch::failed(failure, bytes)? {
                Failed::Panicked(report) => Error::Panicked {
                    entry: entry.name(),
                    pid: head.pid,
                    message: report.message,
                    location: report.location,
                },
                Failed::Faulted(kind) => call::protocol_error(entry, kind),
            }),
        });
    }
    if !items.is_exhausted() {
        return Err(ProtocolError::Invalid("trailing bytes after a batch reply".into()));
    }
    Ok(Returned { results, busy_ns: head.busy_ns })
}
