//! A worker that is killed (timeout, cancellation) takes the processes its function started
//! with it, and the caller's error does not wait for them.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use offload::{Error, offload};

/// Starts `sleep 60`, writes its pid to `pid_file`, then hangs past any deadline.
fn start_sleep_and_hang(pid_file: &str) -> u32 {
    let mut child = Command::new("sleep").arg("60").stdin(Stdio::null()).spawn().unwrap();
    std::fs::write(pid_file, child.id().to_string()).unwrap();
    std::thread::sleep(Duration::from_secs(600));
    let _ = child.wait();
    0
}

#[offload(pool = "tree_timeout", timeout = "300ms", workers = "2")]
fn hang_with_child(pid_file: String) -> u32 {
    start_sleep_and_hang(&pid_file)
}

#[offload(pool = "tree_cancel", timeout = "60s", workers = "1")]
fn hang_with_child_long(pid_file: String) -> u32 {
    start_sleep_and_hang(&pid_file)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("offload-tree-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn pid_in(file: &Path) -> Option<u32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_calls_leave_no_subprocess_and_return_at_their_deadline() {
    offload::warm_up().await.unwrap();
    let dir = scratch("timeout");
    let files: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("pid-{i}"))).collect();

    // Three calls on two workers: two run and start a subprocess, one waits in the queue.
    let started = Instant::now();
    let calls: Vec<_> = files
        .iter()
        .map(|file| {
            let path = file.to_str().unwrap().to_owned();
            tokio::spawn(async move {
                let result = hang_with_child(path).await;
                (result, started.elapsed())
            })
        })
        .collect();
    for call in calls {
        let (result, took) = call.await.unwrap();
        assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
        // The deadline is 300 ms; a loaded machine gets a margin, a reap-bound one does not.
        assert!(took < Duration::from_millis(1500), "a timed-out call returned after {took:?}");
    }

    let sleeps: Vec<u32> = files.iter().filter_map(|f| pid_in(f)).collect();
    assert!(!sleeps.is_empty(), "no call got as far as starting its subprocess");
    for pid in sleeps {
        assert!(
            support::eventually_async(Duration::from_secs(2), || !support::alive(pid)).await,
            "subprocess {pid} of a timed-out call still runs"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_call_leaves_no_subprocess() {
    let dir = scratch("cancel");
    let file = dir.join("pid");
    let running = tokio::spawn(hang_with_child_long(file.to_str().unwrap().to_owned()));
    assert!(support::eventually_async(Duration::from_secs(20), || pid_in(&file).is_some()).await);
    let sleep = pid_in(&file).unwrap();
    assert!(support::alive(sleep));

    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    assert!(
        support::eventually_async(Duration::from_secs(2), || !support::alive(sleep)).await,
        "subprocess {sleep} of a dropped call still runs"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Forks a child that does not exec and outlives the function (it holds everything the
/// worker held), writes its pid to `pid_file`, then dies of SIGABRT.
#[offload(pool = "tree_fork", timeout = "60s", workers = "1")]
fn fork_then_abort(pid_file: String) -> u32 {
    // SAFETY: the child only sleeps and exits, making no call that could need a lock the fork
    // copied in a locked state.
    match unsafe { libc::fork() } {
        0 => {
            std::thread::sleep(Duration::from_secs(60));
            unsafe { libc::_exit(0) }
        }
        child => {
            std::fs::write(&pid_file, child.to_string()).unwrap();
            std::process::abort()
        }
    }
}

#[offload(pool = "tree_fork", timeout = "60s", workers = "1")]
fn still_serving() -> u32 {
    5
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_a_fork_without_exec_is_a_crash_not_a_hang() {
    let dir = scratch("fork");
    let file = dir.join("pid");
    let started = Instant::now();
    let result = fork_then_abort(file.to_str().unwrap().to_owned()).await;
    let took = started.elapsed();
    match result {
        Err(Error::Crashed { exit: offload::ExitReason::Signal(6), .. }) => {}
        other => panic!("a worker that forked, then aborted, gave {other:?}, not Error::Crashed"),
    }
    // Promptly: the crash is seen when it happens, not at the 60 s timeout. The margin covers
    // starting the worker on a loaded machine.
    assert!(took < Duration::from_secs(10), "the crash was reported after {took:?}");
    let child = pid_in(&file).expect("the forked child's pid");
    assert!(
        support::eventually_async(Duration::from_secs(10), || !support::alive(child)).await,
        "the forked child {child} outlived its worker"
    );
    assert_eq!(still_serving().await.unwrap(), 5, "the pool recovers");
    std::fs::remove_dir_all(&dir).unwrap();
}
