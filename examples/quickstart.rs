//! Offload a CPU-heavy function from several concurrent tasks while a heartbeat task measures
//! how late the runtime wakes it; then do the same work inline on the runtime and compare.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use offload::offload;

/// Hashes `data` `rounds` times: CPU-bound, synchronous, no I/O.
#[offload(timeout = "30s", workers = "cpus-2")]
pub fn digest(data: Vec<u8>, rounds: u32) -> [u8; 32] {
    digest_inline(&data, rounds)
}

fn digest_inline(data: &[u8], rounds: u32) -> [u8; 32] {
    let mut state = [0u8; 32];
    for (i, chunk) in state.chunks_mut(8).enumerate() {
        let mut h = DefaultHasher::new();
        (i, data).hash(&mut h);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    for _ in 0..rounds {
        let mut next = [0u8; 32];
        for (i, chunk) in next.chunks_mut(8).enumerate() {
            let mut h = DefaultHasher::new();
            (i, &state).hash(&mut h);
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
        state = next;
    }
    state
}

const TASKS: usize = 4;
const JOBS_PER_TASK: usize = 6;
const ROUNDS: u32 = 600_000;
const BEAT: Duration = Duration::from_millis(5);

/// Lateness of a heartbeat that wants to wake every `BEAT` until `stop` is set.
async fn heartbeat(stop: tokio::sync::watch::Receiver<bool>) -> Vec<Duration> {
    let mut late = Vec::new();
    while !*stop.borrow() {
        let due = Instant::now() + BEAT;
        tokio::time::sleep_until(due.into()).await;
        late.push(Instant::now().saturating_duration_since(due));
    }
    late
}

struct Run {
    elapsed: Duration,
    lag: Vec<Duration>,
}

async fn run(offloaded: bool) -> Result<Run, offload::Error> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let beat = tokio::spawn(heartbeat(stop_rx));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        tasks.spawn(async move {
            let mut out = Vec::new();
            for j in 0..JOBS_PER_TASK {
                let data = format!("task {t} job {j}").into_bytes();
                out.push(if offloaded { digest(data, ROUNDS).await? } else { digest_inline(&data, ROUNDS) });
            }
            Ok::<_, offload::Error>(out)
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task")?;
    }
    let elapsed = started.elapsed();
    stop_tx.send(true).expect("heartbeat listens");
    let lag = beat.await.expect("heartbeat");
    Ok(Run { elapsed, lag })
}

fn summary(lag: &mut [Duration]) -> (Duration, Duration, Duration) {
    lag.sort_unstable();
    let at = |q: f64| lag.get(((lag.len() as f64 * q) as usize).min(lag.len().saturating_sub(1))).copied();
    (at(0.5).unwrap_or_default(), at(0.99).unwrap_or_default(), lag.last().copied().unwrap_or_default())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), offload::Error> {
    // Check the offloaded function against the inline one, and start the pool.
    assert_eq!(digest(b"check".to_vec(), 10).await?, digest_inline(b"check", 10));

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = offload::stats().iter().find(|p| p.name.ends_with("::digest")).map_or(0, |p| p.workers);
    println!(
        "{TASKS} tasks x {JOBS_PER_TASK} jobs of {ROUNDS} hash rounds each, heartbeat every {BEAT:?}, \
         on a 2-thread runtime; {cores} cores available, {workers} worker(s) (workers = \"cpus-2\")\n"
    );
    println!("{:<22} {:>9} {:>12} {:>12} {:>12}", "", "elapsed", "lag p50", "lag p99", "lag max");
    let offloaded_name = format!("offloaded ({workers} worker{})", if workers == 1 { "" } else { "s" });
    for (name, offloaded) in [(offloaded_name.as_str(), true), ("inline (on runtime)", false)] {
        let mut run = run(offloaded).await?;
        let (p50, p99, max) = summary(&mut run.lag);
        println!(
            "{name:<22} {:>8.2}s {:>12.2?} {:>12.2?} {:>12.2?}",
            run.elapsed.as_secs_f64(),
            p50,
            p99,
            max
        );
    }
    println!("\nlag = how late the runtime woke a task that asked to sleep {BEAT:?}");
    println!(
        "offloaded, the batch runs on {workers} worker(s) while the runtime's threads stay free: it \
         may take longer than inline, which used every runtime thread, but nothing else waits \
         behind it.\nThat is the trade: responsiveness over throughput; `workers = \"cpus\"` \
         gives throughput back when the service has nothing else to run."
    );
    Ok(())
}
