// `overload` is "wait" or "reject"; anything else is rejected, pointing at the literal.

use offload::offload;

#[offload(overload = "drop")]
fn work() {}

fn main() {}
