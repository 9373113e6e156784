//! CPU scaling: `CALLS` calls of a CPU-bound function of about 10 ms, all submitted at once to
//! pools of 1, 2, 4, ... workers up to the available parallelism, beside two baselines
//! measured in the same run:
//! - `serial inline`: the same calls one after another on the calling thread (the time the
//!   speedups are relative to);
//! - `threads`: the same calls on as many OS threads as the pool has workers, in this process
//!   (what the machine gives to `w` busy threads: separates offload's overhead from the
//!   machine's own, such as other load or shared cores).
//!
//! Prints, for each worker count `w`: the wall time, the speedup over serial, the speedup
//! per worker (1.0 is ideal; the target is at least 0.95), the same for threads, and offload's
//! speedup over the threads' (on a machine whose cores are not free, what is left of the
//! target is the machine's: this ratio is offload's own). The
//! median of several interleaved rounds. There is no criterion group: one measurement takes
//! seconds.

mod common;

use common::{calibrate, cpus, crunch, load_average};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CALLS: u64 = 200;
/// CPU time of one call.
const CALL_TIME: Duration = Duration::from_millis(10);
/// Target speedup per worker on free cores.
const TARGET: f64 = 0.95;

// One pool per worker count: `workers` belongs to the pool, and each function has its own.
#[offload::offload(timeout = "60s", workers = "1")]
fn crunch_w1(seed: u64, iters: u64) -> u64 {
    crunch(seed, iters)
}

#[offload::offload(timeout = "60s", workers = "2")]
fn crunch_w2(seed: u64, iters: u64) -> u64 {
    crunch(seed, iters)
}

#[offload::offload(timeout = "60s", workers = "4")]
fn crunch_w4(seed: u64, iters: u64) -> u64 {
    crunch(seed, iters)
}

#[offload::offload(timeout = "60s", workers = "8")]
fn crunch_w8(seed: u64, iters: u64) -> u64 {
    crunch(seed, iters)
}

#[offload::offload(timeout = "60s", workers = "16")]
fn crunch_w16(seed: u64, iters: u64) -> u64 {
    crunch(seed, iters)
}

#[offload::offload(timeout = "60s", workers = "32")]
fn crunch_w32(seed: u64, iters: u64) -> u64 {
    crunch(seed, iters)
}

#[offload::offload(timeout = "60s", workers = "cpus")]
fn crunch_cpus(seed: u64, iters: u64) -> u64 {
    crunch(seed, iters)
}

/// The offloaded function with a pool of `workers`.
async fn call(workers: usize, seed: u64, iters: u64) -> u64 {
    let cpus = cpus();
    let result = match workers {
        1 => crunch_w1(seed, iters).await,
        2 => crunch_w2(seed, iters).await,
        4 => crunch_w4(seed, iters).await,
        8 => crunch_w8(seed, iters).await,
        16 => crunch_w16(seed, iters).await,
        32 => crunch_w32(seed, iters).await,
        w if w == cpus => crunch_cpus(seed, iters).await,
        w => unreachable!("no pool of {w} workers"),
    };
    result.unwrap()
}

/// Worker counts to measure: 1, 2, 4, ... up to the available parallelism, and that.
fn worker_counts() -> Vec<usize> {
    let cpus = cpus();
    let mut counts: Vec<usize> = [1, 2, 4, 8, 16, 32].into_iter().filter(|&w| w <= cpus).collect();
    if !counts.contains(&cpus) {
        counts.push(cpus);
    }
    counts
}

fn serial(calls: u64, iters: u64) -> Duration {
    let t = Instant::now();
    for i in 0..calls {
        std::hint::black_box(crunch(i, iters));
    }
    t.elapsed()
}

/// All calls submitted at once; the pool queues what its workers cannot take yet. The
/// answers are checked after the clock stops (the first few, recomputed here).
fn offloaded(rt: &tokio::runtime::Runtime, workers: usize, calls: u64, iters: u64) -> Duration {
    let (elapsed, answers) = rt.block_on(async {
        let t = Instant::now();
        let tasks: Vec<_> = (0..calls).map(|i| tokio::spawn(call(workers, i, iters))).collect();
        let mut answers = Vec::with_capacity(tasks.len());
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        (t.elapsed(), answers)
    });
    for (i, answer) in answers.into_iter().enumerate().take(3) {
        assert_eq!(answer, crunch(i as u64, iters));
    }
    elapsed
}

/// The same calls on `threads` OS threads that each take the next one until none is left.
fn threaded(threads: usize, calls: u64, iters: u64) -> Duration {
    let next = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= calls {
                        break;
                    }
                    std::hint::black_box(crunch(i, iters));
                }
            });
        }
    });
    t.elapsed()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn scaling_table(calls: u64, call_time: Duration, rounds: usize) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let iters = calibrate(call_time);
    let counts = worker_counts();
    println!(
        "\nCPU scaling: {calls} calls of {call_time:?} ({iters} iterations) each; {} CPUs available; \
         load average before: {}",
        cpus(),
        load_average()
    );
    // Start every pool and fault in the code paths before measuring.
    rt.block_on(async {
        offload::warm_up().await.unwrap();
        for &w in &counts {
            for i in 0..w as u64 * 2 {
                call(w, i, iters / 10).await;
            }
        }
    });

    let mut serial_times = Vec::new();
    let mut pool_times = vec![Vec::new(); counts.len()];
    let mut thread_times = vec![Vec::new(); counts.len()];
    for _ in 0..rounds {
        serial_times.push(serial(calls, iters));
        for (k, &w) in counts.iter().enumerate() {
            pool_times[k].push(offloaded(&rt, w, calls, iters));
            thread_times[k].push(threaded(w, calls, iters));
        }
    }

    let serial = median(serial_times);
    println!("  median of {rounds} rounds; speedup = serial inline / wall; per worker = speedup / workers");
    println!(
        "  {:<8} {:>10} {:>9} {:>11} {:>12} {:>9} {:>11} {:>16} {:>15}",
        "workers",
        "offload",
        "speedup",
        "per worker",
        "threads",
        "speedup",
        "per thread",
        "offload/threads",
        "vs target 0.95"
    );
    println!("  {:<8} {:>10.1?} {:>9} {:>11}", "serial", serial, "1.00x", "");
    for (k, &w) in counts.iter().enumerate() {
        let pool = median(pool_times[k].clone());
        let threads = median(thread_times[k].clone());
        let speedup = serial.as_secs_f64() / pool.as_secs_f64();
        let thread_speedup = serial.as_secs_f64() / threads.as_secs_f64();
        println!(
            "  {:<8} {:>10.1?} {:>8.2}x {:>11.3} {:>12.1?} {:>8.2}x {:>11.3} {:>15.3}x {:>14.3}x",
            w,
            pool,
            speedup,
            speedup / w as f64,
            threads,
            thread_speedup,
            thread_speedup / w as f64,
            speedup / thread_speedup,
            speedup / w as f64 / TARGET
        );
    }
    println!("  load average after: {}\n", load_average());
}

fn main() {
    // `cargo test --benches` runs this binary with `--bench` absent: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    if quick {
        scaling_table(20, Duration::from_millis(1), 1);
    } else {
        scaling_table(CALLS, CALL_TIME, 3);
    }
}
