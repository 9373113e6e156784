// A likely misspelling of an argument gets a "did you mean" hint.

use offload::offload;

#[offload(timeout_ms = "500")]
fn work() {}

fn main() {}
