//! A worker that allocates past its `memory` limit fails that call with
//! `Error::MemoryLimit`, is replaced, and leaves the parent and other calls alone. A worker
//! does not keep the buffers of a large call resident after it.

mod support;

use std::hint::black_box;
use std::time::Duration;

use offload::{Error, offload};

const LIMIT: u64 = 256 << 20;

/// Allocates and touches `mib` MiB; returns the worker's pid.
#[offload(memory = "256MiB", workers = "1", timeout = "30s")]
fn allocate(mib: usize) -> u32 {
    let block = vec![1u8; mib << 20];
    black_box(&block);
    std::process::id()
}

#[offload(workers = "1", timeout = "30s")]
fn unlimited(mib: usize) -> usize {
    let block = vec![1u8; mib << 20];
    black_box(block).len()
}

#[tokio::test]
async fn memory_bomb_fails_with_memory_limit_and_the_pool_recovers() {
    let before = allocate(16).await.expect("a small allocation fits");

    let (bomb, other) = tokio::join!(allocate(4096), unlimited(300));
    match bomb {
        Err(Error::MemoryLimit { entry, pid, limit, .. }) => {
            assert_eq!(entry, "memory::allocate");
            assert_eq!(pid, before, "the worker that ran the call is named");
            assert_eq!(limit, LIMIT);
        }
        other => panic!("expected a memory limit error, got {other:?}"),
    }
    assert_eq!(other.expect("a pool without a limit is unaffected"), 300 << 20);

    let after = allocate(16).await.expect("the pool recovered");
    assert_ne!(after, before, "the worker was replaced");
    let err = allocate(4096).await.unwrap_err();
    assert!(err.to_string().contains("ran out of memory"), "{err}");
}

#[offload(workers = "1", timeout = "30s")]
fn text_len(text: String) -> (usize, u32) {
    (text.len(), std::process::id())
}

#[offload(workers = "1", timeout = "30s")]
fn make_text(len: usize) -> (String, u32) {
    ("x".repeat(len), std::process::id())
}

/// The resident memory of process `pid`, in KiB.
fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_worker_lets_go_of_a_large_calls_buffers() {
    const LEN: usize = 32 << 20;
    // Strings travel in the call and reply frames themselves, so the worker reads and writes
    // frames of 32 MiB; it must not keep buffers that size for the rest of its life.
    let (_, pid) = text_len(String::new()).await.unwrap();
    let before = resident_kib(pid);
    assert_eq!(text_len("a".repeat(LEN)).await.unwrap(), (LEN, pid));
    let settles = |pid: u32, before: u64| move || resident_kib(pid) < before + (8 << 10);
    assert!(
        support::eventually_async(Duration::from_secs(10), settles(pid, before)).await,
        "after a 32 MiB argument the worker holds {} KiB, {before} KiB before",
        resident_kib(pid)
    );

    let (_, pid) = make_text(0).await.unwrap();
    let before = resident_kib(pid);
    let (text, same) = make_text(LEN).await.unwrap();
    assert_eq!((text.len(), same), (LEN, pid));
    assert!(
        support::eventually_async(Duration::from_secs(10), settles(pid, before)).await,
        "after a 32 MiB return value the worker holds {} KiB, {before} KiB before",
        resident_kib(pid)
    );
}
