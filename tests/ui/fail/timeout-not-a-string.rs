// `timeout` takes a string literal; a bare number is an error on the value.

use offload::offload;

#[offload(timeout = 30)]
fn work() {}

fn main() {}
