// `cpus/0` is rejected at compile time, not left to divide by zero at run time.

use offload::offload;

#[offload(workers = "cpus/0")]
fn work() {}

fn main() {}
