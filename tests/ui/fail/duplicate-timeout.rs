// An argument given twice is reported once, on its second occurrence.

use offload::offload;

#[offload(timeout = "1s", timeout = "2s")]
fn work() {}

fn main() {}
