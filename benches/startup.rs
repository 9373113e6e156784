//! Worker start-up: how long the first call on a cold pool takes to answer, beside the
//! baseline measured in the same run:
//! - `bare re-exec`: spawning this same binary (`/proc/self/exe`) with a variable that makes
//!   its `main` return at once, and waiting for it to exit: what any process pool of this
//!   binary pays at least per worker (fork/exec, loading and relocating the binary, exit).
//!
//! Measured two ways, interleaved:
//! - `in process`: the first call to each of `POOLS` functions that each have a pool of their
//!   own (1 worker), so that every sample is a cold pool start: spawn, handshake, call,
//!   answer. The same call again right after shows the warm cost.
//! - `fresh process`: this binary run as a child in a "cold start" mode `CHILDREN` times: it
//!   builds a current_thread runtime, times its first call itself (the first pool of a
//!   process, with offload's start-up threads not running yet), prints that and exits. The
//!   parent also times the whole child, to compare with the bare re-exec.
//!
//! `offload::shutdown` is process-wide, so it is not used to get more cold starts: distinct
//! pools and fresh processes are.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Makes `main` return at once: the bare re-exec baseline.
const EXIT_ROLE: &str = "OFFLOAD_BENCH_EXIT";
/// Makes `main` time one cold call and print it: the fresh-process measurement.
const COLD_ROLE: &str = "OFFLOAD_BENCH_COLD_START";

/// Offloaded functions with pools of their own, one per cold start, and a way to call the
/// `k`-th.
macro_rules! cold_pools {
    ($($name:ident),* $(,)?) => {
        $(
            #[offload::offload(timeout = "30s", workers = "1")]
            fn $name(x: u64) -> u64 {
                x.wrapping_add(1)
            }
        )*

        const POOLS: usize = [$(stringify!($name)),*].len();

        async fn call_pool(k: usize, x: u64) -> u64 {
            let calls: [fn(u64) -> std::pin::Pin<Box<dyn Future<Output = Result<u64, offload::Error>>>>; POOLS] =
                [$(|x| Box::pin($name(x))),*];
            calls[k](x).await.unwrap()
        }
    };
}

cold_pools!(
    pool_00, pool_01, pool_02, pool_03, pool_04, pool_05, pool_06, pool_07, pool_08, pool_09, pool_10,
    pool_11, pool_12, pool_13, pool_14, pool_15, pool_16, pool_17, pool_18, pool_19, pool_20, pool_21,
    pool_22, pool_23, pool_24, pool_25, pool_26, pool_27, pool_28, pool_29, pool_30, pool_31, pool_32,
    pool_33, pool_34, pool_35, pool_36, pool_37, pool_38, pool_39, pool_40,
);

/// A pool of 2 workers, cold, for the fresh-process mode: how the first call fares when a
/// pool starts several workers at once.
#[offload::offload(timeout = "30s", workers = "2")]
fn pool_of_two(x: u64) -> u64 {
    x.wrapping_add(1)
}

/// Fresh processes: one per sample.
const CHILDREN: usize = 40;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// The child's side of the fresh-process measurement: the first call of this process, timed
/// from just before it to the answer, printed in nanoseconds.
fn cold_child(workers: &str) -> ! {
    let rt = runtime();
    let elapsed = rt.block_on(async {
        let t = Instant::now();
        let answer = match workers {
            "1" => pool_00(41).await.unwrap(),
            _ => pool_of_two(41).await.unwrap(),
        };
        assert_eq!(answer, 42);
        t.elapsed()
    });
    println!("{}", elapsed.as_nanos());
    std::process::exit(0)
}

fn bare_reexec() -> Duration {
    let t = Instant::now();
    let status = Command::new("/proc/self/exe")
        .env(EXIT_ROLE, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    let elapsed = t.elapsed();
    assert!(status.success());
    elapsed
}

/// Runs this binary in cold-start mode: (the whole child's time, its first call's time).
fn fresh_process(workers: &str) -> (Duration, Duration) {
    let t = Instant::now();
    let output =
        Command::new("/proc/self/exe").env(COLD_ROLE, workers).stdin(Stdio::null()).output().unwrap();
    let elapsed = t.elapsed();
    assert!(output.status.success(), "{output:?}");
    let nanos: u64 =
        String::from_utf8_lossy(&output.stdout).trim().parse().expect("child prints nanoseconds");
    (elapsed, Duration::from_nanos(nanos))
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration, Duration) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.0), at(0.5), at(1.0))
}

fn startup_table(pools: usize, children: usize) {
    let rt = runtime();
    // Pool 0 is the warm-up: it starts offload's supervisor and faults in the code paths, so
    // the pools measured after it are as cold as pools get in a running service.
    let first = rt.block_on(async {
        let t = Instant::now();
        call_pool(0, 1).await;
        t.elapsed()
    });
    bare_reexec();
    fresh_process("1");

    let (mut bare, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    let (mut child_total, mut child_call, mut child2_call) = (Vec::new(), Vec::new(), Vec::new());
    for k in 1..pools.max(children + 1) {
        bare.push(bare_reexec());
        if k < pools {
            let (c, w) = rt.block_on(async {
                let t = Instant::now();
                assert_eq!(call_pool(k, k as u64).await, k as u64 + 1);
                let c = t.elapsed();
                let t = Instant::now();
                assert_eq!(call_pool(k, k as u64).await, k as u64 + 1);
                (c, t.elapsed())
            });
            cold.push(c);
            warm.push(w);
        }
        if k <= children {
            let (total, call) = fresh_process("1");
            child_total.push(total);
            child_call.push(call);
            child2_call.push(fresh_process("2").1);
        }
    }

    let rows = [
        ("bare re-exec of the binary", percentiles(bare.clone())),
        ("in process: first call, cold pool", percentiles(cold.clone())),
        ("in process: second call, warm", percentiles(warm)),
        ("fresh process: first call", percentiles(child_call.clone())),
        ("fresh process: first call, 2 workers", percentiles(child2_call)),
        ("fresh process: whole child", percentiles(child_total.clone())),
    ];
    println!(
        "\nworker start-up: {} cold 1-worker pools in process (after a warm-up pool), {} fresh processes:",
        cold.len(),
        child_call.len()
    );
    println!("  {:<40} {:>10} {:>10} {:>10}", "", "min", "p50", "max");
    for (name, (min, p50, max)) in rows {
        println!("  {:<40} {:>10.1?} {:>10.1?} {:>10.1?}", name, min, p50, max);
    }
    println!("  (the warm-up pool's first call, the process's first: {first:.1?})");
    let min = |k: usize| rows[k].1.0.as_secs_f64();
    let p50 = |k: usize| rows[k].1.1.as_secs_f64();
    println!(
        "  cold first call / bare re-exec: p50 {:.2}x in process, {:.2}x in a fresh process; \
         min {:.2}x in process, {:.2}x in a fresh process",
        p50(1) / p50(0),
        p50(3) / p50(0),
        min(1) / min(0),
        min(3) / min(0)
    );
    println!(
        "  fresh process, first call with 2 workers / with 1: p50 {:.2}x, min {:.2}x",
        p50(4) / p50(3),
        min(4) / min(3)
    );
    println!(
        "  fresh process, whole child - bare re-exec, p50: {:.1?} (runtime, first call, exit)\n",
        Duration::from_secs_f64((p50(5) - p50(0)).max(0.0))
    );
}

fn main() {
    if std::env::var_os(EXIT_ROLE).is_some() {
        return;
    }
    if let Some(workers) = std::env::var_os(COLD_ROLE) {
        cold_child(workers.to_str().unwrap_or("1"));
    }
    // `cargo test --benches` runs this binary with `--bench` absent: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    if quick {
        startup_table(3, 2);
    } else {
        startup_table(POOLS, CHILDREN);
    }
}
