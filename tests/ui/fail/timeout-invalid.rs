// A timeout that is not a duration is an error on the literal, with humantime's reason.

use offload::offload;

#[offload(timeout = "30")]
fn work() {}

fn main() {}
