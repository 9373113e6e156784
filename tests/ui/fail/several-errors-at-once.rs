// Every bad argument is reported, not only the first.

use offload::offload;

#[offload(timeout = "soon", workers = "0")]
fn work() {}

fn main() {}
