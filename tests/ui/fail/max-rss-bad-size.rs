// A `max_rss` size is a whole number with a unit; a fraction is rejected.

use offload::offload;

#[offload(max_rss = "1.5GiB")]
fn work() {}

fn main() {}
