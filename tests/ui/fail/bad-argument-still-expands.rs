// With a bad argument but a valid function, the function is still expanded (with the
// defaults), so its callers type-check: the argument error is the only error.

use offload::offload;

#[offload(timeout = "0s")]
fn answer() -> u32 {
    42
}

async fn caller() -> Result<u32, offload::Error> {
    answer().await
}

fn main() {
    drop(caller());
}
