// An unknown key inside `breaker(...)` is an error on the key that lists `failures` and
// `reset`, with a hint for a likely guess.

use offload::offload;

#[offload(breaker(failures = 3, cooldown = "1m"))]
fn work() {}

fn main() {}
