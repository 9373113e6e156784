//! `offload::stats()` counts every call by outcome and every restart by cause, and reports
//! latency percentiles; the counts add up.

mod support;

use std::time::Duration;

use offload::{ErrorKind, RestartCause, offload};

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
enum Outcome {
    Fine,
    Panic,
    Abort,
    Hang,
}

#[offload(pool = "counted", workers = "2", timeout = "500ms")]
fn act(outcome: Outcome) -> u32 {
    match outcome {
        Outcome::Fine => {}
        Outcome::Panic => panic!("asked to"),
        Outcome::Abort => std::process::abort(),
        Outcome::Hang => std::thread::sleep(Duration::from_secs(60)),
    }
    std::process::id()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_add_up() {
    let plan = [(Outcome::Fine, 6), (Outcome::Panic, 2), (Outcome::Abort, 2), (Outcome::Hang, 1)];
    let mut expected_ok = 0;
    for (outcome, times) in plan {
        for _ in 0..times {
            let result = act(outcome).await;
            assert_eq!(result.is_ok(), matches!(outcome, Outcome::Fine), "{outcome:?}: {result:?}");
            expected_ok += u64::from(result.is_ok());
        }
    }
    let stats = offload::stats();
    let pool = stats.iter().find(|s| s.name == "counted").expect("the pool is listed");
    assert_eq!(pool.workers, 2);
    assert_eq!(pool.submitted, 11);
    assert_eq!(pool.succeeded, expected_ok);
    assert_eq!(pool.failed(ErrorKind::Panicked), 2);
    assert_eq!(pool.failed(ErrorKind::Crashed), 2);
    assert_eq!(pool.failed(ErrorKind::Timeout), 1);
    assert_eq!(pool.failed_total(), 5);
    assert_eq!(pool.submitted, pool.succeeded + pool.failed_total() + pool.cancelled);
    assert_eq!(pool.restarts(RestartCause::Crashed), 2);
    assert_eq!(pool.restarts(RestartCause::Timeout), 1);
    assert_eq!(pool.restarts_total(), 3, "panics do not restart workers");
    assert_eq!(pool.busy, 0);
    assert_eq!(pool.queued, 0);
    assert!(pool.alive <= 2);
    assert_eq!(pool.total.count, 11);
    assert_eq!(pool.run_time.count, 11, "every call reached a worker");
    assert!(pool.total.max >= Duration::from_millis(500), "the hung call took its whole timeout");
    assert!(pool.total.p50 <= pool.total.p99 && pool.total.p99 <= pool.total.max);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_call_is_counted_as_cancelled() {
    let before = offload::stats().into_iter().find(|s| s.name == "cancelled").map_or(0, |s| s.cancelled);
    assert_eq!(before, 0);
    let call = tokio::spawn(slow());
    // Let it reach its worker, then drop it.
    assert!(
        support::eventually_async(Duration::from_secs(20), || {
            offload::stats().iter().any(|s| s.name == "cancelled" && s.busy == 1)
        })
        .await
    );
    call.abort();
    let _ = call.await;
    let stats = offload::stats();
    let pool = stats.iter().find(|s| s.name == "cancelled").unwrap();
    assert_eq!((pool.submitted, pool.cancelled, pool.succeeded, pool.failed_total()), (1, 1, 0, 0));
    assert_eq!(pool.restarts(RestartCause::Abandoned), 1);
}

#[offload(pool = "cancelled", workers = "1", timeout = "60s")]
fn slow() -> u32 {
    std::thread::sleep(Duration::from_secs(30));
    0
}
