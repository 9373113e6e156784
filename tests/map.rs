//! `offload::map`: one offloaded function over many inputs, in batches. A result per input, in
//! order or as batches finish; a panic fails only its input; a crash or a timeout fails only
//! its batch, and the pool recovers; dropping the map stops the work.

mod support;

use std::io::Write;
use std::time::Duration;

use offload::{Error, offload};

#[offload(workers = "2", timeout = "60s")]
fn square(x: u64) -> u64 {
    x * x
}

/// One worker and no queue: what does not find the worker free is refused.
#[offload(workers = "1", queue = 0, overload = "reject", timeout = "60s")]
fn no_queue(x: u64) -> u64 {
    x * 2
}

/// Panics on 7,777 only.
#[offload(workers = "2", timeout = "60s")]
fn picky(x: u64) -> u64 {
    assert!(x != 7_777, "7777 is not welcome");
    x + 1
}

#[offload(workers = "2", timeout = "60s")]
fn scale(bytes: Vec<u8>, by: u8) -> Vec<u8> {
    bytes.into_iter().map(|b| b.wrapping_mul(by)).collect()
}

/// Aborts its worker on input 13; reports its pid otherwise.
#[offload(workers = "2", timeout = "60s")]
fn fragile(x: u64) -> (u64, u32) {
    if x == 13 {
        std::process::abort();
    }
    (x, std::process::id())
}

/// Aborts its worker on input 13 the first time only (a marker file at `marker` remembers),
/// and may run again after a crash.
#[offload(workers = "2", timeout = "60s", retries = 1)]
fn fragile_once(marker: String, x: u64) -> u64 {
    if x == 13 && std::fs::OpenOptions::new().write(true).create_new(true).open(&marker).is_ok() {
        std::process::abort();
    }
    x
}

/// Hangs on input 5 past the timeout.
#[offload(workers = "2", timeout = "2s")]
fn hangs_on_five(x: u64) -> u64 {
    if x == 5 {
        std::thread::sleep(Duration::from_secs(600));
    }
    x
}

/// Hangs on input 5 past the timeout; a pool of its own, for the test of the caller's timeout.
#[offload(workers = "2", timeout = "2s")]
fn stalls_on_five(x: u64) -> u64 {
    if x == 5 {
        std::thread::sleep(Duration::from_secs(600));
    }
    x
}

/// Appends `x` to the file at `path`, then takes 1 ms, or hangs if told to.
#[offload(workers = "2", timeout = "60s")]
fn logged(path: String, x: u64, hang: bool) -> u64 {
    let mut file = std::fs::OpenOptions::new().append(true).create(true).open(path).unwrap();
    writeln!(file, "{x}").unwrap();
    std::thread::sleep(if hang { Duration::from_secs(600) } else { Duration::from_millis(1) });
    x
}

/// Bounds each test's running time.
async fn within<F: std::future::Future>(limit: Duration, future: F) -> F::Output {
    tokio::time::timeout(limit, future).await.expect("the test ran past its limit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_come_in_input_order() {
    within(Duration::from_secs(60), async {
        let mut squares = offload::map(square, 0..20_000u64);
        let mut expected = 0u64;
        while let Some(result) = squares.next().await {
            assert_eq!(result.unwrap(), expected * expected);
            expected += 1;
        }
        assert_eq!(expected, 20_000);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_fails_only_its_input() {
    within(Duration::from_secs(60), async {
        let mut results = offload::map(picky, 0..10_000u64);
        let (mut index, mut errors) = (0u64, Vec::new());
        while let Some(result) = results.next().await {
            match result {
                Ok(value) => assert_eq!(value, index + 1),
                Err(error) => errors.push((index, error)),
            }
            index += 1;
        }
        assert_eq!(index, 10_000);
        assert_eq!(errors.len(), 1, "{errors:?}");
        let (at, error) = &errors[0];
        assert_eq!(*at, 7_777);
        match error {
            Error::Panicked { message, location, .. } => {
                assert!(message.contains("7777 is not welcome"), "{message}");
                assert!(location.as_deref().is_some_and(|l| l.contains("map.rs")), "{location:?}");
            }
            other => panic!("expected a panic, got {other}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_gives_each_index_once() {
    within(Duration::from_secs(60), async {
        let mut results = offload::map(square, 0..5_000u64).unordered();
        let mut seen = vec![false; 5_000];
        while let Some((index, result)) = results.next().await {
            assert!(!seen[index], "index {index} twice");
            seen[index] = true;
            assert_eq!(result.unwrap(), (index * index) as u64);
        }
        assert!(seen.iter().all(|&s| s));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closures_bytes_and_fixed_batches() {
    within(Duration::from_secs(60), async {
        // Several arguments through a closure; byte vectors short and long (those go in bulk
        // frames in a plain call, inline in a batch).
        let inputs: Vec<(Vec<u8>, u8)> = (0..40u8).map(|i| (vec![i; usize::from(i) * 4096], 3)).collect();
        let mut results = offload::map(|(bytes, by)| scale(bytes, by), inputs).batch_size(7);
        let mut i = 0u8;
        while let Some(result) = results.next().await {
            assert_eq!(result.unwrap(), vec![i.wrapping_mul(3); usize::from(i) * 4096]);
            i += 1;
        }
        assert_eq!(i, 40);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_from_a_stream() {
    within(Duration::from_secs(60), async {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let feeder = tokio::spawn(async move {
            for i in 0..300u64 {
                tx.send(i).await.unwrap();
                if i % 50 == 0 {
                    // The stream pauses: the map sends what it has.
                    tokio::task::yield_now().await;
                }
            }
        });
        let mut results = offload::map_stream(square, Receiver(rx));
        let mut n = 0u64;
        while let Some(result) = results.next().await {
            assert_eq!(result.unwrap(), n * n);
            n += 1;
        }
        assert_eq!(n, 300);
        feeder.await.unwrap();
    })
    .await;
}

/// A Tokio receiver as a stream.
struct Receiver<T>(tokio::sync::mpsc::Receiver<T>);

impl<T> futures_core::Stream for Receiver<T> {
    type Item = T;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_that_is_not_offloaded_fails_each_input() {
    within(Duration::from_secs(10), async {
        let mut results = offload::map(|x: u64| async move { Ok::<u64, Error>(x) }, 0..3u64);
        let mut n = 0;
        while let Some(result) = results.next().await {
            let error = result.unwrap_err();
            assert!(matches!(error, Error::Config { .. }), "{error}");
            assert!(error.to_string().contains("made no `#[offload]` call"), "{error}");
            n += 1;
        }
        assert_eq!(n, 3);
        // Endless inputs that all fail still come out one batch at a time. On a thread of its
        // own, so that a map that never yields fails the test instead of hanging it.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let mut endless = offload::map(|x: u64| async move { Ok::<u64, Error>(x) }, 0..);
                for _ in 0..100 {
                    assert!(endless.next().await.unwrap().is_err());
                }
            });
            done.send(()).unwrap();
        });
        finished.recv_timeout(Duration::from_secs(5)).expect("the map read endless inputs without yielding");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_fails_only_its_batch_and_the_pool_recovers() {
    within(Duration::from_secs(60), async {
        let mut results = offload::map(fragile, 0..100u64).batch_size(10);
        let mut outcomes = Vec::new();
        while let Some(result) = results.next().await {
            outcomes.push(result);
        }
        assert_eq!(outcomes.len(), 100);
        for (i, outcome) in outcomes.iter().enumerate() {
            match outcome {
                // Inputs 10 to 19 were in the batch with 13.
                Err(Error::Crashed { .. }) if (10..20).contains(&i) => {}
                Ok((x, _)) if !(10..20).contains(&i) => assert_eq!(*x, i as u64),
                other => panic!("input {i}: {other:?}"),
            }
        }
        // The pool has both its workers again.
        let mut after = offload::map(fragile, 20..60u64).batch_size(1);
        while let Some(result) = after.next().await {
            result.unwrap();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_input_times_out_its_batch_only() {
    within(Duration::from_secs(60), async {
        let started = std::time::Instant::now();
        let mut results = offload::map(hangs_on_five, 0..40u64).batch_size(4);
        let mut i = 0u64;
        while let Some(result) = results.next().await {
            match result {
                // Inputs 4 to 7 were in the batch with 5.
                Err(Error::Timeout { pid: Some(_), .. }) if (4..8).contains(&i) => {}
                Ok(x) if !(4..8).contains(&i) => assert_eq!(x, i),
                other => panic!("input {i}: {other:?}"),
            }
            i += 1;
        }
        assert_eq!(i, 40);
        // The 2 s timeout, and a margin for a loaded machine.
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_map_stops_the_work() {
    within(Duration::from_secs(60), async {
        let dir = std::env::temp_dir().join(format!("offload-map-drop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let path_str = path.to_str().unwrap().to_owned();
        let lines = || std::fs::read_to_string(&path).map_or(0, |text| text.lines().count());

        // Inputs from 80 on hang: only a kill ends their batches.
        let inputs = (0..10_000u64).map({
            let path = path_str.clone();
            move |x| (path.clone(), x, x >= 80)
        });
        let mut results = offload::map(|(path, x, hang)| logged(path, x, hang), inputs).batch_size(40);
        for expected in 0..80u64 {
            assert_eq!(results.next().await.unwrap().unwrap(), expected);
        }
        // The first two batches are done; the next two hang on their first inputs, and two
        // more wait in the pool's queue.
        drop(results);

        // The hanging batches' workers are killed: the pool has no busy worker again, and
        // nothing of the map's runs.
        let idle = support::eventually_async(Duration::from_secs(20), || {
            offload::stats().iter().any(|pool| pool.name == "map::logged" && pool.busy == 0)
        })
        .await;
        assert!(idle, "{:?}", offload::stats());
        let after_drop = lines();
        // The first input of each of the two running batches, at most.
        assert!((80..=82).contains(&after_drop), "{after_drop} inputs ran");
        // One more call runs, and nothing of the map's: exactly one more line.
        assert_eq!(logged(path_str.clone(), 99_999, false).await.unwrap(), 99_999);
        assert_eq!(lines(), after_drop + 1);
        std::fs::remove_dir_all(&dir).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_timeout_applies_to_each_batch() {
    within(Duration::from_secs(60), async {
        let started = std::time::Instant::now();
        let results = offload::with_timeout(Duration::from_millis(300), async {
            let mut results = offload::map(stalls_on_five, 0..12u64).batch_size(4);
            let mut all = Vec::new();
            while let Some(result) = results.next().await {
                all.push(result);
            }
            all
        })
        .await;
        for (i, result) in results.iter().enumerate() {
            match result {
                Err(Error::Timeout { by: offload::Deadline::Call, timeout, .. }) if (4..8).contains(&i) => {
                    assert_eq!(*timeout, Duration::from_millis(300));
                }
                Ok(x) if !(4..8).contains(&i) => assert_eq!(*x, i as u64),
                other => panic!("input {i}: {other:?}"),
            }
        }
        // Well before the function's own 2 s.
        assert!(started.elapsed() < Duration::from_millis(1_800), "{:?}", started.elapsed());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_does_not_overload_a_bounded_pool() {
    within(Duration::from_secs(60), async {
        let mut results = offload::map(no_queue, 0..200u64).batch_size(10);
        let mut n = 0;
        while let Some(result) = results.next().await {
            assert_eq!(result.unwrap(), n * 2);
            n += 1;
        }
        assert_eq!(n, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_after_the_first_result_loses_none() {
    within(Duration::from_secs(60), async {
        let mut results = offload::map(square, 0..3_000u64).batch_size(10);
        assert_eq!(results.next().await.unwrap().unwrap(), 0);
        let mut rest = results.unordered();
        let mut seen = vec![false; 3_000];
        seen[0] = true;
        while let Some((index, result)) = rest.next().await {
            assert!(!seen[index], "index {index} twice");
            seen[index] = true;
            assert_eq!(result.unwrap(), (index * index) as u64);
        }
        assert!(seen.iter().all(|&s| s), "some inputs had no result");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_retries_a_crashed_batch_runs_again() {
    within(Duration::from_secs(60), async {
        let marker = std::env::temp_dir().join(format!("offload-map-retry-{}", std::process::id()));
        let marker = marker.to_str().unwrap().to_owned();
        let _ = std::fs::remove_file(&marker);
        let inputs = (0..30u64).map({
            let marker = marker.clone();
            move |x| (marker.clone(), x)
        });
        let mut results = offload::map(|(m, x)| fragile_once(m, x), inputs).batch_size(10);
        let mut n = 0;
        while let Some(result) = results.next().await {
            // The batch of 10 to 19 crashed once and ran again, whole.
            assert_eq!(result.unwrap(), n);
            n += 1;
        }
        assert_eq!(n, 30);
        // The crash did happen.
        assert!(std::fs::remove_file(&marker).is_ok(), "input 13 never crashed its worker");
    })
    .await;
}
