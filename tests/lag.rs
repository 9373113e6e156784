//! The lag monitor sees a blocked runtime, stays quiet on an idle one, and stops when asked.
//!
//! That a late tick logs a warning is tested in the runtime's unit tests: the root package
//! has no `tracing` dev-dependency to install a test subscriber with.

use std::time::Duration;

use offload::lag::{LagMonitor, LagStats};

/// Waits, yielding to the probe, until `done` holds for the monitor's stats; at most 10 s.
async fn until(monitor: &LagMonitor, done: impl Fn(&LagStats) -> bool) -> LagStats {
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let stats = monitor.stats();
            if done(&stats) {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    waited.await.expect("the probe ticks")
}

#[tokio::test(flavor = "current_thread")]
async fn a_blocked_runtime_shows_as_lag() {
    let monitor = LagMonitor::builder().interval(Duration::from_millis(10)).start();
    until(&monitor, |s| s.samples >= 2).await;

    // The probe cannot run while this task holds the runtime's only thread.
    tokio::spawn(async { std::thread::sleep(Duration::from_millis(300)) }).await.unwrap();
    let before = monitor.stats().samples;
    let stats = until(&monitor, |s| s.samples > before).await;

    assert!(stats.max >= Duration::from_millis(250), "{stats:?}");
    assert!(stats.over_threshold >= 1, "{stats:?}");
    assert!(stats.p50 <= stats.p90 && stats.p90 <= stats.p99 && stats.p99 <= stats.max, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_runtime_shows_little_lag() {
    let monitor = LagMonitor::builder().interval(Duration::from_millis(5)).start();
    let stats = until(&monitor, |s| s.samples >= 40).await;

    // Loose bounds: the machine running the tests may be busy.
    assert!(stats.p50 < Duration::from_millis(50), "{stats:?}");
    assert!(stats.p50 <= stats.p99 && stats.p99 <= stats.max, "{stats:?}");
    assert!(monitor.is_running());
}

#[tokio::test(flavor = "current_thread")]
async fn stop_ends_the_probe() {
    let monitor = LagMonitor::builder().interval(Duration::from_millis(2)).start();
    until(&monitor, |s| s.samples >= 2).await;

    monitor.stop();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!monitor.is_running());
    let stopped = monitor.stats();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(monitor.stats(), stopped);
    monitor.stop();
}
