//! Streamed results: what the stub of a function that returns `impl Iterator<Item = T>`
//! returns. The worker sends each item as it comes (see `worker::stream_items`); the caller
//! reads them as it polls, so the worker runs at most a bounded distance ahead.

use std::collections::VecDeque;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_core::Stream;
use serde::de::DeserializeOwned;

use crate::call::{self, Args, Decode};
use crate::error::{Error, Payload, ProtocolError};
use crate::executor::Pace;
use crate::protocol::{self, Attached};
use crate::registry::Entry;

/// Items read ahead of the consumer: past this many, the caller stops reading the worker's
/// channel until the consumer takes them, and the worker's writes block once the channel's
/// socket buffer is full.
pub(crate) const READ_AHEAD: usize = 64;

/// The items of a call whose function streams them (returns `impl Iterator<Item = T>`): a
/// [`Stream`] of `Result<T, Error>`.
///
/// - Items arrive as the worker yields them, in order. The call starts when the stream is
///   first polled.
/// - **Backpressure**: the caller reads ahead at most 64 items; past that the worker blocks
///   in its next write once the channel's socket buffer (about 200 KiB) is full. Neither
///   side holds more than the 64 items and that buffer.
/// - **Errors**: a panic, a crash or a timeout ends the stream with that error, after the
///   items already delivered. An item that does not decode is an error in its place, and
///   the stream goes on. The function's timeout covers the whole stream, the consumer's
///   pauses included.
/// - **Cancellation**: dropping the stream ends the call: its worker is killed, or told
///   first under `grace`.
/// - A streaming call is never retried (`retries` on such a function is a compile error): its
///   items may have been seen.
#[must_use = "a streamed call does nothing until it is polled"]
pub struct Streamed<T> {
    /// The call, until it ends.
    call: Option<Call>,
    items: Arc<Mutex<VecDeque<Result<T, Error>>>>,
}

/// A streaming call as it runs: it ends with `Ok` once the iterator is done.
type Call = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

impl<T> Unpin for Streamed<T> {}

impl<T> std::fmt::Debug for Streamed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamed").field("running", &self.call.is_some()).finish_non_exhaustive()
    }
}

/// Starts nothing yet: the call runs as the stream is polled. Not public API: the stub of a
/// function that streams calls it.
pub fn stream<A, T>(entry: &'static Entry, args: A) -> Streamed<T>
where
    A: Args,
    T: DeserializeOwned + Send + 'static,
{
    let items = Arc::new(Mutex::new(VecDeque::new()));
    let mut decode = Items { entry, items: Arc::clone(&items) };
    let call = Box::pin(async move { call::call_inner(entry, args, false, &mut decode).await.0 });
    Streamed { call: Some(call), items }
}

impl<T: DeserializeOwned + Send + 'static> Streamed<T> {
    /// The next item; `None` once the function's iterator is done, or after the error that
    /// ended the stream.
    pub async fn next(&mut self) -> Option<Result<T, Error>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl<T: DeserializeOwned + Send + 'static> Stream for Streamed<T> {
    type Item = Result<T, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(item) = lock(&this.items).pop_front() {
                return Poll::Ready(Some(item));
            }
            let Some(call) = this.call.as_mut() else { return Poll::Ready(None) };
            match call.as_mut().poll(cx) {
                Poll::Ready(result) => {
                    this.call = None;
                    if let Err(error) = result {
                        lock(&this.items).push_back(Err(error));
                    }
                }
                Poll::Pending if lock(&this.items).is_empty() => return Poll::Pending,
                Poll::Pending => {}
            }
        }
    }
}

fn lock<T>(items: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    items.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Decodes each streamed item into the stream's queue; the reply itself is `()`.
struct Items<T> {
    entry: &'static Entry,
    items: Arc<Mutex<VecDeque<Result<T, Error>>>>,
}

impl<T: DeserializeOwned + Send + 'static> Decode for Items<T> {
    fn decode(&mut self, body: &[u8], _: Attached) -> Result<(), ProtocolError> {
        protocol::decode::<()>(body, Payload::ReturnValue)
    }

    fn decode_off_runtime(
        &mut self,
        frame: Vec<u8>,
        body: Range<usize>,
        attached: Attached,
    ) -> Pin<Box<dyn Future<Output = Result<(), ProtocolError>> + Send + '_>> {
        Box::pin(std::future::ready(self.decode(&frame[body], attached)))
    }

    fn streams(&self) -> bool {
        true
    }

    fn item(&mut self, body: &[u8]) -> Pace {
        let item = protocol::decode::<T>(body, Payload::ReturnValue)
            .map_err(|kind| call::protocol_error(self.entry, kind));
        let mut items = lock(&self.items);
        items.push_back(item);
        if items.len() >= READ_AHEAD { Pace::Yield } else { Pace::Continue }
    }
}
