// `breaker(failures = N)` opens after N failures in a row: zero is an error on the value.

use offload::offload;

#[offload(breaker(failures = 0, reset = "10s"))]
fn work() {}

fn main() {}
