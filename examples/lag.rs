//! Find work that blocks the async runtime with a lag monitor: run CPU-heavy work inline on a
//! single-thread runtime and watch the lag, then move the same work to
//! `tokio::task::spawn_blocking` and watch it drop. (`#[offload]` functions move it further,
//! to a worker process; see the quickstart example.)
//!
//! ```text
//! cargo run --example lag
//! ```

use std::time::{Duration, Instant};

use offload::lag::{LagMonitor, LagStats};

const JOBS: usize = 6;
const JOB: Duration = Duration::from_millis(120);

/// Stand-in for CPU-heavy synchronous work (parsing, compressing, hashing): spins for `time`.
fn crunch(time: Duration) -> u64 {
    let end = Instant::now() + time;
    let mut x = 0u64;
    while Instant::now() < end {
        for _ in 0..1_000 {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
    }
    x
}

fn report(name: &str, stats: LagStats) {
    println!(
        "{name:<16} {:>7} {:>10.1?} {:>10.1?} {:>10.1?} {:>10}",
        stats.samples, stats.p50, stats.p99, stats.max, stats.over_threshold
    );
}

/// Runs the jobs one after another, inline or on the blocking pool, under a fresh monitor.
async fn run(inline: bool) -> LagStats {
    let monitor =
        LagMonitor::builder().interval(Duration::from_millis(5)).threshold(Duration::from_millis(50)).start();
    for _ in 0..JOBS {
        if inline {
            // A task on the runtime, as a request handler would be, that never awaits.
            tokio::spawn(async { crunch(JOB) }).await.expect("job");
        } else {
            tokio::task::spawn_blocking(|| crunch(JOB)).await.expect("job");
        }
    }
    // One more tick, so a block at the very end is measured too.
    tokio::time::sleep(Duration::from_millis(10)).await;
    monitor.stats()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    println!(
        "{JOBS} jobs of {JOB:?} each on a single-thread runtime; lag probe every 5 ms, threshold 50 ms\n"
    );
    println!(
        "{:<16} {:>7} {:>10} {:>10} {:>10} {:>10}",
        "", "ticks", "lag p50", "lag p99", "lag max", "over 50ms"
    );
    report("inline", run(true).await);
    report("spawn_blocking", run(false).await);
    println!(
        "\ninline, each job holds the runtime's only thread for {JOB:?}: no other task runs, and the \
         probe wakes that late.\nWith a tracing subscriber installed, the monitor also logs a warning \
         (target `offload::lag`)."
    );
}
