//! Event-loop lag while CPU-bound work is saturating the machine: how late a heartbeat on a
//! current_thread runtime runs while twice as many tasks as CPUs keep calling a ~10 ms
//! CPU-bound function, each way for `RUN` in each of `ROUNDS` interleaved rounds:
//! - `offload`: an offloaded function with the default sizing (`workers = "cpus-2"`, at
//!   least 1), its pool saturated (more callers than workers, calls queue);
//! - `spawn_blocking`: the same function on Tokio's blocking pool, one thread per caller;
//! - `spawn_blocking, as many as workers`: the same, with at most as many running at once as
//!   the offload pool has workers (a semaphore), for a like-for-like use of the cores;
//! - `inline`: the same function called in the tasks themselves, on the runtime's thread;
//! - `idle`: no work at all, the floor of each heartbeat.
//!
//! Two heartbeats run throughout:
//! - `ping`: a thread sends the time every `BEAT` through a channel; a task on the runtime
//!   records how long after the send it received it. This is how late the runtime reacts to
//!   an outside event (a request arriving), with no timer in the way;
//! - `LagMonitor`: offload's own monitor (`offload::lag`), ticking every 1 ms. It
//!   sleeps on Tokio's timer, whose resolution is 1 ms, so even an idle runtime reads up to
//!   about 1 ms: compare with its idle row.
//!
//! Prints p50, p99 and max of both, and the calls per second each way completed. The target: ping p99
//! under 1 ms for offload with the default sizing.

mod common;

use common::{calibrate, cpus, crunch, load_average};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use offload::lag::{LagMonitor, LagStats};

/// Heartbeat period.
const BEAT: Duration = Duration::from_millis(1);
/// CPU time of one call.
const CALL_TIME: Duration = Duration::from_millis(10);
/// How long each way runs in a round.
const RUN: Duration = Duration::from_secs(1);
/// Rounds, each running every way once: noise on the machine hits all ways alike.
const ROUNDS: usize = 4;
/// Target p99 of the ping heartbeat for offload.
const TARGET: Duration = Duration::from_millis(1);

/// Default sizing: no `workers`, so `"cpus-2"` (at least 1).
#[offload::offload(timeout = "60s")]
fn crunch_offloaded(seed: u64, iters: u64) -> u64 {
    crunch(seed, iters)
}

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Idle,
    Offload,
    SpawnBlocking,
    SpawnBlockingLimited,
    Inline,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Idle => "idle (no work)",
            Way::Offload => "offload (default sizing)",
            Way::SpawnBlocking => "spawn_blocking",
            Way::SpawnBlockingLimited => "spawn_blocking, as many as workers",
            Way::Inline => "inline on the runtime",
        }
    }
}

/// What `"cpus-2"` resolves to here.
fn default_workers() -> usize {
    cpus().saturating_sub(2).max(1)
}

struct Outcome {
    ping: Vec<Duration>,
    monitor: LagStats,
    calls: u64,
    elapsed: Duration,
}

/// Runs `callers` tasks calling the work `way` for `run`, with both heartbeats.
async fn measure(way: Way, callers: usize, iters: u64, run: Duration) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let limit = Arc::new(tokio::sync::Semaphore::new(default_workers()));

    // The ping heartbeat: a thread that sends the time, a task that records the delay.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let pinger = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(BEAT);
                if tx.send(Instant::now()).is_err() {
                    break;
                }
            }
        })
    };
    let receiver = tokio::spawn(async move {
        let mut delays = Vec::with_capacity(8_192);
        while let Some(sent) = rx.recv().await {
            delays.push(sent.elapsed());
        }
        delays
    });
    let monitor = LagMonitor::builder().interval(Duration::from_millis(1)).threshold(Duration::MAX).start();

    let started = Instant::now();
    let tasks: Vec<_> = (0..if way == Way::Idle { 0 } else { callers })
        .map(|caller| {
            let (stop, calls, limit) = (Arc::clone(&stop), Arc::clone(&calls), Arc::clone(&limit));
            tokio::spawn(async move {
                let mut seed = caller as u64;
                while !stop.load(Ordering::Relaxed) {
                    seed += 1;
                    let x = match way {
                        Way::Idle => unreachable!(),
                        Way::Offload => crunch_offloaded(seed, iters).await.unwrap(),
                        Way::SpawnBlocking => {
                            tokio::task::spawn_blocking(move || crunch(seed, iters)).await.unwrap()
                        }
                        Way::SpawnBlockingLimited => {
                            let _permit = limit.acquire().await.unwrap();
                            tokio::task::spawn_blocking(move || crunch(seed, iters)).await.unwrap()
                        }
                        Way::Inline => {
                            let x = crunch(seed, iters);
                            // Let the other tasks run between calls, as a handler that
                            // returns would.
                            tokio::task::yield_now().await;
                            x
                        }
                    };
                    std::hint::black_box(x);
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    let monitor = {
        let stats = monitor.stats();
        drop(monitor);
        stats
    };
    let ping = {
        // Delays recorded after the work stopped would flatter every way: stop the pinger
        // first, and then collect.
        pinger.join().unwrap();
        receiver.await.unwrap()
    };
    let calls = calls.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    for task in tasks {
        task.await.unwrap();
    }
    Outcome { ping, monitor, calls, elapsed }
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration, Duration) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.50), at(0.99), at(1.0))
}

fn lag_table(call_time: Duration, run: Duration, rounds: usize) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let iters = calibrate(call_time);
    let callers = 2 * cpus();
    println!(
        "\nevent-loop lag on a current_thread runtime: {callers} callers of a {call_time:?} CPU-bound fn; \
         {rounds} rounds of {run:?} each way, interleaved; {} CPUs, offload default sizing = {} worker(s); \
         heartbeat every {BEAT:?}; load average before: {}",
        cpus(),
        default_workers(),
        load_average()
    );
    rt.block_on(async {
        offload::warm_up().await.unwrap();
        crunch_offloaded(0, iters / 10).await.unwrap();
    });

    let ways = [Way::Idle, Way::Offload, Way::SpawnBlocking, Way::SpawnBlockingLimited, Way::Inline];
    let mut outcomes: Vec<Vec<Outcome>> = ways.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (k, &way) in ways.iter().enumerate() {
            outcomes[k].push(rt.block_on(measure(way, callers, iters, run)));
        }
    }

    println!("  ping: all rounds' delays together; monitor: median of the rounds' p50 and p99, largest max");
    println!(
        "  {:<36} {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>8}",
        "", "ping p50", "p99", "max", "mon. p50", "p99", "max", "calls/s"
    );
    let mut p99s = Vec::new();
    for (way, outcomes) in ways.iter().zip(outcomes) {
        let median = |mut v: Vec<Duration>| {
            v.sort_unstable();
            v[v.len() / 2]
        };
        let m50 = median(outcomes.iter().map(|o| o.monitor.p50).collect());
        let m99 = median(outcomes.iter().map(|o| o.monitor.p99).collect());
        let mmax = outcomes.iter().map(|o| o.monitor.max).max().unwrap();
        let calls: u64 = outcomes.iter().map(|o| o.calls).sum();
        let elapsed: Duration = outcomes.iter().map(|o| o.elapsed).sum();
        let (p50, p99, max) = percentiles(outcomes.into_iter().flat_map(|o| o.ping).collect());
        println!(
            "  {:<36} {:>9.1?} {:>9.1?} {:>9.1?} | {:>9.1?} {:>9.1?} {:>9.1?} | {:>8.1}",
            way.name(),
            p50,
            p99,
            max,
            m50,
            m99,
            mmax,
            calls as f64 / elapsed.as_secs_f64()
        );
        p99s.push((*way, p99, m99));
    }
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    let (_, offload_p99, offload_m99) = p99s[1];
    for &(way, p99, m99) in &p99s[2..] {
        println!(
            "  {} / offload, p99: ping {:.2}x, monitor {:.2}x",
            way.name(),
            ratio(p99, offload_p99),
            ratio(m99, offload_m99)
        );
    }
    println!(
        "  offload ping p99 {:.1?} vs target {TARGET:?}: {:.2}x of the target; load average after: {}\n",
        offload_p99,
        ratio(offload_p99, TARGET),
        load_average()
    );
}

fn main() {
    // `cargo test --benches` runs this binary with `--bench` absent: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    if quick {
        lag_table(Duration::from_millis(2), Duration::from_millis(100), 1);
    } else {
        lag_table(CALL_TIME, RUN, ROUNDS);
    }
}
