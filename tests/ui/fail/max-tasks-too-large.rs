// A count that does not fit `u64` is rejected, pointing at the literal.

use offload::offload;

#[offload(max_tasks = 18446744073709551616)]
fn work() {}

fn main() {}
