// `breaker` takes a parenthesised list, not a value: `breaker = 3` is an error on the value.

use offload::offload;

#[offload(breaker = 3)]
fn work() {}

fn main() {}
