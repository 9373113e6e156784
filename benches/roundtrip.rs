//! Round trip of a trivial offloaded call (u64 in, u64 out), beside two baselines measured in
//! the same run:
//! - `raw_socket`: a tokio Unix-socket ping-pong of 8 bytes with a child process that echoes
//!   them with blocking reads and writes, as a worker does (the floor for any process pool);
//! - `spawn_blocking`: the same function on Tokio's blocking thread pool (no isolation).
//!
//! Besides criterion's estimates, prints p50 and p99 of each over many single calls and the
//! ratios of offload to the baselines.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};

use common::RawPeer;

#[offload::offload(timeout = "30s", workers = "1")]
fn trivial(x: u64) -> u64 {
    x.wrapping_add(1)
}

/// The same, through a bounded queue: measures the cost of admission control.
#[offload::offload(timeout = "30s", workers = "1", queue = 64)]
fn trivial_bounded(x: u64) -> u64 {
    x.wrapping_add(1)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.50), at(0.99))
}

/// Times `n` calls of `f`, appending each to `out`.
async fn sample(out: &mut Vec<Duration>, n: usize, mut f: impl AsyncFnMut(u64)) {
    for i in 0..n as u64 {
        let t = Instant::now();
        f(i).await;
        out.push(t.elapsed());
    }
}

/// A subscriber that wants everything down to `debug`, as a service logging at debug would:
/// every call's span is created and its fields recorded. It keeps nothing but counts.
struct DebugSubscriber(AtomicU64);

impl tracing::Subscriber for DebugSubscriber {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::DEBUG
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(self.0.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// p50 and p99 of `n` sequential calls of each kind, interleaved in rounds so that noise on
/// the machine hits all of them alike.
fn latency_table(n: usize) {
    let rt = runtime();
    rt.block_on(async {
        let mut raw = RawPeer::start();
        // Warm up: start the workers, fault in the code paths.
        for i in 0..2_000 {
            trivial(i).await.unwrap();
            trivial_bounded(i).await.unwrap();
            raw.ping(i).await;
            tokio::task::spawn_blocking(move || i + 1).await.unwrap();
        }
        let subscriber = std::sync::Arc::new(DebugSubscriber(AtomicU64::new(0)));
        let [mut off, mut bounded, mut traced, mut monitored, mut sock, mut blocking] =
            std::array::from_fn(|_| Vec::with_capacity(n));
        let per_round = n / 10;
        for _ in 0..10 {
            sample(&mut off, per_round, async |i| assert_eq!(trivial(i).await.unwrap(), i + 1)).await;
            sample(&mut bounded, per_round, async |i| assert_eq!(trivial_bounded(i).await.unwrap(), i + 1))
                .await;
            {
                let _traced = tracing::subscriber::set_default(std::sync::Arc::clone(&subscriber));
                sample(&mut traced, per_round, async |i| assert_eq!(trivial(i).await.unwrap(), i + 1)).await;
            }
            {
                let _monitor = offload::lag::LagMonitor::start();
                sample(&mut monitored, per_round, async |i| assert_eq!(trivial(i).await.unwrap(), i + 1))
                    .await;
            }
            sample(&mut sock, per_round, async |i| assert_eq!(raw.ping(i).await, i + 1)).await;
            sample(&mut blocking, per_round, async |i| {
                assert_eq!(tokio::task::spawn_blocking(move || i.wrapping_add(1)).await.unwrap(), i + 1)
            })
            .await;
        }
        assert!(subscriber.0.load(Ordering::Relaxed) > 0, "the subscriber saw the calls");
        let rows = [
            ("offload", percentiles(off)),
            ("offload queue=64", percentiles(bounded)),
            ("offload + debug subscriber", percentiles(traced)),
            ("offload + lag monitor", percentiles(monitored)),
            ("raw socket", percentiles(sock)),
            ("spawn_blocking", percentiles(blocking)),
        ];
        println!("\nround trip of a trivial call, {n} samples each (current_thread runtime):");
        println!("  {:<28} {:>10} {:>10}", "", "p50", "p99");
        for (name, (p50, p99)) in rows {
            println!("  {name:<28} {p50:>10.1?} {p99:>10.1?}");
        }
        let ratio = |a: usize, b: usize| {
            let ((a50, a99), (b50, b99)) = (rows[a].1, rows[b].1);
            format!(
                "p50 {:.2}x, p99 {:.2}x",
                a50.as_secs_f64() / b50.as_secs_f64(),
                a99.as_secs_f64() / b99.as_secs_f64()
            )
        };
        println!("  offload / raw socket: {} (target: p50 at most 1.5x)", ratio(0, 4));
        println!("  offload / spawn_blocking: {}", ratio(0, 5));
        println!("  bounded queue / unbounded: {} (target: under 1.05x)", ratio(1, 0));
        println!("  with debug subscriber / without: {} (target: under 1.10x)", ratio(2, 0));
        println!("  with lag monitor / without: {} (target: under 1.10x)\n", ratio(3, 0));
    });
}

/// p50 of offload and of the raw ping-pong in each placement of caller and peer: pinned to
/// one CPU, pinned to two, and left to the scheduler; on a current_thread runtime, and from a
/// spawned task on a multi_thread one (as most services call). Each placement is measured
/// `REPEATS` times; the table gives the min, median and max of the ratio. On a VM, waking an
/// idle vCPU costs tens of microseconds, which a round trip across CPUs pays: compare like
/// with like.
fn placement_table(n: usize) {
    const REPEATS: usize = 3;
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        println!("placements: one CPU only, skipped\n");
        return;
    }
    for multi_thread in [false, true] {
        let rt = if multi_thread {
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
        } else {
            runtime()
        };
        let rows = rt.block_on(async {
            let task = tokio::spawn(async move {
                let mut raw = RawPeer::start();
                trivial(0).await.unwrap();
                let mut rows = Vec::new();
                for (name, caller, peer) in
                    [("same CPU", Some(1), Some(1)), ("two CPUs", Some(1), Some(0)), ("unpinned", None, None)]
                {
                    // Every thread of this process (the runtime's included), and every child.
                    common::pin_all_threads(caller);
                    for child in common::children() {
                        common::pin(Some(child), peer);
                    }
                    let mut repeats = Vec::new();
                    for _ in 0..REPEATS {
                        for i in 0..500 {
                            trivial(i).await.unwrap();
                            raw.ping(i).await;
                        }
                        let (mut off, mut sock) = (Vec::with_capacity(n), Vec::with_capacity(n));
                        // Plain loops, not `sample`: its async closures are not `Send` for
                        // every lifetime, and this runs in a spawned task.
                        for _ in 0..10 {
                            for i in 0..(n / 10) as u64 {
                                let t = Instant::now();
                                assert_eq!(trivial(i).await.unwrap(), i + 1);
                                off.push(t.elapsed());
                            }
                            for i in 0..(n / 10) as u64 {
                                let t = Instant::now();
                                assert_eq!(raw.ping(i).await, i + 1);
                                sock.push(t.elapsed());
                            }
                        }
                        repeats.push((percentiles(off).0, percentiles(sock).0));
                    }
                    rows.push((name, repeats));
                }
                common::pin_all_threads(None);
                rows
            });
            task.await.unwrap()
        });
        let flavour = if multi_thread { "multi_thread, from a spawned task" } else { "current_thread" };
        println!("round trip by placement ({flavour}), p50 of {n} each, {REPEATS} repeats:");
        println!("  {:<12} {:>10} {:>10} {:>26}", "", "offload", "raw", "ratio min / median / max");
        for (name, mut repeats) in rows {
            let mut ratios: Vec<f64> =
                repeats.iter().map(|(o, r)| o.as_secs_f64() / r.as_secs_f64()).collect();
            ratios.sort_by(f64::total_cmp);
            repeats.sort();
            let (off, sock) = repeats[REPEATS / 2];
            println!(
                "  {name:<12} {off:>10.1?} {sock:>10.1?} {:>9.2}x / {:.2}x / {:.2}x",
                ratios[0],
                ratios[REPEATS / 2],
                ratios[REPEATS - 1]
            );
        }
        println!();
    }
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("roundtrip");
    group.bench_function("offload", |b| {
        rt.block_on(trivial(0)).unwrap();
        b.iter(|| rt.block_on(trivial(std::hint::black_box(1))).unwrap())
    });
    group.bench_function("offload_bounded_queue", |b| {
        rt.block_on(trivial_bounded(0)).unwrap();
        b.iter(|| rt.block_on(trivial_bounded(std::hint::black_box(1))).unwrap())
    });
    let mut raw = rt.block_on(async { RawPeer::start() });
    group.bench_function("raw_socket", |b| b.iter(|| rt.block_on(raw.ping(std::hint::black_box(1)))));
    drop(raw);
    group.bench_function("spawn_blocking", |b| {
        b.iter(|| {
            rt.block_on(async { tokio::task::spawn_blocking(|| std::hint::black_box(1u64) + 1).await })
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);

fn main() {
    if let Some(fd) = common::peer_fd() {
        common::echo_peer(fd);
    }
    // `cargo test --benches` runs this binary with `--bench` absent: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    latency_table(if quick { 1_000 } else { 50_000 });
    placement_table(if quick { 1_000 } else { 20_000 });
    if !quick {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
}
