// `fallback` takes a path to a function, not a string: the error says to drop the quotes.

use offload::offload;

fn cached() {}

#[offload(fallback = "cached")]
fn work() {}

fn main() {}
