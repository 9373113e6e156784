//! Workers are replaced between calls after `max_tasks` calls or when a call leaves them
//! above `max_rss`; no call fails because of it.

use std::collections::HashMap;

use offload::offload;

#[offload(workers = "1", max_tasks = 3, timeout = "30s")]
fn counted() -> u32 {
    std::process::id()
}

/// Leaks `mib` MiB of touched memory per call.
#[offload(workers = "1", max_rss = "48MiB", timeout = "30s")]
fn leaky(mib: usize) -> u32 {
    let block: &'static mut [u8] = Vec::leak(vec![1u8; mib << 20]);
    std::hint::black_box(block);
    std::process::id()
}

#[tokio::test]
async fn max_tasks_recycles_after_n_calls() {
    let mut calls_per_pid: HashMap<u32, u32> = HashMap::new();
    let mut order = Vec::new();
    for _ in 0..9 {
        let pid = counted().await.expect("recycling never fails a call");
        *calls_per_pid.entry(pid).or_default() += 1;
        order.push(pid);
    }
    assert_eq!(calls_per_pid.len(), 3, "three workers served nine calls: {order:?}");
    assert!(calls_per_pid.values().all(|&n| n == 3), "{calls_per_pid:?}");
    assert!(order.chunks(3).all(|c| c.iter().all(|&p| p == c[0])), "{order:?}");
}

#[tokio::test]
async fn max_rss_recycles_a_leaking_worker() {
    let mut pids = Vec::new();
    for _ in 0..6 {
        pids.push(leaky(20).await.expect("recycling never fails a call"));
    }
    // 20 MiB leaked per call: the second or third call pushes a worker past 48 MiB.
    let mut runs = Vec::new();
    for pid in &pids {
        match runs.last_mut() {
            Some((p, n)) if p == pid => *n += 1,
            _ => runs.push((*pid, 1)),
        }
    }
    assert!(runs.len() >= 2, "the leaking worker was never replaced: {pids:?}");
    assert!(runs.iter().all(|&(_, n)| n <= 3), "a worker served too many leaking calls: {pids:?}");
}
