//! Progress from a long call: the function reports it with `offload::progress`, the caller
//! sees it, in order and before the result, with `offload::with_progress`; reports are
//! rate-limited so that a hot loop can report on every step.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use offload::{Progress, offload};

/// 50 steps of 2 ms, reporting each, with a message.
#[offload(workers = "1", timeout = "60s")]
fn steps() -> u64 {
    for step in 1..=50 {
        std::thread::sleep(Duration::from_millis(2));
        offload::progress_message(step, 50, || format!("step {step}"));
    }
    50
}

/// Reports on every one of `n` steps of a hot loop; how long the loop took.
#[offload(workers = "1", timeout = "60s")]
fn hot_loop(n: u64) -> Duration {
    let started = Instant::now();
    let mut sum = 0u64;
    for i in 1..=n {
        sum = sum.wrapping_add(std::hint::black_box(i));
        offload::progress(i, n);
    }
    std::hint::black_box(sum);
    started.elapsed()
}

fn recorder() -> (Arc<Mutex<Vec<Progress>>>, impl FnMut(Progress) + Send + 'static) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let theirs = Arc::clone(&seen);
    (seen, move |p| theirs.lock().unwrap().push(p))
}

#[tokio::test]
async fn progress_arrives_in_order_and_before_the_result() {
    let (seen, record) = recorder();
    let result = offload::with_progress(record, steps()).await.unwrap();
    assert_eq!(result, 50);
    let seen = seen.lock().unwrap();
    // Rate-limited (100 ms of work, a report at most every 20 ms, and the last), in order.
    assert!(seen.len() >= 2 && seen.len() <= 10, "{} reports: {seen:?}", seen.len());
    assert!(seen.windows(2).all(|w| w[0].done < w[1].done), "{seen:?}");
    let last = seen.last().unwrap();
    assert_eq!((last.done, last.total, last.message.as_deref()), (50, 50, Some("step 50")));
    assert_eq!(last.entry, "progress::steps");
    assert_eq!(last.fraction(), 1.0);
}

#[tokio::test]
async fn a_hot_loop_reports_cheaply() {
    let (seen, record) = recorder();
    let took = offload::with_progress(record, hot_loop(10_000_000)).await.unwrap();
    let reports = seen.lock().unwrap().len();
    // Ten million reports cost the loop little: most only count a call.
    assert!(took < Duration::from_secs(5), "the loop took {took:?}");
    assert!(reports as u128 <= took.as_millis() / 20 + 2, "{reports} reports in {took:?}");
    assert_eq!(seen.lock().unwrap().last().map(|p| p.done), Some(10_000_000));
    // Without a callback the reports are dropped, and the call works as ever.
    assert!(steps().await.is_ok());
}
