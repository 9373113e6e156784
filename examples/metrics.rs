//! Pool figures through the `metrics` facade, rendered by the Prometheus exporter: the
//! `metrics` feature makes every pool publish its counters and histograms, so any `metrics`
//! recorder works with no code of offload's.
//!
//! ```text
//! cargo run --release --features metrics --example metrics
//! ```

use offload::offload;

#[offload(workers = "2", timeout = "2s")]
fn collatz_steps(start: u64) -> u64 {
    let (mut n, mut steps) = (start, 0);
    while n != 1 {
        n = if n % 2 == 0 { n / 2 } else { 3 * n + 1 };
        steps += 1;
    }
    steps
}

#[offload(workers = "1", timeout = "2s")]
fn unreliable(x: u32) -> u32 {
    assert!(!x.is_multiple_of(5), "multiples of five are not welcome");
    x
}

#[tokio::main]
async fn main() {
    // Install a recorder; a real service would serve `handle.render()` at /metrics.
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("no other recorder is installed");

    let mut steps = 0;
    for start in 1..=200 {
        steps += collatz_steps(start).await.expect("collatz");
    }
    let failures = (1..=20u32).filter(|x| x.is_multiple_of(5)).count();
    for x in 1..=20 {
        let _ = unreliable(x).await;
    }
    println!("{steps} collatz steps; {failures} calls of `unreliable` panicked, as planned\n");

    // The same figures from the library's own snapshot, then as Prometheus text.
    for pool in offload::stats() {
        println!(
            "{}: {} submitted, {} succeeded, {} failed, run time p50 {:?} p99 {:?}",
            pool.name,
            pool.submitted,
            pool.succeeded,
            pool.failed_total(),
            pool.run_time.p50,
            pool.run_time.p99
        );
    }
    println!("\n{}", handle.render());
}
