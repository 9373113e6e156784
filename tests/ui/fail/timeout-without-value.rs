// A key without `= "value"` says what the value should look like.

use offload::offload;

#[offload(timeout)]
fn work() {}

fn main() {}
