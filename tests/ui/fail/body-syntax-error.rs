// A syntax error in the body is the compiler's own error, once, as without the attribute:
// the macro keeps the body as tokens, so it neither fails on it nor adds errors of its own,
// and the function is still an `async fn`, so its callers compile.

use offload::offload;

#[offload]
fn half(x: u32) -> u32 {
    let y = x / 2
    y
}

async fn caller() -> Result<u32, offload::Error> {
    half(4).await
}

fn main() {
    let _ = caller();
}
