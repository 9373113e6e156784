//! A worker that allocates past its `memory` limit fails that call with
//! `Error::MemoryLimit`, is replaced, and leaves the parent and other calls alone.

use std::hint::black_box;

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
        Err(Error::MemoryLimit { entry, pid, limit }) => {
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
