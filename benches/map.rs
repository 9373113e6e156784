//! `offload::map` throughput, beside baselines measured in the same run:
//! - trivial items (u64 in, u64 out) on 2 workers: `offload::map` against one offloaded call
//!   per item (256 in flight) and the raw socket with 256 messages pipelined on 2 echo peers,
//!   the most the transport carries;
//! - CPU-bound items (about 1 ms of arithmetic each): `offload::map` on 2 workers against 1
//!   worker, the speed-up (2.0x would be linear);
//! - streamed items: a function that returns `impl Iterator<Item = u64>`, read as the worker
//!   yields them, against the raw socket with messages pipelined on 1 echo peer.
//!
//! Prints items per second of each over interleaved rounds (the median round) and the
//! ratios; both on a multi_thread runtime of 2 threads, as a service would run.

mod common;

use std::time::{Duration, Instant};

use common::RawPeer;

/// Calls in flight for the one-call-per-item baseline, and messages for the raw one.
const IN_FLIGHT: usize = 256;
const WORKERS: usize = 2;
/// Targets from the issue: trivial items per second on 2 workers, and the speed-up of 2
/// workers over 1 for CPU-bound items.
const TARGET_ITEMS: f64 = 1_000_000.0;
const TARGET_SPEEDUP: f64 = 0.95 * 2.0;

#[offload::offload(timeout = "30s", workers = "2")]
fn trivial(x: u64) -> u64 {
    x.wrapping_add(1)
}

#[offload::offload(timeout = "30s", workers = "2")]
fn crunch_on_two(seed: u64, iters: u64) -> u64 {
    common::crunch(seed, iters)
}

#[offload::offload(timeout = "30s", workers = "1")]
fn crunch_on_one(seed: u64, iters: u64) -> u64 {
    common::crunch(seed, iters)
}

#[offload::offload(timeout = "30s", workers = "1")]
fn count_to(n: u64) -> impl Iterator<Item = u64> {
    0..n
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(WORKERS).enable_all().build().unwrap()
}

async fn map_trivial(items: u64) -> Duration {
    let start = Instant::now();
    let mut results = offload::map(trivial, 0..items);
    let mut expected = 1;
    while let Some(result) = results.next().await {
        assert_eq!(result.unwrap(), expected);
        expected += 1;
    }
    assert_eq!(expected, items + 1);
    start.elapsed()
}

/// One offloaded call per item, from `IN_FLIGHT` tasks that each take the next number.
async fn calls_trivial(items: u64) -> Duration {
    common::concurrent_calls(items, IN_FLIGHT, |x| async move { trivial(x).await.unwrap() }).await
}

async fn map_crunch(two: bool, items: u64, iters: u64) -> Duration {
    let start = Instant::now();
    let mut done = 0;
    if two {
        let mut results = offload::map(move |seed| crunch_on_two(seed, iters), 0..items);
        while let Some(result) = results.next().await {
            result.unwrap();
            done += 1;
        }
    } else {
        let mut results = offload::map(move |seed| crunch_on_one(seed, iters), 0..items);
        while let Some(result) = results.next().await {
            result.unwrap();
            done += 1;
        }
    }
    assert_eq!(done, items);
    start.elapsed()
}

fn trivial_table(items: u64, rounds: usize) {
    let rt = runtime();
    let mut peers: Vec<RawPeer> = rt.block_on(async { (0..WORKERS).map(|_| RawPeer::start()).collect() });
    rt.block_on(async {
        offload::warm_up().await.unwrap();
        map_trivial(items / 10).await;
        calls_trivial(items / 100).await;
        common::raw_pipelined(&mut peers, IN_FLIGHT, items / 10).await;
    });
    let calls_n = (items / 10).max(IN_FLIGHT as u64);
    let (mut map, mut calls, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        map.push(common::rate(items, rt.block_on(map_trivial(items))));
        calls.push(common::rate(calls_n, rt.block_on(calls_trivial(calls_n))));
        raw.push(common::rate(items, rt.block_on(common::raw_pipelined(&mut peers, IN_FLIGHT, items))));
    }
    drop(peers);
    let (map, calls, raw) = (common::median(map), common::median(calls), common::median(raw));
    println!(
        "\nmap of trivial items, {WORKERS} workers, multi_thread runtime; median of {rounds} rounds of {items} \
         items (one call per item: {calls_n}); load average {}:",
        common::load_average()
    );
    println!("  {:<44} {:>12}", "", "items/s");
    println!("  {:<44} {:>12.0}", "offload::map", map);
    println!("  {:<44} {:>12.0}", format!("one offloaded call per item, {IN_FLIGHT} in flight"), calls);
    println!("  {:<44} {:>12.0}", format!("raw socket, {IN_FLIGHT} pipelined on {WORKERS} peers"), raw);
    println!("  map / one call per item: {:.1}x", map / calls);
    println!("  map / pipelined raw socket: {:.2}x", map / raw);
    println!("  map / target ({TARGET_ITEMS:.0} items/s): {:.2}x", map / TARGET_ITEMS);
}

fn crunch_table(items: u64, rounds: usize) {
    let rt = runtime();
    let iters = common::calibrate(Duration::from_millis(1));
    rt.block_on(async {
        offload::warm_up().await.unwrap();
        map_crunch(false, items / 4, iters).await;
        map_crunch(true, items / 4, iters).await;
    });
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        one.push(rt.block_on(map_crunch(false, items, iters)).as_secs_f64());
        two.push(rt.block_on(map_crunch(true, items, iters)).as_secs_f64());
    }
    let (one, two) = (common::median(one), common::median(two));
    println!(
        "\nmap of CPU-bound items (~1 ms each); median of {rounds} rounds of {items} items; load average {}:",
        common::load_average()
    );
    println!("  1 worker:  {:>8.1} ms", one * 1e3);
    println!("  2 workers: {:>8.1} ms", two * 1e3);
    println!("  speed-up: {:.2}x (target {TARGET_SPEEDUP:.2}x, linear 2.00x)\n", one / two);
}

async fn stream_items(items: u64) -> Duration {
    let start = Instant::now();
    let mut stream = count_to(items);
    let mut expected = 0;
    while let Some(item) = stream.next().await {
        assert_eq!(item.unwrap(), expected);
        expected += 1;
    }
    assert_eq!(expected, items);
    start.elapsed()
}

fn stream_table(items: u64, rounds: usize) {
    let rt = runtime();
    let mut peer: Vec<RawPeer> = rt.block_on(async { vec![RawPeer::start()] });
    rt.block_on(async {
        stream_items(items / 10).await;
        common::raw_pipelined(&mut peer, IN_FLIGHT, items / 10).await;
    });
    let (mut streamed, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        streamed.push(common::rate(items, rt.block_on(stream_items(items))));
        raw.push(common::rate(items, rt.block_on(common::raw_pipelined(&mut peer, IN_FLIGHT, items))));
    }
    let (streamed, raw) = (common::median(streamed), common::median(raw));
    println!(
        "\nstreamed items (u64), 1 worker; median of {rounds} rounds of {items} items; load average {}:",
        common::load_average()
    );
    println!("  {:<44} {:>12}", "", "items/s");
    println!("  {:<44} {:>12.0}", "offload, impl Iterator<Item = u64>", streamed);
    println!("  {:<44} {:>12.0}", format!("raw socket, {IN_FLIGHT} pipelined on 1 peer"), raw);
    println!("  streamed / raw socket pipelined: {:.2}x\n", streamed / raw);
}

fn main() {
    if let Some(fd) = common::peer_fd() {
        common::echo_peer(fd);
    }
    // `cargo test --benches` runs this binary with `--bench` absent: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    if quick {
        trivial_table(20_000, 1);
        crunch_table(20, 1);
        stream_table(20_000, 1);
    } else {
        trivial_table(2_000_000, 5);
        crunch_table(1_000, 3);
        stream_table(1_000_000, 5);
    }
}
