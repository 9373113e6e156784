//! Top-level `Vec<u8>` arguments and return values: short ones travel in the call frame, from
//! 64 KiB on in bulk frames of their own, written from the vector and read straight into the
//! receiving vector, or lent: read by the worker from where they are in this process.
//! Contents arrive intact either way, in both directions, several in one call, with a
//! fallback, and past a worker's memory limit the call fails cleanly. Lent bytes stay
//! where they are while a worker may read them, even once their call is dropped.

mod support;

use std::time::Duration;

use offload::{Error, offload};

/// Where bulk frames start.
const BULK: usize = 64 << 10;

/// Bytes that are not all alike, so that a shifted or truncated copy shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

#[offload(timeout = "30s", workers = "1")]
fn reverse(mut data: Vec<u8>) -> Vec<u8> {
    data.reverse();
    data
}

#[offload(timeout = "30s", workers = "1")]
fn splice(a: Vec<u8>, middle: u32, b: Vec<u8>, c: Vec<u8>) -> (usize, Vec<u8>) {
    let mut out = a;
    out.extend_from_slice(&middle.to_le_bytes());
    out.extend_from_slice(&b);
    out.extend_from_slice(&c);
    (out.len(), out)
}

#[offload(timeout = "30s", workers = "1")]
fn produce(len: usize, seed: u8) -> Vec<u8> {
    pattern(len, seed)
}

fn local_len(data: Vec<u8>) -> usize {
    data.len() + 1
}

/// Panics on purpose, so that the fallback gets the argument back.
#[offload(timeout = "30s", workers = "1", fallback = local_len)]
fn len_or_fall_back(data: Vec<u8>) -> usize {
    if data.len() > 1 {
        panic!("no");
    }
    data.len()
}

#[offload(timeout = "30s", workers = "1", memory = "128MiB")]
fn limited_len(data: Vec<u8>) -> usize {
    data.len()
}

#[offload(timeout = "30s", workers = "1")]
fn len_and_pid(data: Vec<u8>) -> (usize, u32) {
    (data.len(), std::process::id())
}

#[tokio::test]
async fn a_call_dropped_midway_through_a_bulk_frame_leaves_the_pool_usable() {
    let (_, first) = len_and_pid(vec![1; 10]).await.unwrap();
    // 256 MiB take tens of milliseconds to cross; the call is dropped after 5 ms, with part of
    // its bulk frame written, or while the worker reads them where they are lent. The worker
    // must not be given another call on that channel.
    let dropped = tokio::time::timeout(Duration::from_millis(5), len_and_pid(vec![2; 256 << 20])).await;
    assert!(dropped.is_err(), "the call finished within 5 ms");
    let (len, second) = len_and_pid(pattern(BULK + 3, 4)).await.unwrap();
    assert_eq!(len, BULK + 3);
    assert_ne!(second, first, "the worker of the dropped call was replaced");
}

#[tokio::test]
async fn both_ways_around_the_bulk_threshold() {
    for len in [0, 1, BULK - 1, BULK, BULK + 1, 3 << 20, (8 << 20) + 7] {
        let data = pattern(len, 0x5a);
        let mut expected = data.clone();
        expected.reverse();
        assert!(reverse(data).await.unwrap() == expected, "len {len}");
        assert!(produce(len, 3).await.unwrap() == pattern(len, 3), "len {len}");
    }
}

#[tokio::test]
async fn several_byte_arguments_in_one_call() {
    // Two in bulk frames, one inline, and a number between them.
    let (a, b, c) = (pattern(BULK, 1), pattern(10, 2), pattern(1 << 20, 3));
    let (len, out) = splice(a.clone(), 0xdead_beef, b.clone(), c.clone()).await.unwrap();
    let mut expected = a;
    expected.extend_from_slice(&0xdead_beef_u32.to_le_bytes());
    expected.extend_from_slice(&b);
    expected.extend_from_slice(&c);
    assert_eq!(len, expected.len());
    assert!(out == expected);
}

#[tokio::test]
async fn a_fallback_gets_a_bulk_argument_back_whole() {
    assert_eq!(len_or_fall_back(vec![7]).await.unwrap(), 1);
    // The worker panics; the fallback sees the vector the caller passed.
    assert_eq!(len_or_fall_back(pattern(1 << 20, 9)).await.unwrap(), (1 << 20) + 1);
}

#[tokio::test]
async fn a_bulk_argument_past_the_memory_limit_fails_and_the_pool_recovers() {
    let err = limited_len(vec![1; 256 << 20]).await.unwrap_err();
    assert!(matches!(err, Error::MemoryLimit { limit, .. } if limit == 128 << 20), "{err:?}");
    assert_eq!(limited_len(vec![1; 1 << 20]).await.unwrap(), 1 << 20, "the pool recovered");
}

/// Whether workers may read this process's memory here, as far as Yama says: then large
/// byte vectors must be lent.
fn lending_allowed() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").map_or(true, |scope| scope.trim() == "0")
}

fn lent_calls(pool: &str) -> u64 {
    offload::stats().into_iter().find(|s| s.name == pool).map_or(0, |s| s.lent)
}

/// A checksum that any change to the bytes changes.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Writes the checksum of `data` to `path`: what it read, even if nobody waits for its reply.
#[offload(pool = "lent", timeout = "30s", workers = "1", grace = "20s")]
fn checksum_to(data: Vec<u8>, path: String) -> u32 {
    std::fs::write(path, checksum(&data).to_string()).unwrap();
    std::process::id()
}

#[tokio::test]
async fn lent_bytes_stay_in_place_until_the_worker_of_a_dropped_call_has_read_them() {
    let dir = std::env::temp_dir().join(format!("offload-lent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let data = pattern(32 << 20, 9);
    let pid = checksum_to(data.clone(), path("first")).await.unwrap();
    assert_eq!(std::fs::read_to_string(path("first")).unwrap(), checksum(&data).to_string());
    if lent_calls("lent") == 0 {
        assert!(!lending_allowed(), "a worker that may read this process was sent the bytes");
        std::fs::remove_dir_all(&dir).unwrap();
        return;
    }

    // The worker is stopped, so the call cannot end; it is dropped, and its worker gets its
    // grace period. The 32 MiB, freed with the call, would be unmapped, and the worker's read
    // of them would fail.
    let stopped = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(stopped, rustix::process::Signal::STOP).unwrap();
    let dropped =
        tokio::time::timeout(Duration::from_millis(300), checksum_to(data.clone(), path("dropped"))).await;
    assert!(dropped.is_err(), "the call ended with its worker stopped");
    rustix::process::kill_process(stopped, rustix::process::Signal::CONT).unwrap();
    let written = support::eventually_async(Duration::from_secs(15), || {
        std::fs::read_to_string(path("dropped")).is_ok_and(|sum| !sum.is_empty())
    })
    .await;
    assert!(written, "the worker of the dropped call never finished it");
    assert_eq!(std::fs::read_to_string(path("dropped")).unwrap(), checksum(&data).to_string());

    // It returned within its grace period, so it serves the next call.
    let next = pattern(2 << 20, 3);
    assert_eq!(checksum_to(next.clone(), path("next")).await.unwrap(), pid);
    assert_eq!(std::fs::read_to_string(path("next")).unwrap(), checksum(&next).to_string());
    assert_eq!(lent_calls("lent"), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}
