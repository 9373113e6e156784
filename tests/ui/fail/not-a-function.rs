// `#[offload]` on something other than a function is one error, and the item is kept.

use offload::offload;

#[offload]
struct Work;

fn main() {}
