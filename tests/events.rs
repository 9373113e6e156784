//! Every worker start and exit is an event: pid, exit code or signal, and the cause. The
//! reaper reports exits from its own thread, so this binary installs a global subscriber.

#[path = "support/capture.rs"]
mod capture;
mod support;

use std::sync::OnceLock;
use std::time::Duration;

use offload::offload;

fn capture() -> &'static capture::Capture {
    static CAPTURE: OnceLock<capture::Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = capture::Capture::default();
        tracing::subscriber::set_global_default(capture.clone()).expect("the only global subscriber");
        capture
    })
}

#[offload(workers = "1", timeout = "300ms")]
fn hang() -> u32 {
    std::thread::sleep(Duration::from_secs(60));
    0
}

#[offload(workers = "1", timeout = "30s", max_tasks = 1)]
fn once() -> u32 {
    std::process::id()
}

#[offload(workers = "1", timeout = "30s", memory = "256MiB")]
fn bomb() -> usize {
    let block = vec![1u8; 2 << 30];
    std::hint::black_box(block).len()
}

/// The exit event for `pid`, waiting for the reaper to report it.
async fn exit_event(pid: u32) -> capture::Captured {
    let found = || {
        capture().events().into_iter().find(|e| {
            e.fields.get("message").is_some_and(|m| m == "offload worker exited")
                && e.fields.get("pid").is_some_and(|p| *p == pid.to_string())
        })
    };
    assert!(
        support::eventually_async(Duration::from_secs(20), || found().is_some()).await,
        "no exit event for {pid}"
    );
    found().unwrap()
}

#[tokio::test]
async fn starts_and_exits_are_logged_with_their_cause() {
    capture();
    let err = hang().await.unwrap_err();
    let offload::Error::Timeout { pid: Some(pid), .. } = err else { panic!("{err:?}") };
    let started = capture().events().into_iter().any(|e| {
        e.fields.get("message").is_some_and(|m| m == "offload worker started")
            && e.fields.get("pid").is_some_and(|p| *p == pid.to_string())
    });
    assert!(started, "no start event for {pid}");
    let exit = exit_event(pid).await;
    assert_eq!(exit.fields["cause"], "timeout");
    assert_eq!(exit.fields["exit"], "killed by signal 9 (SIGKILL)");

    let recycled = once().await.unwrap();
    let exit = exit_event(recycled).await;
    assert_eq!(exit.fields["cause"], "recycled");
    assert_eq!(exit.fields["exit"], "exited with status 0");

    let err = bomb().await.unwrap_err();
    let offload::Error::MemoryLimit { pid, .. } = err else { panic!("{err:?}") };
    let exit = exit_event(pid).await;
    assert_eq!(exit.fields["cause"], "memory_limit");
    assert_eq!(exit.fields["exit"], "killed by signal 6 (SIGABRT)");
}
