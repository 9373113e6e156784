// A function that streams its results cannot be retried: one error, at the setting, and the
// function still expands (its call site compiles).

use offload::offload;

#[offload(retries = 2)]
fn count(n: u64) -> impl Iterator<Item = u64> {
    0..n
}

async fn caller() {
    let _ = count(3).next().await;
}

fn main() {
    let _ = caller;
}
