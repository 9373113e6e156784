// A `const fn` is rejected at the `const` keyword.

use offload::offload;

#[offload]
const fn work() -> u32 {
    1
}

fn main() {}
