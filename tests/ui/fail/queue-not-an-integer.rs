// `queue` takes an integer literal, not a string.

use offload::offload;

#[offload(queue = "64")]
fn work() {}

fn main() {}
