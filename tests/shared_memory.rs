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
    // A length no other test uses: no buffer kept for reuse has it.
    let buffer = SharedBytes::from_slice(&[1; (1 << 20) + 3]).unwrap();
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
    let _serial = SERIAL.lock().await;
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

/// The inode of the memory file that `buffer` maps, from `/proc/self/maps`: two buffers with
/// the same one share their memory.
fn inode_of(buffer: &[u8]) -> u64 {
    let at = buffer.as_ptr() as u64;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (start, end) = fields[0].split_once('-').unwrap();
        let (start, end) = (u64::from_str_radix(start, 16).unwrap(), u64::from_str_radix(end, 16).unwrap());
        if (start..end).contains(&at) {
            return fields[4].parse().unwrap();
        }
    }
    panic!("no mapping holds {at:#x}");
}

#[offload(workers = "1", timeout = "60s")]
fn shared_len(buffer: SharedBytes) -> usize {
    buffer.len()
}

/// Buffers a worker keeps past their call.
static KEPT: std::sync::Mutex<Vec<SharedBytes>> = std::sync::Mutex::new(Vec::new());

#[offload(pool = "shm-keeps", workers = "1", timeout = "60s")]
fn keep(buffer: SharedBytes) -> usize {
    let len = buffer.len();
    KEPT.lock().unwrap().push(buffer);
    len
}

/// Writes `byte` all over the buffers the worker kept.
#[offload(pool = "shm-keeps", timeout = "60s")]
fn poke_kept(byte: u8) -> usize {
    let mut kept = KEPT.lock().unwrap();
    kept.iter_mut().for_each(|buffer| buffer.fill(byte));
    kept.len()
}

#[offload(workers = "1", timeout = "60s")]
fn give_back(buffer: SharedBytes) -> SharedBytes {
    buffer
}

#[offload(workers = "1", timeout = "60s")]
fn fail_with(buffer: SharedBytes) -> usize {
    panic!("failed with {} bytes", buffer.len())
}

/// Makes buffers of `len` zeros until `wanted` says one of them is the one wanted, within
/// 5 s; keeps them all, so that none comes back.
async fn made_until(len: usize, mut wanted: impl FnMut(&SharedBytes) -> bool) -> bool {
    let mut made = Vec::new();
    support::eventually_async(Duration::from_secs(5), || {
        let buffer = SharedBytes::from_slice(&vec![0; len]).unwrap();
        let hit = wanted(&buffer);
        made.push(buffer);
        hit
    })
    .await
}

/// A buffer passed to a call whose worker let go of it is reused by a later `from_slice` of
/// its length: shown with a buffer of `len` bytes. After it, the buffers passed before
/// were let go of too, and reused if they were to be.
async fn reuse_is_seen(len: usize) {
    let buffer = SharedBytes::from_slice(&pattern(len, 5)).unwrap();
    let inode = inode_of(&buffer);
    assert_eq!(shared_len(buffer).await.unwrap(), len);
    let reused = made_until(len, |made| inode_of(made) == inode && made.iter().all(|&b| b == 0)).await;
    assert!(reused, "a buffer the worker let go of was not reused");
}

/// The buffers `from_slice` hands out for `len` bytes now: as many as are kept for reuse, and
/// more.
fn drain(len: usize) -> Vec<SharedBytes> {
    (0..8).map(|_| SharedBytes::from_slice(&vec![0; len]).unwrap()).collect()
}

#[tokio::test]
async fn a_buffer_the_worker_let_go_of_is_reused_with_its_pages() {
    let _serial = SERIAL.lock().await;
    reuse_is_seen((64 << 10) + 4096 * 5).await;
}

#[tokio::test]
async fn a_buffer_a_worker_kept_is_never_reused() {
    let _serial = SERIAL.lock().await;
    let len = (64 << 10) + 4096 * 6;
    let buffer = SharedBytes::from_slice(&pattern(len, 1)).unwrap();
    let inode = inode_of(&buffer);
    assert_eq!(keep(buffer).await.unwrap(), len);
    reuse_is_seen((64 << 10) + 4096 * 7).await;
    let drained = drain(len);
    assert!(drained.iter().all(|b| inode_of(b) != inode), "a buffer the worker holds was handed out again");
    // Were it handed out, the worker's writes would show in it.
    assert!(poke_kept(0xee).await.unwrap() >= 1);
    assert!(drained.iter().all(|b| b.iter().all(|&x| x == 0)));
}

#[tokio::test]
async fn a_buffer_given_back_or_passed_to_a_failed_call_is_never_reused() {
    let _serial = SERIAL.lock().await;
    let (len, failed_len) = ((64 << 10) + 4096 * 8, (64 << 10) + 4096 * 9);
    let buffer = SharedBytes::from_slice(&pattern(len, 2)).unwrap();
    let inode = inode_of(&buffer);
    let mut back = give_back(buffer).await.unwrap();
    assert_eq!(inode_of(&back), inode, "the same memory came back");

    let doomed = SharedBytes::from_slice(&pattern(failed_len, 3)).unwrap();
    let failed_inode = inode_of(&doomed);
    let err = fail_with(doomed).await.unwrap_err();
    assert!(matches!(err, Error::Panicked { .. }), "{err:?}");

    reuse_is_seen((64 << 10) + 4096 * 10).await;
    let drained = drain(len);
    assert!(drained.iter().all(|b| inode_of(b) != inode), "a buffer the caller holds was handed out again");
    back.fill(0xee);
    assert!(drained.iter().all(|b| b.iter().all(|&x| x == 0)));
    let drained = drain(failed_len);
    assert!(drained.iter().all(|b| inode_of(b) != failed_inode), "a failed call's buffer was reused");
}
