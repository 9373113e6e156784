//! Large arguments and return values are encoded and decoded off the runtime's thread: on a
//! current_thread runtime, another task keeps running while they are.
//!
//! The probe types below wait, inside their own serialization (in the caller) or
//! deserialization (of the return value, in the caller), for a ticker task of the same
//! runtime to make progress. Had they run on the runtime's only thread, the ticker could
//! not run: the wait would end at its limit, and the test fail.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use offload::{SharedBytes, offload};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Ticks of the ticker task, and whether it is running.
static TICKS: AtomicU64 = AtomicU64::new(0);
static TICKING: AtomicBool = AtomicBool::new(false);
/// The thread the caller's last marker was encoded or decoded on.
static MARKER_THREAD: Mutex<Option<ThreadId>> = Mutex::new(None);
static ENCODED_WHILE_TICKING: AtomicBool = AtomicBool::new(false);
static DECODED_WHILE_TICKING: AtomicBool = AtomicBool::new(false);
/// The probes of the two tests share the counters: one test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// In the caller: notes the thread, and whether the ticker (if it is on) ticks while the
/// caller waits here, for at most 5 s.
fn ticker_runs() -> bool {
    *MARKER_THREAD.lock().unwrap() = Some(std::thread::current().id());
    if !TICKING.load(Ordering::SeqCst) {
        return false;
    }
    let start = TICKS.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if TICKS.load(Ordering::SeqCst) >= start + 2 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// Encodes as a unit struct, after checking (in the caller only) that the runtime goes on.
#[derive(Debug, Default)]
pub struct Marker;

impl Serialize for Marker {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if !offload::is_worker() && ticker_runs() {
            ENCODED_WHILE_TICKING.store(true, Ordering::SeqCst);
        }
        serializer.serialize_unit_struct("Marker")
    }
}

impl<'de> Deserialize<'de> for Marker {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Marker;
        let Marker = Marker::deserialize(deserializer)?;
        if !offload::is_worker() && ticker_runs() {
            DECODED_WHILE_TICKING.store(true, Ordering::SeqCst);
        }
        Ok(self::Marker)
    }
}

/// A megabyte, then the marker: the caller's quick size check stops in the megabyte, so
/// only the real encoding reaches the marker.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Probe {
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
    marker: Marker,
}

#[offload(timeout = "30s", workers = "1")]
fn checksum(probe: Probe) -> u64 {
    probe.data.iter().map(|&b| u64::from(b)).sum()
}

#[offload(timeout = "30s", workers = "1")]
fn make_probe(len: usize) -> Probe {
    Probe { data: vec![7; len], marker: Marker }
}

#[offload(timeout = "30s", workers = "1")]
fn with_shared(buffer: SharedBytes, data: Vec<u8>) -> (SharedBytes, Vec<u8>, u64) {
    let sum = buffer.iter().map(|&b| u64::from(b)).sum();
    (buffer, data, sum)
}

/// Runs `f` while a ticker task counts on the same (current_thread) runtime.
async fn with_ticker<T>(f: impl Future<Output = T>) -> T {
    TICKING.store(true, Ordering::SeqCst);
    let ticker = tokio::spawn(async {
        loop {
            TICKS.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let out = f.await;
    ticker.abort();
    TICKING.store(false, Ordering::SeqCst);
    out
}

#[tokio::test]
async fn large_arguments_are_encoded_off_the_runtime() {
    let _serial = SERIAL.lock().await;
    ENCODED_WHILE_TICKING.store(false, Ordering::SeqCst);
    let probe = Probe { data: vec![1; 1 << 20], marker: Marker };
    let sum = with_ticker(checksum(probe)).await.unwrap();
    assert_eq!(sum, 1 << 20);
    assert!(
        ENCODED_WHILE_TICKING.load(Ordering::SeqCst),
        "the runtime stalled while the arguments were encoded"
    );
}

#[tokio::test]
async fn large_return_values_are_decoded_off_the_runtime() {
    let _serial = SERIAL.lock().await;
    DECODED_WHILE_TICKING.store(false, Ordering::SeqCst);
    let probe = with_ticker(make_probe(1 << 20)).await.unwrap();
    assert_eq!(probe.data.len(), 1 << 20);
    assert!(probe.data.iter().all(|&b| b == 7));
    assert!(DECODED_WHILE_TICKING.load(Ordering::SeqCst), "the runtime stalled while the result was decoded");
}

#[tokio::test]
async fn small_payloads_are_encoded_and_decoded_on_the_calling_thread() {
    let _serial = SERIAL.lock().await;
    *MARKER_THREAD.lock().unwrap() = None;
    let sum = checksum(Probe { data: vec![1; 10], marker: Marker }).await.unwrap();
    assert_eq!(sum, 10);
    assert_eq!(*MARKER_THREAD.lock().unwrap(), Some(std::thread::current().id()));

    *MARKER_THREAD.lock().unwrap() = None;
    let probe = make_probe(10).await.unwrap();
    assert_eq!(probe.data, vec![7; 10]);
    assert_eq!(*MARKER_THREAD.lock().unwrap(), Some(std::thread::current().id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_buffers_travel_inside_large_payloads() {
    let mut buffer = SharedBytes::new(4096 + 1).unwrap();
    buffer.fill(3);
    let data: Vec<u8> = (0..(1 << 20)).map(|i| i as u8).collect();
    let (buffer, back, sum) = with_shared(buffer, data.clone()).await.unwrap();
    assert_eq!(sum, 3 * (4096 + 1));
    assert_eq!(buffer.len(), 4096 + 1);
    assert!(buffer.iter().all(|&b| b == 3));
    assert_eq!(back, data);
}

/// A value whose serialization panics once it is past the size check.
#[derive(Debug, Deserialize)]
pub struct Panics {
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

impl Serialize for Panics {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("Panics", 1)?;
        s.serialize_field("data", serde_bytes::Bytes::new(&self.data))?;
        panic!("serialize panicked on purpose");
    }
}

#[offload(timeout = "30s", workers = "1")]
fn take_panics(value: Panics) -> usize {
    value.data.len()
}

#[tokio::test]
async fn a_panic_while_encoding_off_the_runtime_reaches_the_caller() {
    let call = tokio::spawn(take_panics(Panics { data: vec![0; 1 << 20] }));
    let err = call.await.unwrap_err();
    assert!(err.is_panic(), "{err:?}");
    let message = err.into_panic();
    let message = message.downcast_ref::<&str>().copied().unwrap_or_default();
    assert_eq!(message, "serialize panicked on purpose");
}
