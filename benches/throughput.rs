//! Throughput of trivial calls (u64 in, u64 out) with many in flight on 2 workers, beside two
//! baselines measured in the same run:
//! - `procspawn`: `procspawn::Pool` of 2 processes, the same function, with as many calls in
//!   flight (spawned ahead and joined in order, a sliding window);
//! - `raw socket`: 2 child processes that echo 8-byte messages with blocking reads and writes,
//!   as a worker does, each driven in lockstep (one message in flight per process, as offload
//!   sends one call at a time to each worker): the floor for a pool of 2 single-call workers;
//!   and the same peers with 128 messages pipelined on each socket, for scale: what the
//!   transport carries when calls are not sent one at a time.
//!
//! Prints calls per second of each, over several interleaved rounds (the median round), and
//! the ratios; then criterion's estimate of one batch of `IN_FLIGHT` concurrent calls.
//!
//! procspawn re-enters `main` in its children, so `procspawn::init()` is the first thing
//! `main` does. offload's workers never reach `main` (they are made before it), and neither
//! library's environment variable is set in the other's children, so they do not interfere.

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use common::RawPeer;
use criterion::{Criterion, Throughput, criterion_group};

/// Calls in flight at any time.
const IN_FLIGHT: usize = 256;
/// Workers of the offload pool and processes of the procspawn pool.
const WORKERS: usize = 2;
/// Target from the issue, calls per second on 2 workers.
const TARGET: f64 = 200_000.0;

#[offload::offload(timeout = "30s", workers = "2")]
fn trivial(x: u64) -> u64 {
    x.wrapping_add(1)
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(WORKERS).enable_all().build().unwrap()
}

/// `calls` offloaded calls from `IN_FLIGHT` tasks that each take the next number until none
/// is left; returns the elapsed time.
async fn offload_calls(calls: u64) -> Duration {
    common::concurrent_calls(calls, IN_FLIGHT, |x| async move { trivial(x).await.unwrap() }).await
}

/// `calls` ping-pongs shared among the peers, each driven in lockstep by its own task.
async fn raw_calls(peers: &mut [RawPeer], calls: u64) -> Duration {
    let per_peer = calls / peers.len() as u64;
    let start = Instant::now();
    let mut runs = Vec::new();
    for peer in peers.iter_mut() {
        runs.push(async move {
            for x in 0..per_peer {
                assert_eq!(peer.ping(x).await, x + 1);
            }
        });
    }
    common::join_all(runs).await;
    start.elapsed()
}

/// `calls` calls through a procspawn pool, `IN_FLIGHT` at a time: a sliding window of join
/// handles, joined in the order they were spawned.
fn procspawn_calls(pool: &procspawn::Pool, calls: u64) -> Duration {
    fn inc(x: u64) -> u64 {
        x.wrapping_add(1)
    }
    let start = Instant::now();
    let mut window = VecDeque::with_capacity(IN_FLIGHT);
    let mut joined = 0;
    for x in 0..calls {
        if window.len() == IN_FLIGHT {
            let (y, handle): (u64, procspawn::JoinHandle<u64>) = window.pop_front().unwrap();
            assert_eq!(handle.join().unwrap(), y + 1);
            joined += 1;
        }
        window.push_back((x, pool.spawn(x, inc as fn(u64) -> u64)));
    }
    for (y, handle) in window {
        assert_eq!(handle.join().unwrap(), y + 1);
        joined += 1;
    }
    assert_eq!(joined, calls);
    start.elapsed()
}

/// Calls per second of each, over `rounds` interleaved rounds of `calls` (procspawn: a
/// tenth as many, it is much slower), so that noise on the machine hits all alike.
fn throughput_table(calls: u64, rounds: usize) {
    let ct = current_thread();
    let mt = multi_thread();
    let pool = procspawn::Pool::new(WORKERS).unwrap();
    let mut peers: Vec<RawPeer> = ct.block_on(async { (0..WORKERS).map(|_| RawPeer::start()).collect() });

    // Warm up: start the workers and processes, fault in the code paths.
    ct.block_on(async {
        offload::warm_up().await.unwrap();
        offload_calls(calls / 10).await;
        raw_calls(&mut peers, calls / 10).await;
        common::raw_pipelined(&mut peers, IN_FLIGHT, calls / 10).await;
    });
    mt.block_on(offload_calls(calls / 10));
    procspawn_calls(&pool, (calls / 100).max(IN_FLIGHT as u64));

    let procspawn_n = (calls / 10).max(IN_FLIGHT as u64);
    let (mut off_ct, mut off_mt, mut raw, mut piped, mut ps) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        off_ct.push(common::rate(calls, ct.block_on(offload_calls(calls))));
        off_mt.push(common::rate(calls, mt.block_on(offload_calls(calls))));
        raw.push(common::rate(calls, ct.block_on(raw_calls(&mut peers, calls))));
        piped.push(common::rate(calls, ct.block_on(common::raw_pipelined(&mut peers, IN_FLIGHT, calls))));
        ps.push(common::rate(procspawn_n, procspawn_calls(&pool, procspawn_n)));
    }
    pool.shutdown();
    drop(peers);

    let (off_ct, off_mt, raw, piped, ps) = (
        common::median(off_ct),
        common::median(off_mt),
        common::median(raw),
        common::median(piped),
        common::median(ps),
    );
    println!(
        "\nthroughput of trivial calls, {IN_FLIGHT} in flight, {WORKERS} workers; median of {rounds} rounds \
         of {calls} calls (procspawn: {procspawn_n}):"
    );
    println!("  {:<36} {:>12}", "", "calls/s");
    println!("  {:<36} {:>12.0}", "offload (current_thread runtime)", off_ct);
    println!("  {:<36} {:>12.0}", format!("offload (multi_thread, {WORKERS} threads)"), off_mt);
    println!("  {:<36} {:>12.0}", "raw socket, lockstep (current_thread)", raw);
    println!("  {:<36} {:>12.0}", "raw socket, pipelined (current_thread)", piped);
    println!("  {:<36} {:>12.0}", "procspawn::Pool (OS threads)", ps);
    println!(
        "  offload / procspawn: {:.2}x (current_thread), {:.2}x (multi_thread)",
        off_ct / ps,
        off_mt / ps
    );
    println!(
        "  offload / raw socket: {:.2}x (current_thread), {:.2}x (multi_thread)",
        off_ct / raw,
        off_mt / raw
    );
    println!(
        "  offload / target ({TARGET:.0} calls/s): {:.2}x (current_thread), {:.2}x (multi_thread)\n",
        off_ct / TARGET,
        off_mt / TARGET
    );
}

fn bench(c: &mut Criterion) {
    let rt = current_thread();
    let mut group = c.benchmark_group("throughput");
    group.throughput(Throughput::Elements(IN_FLIGHT as u64));
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    group.bench_function("offload_256_concurrent", |b| {
        rt.block_on(offload::warm_up()).unwrap();
        b.iter(|| rt.block_on(offload_calls(IN_FLIGHT as u64)))
    });
    let pool = procspawn::Pool::new(WORKERS).unwrap();
    group.bench_function("procspawn_256_concurrent", |b| b.iter(|| procspawn_calls(&pool, IN_FLIGHT as u64)));
    pool.shutdown();
    group.finish();
}

criterion_group!(benches, bench);

fn main() {
    // First of all: procspawn's children re-enter `main` and are served from here.
    procspawn::init();
    if let Some(fd) = common::peer_fd() {
        common::echo_peer(fd);
    }
    // `cargo test --benches` runs this binary with `--bench` absent: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    if quick {
        throughput_table(10_000, 1);
    } else {
        throughput_table(100_000, 5);
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
}
