//! A bounded queue under a flood: `overload = "reject"` sheds load at once, `"wait"` applies
//! backpressure; every call is answered, the counts add up, and memory stays bounded.

use offload::{Error, offload};

const FLOOD: u64 = 10_000;

#[offload(workers = "1", queue = 8, overload = "reject", timeout = "60s")]
fn shed(x: u64) -> u64 {
    x + 1
}

#[offload(workers = "1", queue = 8, overload = "wait", timeout = "120s")]
fn push_back(x: u64) -> u64 {
    x + 1
}

/// Held by each test while it measures: resident memory is the whole process's, so a test
/// that floods the runtime with tasks alongside would count against the other's bound.
static MEASURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_sheds_load_and_every_call_is_answered() {
    let _measuring = MEASURING.lock().await;
    shed(0).await.unwrap();
    let before = rss();
    let calls: Vec<_> = (0..FLOOD).map(|i| tokio::spawn(shed(i))).collect();
    let (mut ok, mut overloaded) = (0u64, 0u64);
    for (i, call) in calls.into_iter().enumerate() {
        match call.await.unwrap() {
            Ok(v) => {
                assert_eq!(v, i as u64 + 1);
                ok += 1;
            }
            Err(Error::Overloaded { entry, queue }) => {
                assert_eq!((entry, queue), ("overload::shed", 8));
                overloaded += 1;
            }
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!(ok + overloaded, FLOOD);
    assert!(ok >= 1 && overloaded >= 1, "ok {ok}, overloaded {overloaded}");
    let grown = rss().saturating_sub(before);
    assert!(grown < 64 << 20, "memory grew by {grown} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_applies_backpressure_and_runs_everything() {
    let _measuring = MEASURING.lock().await;
    push_back(0).await.unwrap();
    let before = rss();
    let calls: Vec<_> = (0..FLOOD).map(|i| tokio::spawn(push_back(i))).collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), i as u64 + 1);
    }
    let grown = rss().saturating_sub(before);
    assert!(grown < 64 << 20, "memory grew by {grown} bytes");
}
