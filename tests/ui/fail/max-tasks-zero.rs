// `max_tasks` must be at least 1: a worker that runs no call would never be used.

use offload::offload;

#[offload(max_tasks = 0)]
fn work() {}

fn main() {}
