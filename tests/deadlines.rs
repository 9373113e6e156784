//! Deadlines set by the caller: `with_timeout` gives one call a timeout of its own, shorter
//! or longer than its function's; `with_deadline` bounds every call in a scope. The error says
//! which deadline fired.

use std::time::{Duration, Instant};

use offload::{Deadline, Error, offload, with_deadline, with_timeout};

/// Room for a loaded machine beyond a deadline: far below the timeouts that would pass if
/// the deadline were ignored.
const MARGIN: Duration = Duration::from_millis(1_000);

#[offload(pool = "deadlines-long", workers = "2", timeout = "30s")]
fn sleep_long(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[offload(pool = "deadlines-short", workers = "1", timeout = "200ms")]
fn sleep_short(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_can_have_a_shorter_timeout_than_its_function() {
    offload::warm_up().await.unwrap();
    let started = Instant::now();
    let result = with_timeout(Duration::from_millis(200), sleep_long(10_000)).await;
    let took = started.elapsed();
    match result {
        Err(Error::Timeout { timeout, by: Deadline::Call, pid: Some(_), .. }) => {
            assert_eq!(timeout, Duration::from_millis(200))
        }
        other => panic!("a call with a 200 ms timeout gave {other:?}"),
    }
    assert!(took >= Duration::from_millis(200) && took < Duration::from_millis(200) + MARGIN, "{took:?}");
    // The pool is whole again, and calls outside the scope have their function's timeout.
    assert_eq!(sleep_long(10).await.unwrap(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_can_have_a_longer_timeout_than_its_function() {
    offload::warm_up().await.unwrap();
    assert_eq!(with_timeout(Duration::from_secs(20), sleep_short(600)).await.unwrap(), 600);
    match sleep_short(600).await {
        Err(Error::Timeout { timeout, by: Deadline::Function, .. }) => {
            assert_eq!(timeout, Duration::from_millis(200))
        }
        other => panic!("a 600 ms call of a function with a 200 ms timeout gave {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_deadline_bounds_every_call_inside_it() {
    offload::warm_up().await.unwrap();
    let started = Instant::now();
    let budget = started + Duration::from_millis(1_000);
    let (first, second, third) = with_deadline(budget, async {
        let first = sleep_long(500).await;
        // A longer timeout inside the scope does not outlast its deadline.
        let second = with_timeout(Duration::from_secs(20), sleep_long(5_000)).await;
        let third = sleep_long(0).await;
        (first, second, third)
    })
    .await;
    let took = started.elapsed();
    assert_eq!(first.unwrap(), 500);
    assert!(
        matches!(second, Err(Error::Timeout { by: Deadline::Scope, pid: Some(_), .. })),
        "the second call gave {second:?}"
    );
    // Past the deadline, a call fails at once, without a worker.
    assert!(
        matches!(third, Err(Error::Timeout { by: Deadline::Scope, pid: None, .. })),
        "a call after the deadline gave {third:?}"
    );
    assert!(took >= Duration::from_millis(1_000) && took < Duration::from_millis(1_000) + MARGIN, "{took:?}");
}
