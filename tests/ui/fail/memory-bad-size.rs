// A `memory` size needs a unit: a bare number is rejected, pointing at the literal.

use offload::offload;

#[offload(memory = "512")]
fn work() {}

fn main() {}
