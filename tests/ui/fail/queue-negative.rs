// A negative `queue` is rejected, pointing at the whole `-1`.

use offload::offload;

#[offload(queue = -1)]
fn work() {}

fn main() {}
