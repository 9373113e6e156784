// A zero `memory` limit is rejected at compile time.

use offload::offload;

#[offload(memory = "0MiB")]
fn work() {}

fn main() {}
