//! Moving 64 MiB: a `Vec<u8>` of `SIZE` bytes passed by value to an offloaded function that
//! returns its length (one way), and to one that returns it back (both ways), the same with
//! shared memory, beside three baselines measured in the same run:
//! - `memcpy`: copying the 64 MiB into a buffer of this process that is already allocated and
//!   faulted in (`copy_from_slice`): the target is offload one way within 2x of it;
//! - `raw socket`: the bytes written from the caller's buffer to a child process over a Unix
//!   socket pair, which reads them into a buffer it reuses (allocated and faulted in once)
//!   and answers with the length: the transport's floor, without any allocation;
//! - `to_vec`: a copy of the 64 MiB into a fresh allocation whose pages are faulted in as
//!   they are written: what a copy into new memory costs, as the receiving side of any
//!   transfer must do.
//!
//! Each argument is made (cloned) before the clock starts; the returned vector is dropped
//! after it stops. Prints p50 and max of each over interleaved samples, the bandwidth, and the
//! ratios; then criterion's estimates.
//!
//! The same 64 MiB as an `offload::SharedBytes` (a memory file mapped in both processes; only
//! its descriptor crosses the socket): written in place by the caller, or copied in from an
//! existing `Vec` with `from_slice`; see [`SharedSamples`]. Its calls right after a 64 MiB
//! write have a baseline of their own: a 64-byte round trip with the raw peer right after the
//! same write.

mod common;

use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group};
use offload::SharedBytes;

use common::RawPeer;

/// 64 MiB.
const SIZE: usize = 64 << 20;
/// Target: one way within this many times the in-process memcpy.
const TARGET: f64 = 2.0;
/// Target: `SharedBytes::from_slice` of an existing vector plus the call within this many
/// times the memcpy.
const SHARED_TARGET: f64 = 1.5;

#[offload::offload(timeout = "60s", workers = "1")]
fn len_of(data: Vec<u8>) -> u64 {
    data.len() as u64
}

#[offload::offload(timeout = "60s", workers = "1")]
fn echo(data: Vec<u8>) -> Vec<u8> {
    data
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Bytes that are not all alike, so nothing can shortcut them.
fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i as u64).wrapping_mul(2_654_435_761) as u8).collect()
}

fn memcpy(dst: &mut [u8], src: &[u8]) -> Duration {
    let t = Instant::now();
    dst.copy_from_slice(src);
    std::hint::black_box(&mut *dst);
    t.elapsed()
}

fn fresh_copy(src: &[u8]) -> Duration {
    let t = Instant::now();
    let copy = std::hint::black_box(src.to_vec());
    let elapsed = t.elapsed();
    drop(copy);
    elapsed
}

fn raw(rt: &tokio::runtime::Runtime, peer: &mut RawPeer, src: &[u8]) -> Duration {
    let t = Instant::now();
    let len = rt.block_on(peer.send(src));
    let elapsed = t.elapsed();
    assert_eq!(len, src.len() as u64);
    elapsed
}

fn one_way(rt: &tokio::runtime::Runtime, src: &[u8]) -> Duration {
    let arg = src.to_vec();
    let t = Instant::now();
    let len = rt.block_on(len_of(arg)).unwrap();
    let elapsed = t.elapsed();
    assert_eq!(len, src.len() as u64);
    elapsed
}

fn both_ways(rt: &tokio::runtime::Runtime, src: &[u8]) -> Duration {
    let arg = src.to_vec();
    let t = Instant::now();
    let back = rt.block_on(echo(arg)).unwrap();
    let elapsed = t.elapsed();
    assert!(
        back.len() == src.len()
            && back[..4096] == src[..4096]
            && back[back.len() - 4096..] == src[src.len() - 4096..]
    );
    elapsed
}

/// The shared-memory rows, measured in the same rounds as the rest:
/// - `new`: `SharedBytes::new(size)`, zeroed, untouched;
/// - `write`: the caller writing the bytes into it in place (the first touch of its pages);
/// - `in place`: the call alone, with the buffer so written, to a function that returns its
///   length (only a descriptor crosses the socket: the target is a cost independent of the
///   size, like `tiny`, the same call with a 64-byte buffer);
/// - `from vec`: `SharedBytes::from_slice` of an existing `Vec` plus the same call (one copy:
///   the target is within 1.5x of the memcpy);
/// - `back`: a call that returns the buffer to the caller;
/// - `tiny after write`: the 64-byte call right after the caller wrote `size` bytes into
///   another buffer of its own, as `in place` comes right after the caller wrote the buffer
///   it passes: the same cold caches, without the size of the buffer passed;
/// - `plain after write`: a call with a `u64`, to a worker of its own, right after the same
///   write: what any call costs when the caller has just streamed through `size` bytes and
///   the worker has been idle meanwhile;
/// - `raw after write`: 64 bytes to the raw peer and its answer, right after the same write:
///   the floor for a round trip under those conditions (the peer idle as long as a worker).
#[derive(Default)]
struct SharedSamples {
    /// Where `tiny after write` writes; allocated and faulted in once.
    scratch: Vec<u8>,
    tiny_after_write: Vec<Duration>,
    plain_after_write: Vec<Duration>,
    raw_after_write: Vec<Duration>,
    new: Vec<Duration>,
    write: Vec<Duration>,
    in_place: Vec<Duration>,
    from_vec: Vec<Duration>,
    back: Vec<Duration>,
    tiny: Vec<Duration>,
}

#[offload::offload(timeout = "60s", workers = "1")]
fn shared_len(data: SharedBytes) -> u64 {
    data.len() as u64
}

#[offload::offload(timeout = "60s", workers = "1")]
fn add_one(x: u64) -> u64 {
    x + 1
}

#[offload::offload(timeout = "60s", workers = "1")]
fn shared_echo(data: SharedBytes) -> SharedBytes {
    data
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed())
}

impl SharedSamples {
    fn sample(&mut self, rt: &tokio::runtime::Runtime, peer: &mut RawPeer, src: &[u8]) {
        let (mut buf, new) = timed(|| SharedBytes::new(src.len()).unwrap());
        let ((), write) = timed(|| buf.copy_from_slice(src));
        let (len, in_place) = timed(|| rt.block_on(shared_len(buf)).unwrap());
        assert_eq!(len, src.len() as u64);

        let (len, from_vec) =
            timed(|| rt.block_on(shared_len(SharedBytes::from_slice(src).unwrap())).unwrap());
        assert_eq!(len, src.len() as u64);

        let buf = SharedBytes::from_slice(src).unwrap();
        let (buf, back) = timed(|| rt.block_on(shared_echo(buf)).unwrap());
        assert!(
            buf.len() == src.len()
                && buf[..4096] == src[..4096]
                && buf[buf.len() - 4096..] == src[src.len() - 4096..]
        );
        drop(buf);

        let small = SharedBytes::from_slice(&src[..64]).unwrap();
        let (len, tiny) = timed(|| rt.block_on(shared_len(small)).unwrap());
        assert_eq!(len, 64);

        let small = SharedBytes::from_slice(&src[..64]).unwrap();
        self.write_scratch(src);
        let (len, tiny_after_write) = timed(|| rt.block_on(shared_len(small)).unwrap());
        assert_eq!(len, 64);
        self.tiny_after_write.push(tiny_after_write);

        self.write_scratch(src);
        let (plus_one, plain_after_write) = timed(|| rt.block_on(add_one(41)).unwrap());
        assert_eq!(plus_one, 42);
        self.plain_after_write.push(plain_after_write);

        self.write_scratch(src);
        let (len, raw_after_write) = timed(|| rt.block_on(peer.send(&src[..64])));
        assert_eq!(len, 64);
        self.raw_after_write.push(raw_after_write);

        self.new.push(new);
        self.write.push(write);
        self.in_place.push(in_place);
        self.from_vec.push(from_vec);
        self.back.push(back);
        self.tiny.push(tiny);
    }

    /// Writes `src` into the scratch buffer, as a caller writing its data would.
    fn write_scratch(&mut self, src: &[u8]) {
        if self.scratch.len() != src.len() {
            self.scratch = src.to_vec();
        }
        self.scratch.copy_from_slice(src);
        std::hint::black_box(&mut self.scratch);
    }
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort_unstable();
    (samples[samples.len() / 2], samples[samples.len() - 1])
}

fn transfer_table(size: usize, samples: usize) {
    let rt = runtime();
    let src = payload(size);
    let mut dst = vec![0u8; size];
    dst.copy_from_slice(&src); // fault the destination in
    // Warm up: start the workers, let both processes grow their buffers once.
    let mut peer = rt.block_on(async { RawPeer::start() });
    rt.block_on(offload::warm_up()).unwrap();
    raw(&rt, &mut peer, &src);
    one_way(&rt, &src);
    both_ways(&rt, &src);
    SharedSamples::default().sample(&rt, &mut peer, &src);

    let (mut copy, mut sock, mut alloc, mut one, mut both) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut shared = SharedSamples::default();
    for _ in 0..samples {
        copy.push(memcpy(&mut dst, &src));
        sock.push(raw(&rt, &mut peer, &src));
        alloc.push(fresh_copy(&src));
        one.push(one_way(&rt, &src));
        both.push(both_ways(&rt, &src));
        shared.sample(&rt, &mut peer, &src);
    }
    let rows = [
        ("memcpy (in process, faulted in)", percentiles(copy)),
        ("raw socket into a reused buffer", percentiles(sock)),
        ("to_vec, a fresh Vec (in process)", percentiles(alloc)),
        ("Vec<u8>: call, returns its length", percentiles(one)),
        ("Vec<u8>: call, returns it back", percentiles(both)),
        ("SharedBytes::new, zeroed", percentiles(shared.new)),
        ("SharedBytes: caller writes in place", percentiles(shared.write)),
        ("SharedBytes: call, returns length", percentiles(shared.in_place)),
        ("SharedBytes: from_slice(Vec) + call", percentiles(shared.from_vec)),
        ("SharedBytes: call, returns it back", percentiles(shared.back)),
        ("SharedBytes of 64 B: call", percentiles(shared.tiny)),
        ("SharedBytes of 64 B: call after a write", percentiles(shared.tiny_after_write)),
        ("u64: call after a write", percentiles(shared.plain_after_write)),
        ("raw socket, 64 B after a write", percentiles(shared.raw_after_write)),
    ];
    // The rows from here on are single round trips: no bandwidth.
    let round_trips = 10;
    let mib = size as f64 / (1 << 20) as f64;
    println!("\ntransfer of {mib} MiB by value, {samples} samples each (current_thread runtime):");
    println!("  {:<38} {:>10} {:>10} {:>12}", "", "p50", "max", "MiB/s (p50)");
    for (name, (p50, max)) in &rows[..round_trips] {
        println!("  {:<38} {:>10.2?} {:>10.2?} {:>12.0}", name, p50, max, mib / p50.as_secs_f64());
    }
    for (name, (p50, max)) in &rows[round_trips..] {
        println!("  {:<38} {:>10.2?} {:>10.2?}", name, p50, max);
    }
    let p50 = |k: usize| rows[k].1.0.as_secs_f64();
    println!(
        "  one way / memcpy: {:.2}x (target: at most {TARGET}x); one way / raw socket: {:.2}x; \
         one way / to_vec: {:.2}x",
        p50(3) / p50(0),
        p50(3) / p50(1),
        p50(3) / p50(2)
    );
    println!("  raw socket / memcpy: {:.2}x; to_vec / memcpy: {:.2}x", p50(1) / p50(0), p50(2) / p50(0));
    println!("  both ways / memcpy: {:.2}x; both ways / one way: {:.2}x", p50(4) / p50(0), p50(4) / p50(3));
    println!(
        "  shared, written in place: call / memcpy {:.3}x; call of {mib} MiB / call of 64 B {:.2}x, \
         / call of 64 B after a write of {mib} MiB {:.2}x (target: independent of the size)",
        p50(7) / p50(0),
        p50(7) / p50(10),
        p50(7) / p50(11)
    );
    println!(
        "  right after a write of {mib} MiB: shared call of {mib} MiB / raw round trip {:.2}x, \
         of 64 B / raw {:.2}x, u64 call / raw {:.2}x (target: the shared call under 100 µs, \
         raw: {:.0} µs)",
        p50(7) / p50(13),
        p50(11) / p50(13),
        p50(12) / p50(13),
        p50(13) * 1e6
    );
    println!(
        "  shared, from an existing Vec: (from_slice + call) / memcpy {:.2}x (target: at most {SHARED_TARGET}x); \
         Vec<u8> call / it {:.1}x",
        p50(8) / p50(0),
        p50(3) / p50(8)
    );
    println!(
        "  shared, returns it back: call / memcpy {:.3}x; Vec<u8> both ways / it {:.0}x\n",
        p50(9) / p50(0),
        p50(4) / p50(9)
    );
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let src = payload(SIZE);
    let mut dst = vec![0u8; SIZE];
    let mut group = c.benchmark_group("transfer_64MiB");
    group.throughput(Throughput::Bytes(SIZE as u64));
    // Flat sampling: the same few iterations per sample, not 1 + 2 + ... + 10 of them.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    group.bench_function("memcpy", |b| b.iter(|| dst.copy_from_slice(std::hint::black_box(&src))));
    group.bench_function("offload_one_way", |b| {
        b.iter_batched(|| src.clone(), |arg| rt.block_on(len_of(arg)).unwrap(), BatchSize::PerIteration)
    });
    group.bench_function("offload_both_ways", |b| {
        b.iter_batched(|| src.clone(), |arg| rt.block_on(echo(arg)).unwrap(), BatchSize::PerIteration)
    });
    group.bench_function("shared_from_vec_one_way", |b| {
        b.iter(|| rt.block_on(shared_len(SharedBytes::from_slice(&src).unwrap())).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);

fn main() {
    if let Some(fd) = common::peer_fd() {
        common::sink_peer(fd);
    }
    // `cargo test --benches` runs this binary with `--bench` absent: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    if quick {
        transfer_table(4 << 20, 3);
    } else {
        transfer_table(SIZE, 15);
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
}
