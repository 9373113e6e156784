//! Many results from offloaded functions: a stream whose items arrive while the worker still
//! works, and a map of one function over many inputs, run in batches on every worker.
//!
//! `cargo run --release --example many`

use std::time::Instant;

/// The primes below `below`, as the worker finds them.
#[offload::offload(timeout = "5m", workers = "cpus")]
fn primes(below: u64) -> impl Iterator<Item = u64> {
    (2..below).filter(|&n| is_prime(n))
}

/// How many steps the Collatz sequence of `n` takes to reach 1.
#[offload::offload(timeout = "5m", workers = "cpus")]
fn collatz_steps(n: u64) -> u32 {
    let (mut n, mut steps) = (n, 0);
    while n != 1 {
        n = if n.is_multiple_of(2) { n / 2 } else { 3 * n + 1 };
        steps += 1;
    }
    steps
}

fn is_prime(n: u64) -> bool {
    (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

#[tokio::main]
async fn main() -> Result<(), offload::Error> {
    let started = Instant::now();
    let mut found = primes(2_000_000);
    let (mut count, mut last) = (0u64, 0);
    while let Some(prime) = found.next().await {
        last = prime?;
        count += 1;
        if count % 25_000 == 0 {
            println!("{count:>7} primes so far (the latest {last}) after {:?}", started.elapsed());
        }
    }
    println!("{count} primes below 2,000,000, the largest {last}, streamed in {:?}", started.elapsed());

    let started = Instant::now();
    let inputs = 1..=2_000_000u64;
    let mut steps = offload::map(collatz_steps, inputs.clone());
    let (mut longest, mut at) = (0, 0);
    for n in inputs {
        let s = steps.next().await.expect("one result per input")?;
        if s > longest {
            (longest, at) = (s, n);
        }
    }
    println!(
        "the longest Collatz sequence below 2,000,001 starts at {at} ({longest} steps); 2,000,000 \
         inputs mapped in {:?}",
        started.elapsed()
    );
    Ok(())
}
