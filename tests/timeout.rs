//! A call past its deadline kills its worker, which is replaced; other calls carry on.

mod support;

use std::time::{Duration, Instant};

use offload::{Error, offload};

/// Reports its pid, then sleeps far past the deadline.
#[offload(timeout = "300ms", workers = "1")]
fn hang(pid_file: String) -> u32 {
    std::fs::write(&pid_file, std::process::id().to_string()).unwrap();
    std::thread::sleep(Duration::from_secs(600));
    0
}

fn spin_forever() -> u64 {
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

// One pool per test, so tests running in parallel do not share workers.
#[offload(timeout = "300ms", workers = "1")]
fn spin() -> u64 {
    spin_forever()
}

#[offload(timeout = "300ms", workers = "1")]
fn spin_beside_others() -> u64 {
    spin_forever()
}

#[offload(timeout = "300ms", workers = "1")]
fn spin_with_a_queue() -> u64 {
    spin_forever()
}

#[offload(timeout = "20s", workers = "1")]
fn quick(x: u32) -> u32 {
    x + 1
}

#[tokio::test]
async fn sleeping_call_is_killed_at_its_deadline() {
    let dir = std::env::temp_dir().join(format!("offload-timeout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("pid");
    let started = Instant::now();
    let err = hang(pid_file.to_str().unwrap().to_owned()).await.unwrap_err();
    let waited = started.elapsed();
    let reported: u32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    match err {
        Error::Timeout { entry, timeout, by, pid } => {
            assert_eq!(entry, "timeout::hang");
            assert_eq!(by, offload::Deadline::Function);
            assert_eq!(timeout, Duration::from_millis(300));
            assert_eq!(pid, Some(reported), "the error names the worker that ran the call");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(waited >= Duration::from_millis(300), "returned before the deadline: {waited:?}");
    assert!(!support::alive(reported), "worker {reported} still runs after its call timed out");
}

#[tokio::test]
async fn busy_loop_is_stopped_and_the_pool_recovers() {
    let err = spin().await.unwrap_err();
    let Error::Timeout { pid: Some(pid), .. } = err else { panic!("expected a timeout, got {err:?}") };
    assert!(!support::alive(pid), "spinning worker {pid} survived");
    // The pool's one worker was replaced: the next calls wait for the new worker, then fail
    // at their own deadline again, proving the pool is usable.
    for _ in 0..2 {
        let err = spin().await.unwrap_err();
        assert!(matches!(err, Error::Timeout { pid: Some(p), .. } if p != pid), "{err:?}");
    }
}

#[tokio::test]
async fn other_calls_are_unaffected() {
    let (hung, fine) = tokio::join!(spin_beside_others(), async {
        let mut out = Vec::new();
        for i in 0..20 {
            out.push(quick(i).await.unwrap());
        }
        out
    });
    assert!(matches!(hung, Err(Error::Timeout { .. })));
    assert_eq!(fine, (1..=20).collect::<Vec<_>>());
}

#[tokio::test]
async fn deadline_covers_waiting_in_the_queue() {
    // The one worker is busy spinning until its deadline; a second call queued behind it
    // times out too, without ever reaching a worker.
    let (first, second) = tokio::join!(spin_with_a_queue(), async {
        tokio::task::yield_now().await;
        spin_with_a_queue().await
    });
    assert!(matches!(first, Err(Error::Timeout { pid: Some(_), .. })), "{first:?}");
    assert!(matches!(second, Err(Error::Timeout { .. })), "{second:?}");
}
