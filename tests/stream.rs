//! Streamed results: a function that returns `impl Iterator<Item = T>` is, at the call site,
//! a stream of `Result<T, Error>` whose items arrive as the worker yields them, with
//! backpressure; dropping it ends the call; a panic or a crash ends it with that error after
//! the items already delivered.

mod support;

use std::time::{Duration, Instant};

use offload::{Error, offload};

#[offload(workers = "1", timeout = "60s")]
fn count_to(n: u64) -> impl Iterator<Item = u64> {
    0..n
}

/// `n` items of 1 KiB each, numbered, with the time each was made (nanoseconds of the
/// system clock, which both processes read); the last also has the worker's peak resident
/// memory.
#[offload(workers = "1", timeout = "60s")]
fn big_items(n: u64) -> impl Iterator<Item = (u64, Vec<u8>, u128, u64)> {
    (0..n).map(move |i| {
        let rss = if i + 1 == n { peak_rss_kib() } else { 0 };
        (i, vec![(i % 251) as u8; 1024], now_ns(), rss)
    })
}

fn now_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// One item, then, on the second, a sleep until the caller's drop kills the worker.
#[offload(workers = "1", timeout = "60s")]
fn slow_second() -> impl Iterator<Item = u32> {
    (0..2).map(|i| {
        if i == 1 {
            std::thread::sleep(Duration::from_secs(600));
        }
        std::process::id()
    })
}

/// Panics after three items.
#[offload(workers = "1", timeout = "60s")]
fn panics_after_three() -> impl Iterator<Item = u64> {
    (0..10).inspect(|&i| assert!(i < 3, "no fourth item"))
}

/// Aborts its worker after three items.
#[offload(workers = "1", timeout = "60s")]
fn crashes_after_three() -> impl Iterator<Item = u64> {
    (0..10).inspect(|&i| {
        if i == 3 {
            std::process::abort();
        }
    })
}

/// Items as long as asked, one each 100 ms.
#[offload(workers = "1", timeout = "1s")]
fn slow_items() -> impl Iterator<Item = u64> {
    (0..).inspect(|_| std::thread::sleep(Duration::from_millis(100)))
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn within<F: std::future::Future>(limit: Duration, future: F) -> F::Output {
    tokio::time::timeout(limit, future).await.expect("the test ran past its limit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_arrive_in_order_then_the_stream_ends() {
    within(Duration::from_secs(30), async {
        let mut items = count_to(1_000);
        let mut expected = 0;
        while let Some(item) = items.next().await {
            assert_eq!(item.unwrap(), expected);
            expected += 1;
        }
        assert_eq!(expected, 1_000);
        assert!(items.next().await.is_none());
        // An empty iterator is an empty stream.
        assert!(count_to(0).next().await.is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_holds_the_worker_back() {
    within(Duration::from_secs(120), async {
        const N: u64 = 100_000;
        let mut items = big_items(N);
        let (mut n, mut peak) = (0, 0);
        // When the consumer last resumed after a pause, and how many items the worker had
        // made by then beyond the one the consumer paused at.
        let (mut resumed, mut ahead, mut most_ahead) = (None, 0u64, 0u64);
        while let Some(item) = items.next().await {
            let (i, bytes, made, rss) = item.unwrap();
            assert_eq!(i, n);
            assert!(bytes.len() == 1024 && bytes.iter().all(|&b| b == (i % 251) as u8));
            if resumed.is_some_and(|at| made < at) {
                ahead += 1;
                most_ahead = most_ahead.max(ahead);
            }
            if n % 10_000 == 0 {
                // The consumer falls behind: the worker must wait for it.
                tokio::time::sleep(Duration::from_millis(50)).await;
                (resumed, ahead) = (Some(now_ns()), 0);
            }
            peak = rss;
            n += 1;
        }
        assert_eq!(n, N);
        // In 50 ms the worker makes tens of thousands of items; held back, it ran ahead by
        // the 64 items read ahead, what the socket buffer holds (about 200 of these) and
        // one read's worth.
        assert!(most_ahead < 1_000, "the worker ran {most_ahead} items ahead of a paused consumer");
        // 100 MB went through; the worker held a few hundred KiB of it at most.
        assert!(peak > 0 && peak < 40 * 1024, "the worker peaked at {peak} KiB");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_kills_the_worker() {
    within(Duration::from_secs(30), async {
        let mut items = slow_second();
        let pid = items.next().await.unwrap().unwrap();
        assert!(support::alive(pid));
        drop(items);
        let dead = support::eventually_async(Duration::from_secs(10), || !support::alive(pid)).await;
        assert!(dead, "worker {pid} still runs the dropped stream");
        // The pool recovers.
        assert_eq!(count_to(3).next().await.unwrap().unwrap(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_ends_the_stream_after_the_items_before_it() {
    within(Duration::from_secs(30), async {
        let mut items = panics_after_three();
        for expected in 0..3 {
            assert_eq!(items.next().await.unwrap().unwrap(), expected);
        }
        match items.next().await {
            Some(Err(Error::Panicked { message, .. })) => assert!(message.contains("no fourth item")),
            other => panic!("expected the panic, got {other:?}"),
        }
        assert!(items.next().await.is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_ends_the_stream_after_the_items_before_it() {
    within(Duration::from_secs(30), async {
        let mut items = crashes_after_three();
        for expected in 0..3 {
            assert_eq!(items.next().await.unwrap().unwrap(), expected);
        }
        match items.next().await {
            Some(Err(Error::Crashed { .. })) => {}
            other => panic!("expected the crash, got {other:?}"),
        }
        assert!(items.next().await.is_none());
        // The pool recovers.
        let mut again = crashes_after_three();
        assert_eq!(again.next().await.unwrap().unwrap(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeout_covers_the_whole_stream() {
    within(Duration::from_secs(30), async {
        let started = Instant::now();
        let mut items = slow_items();
        let mut delivered = 0;
        let error = loop {
            match items.next().await {
                Some(Ok(_)) => delivered += 1,
                Some(Err(error)) => break error,
                None => panic!("an endless stream ended"),
            }
        };
        assert!(matches!(error, Error::Timeout { pid: Some(_), .. }), "{error}");
        // About ten items in the one second, and the error at the deadline.
        assert!((3..=10).contains(&delivered), "{delivered} items");
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(4), "{took:?}");
        assert!(items.next().await.is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_not_a_batch_item() {
    within(Duration::from_secs(30), async {
        let mut results = offload::map(|n| async move { count_to(n).next().await.unwrap() }, 0..2u64);
        while let Some(result) = results.next().await {
            let error = result.unwrap_err();
            assert!(error.to_string().contains("cannot run a function that streams"), "{error}");
        }
    })
    .await;
}
