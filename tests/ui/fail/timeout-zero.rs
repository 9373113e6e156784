// A zero timeout is rejected at compile time.

use offload::offload;

#[offload(timeout = "0s")]
fn work() {}

fn main() {}
