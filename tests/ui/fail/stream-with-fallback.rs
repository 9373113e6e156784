// A function that streams its results cannot have a fallback: one error, at the fallback's
// path, and the function still expands (its call site compiles).

use offload::offload;

fn nothing(_n: u64) -> std::vec::IntoIter<u64> {
    Vec::new().into_iter()
}

#[offload(fallback = nothing)]
fn count(n: u64) -> impl Iterator<Item = u64> {
    0..n
}

async fn caller() {
    let _ = count(3).next().await;
}

fn main() {
    let _ = caller;
}
