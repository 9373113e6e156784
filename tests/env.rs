//! `OFFLOAD_*` environment variables override a pool's settings without recompiling; a bad
//! value is an error naming the variable. Each case runs this binary again with the variables
//! set, so no test changes its own environment.

mod support;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use offload::{Error, offload};

const ROLE: &str = "OFFLOAD_TEST_ENV_ROLE";

#[offload(pool = "tuned", workers = "1", timeout = "30s")]
fn tuned(ms: u64) -> u32 {
    std::thread::sleep(Duration::from_millis(ms));
    std::process::id()
}

#[offload(pool = "misconfigured", timeout = "30s")]
fn misconfigured() -> u32 {
    1
}

/// Runs in the child: checks what the variables did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a helper process of `variables_override_settings`"]
async fn env_child() {
    if std::env::var_os(ROLE).is_none() {
        return;
    }
    // OFFLOAD_POOL_TUNED_WORKERS=3 beats `workers = "1"`: three slow calls at once run on
    // three workers.
    let calls: Vec<_> = (0..3).map(|_| tokio::spawn(tuned(300))).collect();
    let mut pids = HashSet::new();
    for call in calls {
        pids.insert(call.await.unwrap().unwrap());
    }
    assert_eq!(pids.len(), 3, "{pids:?}");
    // OFFLOAD_POOL_TUNED_TIMEOUT=2s beats `timeout = "30s"`.
    let err = tuned(20_000).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { timeout, .. } if timeout == Duration::from_secs(2)), "{err:?}");
    // OFFLOAD_POOL_MISCONFIGURED_MEMORY=lots is an error naming the variable.
    let err = misconfigured().await.unwrap_err();
    let Error::Config { message, .. } = &err else { panic!("expected a config error, got {err:?}") };
    assert!(message.contains("environment variable OFFLOAD_POOL_MISCONFIGURED_MEMORY"), "{message}");
    assert!(message.contains("invalid size `lots`"), "{message}");
}

#[test]
fn variables_override_settings() {
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "env_child", "--ignored", "--test-threads=1"])
        .env(ROLE, "1")
        .env("OFFLOAD_POOL_TUNED_WORKERS", "3")
        .env("OFFLOAD_POOL_TUNED_TIMEOUT", "2s")
        .env("OFFLOAD_POOL_MISCONFIGURED_MEMORY", "lots")
        .status()
        .unwrap();
    assert!(status.success(), "the child's checks failed: {status}");
}
