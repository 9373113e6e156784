//! The same offloaded function served by two worker hosts through a NATS broker.
//!
//! `cargo run --release --features nats --example cluster`
//!
//! This starts a `nats-server` on a free loopback port (it must be on `PATH`, or installed by
//! Debian's package: `apt-get install nats-server`), two worker hosts that are this program
//! started with `OFFLOAD_SERVE`, and sends a CPU-heavy batch to them with `OFFLOAD_REMOTE`.
//! On real machines it is three commands:
//!
//! ```text
//! broker$ nats-server
//! worker$ OFFLOAD_SERVE=nats://broker:4222 ./cluster      # on each worker host
//! caller$ OFFLOAD_REMOTE=nats://broker:4222 ./cluster
//! ```

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How many steps the Collatz sequences of `from..from + count` take, in all, and which
/// host counted them.
#[offload::offload(timeout = "5m", workers = "cpus")]
fn collatz_block(from: u64, count: u64) -> (u64, String) {
    let mut total = 0;
    for mut n in from..from + count {
        while n > 1 {
            n = if n.is_multiple_of(2) { n / 2 } else { 3 * n + 1 };
            total += 1;
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host_pid = std::os::unix::process::parent_id();
    (total, format!("{} (pid {host_pid})", host.trim()))
}

fn main() {
    if let Ok(url) = std::env::var("OFFLOAD_REMOTE") {
        // A caller on a real network: the hosts are already there.
        println!("sending calls to the hosts at {url}");
        return run_batch();
    }
    let Some(server) = nats_server() else {
        eprintln!("this example needs nats-server on PATH: apt-get install nats-server (or see nats.io)");
        std::process::exit(2);
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("nats://127.0.0.1:{port}");
    let mut broker = Command::new(server)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nats-server");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "nats-server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("broker: nats-server at {url}");
    let hosts: Vec<Child> = (0..2).map(|_| start_host(&url)).collect();

    // SAFETY: no other thread runs yet in this process (the offload runtime starts its
    // threads at the first call), so nothing reads the environment meanwhile.
    unsafe { std::env::set_var("OFFLOAD_REMOTE", &url) };
    run_batch();

    for mut host in hosts {
        // SIGTERM: the host finishes what it runs, and exits.
        let _ = Command::new("kill").args(["-TERM", &host.id().to_string()]).status();
        let _ = host.wait();
    }
    let _ = broker.kill();
    let _ = broker.wait();
}

fn run_batch() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (blocks, size) = (64u64, 200_000u64);
        let started = Instant::now();
        let mut per_host: BTreeMap<String, (u32, u64)> = BTreeMap::new();
        let mut results =
            offload::map(move |i: u64| collatz_block(i * size + 1, size), 0..blocks).batch_size(1);
        while let Some(result) = results.next().await {
            let (steps, host) = result.expect("a block");
            let entry = per_host.entry(host).or_default();
            entry.0 += 1;
            entry.1 += steps;
        }
        let took = started.elapsed();
        for (host, (calls, steps)) in &per_host {
            println!("{host}: {calls} calls, {steps} steps");
        }
        println!("{blocks} calls of {size} numbers in {took:.2?}");
        for pool in offload::stats() {
            for host in pool.hosts {
                println!("{}: {} calls sent to {}", pool.name, host.calls, host.name);
            }
        }
    });
}

/// This program, serving calls.
fn start_host(url: &str) -> Child {
    let mut host = Command::new(std::env::current_exe().unwrap())
        .env("OFFLOAD_SERVE", url)
        .env("OFFLOAD_WORKERS", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a host");
    let stderr = host.stderr.take().unwrap();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            println!("host: {line}");
            if line.starts_with("offload: serving") {
                let _ = ready_tx.send(());
            }
        }
    });
    ready.recv_timeout(Duration::from_secs(30)).expect("the host did not start serving");
    host
}

fn nats_server() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
}
