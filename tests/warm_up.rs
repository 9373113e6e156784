//! `offload::warm_up` starts every pool's workers before the first call.

mod support;

use offload::offload;

#[offload(workers = "2", timeout = "30s")]
fn ready() -> u32 {
    std::process::id()
}

#[tokio::test]
async fn warm_up_starts_workers_before_any_call() {
    assert!(support::worker_children().is_empty(), "pools start lazily");
    // The future can be spawned like any other.
    tokio::spawn(offload::warm_up()).await.unwrap().unwrap();
    let workers = support::worker_children();
    assert_eq!(workers.len(), 2, "both workers run before the first call: {workers:?}");
    let pid = ready().await.unwrap();
    assert!(workers.contains(&pid), "a warmed-up worker served the call");
}
