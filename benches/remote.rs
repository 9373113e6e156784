//! Remote hosts through a NATS broker (the `nats` feature), beside baselines measured in the
//! same run, against a loopback `nats-server` this starts (from `PATH`, or Debian's package):
//! - round trip: one call at a time of a function that returns its 64-byte argument, served
//!   by a host of one worker, against a raw `async-nats` request-reply of the same 64 bytes
//!   to a responder process; the median of each over interleaved rounds, and the ratio; with
//!   the host's workers polling for their next call 50 µs (a local pool's default) and 1 ms
//!   (a host's default);
//! - a CPU-bound batch (calls of about 20 ms of arithmetic each) on one host of one worker,
//!   then on two such hosts: the speed-up (2.0x would be linear).
//!
//! `cargo bench --features nats --bench remote`

mod common;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 7;
const CALLS_PER_ROUND: usize = 1_000;
const BATCH: u64 = 64;
/// Targets from the issue.
const TARGET_RATIO: f64 = 1.3;
const TARGET_SPEEDUP: f64 = 1.8;

#[offload::offload(timeout = "30s")]
fn echo(bytes: Vec<u8>) -> Vec<u8> {
    bytes
}

#[offload::offload(timeout = "60s")]
fn crunch(seed: u64, iters: u64) -> u64 {
    common::crunch(seed, iters)
}

fn main() {
    if let Ok(url) = std::env::var("BENCH_RAW_RESPONDER") {
        return responder(&url);
    }
    // cargo bench passes `--bench`; nothing else is taken.
    let server = ["/usr/sbin", "/usr/bin"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()))
        .map(|dir| dir.join("nats-server"))
        .find(|path| path.is_file())
        .expect("this benchmark needs nats-server: apt-get install nats-server");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("nats://127.0.0.1:{port}");
    let mut broker = Command::new(server)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: no other thread runs yet in this process.
    unsafe { std::env::set_var("OFFLOAD_REMOTE", &url) };
    let mut children = vec![start_responder(&url)];

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(&url).await.unwrap();
        // A host whose worker polls for its next call for 50 µs after each answer (a local
        // pool's default), then sleeps; then one whose worker polls for 1 ms (a host's
        // default), longer than a round trip through the broker.
        for spin in ["50", "1000"] {
            let mut host = start_host(&url, spin);
            let (remote, raw) = round_trips(&client).await;
            let ratio = remote / raw;
            println!(
                "round trip p50, host workers polling {spin} µs: remote call {remote:.0} µs, raw async-nats request \
                 {raw:.0} µs: {ratio:.2}x (target at most {TARGET_RATIO}x) {}",
                if ratio <= TARGET_RATIO { "ok" } else { "MISSED" }
            );
            let _ = host.kill();
            let _ = host.wait();
        }
        children.push(start_host(&url, "1000"));

        let iters = common::calibrate(Duration::from_millis(20));
        let one = batch(iters).await;
        children.push(start_host(&url, "1000"));
        let both = offload::stats().iter().any(|pool| pool.name.ends_with("crunch") && pool.hosts.len() == 2);
        let until = Instant::now() + Duration::from_secs(5);
        let mut seen = both;
        while !seen && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
            crunch(1, 1).await.unwrap();
            seen = offload::stats().iter().any(|pool| pool.name.ends_with("crunch") && pool.hosts.len() == 2);
        }
        assert!(seen, "the second host was not seen");
        let two = batch(iters).await;
        let speedup = one.as_secs_f64() / two.as_secs_f64();
        println!(
            "CPU-bound batch of {BATCH} calls of 20 ms: one host {one:.2?}, two hosts {two:.2?}: {speedup:.2}x (target \
             at least {TARGET_SPEEDUP}x) {}",
            if speedup >= TARGET_SPEEDUP { "ok" } else { "MISSED" }
        );
        println!("load average: {}", common::load_average());
    });
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = broker.kill();
    let _ = broker.wait();
}

/// The median of interleaved rounds of one call at a time: remote, then raw.
async fn round_trips(client: &async_nats::Client) -> (f64, f64) {
    let payload = vec![7u8; 64];
    // Warm up both paths (and let the caller find the host).
    for _ in 0..200 {
        assert_eq!(echo(payload.clone()).await.unwrap(), payload);
        raw_request(client, &payload).await;
    }
    let (mut remote, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let mut times = Vec::with_capacity(CALLS_PER_ROUND);
        for _ in 0..CALLS_PER_ROUND {
            let started = Instant::now();
            let back = echo(payload.clone()).await.unwrap();
            times.push(started.elapsed().as_secs_f64() * 1e6);
            assert_eq!(back.len(), 64);
        }
        remote.push(common::median(times));
        let mut times = Vec::with_capacity(CALLS_PER_ROUND);
        for _ in 0..CALLS_PER_ROUND {
            let started = Instant::now();
            raw_request(client, &payload).await;
            times.push(started.elapsed().as_secs_f64() * 1e6);
        }
        raw.push(common::median(times));
    }
    (common::median(remote), common::median(raw))
}

async fn batch(iters: u64) -> Duration {
    let started = Instant::now();
    let mut results = offload::map(move |seed| crunch(seed, iters), 0..BATCH).batch_size(1);
    while let Some(result) = results.next().await {
        result.unwrap();
    }
    started.elapsed()
}

async fn raw_request(client: &async_nats::Client, payload: &[u8]) {
    let reply = client.request("bench.echo", bytes::Bytes::copy_from_slice(payload)).await.unwrap();
    assert_eq!(reply.payload.len(), payload.len());
}

/// The raw baseline's other end: echoes each request.
fn responder(url: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        use futures_core::Stream;
        let client = async_nats::connect(url).await.unwrap();
        let mut requests = client.subscribe("bench.echo").await.unwrap();
        client.flush().await.unwrap();
        println!("ready");
        while let Some(message) =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut requests).poll_next(cx)).await
        {
            if let Some(reply) = message.reply {
                client.publish(reply, message.payload).await.unwrap();
            }
        }
    });
}

fn start_responder(url: &str) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("BENCH_RAW_RESPONDER", url)
        .env_remove("OFFLOAD_REMOTE")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    child
}

/// This benchmark serving calls with one worker per pool, which polls for `spin` µs.
fn start_host(url: &str, spin: &str) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("OFFLOAD_SERVE", url)
        .env("OFFLOAD_WORKERS", "1")
        .env("OFFLOAD_SPIN_US", spin)
        .env_remove("OFFLOAD_REMOTE")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("offload: serving") {
                let _ = ready_tx.send(());
            }
        }
    });
    ready.recv_timeout(Duration::from_secs(30)).expect("the host did not start");
    child
}
