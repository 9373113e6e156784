// `breaker(reset = "...")` is a duration: one that does not parse is an error on the literal.

use offload::offload;

#[offload(breaker(failures = 3, reset = "1 minute or so"))]
fn work() {}

fn main() {}
