//! Top-level `Vec<u8>` arguments and return values: short ones travel in the call frame, from
//! 64 KiB on in bulk frames of their own, written from the vector and read straight into the
//! receiving vector. Contents arrive intact either way, in both directions, several in one
//! call, with a fallback, and past a worker's memory limit the call fails cleanly.

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
    // its bulk frame written. The worker must not be given another call on that channel.
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
