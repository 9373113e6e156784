//! `offload::shutdown` stops every pool: new calls fail, running calls get a grace period,
//! then their workers are killed, and nothing is left behind. Shutdown is process-wide, so
//! this binary holds this one test only.

mod support;

use std::time::{Duration, Instant};

use offload::{Error, offload};

#[offload(pool = "stopping", workers = "2", timeout = "60s")]
fn nap(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_or_kills_calls_and_leaves_nothing_behind() {
    let fds_before = open_fds();
    assert!(support::worker_children().is_empty());

    nap(0).await.unwrap();
    let workers = support::worker_children();
    assert_eq!(workers.len(), 2);

    let short = tokio::spawn(nap(600));
    let long = tokio::spawn(nap(30_000));
    let queued = tokio::spawn(async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        nap(0).await
    });
    // Let both calls reach a worker, and the third queue behind them.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = Instant::now();
    offload::shutdown(Duration::from_millis(1_000)).await;
    let took = started.elapsed();

    assert_eq!(short.await.unwrap().unwrap(), 600, "a call that ends within the grace period succeeds");
    assert!(
        matches!(long.await.unwrap(), Err(Error::Shutdown { .. })),
        "a call past the grace period is stopped"
    );
    assert!(matches!(queued.await.unwrap(), Err(Error::Shutdown { .. })), "a queued call is refused");
    assert!(matches!(nap(0).await, Err(Error::Shutdown { .. })), "new calls are refused");
    // The grace period, then killing and reaping: milliseconds, with a margin for a loaded
    // machine. Not the 10 s give-up wait.
    assert!(took < Duration::from_millis(2_500), "shutdown with 1 s of grace took {took:?}");

    assert!(support::worker_children().is_empty(), "workers left: {:?}", support::worker_children());
    assert!(workers.iter().all(|&pid| !support::alive(pid)));
    assert_eq!(open_fds(), fds_before, "descriptors were left open");
}
