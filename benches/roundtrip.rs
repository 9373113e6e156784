//! Round trip of a trivial offloaded call (u64 in, u64 out), beside two baselines measured in
//! the same run:
//! - `raw_socket`: a tokio Unix-socket ping-pong of 8 bytes with a child process that echoes
//!   them with blocking reads and writes, as a worker does (the floor for any process pool);
//! - `spawn_blocking`: the same function on Tokio's blocking thread pool (no isolation).
//!
//! Besides criterion's estimates, prints p50 and p99 of each over many single calls and the
//! ratios of offload to the baselines.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream as StdStream;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PEER_ROLE: &str = "OFFLOAD_BENCH_ECHO_FD";

#[offload::offload(timeout = "30s", workers = "1")]
fn trivial(x: u64) -> u64 {
    x.wrapping_add(1)
}

/// The same, through a bounded queue: measures the cost of admission control.
#[offload::offload(timeout = "30s", workers = "1", queue = 64)]
fn trivial_bounded(x: u64) -> u64 {
    x.wrapping_add(1)
}

/// The raw baseline's peer: echo 8-byte messages plus one until EOF.
fn echo_peer(fd: i32) -> ! {
    // SAFETY: the parent passed us this descriptor and nothing else owns it.
    let mut stream = unsafe { StdStream::from_raw_fd(fd) };
    let mut buf = [0u8; 8];
    while stream.read_exact(&mut buf).is_ok() {
        let reply = u64::from_le_bytes(buf).wrapping_add(1).to_le_bytes();
        if stream.write_all(&reply).is_err() {
            break;
        }
    }
    std::process::exit(0)
}

struct RawPeer {
    stream: tokio::net::UnixStream,
    child: std::process::Child,
}

impl RawPeer {
    fn start() -> RawPeer {
        let (ours, theirs) = StdStream::pair().unwrap();
        let fd = theirs.as_raw_fd();
        let mut command = std::process::Command::new("/proc/self/exe");
        command.env(PEER_ROLE, fd.to_string());
        // SAFETY: fcntl is async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                rustix::io::fcntl_setfd(
                    rustix::fd::BorrowedFd::borrow_raw(fd),
                    rustix::io::FdFlags::empty(),
                )?;
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        drop(theirs);
        ours.set_nonblocking(true).unwrap();
        RawPeer { stream: tokio::net::UnixStream::from_std(ours).unwrap(), child }
    }

    async fn ping(&mut self, x: u64) -> u64 {
        self.stream.write_all(&x.to_le_bytes()).await.unwrap();
        let mut buf = [0u8; 8];
        self.stream.read_exact(&mut buf).await.unwrap();
        u64::from_le_bytes(buf)
    }
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.50), at(0.99))
}

/// p50 and p99 of `n` sequential calls of each kind, interleaved in rounds so that noise on
/// the machine hits all three alike.
fn latency_table(n: usize) {
    let rt = runtime();
    rt.block_on(async {
        let mut raw = RawPeer::start();
        // Warm up: start the worker, fault in the code paths.
        for i in 0..2_000 {
            trivial(i).await.unwrap();
            trivial_bounded(i).await.unwrap();
            raw.ping(i).await;
            tokio::task::spawn_blocking(move || i + 1).await.unwrap();
        }
        let (mut off, mut bounded, mut sock, mut blocking) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..10 {
            for i in 0..(n / 10) as u64 {
                let x = round * 1_000_000 + i;
                let t = Instant::now();
                assert_eq!(trivial(x).await.unwrap(), x + 1);
                off.push(t.elapsed());
            }
            for i in 0..(n / 10) as u64 {
                let t = Instant::now();
                assert_eq!(trivial_bounded(i).await.unwrap(), i + 1);
                bounded.push(t.elapsed());
            }
            for i in 0..(n / 10) as u64 {
                let t = Instant::now();
                assert_eq!(raw.ping(i).await, i + 1);
                sock.push(t.elapsed());
            }
            for i in 0..(n / 10) as u64 {
                let t = Instant::now();
                assert_eq!(tokio::task::spawn_blocking(move || i.wrapping_add(1)).await.unwrap(), i + 1);
                blocking.push(t.elapsed());
            }
        }
        let (o50, o99) = percentiles(off);
        let (q50, q99) = percentiles(bounded);
        let (s50, s99) = percentiles(sock);
        let (b50, b99) = percentiles(blocking);
        println!("\nround trip of a trivial call, {n} samples each (current_thread runtime):");
        println!("  {:<16} {:>10} {:>10}", "", "p50", "p99");
        println!("  {:<16} {:>10.1?} {:>10.1?}", "offload", o50, o99);
        println!("  {:<16} {:>10.1?} {:>10.1?}", "offload queue=64", q50, q99);
        println!("  {:<16} {:>10.1?} {:>10.1?}", "raw socket", s50, s99);
        println!("  {:<16} {:>10.1?} {:>10.1?}", "spawn_blocking", b50, b99);
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
        println!(
            "  offload / raw socket: p50 {:.2}x, p99 {:.2}x (target: p50 at most 1.5x)",
            ratio(o50, s50),
            ratio(o99, s99)
        );
        println!("  offload / spawn_blocking: p50 {:.2}x, p99 {:.2}x", ratio(o50, b50), ratio(o99, b99));
        println!(
            "  bounded queue / unbounded: p50 {:.3}x, p99 {:.3}x (target: under 1.05x)\n",
            ratio(q50, o50),
            ratio(q99, o99)
        );
    });
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
    if let Some(fd) = std::env::var_os(PEER_ROLE) {
        echo_peer(fd.to_str().and_then(|s| s.parse().ok()).expect("fd"));
    }
    // `cargo test --benches` runs this binary with `--bench` absent: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    latency_table(if quick { 1_000 } else { 50_000 });
    if !quick {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
}
