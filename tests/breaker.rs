//! A circuit breaker per function: repeated worker-side failures open it, calls then fail at
//! once without touching a worker, a trial after the reset period closes it again; a
//! crash-looping function cannot starve the others in its pool; fallbacks replace failures.

use std::time::Duration;

use offload::{BreakerState, Error, ErrorKind, RestartCause, offload};

#[offload(pool = "guarded", workers = "1", timeout = "10s", breaker(failures = 3, reset = "400ms"))]
fn poison(x: u32) -> u32 {
    if x == 0 {
        std::process::abort();
    }
    x
}

#[offload(pool = "guarded", timeout = "10s")]
fn healthy(x: u32) -> u32 {
    x + 1
}

#[offload(pool = "starving", workers = "1", timeout = "10s", breaker(failures = 2, reset = "60s"))]
fn crash_loop(x: u32) -> u32 {
    if x == 0 {
        std::process::abort();
    }
    x
}

#[offload(pool = "starving", timeout = "10s")]
fn neighbour(x: u32) -> u32 {
    x * 2
}

fn cached(x: u32) -> u64 {
    u64::from(x) + 1_000
}

async fn fetched_later(x: u32) -> u64 {
    tokio::task::yield_now().await;
    u64::from(x) + 2_000
}

#[offload(workers = "1", timeout = "10s", fallback = cached)]
fn with_sync_fallback(x: u32) -> u64 {
    assert!(x != 0, "zero is not allowed");
    u64::from(x)
}

#[offload(workers = "1", timeout = "300ms", fallback = fetched_later)]
fn with_async_fallback(x: u32) -> u64 {
    if x == 0 {
        std::thread::sleep(Duration::from_secs(60));
    }
    u64::from(x)
}

#[offload(workers = "1", timeout = "10s", breaker(failures = 1, reset = "60s"), fallback = cached)]
fn guarded_with_fallback(x: u32) -> u64 {
    if x == 0 {
        std::process::abort();
    }
    u64::from(x)
}

fn breaker_of(pool: &str, entry: &str) -> BreakerState {
    let stats = offload::stats();
    let pool = stats.iter().find(|s| s.name == pool).expect("pool listed");
    pool.breakers.iter().find(|(e, _)| *e == entry).expect("breaker listed").1
}

#[tokio::test]
async fn opens_after_consecutive_failures_and_closes_after_a_good_trial() {
    assert_eq!(poison(1).await.unwrap(), 1);
    for _ in 0..3 {
        assert!(matches!(poison(0).await, Err(Error::Crashed { .. })));
    }
    assert_eq!(breaker_of("guarded", "breaker::poison"), BreakerState::Open);
    let restarts = |s: &offload::PoolStats| s.restarts(RestartCause::Crashed);
    let before = offload::stats().into_iter().find(|s| s.name == "guarded").map(|s| restarts(&s)).unwrap();

    // Open: refused at once, whatever the input, and no worker is touched.
    for x in [0, 7] {
        let err = poison(x).await.unwrap_err();
        assert!(matches!(err, Error::CircuitOpen { entry: "breaker::poison", .. }), "{err:?}");
    }
    assert_eq!(healthy(1).await.unwrap(), 2, "the other function in the pool is unaffected");
    let after = offload::stats().into_iter().find(|s| s.name == "guarded").map(|s| restarts(&s)).unwrap();
    assert_eq!(before, after, "no worker died while the breaker was open");

    // After the reset period one trial goes through; its success closes the breaker.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(poison(5).await.unwrap(), 5);
    assert_eq!(breaker_of("guarded", "breaker::poison"), BreakerState::Closed { failures: 0 });
    assert_eq!(poison(6).await.unwrap(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_does_not_starve_its_neighbours() {
    let poison_calls: Vec<_> = (0..100).map(|_| tokio::spawn(crash_loop(0))).collect();
    let neighbour_calls: Vec<_> = (0..100).map(|x| tokio::spawn(neighbour(x))).collect();
    for (x, call) in neighbour_calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), 2 * x as u32, "a neighbour's call failed");
    }
    let mut open = 0;
    for call in poison_calls {
        match call.await.unwrap() {
            Err(Error::CircuitOpen { .. }) => open += 1,
            Err(Error::Crashed { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let stats = offload::stats();
    let pool = stats.iter().find(|s| s.name == "starving").unwrap();
    assert!(open >= 90, "the breaker refused only {open} of 100 poison calls");
    assert!(pool.restarts_total() <= 10, "{} workers died", pool.restarts_total());
    assert_eq!(pool.failed(ErrorKind::CircuitOpen), open);
}

#[tokio::test]
async fn fallbacks_replace_worker_side_failures() {
    assert_eq!(with_sync_fallback(5).await.unwrap(), 5);
    assert_eq!(with_sync_fallback(0).await.unwrap(), 1_000, "a panic falls back");
    assert_eq!(with_async_fallback(5).await.unwrap(), 5);
    assert_eq!(with_async_fallback(0).await.unwrap(), 2_000, "a timeout falls back, asynchronously");

    assert_eq!(guarded_with_fallback(0).await.unwrap(), 1_000, "a crash falls back");
    assert_eq!(guarded_with_fallback(3).await.unwrap(), 1_003, "an open breaker falls back");
}
