//! Calls served by other hosts through a NATS broker (the `nats` feature), against a real
//! `nats-server` on a free loopback port and hosts that are this test binary in serve mode.
//!
//! Each test runs again in a process of its own (the harness runs this binary filtered to
//! it, with `OFFLOAD_REMOTE` set from the start): the variable is read by every pool of the
//! process, and setting it in a running test binary would race the other tests. That
//! process starts the broker and the hosts, as children that die with it.

#[path = "support/capture.rs"]
mod capture;
mod support;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use offload::{Error, ExitReason, offload};

#[offload(timeout = "20s")]
fn square(x: u64) -> u64 {
    x * x
}

/// The pid of the host that ran the call: its worker's parent.
fn my_host() -> u32 {
    rustix::process::getppid().map_or(0, |pid| pid.as_raw_nonzero().get() as u32)
}

/// Takes `ms`, then names the host.
#[offload(timeout = "20s")]
fn nap(ms: u64) -> u32 {
    std::thread::sleep(Duration::from_millis(ms));
    my_host()
}

#[offload(timeout = "20s")]
fn fails(message: String) -> u64 {
    panic!("{message}")
}

#[offload(timeout = "20s")]
fn echo(bytes: Vec<u8>) -> Vec<u8> {
    bytes
}

/// Safe to repeat: runs again on another host if its host dies.
#[offload(timeout = "30s", retries = 3)]
fn work(x: u64, ms: u64) -> (u64, u32) {
    std::thread::sleep(Duration::from_millis(ms));
    (x, my_host())
}

/// Not marked safe to repeat.
#[offload(timeout = "30s")]
fn work_once(x: u64, ms: u64) -> (u64, u32) {
    std::thread::sleep(Duration::from_millis(ms));
    (x, my_host())
}

/// Writes its worker's pid to `path`, then hangs.
#[offload(timeout = "30s")]
fn hang(path: String) -> u32 {
    std::fs::write(&path, std::process::id().to_string()).unwrap();
    std::thread::sleep(Duration::from_secs(600));
    0
}

#[offload(timeout = "10s", overload = "reject")]
fn refuses_to_wait(x: u64) -> u64 {
    x
}

/// Streams `n` numbers, reporting progress as it goes.
#[offload(timeout = "20s")]
fn counts(n: u64) -> impl Iterator<Item = u64> {
    (1..=n).inspect(move |i| {
        std::thread::sleep(Duration::from_millis(1));
        offload::progress_message(*i, n, || format!("at {i}"));
    })
}

#[offload(timeout = "20s")]
fn chatty(n: u32) -> u32 {
    tracing::info!(n, "working on it");
    tracing::warn!("almost done");
    std::process::id()
}

/// Leaves a mark at `path`, takes `ms`, and names its host.
#[offload(timeout = "20s")]
fn marked_nap(path: String, ms: u64) -> u32 {
    std::fs::write(path, b"ran").unwrap();
    std::thread::sleep(Duration::from_millis(ms));
    my_host()
}

/// Leaves a mark at `path`.
#[offload(timeout = "20s")]
fn mark(path: String) -> bool {
    std::fs::write(path, b"ran").is_ok()
}

/// Streams 2 MiB items without end.
#[offload(timeout = "20s")]
fn big_items() -> impl Iterator<Item = Vec<u8>> {
    std::iter::repeat_with(|| vec![1u8; 2 << 20])
}

#[offload(timeout = "20s")]
fn shared_len(bytes: offload::SharedBytes) -> usize {
    bytes.len()
}

// ---- The broker, the hosts, and the process each test runs in. ----

/// Where `nats-server` is: on `PATH`, or where Debian's package puts it.
fn nats_server() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .expect("these tests need nats-server: apt-get install -y nats-server")
}

/// Makes `command`'s process die with the thread that starts it (the test's).
fn dies_with_us(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec this only calls prctl, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A free loopback port below Linux's range for outgoing connections (from 32768), so that
/// no client connection takes it while its broker is down for a restart.
fn free_port() -> u16 {
    // Tests run at once in this process, and a port found free is not taken until the test's
    // broker listens on it: each port is offered once, so two tests never pick the same.
    static OFFERED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut offered = OFFERED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let port = (0..1_000u32)
        .map(|i| 20_000 + ((seed ^ std::process::id()).wrapping_add(i.wrapping_mul(7_919)) % 12_000) as u16)
        .find(|&port| !offered.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port between 20000 and 32000");
    offered.push(port);
    port
}

struct Broker {
    port: u16,
    child: Option<Child>,
}

impl Broker {
    fn start(port: u16) -> Broker {
        let mut broker = Broker { port, child: None };
        broker.restart();
        broker
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let child = dies_with_us(
            Command::new(nats_server())
                .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .spawn()
        .expect("start nats-server");
        self.child = Some(child);
        let up = support::eventually(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
        assert!(up, "nats-server did not listen on port {}", self.port);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// This test binary serving calls.
struct Host {
    child: Child,
    pid: u32,
    /// Its stderr lines so far.
    lines: Arc<Mutex<Vec<String>>>,
}

impl Host {
    /// Starts a host with one worker per pool (and `env`), and waits until it serves.
    fn start(broker: &Broker, env: &[(&str, &str)]) -> Host {
        Host::start_binary(std::env::current_exe().unwrap(), &broker.url(), env)
    }

    fn start_binary(exe: PathBuf, url: &str, env: &[(&str, &str)]) -> Host {
        let mut command = Command::new(exe);
        command
            .env("OFFLOAD_SERVE", url)
            .env("OFFLOAD_WORKERS", "1")
            .env_remove("OFFLOAD_REMOTE")
            .env_remove("OFFLOAD_TEST_INNER")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command.envs(env.iter().copied());
        let mut child = dies_with_us(&mut command).spawn().expect("start a host");
        let pid = child.id();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let seen = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[host {pid}] {line}");
                if line.starts_with("offload: serving") {
                    let _ = ready_tx.send(());
                }
                seen.lock().unwrap().push(line);
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(30)).expect("the host did not start serving");
        Host { child, pid, lines }
    }

    fn kill9(&mut self) {
        support::kill9(self.pid);
        let _ = self.child.wait();
    }

    fn sigterm(&self) {
        let pid = rustix::process::Pid::from_raw(self.pid as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    }

    /// Waits up to `limit` for the host to exit.
    fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        support::eventually(limit, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }

    fn said(&self, text: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|line| line.contains(text))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// In the process a test runs in: its broker, started. In the harness: `None`, after running
/// the test in a process of its own (calls to remote hosts, on a free port) within `limit`.
fn own_process(test: &str, limit: Duration) -> Option<Broker> {
    if std::env::var("OFFLOAD_TEST_INNER").as_deref() == Ok(test) {
        return Some(Broker::start(std::env::var("OFFLOAD_TEST_PORT").unwrap().parse().unwrap()));
    }
    let port = free_port();
    let mut child = dies_with_us(
        Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env("OFFLOAD_TEST_INNER", test)
            .env("OFFLOAD_TEST_PORT", port.to_string())
            .env("OFFLOAD_REMOTE", format!("nats://127.0.0.1:{port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .spawn()
    .unwrap();
    let read = |mut from: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = from.read_to_string(&mut text);
            text
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    let mut status = None;
    let ended = support::eventually(limit, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if !ended {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert!(ended, "`{test}` ran past {limit:?}\n{stdout}\n{stderr}");
    assert!(
        status.unwrap().success() && stdout.contains("1 passed"),
        "`{test}` failed in its own process\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    None
}

/// Starts `calls` calls of `nap(ms)`, and waits until hosts hold `held` of them.
async fn naps_holding(calls: usize, ms: u64, held: usize) -> tokio::task::JoinSet<Result<u32, Error>> {
    let mut naps = tokio::task::JoinSet::new();
    for _ in 0..calls {
        naps.spawn(nap(ms));
    }
    let holding = support::eventually_async(Duration::from_secs(10), || {
        offload::stats().iter().any(|pool| pool.name.ends_with("nap") && pool.busy == held)
    })
    .await;
    assert!(holding, "hosts never held {held} calls: {:?}", offload::stats());
    naps
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

// ---- The tests. ----

#[test]
fn calls_run_on_other_hosts() {
    let Some(broker) = own_process("calls_run_on_other_hosts", Duration::from_secs(120)) else { return };
    let hosts = [Host::start(&broker, &[]), Host::start(&broker, &[])];
    block_on(async {
        let mut calls = tokio::task::JoinSet::new();
        for x in 0..400u64 {
            calls.spawn(async move { (x, square(x).await) });
        }
        while let Some(joined) = calls.join_next().await {
            let (x, result) = joined.unwrap();
            assert_eq!(result.unwrap(), x * x);
        }
        // Both hosts take calls.
        let mut naps = tokio::task::JoinSet::new();
        for _ in 0..8 {
            naps.spawn(nap(100));
        }
        let mut seen = std::collections::HashSet::new();
        while let Some(joined) = naps.join_next().await {
            seen.insert(joined.unwrap().unwrap());
        }
        let pids: std::collections::HashSet<u32> = hosts.iter().map(|h| h.pid).collect();
        assert_eq!(seen, pids);

        // A panic on the host is the caller's `Panicked`, with its message and location.
        match fails("no good".into()).await {
            Err(Error::Panicked { message, location, pid, .. }) => {
                assert_eq!(message, "no good");
                assert!(location.is_some_and(|l| l.contains("remote.rs")));
                assert!(pid > 0);
            }
            other => panic!("{other:?}"),
        }
        // Byte vectors large enough to travel as bulk frames come back whole.
        let bytes: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        assert_eq!(echo(bytes.clone()).await.unwrap(), bytes);
        // The broker's message limit (1 MiB by default) is the limit, and the error says so.
        match echo(vec![7; 2 << 20]).await {
            Err(Error::PayloadTooLarge { max, len, .. }) => {
                assert_eq!(max, 1 << 20);
                assert!(len > 2 << 20);
            }
            other => panic!("{other:?}"),
        }

        // A stream's items, and progress reports, come back as they are made.
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = {
            let seen = Arc::clone(&seen);
            move |progress: offload::Progress| seen.lock().unwrap().push(progress.done)
        };
        let items = offload::with_progress(record, async {
            let mut stream = counts(200);
            let mut items = Vec::new();
            while let Some(item) = stream.next().await {
                items.push(item.unwrap());
            }
            items
        })
        .await;
        assert_eq!(items, (1..=200).collect::<Vec<u64>>());
        let seen = seen.lock().unwrap().clone();
        assert!(!seen.is_empty() && seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        assert_eq!(seen.last(), Some(&200));
        // A streamed item over the broker's limit ends the stream with that error, at once.
        let started = Instant::now();
        let mut stream = big_items();
        match stream.next().await {
            Some(Err(Error::PayloadTooLarge { max, .. })) => assert_eq!(max, 1 << 20),
            other => panic!("{:?}", other.map(|item| item.map(|bytes| bytes.len()))),
        }
        assert!(stream.next().await.is_none());
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        // Shared memory does not cross hosts, and the error says so.
        match shared_len(offload::SharedBytes::from_slice(b"abc").unwrap()).await {
            Err(Error::Config { message, .. }) => {
                assert!(message.contains("cannot go to another host"), "{message}")
            }
            other => panic!("{other:?}"),
        }

        // The pool's figures count the remote calls, and list the hosts.
        let stats = offload::stats();
        let pool = stats.iter().find(|pool| pool.name.ends_with("square")).unwrap();
        assert_eq!(pool.succeeded, 400);
        assert_eq!(pool.hosts.len(), 2, "{:?}", pool.hosts);
        assert!(pool.hosts.iter().all(|host| host.slots == 2 && host.running == 0), "{:?}", pool.hosts);
        assert_eq!(pool.hosts.iter().map(|host| host.calls).sum::<u64>(), 400);
        assert_eq!(pool.workers, 4);
    });
}

#[test]
fn a_host_holds_no_more_than_its_slots() {
    let Some(broker) = own_process("a_host_holds_no_more_than_its_slots", Duration::from_secs(120)) else {
        return;
    };
    let first = Host::start(&broker, &[]);
    let second = Host::start(&broker, &[]);
    block_on(async {
        // Two hosts of one worker and one call at hand each: eight calls of 400 ms split
        // evenly, as each host frees a slot.
        let mut naps = tokio::task::JoinSet::new();
        for _ in 0..8 {
            naps.spawn(nap(400));
        }
        let mut per_host = std::collections::HashMap::<u32, usize>::new();
        while let Some(joined) = naps.join_next().await {
            *per_host.entry(joined.unwrap().unwrap()).or_default() += 1;
        }
        assert_eq!(per_host.get(&first.pid), Some(&4), "{per_host:?}");
        assert_eq!(per_host.get(&second.pid), Some(&4), "{per_host:?}");
        // Sent once each: the caller sent only where there was room, and no host had to turn
        // a call away.
        let stats = offload::stats();
        let pool = stats.iter().find(|pool| pool.name.ends_with("nap")).unwrap();
        assert_eq!(pool.hosts.iter().map(|host| host.calls).sum::<u64>(), 8, "{:?}", pool.hosts);
    });
}

#[test]
fn a_host_that_joins_takes_work_within_a_second() {
    let Some(broker) = own_process("a_host_that_joins_takes_work_within_a_second", Duration::from_secs(120))
    else {
        return;
    };
    let _first = Host::start(&broker, &[]);
    block_on(async {
        // Keep four calls of 50 ms going: more than the first host's two slots.
        let (results_tx, mut results) = tokio::sync::mpsc::unbounded_channel();
        let runner = tokio::spawn(async move {
            let mut calls = tokio::task::JoinSet::new();
            for _ in 0..4 {
                calls.spawn(nap(50));
            }
            while let Some(joined) = calls.join_next().await {
                if results_tx.send(joined.unwrap().unwrap()).is_err() {
                    return;
                }
                calls.spawn(nap(50));
            }
        });
        // The first calls ran: the caller knows the first host.
        results.recv().await.unwrap();
        let url = broker.url();
        let second = tokio::task::spawn_blocking(move || {
            Host::start_binary(std::env::current_exe().unwrap(), &url, &[])
        })
        .await
        .unwrap();
        let joined = Instant::now();
        while results.recv().await.unwrap() != second.pid {}
        let took = joined.elapsed();
        // Within a second, and a margin for a loaded machine (the call itself takes 50 ms).
        assert!(took < Duration::from_millis(1_500), "the new host took its first call after {took:?}");
        runner.abort();
        drop(second);
    });
}

#[test]
fn a_killed_host_loses_no_call() {
    let Some(broker) = own_process("a_killed_host_loses_no_call", Duration::from_secs(180)) else { return };
    let mut doomed = Host::start(&broker, &[("OFFLOAD_WORKERS", "2")]);
    let survivor = Host::start(&broker, &[("OFFLOAD_WORKERS", "2")]);
    let doomed_pid = doomed.pid;
    block_on(async {
        let started = Instant::now();
        // 2,000 calls of a function safe to repeat, and 200 of one that is not.
        let mut calls = tokio::task::JoinSet::new();
        for x in 0..2_000u64 {
            calls.spawn(async move { (x, true, work(x, 2).await) });
        }
        for x in 0..200u64 {
            calls.spawn(async move { (x, false, work_once(x, 20).await) });
        }
        // Kill the host once a few hundred calls are done, while it holds some.
        let (mut done, mut killed) = (0, false);
        let (mut ok, mut repeated_ok, mut lost) = (0, 0, 0);
        while let Some(joined) = calls.join_next().await {
            let (x, safe, result) = joined.unwrap();
            done += 1;
            if done == 300 {
                doomed.kill9();
                killed = true;
            }
            match result {
                Ok((back, host)) => {
                    assert_eq!(back, x);
                    ok += 1;
                    if safe {
                        repeated_ok += 1;
                    }
                    assert!(host == doomed_pid || host == survivor.pid);
                }
                // Only a call that is not safe to repeat may fail, and only as lost with its
                // host, which the error names.
                Err(Error::Crashed { exit: ExitReason::HostLost, stderr, .. }) if !safe => {
                    assert!(
                        stderr.iter().any(|line| line.contains(&format!("pid {doomed_pid}"))),
                        "{stderr:?}"
                    );
                    lost += 1;
                }
                Err(error) => panic!("call {x} (safe to repeat: {safe}): {error}"),
            }
        }
        assert!(killed);
        assert_eq!(done, 2_200);
        assert_eq!(repeated_ok, 2_000, "every call safe to repeat ends well");
        assert_eq!(ok + lost, 2_200);
        // Lost within a few seconds, not at the 30 s timeout.
        assert!(started.elapsed() < Duration::from_secs(25), "{:?}", started.elapsed());
        let stats = offload::stats();
        let pool = stats.iter().find(|pool| pool.name.ends_with("::work")).unwrap();
        assert_eq!(pool.succeeded, 2_000);
        assert_eq!(pool.hosts.len(), 1, "the dead host is forgotten: {:?}", pool.hosts);
    });
}

#[test]
fn a_timeout_or_a_dropped_call_kills_the_remote_worker() {
    let Some(broker) =
        own_process("a_timeout_or_a_dropped_call_kills_the_remote_worker", Duration::from_secs(120))
    else {
        return;
    };
    let _host = Host::start(&broker, &[]);
    let dir = std::env::temp_dir().join(format!("offload-remote-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let worker_of = |file: &str| -> u32 {
        let path = dir.join(file);
        // Written, not merely created: the file exists a moment before its pid is in it.
        let read_pid = || std::fs::read_to_string(&path).ok()?.parse::<u32>().ok();
        assert!(support::eventually(Duration::from_secs(10), || read_pid().is_some()));
        read_pid().unwrap()
    };
    block_on(async {
        // The caller's timeout: the caller gets `Timeout` at its deadline; the host kills the
        // worker.
        // (A first call finds the host.)
        assert_eq!(square(2).await.unwrap(), 4);
        let path = dir.join("timeout").to_str().unwrap().to_owned();
        let started = Instant::now();
        match offload::with_timeout(Duration::from_secs(2), hang(path)).await {
            Err(Error::Timeout { pid: Some(_), .. }) => {}
            other => panic!("{other:?}"),
        }
        // The timeout, and a margin for a loaded machine; the host's own timeout is 30 s.
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        let worker = worker_of("timeout");
        assert!(
            support::eventually(Duration::from_secs(10), || !support::alive(worker)),
            "worker {worker} lives"
        );

        // A call whose deadline is too close when it reaches the host (under a millisecond
        // left) is never started there.
        for i in 0..20 {
            let path = dir.join(format!("mark-{i}")).to_str().unwrap().to_owned();
            match offload::with_timeout(Duration::from_micros(900), mark(path)).await {
                Err(Error::Timeout { pid: None, .. }) => {}
                other => panic!("{other:?}"),
            }
        }
        // The host has one worker, which takes its calls in turn: once this one is done, any
        // of the calls before would have left its mark.
        assert!(mark(dir.join("last").to_str().unwrap().to_owned()).await.unwrap());
        let marks: Vec<_> = (0..20).filter(|i| dir.join(format!("mark-{i}")).exists()).collect();
        assert!(marks.is_empty(), "expired calls ran: {marks:?}");

        // A dropped call: its host is told, and kills the worker.
        let path = dir.join("dropped").to_str().unwrap().to_owned();
        let call = tokio::spawn(hang(path));
        let worker = tokio::task::spawn_blocking({
            let path = dir.join("dropped");
            move || {
                // Written, not merely created: the file exists a moment before its pid is in it.
                let read_pid = || std::fs::read_to_string(&path).ok()?.parse::<u32>().ok();
                assert!(support::eventually(Duration::from_secs(10), || read_pid().is_some()));
                read_pid().unwrap()
            }
        })
        .await
        .unwrap();
        call.abort();
        assert!(
            support::eventually(Duration::from_secs(10), || !support::alive(worker)),
            "worker {worker} lives"
        );
        // The host serves on.
        assert_eq!(square(9).await.unwrap(), 81);
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn with_no_host_of_this_build_a_call_fails_fast() {
    let Some(broker) = own_process("with_no_host_of_this_build_a_call_fails_fast", Duration::from_secs(60))
    else {
        return;
    };
    block_on(async {
        let started = Instant::now();
        match square(2).await {
            Err(Error::Unavailable { reason, .. }) => {
                assert!(reason.starts_with("no host serves build "), "{reason}");
                assert!(reason.contains("no host answers at nats://127.0.0.1:"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // Discovery takes a second; a margin for a loaded machine.
        assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    });
    // A host of another build: another program of this package.
    let other = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("examples/cluster");
    assert!(other.is_file(), "build it first: cargo build --features nats --example cluster");
    let host = Host::start_binary(other, &broker.url(), &[]);
    block_on(async {
        // Once the host is known, the error names it and its build.
        let started = Instant::now();
        loop {
            match square(2).await {
                Err(Error::Unavailable { reason, .. }) if reason.contains("hosts seen: build ") => {
                    assert!(reason.contains(&format!("(pid {})", host.pid)), "{reason}");
                    break;
                }
                Err(Error::Unavailable { .. }) => assert!(started.elapsed() < Duration::from_secs(5)),
                other => panic!("{other:?}"),
            }
        }
    });
}

#[test]
fn calls_resume_after_the_broker_restarts() {
    let Some(mut broker) = own_process("calls_resume_after_the_broker_restarts", Duration::from_secs(120))
    else {
        return;
    };
    let _host = Host::start(&broker, &[]);
    block_on(async {
        assert_eq!(square(3).await.unwrap(), 9);
        assert_eq!(refuses_to_wait(3).await.unwrap(), 3);
        // Calls out on the host when the broker goes: each ends, lost with the broker (or
        // done just before), long before its 20 s timeout.
        let mut out = naps_holding(2, 1_000, 2).await;
        let killed = Instant::now();
        broker.kill();
        while let Some(joined) = out.join_next().await {
            match joined.unwrap() {
                Ok(_) => {}
                Err(Error::Unavailable { reason, .. }) => {
                    assert!(
                        reason.contains("lost the broker") || reason.contains("cannot be reached"),
                        "{reason}"
                    )
                }
                Err(other) => panic!("{other}"),
            }
        }
        assert!(killed.elapsed() < Duration::from_secs(5), "{:?}", killed.elapsed());
        // A pool that does not wait fails at once with the reason; one that waits fails at
        // its deadline.
        let started = Instant::now();
        loop {
            match refuses_to_wait(4).await {
                Err(Error::Unavailable { reason, .. }) => {
                    assert!(
                        reason.contains("cannot be reached") || reason.contains("lost the broker"),
                        "{reason}"
                    );
                    break;
                }
                // Until the client notices the broker is gone.
                Ok(_) | Err(Error::Timeout { .. }) => assert!(started.elapsed() < Duration::from_secs(10)),
                Err(other) => panic!("{other}"),
            }
        }
        let started = Instant::now();
        match offload::with_timeout(Duration::from_millis(1500), square(4)).await {
            Err(Error::Timeout { .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        broker.restart();
        // Everyone reconnects on their own.
        let started = Instant::now();
        loop {
            match offload::with_timeout(Duration::from_secs(2), square(5)).await {
                Ok(25) => break,
                other => assert!(started.elapsed() < Duration::from_secs(15), "{other:?}"),
            }
        }
    });
}

#[test]
fn sigterm_lets_running_calls_finish_and_stops_the_rest() {
    let Some(broker) =
        own_process("sigterm_lets_running_calls_finish_and_stops_the_rest", Duration::from_secs(120))
    else {
        return;
    };
    // Two workers: a short call and a hung one run at once.
    let mut host = Host::start(&broker, &[("OFFLOAD_WORKERS", "2"), ("OFFLOAD_SERVE_GRACE", "2s")]);
    let dir = std::env::temp_dir().join(format!("offload-remote-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let marked = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    block_on(async {
        let short = tokio::spawn(marked_nap(marked("short"), 500));
        let hung = tokio::spawn(hang(marked("hung")));
        // Both run on the host (they left their marks) when it is told to stop.
        let running = support::eventually_async(Duration::from_secs(10), || {
            dir.join("short").exists() && dir.join("hung").exists()
        })
        .await;
        assert!(running);
        let stopped = Instant::now();
        host.sigterm();
        // The short call ends within the grace period, as it would have.
        assert_eq!(short.await.unwrap().unwrap(), host.pid);
        // The hung one is stopped when the grace period is over.
        match hung.await.unwrap() {
            Err(Error::Crashed { exit: ExitReason::HostLost, stderr, .. }) => {
                assert!(stderr.iter().any(|line| line.contains("shut down")), "{stderr:?}")
            }
            other => panic!("{other:?}"),
        }
        // 2 s of grace, and a margin for a loaded machine (the default grace is 10 s).
        assert!(stopped.elapsed() < Duration::from_secs(5), "{:?}", stopped.elapsed());
    });
    let status = host.exited_within(Duration::from_secs(5)).expect("the host exited");
    assert!(status.success(), "{status:?}");
    assert!(host.said("stops taking calls"));
    assert!(host.said("stopped"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn logs_come_back_from_the_host_in_the_calls_span() {
    let Some(broker) = own_process("logs_come_back_from_the_host_in_the_calls_span", Duration::from_secs(60))
    else {
        return;
    };
    let host = Host::start(&broker, &[]);
    let capture = capture::Capture::default();
    let pid = capture.run(chatty(7)).unwrap();
    let (forwarded, messages) = capture.forwarded();
    assert_eq!(messages, ["working on it", "almost done"], "{:#?}", capture.events());
    assert_eq!(forwarded[0].fields["fields"], "n=7");
    for event in &forwarded {
        assert_eq!(event.spans["entry"], "remote::chatty");
        assert_eq!(event.spans["pid"], pid.to_string(), "the remote worker's pid is on the span");
        assert!(event.spans["host"].contains(&format!("(pid {})", host.pid)), "{event:?}");
    }
}

/// The other caller of `a_full_host_turns_calls_away_and_loses_none`, in a process of its
/// own: four calls of 400 ms, then how many times it sent them.
#[test]
#[ignore = "a helper that a_full_host_turns_calls_away_and_loses_none runs"]
fn other_caller() {
    if std::env::var("OFFLOAD_TEST_INNER").as_deref() != Ok("other_caller") {
        return;
    }
    block_on(async {
        // Knows the host, then waits for the word to send.
        nap(0).await.unwrap();
        println!("READY");
        let mut go = String::new();
        std::io::stdin().read_line(&mut go).unwrap();
        let mut naps = tokio::task::JoinSet::new();
        for _ in 0..4 {
            naps.spawn(nap(400));
        }
        while let Some(joined) = naps.join_next().await {
            joined.unwrap().unwrap();
        }
        let stats = offload::stats();
        let pool = stats.iter().find(|pool| pool.name.ends_with("nap")).unwrap();
        // Less the first call.
        println!("SENT {}", pool.hosts.iter().map(|host| host.calls).sum::<u64>() - 1);
    });
}

#[test]
fn a_full_host_turns_calls_away_and_loses_none() {
    let Some(broker) = own_process("a_full_host_turns_calls_away_and_loses_none", Duration::from_secs(120))
    else {
        return;
    };
    // One worker: room for two calls.
    let host = Host::start(&broker, &[]);
    let mut other = dies_with_us(
        Command::new(std::env::current_exe().unwrap())
            .args(["other_caller", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env("OFFLOAD_TEST_INNER", "other_caller")
            .env("OFFLOAD_REMOTE", broker.url())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )
    .spawn()
    .unwrap();
    let mut other_out = BufReader::new(other.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("READY") {
        line.clear();
        assert!(other_out.read_line(&mut line).unwrap() > 0, "the other caller ended early");
    }
    block_on(async {
        // This caller fills the host; then the other sends too. Each sees room that the
        // other took, and the host turns the extra calls away.
        let mut naps = naps_holding(6, 400, 2).await;
        use std::io::Write;
        writeln!(other.stdin.take().unwrap(), "GO").unwrap();
        while let Some(joined) = naps.join_next().await {
            assert_eq!(joined.unwrap().unwrap(), host.pid);
        }
        let stats = offload::stats();
        let pool = stats.iter().find(|pool| pool.name.ends_with("nap")).unwrap();
        let sent: u64 = pool.hosts.iter().map(|host| host.calls).sum();
        let mut output = line.clone();
        other_out.read_to_string(&mut output).unwrap();
        let status = other.wait().unwrap();
        assert!(status.success() && output.contains("1 passed"), "{output}");
        // The harness's own words may share the line.
        let other_sent: u64 = output
            .split("SENT ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("the other caller says what it sent: {output}"))
            .parse()
            .unwrap();
        // Ten calls, all answered; some sent more than once because the host had no room.
        assert!(sent + other_sent > 10, "{sent} + {other_sent} sends: the host never turned a call away");
    });
}

#[test]
fn shutdown_ends_remote_calls_after_its_grace() {
    let Some(broker) = own_process("shutdown_ends_remote_calls_after_its_grace", Duration::from_secs(60))
    else {
        return;
    };
    let _host = Host::start(&broker, &[]);
    let dir = std::env::temp_dir().join(format!("offload-remote-shutdown-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let marker = dir.join("hung");
    block_on(async {
        assert_eq!(square(2).await.unwrap(), 4);
        let hung = tokio::spawn(hang(marker.to_str().unwrap().to_owned()));
        // Written, not merely created: the file exists a moment before its pid is in it.
        let read_pid = || std::fs::read_to_string(&marker).ok()?.parse::<u32>().ok();
        assert!(support::eventually_async(Duration::from_secs(10), || read_pid().is_some()).await);
        let worker = read_pid().unwrap();
        let started = Instant::now();
        offload::shutdown(Duration::from_secs(1)).await;
        // The call out gets the grace period, then ends as a local one would.
        match hung.await.unwrap() {
            Err(Error::Shutdown { .. }) => {}
            other => panic!("{other:?}"),
        }
        let took = started.elapsed();
        // 1 s of grace, and a margin for a loaded machine (the call's timeout is 30 s).
        assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "{took:?}");
        // Its host is told, and stops the worker.
        assert!(
            support::eventually(Duration::from_secs(10), || !support::alive(worker)),
            "worker {worker} lives"
        );
        // New calls are refused.
        match square(3).await {
            Err(Error::Shutdown { .. }) => {}
            other => panic!("{other:?}"),
        }
    });
    std::fs::remove_dir_all(&dir).unwrap();
}
