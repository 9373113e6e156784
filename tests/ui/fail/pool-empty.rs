// A pool name cannot be empty.

use offload::offload;

#[offload(pool = "")]
fn work() {}

fn main() {}
