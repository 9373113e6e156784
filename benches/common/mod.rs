//! What several benches share: a raw peer process for socket baselines, and calibrated CPU
//! work. Each bench uses a part of it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream as StdStream;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Set in a raw peer's environment: the number of its end of the socket.
pub const PEER_ROLE: &str = "OFFLOAD_BENCH_PEER_FD";

/// If this process is a raw peer, its socket's descriptor.
pub fn peer_fd() -> Option<i32> {
    std::env::var(PEER_ROLE).ok().and_then(|s| s.parse().ok())
}

/// The echo peer: answers each 8-byte message with the number plus one, until EOF.
pub fn echo_peer(fd: i32) -> ! {
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

/// The sink peer: reads a length and that many bytes into a buffer it keeps, answers with
/// the length, until EOF.
pub fn sink_peer(fd: i32) -> ! {
    // SAFETY: the parent passed us this descriptor and nothing else owns it.
    let mut stream = unsafe { StdStream::from_raw_fd(fd) };
    let mut buf = Vec::new();
    let mut len = [0u8; 8];
    while stream.read_exact(&mut len).is_ok() {
        let n = u64::from_le_bytes(len) as usize;
        // Grown only: a small message between large ones must not make the next large one
        // zero the buffer again.
        if buf.len() < n {
            buf.resize(n, 0);
        }
        if stream.read_exact(&mut buf[..n]).is_err() || stream.write_all(&len).is_err() {
            break;
        }
    }
    std::process::exit(0)
}

/// A child process of this binary talking over a socket pair with blocking reads and
/// writes, as a worker does: the floor for any process pool.
pub struct RawPeer {
    pub stream: tokio::net::UnixStream,
    child: std::process::Child,
}

impl RawPeer {
    pub fn start() -> RawPeer {
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

    /// The peer process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One round trip with an echo peer.
    pub async fn ping(&mut self, x: u64) -> u64 {
        self.stream.write_all(&x.to_le_bytes()).await.unwrap();
        let mut buf = [0u8; 8];
        self.stream.read_exact(&mut buf).await.unwrap();
        u64::from_le_bytes(buf)
    }

    /// Sends `data` to a sink peer and waits for its length to come back.
    pub async fn send(&mut self, data: &[u8]) -> u64 {
        self.stream.write_all(&(data.len() as u64).to_le_bytes()).await.unwrap();
        self.stream.write_all(data).await.unwrap();
        let mut len = [0u8; 8];
        self.stream.read_exact(&mut len).await.unwrap();
        u64::from_le_bytes(len)
    }
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic CPU work: `iters` dependent multiply-adds (no memory, no syscalls), so the
/// same argument costs the same wherever it runs.
pub fn crunch(seed: u64, iters: u64) -> u64 {
    let mut x = seed;
    for _ in 0..iters {
        x = std::hint::black_box(
            x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407),
        );
    }
    x
}

/// Iterations of [`crunch`] that take `time` on this machine: the fastest of several tries,
/// so that a busy moment does not inflate it.
pub fn calibrate(time: Duration) -> u64 {
    let probe = 1_000_000;
    let best = (0..10)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(crunch(1, probe));
            t.elapsed()
        })
        .min()
        .unwrap();
    (probe as f64 * time.as_secs_f64() / best.as_secs_f64()) as u64
}

pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The pids of this process's children: its workers and raw peers.
pub fn children() -> Vec<u32> {
    let me = std::process::id();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        if rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(me) {
            pids.push(pid);
        }
    }
    pids
}

/// Pins the process `pid` (its main thread), or the calling thread for `None`, to `cpu`, or
/// lets it run anywhere for `cpu = None`.
pub fn pin(pid: Option<u32>, cpu: Option<usize>) {
    let mut set = rustix::thread::CpuSet::new();
    match cpu {
        Some(cpu) => set.set(cpu),
        None => (0..std::thread::available_parallelism().map_or(1, |n| n.get())).for_each(|c| set.set(c)),
    }
    let pid = pid.map(|p| rustix::process::Pid::from_raw(p as i32).expect("a pid"));
    rustix::thread::sched_setaffinity(pid, &set).expect("sched_setaffinity");
}

/// [`pin`] for every thread of this process.
pub fn pin_all_threads(cpu: Option<usize>) {
    for entry in std::fs::read_dir("/proc/self/task").expect("/proc/self/task").flatten() {
        if let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
            // A thread may have ended since the listing.
            let mut set = rustix::thread::CpuSet::new();
            match cpu {
                Some(cpu) => set.set(cpu),
                None => {
                    (0..std::thread::available_parallelism().map_or(1, |n| n.get())).for_each(|c| set.set(c))
                }
            }
            let _ = rustix::thread::sched_setaffinity(rustix::process::Pid::from_raw(tid as i32), &set);
        }
    }
}

/// `calls` ping-pongs with echo peers, `in_flight / peers` messages in flight on each peer's
/// socket at once (written as one batch, then read back): what the socket carries when
/// messages are pipelined, not sent one at a time.
pub async fn raw_pipelined(peers: &mut [RawPeer], in_flight: usize, calls: u64) -> Duration {
    let batch = in_flight / peers.len();
    let rounds = calls / (batch * peers.len()) as u64;
    let start = Instant::now();
    let mut runs = Vec::new();
    for peer in peers.iter_mut() {
        runs.push(async move {
            let mut out = vec![0u8; batch * 8];
            let mut back = vec![0u8; batch * 8];
            for round in 0..rounds {
                for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
                    chunk.copy_from_slice(&(round * batch as u64 + i as u64).to_le_bytes());
                }
                peer.stream.write_all(&out).await.unwrap();
                peer.stream.read_exact(&mut back).await.unwrap();
                let last = u64::from_le_bytes(back[back.len() - 8..].try_into().unwrap());
                assert_eq!(last, round * batch as u64 + batch as u64);
            }
        });
    }
    join_all(runs).await;
    start.elapsed()
}

/// Polls the futures concurrently on the current task (the peers are borrowed, so they
/// cannot go to `tokio::spawn`).
pub async fn join_all<F: Future<Output = ()>>(futures: Vec<F>) {
    let mut futures: Vec<_> = futures.into_iter().map(|f| Some(Box::pin(f))).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for slot in futures.iter_mut() {
            if let Some(f) = slot {
                if f.as_mut().poll(cx).is_ready() {
                    *slot = None;
                } else {
                    pending = true;
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await
}

/// `calls` calls of `call` (with 0, 1, 2, ...) from `in_flight` tasks that each take the next
/// number until none is left, each checked to return its number plus one; returns the
/// elapsed time.
pub async fn concurrent_calls<F, Fut>(calls: u64, in_flight: usize, call: F) -> Duration
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = u64> + Send,
{
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..in_flight)
        .map(|_| {
            let (next, call) = (std::sync::Arc::clone(&next), call.clone());
            tokio::spawn(async move {
                loop {
                    let x = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if x >= calls {
                        break;
                    }
                    assert_eq!(call(x).await, x + 1);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    start.elapsed()
}

/// The middle of `values` (the upper one of the two middles for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Per second, `count` in `elapsed`.
pub fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}
