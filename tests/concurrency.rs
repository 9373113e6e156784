//! Many concurrent calls on a small pool are all answered, each by a worker of the pool.

use std::collections::HashSet;

use offload::offload;

#[offload(timeout = "60s", workers = "2")]
fn square_with_pid(x: u64) -> (u64, u32) {
    (x * x, std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_calls_on_two_workers() {
    let calls: Vec<_> = (0..200u64).map(|i| tokio::spawn(square_with_pid(i))).collect();
    let mut pids = HashSet::new();
    for (i, call) in calls.into_iter().enumerate() {
        let (square, pid) = call.await.expect("task").expect("call");
        assert_eq!(square, (i * i) as u64);
        pids.insert(pid);
    }
    assert!(!pids.is_empty() && pids.len() <= 2, "served by {pids:?}");
    assert!(!pids.contains(&std::process::id()));
}

#[tokio::test(flavor = "current_thread")]
async fn interleaved_on_one_thread() {
    let calls: Vec<_> = (0..50u64).map(|i| tokio::spawn(square_with_pid(i))).collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap().0, (i * i) as u64);
    }
}
