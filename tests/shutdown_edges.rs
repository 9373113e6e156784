//! Shutdown's edges: a worker that crashes on its own during the grace period is reported as a
//! crash, and a worker held by a call future that is never polled again is killed rather
//! than left running. Shutdown is process-wide: this binary holds this one test.

mod support;

use std::future::Future;
use std::task::Poll;
use std::time::{Duration, Instant};

use offload::{Error, ExitReason, offload};

/// Works a little, then dies of SIGABRT, during shutdown's grace period.
#[offload(pool = "crashing", workers = "1", timeout = "60s")]
fn crash_soon(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    std::process::abort()
}

#[offload(pool = "abandoned", workers = "1", timeout = "60s")]
fn quick() -> u32 {
    7
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reports_crashes_in_grace_and_kills_what_unpolled_calls_hold() {
    // Polled exactly once: the call starts its pool's first worker and waits for its
    // handshake, then nobody polls it again. The worker it waits for starts anyway.
    let mut unpolled = Box::pin(quick());
    let first = std::future::poll_fn(|cx| Poll::Ready(unpolled.as_mut().poll(cx).is_ready())).await;
    assert!(!first, "a cold pool cannot answer on the first poll");
    assert!(
        support::eventually_async(Duration::from_secs(20), || !support::worker_children().is_empty()).await,
        "the abandoned call's worker started"
    );

    let crashing = tokio::spawn(crash_soon(300));
    // The crashing call is running before shutdown begins: its worker is up and leased.
    assert!(
        support::eventually_async(Duration::from_secs(20), || offload::stats()
            .iter()
            .any(|p| p.name == "crashing" && p.busy == 1))
        .await
    );
    let started = Instant::now();
    offload::shutdown(Duration::from_secs(5)).await;
    let took = started.elapsed();

    match crashing.await.unwrap() {
        Err(Error::Crashed { exit: ExitReason::Signal(6), .. }) => {}
        other => panic!("a worker that aborted during grace gave {other:?}, not Error::Crashed"),
    }
    assert!(support::worker_children().is_empty(), "workers left running: {:?}", support::worker_children());
    // The crash ends the grace period at once; then up to 4 s for the unpolled call to let
    // go of its worker before it is killed; the rest is margin for a loaded machine.
    assert!(took < Duration::from_millis(6_500), "shutdown took {took:?}");
    // Polled again, the abandoned call does not run.
    match tokio::time::timeout(Duration::from_secs(20), unpolled).await.unwrap() {
        Err(Error::Shutdown { .. }) => {}
        other => panic!("a call abandoned before shutdown later gave {other:?}"),
    }
}
