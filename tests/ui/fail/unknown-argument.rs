// An unknown argument is an error on its key that lists every accepted key.

use offload::offload;

#[offload(retries = "3")]
fn work() {}

fn main() {}
