// An unknown argument is an error on its key that lists every accepted key.

use offload::offload;

#[offload(priority = "high")]
fn work() {}

fn main() {}
