//! A pool whose workers die while starting does not spin: it retries with exponential
//! backoff, and calls fail fast with a clear error meanwhile.

use std::time::{Duration, Instant};

use offload::{Error, offload};

/// 1 MiB of address space is too little for the binary to even load.
#[offload(memory = "1MiB", workers = "1", timeout = "30s")]
fn doomed() -> u32 {
    1
}

fn failures_in_a_row(err: &Error) -> Option<u32> {
    let text = err.to_string();
    let (_, rest) = text.split_once("failed to start ")?;
    rest.split(' ').next()?.parse().ok()
}

#[tokio::test]
async fn start_failures_back_off_and_calls_fail_fast() {
    let started = Instant::now();
    let mut attempts_seen = Vec::new();
    let mut first_error = None;
    for _ in 0..40 {
        let call = Instant::now();
        let err = doomed().await.unwrap_err();
        assert!(matches!(err, Error::Spawn { .. }), "{err:?}");
        assert!(call.elapsed() < Duration::from_secs(25), "a call hung for {:?}", call.elapsed());
        attempts_seen.extend(failures_in_a_row(&err));
        first_error.get_or_insert(err);
        // Pace the calls over about a second, as traffic would arrive.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let elapsed = started.elapsed();
    let first_error = first_error.unwrap().to_string();
    assert!(first_error.contains("could not start a worker"), "{first_error}");

    // Backoff doubles from 100 ms: over about a second, a handful of attempts, not 40.
    let attempts = attempts_seen.iter().copied().max().unwrap_or(1);
    assert!(attempts >= 2, "the pool never retried: {attempts_seen:?}");
    let bound = 2 + (elapsed.as_millis() as f64 / 100.0).log2().ceil() as u32;
    assert!(attempts <= bound, "{attempts} start attempts in {elapsed:?} (bound {bound}): {attempts_seen:?}");
}
