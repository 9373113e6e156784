// An `unsafe fn` is rejected at the `unsafe` keyword.

use offload::offload;

#[offload]
unsafe fn work() -> u32 {
    1
}

fn main() {}
