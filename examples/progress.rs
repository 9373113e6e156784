//! A progress bar in the terminal, driven by a worker: the offloaded function reports how
//! far it is with `offload::progress`, and the caller draws it with `indicatif`.
//!
//! `cargo run --release --example progress`

use indicatif::{ProgressBar, ProgressStyle};

/// Counts the primes below `below`, the slow way, reporting progress on every number.
#[offload::offload(timeout = "5m", workers = "1")]
fn count_primes(below: u64) -> u64 {
    let mut count = 0;
    for n in 2..below {
        if (2..).take_while(|d| d * d <= n).all(|d| n % d != 0) {
            count += 1;
        }
        // Cheap on every step: a report goes out at most every 20 ms, and the last.
        offload::progress(n + 1, below);
    }
    count
}

#[tokio::main]
async fn main() -> Result<(), offload::Error> {
    let below = 4_000_000;
    let bar = ProgressBar::new(below);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {percent:>3}% {elapsed_precise} (in a worker)")
            .expect("a valid template"),
    );
    let drawn = bar.clone();
    let primes =
        offload::with_progress(move |p: offload::Progress| drawn.set_position(p.done), count_primes(below))
            .await?;
    bar.finish();
    println!("{primes} primes below {below}");
    Ok(())
}
