//! `grace = "..."`: a cancelled call's worker is told (`offload::cancelled()`) and given the
//! grace period to return before it is killed; the caller's error still comes at the
//! deadline.

mod support;

use std::time::{Duration, Instant};

use offload::{Deadline, Error, offload};

/// Room for a loaded machine beyond a deadline: far below the grace periods below.
const MARGIN: Duration = Duration::from_millis(700);

/// Polls for cancellation, as a cooperative loop does; its pid, once cancelled.
#[offload(pool = "grace-cooperative", workers = "1", timeout = "300ms", grace = "10s")]
fn cooperative() -> u32 {
    while !offload::cancelled() {
        std::thread::sleep(Duration::from_millis(2));
    }
    std::process::id()
}

/// Stops at a checkpoint with `?`.
#[offload(pool = "grace-cooperative", timeout = "300ms")]
fn with_checkpoints() -> Result<u32, offload::Cancelled> {
    loop {
        offload::checkpoint()?;
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[offload(pool = "grace-cooperative", timeout = "30s")]
fn pid_cooperative() -> u32 {
    std::process::id()
}

/// Ignores cancellation.
#[offload(pool = "grace-stubborn", workers = "1", timeout = "300ms", grace = "1s")]
fn stubborn() -> u32 {
    std::thread::sleep(Duration::from_secs(30));
    0
}

#[offload(pool = "grace-stubborn", timeout = "30s")]
fn pid_stubborn() -> u32 {
    std::process::id()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_returns_within_grace_survives_its_cancelled_call() {
    let pid = pid_cooperative().await.unwrap();
    for call in 0..3 {
        let started = Instant::now();
        let result = if call == 1 { with_checkpoints().await.map(|_| 0) } else { cooperative().await };
        let took = started.elapsed();
        assert!(
            matches!(result, Err(Error::Timeout { by: Deadline::Function, pid: Some(p), .. }) if p == pid),
            "call {call} gave {result:?}"
        );
        // At the deadline, not after the grace period.
        assert!(took < Duration::from_millis(300) + MARGIN, "call {call} returned after {took:?}");
        // The same worker serves the next call: it returned within grace and was not killed.
        assert_eq!(pid_cooperative().await.unwrap(), pid, "call {call} cost the worker");
    }
    // A dropped call is cancelled the same way.
    assert!(tokio::time::timeout(Duration::from_millis(100), cooperative()).await.is_err());
    assert_eq!(pid_cooperative().await.unwrap(), pid, "a dropped call cost the worker");
    assert!(support::alive(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_ignores_cancellation_is_killed_at_the_end_of_grace() {
    let pid = pid_stubborn().await.unwrap();
    let started = Instant::now();
    let result = stubborn().await;
    let took = started.elapsed();
    assert!(matches!(result, Err(Error::Timeout { pid: Some(p), .. }) if p == pid), "{result:?}");
    assert!(took < Duration::from_millis(300) + MARGIN, "the caller waited {took:?}");
    // Killed once the grace period is over, not before.
    assert!(support::alive(pid), "worker {pid} was killed before its grace period ended");
    assert!(
        support::eventually_async(Duration::from_secs(5), || !support::alive(pid)).await,
        "worker {pid} outlived its grace period"
    );
    let killed_after = started.elapsed();
    assert!(killed_after >= Duration::from_millis(1_300), "killed {killed_after:?} after the call began");
    assert_ne!(pid_stubborn().await.unwrap(), pid, "a replacement serves the pool");
}

#[offload(pool = "grace-idle", workers = "1", timeout = "300ms", grace = "1s")]
fn stubborn_idle() -> u32 {
    std::thread::sleep(Duration::from_secs(30));
    0
}

#[offload(pool = "grace-idle", timeout = "30s")]
fn pid_idle() -> u32 {
    std::process::id()
}

#[test]
fn the_grace_period_ends_even_if_the_callers_runtime_sits_idle() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let pid = runtime.block_on(pid_idle()).unwrap();
    let result = runtime.block_on(stubborn_idle());
    assert!(matches!(result, Err(Error::Timeout { pid: Some(p), .. }) if p == pid), "{result:?}");
    // Nothing drives the runtime from here on, so the task that waits out the grace period is
    // never polled: the worker must be killed all the same.
    assert!(
        support::eventually(Duration::from_secs(5), || !support::alive(pid)),
        "worker {pid} outlived its grace period while the runtime sat idle"
    );
    drop(runtime);
}
