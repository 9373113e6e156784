// A timeout that does not fit in u64 milliseconds is rejected at compile time.

use offload::offload;

#[offload(timeout = "1000000000 years")]
fn work() {}

fn main() {}
