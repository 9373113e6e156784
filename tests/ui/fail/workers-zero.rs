// A fixed worker count of zero is rejected.

use offload::offload;

#[offload(workers = "0")]
fn work() {}

fn main() {}
