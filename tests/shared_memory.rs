//! Shared buffers cross the process boundary by descriptor, in both directions, with their
//! contents intact; nothing is left behind when a worker crashes mid-call; large ordinary
//! payloads work up to `max_payload` and fail cleanly past it.

mod support;

use std::time::Duration;

use offload::{Error, Payload, SharedBytes, SharedSlice, offload};

/// Tests that count this process's shared memory run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs of 251 bytes (a prime, so runs straddle page boundaries), each its own value.
const RUN: usize = 251;

fn fill(buffer: &mut [u8], seed: u8) {
    for (k, run) in buffer.chunks_mut(RUN).enumerate() {
        run.fill(k as u8 ^ seed);
    }
}

fn holds(buffer: &[u8], seed: u8) -> bool {
    buffer.chunks(RUN).enumerate().all(|(k, run)| run == &[k as u8 ^ seed; RUN][..run.len()])
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![0; len];
    fill(&mut v, seed);
    v
}

/// Checks the buffer, then writes a new pattern into it in place and returns it.
#[offload(workers = "1", timeout = "60s")]
fn flip(mut buffer: SharedBytes, seed: u8) -> (bool, SharedBytes) {
    let ok = holds(&buffer, seed);
    fill(&mut buffer, !seed);
    (ok, buffer)
}

/// Creates a buffer in the worker and fills it.
#[offload(workers = "1", timeout = "60s")]
fn make(len: usize, seed: u8) -> SharedBytes {
    let mut buffer = SharedBytes::new(len).unwrap();
    fill(&mut buffer, seed);
    buffer
}

#[offload(workers = "1", timeout = "60s")]
fn sum(values: SharedSlice<u64>) -> (u64, SharedSlice<f32>) {
    let total = values.iter().sum();
    let mut halves = SharedSlice::<f32>::new(values.len()).unwrap();
    for (h, v) in halves.iter_mut().zip(values.iter()) {
        *h = *v as f32 / 2.0;
    }
    (total, halves)
}

#[offload(workers = "1", timeout = "60s")]
fn crash_with(buffer: SharedBytes) -> usize {
    if !buffer.is_empty() {
        std::process::abort();
    }
    buffer.len()
}

/// The length and a sample of every mebibyte.
#[offload(workers = "1", timeout = "120s")]
fn length(data: Vec<u8>) -> (usize, Vec<u8>) {
    (data.len(), data.iter().step_by(1 << 20).copied().collect())
}

#[offload(workers = "1", timeout = "60s", max_payload = "1MiB")]
fn capped(data: Vec<u8>) -> usize {
    data.len()
}

#[offload(workers = "1", timeout = "60s", max_payload = "1MiB")]
fn capped_result(len: usize) -> Vec<u8> {
    vec![1; len]
}

/// Descriptors of this process that are shared buffers.
#[offload(timeout = "20s", workers = "1")]
fn pid_of_worker(buffer: SharedBytes) -> (u32, u8) {
    (std::process::id(), buffer[buffer.len() - 1])
}

/// Descriptors and mappings of shared buffers in this process.
fn shared_memory_in_use() -> usize {
    shared_memory_of("self")
}

/// Descriptors and mappings of shared buffers in process `pid` ("self" for this one).
fn shared_memory_of(pid: &str) -> usize {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().contains("offload-shared"))
        })
        .count();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    fds + maps.lines().filter(|line| line.contains("offload-shared")).count()
}

#[tokio::test]
async fn bytes_both_ways_at_many_sizes() {
    let _serial = SERIAL.lock().await;
    let page = rustix::param::page_size();
    for len in [0, 1, page - 1, page, page + 1, 64 << 20] {
        let buffer = SharedBytes::from_slice(&pattern(len, 3)).unwrap();
        let (ok, back) = flip(buffer, 3).await.unwrap();
        assert!(ok, "the worker saw the caller's bytes (len {len})");
        assert_eq!(back.len(), len);
        assert!(holds(&back, !3), "the caller sees what the worker wrote (len {len})");

        let made = make(len, 9).await.unwrap();
        assert_eq!(made.len(), len);
        assert!(holds(&made, 9), "len {len}");
    }
}

#[tokio::test]
async fn typed_slices_both_ways() {
    let _serial = SERIAL.lock().await;
    let values: Vec<u64> = (0..100_000).collect();
    let (total, halves) = sum(SharedSlice::from_slice(&values).unwrap()).await.unwrap();
    assert_eq!(total, values.iter().sum::<u64>());
    assert_eq!(halves.len(), values.len());
    assert_eq!(halves[10], 5.0);
    assert_eq!(halves[99_999], 49_999.5);
}

#[tokio::test]
async fn a_crash_mid_call_leaves_no_shared_memory() {
    let _serial = SERIAL.lock().await;
    crash_with(SharedBytes::new(0).unwrap()).await.unwrap();
    let before = shared_memory_in_use();
    let buffer = SharedBytes::from_slice(&[1; 1 << 20]).unwrap();
    assert!(shared_memory_in_use() > before, "the count sees the buffer");
    let err = crash_with(buffer).await.unwrap_err();
    assert!(matches!(err, Error::Crashed { .. }), "{err:?}");
    // The caller's buffer was moved into the call and is let go right after it, off the
    // runtime; the worker's mapping died with the worker.
    assert!(
        support::eventually_async(Duration::from_secs(10), || shared_memory_in_use() == before).await,
        "a shared buffer outlived the call: {} descriptors and mappings, {before} before",
        shared_memory_in_use()
    );
    assert_eq!(crash_with(SharedBytes::new(0).unwrap()).await.unwrap(), 0, "the pool recovered");
}

#[tokio::test]
async fn the_worker_lets_go_of_shared_buffers_after_each_call() {
    let mut pid = 0;
    for i in 0..20u8 {
        let mut buffer = SharedBytes::new(1 << 20).unwrap();
        buffer.fill(i);
        let (worker, last) = pid_of_worker(buffer).await.unwrap();
        assert_eq!(last, i);
        pid = worker;
    }
    // Each buffer goes once its reply is sent: none piles up in the worker.
    assert!(
        support::eventually_async(Duration::from_secs(10), || shared_memory_of(&pid.to_string()) == 0).await,
        "the worker still holds {} shared descriptors and mappings",
        shared_memory_of(&pid.to_string())
    );
}

#[tokio::test]
async fn payloads_over_the_limit_fail_before_anything_is_sent() {
    let _serial = SERIAL.lock().await;
    let err = capped(vec![0; 2 << 20]).await.unwrap_err();
    assert!(
        matches!(err, Error::PayloadTooLarge { what: Payload::Arguments, max, .. } if max == 1 << 20),
        "{err:?}"
    );
    let err = capped_result(2 << 20).await.unwrap_err();
    assert!(
        matches!(err, Error::PayloadTooLarge { what: Payload::ReturnValue, max, .. } if max == 1 << 20),
        "{err:?}"
    );
    // The worker refused to send, and serves on.
    assert_eq!(capped(vec![0; 1000]).await.unwrap(), 1000);
    assert_eq!(capped_result(10).await.unwrap(), vec![1; 10]);
}

#[tokio::test]
async fn a_300_mib_argument_works() {
    let _serial = SERIAL.lock().await;
    let mut data = vec![0u8; 300 << 20];
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        chunk.fill(i as u8);
    }
    let expected: Vec<u8> = (0..300).map(|i| i as u8).collect();
    assert_eq!(length(data).await.unwrap(), (300 << 20, expected));
}

/// The thread that keeps trying to truncate shared buffers after a call, and its stop flag.
type Truncator = (std::thread::JoinHandle<(u64, u64)>, std::sync::Arc<std::sync::atomic::AtomicBool>);

/// Attempts to truncate shared buffers from duplicates of their descriptors, made by a thread
/// that outlives the call: how many were made, and how many succeeded.
static TRUNCATIONS: std::sync::Mutex<Option<Truncator>> = std::sync::Mutex::new(None);

/// Returns the buffer it received and one it made, and keeps trying to truncate both to
/// nothing after it returns, as a careless or hostile function might: without seals, the
/// caller's next read of either mapping would be a SIGBUS.
#[offload(pool = "truncating", workers = "1", timeout = "60s")]
fn truncating(received: SharedBytes) -> (SharedBytes, SharedBytes) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut made = SharedBytes::new(received.len()).unwrap();
    fill(&mut made, 9);
    let mut duplicates = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if target.to_string_lossy().starts_with("/memfd:offload-shared") {
            let fd: i32 = entry.file_name().to_str().unwrap().parse().unwrap();
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            duplicates.push(fd.try_clone_to_owned().unwrap());
        }
    }
    assert!(duplicates.len() >= 2, "found {} shared buffers", duplicates.len());
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let (mut tried, mut done) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                for fd in &duplicates {
                    tried += 1;
                    done += u64::from(rustix::fs::ftruncate(fd, 0).is_ok());
                }
                let _ = started_tx.send(());
            }
            (tried, done)
        }
    });
    started_rx.recv().unwrap();
    *TRUNCATIONS.lock().unwrap() = Some((thread, stop));
    (received, made)
}

#[offload(pool = "truncating", workers = "1", timeout = "60s")]
fn truncations() -> (u64, u64) {
    let (thread, stop) = TRUNCATIONS.lock().unwrap().take().expect("a truncating call ran first");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    thread.join().unwrap()
}

#[tokio::test]
async fn a_worker_cannot_resize_a_buffer_under_the_callers_mapping() {
    let _serial = SERIAL.lock().await;
    let mut sent = SharedBytes::new(1 << 20).unwrap();
    fill(&mut sent, 3);
    let (received, made) =
        tokio::time::timeout(Duration::from_secs(60), truncating(sent)).await.unwrap().unwrap();
    // Read every page of both, again and again, while the worker keeps trying.
    for _ in 0..50 {
        assert!(holds(&received, 3));
        assert!(holds(&made, 9));
    }
    let (tried, done) = tokio::time::timeout(Duration::from_secs(60), truncations()).await.unwrap().unwrap();
    assert!(tried >= 2, "the worker made {tried} attempts");
    assert_eq!(done, 0, "{done} of {tried} truncations succeeded");
}
