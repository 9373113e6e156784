// An `impl Trait` return type other than `impl Iterator<Item = T>` is rejected at the
// `impl Trait`, with a hint at streaming.

use offload::offload;

#[offload]
fn number() -> impl Into<u64> {
    7u32
}

fn main() {}
