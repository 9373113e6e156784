//! A worker that dies mid-call (abort, segfault, exit, an outside kill -9) fails that call
//! with `Error::Crashed`, is replaced, and the pool serves the next call.

mod support;

use std::time::Duration;

use offload::{Error, ExitReason, offload};

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
enum Death {
    Abort,
    Segfault,
    NullDeref,
    StackOverflow,
    Exit(i32),
    None,
}

#[offload(timeout = "20s", workers = "1")]
fn die(how: Death) -> u32 {
    eprintln!("worker {} about to die by {how:?}", std::process::id());
    match how {
        Death::Abort => std::process::abort(),
        Death::Segfault => {
            let me = rustix::process::getpid();
            rustix::process::kill_process(me, rustix::process::Signal::SEGV).unwrap();
            std::thread::sleep(Duration::from_secs(60));
        }
        Death::NullDeref => {
            // SAFETY: none: a real invalid access, to die of it.
            let null = std::hint::black_box(std::ptr::null::<u64>());
            let _ = unsafe { std::ptr::read_volatile(null) };
        }
        Death::StackOverflow => {
            std::hint::black_box(recurse(std::hint::black_box(u64::MAX)));
        }
        Death::Exit(code) => std::process::exit(code),
        Death::None => {}
    }
    std::process::id()
}

/// Recurses `depth` times with a 4 KiB frame: past any stack for a large `depth`.
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth as u8; 4096]);
    if depth == 0 { frame[0] as u64 } else { recurse(depth - 1).wrapping_add(frame[100] as u64) }
}

#[offload(timeout = "20s", workers = "1")]
fn wait_to_be_killed(pid_file: String) -> u32 {
    std::fs::write(&pid_file, std::process::id().to_string()).unwrap();
    std::thread::sleep(Duration::from_secs(30));
    0
}

#[offload(timeout = "20s", workers = "1")]
fn idle_pid() -> u32 {
    std::process::id()
}

#[offload(timeout = "20s", workers = "1")]
fn pid_when_resumed() -> u32 {
    std::process::id()
}

async fn crash(how: Death) -> (u32, ExitReason, Vec<String>) {
    match die(how).await {
        Err(Error::Crashed { entry, pid, exit, stderr, .. }) => {
            assert_eq!(entry, "crash::die");
            (pid, exit, stderr)
        }
        other => panic!("expected a crash, got {other:?}"),
    }
}

fn assert_recovered(before: u32, after: u32) {
    assert_ne!(before, after, "a new worker serves after the crash");
    assert!(!support::alive(before), "crashed worker {before} is still running");
}

#[tokio::test]
async fn abort() {
    let (pid, exit, stderr) = crash(Death::Abort).await;
    assert_eq!(exit, ExitReason::Signal(6));
    assert!(
        stderr.iter().any(|l| l.contains(&format!("worker {pid} about to die by Abort"))),
        "the error carries the worker's last stderr lines: {stderr:?}"
    );
    assert_recovered(pid, die(Death::None).await.unwrap());
}

#[tokio::test]
async fn segfault() {
    let (pid, exit, _) = crash(Death::Segfault).await;
    assert_eq!(exit, ExitReason::Signal(11));
    assert_recovered(pid, die(Death::None).await.unwrap());
}

#[tokio::test]
async fn invalid_memory_access() {
    let (pid, exit, stderr) = crash(Death::NullDeref).await;
    assert_eq!(exit, ExitReason::Signal(11));
    assert!(!stderr.iter().any(|l| l.contains("overflow")), "{stderr:?}");
    assert_recovered(pid, die(Death::None).await.unwrap());
}

#[tokio::test]
async fn stack_overflow_says_so() {
    let (pid, exit, stderr) = crash(Death::StackOverflow).await;
    // As Rust's own runtime reports an overflow in `main`: the message, then SIGABRT.
    assert_eq!(exit, ExitReason::Signal(6));
    assert!(stderr.iter().any(|l| l.contains("has overflowed its stack")), "{stderr:?}");
    assert!(stderr.iter().any(|l| l.contains("stack overflow")), "{stderr:?}");
    assert_recovered(pid, die(Death::None).await.unwrap());
}

#[tokio::test]
async fn exit_zero_mid_call() {
    let (pid, exit, _) = crash(Death::Exit(0)).await;
    assert_eq!(exit, ExitReason::Code(0));
    assert_recovered(pid, die(Death::None).await.unwrap());
}

#[tokio::test]
async fn exit_code_is_reported() {
    let (_, exit, _) = crash(Death::Exit(3)).await;
    assert_eq!(exit, ExitReason::Code(3));
    let err = die(Death::Exit(3)).await.unwrap_err();
    assert!(err.to_string().contains("exited with status 3"), "{err}");
}

#[tokio::test]
async fn outside_kill_of_a_busy_worker() {
    let dir = std::env::temp_dir().join(format!("offload-crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("pid");
    let path = pid_file.to_str().unwrap().to_owned();
    let call = tokio::spawn(wait_to_be_killed(path));
    let read_pid = || std::fs::read_to_string(&pid_file).ok().and_then(|s| s.parse::<u32>().ok());
    assert!(
        support::eventually_async(Duration::from_secs(20), || read_pid().is_some()).await,
        "the call never started"
    );
    let pid = read_pid().unwrap();
    support::kill9(pid);
    let err = call.await.unwrap().unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(err, Error::Crashed { pid: p, exit: ExitReason::Signal(9), .. } if p == pid), "{err:?}");
    assert!(err.to_string().contains("killed by signal 9 (SIGKILL)"), "{err}");
}

#[tokio::test]
async fn an_idle_worker_killed_from_outside_is_replaced_without_failing_a_call() {
    let pid = idle_pid().await.unwrap();
    support::kill9(pid);
    assert!(support::eventually_async(Duration::from_secs(10), || !support::alive(pid)).await);
    let next = idle_pid().await.expect("the dead idle worker is skipped, not reported");
    assert_ne!(next, pid);
}

/// A call written to an idle worker that dies before it reads the call (here: stopped, then
/// killed) never started: it runs on the worker's replacement instead of failing.
#[tokio::test]
async fn a_call_sent_to_a_worker_that_dies_before_starting_it_runs_on_the_replacement() {
    let pid = pid_when_resumed().await.unwrap();
    let stopped = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(stopped, rustix::process::Signal::STOP).unwrap();
    let call = tokio::spawn(pid_when_resumed());
    // This test's runtime has one thread: once the pool counts the call's worker busy, the
    // call's task has written the call and waits for the reply.
    let busy = || offload::stats().iter().any(|s| s.name == "crash::pid_when_resumed" && s.busy == 1);
    assert!(support::eventually_async(Duration::from_secs(10), busy).await, "the call never took the worker");
    support::kill9(pid);
    let ran_on = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the call ends")
        .unwrap()
        .expect("the call never started, so it runs on the replacement");
    assert_ne!(ran_on, pid);
    let stats = offload::stats().into_iter().find(|s| s.name == "crash::pid_when_resumed").unwrap();
    assert_eq!(stats.failed_total(), 0, "no call failed");
    assert_eq!(stats.restarts(offload::RestartCause::DiedIdle), 1);
}
