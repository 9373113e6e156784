//! Small calls sent ahead to a busy worker, behind the call it runs, when no worker is free:
//! nothing a caller sees changes. A call sent ahead whose worker is killed for the call before
//! it (a timeout, a crash) runs on another worker, once; one whose own deadline passes, or
//! whose future is dropped, never runs, and its worker lives on; one behind a long call moves
//! to a worker that becomes free; `max_tasks` still counts every call.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use offload::{Error, ExitReason, RestartCause, offload};

/// Says it started (a file named after its process), then sleeps `ms`.
fn hold_for(dir: &str, ms: u64) -> u32 {
    let pid = std::process::id();
    std::fs::write(Path::new(dir).join(format!("started-{pid}")), b"").unwrap();
    std::thread::sleep(Duration::from_millis(ms));
    pid
}

/// Runs once per `x`: a second run of the same call would panic on the file it left.
fn once(dir: &str, x: u64) -> u32 {
    std::fs::File::create_new(Path::new(dir).join(format!("ran-{x}"))).expect("each call runs once");
    std::process::id()
}

#[offload(pool = "ahead_timeout", workers = "1", timeout = "400ms")]
fn hold_past_deadline(dir: String) -> u32 {
    hold_for(&dir, 30_000)
}

#[offload(pool = "ahead_timeout", timeout = "20s")]
fn once_after_timeout(dir: String, x: u64) -> u32 {
    once(&dir, x)
}

#[offload(pool = "ahead_crash", workers = "1", timeout = "20s")]
fn hold_until_killed(dir: String) -> u32 {
    hold_for(&dir, 30_000)
}

#[offload(pool = "ahead_crash", timeout = "20s")]
fn once_after_crash(dir: String, x: u64) -> u32 {
    once(&dir, x)
}

#[offload(pool = "ahead_gives_up", workers = "1", timeout = "20s")]
fn hold_briefly(dir: String, ms: u64) -> u32 {
    hold_for(&dir, ms)
}

#[offload(pool = "ahead_gives_up", timeout = "150ms")]
fn once_in_a_hurry(dir: String, x: u64) -> u32 {
    once(&dir, x)
}

#[offload(pool = "ahead_gives_up", timeout = "20s")]
fn once_patiently(dir: String, x: u64) -> u32 {
    once(&dir, x)
}

#[offload(pool = "ahead_moves", workers = "2", timeout = "20s")]
fn hold_a_while(dir: String, ms: u64) -> u32 {
    hold_for(&dir, ms)
}

#[offload(pool = "ahead_moves", timeout = "20s")]
fn once_wherever(dir: String, x: u64) -> u32 {
    once(&dir, x)
}

#[offload(pool = "ahead_freed", workers = "2", timeout = "20s")]
fn hold_long(dir: String, ms: u64) -> u32 {
    hold_for(&dir, ms)
}

#[offload(pool = "ahead_freed", timeout = "300ms")]
fn hold_past_short_deadline(dir: String) -> u32 {
    hold_for(&dir, 30_000)
}

#[offload(pool = "ahead_freed", timeout = "20s")]
fn once_when_freed(dir: String, x: u64) -> u32 {
    once(&dir, x)
}

#[offload(pool = "ahead_unstuck", workers = "2", timeout = "20s")]
fn hold_unstuck(dir: String, ms: u64) -> u32 {
    hold_for(&dir, ms)
}

#[offload(pool = "ahead_unstuck", timeout = "20s")]
fn quick(x: u64) -> u64 {
    x
}

#[offload(pool = "ahead_unstuck_busy", workers = "2", timeout = "20s")]
fn hold_unstuck_busy(dir: String, ms: u64) -> u32 {
    hold_for(&dir, ms)
}

#[offload(pool = "ahead_unstuck_busy", timeout = "20s")]
fn quick_busy(x: u64) -> u64 {
    x
}

#[offload(pool = "ahead_or_not", workers = "1", timeout = "20s")]
fn tick(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// Too large to go ahead.
#[offload(pool = "ahead_or_not", timeout = "20s")]
fn large(text: String) -> usize {
    text.len()
}

#[offload(pool = "ahead_undecided", workers = "1", timeout = "20s")]
fn hold_undecided(dir: String, ms: u64) -> u32 {
    hold_for(&dir, ms)
}

#[offload(pool = "ahead_undecided", timeout = "300ms")]
fn once_undecided_in_a_hurry(dir: String, x: u64) -> u32 {
    once(&dir, x)
}

#[offload(pool = "ahead_in_line", workers = "1", timeout = "300ms")]
fn hold_in_line(dir: String) -> u32 {
    hold_for(&dir, 30_000)
}

/// Notes `x` at the end of the line of calls that ran.
#[offload(pool = "ahead_in_line", timeout = "20s")]
fn note_turn(dir: String, x: u64) -> u64 {
    use std::io::Write;
    let mut order =
        std::fs::OpenOptions::new().create(true).append(true).open(Path::new(&dir).join("order")).unwrap();
    writeln!(order, "{x}").unwrap();
    x
}

#[offload(workers = "1", max_tasks = 3, timeout = "20s")]
fn counted(ms: u64) -> u32 {
    std::thread::sleep(Duration::from_millis(ms));
    std::process::id()
}

#[offload(pool = "ahead_goes_on", workers = "1", timeout = "20s")]
fn hold_then_answer(dir: String, ms: u64) -> u32 {
    hold_for(&dir, ms)
}

#[offload(pool = "ahead_goes_on", timeout = "20s")]
fn once_behind(dir: String, x: u64) -> u64 {
    once(&dir, x);
    x * 10
}

#[offload(pool = "ahead_garbage", workers = "1", timeout = "20s")]
fn garbage_then_answer(dir: String) -> u32 {
    let pid = hold_for(&dir, 0);
    // Once the test has sent a call ahead behind this one.
    while !Path::new(&dir).join("go").exists() {
        std::thread::sleep(Duration::from_millis(2));
    }
    offload::__private_v1::write_garbage_to_channel(&[0xff, 0xff, 0xff, 0x7f, 0x63]);
    pid
}

#[offload(pool = "ahead_garbage", timeout = "20s")]
fn once_after_garbage(dir: String, x: u64) -> u32 {
    once(&dir, x)
}

/// Says it started, then holds its worker until the test says "go".
fn hold_until_go(dir: &str) -> u32 {
    let pid = hold_for(dir, 0);
    while !Path::new(dir).join("go").exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    pid
}

#[offload(pool = "ahead_ring", workers = "1", timeout = "60s")]
fn hold_ring(dir: String) -> u32 {
    hold_until_go(&dir)
}

#[offload(pool = "ahead_ring", timeout = "30s")]
fn patient_in_ring(x: u64) -> u64 {
    x + 1000
}

#[offload(pool = "ahead_ring", timeout = "40ms")]
fn hurried_in_ring(x: u64) -> u64 {
    x
}

#[offload(pool = "ahead_full", workers = "1", timeout = "60s")]
fn hold_full(dir: String) -> u32 {
    hold_until_go(&dir)
}

/// [`once`], for a call near the largest that goes ahead (`padding` of 15 KB): a few of
/// them fill the worker's socket.
fn bulky(dir: &str, x: u64, padding: String) -> u32 {
    drop(padding);
    once(dir, x)
}

#[offload(pool = "ahead_full", timeout = "40ms")]
fn bulky_in_a_hurry(dir: String, x: u64, padding: String) -> u32 {
    bulky(&dir, x, padding)
}

#[offload(pool = "ahead_full", timeout = "30s")]
fn bulky_patiently(dir: String, x: u64, padding: String) -> u32 {
    bulky(&dir, x, padding)
}

#[offload(pool = "ahead_chunks", workers = "1", timeout = "60s")]
fn hold_chunks(dir: String) -> u32 {
    hold_until_go(&dir)
}

#[offload(pool = "ahead_chunks", timeout = "40ms")]
fn bulky_quickly(dir: String, x: u64, padding: String) -> u32 {
    bulky(&dir, x, padding)
}

#[offload(pool = "ahead_chunks", timeout = "30s")]
fn bulky_later(dir: String, x: u64, padding: String) -> u32 {
    bulky(&dir, x, padding)
}

#[offload(pool = "ahead_rss", workers = "1", max_rss = "40MiB", timeout = "60s")]
fn leaky(mib: usize) -> u32 {
    let block: &'static mut [u8] = Vec::leak(vec![1u8; mib << 20]);
    std::hint::black_box(block);
    std::thread::sleep(Duration::from_millis(2));
    std::process::id()
}

#[offload(pool = "ahead_line", workers = "1", timeout = "400ms")]
fn hold_in_front(dir: String) -> u32 {
    hold_for(&dir, 30_000)
}

#[offload(pool = "ahead_line", timeout = "10s")]
fn wait_in_line(x: u64) -> u64 {
    x
}

#[offload(pool = "ahead_late", workers = "1", timeout = "20s")]
fn hold_then_end(dir: String, ms: u64) -> u32 {
    hold_for(&dir, ms)
}

#[offload(pool = "ahead_late", timeout = "100ms")]
fn late_behind(dir: String, x: u64) -> u32 {
    once(&dir, x)
}

#[offload(pool = "ahead_late_rss", workers = "1", max_rss = "24MiB", timeout = "20s")]
fn bloat_then_end(dir: String, ms: u64) -> u32 {
    let block: &'static mut [u8] = Vec::leak(vec![1u8; 48 << 20]);
    std::hint::black_box(block);
    hold_for(&dir, ms)
}

#[offload(pool = "ahead_late_rss", timeout = "100ms")]
fn late_then(dir: String, x: u64) -> u32 {
    once(&dir, x);
    1
}

#[offload(pool = "ahead_late_rss", timeout = "20s")]
fn patient_then(dir: String, x: u64) -> u32 {
    once(&dir, x);
    2
}

#[offload(pool = "ahead_dropped", workers = "1", timeout = "20s")]
fn hold_until_dropped(dir: String) -> u32 {
    hold_for(&dir, 30_000)
}

#[offload(pool = "ahead_dropped", timeout = "20s")]
fn once_after_drop(dir: String, x: u64) -> u32 {
    once(&dir, x)
}

/// Holds its worker until "go", then reports progress (a frame besides its reply: the worker
/// then waits for the reply to be accepted before it claims the call behind) and answers.
#[offload(pool = "ahead_handed", workers = "1", timeout = "20s")]
fn report_then_answer(dir: String) -> u32 {
    let pid = hold_until_go(&dir);
    offload::progress(1, 1);
    std::fs::write(Path::new(&dir).join("answering"), b"").unwrap();
    pid
}

#[offload(pool = "ahead_handed", timeout = "20s")]
fn once_handed(dir: String, x: u64) -> u32 {
    once(&dir, x)
}

/// A fresh directory for one test's files, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("offload-pipeline-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn path(&self) -> String {
        self.0.to_str().unwrap().to_owned()
    }

    /// Waits until a worker says it started a holding call; returns its pid.
    async fn started(&self) -> u32 {
        let mut found = None;
        let seen = support::eventually_async(Duration::from_secs(10), || {
            found = std::fs::read_dir(&self.0)
                .unwrap()
                .flatten()
                .find_map(|e| e.file_name().to_str()?.strip_prefix("started-")?.parse::<u32>().ok());
            found.is_some()
        })
        .await;
        assert!(seen, "the holding call never started");
        let pid = found.unwrap();
        std::fs::remove_file(self.0.join(format!("started-{pid}"))).unwrap();
        pid
    }

    fn ran(&self, x: u64) -> bool {
        self.0.join(format!("ran-{x}")).exists()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn stats(pool: &str) -> offload::PoolStats {
    offload::stats().into_iter().find(|s| s.name == pool).expect("pool listed")
}

/// Waits until `pool` has sent `n` calls ahead.
async fn sent_ahead(pool: &str, n: u64) {
    let sent = support::eventually_async(Duration::from_secs(10), || stats(pool).sent_ahead >= n).await;
    assert!(sent, "{pool} sent {} calls ahead, not {n}", stats(pool).sent_ahead);
}

#[tokio::test]
async fn a_call_behind_one_that_times_out_runs_once_on_the_next_worker() {
    let dir = Dir::new("timeout");
    let hold = tokio::spawn(hold_past_deadline(dir.path()));
    let first = dir.started().await;
    let call = tokio::spawn(once_after_timeout(dir.path(), 1));
    sent_ahead("ahead_timeout", 1).await;

    let held = hold.await.unwrap();
    assert!(matches!(held, Err(Error::Timeout { pid: Some(pid), .. }) if pid == first), "{held:?}");
    let ran_on = call.await.unwrap().expect("withdrawn when its worker was killed, then run elsewhere");
    assert_ne!(ran_on, first, "it ran on the worker killed for the call before it");
    let stats = stats("ahead_timeout");
    assert_eq!(stats.withdrawn, 1);
    assert_eq!(stats.restarts(RestartCause::Timeout), 1);
    assert_eq!(stats.failed_total(), 1, "only the call that timed out failed");
}

#[tokio::test]
async fn a_call_behind_one_whose_worker_is_killed_runs_once_on_the_next_worker() {
    let dir = Dir::new("crash");
    let hold = tokio::spawn(hold_until_killed(dir.path()));
    let first = dir.started().await;
    let call = tokio::spawn(once_after_crash(dir.path(), 1));
    sent_ahead("ahead_crash", 1).await;

    support::kill9(first);
    let held = hold.await.unwrap();
    assert!(matches!(held, Err(Error::Crashed { exit: ExitReason::Signal(9), .. })), "{held:?}");
    let ran_on = call.await.unwrap().expect("withdrawn when its worker died, then run elsewhere");
    assert_ne!(ran_on, first);
    assert_eq!(stats("ahead_crash").withdrawn, 1);
}

#[tokio::test]
async fn a_call_sent_ahead_that_times_out_or_is_dropped_never_runs() {
    let dir = Dir::new("gives-up");

    // Its own deadline passes while the call before it runs.
    let hold = tokio::spawn(hold_briefly(dir.path(), 800));
    let first = dir.started().await;
    let started = Instant::now();
    let timed_out = once_in_a_hurry(dir.path(), 1).await;
    assert!(matches!(timed_out, Err(Error::Timeout { pid: None, .. })), "{timed_out:?}");
    assert!(started.elapsed() < Duration::from_millis(700), "it waited for the call before");
    assert_eq!(hold.await.unwrap().unwrap(), first);

    // Its future is dropped while the call before it runs.
    let hold = tokio::spawn(hold_briefly(dir.path(), 800));
    assert_eq!(dir.started().await, first, "the same worker serves on");
    let call = tokio::spawn(once_patiently(dir.path(), 2));
    sent_ahead("ahead_gives_up", 2).await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    assert_eq!(hold.await.unwrap().unwrap(), first);

    // Neither ran, and the worker was not touched.
    assert_eq!(once_patiently(dir.path(), 3).await.unwrap(), first);
    assert!(!dir.ran(1) && !dir.ran(2), "a call given up on ran");
    let stats = stats("ahead_gives_up");
    assert_eq!(stats.withdrawn, 2);
    assert_eq!(stats.restarts_total(), 0);
    assert_eq!(stats.cancelled, 1);
}

#[tokio::test]
async fn a_call_behind_a_long_one_moves_to_a_worker_that_becomes_free() {
    let dir = Dir::new("moves");
    let long = tokio::spawn(hold_a_while(dir.path(), 2_000));
    let long_pid = dir.started().await;
    let short = tokio::spawn(hold_a_while(dir.path(), 300));
    let short_pid = dir.started().await;
    // Until both calls have run long enough to count as long (10 ms): calls go ahead behind
    // a younger call first, and this one is to go behind the first (the long one).
    tokio::time::sleep(Duration::from_millis(30)).await;
    // Both workers are busy: the call goes ahead, behind the first (the long one).
    let call = tokio::spawn(once_wherever(dir.path(), 1));
    sent_ahead("ahead_moves", 1).await;

    let ran_on = call.await.unwrap().unwrap();
    assert_eq!(ran_on, short_pid, "it should move to the worker the short call left");
    assert!(!long.is_finished(), "it waited for the long call");
    assert_eq!(short.await.unwrap().unwrap(), short_pid);
    assert_eq!(long.await.unwrap().unwrap(), long_pid);
    assert_eq!(stats("ahead_moves").withdrawn, 1);
}

#[tokio::test]
async fn max_tasks_counts_calls_sent_ahead() {
    let calls: Vec<_> = (0..12).map(|_| tokio::spawn(counted(20))).collect();
    let mut per_pid: HashMap<u32, u32> = HashMap::new();
    for call in calls {
        *per_pid.entry(call.await.unwrap().expect("recycling never fails a call")).or_default() += 1;
    }
    assert!(per_pid.values().all(|&n| n <= 3), "a worker ran more than max_tasks calls: {per_pid:?}");
    assert_eq!(per_pid.values().sum::<u32>(), 12);
    let stats = stats("pipeline::counted");
    assert!(stats.sent_ahead >= 1, "no call went ahead, so this proves nothing");
}

/// A worker freed by a timeout (killed and replaced, not put back) takes a call sent ahead
/// behind a long call elsewhere.
#[tokio::test]
async fn a_call_behind_a_long_one_moves_when_a_timeout_frees_a_worker() {
    let dir = Dir::new("freed");
    let long = tokio::spawn(hold_long(dir.path(), 3_000));
    dir.started().await;
    let doomed = tokio::spawn(hold_past_short_deadline(dir.path()));
    dir.started().await;
    let call = tokio::spawn(once_when_freed(dir.path(), 1));
    sent_ahead("ahead_freed", 1).await;

    assert!(matches!(doomed.await.unwrap(), Err(Error::Timeout { .. })));
    call.await.unwrap().expect("it runs on the worker that replaced the one killed");
    assert!(!long.is_finished(), "it waited for the long call");
    assert_eq!(stats("ahead_freed").withdrawn, 1);
    long.await.unwrap().unwrap();
}

/// Calls that went ahead behind a call before it turned out long move off it while the other
/// worker serves short calls: none waits for the long call to end. The README promises they
/// wait about 100 ms for it; a call left behind it would wait its 4 s. Here one task keeps
/// the other worker busy, which is idle for a moment between its calls: the calls move as
/// it comes free.
#[tokio::test]
async fn calls_behind_a_call_that_turns_out_long_move_to_a_worker_that_comes_free() {
    let dir = Dir::new("unstuck");
    assert_eq!(quick(0).await.unwrap(), 0, "the pool starts");
    not_stuck_behind_long_call("ahead_unstuck", 0, || hold_unstuck(dir.path(), LONG_MS), quick, &dir).await;
}

/// The same, with more tasks calling once the long call counts as long: the other worker
/// has calls sent ahead nearly all the time, so it seldom comes free, and the calls move as
/// others look for a place ahead (this passes with the move on a worker coming free left
/// out).
#[tokio::test]
async fn calls_behind_a_call_that_turns_out_long_move_while_the_other_worker_takes_calls_ahead() {
    let dir = Dir::new("unstuck-busy");
    assert_eq!(quick_busy(0).await.unwrap(), 0, "the pool starts");
    not_stuck_behind_long_call(
        "ahead_unstuck_busy",
        6,
        || hold_unstuck_busy(dir.path(), LONG_MS),
        quick_busy,
        &dir,
    )
    .await;
}

const LONG_MS: u64 = 4_000;

/// Short calls from 8 tasks, and `late` more once the long call has run 20 ms; then the long
/// call, which calls go behind while it waits for its turn and for its first 10 ms. No short
/// call may take as long as it. If no call went behind it, nothing moved and the run proves
/// nothing: then it runs again.
async fn not_stuck_behind_long_call<L, LF, Q, QF>(pool: &str, late: u64, long: L, quick: Q, dir: &Dir)
where
    L: Fn() -> LF,
    LF: std::future::Future<Output = Result<u32, Error>> + Send + 'static,
    Q: Fn(u64) -> QF + Copy + Send + 'static,
    QF: std::future::Future<Output = Result<u64, Error>> + Send,
{
    for attempt in 1.. {
        let withdrawn = stats(pool).withdrawn;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flood = |tasks: std::ops::Range<u64>| -> Vec<_> {
            tasks
                .map(|task| {
                    let done = std::sync::Arc::clone(&done);
                    tokio::spawn(async move {
                        let (mut slowest, mut calls) = (Duration::ZERO, 0u64);
                        while !done.load(std::sync::atomic::Ordering::Relaxed) {
                            let (x, started) = (task * 1_000_000 + calls, Instant::now());
                            assert_eq!(quick(x).await.unwrap(), x);
                            slowest = slowest.max(started.elapsed());
                            calls += 1;
                        }
                        (slowest, calls)
                    })
                })
                .collect()
        };
        let mut tasks = flood(0..8);
        sent_ahead(pool, 1).await;
        let long = tokio::spawn(long());
        dir.started().await;
        if late > 0 {
            // Past 10 ms, the long call counts as long: calls go ahead to the other worker.
            tokio::time::sleep(Duration::from_millis(20)).await;
            tasks.extend(flood(8..8 + late));
        }
        assert!(long.await.unwrap().unwrap() > 0);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut slowest = Duration::ZERO;
        for task in tasks {
            let (task_slowest, calls) = task.await.unwrap();
            assert!(calls > 0, "a task made no call while the long one ran");
            slowest = slowest.max(task_slowest);
        }
        assert!(
            slowest < Duration::from_secs(1),
            "a short call took {slowest:?}: it waited for the call of {LONG_MS} ms in front of it"
        );
        if stats(pool).withdrawn > withdrawn {
            return;
        }
        assert!(attempt < 5, "no call went behind the long one in {attempt} runs, so this proves nothing");
    }
}

/// Small calls that keep going ahead do not keep a large call, which cannot, from a worker.
#[tokio::test]
async fn calls_going_ahead_do_not_starve_one_that_cannot() {
    let until = Instant::now() + Duration::from_millis(1_500);
    let tickers: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(async move {
                while Instant::now() < until {
                    tick(20).await.unwrap();
                }
            })
        })
        .collect();
    let going_ahead = support::eventually_async(Duration::from_secs(10), || {
        offload::stats().iter().any(|s| s.name == "ahead_or_not" && s.sent_ahead >= 5)
    })
    .await;
    assert!(going_ahead, "the small calls never went ahead, so this proves nothing");
    let started = Instant::now();
    assert_eq!(large("x".repeat(20_000)).await.unwrap(), 20_000);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the large call waited {:?} while small calls went ahead of it",
        started.elapsed()
    );
    for ticker in tickers {
        ticker.await.unwrap();
    }
}

/// A call whose future is dropped while it runs: its worker is killed, and the call sent
/// ahead behind it, which had not started, runs once on the worker that replaces it.
#[tokio::test]
async fn a_call_behind_one_that_is_dropped_runs_once_on_the_next_worker() {
    let dir = Dir::new("dropped");
    let hold = tokio::spawn(hold_until_dropped(dir.path()));
    let first = dir.started().await;
    let call = tokio::spawn(once_after_drop(dir.path(), 1));
    sent_ahead("ahead_dropped", 1).await;

    hold.abort();
    assert!(hold.await.unwrap_err().is_cancelled());
    let ran_on = call.await.unwrap().expect("withdrawn when its worker was killed, then run elsewhere");
    assert_ne!(ran_on, first, "it ran on the worker killed for the call before it");
    let stats = stats("ahead_dropped");
    assert_eq!((stats.withdrawn, stats.cancelled), (1, 1));
    assert_eq!(stats.restarts(RestartCause::Abandoned), 1);
    assert_eq!(stats.failed_total(), 0);
}

/// A call dropped after its worker answered it and went on to the call sent ahead behind
/// it: that call was over, so its worker is not killed; its reply is set aside, and the call
/// behind gets its own reply, once.
#[tokio::test]
async fn a_call_dropped_after_its_worker_went_on_leaves_the_worker_to_the_call_behind() {
    let dir = Dir::new("goes-on");
    let first = tokio::spawn(hold_then_answer(dir.path(), 100));
    let pid = dir.started().await;
    let behind = tokio::spawn(once_behind(dir.path(), 2));
    sent_ahead("ahead_goes_on", 1).await;
    // Hold this runtime's only thread until the worker has answered the first call and
    // started the one behind: the first call's reply is then on the channel, unread, when
    // the call is dropped.
    let until = Instant::now() + Duration::from_secs(10);
    while !dir.ran(2) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(dir.ran(2), "the call behind never started");
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());

    assert_eq!(behind.await.unwrap().unwrap(), 20, "the call behind got the wrong reply");
    assert_eq!(hold_then_answer(dir.path(), 0).await.unwrap(), pid, "the same worker serves on");
    let stats = stats("ahead_goes_on");
    assert_eq!((stats.restarts_total(), stats.withdrawn, stats.cancelled), (0, 0, 1));
}

/// A worker whose call wrote more than its reply on the channel (here, bytes that are no
/// frame) waits for the caller to accept that reply before it starts the call sent ahead
/// behind it: the caller finds the garbage and kills the worker, and the call behind, which
/// never started, runs once on the worker that replaces it.
#[tokio::test]
async fn a_call_behind_one_that_writes_garbage_waits_and_runs_elsewhere() {
    let dir = Dir::new("garbage");
    // Start the worker first, so that the call behind can go ahead to it.
    let first = tokio::spawn(garbage_then_answer(dir.path()));
    let pid = dir.started().await;
    let behind = tokio::spawn(once_after_garbage(dir.path(), 1));
    sent_ahead("ahead_garbage", 1).await;
    std::fs::write(dir.0.join("go"), b"").unwrap();
    // Hold this runtime's only thread, so that nothing is read from the channel, for long
    // enough that a worker that did not wait would have started the call behind.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!dir.ran(1), "the call behind started before the reply before it was accepted");

    assert!(matches!(first.await.unwrap(), Err(Error::Protocol { .. })));
    let ran_on = behind.await.unwrap().expect("it never started, so it runs elsewhere");
    assert_ne!(ran_on, pid, "it ran on the worker killed for the garbage");
    assert_eq!(stats("ahead_garbage").restarts(RestartCause::Protocol), 1);
}

/// Calls sent ahead and taken back, hundreds of them, behind one long call: the gate's ring
/// of slots is never filled past the call whose reply comes next, so every caller still
/// gets its own call's reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_taken_back_by_the_hundred_never_get_a_reply_crossed() {
    let dir = Dir::new("ring");
    let hold = tokio::spawn(hold_ring(dir.path()));
    dir.started().await;
    let first = tokio::spawn(patient_in_ring(1));
    sent_ahead("ahead_ring", 1).await;
    // Calls that go ahead behind it and time out there, withdrawn, six at a time (few enough
    // that the worker always takes more ahead), until enough have been written to the
    // worker to go round the gate's ring. (Those that time out while they wait in the caller
    // to be written are never numbered.)
    let mut hurried = tokio::task::JoinSet::new();
    let mut x = 0;
    while stats("ahead_ring").sent_ahead < 250 {
        assert!(
            x < 3000,
            "only {} calls went ahead, too few to go round the gate's ring",
            stats("ahead_ring").sent_ahead
        );
        while hurried.len() < 6 {
            hurried.spawn(hurried_in_ring(x));
            x += 1;
        }
        let done = hurried.join_next().await.expect("six in flight").unwrap();
        assert!(matches!(done, Err(Error::Timeout { .. })), "{done:?}");
    }
    while let Some(done) = hurried.join_next().await {
        assert!(matches!(done.unwrap(), Err(Error::Timeout { .. })));
    }
    let second = tokio::spawn(patient_in_ring(2));
    std::fs::write(dir.0.join("go"), b"").unwrap();
    hold.await.unwrap().unwrap();
    assert_eq!(first.await.unwrap().unwrap(), 1001, "the first call got another's reply");
    assert_eq!(second.await.unwrap().unwrap(), 1002);
}

/// A worker over `max_rss` is recycled after its call even while calls keep going ahead to
/// it: it finishes only those it has started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rss_recycles_a_worker_that_calls_go_ahead_to() {
    leaky(0).await.unwrap();
    let calls: Vec<_> = (0..40).map(|_| tokio::spawn(leaky(8))).collect();
    let mut per_pid: HashMap<u32, u32> = HashMap::new();
    for call in calls {
        *per_pid.entry(call.await.unwrap().unwrap()).or_default() += 1;
    }
    assert!(stats("ahead_rss").sent_ahead > 0, "no call went ahead, so this proves nothing");
    // 40 MiB is passed after about 5 calls of 8 MiB; one or two more were started by then.
    assert!(per_pid.values().all(|&n| n <= 8), "a worker far over max_rss kept serving: {per_pid:?}");
}

/// Calls taken back from a worker killed for the call before them wait at the front of the
/// pool's line; when the first of them, given the worker's permit, is dropped before it uses
/// it, the permit goes on to the next in line, which runs at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permit_let_go_in_the_line_goes_to_the_next_call_in_it() {
    let dir = Dir::new("line");
    let hold = tokio::spawn(hold_in_front(dir.path()));
    dir.started().await;
    let dropped = tokio::spawn(wait_in_line(1));
    sent_ahead("ahead_line", 1).await;
    let next = tokio::spawn(wait_in_line(2));
    sent_ahead("ahead_line", 2).await;
    // Drop the first as soon as the worker is killed, while its replacement starts.
    let abort = dropped.abort_handle();
    let watcher = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(10);
        while stats("ahead_line").restarts_total() < 1 && Instant::now() < until {
            std::thread::sleep(Duration::from_micros(200));
        }
        abort.abort();
    });
    assert!(matches!(hold.await.unwrap(), Err(Error::Timeout { .. })));
    watcher.join().unwrap();
    let _ = dropped.await;
    let started = Instant::now();
    assert_eq!(next.await.unwrap().unwrap(), 2, "the next call in line got no worker");
    assert!(started.elapsed() < Duration::from_secs(5), "it waited {:?}", started.elapsed());
}

/// A call sent ahead whose deadline passes before its worker comes to it never starts, even
/// when the caller's threads are too busy to withdraw it in time: the worker reads its
/// deadline in the gate.
#[tokio::test]
async fn a_call_sent_ahead_never_starts_after_its_deadline() {
    let dir = Dir::new("late");
    let pid = tokio::spawn(hold_then_end(dir.path(), 250));
    dir.started().await;
    let late = tokio::spawn(late_behind(dir.path(), 1));
    sent_ahead("ahead_late", 1).await;
    // This runtime's only thread is busy past the call's deadline and the call before's end.
    std::thread::sleep(Duration::from_millis(400));
    let pid = pid.await.unwrap().unwrap();
    assert!(matches!(late.await.unwrap(), Err(Error::Timeout { pid: None, .. })));
    assert!(!dir.ran(1), "a call sent ahead ran after its deadline");
    assert_eq!(hold_then_end(dir.path(), 0).await.unwrap(), pid, "the worker serves on");
    let stats = stats("ahead_late");
    assert_eq!((stats.withdrawn, stats.restarts_total()), (1, 0));
}

/// The same on a worker due for recycling (over `max_rss`): the worker passes over the late
/// call and runs the one behind it; each caller gets its own call's reply.
#[tokio::test]
async fn a_late_call_passed_over_never_gets_the_reply_of_the_call_behind() {
    let dir = Dir::new("late-rss");
    let first = tokio::spawn(bloat_then_end(dir.path(), 250));
    dir.started().await;
    let late = tokio::spawn(late_then(dir.path(), 1));
    sent_ahead("ahead_late_rss", 1).await;
    let patient = tokio::spawn(patient_then(dir.path(), 2));
    sent_ahead("ahead_late_rss", 2).await;
    // Busy past the late call's deadline and the first call's end: the worker passes over
    // the late call and runs the patient one before this caller reads anything.
    std::thread::sleep(Duration::from_millis(400));
    first.await.unwrap().unwrap();
    assert!(matches!(late.await.unwrap(), Err(Error::Timeout { pid: None, .. })), "it got a reply");
    assert_eq!(patient.await.unwrap().unwrap(), 2);
    assert!(!dir.ran(1) && dir.ran(2));
    assert_eq!(stats("ahead_late_rss").restarts(RestartCause::Recycled), 1, "over max_rss, not recycled");
}

/// Sends `signal` to `pid`.
fn signal(pid: u32, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("nonzero pid");
    rustix::process::kill_process(pid, signal).expect("kill");
}

/// A call sent ahead behind one the worker has not even read yet (it is stopped), whose
/// deadline passes: it never runs, names no worker, and the worker serves on.
#[tokio::test]
async fn a_call_behind_one_not_yet_read_can_still_be_withdrawn() {
    let dir = Dir::new("undecided");
    // Start the worker, and learn its pid.
    let first = hold_undecided(dir.path(), 0).await.unwrap();
    dir.started().await;
    signal(first, rustix::process::Signal::STOP);
    let hold = tokio::spawn(hold_undecided(dir.path(), 0));
    let busy =
        support::eventually_async(Duration::from_secs(10), || stats("ahead_undecided").busy == 1).await;
    assert!(busy, "the first call never took the worker");
    let hurried = tokio::spawn(once_undecided_in_a_hurry(dir.path(), 1));
    sent_ahead("ahead_undecided", 1).await;
    let timed_out = hurried.await.unwrap();
    signal(first, rustix::process::Signal::CONT);

    assert!(matches!(timed_out, Err(Error::Timeout { pid: None, .. })), "{timed_out:?}");
    assert_eq!(hold.await.unwrap().unwrap(), first);
    assert_eq!(hold_undecided(dir.path(), 0).await.unwrap(), first, "the worker serves on");
    assert!(!dir.ran(1), "the call given up on ran");
    let stats = stats("ahead_undecided");
    assert_eq!((stats.withdrawn, stats.restarts_total()), (1, 0));
}

/// Calls sent ahead and withdrawn when the call before them times out keep their place in
/// line: they run in their order, before the calls that queued in the pool after them (more
/// calls queue than may wait behind one call).
#[tokio::test]
async fn a_withdrawn_call_keeps_its_place_in_line() {
    const CALLS: u64 = 12;
    let dir = Dir::new("in-line");
    let hold = tokio::spawn(hold_in_line(dir.path()));
    dir.started().await;
    let first = tokio::spawn(note_turn(dir.path(), 1));
    sent_ahead("ahead_in_line", 1).await;
    let mut later = Vec::new();
    for x in 2..=CALLS {
        later.push(tokio::spawn(note_turn(dir.path(), x)));
        let queued =
            support::eventually_async(Duration::from_secs(10), || stats("ahead_in_line").queued as u64 >= x)
                .await;
        assert!(queued, "call {x} did not queue");
    }
    assert!(matches!(hold.await.unwrap(), Err(Error::Timeout { .. })));
    assert_eq!(first.await.unwrap().unwrap(), 1);
    for call in later {
        call.await.unwrap().unwrap();
    }
    let order = std::fs::read_to_string(dir.0.join("order")).unwrap();
    let expected: Vec<String> = (1..=CALLS).map(|x| x.to_string()).collect();
    assert_eq!(order.lines().collect::<Vec<_>>(), expected, "the calls ran out of their order");
    let withdrawn = stats("ahead_in_line").withdrawn;
    assert!(
        (1..CALLS).contains(&withdrawn),
        "{withdrawn} of {CALLS} calls were sent ahead and withdrawn: both kinds must be in line"
    );
}

/// The worker answers the call before, and dies before it claims the call behind, which its
/// caller was handed the worker for: that call never started, so it runs on the next worker.
/// Killed before it answers, the call before crashes, and the call behind is withdrawn and
/// runs on the next worker as well. Repeated until the first case has happened.
#[tokio::test]
async fn a_call_handed_a_worker_that_dies_before_claiming_it_runs_once_on_the_next() {
    let mut handed = 0;
    for round in 0..10u64 {
        let dir = Dir::new(&format!("handed-{round}"));
        let first = tokio::spawn(report_then_answer(dir.path()));
        let pid = dir.started().await;
        let behind = tokio::spawn(once_handed(dir.path(), 1));
        sent_ahead("ahead_handed", round + 1).await;
        std::fs::write(dir.0.join("go"), b"").unwrap();
        // This runtime's only thread is held: nothing is read from the channel, so the
        // worker, once it has answered, waits to claim the call behind.
        let answering = support::eventually(Duration::from_secs(10), || dir.0.join("answering").exists());
        assert!(answering, "the call before never answered");
        support::kill9(pid);

        let first = first.await.unwrap();
        let ran_on = behind.await.unwrap().expect("the call behind never started, so it runs elsewhere");
        assert_ne!(ran_on, pid, "it ran on the worker that died");
        match first {
            Ok(answered) => {
                assert_eq!(answered, pid);
                handed += 1;
            }
            Err(Error::Crashed { exit: ExitReason::Signal(9), .. }) => {}
            other => panic!("the call before: {other:?}"),
        }
        if handed == 2 {
            break;
        }
    }
    assert!(handed > 0, "the worker was never killed after it answered: the case was not provoked");
    let stats = stats("ahead_handed");
    assert!(stats.restarts(RestartCause::DiedIdle) >= handed, "{:?}", stats.restarts(RestartCause::DiedIdle));
}

/// Calls `x` and `x + 1` of `call`, at once: both go ahead behind a long call and time out
/// there.
async fn two_time_out<F, Fut>(call: F, dir: &Dir, x: u64, padding: &str)
where
    F: Fn(String, u64, String) -> Fut,
    Fut: std::future::Future<Output = Result<u32, Error>> + Send + 'static,
{
    let pair = [
        tokio::spawn(call(dir.path(), x, padding.to_owned())),
        tokio::spawn(call(dir.path(), x + 1, padding.to_owned())),
    ];
    for call in pair {
        let done = call.await.unwrap();
        assert!(matches!(done, Err(Error::Timeout { .. })), "{done:?}");
    }
}

/// Calls sent ahead behind a long call and taken back stay on the worker's socket, unread,
/// until the socket is full: the call that finds it full looks for a worker again, none of
/// those taken back ever runs, and the calls after them run once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_sent_ahead_until_the_socket_is_full_look_for_a_worker_again() {
    let dir = Dir::new("full");
    let hold = tokio::spawn(hold_full(dir.path()));
    let pid = dir.started().await;
    let padding = "x".repeat(15_000);
    let sent = || stats("ahead_full").sent_ahead;
    // Two at a time (so that both are written at once), each withdrawn when it times out,
    // until one more cannot be written: its call times out waiting for a worker instead.
    let mut x = 0;
    loop {
        assert!(x < 400, "{} calls of 15 KB went ahead, and the socket never filled", sent());
        let before = sent();
        two_time_out(bulky_in_a_hurry, &dir, x, &padding).await;
        x += 2;
        if sent() < before + 2 {
            break;
        }
    }
    let patient = tokio::spawn(bulky_patiently(dir.path(), 10_000, padding.clone()));
    std::fs::write(dir.0.join("go"), b"").unwrap();
    assert_eq!(hold.await.unwrap().unwrap(), pid);
    patient.await.unwrap().expect("it runs once");
    assert!(dir.ran(10_000));
    let ran: Vec<u64> = (0..x).filter(|&x| dir.ran(x)).collect();
    assert!(ran.is_empty(), "calls that were taken back ran: {ran:?}");
    // The pool serves on.
    assert!(bulky_patiently(dir.path(), 10_001, String::new()).await.is_ok());
}

/// Calls that wait in the caller go to the worker's socket together, but never in a write that
/// the socket could take only in part: with the socket nearly full, six calls of 15 KB that
/// go at once are written one by one until the socket is full, and the rest look for a worker
/// again. No frame goes in part, so the worker is never ended for one, and each call runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_written_together_never_leave_part_of_a_frame_on_the_socket() {
    let dir = Dir::new("chunks");
    let hold = tokio::spawn(hold_chunks(dir.path()));
    let pid = dir.started().await;
    let padding = "x".repeat(15_000);
    let sent = || stats("ahead_chunks").sent_ahead;
    // Ten calls written and taken back: their frames stay on the socket, unread.
    let mut x = 0;
    while sent() < 10 {
        two_time_out(bulky_quickly, &dir, x, &padding).await;
        x += 2;
    }
    assert_eq!(sent(), 10, "the socket filled before ten calls of 15 KB went ahead");
    // Two more written; six wait behind them in the caller, and go together once the two
    // are taken back.
    let quick: Vec<_> =
        (0..2).map(|i| tokio::spawn(bulky_quickly(dir.path(), x + i, padding.clone()))).collect();
    let later: Vec<_> =
        (0..6).map(|i| tokio::spawn(bulky_later(dir.path(), 100 + i, padding.clone()))).collect();
    for call in quick {
        assert!(matches!(call.await.unwrap(), Err(Error::Timeout { .. })));
    }
    std::fs::write(dir.0.join("go"), b"").unwrap();
    assert_eq!(hold.await.unwrap().unwrap(), pid);
    for call in later {
        call.await.unwrap().expect("it runs once");
    }
    assert!((100..106).all(|x| dir.ran(x)));
    assert!((0..x + 2).all(|x| !dir.ran(x)), "a call taken back ran");
    assert_eq!(
        stats("ahead_chunks").restarts(RestartCause::Protocol),
        0,
        "a worker was ended for a frame that went only in part"
    );
}
