//! Values of many shapes make the trip to a worker and back, on both kinds of runtime.

mod support;

use offload::offload;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    x: i64,
    y: i64,
    label: String,
}

#[offload(timeout = "20s")]
fn add(a: u64, b: u64) -> u64 {
    a + b
}

#[offload(timeout = "20s")]
fn swap((a, b): (u32, String), mut point: Point) -> (String, u32, Point) {
    point.x += 1;
    (b, a, point)
}

#[offload(timeout = "20s")]
fn reverse(mut data: Vec<u8>) -> Vec<u8> {
    data.reverse();
    data
}

#[offload(timeout = "20s")]
fn checked_div(a: i32, b: i32) -> Result<i32, String> {
    if b == 0 { Err(format!("cannot divide {a} by zero")) } else { Ok(a / b) }
}

#[offload(timeout = "20s")]
fn nothing() {}

#[offload(timeout = "20s")]
fn worker_pid() -> u32 {
    std::process::id()
}

#[offload(timeout = "20s")]
fn in_worker() -> bool {
    offload::is_worker()
}

#[tokio::test]
async fn plain_values() {
    assert_eq!(add(2, 40).await.unwrap(), 42);
    assert_eq!(add(u64::MAX - 1, 1).await.unwrap(), u64::MAX);
}

#[tokio::test]
async fn patterns_structs_and_strings() {
    let p = Point { x: 1, y: 2, label: "p".into() };
    let (s, n, q) = swap((7, "seven".into()), p.clone()).await.unwrap();
    assert_eq!((s.as_str(), n), ("seven", 7));
    assert_eq!(q, Point { x: 2, ..p });
}

#[tokio::test]
async fn bytes_both_ways() {
    for len in [0usize, 1, 4095, 4096, 4097, 1 << 20] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut expected = data.clone();
        expected.reverse();
        assert_eq!(reverse(data).await.unwrap(), expected, "len {len}");
    }
}

#[tokio::test]
async fn result_is_passed_back_as_a_value() {
    assert_eq!(checked_div(9, 3).await.unwrap(), Ok(3));
    assert_eq!(checked_div(9, 0).await.unwrap(), Err("cannot divide 9 by zero".to_owned()));
}

#[tokio::test]
async fn unit_return() {
    nothing().await.unwrap();
}

#[tokio::test]
async fn runs_in_another_process() {
    assert!(!offload::is_worker());
    assert!(in_worker().await.unwrap());
    assert_ne!(worker_pid().await.unwrap(), std::process::id());
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_runtime() {
    assert_eq!(add(1, 2).await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_thread_runtime_from_spawned_tasks() {
    let tasks: Vec<_> = (0..20u64).map(|i| tokio::spawn(add(i, i))).collect();
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap().unwrap(), 2 * i as u64);
    }
}

#[test]
fn pool_outlives_the_runtime_that_started_it() {
    let first = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let pid = first.block_on(worker_pid()).unwrap();
    drop(first);
    let second = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    assert_eq!(second.block_on(worker_pid()).unwrap(), pid, "the same worker serves the new runtime");
}

#[test]
fn no_runtime_is_a_clear_error() {
    let err = futures_lite_block_on(add(1, 1)).unwrap_err();
    assert!(matches!(err, offload::Error::Config { .. }), "{err:?}");
    assert!(err.to_string().contains("Tokio runtime"), "{err}");
}

/// Polls a future to completion on this thread, outside any Tokio runtime.
fn futures_lite_block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(out) => return out,
            Poll::Pending => std::thread::park(),
        }
    }
}
