//! `state = path`: state built once in each worker, when it starts and before its first
//! call, and handed to the function by reference; a replacement worker builds its own.

use std::collections::HashSet;
use std::path::PathBuf;

use offload::{Error, offload};

/// Where the workers of this test process note each state they build: one line per build,
/// the building worker's pid.
fn builds_file() -> PathBuf {
    let parent = if offload::is_worker() { std::os::unix::process::parent_id() } else { std::process::id() };
    std::env::temp_dir().join(format!("offload-state-builds-{parent}"))
}

fn builds() -> Vec<u32> {
    std::fs::read_to_string(builds_file()).unwrap_or_default().lines().map(|l| l.parse().unwrap()).collect()
}

/// Stands in for an expensive model.
struct Model {
    built_by: u32,
    weights: Vec<u64>,
}

fn load_model() -> Model {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(builds_file()).unwrap();
    writeln!(file, "{}", std::process::id()).unwrap();
    Model { built_by: std::process::id(), weights: (1..=10).collect() }
}

/// The worker's pid, whether its state is its own, and what the state computes.
#[offload(pool = "stateful", workers = "2", timeout = "60s", state = load_model)]
fn infer(model: &Model, x: u64) -> (u32, bool, u64) {
    (std::process::id(), model.built_by == std::process::id(), model.weights.iter().sum::<u64>() * x)
}

#[offload(pool = "stateful", timeout = "60s")]
fn crash() {
    std::process::abort()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_built_once_per_worker_before_its_first_call() {
    let _ = std::fs::remove_file(builds_file());
    // Warming up waits for the states too.
    offload::warm_up().await.unwrap();
    assert_eq!(builds().len(), 2, "each of the two workers built its state at start: {:?}", builds());

    let calls: Vec<_> = (0..100).map(|x| tokio::spawn(infer(x))).collect();
    let mut pids = HashSet::new();
    for (x, call) in calls.into_iter().enumerate() {
        let (pid, own, value) = call.await.unwrap().unwrap();
        assert!(own, "worker {pid} used a state it did not build");
        assert_eq!(value, 55 * x as u64);
        pids.insert(pid);
    }
    let built: HashSet<u32> = builds().into_iter().collect();
    assert_eq!(builds().len(), 2, "100 calls built no more states: {:?}", builds());
    assert!(pids.is_subset(&built), "{pids:?} called, {built:?} built");

    // A replacement builds its own state, once, as it starts: warming up waits for it.
    assert!(matches!(crash().await, Err(Error::Crashed { .. })));
    offload::warm_up().await.unwrap();
    for x in 0..20 {
        let (pid, own, _) = infer(x).await.unwrap();
        assert!(own, "worker {pid} used a state it did not build");
    }
    let all = builds();
    assert_eq!(all.len(), 3, "one more build, by the replacement: {all:?}");
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 3, "each worker built once: {all:?}");
    std::fs::remove_file(builds_file()).unwrap();
}
