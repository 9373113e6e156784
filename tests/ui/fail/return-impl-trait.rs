// An `impl Trait` return type is rejected at the `impl Trait`.

use offload::offload;

#[offload]
fn numbers() -> impl Iterator<Item = u32> {
    0..10
}

fn main() {}
