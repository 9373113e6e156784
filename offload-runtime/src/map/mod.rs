//! `offload::map`: one offloaded function over many inputs, in batches.
//!
//! The map takes the call its function makes with each input without running it (see
//! `call::as_batch_item`), puts many such calls in one batch, and runs each batch as one
//! call: one round trip, one worker, every item's result in one reply. Batches are sized
//! from how long the worker took per item (see [`size`]), a few are out per worker at once,
//! and results come back per item, in input order ([`Map`]) or as batches finish
//! ([`MapUnordered`]).

mod engine;
mod size;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use serde::de::DeserializeOwned;

use crate::error::Error;
use engine::{Engine, Inputs, Taken};

/// Runs an offloaded function over every input of `inputs`, in batches, and yields each
/// input's result in input order.
///
/// `function` is the `#[offload]` function itself, or a closure that returns its call (for a
/// function of several arguments: `|(a, b)| f(a, b)`). The map does not await what it
/// returns: it takes the call it makes, puts many such calls in one batch, and runs the
/// batch in one worker, so a round trip is paid per batch, not per input. So nothing the
/// closure's future would do after the call runs, and each input's result is the offloaded
/// function's own: a closure like `|x| async move { f(x).await.map(|v| v + 1) }` yields
/// `f`'s values, without the `+ 1` (do such work on the map's results instead). A function
/// that makes no `#[offload]` call when its future is first polled gives each input
/// [`Error::Config`].
///
/// - **Results**: one per input, in input order: what the function returned, or the error of
///   that input alone. A panic fails only its input ([`Error::Panicked`]), and the rest of
///   its batch runs on.
/// - **Batches**: sized so that a worker spends about 5 ms on each, measured as the map
///   goes (the first batch has one input); [`Map::batch_size`] fixes the size instead.
/// - **In flight**: at most two batches per worker are sent or waiting to be handed out, so
///   the map reads its inputs only as fast as it yields results.
/// - **Failures of a batch**: the function's timeout applies to each batch (or the
///   [`crate::with_timeout`] and [`crate::with_deadline`] around the map's polling); a batch
///   that times out or whose worker dies gives that error to each of its inputs. With
///   `retries = N` a batch whose worker died runs again, whole, as a call would (inputs that
///   had already run, run again).
/// - **Cancellation**: dropping the map stops it: the running batches' workers are killed
///   (or told, under `grace`) and no more inputs are read.
/// - **Not in a batch**: shared buffers ([`crate::SharedBytes`], [`crate::SharedSlice`]) as
///   arguments (the input fails with [`Error::Config`]) or return values (it fails with
///   [`Error::Protocol`]). Byte vectors travel inline, whatever their size.
/// - **Figures**: in [`crate::stats`], a batch counts as one call, and towards `max_tasks`
///   as one task.
/// - **Not carried into a batch**: the function's `fallback` (each input gets the error),
///   [`crate::with_progress`] around the map, and the caller's `tracing` span (each batch
///   has a span of its own). The return values of one batch count against `max_payload`
///   together: with a small `max_payload`, fix a small [`Map::batch_size`].
/// - **A bounded queue**: with `queue = N`, at most `workers + N` batches are out at once,
///   so the map does not overload its own pool.
///
/// The map starts when it is first polled, and must be polled in a Tokio runtime. It is a
/// [`Stream`]; [`Map::next`] awaits the next result without one.
///
/// ```no_run
/// # mod offload { pub use offload_runtime::*; }
/// # // Stands in for an `#[offload]` function.
/// # async fn score(_: u64) -> Result<u64, offload::Error> { Ok(0) }
/// # async fn run() -> Result<(), offload::Error> {
/// let mut scores = offload::map(score, 0..100_000u64);
/// let mut total = 0;
/// while let Some(score) = scores.next().await {
///     total += score?;
/// }
/// # Ok(()) }
/// ```
pub fn map<F, I, Fut, R>(function: F, inputs: I) -> Map<R>
where
    I: IntoIterator,
    I::IntoIter: Send + 'static,
    F: FnMut(I::Item) -> Fut + Send + 'static,
    Fut: Future<Output = Result<R, Error>>,
    R: DeserializeOwned + Send + 'static,
{
    map_stream(function, Iter(inputs.into_iter()))
}

/// [`map`] over the items of a [`Stream`]: a batch is sent when it is full or the stream has
/// no item ready.
pub fn map_stream<F, S, Fut, R>(function: F, inputs: S) -> Map<R>
where
    S: Stream + Send + 'static,
    F: FnMut(S::Item) -> Fut + Send + 'static,
    Fut: Future<Output = Result<R, Error>>,
    R: DeserializeOwned + Send + 'static,
{
    Map { engine: Engine::new(Box::new(Source { inputs: Box::pin(inputs), function })) }
}

/// The results of [`map`], in input order: a [`Stream`] of `Result<R, Error>`.
#[must_use = "a map does nothing until it is polled"]
pub struct Map<R> {
    engine: Engine<R>,
}

/// The results of [`Map::unordered`], as batches finish: a [`Stream`] of
/// `(index, Result<R, Error>)`, where `index` is the input's position among the inputs.
#[must_use = "a map does nothing until it is polled"]
pub struct MapUnordered<R> {
    engine: Engine<R>,
}

// Nothing in a map is pinned in place.
impl<R> Unpin for Map<R> {}
impl<R> Unpin for MapUnordered<R> {}

impl<R: DeserializeOwned + Send + 'static> Map<R> {
    /// Puts `items` inputs in each batch (at least 1, at most 65,536) instead of sizing
    /// batches from measurements.
    pub fn batch_size(mut self, items: usize) -> Map<R> {
        self.engine.sizer = size::Sizer::fixed(items);
        self
    }

    /// Yields each result as soon as its batch is back, with its input's index, instead of
    /// in input order: a slow batch holds back nothing but itself.
    pub fn unordered(mut self) -> MapUnordered<R> {
        self.engine.unordered();
        MapUnordered { engine: self.engine }
    }

    /// The next result; `None` once every input has one.
    pub async fn next(&mut self) -> Option<Result<R, Error>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl<R: DeserializeOwned + Send + 'static> MapUnordered<R> {
    /// The next result and its input's index; `None` once every input has one.
    pub async fn next(&mut self) -> Option<(usize, Result<R, Error>)> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl<R: DeserializeOwned + Send + 'static> Stream for Map<R> {
    type Item = Result<R, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().engine.poll_next(cx).map(|next| next.map(|(_, result)| result))
    }
}

impl<R: DeserializeOwned + Send + 'static> Stream for MapUnordered<R> {
    type Item = (usize, Result<R, Error>);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().engine.poll_next(cx)
    }
}

impl<R> std::fmt::Debug for Map<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Map").finish_non_exhaustive()
    }
}

impl<R> std::fmt::Debug for MapUnordered<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapUnordered").finish_non_exhaustive()
    }
}

/// A map's inputs and its function.
struct Source<S, F> {
    inputs: Pin<Box<S>>,
    function: F,
}

impl<S, F, Fut> Inputs for Source<S, F>
where
    S: Stream + Send,
    F: FnMut(S::Item) -> Fut + Send,
    Fut: Future,
{
    fn poll_item(&mut self, cx: &mut Context<'_>, out: &mut Vec<u8>) -> Poll<Option<Taken>> {
        self.inputs
            .as_mut()
            .poll_next(cx)
            .map(|input| input.map(|input| crate::call::as_batch_item((self.function)(input), out).into()))
    }
}

/// An iterator as a stream whose items are always ready.
struct Iter<I>(I);

// The iterator is never pinned: it is only ever called through `&mut`.
impl<I> Unpin for Iter<I> {}

impl<I: Iterator> Stream for Iter<I> {
    type Item = I::Item;

    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<I::Item>> {
        Poll::Ready(self.get_mut().0.next())
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}
