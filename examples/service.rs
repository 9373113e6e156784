//! An axum service with a CPU-heavy endpoint (PBKDF2 password hashing) that stays responsive
//! under load, because the hashing runs in offload's worker processes.
//!
//! ```text
//! cargo run --release --example service              # serve on 127.0.0.1:3000 until Ctrl-C
//! cargo run --release --example service -- 8080      # ... on another port (0: any free one)
//! cargo run --release --example service -- load      # flood it, probe /healthz, print a table
//! ```
//!
//! Routes: `POST /hash` (offloaded), `POST /hash/inline` (the same work on the runtime, for
//! comparison), `GET /healthz`, and with `--features metrics` `GET /metrics` (offload's
//! figures as Prometheus text). The service is in `service/app.rs`; the tests in
//! `tests/service.rs` use the same file.
//!
//! ```text
//! curl -s 127.0.0.1:3000/hash -H 'content-type: application/json' \
//!      -d '{"password": "hunter2", "salt": "NaCl", "iterations": 600000}'
//! ```
//!
//! The load mode, `load [SECONDS] [CLIENTS] [ITERATIONS]`, starts the service on a loopback
//! port, and for each endpoint in turn has many clients post hashing requests back to back
//! while a probe asks `/healthz` every few milliseconds; then it prints how long the probes
//! waited, how many requests were served, and the errors by status.
//!
//! On SIGTERM or Ctrl-C the service stops accepting, finishes the requests in flight, and
//! shuts its workers down. Ctrl-C in a terminal signals the whole foreground process group,
//! and the workers are in it: a call running at that moment dies with its worker (500).
//! `kill -TERM <pid>` reaches the service alone.

#[path = "service/app.rs"]
mod app;
#[path = "service/client.rs"]
mod client;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

type Failure = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Failure> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("load") => load(&args[1..]),
        None => serve(3000),
        Some(port) => serve(port.parse().map_err(|_| format!("not a port or `load`: {port:?}"))?),
    }
}

/// Serves on `127.0.0.1:port` until Ctrl-C or SIGTERM, then shuts down cleanly.
fn serve(port: u16) -> Result<(), Failure> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = app::bind(port).await?;
        let stop = app::stop_signal();
        println!("listening on http://{} (Ctrl-C to stop)", listener.local_addr()?);
        app::serve(listener, async {
            stop.await;
            println!("stopping: finishing the requests in flight");
        })
        .await?;
        println!("stopped: every request answered, every worker gone");
        Ok::<_, Failure>(())
    })
}

struct Load {
    duration: Duration,
    clients: usize,
    iterations: u32,
}

/// Health probes: one every `PROBE_EVERY`.
const PROBE_EVERY: Duration = Duration::from_millis(5);

fn load(args: &[String]) -> Result<(), Failure> {
    let arg = |i: usize, default: u64| -> Result<u64, Failure> {
        args.get(i).map_or(Ok(default), |s| s.parse().map_err(|_| format!("not a number: {s:?}").into()))
    };
    let load = Load {
        duration: Duration::from_secs(arg(0, 4)?),
        clients: arg(1, 16)? as usize,
        iterations: u32::try_from(arg(2, 20_000)?)?.clamp(1, app::MAX_ITERATIONS),
    };

    // The service gets a runtime of its own, as it would in its own process; the clients run
    // on another thread, so the probes measure the service, not the load generator.
    let server = tokio::runtime::Runtime::new()?;
    let listener = server.block_on(app::bind(0))?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = server.spawn(app::serve(listener, async {
        let _ = stopped.await;
    }));

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "service on {addr}: a {cores}-thread runtime; offload workers: {} (\"cpus-2\" on {cores} cores)",
        cores.saturating_sub(2).max(1)
    );
    println!(
        "load: {} clients posting {}-iteration PBKDF2 requests back to back for {:?} per endpoint; \
         /healthz probed every {PROBE_EVERY:?}\n",
        load.clients, load.iterations, load.duration
    );

    let clients = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    clients.block_on(async {
        check(addr).await?;
        println!(
            "{:<27} {:>7} {:>18} {:>10} {:>8} {:>12} {:>12} {:>12}",
            "", "served", "errors", "hash p50", "probes", "healthz p50", "healthz p99", "healthz max"
        );
        for (name, path) in [("/hash (offloaded)", "/hash"), ("/hash/inline (on runtime)", "/hash/inline")] {
            let mut run = flood(addr, path, &load).await;
            let (hash_p50, ..) = percentiles(&mut run.latency);
            let (p50, p99, max) = percentiles(&mut run.health);
            println!(
                "{name:<27} {:>7} {:>18} {:>10} {:>8} {:>12} {:>12} {:>12}",
                run.served,
                errors(&run.errors),
                ms(hash_p50),
                run.health.len(),
                ms(p50),
                ms(p99),
                ms(max)
            );
            // Let the machine settle before the next run.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok::<_, Failure>(())
    })?;
    for pool in offload::stats() {
        println!(
            "\noffload::stats() for {}: {} calls, {} succeeded, {} failed, {} workers replaced; \
             queue wait p50 {}, p99 {}; run time p50 {}, p99 {}",
            pool.name,
            pool.submitted,
            pool.succeeded,
            pool.failed_total(),
            pool.restarts_total(),
            ms(pool.queue_wait.p50),
            ms(pool.queue_wait.p99),
            ms(pool.run_time.p50),
            ms(pool.run_time.p99)
        );
    }
    println!(
        "\nhash = how long a hashing request took; healthz = how long a GET /healthz took meanwhile;\n\
         errors = responses other than 200, by status. Inline hashing runs on every runtime thread,\n\
         offloaded hashing on the workers only, leaving the runtime free to answer."
    );

    let _ = stop.send(());
    server.block_on(service)??;
    println!("service stopped cleanly");
    Ok(())
}

/// Both endpoints give the same, known answer (RFC 7914's PBKDF2-HMAC-SHA256 test vector).
async fn check(addr: SocketAddr) -> Result<(), Failure> {
    let known = "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc";
    let body = br#"{"password": "passwd", "salt": "salt", "iterations": 1}"#;
    for path in ["/hash", "/hash/inline"] {
        let response = client::post_json(addr, path, body).await?;
        let answer: app::HashResponse = serde_json::from_slice(&response.body)
            .map_err(|e| format!("{path} answered {}: {} ({e})", response.status, response.text()))?;
        if answer.hash != known {
            return Err(format!("{path} computed {}, expected {known}", answer.hash).into());
        }
    }
    Ok(())
}

#[derive(Default)]
struct Run {
    served: usize,
    errors: BTreeMap<String, usize>,
    /// How long each served hashing request took.
    latency: Vec<Duration>,
    /// How long each health probe took.
    health: Vec<Duration>,
}

/// Floods `path` from `load.clients` clients for `load.duration`, probing `/healthz` all along.
async fn flood(addr: SocketAddr, path: &'static str, load: &Load) -> Run {
    let deadline = Instant::now() + load.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..load.clients {
        let iterations = load.iterations;
        tasks.spawn(async move {
            let mut run = Run::default();
            for n in 0.. {
                if Instant::now() >= deadline {
                    break;
                }
                let request = app::HashRequest {
                    password: format!("client {c} request {n}"),
                    salt: "load".into(),
                    iterations,
                };
                let body = serde_json::to_vec(&request).expect("serialisable");
                let started = Instant::now();
                match client::post_json(addr, path, &body).await {
                    Ok(response) if response.status == 200 => {
                        run.served += 1;
                        run.latency.push(started.elapsed());
                    }
                    Ok(response) => {
                        *run.errors.entry(response.status.to_string()).or_default() += 1;
                        if response.status == 503 {
                            // Turned away: back off a little, as a polite client does.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                    Err(e) => *run.errors.entry(format!("{:?}", e.kind())).or_default() += 1,
                }
            }
            run
        });
    }
    tasks.spawn(async move {
        let mut run = Run::default();
        while Instant::now() < deadline {
            let started = Instant::now();
            match client::get(addr, "/healthz").await {
                Ok(response) if response.status == 200 => run.health.push(started.elapsed()),
                Ok(response) => *run.errors.entry(format!("healthz {}", response.status)).or_default() += 1,
                Err(e) => *run.errors.entry(format!("healthz {:?}", e.kind())).or_default() += 1,
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
        run
    });
    let mut total = Run::default();
    while let Some(run) = tasks.join_next().await {
        let run = run.expect("client task");
        total.served += run.served;
        total.latency.extend(run.latency);
        total.health.extend(run.health);
        for (status, n) in run.errors {
            *total.errors.entry(status).or_default() += n;
        }
    }
    total
}

fn percentiles(samples: &mut [Duration]) -> (Duration, Duration, Duration) {
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1));
        samples.get(i).copied().unwrap_or_default()
    };
    (at(0.5), at(0.99), samples.last().copied().unwrap_or_default())
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1e3)
}

fn errors(errors: &BTreeMap<String, usize>) -> String {
    if errors.is_empty() {
        return "none".into();
    }
    errors.iter().map(|(status, n)| format!("{n}x{status}")).collect::<Vec<_>>().join(" ")
}
