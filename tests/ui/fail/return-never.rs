// A function that never returns cannot send back a result.

use offload::offload;

#[offload]
fn forever() -> ! {
    loop {}
}

fn main() {}
