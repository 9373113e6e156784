// `crate = "..."` must hold a path; the error is on the literal.

use offload::offload;

#[offload(crate = "my crate")]
fn work() {}

fn main() {}
