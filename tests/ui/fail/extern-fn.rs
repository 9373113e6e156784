// A function with an ABI is rejected at the ABI.

use offload::offload;

#[offload]
extern "C" fn work() -> u32 {
    1
}

fn main() {}
