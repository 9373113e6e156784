// A `max_payload` size is a whole number with a unit; a fraction is rejected.

use offload::offload;

#[offload(max_payload = "1.5GiB")]
fn work() {}

fn main() {}
