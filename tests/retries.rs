//! `retries = N`: a call whose worker died runs again on a fresh worker, up to N more times,
//! within its deadline; panics are never retried; the final error lists the attempts, and
//! every attempt counts in the figures as it happens.

use std::path::{Path, PathBuf};
use std::time::Duration;

use offload::{Error, ErrorKind, ExitReason, offload};

/// Counts an attempt in `dir`, then crashes unless this is attempt `succeed_on` (1-based).
fn attempt(dir: &str, succeed_on: usize) -> usize {
    let n = std::fs::read_dir(dir).unwrap().count() + 1;
    std::fs::write(Path::new(dir).join(n.to_string()), b"").unwrap();
    if n != succeed_on {
        std::process::abort();
    }
    n
}

#[offload(pool = "retry-flaky", workers = "1", timeout = "60s", retries = 1)]
fn flaky(dir: String) -> usize {
    attempt(&dir, 2)
}

#[offload(pool = "retry-doomed", workers = "1", timeout = "60s", retries = 2)]
fn doomed(dir: String) -> usize {
    attempt(&dir, 0)
}

#[offload(pool = "retry-panics", workers = "1", timeout = "60s", retries = 2)]
fn panics(dir: String) -> usize {
    let n = std::fs::read_dir(&dir).unwrap().count() + 1;
    std::fs::write(Path::new(&dir).join(n.to_string()), b"").unwrap();
    panic!("attempt {n}")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("offload-retries-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn attempts_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

fn failed(pool: &str, kind: ErrorKind) -> u64 {
    offload::stats().into_iter().find(|p| p.name == pool).map_or(0, |p| p.failed(kind))
}

#[tokio::test]
async fn a_crash_then_a_success_is_a_success() {
    let dir = scratch("flaky");
    let result =
        tokio::time::timeout(Duration::from_secs(60), flaky(dir.to_str().unwrap().into())).await.unwrap();
    assert_eq!(result.unwrap(), 2, "the second attempt answered");
    assert_eq!(attempts_in(&dir), 2);
    assert_eq!(failed("retry-flaky", ErrorKind::Crashed), 1, "the crashed attempt is counted");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_call_that_always_crashes_runs_exactly_n_plus_one_times() {
    let dir = scratch("doomed");
    let result =
        tokio::time::timeout(Duration::from_secs(60), doomed(dir.to_str().unwrap().into())).await.unwrap();
    match result {
        Err(Error::Crashed { exit: ExitReason::Signal(6), earlier_attempts, .. }) => {
            assert_eq!(earlier_attempts.len(), 2, "{earlier_attempts:?}");
            assert!(earlier_attempts.iter().all(|e| matches!(e, Error::Crashed { .. })));
        }
        other => panic!("a call that always crashes gave {other:?}"),
    }
    assert_eq!(attempts_in(&dir), 3);
    assert_eq!(failed("retry-doomed", ErrorKind::Crashed), 3, "every attempt is counted");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_panic_is_not_retried() {
    let dir = scratch("panics");
    let result =
        tokio::time::timeout(Duration::from_secs(60), panics(dir.to_str().unwrap().into())).await.unwrap();
    assert!(matches!(result, Err(Error::Panicked { .. })), "{result:?}");
    assert_eq!(attempts_in(&dir), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

struct Slow;

/// Makes every worker of its pool take half a second to start.
fn slow_start() -> Slow {
    std::thread::sleep(Duration::from_millis(500));
    Slow
}

fn stand_in(_ms: u64) -> u32 {
    99
}

/// Crashes late in its deadline, so that its retry has no time to get a replacement.
#[offload(pool = "retry-slow", workers = "1", timeout = "600ms", retries = 1, state = slow_start, fallback = stand_in)]
fn crash_late(_slow: &Slow, ms: u64) -> u32 {
    std::thread::sleep(Duration::from_millis(ms));
    std::process::abort()
}

#[tokio::test]
async fn a_retry_without_time_for_a_worker_ends_with_the_crash_and_its_fallback() {
    offload::warm_up().await.unwrap();
    // The retry times out waiting for its replacement; the call ends with the crash, which
    // the fallback replaces, not with a queue timeout, which it would not.
    let result = tokio::time::timeout(Duration::from_secs(60), crash_late(400)).await.unwrap();
    assert_eq!(result.unwrap(), 99);
}
