//! The example service (`examples/service/app.rs`) over loopback: concurrent hashing requests
//! and health checks are all answered, and answered right; bad requests get a 4xx; work past
//! its deadline is a 504; SIGTERM lets the request in flight finish and leaves no worker.
//! Latencies are printed (`--nocapture`), not asserted: the machine is shared.

#[path = "../examples/service/app.rs"]
#[allow(dead_code)]
mod app;
#[path = "../examples/service/client.rs"]
#[allow(dead_code)]
mod client;
mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use app::{HashRequest, HashResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The tests that keep a worker busy take turns: the pool has one worker on a 2-core machine,
/// and a call that is made to time out holds it for two seconds.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts the router on an ephemeral loopback port, for the rest of the test, its worker
/// started: starting one takes a while on a busy machine, and counts against the timeout.
async fn start() -> SocketAddr {
    let listener = app::bind(0).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app::router()).await.unwrap() });
    addr
}

fn body(password: &str, salt: &str, iterations: u32) -> Vec<u8> {
    let request = HashRequest { password: password.into(), salt: salt.into(), iterations };
    serde_json::to_vec(&request).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn hash(addr: SocketAddr, path: &str, password: &str, salt: &str, iterations: u32) -> HashResponse {
    let response = client::post_json(addr, path, &body(password, salt, iterations)).await.unwrap();
    assert_eq!(response.status, 200, "{path}: {}", response.text());
    serde_json::from_slice(&response.body).unwrap()
}

fn percentiles(samples: &mut [Duration]) -> String {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    format!("p50 {:?}, p99 {:?}, max {:?} over {}", at(0.5), at(0.99), at(1.0), samples.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_answers_from_both_endpoints() {
    let _turn = HEAVY.lock().await;
    let addr = start().await;
    // PBKDF2-HMAC-SHA256 test vectors (RFC 7914 section 11, and the widely used "password" set).
    for (password, salt, iterations, expected) in [
        ("passwd", "salt", 1, "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"),
        ("password", "salt", 1, "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b"),
        ("password", "salt", 2, "ae4d0c95af6b46d32d0adff928f06dd02a303f8ef3c251dfd6e2d85a95474c43"),
        ("password", "salt", 4096, "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a"),
    ] {
        for path in ["/hash", "/hash/inline"] {
            let answer = hash(addr, path, password, salt, iterations).await;
            let want = HashResponse { algorithm: "pbkdf2-sha256".into(), iterations, hash: expected.into() };
            assert_eq!(answer, want, "{path} for {password:?}/{salt:?}/{iterations}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_and_health_checks_are_all_answered() {
    // Eight calls queue for one worker (on 2 cores) and must all be answered within the
    // two-second timeout, on a machine busy with other tests: hence small jobs.
    const OFFLOADED: usize = 8;
    const INLINE: usize = 4;
    const ITERATIONS: u32 = 200;
    let _turn = HEAVY.lock().await;
    let addr = start().await;

    let mut heavy = tokio::task::JoinSet::new();
    for i in 0..OFFLOADED + INLINE {
        let path = if i < OFFLOADED { "/hash" } else { "/hash/inline" };
        heavy.spawn(async move {
            let (password, salt) = (format!("password {i}"), format!("salt {i}"));
            let started = Instant::now();
            let answer = hash(addr, path, &password, &salt, ITERATIONS).await;
            let expected = hex(&app::pbkdf2_sha256(password.as_bytes(), salt.as_bytes(), ITERATIONS));
            assert_eq!(answer.hash, expected, "{path} request {i}");
            assert_eq!(answer.iterations, ITERATIONS);
            started.elapsed()
        });
    }
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let heavy_done = done.clone();
    let probes = tokio::spawn(async move {
        let mut latency = Vec::new();
        loop {
            let started = Instant::now();
            let response = client::get(addr, "/healthz").await.unwrap();
            assert_eq!((response.status, response.text().as_str()), (200, "ok\n"));
            latency.push(started.elapsed());
            if latency.len() >= 5 && heavy_done.load(std::sync::atomic::Ordering::SeqCst) {
                return latency;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });

    let mut latency = Vec::new();
    while let Some(done) = heavy.join_next().await {
        latency.push(done.expect("every hashing request answered, and right"));
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut health = probes.await.expect("every health check answered");
    assert_eq!(latency.len(), OFFLOADED + INLINE);
    println!("hashing ({OFFLOADED} offloaded + {INLINE} inline at once): {}", percentiles(&mut latency));
    println!("/healthz meanwhile: {}", percentiles(&mut health));
}

#[tokio::test]
async fn bad_requests_are_refused_with_4xx() {
    let addr = start().await;
    let oversize = body(&"x".repeat(app::BODY_LIMIT), "salt", 1);
    let huge = vec![b'x'; 1 << 20];
    let cases: [(&str, Option<&str>, &[u8], u16); 10] = [
        ("just over the body limit", Some("application/json"), &oversize, 413),
        ("far over the body limit", Some("application/json"), &huge, 413),
        ("not JSON", Some("application/json"), b"password=hunter2", 400),
        ("truncated JSON", Some("application/json"), br#"{"password": "a", "salt": "#, 400),
        ("no content type", None, br#"{"password": "a", "salt": "b", "iterations": 1}"#, 415),
        ("a missing field", Some("application/json"), br#"{"password": "a", "iterations": 1}"#, 422),
        (
            "a wrong type",
            Some("application/json"),
            br#"{"password": "a", "salt": "b", "iterations": "1"}"#,
            422,
        ),
        (
            "an unknown field",
            Some("application/json"),
            br#"{"password": "a", "salt": "b", "iterations": 1, "x": 0}"#,
            422,
        ),
        (
            "zero iterations",
            Some("application/json"),
            br#"{"password": "a", "salt": "b", "iterations": 0}"#,
            422,
        ),
        ("too many iterations", Some("application/json"), &body("a", "b", app::MAX_ITERATIONS + 1), 422),
    ];
    for path in ["/hash", "/hash/inline"] {
        for (what, content_type, payload, status) in cases {
            let response = client::request(addr, "POST", path, content_type, payload).await.unwrap();
            assert_eq!(response.status, status, "{path} with {what}: {}", response.text());
            assert!(!response.body.is_empty(), "{path} with {what}: the error says why");
        }
    }
    assert_eq!(client::get(addr, "/hash").await.unwrap().status, 405);
    assert_eq!(client::get(addr, "/nowhere").await.unwrap().status, 404);
    assert_eq!(client::get(addr, "/healthz").await.unwrap().status, 200, "the service is still up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_past_its_deadline_is_a_504_and_the_service_recovers() {
    let _turn = HEAVY.lock().await;
    let addr = start().await;
    let started = Instant::now();
    let response =
        client::post_json(addr, "/hash", &body("slow", "salt", app::MAX_ITERATIONS)).await.unwrap();
    let took = started.elapsed();
    assert_eq!(response.status, 504, "{}", response.text());
    let error: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert!(error["error"].is_string(), "{error}");
    println!("504 after {took:?}");
    // The worker was killed; its replacement serves the next request.
    let answer = hash(addr, "/hash", "password", "salt", 2).await;
    assert_eq!(answer.hash, "ae4d0c95af6b46d32d0adff928f06dd02a303f8ef3c251dfd6e2d85a95474c43");
}

/// `cargo test --features metrics --test service`: `/metrics` serves offload's figures.
#[cfg(feature = "metrics")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_as_prometheus_text() {
    let _turn = HEAVY.lock().await;
    let addr = start().await;
    hash(addr, "/hash", "password", "salt", 1).await;
    let response = client::get(addr, "/metrics").await.unwrap();
    assert_eq!(response.status, 200);
    let text = response.text();
    let submitted = text
        .lines()
        .find(|line| line.starts_with("offload_calls_submitted_total{pool=\"service::app::derive_key\"}"));
    assert!(submitted.is_some(), "no call counted in:\n{text}");
}

#[test]
fn offload_errors_map_to_statuses() {
    use axum::http::StatusCode;
    use offload::Error;
    let entry = "service::app::derive_key";
    let timeout = Error::Timeout {
        entry,
        timeout: Duration::from_secs(2),
        by: offload::Deadline::Function,
        pid: Some(1),
    };
    assert_eq!(app::status_of(&timeout), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(app::status_of(&Error::Overloaded { entry, queue: 64 }), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app::status_of(&Error::Shutdown { entry }), StatusCode::SERVICE_UNAVAILABLE);
    let open = Error::CircuitOpen { entry, retry_in: Duration::from_secs(5) };
    assert_eq!(app::status_of(&open), StatusCode::SERVICE_UNAVAILABLE);
    let panicked = Error::Panicked { entry, pid: 1, message: "boom".into(), location: None };
    assert_eq!(app::status_of(&panicked), StatusCode::INTERNAL_SERVER_ERROR);
    let config = Error::Config { entry, message: "bad".into() };
    assert_eq!(app::status_of(&config), StatusCode::INTERNAL_SERVER_ERROR);
}

/// Set in the copy of this test binary that runs the service for the SIGTERM test.
const CHILD: &str = "OFFLOAD_SERVICE_TEST_CHILD";

/// The SIGTERM test's service: runs only in the child, which prints its address and serves
/// until it gets SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by `sigterm_finishes_requests_in_flight_and_leaves_no_worker` in a child process"]
async fn child_service() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let listener = app::bind(0).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = app::stop_signal();
    // The harness has printed `test child_service ... ` on this line already.
    println!("listening on {addr}");
    app::serve(listener, stop).await.unwrap();
    println!("stopped; workers left: {}", children_of(std::process::id()).len());
}

/// The child process, killed if the test fails before it exits.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight_and_leaves_no_worker() {
    let _turn = HEAVY.lock().await;
    let mut child = Child(
        Command::new(std::env::current_exe().unwrap())
            .args(["child_service", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let stdout = BufReader::new(child.0.stdout.take().unwrap());
    let (line_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = line_tx.send(line);
        }
    });
    // The harness has printed `test child_service ... ` before the address, on the same line.
    let (addr, lines): (SocketAddr, _) = tokio::task::spawn_blocking(move || {
        loop {
            let line = lines.recv_timeout(Duration::from_secs(60)).expect("the child listens");
            if let Some((_, addr)) = line.split_once("listening on ") {
                return (addr.trim().parse().unwrap(), lines);
            }
        }
    })
    .await
    .unwrap();

    // The service warmed its pool up before it started listening.
    let workers = children_of(pid);
    assert!(!workers.is_empty(), "no worker started");

    // A request in flight when SIGTERM comes: its head is in, half its body is not.
    const ITERATIONS: u32 = 2_000;
    let payload = body("late", "salt", ITERATIONS);
    let (first, rest) = payload.split_at(payload.len() / 2);
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /hash HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        payload.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let term = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(term, rustix::process::Signal::TERM).unwrap();
    let refused =
        support::eventually_async(Duration::from_secs(10), || std::net::TcpStream::connect(addr).is_err())
            .await;
    assert!(refused, "the service still accepts connections after SIGTERM");

    stream.write_all(rest).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let response = client::parse(&raw).expect("the request in flight is answered");
    assert_eq!(response.status, 200, "{}", response.text());
    let answer: HashResponse = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(answer.hash, hex(&app::pbkdf2_sha256(b"late", b"salt", ITERATIONS)));

    let exited =
        support::eventually_async(Duration::from_secs(20), || child.0.try_wait().unwrap().is_some()).await;
    assert!(exited, "the service did not exit after SIGTERM");
    assert!(child.0.wait().unwrap().success(), "the service exited with a failure");
    let stopped = tokio::task::spawn_blocking(move || {
        loop {
            let line = lines.recv_timeout(Duration::from_secs(10)).expect("the child says it stopped");
            if line.starts_with("stopped") {
                return line;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(stopped, "stopped; workers left: 0", "every worker was reaped before the service exited");
    for worker in workers {
        assert!(!support::alive(worker), "worker {worker} outlived the service");
    }
}

/// Live children of `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
        if ppid == Some(pid) && support::alive(child) {
            children.push(child);
        }
    }
    children
}
